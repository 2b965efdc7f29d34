//! The OpenAI-compatible HTTP API, served on the router's HTTP port next to its probes:
//! `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /v1/models/{id}`,
//! and vLLM's `POST /tokenize`.
//!
//! This layer only translates: OpenAI JSON in → `tessera.v1` requests → the same validation,
//! routing and text handling as the gRPC API ([`GenerationService`]) → OpenAI JSON or SSE out.
//! Invariants:
//! - every error is OpenAI's error JSON with the matching HTTP status ([`error::ApiError`]);
//!   unknown request fields are a 400, never silently dropped;
//! - with API keys configured every `/v1/` route needs `Authorization: Bearer KEY` (compared
//!   as SHA-256 digests in constant time); without keys the API is open;
//! - bodies above `max_body_bytes` are a 413 before any parsing;
//! - CORS headers are sent only when an origin is configured;
//! - a streamed response is committed (200 + SSE) only once the first delta arrived, so routing
//!   failures (503, 429) still get their HTTP status; a client that disconnects drops the
//!   stream, which cancels the request on its worker.

/// The [`Shape`] of a chat or completion request body `$r` (both name the shared sampling fields
/// alike), with `max_tokens` as each API resolves it; `?` passes on a bad `stop`.
macro_rules! shape_of {
    ($r:expr, $max_tokens:expr) => {
        Shape {
            temperature: $r.temperature,
            top_p: $r.top_p,
            presence_penalty: $r.presence_penalty,
            frequency_penalty: $r.frequency_penalty,
            seed: $r.seed,
            n: $r.n,
            max_tokens: $max_tokens,
            stop: stop_list($r.stop.as_ref())?,
            top_k: $r.top_k,
            min_p: $r.min_p,
            repetition_penalty: $r.repetition_penalty,
            min_tokens: $r.min_tokens,
            ignore_eos: $r.ignore_eos,
            stop_token_ids: $r.stop_token_ids.clone(),
        }
    };
}

mod chat;
mod completions;
mod error;
mod sse;
mod types;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tessera_proto::v1 as api;
use tokio_stream::StreamExt;

pub use error::ApiError;

use crate::service::{Delta, GenerationService};

/// Settings of the HTTP API.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Accepted API keys; empty = no authentication.
    pub api_keys: Vec<String>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// The origin allowed by CORS (`*` for any); none = no CORS headers.
    pub cors_origin: Option<String>,
}

/// Default request body limit.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig { api_keys: Vec::new(), max_body_bytes: DEFAULT_MAX_BODY_BYTES, cors_origin: None }
    }
}

impl OpenAiConfig {
    /// Checks what `routes` cannot: the CORS origin must be a valid header value.
    pub fn validate(&self) -> Result<(), String> {
        match &self.cors_origin {
            Some(o) if HeaderValue::from_str(o).is_err() => {
                Err(format!("CORS origin {o:?} is not a valid header value"))
            }
            _ => Ok(()),
        }
    }
}

/// Reads an API key file: one key per line; blank lines and `#` comments are skipped.
pub fn read_api_keys(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect()
}

struct Api {
    service: Arc<GenerationService>,
    key_digests: Vec<[u8; 32]>,
    max_body_bytes: usize,
    cors_origin: Option<HeaderValue>,
}

