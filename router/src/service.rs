//! `tessera.v1.Generation`: the public gRPC API, served by the router.
//!
//! A request is validated and turned into token ids here (template, tokenizer), routed by the
//! [`WorkerPool`], and sent to the worker's `Generate`; the worker's token stream comes back as
//! UTF-8-safe text deltas with stop strings applied. Contracts:
//! - bad input is `INVALID_ARGUMENT` naming the field, an unknown model `NOT_FOUND`, no healthy
//!   worker `UNAVAILABLE`; nothing here panics on client input;
//! - the client's deadline (`grpc-timeout`) is passed on to the worker call, and an already
//!   expired one is refused with `DEADLINE_EXCEEDED` before any work;
//! - a client that cancels or drops its stream drops the worker stream, which aborts the
//!   request on the worker (the worker aborts requests whose stream closes);
//! - before the first token, a transport failure of one worker is retried on another
//!   (at most [`MAX_ATTEMPTS`] workers); after it, the error reaches the client.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_proto::v1 as api;
use tessera_proto::v1::generation_server::Generation;
use tessera_proto::worker_v1 as wpb;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::metrics::RouterMetrics;
use crate::pool::WorkerPool;
use crate::text::{Detokenizer, ParsedToolCall, StopMatcher, ToolCallStreamer, ToolCallStyle, ToolSpec};

/// Workers tried for one request before giving up (before its first token).
pub const MAX_ATTEMPTS: usize = 3;
/// Most samples per request.
const MAX_N: u32 = 16;
/// Most alternatives per token with logprobs.
const MAX_TOP_LOGPROBS: u32 = 20;

/// The model a router serves: its id and the text side of it.
pub struct TextModel {
    /// The model id clients name.
    pub id: String,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Hex SHA-256 of the tokenizer (workers must match it).
    pub tokenizer_sha256: String,
    /// Its chat template, when it has one.
    pub template: Option<ChatTemplate>,
    /// Context length in tokens.
    pub max_context: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// KV block size of the workers (for prefix hashes).
    pub block_size: usize,
    /// How this model writes tool calls (detected from its chat template).
    pub tool_style: ToolCallStyle,
}

/// The service.
pub struct GenerationService {
    model: Arc<TextModel>,
    pool: WorkerPool,
    metrics: Arc<RouterMetrics>,
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn invalid(field: &str, msg: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {msg}"))
}

/// The time left before the client's deadline, if it set one; an expired deadline is an error.
fn deadline<T>(req: &Request<T>) -> Result<Option<Duration>, Status> {
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
struct Prepared {
    request_id: String,
    prompt: Vec<u32>,
    worker: wpb::GenerateRequest,
    stops: Vec<String>,
    n: u32,
    return_ids: bool,
    logprobs: bool,
    deadline: Option<Duration>,
    /// Tools the model may call: its output is parsed for calls.
    tools: Vec<ToolSpec>,
}

/// One streamed increment of one sample, after detokenization and stop strings.
#[derive(Debug, Default)]
struct Delta {
    index: u32,
    text: String,
    token_ids: Vec<u32>,
    logprobs: Vec<api::TokenLogprob>,
    finish: Option<(api::FinishReason, String)>,
    usage: Option<api::Usage>,
    tool_calls: Vec<ParsedToolCall>,
}

impl GenerationService {
    /// A service for `model` routing over `pool`.
    pub fn new(model: Arc<TextModel>, pool: WorkerPool, metrics: Arc<RouterMetrics>) -> Self {
        GenerationService { model, pool, metrics }
    }

    fn check_model(&self, model: &str) -> Result<(), Status> {
        if model.is_empty() || model == self.model.id {
            Ok(())
        } else {
            Err(Status::not_found(format!("model: unknown model {model:?}; this router serves {:?}", self.model.id)))
        }
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, Status> {
        self.model
            .tokenizer
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Status::internal(format!("tokenizing: {e}")))
    }

    /// Renders a conversation with the chat template; `tools` (validated here) are offered to
    /// the model when given.
    fn render_chat(
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
                seed: s.seed,
            }),
            stop_token_ids: s.stop_token_ids.clone(),
            min_tokens: s.min_tokens,
            ignore_eos: s.ignore_eos,
            logprobs: logprobs.then_some(s.top_logprobs),
            constraint: constraint.map(|kind| wpb::Constraint { kind: Some(kind) }),
            n: s.n.max(1),
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
        })
    }

    /// Routes `p` and streams its deltas into a channel; the returned receiver ends after the
    /// last sample finished (or with the error that ended it).
    fn start(&self, p: Prepared, method: &'static str) -> mpsc::Receiver<Result<Delta, Status>> {
        let (tx, rx) = mpsc::channel(64);
        let model = self.model.clone();
        let pool = self.pool.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let run = drive(&model, &pool, &metrics, p, method, started, &tx);
            let code = match run.await {
                Ok(()) => tonic::Code::Ok,
                Err(status) => {
                    let code = status.code();
                    let _ = tx.send(Err(status)).await;
                    code
                }
            };
            metrics.requests.with_label_values(&[method, &format!("{code:?}")]).inc();
            metrics.request_duration.observe(started.elapsed().as_secs_f64());
        });
        rx
    }
}

