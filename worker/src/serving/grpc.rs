//! The `tessera.worker.v1.Worker` gRPC service: request conversion and validation at the edge,
//! the status mapping (one exhaustive `match`), and the streams.
//!
//! A `Generate` call is answered only once the engine accepted or rejected it, so every
//! validation failure is a status on the call, never an error in the middle of a stream. The
//! response stream owns the request's event receiver: a client that goes away drops it and the
//! engine aborts the request and frees its blocks at the next step. KV-event subscriptions run
//! as tasks that end with their client or with the server's shutdown token.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tessera_proto::worker_v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::engine::{FinishReason, GenerationRequest};
use crate::error::EngineError;
use crate::kv_events::{KvEvent, KvEventKind, KvSnapshot, SubscriptionStart};
use crate::sampler::SamplingParams;
use crate::serving::engine_loop::{
    EngineHandle, LoadSnapshot, RequestEvent, SampleEnd, SampleSpec, Submission, SubmitError, event_capacity,
};
use crate::serving::metrics::WorkerMetrics;
use crate::structured::{ConstraintCompiler, ConstraintSpec};

/// Most samples one request may ask for.
pub const MAX_SAMPLES: u32 = 16;
/// Minimum time between load reports on a KV-event stream.
const LOAD_REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// The service's shared state (built by `server::serve`).
#[derive(Clone)]
pub struct WorkerService {
    /// The engine thread.
    pub(crate) engine: EngineHandle,
    /// What `GetInfo` answers.
    pub(crate) info: Arc<pb::WorkerInfo>,
    /// Structured-output compiler; `None` when the model's tokenizer cannot support it
    /// (constrained requests are then refused).
    pub(crate) compiler: Option<Arc<ConstraintCompiler>>,
    /// Set once the drain begins: new requests are refused.
    pub(crate) draining: Arc<AtomicBool>,
    /// Metrics.
    pub(crate) metrics: Arc<WorkerMetrics>,
    /// Cancels the long-lived KV-event streams at shutdown.
    pub(crate) shutdown: CancellationToken,
    /// Owns the per-subscriber KV-event tasks (joined at shutdown).
    pub(crate) tasks: TaskTracker,
}

impl WorkerService {
    async fn samples(&self, r: &pb::GenerateRequest) -> Result<Vec<SampleSpec>, Status> {
        let n = if r.n == 0 { 1 } else { r.n };
        if n > MAX_SAMPLES {
            return Err(Status::invalid_argument(format!("n: at most {MAX_SAMPLES} samples per request, got {n}")));
        }
        if n > 1 && !r.resume_output.is_empty() {
            return Err(Status::invalid_argument("resume_output: only a single-sample request (n = 1) can be resumed"));
        }
        let vocab = self.info.vocab_size;
        if let Some(id) = r.stop_token_ids.iter().find(|&&t| t >= vocab) {
            return Err(Status::invalid_argument(format!(
                "stop_token_ids: token id {id} is outside the vocabulary of {vocab}"
            )));
        }
        let sampling = sampling_params(r.sampling.as_ref());
        let max_new_tokens = if r.max_tokens == 0 {
            let room = (self.info.max_context as u64).min(self.info.kv_capacity_tokens) as usize;
            room.saturating_sub(r.prompt.len()).max(1)
        } else {
            r.max_tokens as usize
        };
        let mut stop_token_ids = r.stop_token_ids.clone();
        if !r.ignore_eos {
            stop_token_ids.extend(self.info.eos_token_ids.iter().copied().filter(|t| !r.stop_token_ids.contains(t)));
        }
        let spec = match r.constraint.as_ref().and_then(|c| c.kind.as_ref()) {
            None => None,
            Some(pb::constraint::Kind::JsonSchema(s)) => Some(ConstraintSpec::JsonSchema(s.clone())),
            Some(pb::constraint::Kind::JsonObject(_)) => Some(ConstraintSpec::JsonObject),
            Some(pb::constraint::Kind::Regex(s)) => Some(ConstraintSpec::Regex(s.clone())),
        };
        let constraints = match spec {
            None => (0..n).map(|_| None).collect::<Vec<_>>(),
            Some(spec) => {
                let compiler = self.compiler.clone().ok_or_else(|| {
                    Status::failed_precondition("constraint: this model's tokenizer does not support structured output")
                })?;
                // Compiling a schema can take milliseconds: keep it off the async workers.
                tokio::task::spawn_blocking(move || {
                    (0..n).map(|_| compiler.compile(&spec).map(Some)).collect::<Result<Vec<_>, _>>()
                })
                .await
                .map_err(|e| Status::internal(format!("constraint compilation crashed: {e}")))?
                .map_err(|e| status(&e))?
            }
        };
        let base_seed = sampling.seed;
        Ok(constraints
            .into_iter()
            .enumerate()
            .map(|(i, constraint)| SampleSpec {
                request: GenerationRequest {
                    prompt: r.prompt.clone(),
                    max_new_tokens,
                    sampling: SamplingParams { seed: base_seed.wrapping_add(i as u64), ..sampling.clone() },
                    stop_token_ids: stop_token_ids.clone(),
                    min_tokens: r.min_tokens as usize,
                    logprobs: r.logprobs,
                },
                constraint: constraint.map(|c| Box::new(c) as Box<dyn crate::sequence::OutputConstraint>),
                resumed: r.resume_output.clone(),
            })
            .collect())
    }
}

