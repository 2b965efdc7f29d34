//! The Tessera router: discovery (etcd or a static list), the worker pool (health supervision,
//! per-worker circuit breakers), KV-aware routing, the text side (chat templates, tokenization,
//! detokenization, stop strings, tool calls) and the public APIs (gRPC and OpenAI HTTP), with
//! retries and mid-stream migration when a worker fails.

pub mod breaker;
pub mod chat_template;
pub mod discovery;
pub mod http_server;

pub use chat_template::{ChatMessage, ChatTemplate, TemplateError};
pub mod metrics;
pub mod openai;
pub mod pool;
pub mod routing;
pub mod server;
pub mod service;
pub mod text;
