//! Compute kernels for Tessera.
//!
//! Every kernel has a plain scalar reference (`*_ref`) that defines its meaning, and a fast
//! variant (runtime-dispatched SIMD, multi-threaded on a [`CpuPool`]) that is tested against the
//! reference on random data of awkward sizes. This crate has no async code and no I/O; it owns
//! only arithmetic over slices. Matrix conventions follow checkpoints: a weight matrix is
//! row-major `(out_features, in_features)`, activations are row-major `(tokens, features)`.
#![allow(unsafe_code)] // SIMD intrinsics; every `unsafe` block carries a `// SAFETY:` comment.

pub mod activation;
pub mod attention;
pub mod bandwidth;
pub mod comm;
pub mod error;
pub mod hugepage;
pub mod isa;
pub mod matmul;
pub mod norm;
pub mod peak;
pub mod pool;
pub mod profile;
pub mod quant;
pub mod rope;
pub mod softmax;
pub mod weights;

mod simd;

pub use error::KernelError;
pub use hugepage::HugePageBuf;
pub use isa::Isa;
pub use pool::CpuPool;
pub use simd::Elem;
pub use weights::{WeightData, WeightMatrix};
#[cfg(feature = "cuda")]
pub mod cuda;
