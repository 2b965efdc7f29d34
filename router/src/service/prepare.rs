//! Validation: a public request becomes a [`Prepared`] worker request, or the status that says
//! what is wrong with it (`INVALID_ARGUMENT` naming the field, `NOT_FOUND` for another model,
//! `DEADLINE_EXCEEDED` for a deadline that already passed). Nothing here touches a worker.

use std::time::Duration;

use tessera_proto::v1 as api;
use tessera_proto::worker_v1 as wpb;
use tonic::{Request, Status};

use super::GenerationService;
use crate::chat_template::ChatMessage;
use crate::text::{ParsedToolCall, ToolCallStyle, ToolSpec};

/// Most samples per request.
const MAX_N: u32 = 16;
/// Most alternatives per token with logprobs.
const MAX_TOP_LOGPROBS: u32 = 20;

pub(crate) fn invalid(field: &str, msg: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {msg}"))
}

/// The time left before the client's deadline, if it set one; an expired deadline is an error.
pub(crate) fn deadline<T>(req: &Request<T>) -> Result<Option<Duration>, Status> {
    let Some(v) = req.metadata().get("grpc-timeout") else { return Ok(None) };
    let s = v.to_str().map_err(|_| invalid("grpc-timeout", "not ASCII"))?;
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = num.parse().map_err(|_| invalid("grpc-timeout", format!("{s:?} is not a timeout")))?;
    let d = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(invalid("grpc-timeout", format!("{s:?} has an unknown unit"))),
    };
    if d.is_zero() {
        return Err(Status::deadline_exceeded("the deadline expired before the request was handled"));
    }
    Ok(Some(d))
}

/// A validated request, ready for a worker.
pub struct Prepared {
    pub(crate) request_id: String,
    pub(crate) prompt: Vec<u32>,
    pub(crate) worker: wpb::GenerateRequest,
    pub(crate) stops: Vec<String>,
    pub(crate) n: u32,
    pub(crate) return_ids: bool,
    pub(crate) logprobs: bool,
    pub(crate) deadline: Option<Duration>,
    /// Tools the model may call: its output is parsed for calls.
    pub(crate) tools: Vec<ToolSpec>,
    /// How the output writes tool calls: the model's own style, or JSON when a call is forced.
    pub(crate) tool_style: ToolCallStyle,
    /// Whether a sample may make more than one tool call (later ones are dropped otherwise).
    pub(crate) parallel_tool_calls: bool,
}

impl GenerationService {
    pub(crate) fn check_model(&self, model: &str) -> Result<(), Status> {
        if model.is_empty() || model == self.model.id {
            Ok(())
        } else {
            Err(Status::not_found(format!("model: unknown model {model:?}; this router serves {:?}", self.model.id)))
        }
    }

