//! Running a prepared request: route it, call the worker, and turn its token stream into text
//! deltas (detokenized, stop strings applied, tool calls parsed). When the worker fails (a
//! transport error, UNAVAILABLE, a stream cut short, a shutdown abort) the request moves to
//! another worker, at most [`MAX_ATTEMPTS`] in all: before any token it is simply retried; after
//! tokens (single-sample requests) it is **migrated** — the new worker gets the prompt plus the
//! tokens already streamed as `resume_output` and continues exactly where the old one stopped
//! (same constraint state, penalties and random stream), while the client's text state
//! (detokenizer, stop strings, tool-call parser) carries on, so the client sees neither an
//! error nor a repeated token. The deltas go into a channel owned by one spawned task per
//! request; dropping the receiver ends the task, which drops the worker stream and so aborts the
//! request on the worker.

use std::time::{Duration, Instant};

use tessera_proto::v1 as api;
use tessera_proto::worker_v1 as wpb;
use tessera_proto::worker_v1::worker_client::WorkerClient;
use tokenizers::Tokenizer;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tonic::transport::Channel;
use tonic::{Request, Status};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::{GenerationService, MAX_ATTEMPTS, Prepared, Started, TextModel};
use crate::metrics::RouterMetrics;
use crate::pool::WorkerPool;
use crate::text::{Detokenizer, ParsedToolCall, StopMatcher, ToolCallStreamer, ToolCallStyle};

/// One streamed increment of one sample, after detokenization and stop strings.
#[derive(Debug, Default)]
pub struct Delta {
    pub(crate) index: u32,
    pub(crate) text: String,
    pub(crate) token_ids: Vec<u32>,
    pub(crate) logprobs: Vec<api::TokenLogprob>,
    pub(crate) finish: Option<(api::FinishReason, String)>,
    pub(crate) usage: Option<api::Usage>,
    pub(crate) tool_calls: Vec<ParsedToolCall>,
}

impl GenerationService {
    /// Takes one of the in-flight permits, or refuses with `RESOURCE_EXHAUSTED` — before any
    /// other work, so that refusing is cheap when the router is overloaded.
    pub(crate) fn admit(&self, method: &'static str) -> Result<OwnedSemaphorePermit, Status> {
        self.admission.clone().try_acquire_owned().map_err(|_| {
            self.metrics.requests.with_label_values(&[method, "ResourceExhausted"]).inc();
            Status::resource_exhausted("the router is at its limit of requests in flight; retry shortly")
        })
    }

    /// Starts admitted request `p`; the returned [`Started`] holds the future that routes it and
    /// streams its deltas into its channel (run it with [`Started::spawn`], or alongside the
    /// reader for a unary call). The permit is released when the request ends.
    pub(crate) fn start(&self, permit: OwnedSemaphorePermit, p: Prepared, method: &'static str) -> Started {
        let (tx, rx) = mpsc::channel(64);
        let (request_id, n) = (p.request_id.clone(), p.n);
        let model = self.model.clone();
        let pool = self.pool.clone();
        let metrics = self.metrics.clone();
        let log_content = self.log_content;
        let span = tracing::info_span!(
            "router.request",
            otel.name = method,
            request_id = %p.request_id,
            prompt_tokens = p.prompt.len(),
            n = p.n,
            code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let run = Box::pin(
            async move {
                let _permit = permit;
                let began = Instant::now();
                let run = drive(&model, &pool, &metrics, p, method, began, &tx, log_content);
                let code = match run.await {
                    Ok(()) => tonic::Code::Ok,
                    Err(status) => {
                        let code = status.code();
                        let _ = tx.send(Err(status)).await;
                        code
                    }
                };
                let span = tracing::Span::current();
                span.record("code", format!("{code:?}"));
                if code != tonic::Code::Ok {
                    span.record("otel.status_code", "ERROR");
                }
                metrics.requests.with_label_values(&[method, &format!("{code:?}")]).inc();
                metrics.request_duration.observe(began.elapsed().as_secs_f64());
            }
            .instrument(span),
        );
        Started { request_id, n, rx, run: Some(run) }
    }
}

/// What a request has streamed so far, across the workers it ran on.
struct Progress<'t> {
    samples: Vec<SampleText<'t>>,
    usage: api::Usage,
    /// Samples not finished yet.
    open: usize,
    /// Tokens received from workers (all samples).
    tokens: usize,
    /// Sample 0's tokens so far: what a migration resumes after (`n = 1` only).
    resume: Vec<u32>,
    /// The output text, kept only with `--log-content`.
    logged: Option<String>,
}

