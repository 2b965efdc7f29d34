//! The OpenAI request bodies we accept, as serde types.
//!
//! Every request type denies unknown fields: OpenAI answers an unrecognised argument with a 400,
//! and so do we, so no option is ever silently ignored. Fields OpenAI itself treats as
//! informational (`user`, `metadata`-free `name`s) are accepted and kept out of generation.
//! Fields whose JSON can take several shapes (`content`, `stop`, `prompt`, `tool_choice`) are kept
//! as [`serde_json::Value`] here and checked by the handlers, so their errors can name the field
//! and say what shapes are allowed.

use serde::Deserialize;
use serde_json::Value;

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub tools: Vec<ToolIn>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<ResponseFormatIn>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    pub n: Option<u32>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    /// vLLM's sampling extensions (clients send them in `extra_body`).
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub min_tokens: Option<u32>,
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    /// End-user id for abuse tracking: accepted, not used for generation.
    #[expect(dead_code, reason = "accepted (OpenAI accepts it) but not used for generation")]
    pub user: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// One message of `messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    pub role: String,
    /// A string, an array of `{"type": "text", "text": …}` parts, or null (assistant turns
    /// that only call tools).
    #[serde(default)]
    pub content: Value,
    pub name: Option<String>,
    #[serde(default)]
    pub tool_calls: Vec<ToolCallIn>,
    pub tool_call_id: Option<String>,
    /// Assistant refusals echoed back by clients: accepted, not shown to the model.
    #[expect(dead_code, reason = "accepted (OpenAI accepts it) but not used for generation")]
    pub refusal: Option<String>,
}

/// A tool call in an assistant message of the history.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCallIn {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCallIn,
}

/// The function of a [`ToolCallIn`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionCallIn {
    pub name: String,
    /// JSON text, as OpenAI sends it.
    pub arguments: String,
}

/// One entry of `tools`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionIn,
}

/// A function tool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionIn {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub parameters: Option<Value>,
    /// Arguments always follow the schema when a call is forced; accepted either way.
    #[expect(dead_code, reason = "accepted (OpenAI accepts it) but not used for generation")]
    pub strict: Option<bool>,
}

/// `response_format`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormatIn {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaIn },
}

/// `response_format.json_schema`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaIn {
    pub name: String,
    #[serde(default)]
    #[expect(dead_code, reason = "accepted (OpenAI accepts it) but not used for generation")]
    pub description: String,
    pub schema: Option<Value>,
    /// The worker always enforces the schema; `strict` is accepted either way.
    #[expect(dead_code, reason = "accepted (OpenAI accepts it) but not used for generation")]
    pub strict: Option<bool>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    /// A string, an array of strings, an array of token ids, or an array of such arrays.
    pub prompt: Value,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub echo: bool,
    /// How many alternatives per token to return with logprobs (0..=5 at OpenAI).
    pub logprobs: Option<u32>,
    pub n: Option<u32>,
    pub best_of: Option<u32>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    /// vLLM's sampling extensions (clients send them in `extra_body`).
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub min_tokens: Option<u32>,
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    pub suffix: Option<String>,
    #[expect(dead_code, reason = "accepted (OpenAI accepts it) but not used for generation")]
    pub user: Option<String>,
}

/// `POST /tokenize` (as vLLM's): a text prompt or a conversation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub model: String,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    #[serde(default)]
    pub tools: Vec<ToolIn>,
}
