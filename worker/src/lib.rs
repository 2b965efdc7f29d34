//! One Tessera worker: a model, its KV cache and the generation loop.
//!
//! Layers: `loader` turns a model spec into a config, weight source and tokenizer; `model`
//! builds the forward pass over `tessera-kernels`; `kv_cache` pages K/V; `engine` drives
//! generation; `plan` sizes deployments. Nothing here does network I/O except fetching the
//! default model.

pub mod backend;
pub mod config;
pub mod engine;
pub mod error;
pub mod kv_cache;
pub mod loader;
pub mod model;
pub mod plan;
pub mod presets;
pub mod sampler;
pub mod tensor;

pub use config::{Architecture, ModelConfig};
pub use engine::{Engine, FinishReason, GenerationOutput, GenerationRequest, GenerationStats};
pub use error::{EngineError, LoadError};
pub use tensor::WeightsDtype;