/// Runs one request on a worker (retrying on another before the first token).
async fn drive(
    model: &TextModel,
    pool: &WorkerPool,
    metrics: &RouterMetrics,
    p: Prepared,
    method: &'static str,
    started: Instant,
    tx: &mpsc::Sender<Result<Delta, Status>>,
) -> Result<(), Status> {
    let hashes: Vec<u64> =
        tessera_proto::hash_prefix_blocks(&p.prompt, model.block_size).into_iter().map(|h| h.0).collect();
    let mut failed = Vec::new();
    let mut stream = loop {
        let routed = pool
            .route(&hashes, model.block_size, p.prompt.len(), &failed)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut req = Request::new(p.worker.clone());
        if let Some(d) = p.deadline {
            req.set_timeout(d.saturating_sub(started.elapsed()));
        }
        let mut client = routed.client.clone();
        match client.generate(req).await {
            Ok(s) => break s.into_inner(),
            Err(status) if failed.len() + 1 < MAX_ATTEMPTS && retryable(&status) => {
                pool.report_failure(routed.slot, status.message());
                metrics.retries.inc();
                failed.push(routed.slot);
            }
            Err(status) => return Err(status),
        }
    };
    let mut samples: Vec<SampleText> =
        (0..p.n).map(|_| SampleText::new(model, &p.prompt, &p.stops, &p.tools)).collect();
    let mut usage = api::Usage { prompt_tokens: p.prompt.len() as u32, ..Default::default() };
    let mut open = p.n as usize;
    let mut first = true;
    while open > 0 {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(Status::unavailable("the worker ended the stream early")),
            Err(status) => return Err(status),
        };
        if first {
            metrics.ttft.with_label_values(&[method]).observe(started.elapsed().as_secs_f64());
            first = false;
        }
        let Some(sample) = samples.get_mut(msg.index as usize) else {
            return Err(Status::internal(format!("the worker sent sample {} of {}", msg.index, p.n)));
        };
        if sample.done {
            continue;
        }
        let ids: Vec<u32> = msg.tokens.iter().map(|t| t.token_id).collect();
        metrics.generated_tokens.inc_by(ids.len() as u64);
        let mut delta = sample.push(&ids).map_err(|e| Status::internal(e.to_string()))?;
        delta.index = msg.index;
        if p.return_ids {
            delta.token_ids = ids;
        }
        if p.logprobs {
            delta.logprobs = msg.tokens.iter().map(|t| logprob(&model.tokenizer, t)).collect();
        }
        let worker_finish = wpb::FinishReason::try_from(msg.finish_reason).unwrap_or(wpb::FinishReason::Unspecified);
        if let Some(u) = &msg.usage {
            usage.completion_tokens += u.completion_tokens;
            usage.cached_prompt_tokens = usage.cached_prompt_tokens.max(u.cached_prompt_tokens);
        }
        if delta.finish.is_none() && worker_finish != wpb::FinishReason::Unspecified {
            let (tail, calls) = sample.finish().map_err(|e| Status::internal(e.to_string()))?;
            delta.text.push_str(&tail);
            delta.tool_calls.extend(calls);
            let reason = match worker_finish {
                wpb::FinishReason::Length => api::FinishReason::Length,
                wpb::FinishReason::Aborted => api::FinishReason::Aborted,
                _ => api::FinishReason::Stop,
            };
            delta.finish = Some((sample.reason(reason), String::new()));
        }
        if delta.finish.is_some() {
            sample.done = true;
            open -= 1;
            if msg.usage.is_none() {
                // Ended by a stop string: count what this sample generated.
                usage.completion_tokens += sample.generated;
            }
        }
        if open == 0 {
            metrics.cached_prompt_tokens.inc_by(u64::from(usage.cached_prompt_tokens));
            delta.usage = Some(usage);
        }
        if tx.send(Ok(delta)).await.is_err() {
            // The client went away: dropping `stream` aborts the worker request.
            return Err(Status::cancelled("the client cancelled"));
        }
    }
    Ok(())
}