    pub(crate) fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, Status> {
        self.model
            .tokenizer
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Status::internal(format!("tokenizing: {e}")))
    }

    /// Renders a conversation with the chat template; `tools` (validated here) are offered to
    /// the model when given.
    pub(crate) fn render_chat(
        &self,
        messages: &[api::ChatMessage],
        tools: &[api::Tool],
    ) -> Result<(String, Vec<ToolSpec>), Status> {
        let Some(template) = &self.model.template else {
            return Err(Status::failed_precondition(format!("model {:?} has no chat template", self.model.id)));
        };
        if messages.is_empty() {
            return Err(invalid("messages", "at least one message is required"));
        }
        let mut out = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
                return Err(invalid(
                    &format!("messages[{i}].role"),
                    format!("{:?} is not system, user, assistant or tool", m.role),
                ));
            }
            let mut calls = Vec::with_capacity(m.tool_calls.len());
            for (j, c) in m.tool_calls.iter().enumerate() {
                let field = format!("messages[{i}].tool_calls[{j}]");
                if c.name.is_empty() {
                    return Err(invalid(&format!("{field}.name"), "is empty"));
                }
                let arguments: serde_json::Value = serde_json::from_str(&c.arguments_json)
                    .map_err(|e| invalid(&format!("{field}.arguments_json"), format!("not JSON: {e}")))?;
                if !arguments.is_object() {
                    return Err(invalid(&format!("{field}.arguments_json"), "must be a JSON object"));
                }
                calls.push(ParsedToolCall { id: c.id.clone(), name: c.name.clone(), arguments });
            }
            let mut msg = ChatMessage::new(m.role.clone(), m.content.clone()).with_tool_calls(calls);
            if !m.tool_call_id.is_empty() {
                msg = msg.with_tool_call_id(m.tool_call_id.clone());
            }
            if !m.name.is_empty() {
                msg = msg.with_name(m.name.clone());
            }
            out.push(msg);
        }
        let mut specs = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            if t.name.is_empty() {
                return Err(invalid(&format!("tools[{i}].name"), "is empty"));
            }
            let schema: serde_json::Value = serde_json::from_str(&t.parameters_json)
                .map_err(|e| invalid(&format!("tools[{i}].parameters_json"), format!("not JSON: {e}")))?;
            if !schema.is_object() {
                return Err(invalid(&format!("tools[{i}].parameters_json"), "must be a JSON Schema object"));
            }
            if let Err(e) = jsonschema::validator_for(&schema) {
                return Err(invalid(&format!("tools[{i}].parameters_json"), format!("not a valid JSON Schema: {e}")));
            }
            specs.push(ToolSpec { name: t.name.clone(), description: t.description.clone(), parameters: schema });
        }
        let text = template.render_with_tools(&out, &specs, true).map_err(|e| invalid("messages", e))?;
        Ok((text, specs))
    }

    /// Validates sampling and builds the worker request for `prompt`.
    fn prepare(
        &self,
        request_id: &str,
        prompt: Vec<u32>,
        sampling: Option<&api::SamplingParams>,
        format: Option<&api::ResponseFormat>,
        return_ids: bool,
        deadline: Option<Duration>,
    ) -> Result<Prepared, Status> {
        let m = &self.model;
        if prompt.is_empty() {
            return Err(invalid("prompt", "is empty"));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= m.vocab_size) {
            return Err(invalid("prompt", format!("token id {bad} is outside the vocabulary of {}", m.vocab_size)));
        }
        if prompt.len() >= m.max_context {
            return Err(invalid(
                "prompt",
                format!(
                    "{} tokens leave no room to generate in the model's context of {}",
                    prompt.len(),
                    m.max_context
                ),
            ));
        }
        let default = api::SamplingParams::default();
        let s = sampling.unwrap_or(&default);
        let temperature = s.temperature.unwrap_or(1.0);
        if !(temperature >= 0.0 && temperature.is_finite()) {
            return Err(invalid("sampling.temperature", "must be a finite number ≥ 0"));
        }
        if s.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return Err(invalid("sampling.top_p", "must be in (0, 1]"));
        }
        if !(0.0..1.0).contains(&s.min_p) {
            return Err(invalid("sampling.min_p", "must be in [0, 1)"));
        }
        if s.repetition_penalty.is_some_and(|p| !(p > 0.0 && p.is_finite())) {
            return Err(invalid("sampling.repetition_penalty", "must be > 0"));
        }
        for (name, v) in [("presence_penalty", s.presence_penalty), ("frequency_penalty", s.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(invalid(&format!("sampling.{name}"), "must be in [-2, 2]"));
            }
        }
        let room = m.max_context - prompt.len();
        if s.max_tokens as usize > room {
            return Err(invalid(
                "sampling.max_tokens",
                format!(
                    "{} exceeds the {room} tokens left in the context after a {}-token prompt",
                    s.max_tokens,
                    prompt.len()
                ),
            ));
        }
        if s.n > MAX_N {
            return Err(invalid("sampling.n", format!("at most {MAX_N}")));
        }
        if s.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(invalid("sampling.top_logprobs", format!("at most {MAX_TOP_LOGPROBS}")));
        }
        if let Some(bad) = s.stop_token_ids.iter().find(|&&t| t as usize >= m.vocab_size) {
            return Err(invalid("sampling.stop_token_ids", format!("token id {bad} is outside the vocabulary")));
        }
        let constraint = match format.and_then(|f| f.format.as_ref()) {
            None | Some(api::response_format::Format::Text(_)) => None,
            Some(api::response_format::Format::JsonObject(_)) => {
                Some(wpb::constraint::Kind::JsonObject(wpb::AnyJsonObject {}))
            }
            Some(api::response_format::Format::JsonSchema(js)) => {
                let v: serde_json::Value = serde_json::from_str(&js.schema_json)
                    .map_err(|e| invalid("response_format.json_schema.schema_json", format!("not JSON: {e}")))?;
                if !(v.is_object() || v.is_boolean()) {
                    return Err(invalid("response_format.json_schema.schema_json", "must be a JSON Schema object"));
                }
                Some(wpb::constraint::Kind::JsonSchema(js.schema_json.clone()))
            }
            Some(api::response_format::Format::Regex(r)) => Some(wpb::constraint::Kind::Regex(r.clone())),
        };
        let logprobs = s.logprobs || s.top_logprobs > 0;
        let worker = wpb::GenerateRequest {
            request_id: request_id.to_string(),
            prompt: prompt.clone(),
            max_tokens: s.max_tokens,
            sampling: Some(wpb::SamplingParams {
                temperature,
                top_p: s.top_p,
                top_k: s.top_k,
                min_p: s.min_p,
                repetition_penalty: s.repetition_penalty,
                presence_penalty: s.presence_penalty,
                frequency_penalty: s.frequency_penalty,
                // Fixed here, not by the worker: a migrated request continues the same random
                // stream on its next worker.
                seed: Some(s.seed.unwrap_or_else(rand::random)),
            }),
            stop_token_ids: s.stop_token_ids.clone(),
            min_tokens: s.min_tokens,
            ignore_eos: s.ignore_eos,
            logprobs: logprobs.then_some(s.top_logprobs),
            constraint: constraint.map(|kind| wpb::Constraint { kind: Some(kind) }),
            n: s.n.max(1),
            resume_output: Vec::new(),
        };
        Ok(Prepared {
            request_id: request_id.to_string(),
            prompt,
            worker,
            stops: s.stop.clone(),
            n: s.n.max(1),
            return_ids,
            logprobs,
            deadline,
            tools: Vec::new(),
            tool_style: ToolCallStyle::default(),
            parallel_tool_calls: true,
        })
    }
}

