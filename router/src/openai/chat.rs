//! `POST /v1/chat/completions`: an OpenAI request becomes a `tessera.v1.ChatRequest`, runs through
//! the same validation and routing as the gRPC `Chat`, and comes back as OpenAI's
//! `chat.completion` object or as `chat.completion.chunk` Server-Sent Events ending with
//! `data: [DONE]`.
//!
//! Streaming contract (as OpenAI's): every choice's first chunk carries `role: "assistant"`;
//! content and tool calls follow as deltas (a tool call is sent whole, with its id, when the
//! parser has it complete); each choice ends with an empty delta carrying its `finish_reason`;
//! with `stream_options.include_usage` every chunk has `"usage": null` and one last chunk with
//! no choices carries the usage. An error after the stream started is sent as one
//! `data: {"error": …}` event and the stream ends without `[DONE]`.

use serde_json::{Value, json};
use tessera_proto::v1 as api;

use super::error::ApiError;
use super::types::{ChatCompletionRequest, ChatMessageIn, ResponseFormatIn, ToolIn};
use super::{Shape, sampling, stop_list};
use crate::service::Delta;

/// Turns the OpenAI request into the public proto request (checked further by the core).
pub(crate) fn to_proto(r: &ChatCompletionRequest) -> Result<api::ChatRequest, ApiError> {
    let messages = messages(&r.messages)?;
    let tools = tools(&r.tools)?;
    let tool_choice = r.tool_choice.as_ref().map(tool_choice).transpose()?;
    if tool_choice.is_some() && tools.is_empty() {
        return Err(ApiError::invalid("tool_choice", "tool_choice is only allowed when tools are given"));
    }
    if r.top_logprobs.is_some() && !r.logprobs {
        return Err(ApiError::invalid("top_logprobs", "top_logprobs requires logprobs to be true"));
    }
    if r.stream_options.is_some() && !r.stream {
        return Err(ApiError::invalid("stream_options", "stream_options is only allowed when stream is true"));
    }
    let max_tokens = match (r.max_tokens, r.max_completion_tokens) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid("max_tokens", "max_tokens and max_completion_tokens disagree; give one"));
        }
        (a, b) => b.or(a),
    };
    let mut s = sampling(shape_of!(r, max_tokens))?;
    s.logprobs = r.logprobs;
    s.top_logprobs = r.top_logprobs.unwrap_or(0);
    let response_format = r.response_format.as_ref().map(response_format).transpose()?;
    Ok(api::ChatRequest {
        model: r.model.clone(),
        messages,
        tools,
        tool_choice,
        sampling: Some(s),
        response_format,
        request_id: String::new(),
        parallel_tool_calls: r.parallel_tool_calls,
    })
}

/// `messages` as proto messages.
pub(crate) fn messages(ms: &[ChatMessageIn]) -> Result<Vec<api::ChatMessage>, ApiError> {
    ms.iter().enumerate().map(|(i, m)| message(i, m)).collect()
}

/// `tools` as proto tools (function tools only; no parameters = no arguments).
pub(crate) fn tools(ts: &[ToolIn]) -> Result<Vec<api::Tool>, ApiError> {
    let mut tools = Vec::with_capacity(ts.len());
    for (i, t) in ts.iter().enumerate() {
        if t.kind != "function" {
            return Err(ApiError::unsupported(&format!("tools[{i}].type"), "only function tools are supported"));
        }
        let parameters = t.function.parameters.clone().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        tools.push(api::Tool {
            name: t.function.name.clone(),
            description: t.function.description.clone(),
            parameters_json: parameters.to_string(),
        });
    }
    Ok(tools)
}