/// The API's routes (under `/v1`, and `/tokenize`), to merge into the router's HTTP app; `config`
/// is expected to have passed [`OpenAiConfig::validate`].
pub fn routes(service: Arc<GenerationService>, config: &OpenAiConfig) -> axum::Router {
    let api = Arc::new(Api {
        service,
        key_digests: config.api_keys.iter().map(|k| Sha256::digest(k.as_bytes()).into()).collect(),
        max_body_bytes: config.max_body_bytes,
        cors_origin: config.cors_origin.as_deref().and_then(|o| HeaderValue::from_str(o).ok()),
    });
    axum::Router::new()
        .route("/tokenize", post(tokenize))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(text_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/v1/{*rest}", axum::routing::any(no_route))
        .layer(axum::extract::DefaultBodyLimit::max(config.max_body_bytes))
        .layer(middleware::from_fn_with_state(api.clone(), authenticate))
        .layer(middleware::from_fn_with_state(api.clone(), cors))
        .with_state(api)
}

/// Rejects requests without a valid key (when keys are configured).
async fn authenticate(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    if api.key_digests.is_empty() || req.method() == Method::OPTIONS {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return ApiError::unauthorized("You didn't provide an API key. Send it as `Authorization: Bearer KEY`.")
            .into_response();
    };
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    // Every stored key is compared, each in constant time.
    let matched = api.key_digests.iter().fold(false, |any, k| any | constant_time_eq(k, &digest));
    if matched { next.run(req).await } else { ApiError::unauthorized("Incorrect API key provided.").into_response() }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Answers CORS preflights and labels responses, when an origin is configured.
async fn cors(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    let Some(allowed) = api.cors_origin.clone() else { return next.run(req).await };
    let origin = req.headers().get(header::ORIGIN).cloned();
    let permitted = origin.as_ref().is_some_and(|o| allowed == "*" || *o == allowed);
    if req.method() == Method::OPTIONS && permitted {
        let requested = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned();
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            requested.unwrap_or(HeaderValue::from_static("authorization, content-type")),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        return r;
    }
    let mut r = next.run(req).await;
    if permitted {
        r.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
    }
    r
}

impl Api {
    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        let served = &self.service.model().id;
        if model == served { Ok(()) } else { Err(ApiError::unknown_model(model, served)) }
    }

    fn parse<T: DeserializeOwned>(&self, body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
        let bytes = body.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(self.max_body_bytes)
            } else {
                ApiError::invalid("body", e.body_text())
            }
        })?;
        serde_json::from_slice(&bytes).map_err(|e| {
            let text = e.to_string();
            match text.strip_prefix("unknown field `").and_then(|r| r.split_once('`')) {
                Some((field, _)) => {
                    ApiError::unsupported(field, format!("Unrecognized request argument supplied: {field}"))
                }
                None => ApiError::invalid("body", format!("We could not parse the JSON body of your request: {text}")),
            }
        })
    }

    fn card(&self) -> Value {
        json!({"id": self.service.model().id, "object": "model", "created": 0, "owned_by": "tessera"})
    }
}

/// The fields every response object starts with.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    id: String,
    created: u64,
    model: String,
}

impl Head {
    fn new(prefix: &str, request_id: &str, model: &str) -> Self {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Head { id: format!("{prefix}-{request_id}"), created, model: model.to_string() }
    }

    /// The last chunk of a stream with `stream_options.include_usage`: no choices, the usage.
    fn usage_chunk(&self, object: &str, usage: &api::Usage) -> Value {
        let mut c = self.object(object);
        c["choices"] = json!([]);
        c["usage"] = chat::usage(usage);
        c
    }

    /// `{"id", "object", "created", "model", "system_fingerprint"}`.
    fn object(&self, object: &str) -> Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": concat!("tessera-", env!("CARGO_PKG_VERSION")),
        })
    }
}

/// The sampling fields both APIs share.
pub(crate) struct Shape {
    temperature: Option<f32>,
    top_p: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<i64>,
    n: Option<u32>,
    max_tokens: Option<u32>,
    stop: Vec<String>,
    top_k: Option<i32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    min_tokens: Option<u32>,
    ignore_eos: bool,
    stop_token_ids: Vec<u32>,
}