/// The JSON schema that makes the output a tool call in the JSON style: one call object (or, with
/// `parallel`, a non-empty array of them) naming one of `tools`, with arguments valid against
/// that tool's parameter schema. The worker enforces it as structured output.
fn forced_call_schema(tools: &[&ToolSpec], parallel: bool) -> serde_json::Value {
    let calls: Vec<serde_json::Value> = tools
        .iter()
        .map(|t| {
            serde_json::json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let call = match <[serde_json::Value; 1]>::try_from(calls) {
        Ok([one]) => one,
        Err(many) => serde_json::json!({ "anyOf": many }),
    };
    if parallel { serde_json::json!({"type": "array", "items": call, "minItems": 1}) } else { call }
}

fn request_id(given: &str) -> String {
    if given.is_empty() { format!("req-{:016x}", rand::random::<u64>()) } else { given.to_string() }
}

impl GenerationService {
    /// Validates a `Generate` request (`deadline`: the time the client gave it).
    pub fn prepare_generate(&self, r: &api::GenerateRequest, deadline: Option<Duration>) -> Result<Prepared, Status> {
        self.check_model(&r.model)?;
        let prompt = match &r.prompt {
            Some(api::generate_request::Prompt::Text(t)) => self.encode(t, true)?,
            Some(api::generate_request::Prompt::TokenIds(ids)) => ids.ids.clone(),
            None => return Err(invalid("prompt", "set text or token_ids")),
        };
        self.prepare(
            &request_id(&r.request_id),
            prompt,
            r.sampling.as_ref(),
            r.response_format.as_ref(),
            r.return_token_ids,
            deadline,
        )
    }

    /// Validates a `Chat` request: renders the conversation, then as [`Self::prepare_generate`].
    pub fn prepare_chat(&self, r: &api::ChatRequest, deadline: Option<Duration>) -> Result<Prepared, Status> {
        self.check_model(&r.model)?;
        let choice = r.tool_choice.as_ref().and_then(|c| c.choice.as_ref());
        let forced = match choice {
            None | Some(api::tool_choice::Choice::Auto(_) | api::tool_choice::Choice::None(_)) => None,
            Some(api::tool_choice::Choice::Required(_)) if r.tools.is_empty() => {
                return Err(invalid("tool_choice", "required needs at least one tool in tools"));
            }
            Some(api::tool_choice::Choice::Required(_)) => Some(None),
            Some(api::tool_choice::Choice::Function(name)) => {
                if !r.tools.iter().any(|t| &t.name == name) {
                    return Err(invalid("tool_choice.function", format!("no tool named {name:?} in tools")));
                }
                Some(Some(name.as_str()))
            }
        };
        let offered: &[api::Tool] =
            if matches!(choice, Some(api::tool_choice::Choice::None(_))) { &[] } else { &r.tools };
        let (text, tools) = self.render_chat(&r.messages, offered)?;
        let prompt = self.encode(&text, false)?;
        let parallel = r.parallel_tool_calls.unwrap_or(true);
        let mut p = self.prepare(
            &request_id(&r.request_id),
            prompt,
            r.sampling.as_ref(),
            r.response_format.as_ref(),
            false,
            deadline,
        )?;
        if let Some(only) = forced {
            if p.worker.constraint.is_some() {
                return Err(invalid("response_format", "cannot be combined with a tool_choice that forces a call"));
            }
            let callable: Vec<&ToolSpec> = tools.iter().filter(|t| only.is_none_or(|n| t.name == n)).collect();
            let schema = forced_call_schema(&callable, parallel);
            p.worker.constraint =
                Some(wpb::Constraint { kind: Some(wpb::constraint::Kind::JsonSchema(schema.to_string())) });
            p.tool_style = ToolCallStyle::Json;
        } else {
            p.tool_style = self.model.tool_style;
        }
        p.tools = tools;
        p.parallel_tool_calls = parallel;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(v: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut().insert("grpc-timeout", v.parse().unwrap_or_else(|_| panic!("{v}")));
        r
    }

    #[test]
    fn deadlines_parse_and_expired_ones_are_refused() {
        assert_eq!(deadline(&Request::new(())).ok(), Some(None));
        assert_eq!(deadline(&with_timeout("250m")).ok(), Some(Some(Duration::from_millis(250))));
        assert_eq!(deadline(&with_timeout("2S")).ok(), Some(Some(Duration::from_secs(2))));
        assert_eq!(deadline(&with_timeout("0m")).map_err(|s| s.code()), Err(tonic::Code::DeadlineExceeded));
        assert_eq!(deadline(&with_timeout("5x")).map_err(|s| s.code()), Err(tonic::Code::InvalidArgument));
    }
}