/// Runs one request: routes it, relays its tokens, and when the worker fails moves it to
/// another (at most [`MAX_ATTEMPTS`] workers in all) — a retry before any token, a migration
/// that resumes after the tokens already streamed (single-sample requests) after it. Each
/// attempt is a `router.attempt` span whose context goes to the worker in the call's metadata.
#[expect(clippy::too_many_arguments, reason = "one request's context, passed down once")]
async fn drive(
    model: &TextModel,
    pool: &WorkerPool,
    metrics: &RouterMetrics,
    p: Prepared,
    method: &'static str,
    started: Instant,
    tx: &mpsc::Sender<Result<Delta, Status>>,
    log_content: bool,
) -> Result<(), Status> {
    let hashes: Vec<u64> =
        tessera_proto::hash_prefix_blocks(&p.prompt, model.block_size).into_iter().map(|h| h.0).collect();
    let mut progress = Progress {
        samples: (0..p.n).map(|_| SampleText::new(model, &p)).collect(),
        usage: api::Usage { prompt_tokens: p.prompt.len() as u32, ..Default::default() },
        open: p.n as usize,
        tokens: 0,
        resume: Vec::new(),
        logged: log_content.then(String::new),
    };
    let mut failed = Vec::new();
    loop {
        let routed = pool
            .route(&hashes, model.block_size, p.prompt.len(), &failed)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let span = tracing::info_span!(
            "router.attempt",
            worker = %routed.address,
            attempt = failed.len() + 1,
            resumed_tokens = progress.resume.len(),
            cached_blocks = routed.decision.matched_blocks,
            exact = routed.decision.exact,
            otel.status_code = tracing::field::Empty,
        );
        let mut worker_request = p.worker.clone();
        worker_request.resume_output = progress.resume.clone();
        let mut req = Request::new(worker_request);
        if let Some(d) = p.deadline {
            req.set_timeout(d.saturating_sub(started.elapsed()));
        }
        tessera_proto::trace_context::inject(&span.context(), req.metadata_mut());
        let mut client = routed.client.clone();
        let attempt = async {
            let mut stream = client.generate(req).await?.into_inner();
            let mut worker =
                WorkerStream { stream: &mut stream, client: &mut client, request_id: &p.worker.request_id };
            relay(model, metrics, &p, method, started, tx, &mut worker, &mut progress).await
        };
        let status = match attempt.instrument(span.clone()).await {
            Ok(()) => {
                pool.report_success(routed.slot);
                if let Some(output) = &progress.logged {
                    let prompt = model.tokenizer.decode(&p.prompt, false).unwrap_or_default();
                    tracing::info!(request_id = %p.request_id, %prompt, %output, "request content");
                }
                return Ok(());
            }
            Err(status) => status,
        };
        span.record("otel.status_code", "ERROR");
        if !retryable(&status) {
            // The request's own fault (or the client's): nothing against the worker.
            return Err(status);
        }
        pool.report_failure(routed.slot, status.message());
        let movable = progress.tokens == 0 || p.n == 1;
        if !movable || failed.len() + 1 >= MAX_ATTEMPTS {
            return Err(status);
        }
        let (what, counter) =
            if progress.tokens == 0 { ("retrying", &metrics.retries) } else { ("migrating", &metrics.migrations) };
        counter.inc();
        tracing::warn!(
            parent: &span,
            request_id = %p.request_id,
            worker = %routed.address,
            streamed = progress.tokens,
            "worker failed ({:?}: {}); {what} on another worker",
            status.code(),
            status.message()
        );
        failed.push(routed.slot);
    }
}

