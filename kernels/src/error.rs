//! The one error type of this crate.
//!
//! Every kernel validates its slice lengths and indices before touching memory and reports a
//! mismatch as [`KernelError::Shape`] naming the kernel; kernels never panic on bad input.

/// An error from a kernel or from building the thread pool.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Slice lengths, dimensions or indices passed to `kernel` do not fit together.
    #[error("{kernel}: {detail}")]
    Shape {
        /// The kernel that rejected its input, e.g. `"matmul"`.
        kernel: &'static str,
        /// What did not fit, with the numbers.
        detail: String,
    },
    /// The kernel thread pool could not be built, or a requested ISA is not available.
    #[error("thread pool: {0}")]
    Pool(String),
}

impl KernelError {
    /// Shorthand for a [`KernelError::Shape`].
    pub(crate) fn shape(kernel: &'static str, detail: impl Into<String>) -> Self {
        KernelError::Shape { kernel, detail: detail.into() }
    }
}

/// Returns a [`KernelError::Shape`] unless `actual == expected`.
pub(crate) fn check_len(kernel: &'static str, what: &str, actual: usize, expected: usize) -> Result<(), KernelError> {
    if actual == expected {
        Ok(())
    } else {
        Err(KernelError::shape(kernel, format!("{what} has length {actual}, expected {expected}")))
    }
}

/// `a * b`, or a [`KernelError::Shape`] if it overflows `usize`.
pub(crate) fn mul(kernel: &'static str, a: usize, b: usize) -> Result<usize, KernelError> {
    a.checked_mul(b).ok_or_else(|| KernelError::shape(kernel, format!("{a} * {b} overflows usize")))
}
