//! Which SIMD instruction set a kernel call uses.
//!
//! An [`Isa`] value held by a [`crate::CpuPool`] is always supported by the running CPU: the pool
//! checks it with [`Isa::is_supported`] when it is built, so kernels may dispatch on it without
//! re-detecting features on every call.

use std::fmt;

/// A SIMD code path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// x86-64 AVX2 with fused multiply-add, 8 f32 lanes.
    Avx2Fma,
    /// Portable scalar code (written so the compiler can auto-vectorise the inner loops).
    Scalar,
}

impl Isa {
    /// The best path the running CPU supports.
    pub fn detect() -> Isa {
        if Isa::Avx2Fma.is_supported() { Isa::Avx2Fma } else { Isa::Scalar }
    }

    /// Whether the running CPU can execute this path.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2Fma => avx2_fma_detected(),
        }
    }

    /// Every path the running CPU supports, best first (for tests and benches).
    pub fn available() -> Vec<Isa> {
        [Isa::Avx2Fma, Isa::Scalar].into_iter().filter(|isa| isa.is_supported()).collect()
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma_detected() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_fma_detected() -> bool {
    false
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isa::Avx2Fma => "avx2+fma",
            Isa::Scalar => "scalar",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_is_supported_and_displays() {
        let isa = Isa::detect();
        assert!(isa.is_supported());
        assert!(Isa::available().contains(&isa));
        assert!(Isa::available().contains(&Isa::Scalar));
        assert_eq!(Isa::Scalar.to_string(), "scalar");
        assert_eq!(Isa::Avx2Fma.to_string(), "avx2+fma");
    }
}