/// Proto sampling parameters from OpenAI's (ranges OpenAI documents are checked here; the core
/// checks the rest).
pub(crate) fn sampling(s: Shape) -> Result<api::SamplingParams, ApiError> {
    if s.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(ApiError::invalid("temperature", "temperature must be between 0 and 2"));
    }
    if s.n == Some(0) {
        return Err(ApiError::invalid("n", "n must be at least 1"));
    }
    if s.max_tokens == Some(0) {
        return Err(ApiError::invalid("max_tokens", "max_tokens must be at least 1"));
    }
    // vLLM's convention: -1 (or 0) turns top-k off.
    let top_k = match s.top_k {
        None | Some(-1 | 0) => 0,
        Some(k) => u32::try_from(k).map_err(|_| ApiError::invalid("top_k", "top_k must be -1 (off) or at least 1"))?,
    };
    if let (Some(min), Some(max)) = (s.min_tokens, s.max_tokens)
        && min > max
    {
        return Err(ApiError::invalid("min_tokens", "min_tokens must not exceed max_tokens"));
    }
    Ok(api::SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        // OpenAI seeds are signed 64-bit; any value is a valid seed here.
        seed: s.seed.map(|x| x as u64),
        max_tokens: s.max_tokens.unwrap_or(0),
        stop: s.stop,
        n: s.n.unwrap_or(1),
        top_k,
        min_p: s.min_p.unwrap_or(0.0),
        repetition_penalty: s.repetition_penalty,
        min_tokens: s.min_tokens.unwrap_or(0),
        ignore_eos: s.ignore_eos,
        stop_token_ids: s.stop_token_ids,
        ..Default::default()
    })
}

/// `stop`: a string, an array of up to 4 strings, or null.
pub(crate) fn stop_list(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(xs)) => xs
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("stop", "stop must be a string or an array of strings"))?,
        Some(_) => return Err(ApiError::invalid("stop", "stop must be a string or an array of strings")),
    };
    if list.len() > 4 {
        return Err(ApiError::invalid("stop", "at most 4 stop sequences"));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop sequences must not be empty"));
    }
    Ok(list)
}

