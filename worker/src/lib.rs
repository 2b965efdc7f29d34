//! One Tessera worker: a model, its KV cache, the continuous-batching engine and the gRPC service.
//!
//! Layers: `loader` turns a model spec into a config, weight source and tokenizer; `model`
//! builds the forward pass over `tessera-kernels`; `kv_cache` pages K/V and keys full blocks
//! for the prefix cache, whose changes `kv_events` numbers and streams; `sequence` and
//! `scheduler` decide what runs each step; `engine` runs steps; `serving` puts the engine on a
//! thread behind the `tessera.worker.v1.Worker` gRPC service and the HTTP probes; `plan` sizes
//! deployments.

pub mod backend;
pub mod config;
pub mod engine;
pub mod error;
pub mod kv_cache;
pub mod kv_events;
pub mod loader;
pub mod model;
pub mod parallel;
pub mod plan;
pub mod presets;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod serving;
pub mod structured;
pub mod tensor;

pub use config::{Architecture, ModelConfig};
pub use engine::{Engine, EngineOptions, FinishReason, GenerationOutput, GenerationRequest, GenerationStats};
pub use error::{EngineError, LoadError};
pub use tensor::WeightsDtype;
