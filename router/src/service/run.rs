//! Running a prepared request: route it, call the worker, and turn its token stream into text
//! deltas (detokenized, stop strings applied, tool calls parsed); before the first token a
//! transport failure is retried on another worker (at most [`MAX_ATTEMPTS`]). The deltas go into
//! a channel owned by one spawned task per request; dropping the receiver ends the task, which
//! drops the worker stream and so aborts the request on the worker.

use std::time::Instant;

use tessera_proto::v1 as api;
use tessera_proto::worker_v1 as wpb;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;
use tonic::{Request, Status};

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
    /// Admits `p`; the returned [`Started`] holds the future that routes it and streams its
    /// deltas into its channel (run it with [`Started::spawn`], or alongside the reader for a
    /// unary call). Over the in-flight limit it is `RESOURCE_EXHAUSTED`.
    pub(crate) fn start(&self, p: Prepared, method: &'static str) -> Result<Started, Status> {
        let Ok(permit) = self.admission.clone().try_acquire_owned() else {
            self.metrics.requests.with_label_values(&[method, "ResourceExhausted"]).inc();
            return Err(Status::resource_exhausted("the router is at its limit of requests in flight; retry shortly"));
        };
        let (tx, rx) = mpsc::channel(64);
        let (request_id, n) = (p.request_id.clone(), p.n);
        let model = self.model.clone();
        let pool = self.pool.clone();
        let metrics = self.metrics.clone();
        let run = Box::pin(async move {
            let _permit = permit;
            let began = Instant::now();
            let run = drive(&model, &pool, &metrics, p, method, began, &tx);
            let code = match run.await {
                Ok(()) => tonic::Code::Ok,
                Err(status) => {
                    let code = status.code();
                    let _ = tx.send(Err(status)).await;
                    code
                }
            };
            metrics.requests.with_label_values(&[method, &format!("{code:?}")]).inc();
            metrics.request_duration.observe(began.elapsed().as_secs_f64());
        });
        Ok(Started { request_id, n, rx, run: Some(run) })
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
    let mut samples: Vec<SampleText> = (0..p.n).map(|_| SampleText::new(model, &p)).collect();
    let mut usage = api::Usage { prompt_tokens: p.prompt.len() as u32, ..Default::default() };
    let mut open = p.n as usize;
    let mut first = true;
    while open > 0 {
        let next = tokio::select! {
            m = stream.message() => m,
            // The client went away: dropping `stream` aborts the worker request now, not at
            // the next token.
            () = tx.closed() => return Err(Status::cancelled("the client cancelled")),
        };
        let msg = match next {
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