fn message(i: usize, m: &ChatMessageIn) -> Result<api::ChatMessage, ApiError> {
    let field = |f: &str| format!("messages[{i}].{f}");
    let role = match m.role.as_str() {
        "developer" => "system",
        r @ ("system" | "user" | "assistant" | "tool") => r,
        other => {
            return Err(ApiError::invalid(
                &field("role"),
                format!("role {other:?} is not supported; use system, developer, user, assistant or tool"),
            ));
        }
    };
    let content = match &m.content {
        Value::String(s) => s.clone(),
        Value::Null if role == "assistant" => String::new(),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (Some(kind), _) if kind != "text" => {
                        return Err(ApiError::unsupported(
                            &field(&format!("content[{j}].type")),
                            format!("content parts of type {kind:?} are not supported; this model reads text only"),
                        ));
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            &field(&format!("content[{j}]")),
                            "a content part must be {\"type\": \"text\", \"text\": \"…\"}",
                        ));
                    }
                }
            }
            text
        }
        Value::Null => return Err(ApiError::invalid(&field("content"), "content is required for this role")),
        _ => return Err(ApiError::invalid(&field("content"), "content must be a string or an array of text parts")),
    };
    if !m.tool_calls.is_empty() && role != "assistant" {
        return Err(ApiError::invalid(&field("tool_calls"), "only assistant messages carry tool_calls"));
    }
    let mut tool_calls = Vec::with_capacity(m.tool_calls.len());
    for (j, c) in m.tool_calls.iter().enumerate() {
        if c.kind != "function" {
            return Err(ApiError::unsupported(&field(&format!("tool_calls[{j}].type")), "only function calls exist"));
        }
        tool_calls.push(api::ToolCall {
            id: c.id.clone(),
            name: c.function.name.clone(),
            arguments_json: c.function.arguments.clone(),
        });
    }
    if role == "tool" && m.tool_call_id.as_deref().is_none_or(str::is_empty) {
        return Err(ApiError::invalid(&field("tool_call_id"), "tool messages must say which call they answer"));
    }
    Ok(api::ChatMessage {
        role: role.to_string(),
        content,
        tool_calls,
        tool_call_id: m.tool_call_id.clone().unwrap_or_default(),
        name: m.name.clone().unwrap_or_default(),
    })
}

fn tool_choice(v: &Value) -> Result<api::ToolChoice, ApiError> {
    use api::tool_choice::Choice;
    let choice = match v {
        Value::String(s) if s == "auto" => Choice::Auto(api::Empty {}),
        Value::String(s) if s == "none" => Choice::None(api::Empty {}),
        Value::String(s) if s == "required" => Choice::Required(api::Empty {}),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            match o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
                Some(name) => Choice::Function(name.to_string()),
                None => return Err(ApiError::invalid("tool_choice", "tool_choice.function.name is required")),
            }
        }
        _ => {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}",
            ));
        }
    };
    Ok(api::ToolChoice { choice: Some(choice) })
}

fn response_format(f: &ResponseFormatIn) -> Result<api::ResponseFormat, ApiError> {
    use api::response_format::Format;
    let format = match f {
        ResponseFormatIn::Text => Format::Text(api::Empty {}),
        ResponseFormatIn::JsonObject => Format::JsonObject(api::Empty {}),
        ResponseFormatIn::JsonSchema { json_schema } => {
            let Some(schema) = &json_schema.schema else {
                return Err(ApiError::invalid("response_format", "response_format.json_schema.schema is required"));
            };
            Format::JsonSchema(api::JsonSchema { name: json_schema.name.clone(), schema_json: schema.to_string() })
        }
    };
    Ok(api::ResponseFormat { format: Some(format) })
}

/// OpenAI's `finish_reason`.
pub(crate) fn finish_reason(r: api::FinishReason) -> &'static str {
    match r {
        api::FinishReason::Length => "length",
        api::FinishReason::ToolCalls => "tool_calls",
        _ => "stop",
    }
}

