//! The CUDA backend's kernels: NVRTC-compiled sources from `kernels/cuda/*.cu`, cuBLASLt GEMMs
//! and an NCCL communicator, all through libraries loaded at run time (`libs`).
//!
//! Everything here is bf16 storage with f32 accumulation. Invariants: no function in this
//! module panics on a missing library or driver (they are found and loaded first, and calls
//! into `cudarc` that could panic run under `catch_unwind`); every launch checks its slice
//! lengths on the host before touching the device.

pub mod device;
pub mod gemm;
pub mod libs;
pub mod nccl;
pub mod ops;
pub mod plan;
pub mod selftest;

pub use device::{GpuDevice, GpuOptions};

/// Failures of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library could not be found or opened.
    #[error(
        "{what} not found: looked for {names} in {searched}; install the NVIDIA driver / CUDA 13 libraries or pass --cuda-lib-dir"
    )]
    LibraryNotFound {
        /// Which library.
        what: &'static str,
        /// File names tried.
        names: String,
        /// Folders searched.
        searched: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// NVRTC could not compile a kernel.
    #[error("compiling {file} with NVRTC: {log}")]
    Compile {
        /// The source file.
        file: &'static str,
        /// NVRTC's log.
        log: String,
    },
    /// cuBLASLt failed.
    #[error("cuBLASLt: {0}")]
    Blas(String),
    /// NCCL failed.
    #[error("NCCL: {0}")]
    Nccl(String),
    /// Arguments of a launch do not fit together.
    #[error("{kernel}: {detail}")]
    Shape {
        /// The kernel.
        kernel: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A library call panicked (caught; the device is unusable).
    #[error("CUDA library panicked: {0}")]
    Panicked(String),
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaError::Driver(e.to_string())
    }
}

impl From<cudarc::cublaslt::result::CublasError> for CudaError {
    fn from(e: cudarc::cublaslt::result::CublasError) -> Self {
        CudaError::Blas(format!("{e:?}"))
    }
}

/// Runs `f`, turning a panic inside a CUDA library wrapper into an error.
pub fn guard<T>(f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, CudaError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(CudaError::Panicked(msg))
        }
    }
}