fn sampling_params(p: Option<&pb::SamplingParams>) -> SamplingParams {
    let Some(p) = p else {
        return SamplingParams { seed: rand::random(), ..SamplingParams::greedy() };
    };
    SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p.unwrap_or(1.0),
        top_k: (p.top_k > 0).then_some(p.top_k),
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed.unwrap_or_else(rand::random),
    }
}

/// The gRPC status for an engine error, naming the request field at fault.
pub fn status(e: &EngineError) -> Status {
    match e {
        EngineError::EmptyPrompt | EngineError::TokenOutOfRange { .. } => {
            Status::invalid_argument(format!("prompt: {e}"))
        }
        EngineError::ContextOverflow { .. } | EngineError::ExceedsKvCapacity { .. } => {
            Status::invalid_argument(format!("max_tokens: {e}"))
        }
        EngineError::InvalidSampling(m) => Status::invalid_argument(format!("sampling: {m}")),
        EngineError::InvalidConstraint(m) => Status::invalid_argument(format!("constraint: {m}")),
        EngineError::DuplicateRequestId(_) => Status::already_exists(format!("request_id: {e}")),
        EngineError::QueueFull { .. } | EngineError::KvCacheExhausted { .. } => {
            Status::resource_exhausted(e.to_string())
        }
        // The group is failing: retryable elsewhere (DESIGN.md, decision 6).
        EngineError::Device(_) | EngineError::GroupFailed(_) => Status::unavailable(e.to_string()),
        EngineError::Constraint(_)
        | EngineError::Internal(_)
        | EngineError::Kernel(_)
        | EngineError::InvalidKvConfig(_)
        | EngineError::InvalidSchedulerConfig(_) => Status::internal(e.to_string()),
    }
}

fn submit_status(e: SubmitError) -> Status {
    match e {
        SubmitError::Overloaded => Status::resource_exhausted(e.to_string()),
        SubmitError::Stopped => Status::unavailable(e.to_string()),
    }
}

fn response(request_id: &str, event: RequestEvent) -> Option<Result<pb::GenerateResponse, Status>> {
    let base = |index| pb::GenerateResponse { request_id: request_id.to_string(), index, ..Default::default() };
    match event {
        RequestEvent::Accepted | RequestEvent::Rejected(_) => None,
        RequestEvent::Token { index, token, logprob } => {
            let (logprob, top_logprobs) = match logprob {
                None => (None, Vec::new()),
                Some(lp) => (
                    Some(lp.logprob),
                    lp.top.into_iter().map(|(token_id, logprob)| pb::TopLogprob { token_id, logprob }).collect(),
                ),
            };
            Some(Ok(pb::GenerateResponse {
                tokens: vec![pb::GeneratedToken { token_id: token, logprob, top_logprobs }],
                ..base(index)
            }))
        }
        RequestEvent::End { index, end, usage } => {
            let reason = match end {
                SampleEnd::Finished(FinishReason::Stop) => pb::FinishReason::Stop,
                SampleEnd::Finished(FinishReason::Length) => pb::FinishReason::Length,
                SampleEnd::Aborted => pb::FinishReason::Aborted,
            };
            Some(Ok(pb::GenerateResponse {
                finish_reason: reason as i32,
                usage: Some(pb::Usage {
                    prompt_tokens: usage.prompt_tokens as u32,
                    completion_tokens: usage.completion_tokens as u32,
                    cached_prompt_tokens: usage.cached_prompt_tokens as u32,
                }),
                ..base(index)
            }))
        }
        RequestEvent::Failed(e) => Some(Err(status(&e))),
    }
}