fn retryable(status: &Status) -> bool {
    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal)
        && !status.message().starts_with("prompt")
}

fn logprob(tok: &Tokenizer, t: &wpb::GeneratedToken) -> api::TokenLogprob {
    let text = |id: u32| tok.decode(&[id], false).unwrap_or_default();
    api::TokenLogprob {
        token_id: t.token_id,
        token: text(t.token_id),
        logprob: t.logprob.unwrap_or(0.0),
        top_logprobs: t
            .top_logprobs
            .iter()
            .map(|a| api::TopLogprob { token_id: a.token_id, token: text(a.token_id), logprob: a.logprob })
            .collect(),
    }
}

/// The text state of one sample: detokenizer, stop strings, then (with tools) the tool-call
/// parser, which holds back text that may start a call and emits each call once complete.
struct SampleText<'t> {
    detok: Detokenizer<'t>,
    stops: StopMatcher,
    tools: Option<ToolCallStreamer>,
    called: bool,
    generated: u32,
    done: bool,
}

impl<'t> SampleText<'t> {
    fn new(model: &'t TextModel, prompt: &[u32], stops: &[String], tools: &[ToolSpec]) -> Self {
        // Mistral's tool-call markers are special tokens: keep them in the text to be parsed.
        let skip_special = tools.is_empty() || model.tool_style != ToolCallStyle::Mistral;
        SampleText {
            detok: Detokenizer::after_prompt(&model.tokenizer, skip_special, prompt),
            stops: StopMatcher::new(stops),
            tools: (!tools.is_empty()).then(|| ToolCallStreamer::new(model.tool_style, tools)),
            called: false,
            generated: 0,
            done: false,
        }
    }

    /// Routes text through the tool-call parser, if any.
    fn parse(&mut self, text: String, end: bool) -> (String, Vec<ParsedToolCall>) {
        let Some(streamer) = &mut self.tools else { return (text, Vec::new()) };
        let mut out = streamer.push(&text);
        if end {
            let rest = streamer.finish();
            out.content.push_str(&rest.content);
            out.calls.extend(rest.calls);
        }
        self.called |= !out.calls.is_empty();
        (out.content, out.calls)
    }

    /// New tokens → the text they add; `finish` is set when a stop string matched.
    fn push(&mut self, ids: &[u32]) -> Result<Delta, crate::text::DetokenizeError> {
        self.generated += ids.len() as u32;
        let text = self.detok.push(ids)?;
        let out = self.stops.push(&text);
        let stopped = out.stopped.is_some();
        let (text, tool_calls) = self.parse(out.text, stopped);
        let finish = out.stopped.map(|s| (self.reason(api::FinishReason::Stop), s));
        Ok(Delta { text, tool_calls, finish, ..Default::default() })
    }