/// Relays one worker's stream into `tx` until every sample has finished (`Ok`) or the stream
/// fails; a stream that ends early or a sample the worker aborted (it is shutting down) is an
/// UNAVAILABLE failure, so the request moves on.
#[expect(clippy::too_many_arguments, reason = "one request's context, passed down once")]
async fn relay(
    model: &TextModel,
    metrics: &RouterMetrics,
    p: &Prepared,
    method: &'static str,
    started: Instant,
    tx: &mpsc::Sender<Result<Delta, Status>>,
    worker: &mut WorkerStream<'_>,
    progress: &mut Progress<'_>,
) -> Result<(), Status> {
    while progress.open > 0 {
        let next = tokio::select! {
            m = worker.stream.message() => m,
            // The client went away: dropping the stream aborts the worker request now, not at
            // the next token.
            () = tx.closed() => return Err(Status::cancelled("the client cancelled")),
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => return Err(Status::unavailable("the worker ended the stream early")),
            Err(status) => return Err(status),
        };
        let worker_finish = wpb::FinishReason::try_from(msg.finish_reason).unwrap_or(wpb::FinishReason::Unspecified);
        let Some(sample) = progress.samples.get_mut(msg.index as usize) else {
            return Err(Status::internal(format!("the worker sent sample {} of {}", msg.index, p.n)));
        };
        if sample.done {
            // Ended here by a stop string: what the worker still sends for it (up to the
            // `Aborted` end that stop_sample asked for) is dropped.
            continue;
        }
        if worker_finish == wpb::FinishReason::Aborted {
            return Err(Status::unavailable("the worker aborted the request (it is shutting down)"));
        }
        if progress.tokens == 0 && !msg.tokens.is_empty() {
            metrics.ttft.with_label_values(&[method]).observe(started.elapsed().as_secs_f64());
        }
        let ids: Vec<u32> = msg.tokens.iter().map(|t| t.token_id).collect();
        progress.tokens += ids.len();
        if p.n == 1 {
            progress.resume.extend_from_slice(&ids);
        }
        metrics.generated_tokens.inc_by(ids.len() as u64);
        let mut delta = sample.push(&ids).map_err(|e| Status::internal(e.to_string()))?;
        delta.index = msg.index;
        if p.return_ids {
            delta.token_ids = ids;
        }
        if p.logprobs {
            delta.logprobs = msg.tokens.iter().map(|t| logprob(&model.tokenizer, t)).collect();
        }
        if let Some(u) = &msg.usage {
            progress.usage.completion_tokens += u.completion_tokens;
            progress.usage.cached_prompt_tokens = progress.usage.cached_prompt_tokens.max(u.cached_prompt_tokens);
        }
        if delta.finish.is_none() && worker_finish != wpb::FinishReason::Unspecified {
            let (tail, calls) = sample.finish().map_err(|e| Status::internal(e.to_string()))?;
            delta.text.push_str(&tail);
            delta.tool_calls.extend(calls);
            let reason = match worker_finish {
                wpb::FinishReason::Length => api::FinishReason::Length,
                _ => api::FinishReason::Stop,
            };
            delta.finish = Some((sample.reason(reason), String::new()));
        }
        if delta.finish.is_some() {
            sample.done = true;
            progress.open -= 1;
            if msg.usage.is_none() {
                // Ended by a stop string: count what this sample generated.
                progress.usage.completion_tokens += sample.generated;
                if progress.open > 0 {
                    // Its siblings go on: stop it on the worker too, so it stops costing steps.
                    worker.stop_sample(msg.index).await;
                }
            }
        }
        if progress.open == 0 {
            metrics.cached_prompt_tokens.inc_by(u64::from(progress.usage.cached_prompt_tokens));
            delta.usage = Some(progress.usage);
        }
        if let Some(log) = progress.logged.as_mut() {
            log.push_str(&delta.text);
        }
        if tx.send(Ok(delta)).await.is_err() {
            // The client went away: dropping the stream aborts the worker request.
            return Err(Status::cancelled("the client cancelled"));
        }
    }
    Ok(())
}

/// The worker side of one attempt: its response stream, and what it takes to stop one sample.
struct WorkerStream<'a> {
    stream: &'a mut tonic::Streaming<wpb::GenerateResponse>,
    client: &'a mut WorkerClient<Channel>,
    request_id: &'a str,
}

/// How long the router waits for the worker to confirm a stopped sample.
const STOP_SAMPLE_TIMEOUT: Duration = Duration::from_secs(1);

impl WorkerStream<'_> {
    /// Asks the worker to stop sample `index` (its siblings go on). Best effort and bounded: the
    /// router already ignores whatever that sample still produces, so a failure only costs the
    /// worker the steps to the sample's own end, and is logged.
    async fn stop_sample(&mut self, index: u32) {
        let mut req =
            Request::new(wpb::AbortRequest { request_id: self.request_id.to_string(), sample_index: Some(index) });
        req.set_timeout(STOP_SAMPLE_TIMEOUT);
        if let Err(status) = self.client.abort(req).await {
            tracing::debug!(request_id = %self.request_id, sample = index, %status, "stopping a finished sample on the worker failed");
        }
    }
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
    /// Most tool calls this sample may make (1 without parallel tool calls; later ones dropped).
    max_calls: usize,
    /// Tool calls made so far.
    calls: usize,
    generated: u32,
    done: bool,
}

impl<'t> SampleText<'t> {
    fn new(model: &'t TextModel, p: &Prepared) -> Self {
        // Mistral's tool-call markers are special tokens: keep them in the text to be parsed.
        let skip_special = p.tools.is_empty() || p.tool_style != ToolCallStyle::Mistral;
        SampleText {
            detok: Detokenizer::after_prompt(&model.tokenizer, skip_special, &p.prompt),
            stops: StopMatcher::new(&p.stops),
            tools: (!p.tools.is_empty()).then(|| ToolCallStreamer::new(p.tool_style, &p.tools)),
            max_calls: if p.parallel_tool_calls { usize::MAX } else { 1 },
            calls: 0,
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
        let mut calls = out.calls;
        calls.truncate(self.max_calls.saturating_sub(self.calls));
        self.calls += calls.len();
        (out.content, calls)
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
        if self.calls > 0 && r == api::FinishReason::Stop { api::FinishReason::ToolCalls } else { r }
    }
}

/// A request's samples, whole: completions, their tool calls, usage.
pub struct Collected {
    pub(crate) completions: Vec<api::Completion>,
    pub(crate) tool_calls: Vec<Vec<api::ToolCall>>,
    pub(crate) usage: api::Usage,
}

/// Collects a whole request's deltas into per-sample results.
pub(crate) async fn collect(mut rx: mpsc::Receiver<Result<Delta, Status>>, n: u32) -> Result<Collected, Status> {
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

pub(crate) fn to_api_call(c: &ParsedToolCall) -> api::ToolCall {
    api::ToolCall { id: c.id.clone(), name: c.name.clone(), arguments_json: c.arguments_json() }
}
