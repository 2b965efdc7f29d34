//! The Tessera router. For now it owns the text side every front end shares: rendering chat
//! templates. Discovery, routing and the public APIs join it with the cluster work.

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