    /// The text (and calls) still held back when the worker ended the sample.
    fn finish(&mut self) -> Result<(String, Vec<ParsedToolCall>), crate::text::DetokenizeError> {
        let rest = self.detok.finish()?;
        let out = self.stops.push(&rest);
        let text = out.text + &self.stops.finish();
        Ok(self.parse(text, true))
    }

    /// A stop turns into TOOL_CALLS when the sample called tools.
    fn reason(&self, r: api::FinishReason) -> api::FinishReason {
        if self.called && r == api::FinishReason::Stop { api::FinishReason::ToolCalls } else { r }
    }
}

/// Collects a whole request's deltas into per-sample results.
/// A request's samples, whole: completions, their tool calls, usage.
struct Collected {
    completions: Vec<api::Completion>,
    tool_calls: Vec<Vec<api::ToolCall>>,
    usage: api::Usage,
}

async fn collect(mut rx: mpsc::Receiver<Result<Delta, Status>>, n: u32) -> Result<Collected, Status> {
    let mut out: Vec<api::Completion> = (0..n).map(|i| api::Completion { index: i, ..Default::default() }).collect();
    let mut calls: Vec<Vec<api::ToolCall>> = vec![Vec::new(); n as usize];
    let mut usage = api::Usage::default();
    while let Some(d) = rx.recv().await {
        let d = d?;
        let Some(c) = out.get_mut(d.index as usize) else { continue };
        if let Some(list) = calls.get_mut(d.index as usize) {
            list.extend(d.tool_calls.iter().map(to_api_call));
        }
        c.text.push_str(&d.text);
        c.token_ids.extend(d.token_ids);
        c.logprobs.extend(d.logprobs);
        if let Some((reason, stop)) = d.finish {
            c.finish_reason = reason as i32;
            c.matched_stop = stop;
        }
        if let Some(u) = d.usage {
            usage = u;
        }
    }
    Ok(Collected { completions: out, tool_calls: calls, usage })
}

fn to_api_call(c: &ParsedToolCall) -> api::ToolCall {
    api::ToolCall { id: c.id.clone(), name: c.name.clone(), arguments_json: c.arguments_json() }
}

fn request_id(given: &str) -> String {
    if given.is_empty() { format!("req-{:016x}", rand::random::<u64>()) } else { given.to_string() }
}

impl GenerationService {
    fn prepare_generate(&self, req: &Request<api::GenerateRequest>) -> Result<Prepared, Status> {
        let deadline = deadline(req)?;
        let r = req.get_ref();
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

    fn prepare_chat(&self, req: &Request<api::ChatRequest>) -> Result<Prepared, Status> {
        let deadline = deadline(req)?;
        let r = req.get_ref();
        self.check_model(&r.model)?;
        let offer_tools = match r.tool_choice.as_ref().and_then(|c| c.choice.as_ref()) {
            None | Some(api::tool_choice::Choice::Auto(_)) => true,
            Some(api::tool_choice::Choice::None(_)) => false,
            Some(api::tool_choice::Choice::Required(_) | api::tool_choice::Choice::Function(_)) => {
                return Err(Status::unimplemented(
                    "tool_choice: forcing tool calls (required or a named function) is not supported yet; use auto or none",
                ));
            }
        };
        let (text, tools) = self.render_chat(&r.messages, if offer_tools { &r.tools } else { &[] })?;
        let prompt = self.encode(&text, false)?;
        let mut p = self.prepare(
            &request_id(&r.request_id),
            prompt,
            r.sampling.as_ref(),
            r.response_format.as_ref(),
            false,
            deadline,
        )?;
        p.tools = tools;
        Ok(p)
    }
}

#[tonic::async_trait]
impl Generation for GenerationService {
    async fn generate(&self, req: Request<api::GenerateRequest>) -> Result<Response<api::GenerateResponse>, Status> {
        let p = self.prepare_generate(&req)?;
        let (id, n) = (p.request_id.clone(), p.n);
        let c = collect(self.start(p, "Generate"), n).await?;
        Ok(Response::new(api::GenerateResponse {
            request_id: id,
            model: self.model.id.clone(),
            completions: c.completions,
            usage: Some(c.usage),
        }))
    }