fn json_response(v: &Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

async fn chat_completions(State(api): State<Arc<Api>>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async {
        let r: types::ChatCompletionRequest = api.parse(body)?;
        api.check_model(&r.model)?;
        let req = chat::to_proto(&r)?;
        let started =
            api.service.start_chat(&req, None, "openai.ChatCompletions").map_err(|s| ApiError::from_status(&s))?;
        let head = Head::new("chatcmpl", &started.request_id, &r.model);
        if r.stream {
            let include_usage = r.stream_options.as_ref().is_some_and(|o| o.include_usage);
            let mut writer = chat::ChunkWriter::new(head, started.n, include_usage, r.logprobs);
            let deltas = tokio_stream::wrappers::ReceiverStream::new(started.spawn().1);
            let chunks = deltas.map(move |d| d.map(|d| writer.push(d)));
            sse::respond(chunks).await
        } else {
            let response = api.service.finish_chat(started).await.map_err(|s| ApiError::from_status(&s))?;
            Ok(json_response(&chat::response(&head, &response, r.logprobs)))
        }
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn text_completions(State(api): State<Arc<Api>>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async {
        let r: types::CompletionRequest = api.parse(body)?;
        api.check_model(&r.model)?;
        let requests = completions::to_proto(&r)?;
        let n = r.n.unwrap_or(1);
        let want_logprobs = r.logprobs.is_some();
        // Every prompt is admitted before any runs; with several, each runs in its own task so
        // they proceed side by side on the workers while the first is awaited (streamed ones are
        // spawned below anyway).
        let mut runs = Vec::with_capacity(requests.len());
        for req in &requests {
            let echo = if r.echo { Some(api.echo_text(req)?) } else { None };
            let started =
                api.service.start_generate(req, None, "openai.Completions").map_err(|s| ApiError::from_status(&s))?;
            runs.push((echo, started));
        }
        if runs.len() > 1 {
            runs = runs.into_iter().map(|(echo, s)| (echo, s.spawned())).collect();
        }
        let head = Head::new("cmpl", &runs[0].1.request_id, &r.model);
        if r.stream {
            let include_usage = r.stream_options.as_ref().is_some_and(|o| o.include_usage);
            let mut merged = tokio_stream::StreamMap::new();
            let mut echoes = Vec::with_capacity(runs.len());
            for (i, (echo, started)) in runs.into_iter().enumerate() {
                merged.insert(i, tokio_stream::wrappers::ReceiverStream::new(started.spawn().1));
                echoes.push(vec![echo; n as usize]);
            }
            let mut total = api::Usage::default();
            let mut open = echoes.len();
            let chunks = merged.map(move |(i, d): (usize, Result<Delta, tonic::Status>)| {
                let d = d?;
                let echo = echoes[i].get_mut(d.index as usize).and_then(Option::take);
                let mut out = vec![completions::chunk(&head, i, n, echo.as_deref(), &d, want_logprobs)];
                if let Some(u) = &d.usage {
                    add_usage(&mut total, u);
                    open -= 1;
                    if open == 0 && include_usage {
                        out.push(head.usage_chunk("text_completion", &total));
                    }
                }
                Ok(out)
            });
            sse::respond(chunks).await
        } else {
            let mut choices = Vec::new();
            let mut total = api::Usage::default();
            for (i, (echo, started)) in runs.into_iter().enumerate() {
                let response = api.service.finish_generate(started).await.map_err(|s| ApiError::from_status(&s))?;
                for c in &response.completions {
                    let index = i * n as usize + c.index as usize;
                    choices.push(completions::choice(index, echo.as_deref().unwrap_or_default(), c, want_logprobs));
                }
                if let Some(u) = &response.usage {
                    add_usage(&mut total, u);
                }
            }
            let mut out = head.object("text_completion");
            out["choices"] = json!(choices);
            out["usage"] = chat::usage(&total);
            Ok(json_response(&out))
        }
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

fn add_usage(total: &mut api::Usage, u: &api::Usage) {
    total.prompt_tokens += u.prompt_tokens;
    total.completion_tokens += u.completion_tokens;
    total.cached_prompt_tokens += u.cached_prompt_tokens;
}

impl Api {
    /// The text of a prompt, for `echo`.
    fn echo_text(&self, r: &api::GenerateRequest) -> Result<String, ApiError> {
        match &r.prompt {
            Some(api::generate_request::Prompt::Text(t)) => Ok(t.clone()),
            Some(api::generate_request::Prompt::TokenIds(ids)) => self
                .service
                .model()
                .tokenizer
                .decode(&ids.ids, false)
                .map_err(|e| ApiError::invalid("prompt", e.to_string())),
            None => Ok(String::new()),
        }
    }
}

/// `POST /tokenize`: the token ids of a prompt, or of a conversation rendered with the chat
/// template (exactly what a chat completion's `prompt_tokens` counts).
async fn tokenize(State(api): State<Arc<Api>>, body: Result<Bytes, BytesRejection>) -> Response {
    use tessera_proto::v1::generation_server::Generation;
    let run = async {
        let r: types::TokenizeRequest = api.parse(body)?;
        api.check_model(&r.model)?;
        let input = match (r.prompt, r.messages) {
            (Some(text), None) => api::tokenize_request::Input::Text(text),
            (None, Some(messages)) => api::tokenize_request::Input::Messages(api::ChatMessages {
                messages: chat::messages(&messages)?,
                tools: chat::tools(&r.tools)?,
            }),
            _ => return Err(ApiError::invalid("prompt", "give exactly one of prompt and messages")),
        };
        let request = tonic::Request::new(api::TokenizeRequest { model: r.model, input: Some(input) });
        let t = api.service.tokenize(request).await.map_err(|s| ApiError::from_status(&s))?.into_inner();
        Ok(json_response(&json!({"tokens": t.token_ids, "count": t.token_ids.len(), "max_model_len": t.max_context})))
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn list_models(State(api): State<Arc<Api>>) -> Response {
    json_response(&json!({"object": "list", "data": [api.card()]}))
}

async fn get_model(State(api): State<Arc<Api>>, Path(id): Path<String>) -> Response {
    match api.check_model(&id) {
        Ok(()) => json_response(&api.card()),
        Err(e) => e.into_response(),
    }
}

async fn no_route(req: Request) -> Response {
    ApiError::no_route(req.method().as_str(), req.uri().path()).into_response()
}