/// OpenAI's chat `logprobs.content` entries.
pub(crate) fn logprobs(lps: &[api::TokenLogprob]) -> Value {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    let content: Vec<Value> = lps
        .iter()
        .map(|t| {
            let mut e = entry(&t.token, t.logprob);
            e["top_logprobs"] = t.top_logprobs.iter().map(|a| entry(&a.token, a.logprob)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// An OpenAI tool call.
fn tool_call(c: &api::ToolCall) -> Value {
    json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}})
}

/// The `usage` object.
pub(crate) fn usage(u: &api::Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
}

/// The non-streaming response.
pub(crate) fn response(head: &super::Head, r: &api::ChatResponse, want_logprobs: bool) -> Value {
    let choices: Vec<Value> = r
        .choices
        .iter()
        .map(|c| {
            let m = c.message.clone().unwrap_or_default();
            let calls: Vec<Value> = m.tool_calls.iter().map(tool_call).collect();
            let content = if m.content.is_empty() && !calls.is_empty() { Value::Null } else { json!(m.content) };
            let mut message = json!({"role": "assistant", "content": content, "refusal": null});
            if !calls.is_empty() {
                message["tool_calls"] = json!(calls);
            }
            let reason = api::FinishReason::try_from(c.finish_reason).unwrap_or(api::FinishReason::Stop);
            json!({
                "index": c.index,
                "message": message,
                "logprobs": if want_logprobs { logprobs(&c.logprobs) } else { Value::Null },
                "finish_reason": finish_reason(reason),
            })
        })
        .collect();
    let mut out = head.object("chat.completion");
    out["choices"] = json!(choices);
    out["usage"] = r.usage.as_ref().map_or(Value::Null, usage);
    out
}

/// Builds the chunks of a streamed chat completion, one [`Delta`] at a time.
pub(crate) struct ChunkWriter {
    head: super::Head,
    include_usage: bool,
    want_logprobs: bool,
    /// Per choice: whether its role chunk went out, and how many tool calls it sent.
    started: Vec<bool>,
    calls_sent: Vec<usize>,
}

impl ChunkWriter {
    /// A writer for `n` choices.
    pub(crate) fn new(head: super::Head, n: u32, include_usage: bool, want_logprobs: bool) -> Self {
        ChunkWriter {
            head,
            include_usage,
            want_logprobs,
            started: vec![false; n as usize],
            calls_sent: vec![0; n as usize],
        }
    }

    fn chunk(&self, index: u32, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
        let mut c = self.head.object("chat.completion.chunk");
        c["choices"] = json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]);
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// The chunks one delta becomes.
    pub(crate) fn push(&mut self, d: Delta) -> Vec<Value> {
        let i = d.index as usize;
        let mut out = Vec::new();
        let Some(started) = self.started.get_mut(i) else { return out };
        let mut delta = serde_json::Map::new();
        if !*started {
            *started = true;
            delta.insert("role".into(), json!("assistant"));
            delta.insert("content".into(), json!(""));
        }
        if !d.text.is_empty() {
            delta.insert("content".into(), json!(d.text));
        }
        if !d.tool_calls.is_empty() {
            let first = self.calls_sent[i];
            let calls: Vec<Value> = d
                .tool_calls
                .iter()
                .enumerate()
                .map(|(k, c)| {
                    json!({"index": first + k, "id": c.id, "type": "function",
                           "function": {"name": c.name, "arguments": c.arguments_json()}})
                })
                .collect();
            self.calls_sent[i] += calls.len();
            delta.insert("tool_calls".into(), json!(calls));
        }
        let lp = if self.want_logprobs && !d.logprobs.is_empty() { logprobs(&d.logprobs) } else { Value::Null };
        if !delta.is_empty() || !lp.is_null() {
            out.push(self.chunk(d.index, Value::Object(delta), lp, None));
        }
        if let Some((reason, _)) = d.finish {
            out.push(self.chunk(d.index, json!({}), Value::Null, Some(finish_reason(reason))));
        }
        if let (true, Some(u)) = (self.include_usage, d.usage) {
            out.push(self.head.usage_chunk("chat.completion.chunk", &u));
        }
        out
    }
}