    type GenerateStreamStream = Stream_<api::GenerateStreamResponse>;

    async fn generate_stream(
        &self,
        req: Request<api::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let p = self.prepare_generate(&req)?;
        let id = p.request_id.clone();
        let rx = self.start(p, "GenerateStream");
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(rx), move |d| {
            d.map(|d| {
                let (finish, stop) = d.finish.map_or((api::FinishReason::Unspecified, String::new()), |(f, s)| (f, s));
                api::GenerateStreamResponse {
                    request_id: id.clone(),
                    index: d.index,
                    text: d.text,
                    token_ids: d.token_ids,
                    logprobs: d.logprobs,
                    finish_reason: finish as i32,
                    matched_stop: stop,
                    usage: d.usage,
                }
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn chat(&self, req: Request<api::ChatRequest>) -> Result<Response<api::ChatResponse>, Status> {
        let p = self.prepare_chat(&req)?;
        let (id, n) = (p.request_id.clone(), p.n);
        let Collected { completions, tool_calls, usage } = collect(self.start(p, "Chat"), n).await?;
        let choices = completions
            .into_iter()
            .zip(tool_calls)
            .map(|(c, tool_calls)| api::ChatChoice {
                index: c.index,
                message: Some(api::ChatMessage {
                    role: "assistant".into(),
                    content: c.text,
                    tool_calls,
                    ..Default::default()
                }),
                finish_reason: c.finish_reason,
                logprobs: c.logprobs,
            })
            .collect();
        Ok(Response::new(api::ChatResponse {
            request_id: id,
            model: self.model.id.clone(),
            choices,
            usage: Some(usage),
        }))
    }

    type ChatStreamStream = Stream_<api::ChatStreamResponse>;

    async fn chat_stream(&self, req: Request<api::ChatRequest>) -> Result<Response<Self::ChatStreamStream>, Status> {
        let p = self.prepare_chat(&req)?;
        let id = p.request_id.clone();
        let rx = self.start(p, "ChatStream");
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(rx), move |d| {
            d.map(|d| api::ChatStreamResponse {
                request_id: id.clone(),
                index: d.index,
                content: d.text,
                tool_calls: d.tool_calls.iter().map(to_api_call).collect(),
                logprobs: d.logprobs,
                finish_reason: d.finish.map_or(api::FinishReason::Unspecified, |(f, _)| f) as i32,
                usage: d.usage,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(&self, req: Request<api::TokenizeRequest>) -> Result<Response<api::TokenizeResponse>, Status> {
        let r = req.into_inner();
        self.check_model(&r.model)?;
        let (text, special) = match r.input {
            Some(api::tokenize_request::Input::Text(t)) => (t, true),
            Some(api::tokenize_request::Input::Messages(m)) => (self.render_chat(&m.messages, &m.tools)?.0, false),
            None => return Err(invalid("input", "set text or messages")),
        };
        let token_ids = self.encode(&text, special)?;
        Ok(Response::new(api::TokenizeResponse { token_ids, max_context: self.model.max_context as u32, text }))
    }

    async fn list_models(
        &self,
        _req: Request<api::ListModelsRequest>,
    ) -> Result<Response<api::ListModelsResponse>, Status> {
        Ok(Response::new(api::ListModelsResponse {
            models: vec![api::ModelCard {
                id: self.model.id.clone(),
                max_context: self.model.max_context as u32,
                healthy_workers: self.pool.healthy() as u32,
                block_size: self.model.block_size as u32,
                tokenizer_sha256: self.model.tokenizer_sha256.clone(),
            }],
        }))
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