fn load_report(s: &LoadSnapshot) -> pb::LoadReport {
    let l = &s.load;
    pb::LoadReport {
        running_sequences: l.running as u32,
        waiting_sequences: l.waiting as u32,
        running_tokens: l.running_tokens as u64,
        waiting_tokens: l.waiting_tokens as u64,
        kv_blocks_total: l.kv_blocks_total as u32,
        kv_blocks_used: l.kv_blocks_used as u32,
        kv_blocks_cached: l.kv_blocks_cached as u32,
        kv_event_seq: s.kv_event_seq,
    }
}

fn event_msg(e: &KvEvent) -> pb::KvEvent {
    let kind = match &e.kind {
        KvEventKind::Stored { hash, parent, tokens } => pb::kv_event::Kind::Stored(pb::BlockStored {
            hash: hash.0,
            parent: parent.map(|p| p.0),
            tokens: tokens.clone(),
        }),
        KvEventKind::Removed { hash } => pb::kv_event::Kind::Removed(pb::BlockRemoved { hash: hash.0 }),
        KvEventKind::Cleared => pb::kv_event::Kind::Cleared(pb::Cleared {}),
    };
    pb::KvEvent { seq: e.seq, kind: Some(kind) }
}

fn batch_msg<'a>(events: impl Iterator<Item = &'a KvEvent>) -> pb::KvEventsMessage {
    pb::KvEventsMessage {
        body: Some(pb::kv_events_message::Body::Events(pb::KvEventBatch { events: events.map(event_msg).collect() })),
    }
}

