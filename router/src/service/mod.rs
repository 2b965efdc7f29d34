//! `tessera.v1.Generation`: the public gRPC API, served by the router.
//!
//! `prepare` validates a request and builds the worker request; `run` routes it, streams the
//! worker's tokens back as text deltas and collects them for unary calls. This module maps the
//! gRPC methods onto those two steps; the OpenAI-compatible HTTP API maps its routes onto the
//! same steps.
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
//! - a worker failure moves the request to another worker (at most [`MAX_ATTEMPTS`] workers):
//!   retried before the first token, migrated after it (single-sample requests resume after the
//!   tokens already streamed; see `run`); only then does the error reach the client.

mod prepare;
mod run;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tessera_proto::v1 as api;
use tessera_proto::v1::generation_server::Generation;
use tokenizers::Tokenizer;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub use prepare::Prepared;
pub use run::{Collected, Delta};

use crate::chat_template::ChatTemplate;
use crate::metrics::RouterMetrics;
use crate::pool::WorkerPool;
use crate::text::ToolCallStyle;

/// Workers tried for one request before giving up (retries and migrations together).
pub const MAX_ATTEMPTS: usize = 3;

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

/// The service: the gRPC methods, and the start / finish steps the HTTP API shares with them.
pub struct GenerationService {
    model: Arc<TextModel>,
    pool: WorkerPool,
    metrics: Arc<RouterMetrics>,
    /// Requests running through this router; one permit each ([`MAX_ATTEMPTS`] retries share it).
    admission: Arc<Semaphore>,
    /// Log each request's prompt and output text.
    log_content: bool,
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// An admitted request: its id, its sample count, the channel its deltas arrive on (it ends
/// after the last sample finished, or with the error that ended the request) and, until it is
/// spawned, the future that runs it. Dropping the receiver cancels the request.
pub struct Started {
    /// The request id (the client's or a generated one).
    pub request_id: String,
    /// Samples (choices) it has.
    pub n: u32,
    rx: mpsc::Receiver<Result<Delta, Status>>,
    run: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Started {
    /// Runs the request in a task of its own now (for streaming responses, and for requests that
    /// must make progress while others are awaited); it stays collectable.
    pub fn spawned(mut self) -> Started {
        if let Some(run) = self.run.take() {
            tokio::spawn(run);
        }
        self
    }

    /// Spawns the request (see [`Self::spawned`]) and returns its id and the channel of its
    /// deltas.
    pub fn spawn(self) -> (String, mpsc::Receiver<Result<Delta, Status>>) {
        let s = self.spawned();
        (s.request_id, s.rx)
    }

    /// Runs the request (here, unless spawned) and collects it whole. A unary call reads the
    /// deltas in the same task that produces them: no task hand-off per token.
    async fn collect(self) -> Result<Collected, Status> {
        let Started { n, rx, run, .. } = self;
        match run {
            Some(run) => tokio::join!(run, run::collect(rx, n)).1,
            None => run::collect(rx, n).await,
        }
    }
}

impl GenerationService {
    /// A service for `model` routing over `pool`, running at most `max_in_flight` requests at
    /// once (more are refused with `RESOURCE_EXHAUSTED`); `log_content` logs prompts and outputs.
    pub fn new(
        model: Arc<TextModel>,
        pool: WorkerPool,
        metrics: Arc<RouterMetrics>,
        max_in_flight: usize,
        log_content: bool,
    ) -> Self {
        GenerationService { model, pool, metrics, admission: Arc::new(Semaphore::new(max_in_flight)), log_content }
    }

    /// The model this service serves.
    pub fn model(&self) -> &TextModel {
        &self.model
    }

    /// Validates and starts a `Generate` request (`method` labels its metrics).
    pub fn start_generate(
        &self,
        r: &api::GenerateRequest,
        deadline: Option<Duration>,
        method: &'static str,
    ) -> Result<Started, Status> {
        let permit = self.admit(method)?;
        let p = self.prepare_generate(r, deadline)?;
        Ok(self.start(permit, p, method))
    }

    /// Validates and starts a `Chat` request.
    pub fn start_chat(
        &self,
        r: &api::ChatRequest,
        deadline: Option<Duration>,
        method: &'static str,
    ) -> Result<Started, Status> {
        let permit = self.admit(method)?;
        let p = self.prepare_chat(r, deadline)?;
        Ok(self.start(permit, p, method))
    }

    /// Waits for a started `Generate` request and returns it whole.
    pub async fn finish_generate(&self, s: Started) -> Result<api::GenerateResponse, Status> {
        let request_id = s.request_id.clone();
        let c = s.collect().await?;
        Ok(api::GenerateResponse {
            request_id,
            model: self.model.id.clone(),
            completions: c.completions,
            usage: Some(c.usage),
        })
    }

    /// Waits for a started `Chat` request and returns it whole.
    pub async fn finish_chat(&self, s: Started) -> Result<api::ChatResponse, Status> {
        let request_id = s.request_id.clone();
        let Collected { completions, tool_calls, usage } = s.collect().await?;
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
        Ok(api::ChatResponse { request_id, model: self.model.id.clone(), choices, usage: Some(usage) })
    }
}

#[tonic::async_trait]
impl Generation for GenerationService {
    async fn generate(&self, req: Request<api::GenerateRequest>) -> Result<Response<api::GenerateResponse>, Status> {
        let started = self.start_generate(req.get_ref(), prepare::deadline(&req)?, "Generate")?;
        Ok(Response::new(self.finish_generate(started).await?))
    }

    type GenerateStreamStream = Stream_<api::GenerateStreamResponse>;

    async fn generate_stream(
        &self,
        req: Request<api::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (request_id, rx) = self.start_generate(req.get_ref(), prepare::deadline(&req)?, "GenerateStream")?.spawn();
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(rx), move |d| {
            d.map(|d| {
                let (finish, stop) = d.finish.map_or((api::FinishReason::Unspecified, String::new()), |(f, s)| (f, s));
                api::GenerateStreamResponse {
                    request_id: request_id.clone(),
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
        let started = self.start_chat(req.get_ref(), prepare::deadline(&req)?, "Chat")?;
        Ok(Response::new(self.finish_chat(started).await?))
    }

    type ChatStreamStream = Stream_<api::ChatStreamResponse>;

    async fn chat_stream(&self, req: Request<api::ChatRequest>) -> Result<Response<Self::ChatStreamStream>, Status> {
        let (request_id, rx) = self.start_chat(req.get_ref(), prepare::deadline(&req)?, "ChatStream")?.spawn();
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(rx), move |d| {
            d.map(|d| api::ChatStreamResponse {
                request_id: request_id.clone(),
                index: d.index,
                content: d.text,
                tool_calls: d.tool_calls.iter().map(run::to_api_call).collect(),
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
            None => return Err(prepare::invalid("input", "set text or messages")),
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