fn snapshot_msg(s: &KvSnapshot, block_size: u32) -> pb::KvEventsMessage {
    let blocks = s
        .blocks
        .iter()
        .map(|b| pb::BlockStored { hash: b.hash.0, parent: b.parent.map(|p| p.0), tokens: b.tokens.clone() })
        .collect();
    pb::KvEventsMessage {
        body: Some(pb::kv_events_message::Body::Snapshot(pb::KvSnapshot { seq: s.seq, blocks, block_size })),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    type GenerateStream = BoxStream<pb::GenerateResponse>;
    type SubscribeKvEventsStream = BoxStream<pb::KvEventsMessage>;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        // The caller's trace (the router's attempt span) is the parent of this request's spans.
        let parent = tessera_proto::trace_context::extract(request.metadata());
        let r = request.into_inner();
        let request_id =
            if r.request_id.is_empty() { format!("{:016x}", rand::random::<u64>()) } else { r.request_id.clone() };
        let spans = RequestSpans::new(parent, &request_id, &r);
        let admitted = async {
            if self.draining.load(Ordering::Acquire) {
                return Err(Status::unavailable("the worker is draining; send the request elsewhere"));
            }
            let samples = self.samples(&r).await?;
            let (tx, mut rx) = mpsc::channel(event_capacity(&samples));
            let submission = Submission { request_id: request_id.clone(), samples, events: tx };
            if let Err(e) = self.engine.submit(submission) {
                self.metrics.rejected_overloaded();
                return Err(submit_status(e));
            }
            match rx.recv().await {
                Some(RequestEvent::Accepted) => Ok(rx),
                Some(RequestEvent::Rejected(e)) => Err(status(&e)),
                Some(_) | None => Err(Status::internal("the engine answered out of order")),
            }
        }
        .instrument(spans.admission.clone())
        .await;
        let rx = match admitted {
            Ok(rx) => rx,
            Err(e) => {
                spans.fail(&e);
                return Err(e);
            }
        };
        let mut spans = spans.admitted();
        let stream = ReceiverStream::new(rx).filter_map(move |event| {
            spans.observe(&event);
            response(&request_id, event)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn abort(&self, request: Request<pb::AbortRequest>) -> Result<Response<pb::AbortResponse>, Status> {
        let pb::AbortRequest { request_id: id, sample_index } = request.into_inner();
        if id.is_empty() {
            return Err(Status::invalid_argument("request_id: must not be empty"));
        }
        match self.engine.abort(id.clone(), sample_index).await {
            Ok(true) => Ok(Response::new(pb::AbortResponse {})),
            Ok(false) => Err(Status::not_found(match sample_index {
                None => format!("request_id: no live request {id:?}"),
                Some(i) => format!("sample_index: request {id:?} has no live sample {i}"),
            })),
            Err(e) => Err(submit_status(e)),
        }
    }

    async fn get_info(&self, _: Request<pb::GetInfoRequest>) -> Result<Response<pb::WorkerInfo>, Status> {
        Ok(Response::new((*self.info).clone()))
    }

    async fn get_load(&self, _: Request<pb::GetLoadRequest>) -> Result<Response<pb::LoadReport>, Status> {
        Ok(Response::new(load_report(&self.engine.load())))
    }

    async fn subscribe_kv_events(
        &self,
        request: Request<pb::SubscribeKvEventsRequest>,
    ) -> Result<Response<Self::SubscribeKvEventsStream>, Status> {
        let from_seq = request.into_inner().from_seq;
        let (tx, rx) = mpsc::channel(64);
        let engine = self.engine.clone();
        let shutdown = self.shutdown.clone();
        let block_size = self.info.block_size;
        self.tasks.spawn(async move {
            tokio::select! {
                () = stream_kv_events(engine, from_seq, block_size, &tx) => {}
                () = shutdown.cancelled() => {}
                () = tx.closed() => {}
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Feeds one subscriber until it goes away: start (snapshot or replay), then live batches and
/// load reports; a subscriber that lags behind the broadcast resumes from its next number.
async fn stream_kv_events(
    engine: EngineHandle,
    from_seq: u64,
    block_size: u32,
    tx: &mpsc::Sender<Result<pb::KvEventsMessage, Status>>,
) {
    let log = engine.kv_events().clone();
    let mut load = engine.load_watch();
    let mut tick = tokio::time::interval(LOAD_REPORT_INTERVAL);
    let mut next = from_seq;
    loop {
        let mut sub = log.subscribe(next);
        let first = match &sub.start {
            SubscriptionStart::Snapshot(s) => {
                next = s.seq + 1;
                snapshot_msg(s, block_size)
            }
            SubscriptionStart::Replay(events) => {
                next = events.last().map_or(next, |e| e.seq + 1);
                batch_msg(events.iter())
            }
        };
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                batch = sub.live.recv() => match batch {
                    Ok(batch) => {
                        let fresh: Vec<&KvEvent> = batch.iter().filter(|e| e.seq >= next).collect();
                        if let Some(last) = fresh.last() {
                            next = last.seq + 1;
                            if tx.send(Ok(batch_msg(fresh.into_iter()))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    if load.has_changed().unwrap_or(false) {
                        let report = load_report(&load.borrow_and_update());
                        let msg = pb::KvEventsMessage { body: Some(pb::kv_events_message::Body::Load(report)) };
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// One request's spans: `worker.generate` (child of the caller's trace) with `worker.admission`
/// (validation, constraint compilation, queueing into the engine), then `worker.prefill`
/// (accepted → first token) and `worker.decode` (first token → end) under it. They close as
/// the response stream ends or is dropped.
struct RequestSpans {
    generate: tracing::Span,
    admission: tracing::Span,
    phase: Option<tracing::Span>,
    tokens: u64,
}

impl RequestSpans {
    fn new(parent: opentelemetry::Context, request_id: &str, r: &pb::GenerateRequest) -> Self {
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let generate = tracing::info_span!(
            "worker.generate",
            request_id = %request_id,
            prompt_tokens = r.prompt.len(),
            resumed_tokens = r.resume_output.len(),
            n = r.n.max(1),
            completion_tokens = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        // Without an exporter installed this is a no-op.
        let _ = generate.set_parent(parent);
        let admission = tracing::info_span!(parent: &generate, "worker.admission");
        RequestSpans { generate, admission, phase: None, tokens: 0 }
    }

    fn fail(&self, e: &Status) {
        self.generate.record("otel.status_code", "ERROR");
        tracing::info!(parent: &self.generate, code = ?e.code(), "refused: {}", e.message());
    }

    /// Admission is over; the prefill phase begins.
    fn admitted(mut self) -> Self {
        self.admission = tracing::Span::none();
        self.phase = Some(tracing::info_span!(parent: &self.generate, "worker.prefill"));
        self
    }

    fn observe(&mut self, event: &RequestEvent) {
        match event {
            RequestEvent::Token { .. } => {
                self.tokens += 1;
                if self.tokens == 1 {
                    self.phase = Some(tracing::info_span!(parent: &self.generate, "worker.decode"));
                }
            }
            RequestEvent::Failed(e) => {
                self.generate.record("otel.status_code", "ERROR");
                tracing::warn!(parent: &self.generate, "request failed: {e}");
            }
            _ => {}
        }
    }
}

impl Drop for RequestSpans {
    fn drop(&mut self) {
        // Recorded once, as the stream ends: a log layer would print every recording.
        self.generate.record("completion_tokens", self.tokens);
    }
}
