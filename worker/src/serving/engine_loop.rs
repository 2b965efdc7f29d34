//! The engine on its own thread, driven by commands from async handlers.
//!
//! The thread owns the [`Engine`] outright (no lock): handlers send `Command`s through a bounded
//! channel and receive each request's events through its own bounded channel whose capacity
//! covers every event the request can produce, so the engine thread never blocks on a slow client.
//! Each loop turn it takes new commands (blocking only when idle), aborts requests whose client
//! has gone (their event receiver was dropped), runs one step, forwards tokens, publishes KV
//! events and load. Invariants: every live request is in `live` until its last sample finished
//! or it was aborted, and then its blocks are already free; the thread exits once every
//! [`EngineHandle`] is dropped and no work is left, or at once on [`EngineHandle::shutdown`], or
//! when the tensor-parallel group fails (after failing every live request with `GroupFailed`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tmpsc, oneshot, watch};

use crate::engine::{Engine, EngineLoad, FinishReason, GenerationRequest, SequenceEvent, SequenceUsage};
use crate::error::EngineError;
use crate::kv_events::KvEventLog;
use crate::sampler::TokenLogprob;
use crate::sequence::{OutputConstraint, SeqId};
use crate::serving::metrics::WorkerMetrics;

/// Commands waiting for the engine thread before new ones are refused.
const COMMAND_QUEUE: usize = 1024;
/// How often the load is republished while idle.
const IDLE_TICK: Duration = Duration::from_millis(250);

/// How one sample of a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleEnd {
    /// Finished normally.
    Finished(FinishReason),
    /// Aborted (by the client, `Abort`, or shutdown).
    Aborted,
}

/// What a request's stream carries.
#[derive(Debug)]
pub enum RequestEvent {
    /// The request passed validation and is queued (always the first event unless `Rejected`).
    Accepted,
    /// It was refused; nothing follows.
    Rejected(EngineError),
    /// Sample `index` produced a token.
    Token {
        /// Which sample.
        index: u32,
        /// The token.
        token: u32,
        /// Its log-probabilities, when asked.
        logprob: Option<TokenLogprob>,
    },
    /// Sample `index` ended.
    End {
        /// Which sample.
        index: u32,
        /// How.
        end: SampleEnd,
        /// Its token counts.
        usage: SequenceUsage,
    },
    /// The request failed (device failure or a broken constraint); nothing follows.
    Failed(EngineError),
}

/// One sample of a request, ready for the engine.
pub struct SampleSpec {
    /// The generation request (seed already specific to this sample).
    pub request: GenerationRequest,
    /// Its output constraint, compiled.
    pub constraint: Option<Box<dyn OutputConstraint>>,
    /// Output it already produced on another worker (migration), not streamed again.
    pub resumed: Vec<u32>,
}

/// A request for the engine thread.
pub struct Submission {
    /// Unique among live requests.
    pub request_id: String,
    /// Its samples (`n` of them; they share the prompt).
    pub samples: Vec<SampleSpec>,
    /// Where its events go; capacity must cover every event (see [`event_capacity`]).
    pub events: tmpsc::Sender<RequestEvent>,
}

/// Channel capacity that holds every event a request with these samples can produce.
pub fn event_capacity(samples: &[SampleSpec]) -> usize {
    samples.iter().map(|s| s.request.max_new_tokens + 1).sum::<usize>() + 2
}

enum Command {
    Submit(Submission),
    Abort { request_id: String, sample: Option<u32>, reply: oneshot::Sender<bool> },
    Shutdown,
}

/// The engine thread refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Too many commands are waiting.
    #[error("the worker is overloaded: its command queue is full")]
    Overloaded,
    /// The engine thread has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// Load as published after each step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadSnapshot {
    /// The scheduler's load.
    pub load: EngineLoad,
    /// The KV event this load is consistent with.
    pub kv_event_seq: u64,
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: SyncSender<Command>,
    load: watch::Receiver<LoadSnapshot>,
    kv_events: Arc<KvEventLog>,
}

impl EngineHandle {
    /// Queues a request; its events (starting with `Accepted` or `Rejected`) arrive on
    /// `submission.events`.
    pub fn submit(&self, submission: Submission) -> Result<(), SubmitError> {
        self.send(Command::Submit(submission))
    }

    /// Aborts a live request, or only its sample `sample` (the others go on); `false` when no
    /// such request (or sample) is live.
    pub async fn abort(&self, request_id: String, sample: Option<u32>) -> Result<bool, SubmitError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Abort { request_id, sample, reply })?;
        answer.await.map_err(|_| SubmitError::Stopped)
    }

    /// Aborts everything and stops the thread (the end of a drain that ran out of time).
    pub fn shutdown(&self) {
        // A full queue still drains into the loop, which then sees the disconnect; a stopped
        // thread needs nothing.
        let _ = self.commands.try_send(Command::Shutdown);
    }

    fn send(&self, command: Command) -> Result<(), SubmitError> {
        self.commands.try_send(command).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Overloaded,
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
    }

    /// The latest load.
    pub fn load(&self) -> LoadSnapshot {
        *self.load.borrow()
    }

    /// A receiver notified on every load change.
    pub fn load_watch(&self) -> watch::Receiver<LoadSnapshot> {
        self.load.clone()
    }

    /// The KV event log.
    pub fn kv_events(&self) -> &Arc<KvEventLog> {
        &self.kv_events
    }
}

/// Starts the engine thread. Join the returned handle after dropping every [`EngineHandle`].
pub fn spawn(
    engine: Engine,
    kv_events: Arc<KvEventLog>,
    metrics: Arc<WorkerMetrics>,
) -> std::io::Result<(EngineHandle, JoinHandle<()>)> {
    let (commands, inbox) = mpsc::sync_channel(COMMAND_QUEUE);
    let (load_tx, load) = watch::channel(LoadSnapshot::default());
    let log = kv_events.clone();
    let thread = std::thread::Builder::new().name("tessera-engine".into()).spawn(move || {
        EngineLoop { engine, inbox, live: HashMap::new(), by_seq: HashMap::new(), log, load: load_tx, metrics }.run()
    })?;
    Ok((EngineHandle { commands, load, kv_events }, thread))
}

/// Stops sample `i` of `req` (not yet ended) in the engine and ends its stream as aborted.
fn end_aborted(engine: &mut Engine, metrics: &WorkerMetrics, req: &LiveRequest, i: usize) {
    // The engine may have finished it in the step whose events are being dispatched; the client
    // did not see that end, so it counts as aborted either way.
    engine.abort(req.seqs[i]);
    let usage =
        SequenceUsage { prompt_tokens: req.prompt_len, completion_tokens: req.produced[i], cached_prompt_tokens: 0 };
    let _ = req.events.try_send(RequestEvent::End { index: i as u32, end: SampleEnd::Aborted, usage });
    metrics.finished(None);
}

struct LiveRequest {
    events: tmpsc::Sender<RequestEvent>,
    seqs: Vec<SeqId>,
    /// Tokens sent per sample so far.
    produced: Vec<usize>,
    /// Which samples have ended.
    ended: Vec<bool>,
    prompt_len: usize,
    arrived: Instant,
    last_token: Option<Instant>,
}

struct EngineLoop {
    engine: Engine,
    inbox: Receiver<Command>,
    live: HashMap<String, LiveRequest>,
    /// Sequence → (request id, sample index).
    by_seq: HashMap<SeqId, (String, u32)>,
    log: Arc<KvEventLog>,
    load: watch::Sender<LoadSnapshot>,
    metrics: Arc<WorkerMetrics>,
}

impl EngineLoop {
    fn run(mut self) {
        loop {
            // Block for commands only when there is nothing to compute.
            if !self.engine.has_work() {
                match self.inbox.recv_timeout(IDLE_TICK) {
                    Ok(c) => {
                        if !self.handle(c) {
                            break;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        self.publish();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            let mut stop = false;
            loop {
                match self.inbox.try_recv() {
                    Ok(c) => {
                        if !self.handle(c) {
                            stop = true;
                            break;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    // Every handle is gone: finish what is running, then exit.
                    Err(TryRecvError::Disconnected) => {
                        if !self.engine.has_work() {
                            stop = true;
                        }
                        break;
                    }
                }
            }
            if stop {
                break;
            }
            self.drop_abandoned();
            if self.engine.has_work() && !self.step() {
                // The tensor-parallel group failed: nothing can run here any more.
                break;
            }
            self.publish();
        }
        let ids: Vec<String> = self.live.keys().cloned().collect();
        for id in ids {
            self.abort(&id);
        }
        self.publish();
    }

    /// Applies a command; false means stop.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Submit(s) => self.submit(s),
            Command::Abort { request_id, sample, reply } => {
                let found = match sample {
                    None => self.abort(&request_id),
                    Some(index) => self.abort_sample(&request_id, index),
                };
                // The asker may have gone; nothing to do then.
                let _ = reply.send(found);
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn submit(&mut self, s: Submission) {
        if self.live.contains_key(&s.request_id) {
            let _ = s.events.try_send(RequestEvent::Rejected(EngineError::DuplicateRequestId(s.request_id)));
            return;
        }
        let mut seqs = Vec::with_capacity(s.samples.len());
        let prompt_len = s.samples.first().map_or(0, |x| x.request.prompt.len());
        // Resumed output counts as produced (usage), though it is not streamed again.
        let produced: Vec<usize> = s.samples.iter().map(|x| x.resumed.len()).collect();
        let mut leader = None;
        for sample in s.samples {
            match self.engine.add_resumed(sample.request, sample.constraint, leader, &sample.resumed) {
                Ok(id) => {
                    leader.get_or_insert(id);
                    seqs.push(id);
                }
                Err(e) => {
                    for &id in &seqs {
                        self.engine.abort(id);
                    }
                    self.metrics.rejected(&e);
                    let _ = s.events.try_send(RequestEvent::Rejected(e));
                    return;
                }
            }
        }
        if s.events.try_send(RequestEvent::Accepted).is_err() {
            for &id in &seqs {
                self.engine.abort(id);
            }
            return;
        }
        for (i, &id) in seqs.iter().enumerate() {
            self.by_seq.insert(id, (s.request_id.clone(), i as u32));
        }
        let live = LiveRequest {
            events: s.events,
            produced,
            ended: vec![false; seqs.len()],
            prompt_len,
            seqs,
            arrived: Instant::now(),
            last_token: None,
        };
        self.live.insert(s.request_id, live);
    }

    /// Aborts every sample of a request that has not ended, telling its stream; false if the
    /// request is not live.
    fn abort(&mut self, request_id: &str) -> bool {
        let Some(req) = self.live.remove(request_id) else { return false };
        for (i, &id) in req.seqs.iter().enumerate() {
            self.by_seq.remove(&id);
            if !req.ended[i] {
                end_aborted(&mut self.engine, &self.metrics, &req, i);
            }
        }
        true
    }

    /// Aborts one sample of a live request, telling its stream; its siblings go on. False if
    /// the request is not live or has no such sample; true (and nothing changes) if that
    /// sample already ended.
    fn abort_sample(&mut self, request_id: &str, index: u32) -> bool {
        let i = index as usize;
        let Some(req) = self.live.get_mut(request_id) else { return false };
        let Some(&id) = req.seqs.get(i) else { return false };
        if !req.ended[i] {
            req.ended[i] = true;
            self.by_seq.remove(&id);
            end_aborted(&mut self.engine, &self.metrics, req, i);
        }
        if req.ended.iter().all(|&e| e) {
            let arrived = req.arrived;
            self.metrics.request_done(arrived.elapsed());
            self.live.remove(request_id);
        }
        true
    }

    fn drop_abandoned(&mut self) {
        let gone: Vec<String> =
            self.live.iter().filter(|(_, r)| r.events.is_closed()).map(|(id, _)| id.clone()).collect();
        for id in gone {
            self.abort(&id);
        }
    }

    /// Runs one step; false when the tensor-parallel group failed (every live request has been
    /// failed with `GroupFailed` and the loop must stop).
    fn step(&mut self) -> bool {
        let start = Instant::now();
        match self.engine.step() {
            Ok(report) => {
                self.metrics.step(start.elapsed(), &report);
                for event in report.events {
                    self.dispatch(event);
                }
                true
            }
            Err(e) => {
                // The engine has dropped every sequence and cleared its cache.
                let fatal = matches!(e, EngineError::GroupFailed(_));
                let error = |message: String| {
                    if fatal { EngineError::GroupFailed(message) } else { EngineError::Device(message) }
                };
                let message = match e {
                    EngineError::GroupFailed(m) => m,
                    other => other.to_string(),
                };
                for (_, req) in self.live.drain() {
                    let _ = req.events.try_send(RequestEvent::Failed(error(message.clone())));
                    self.metrics.failed();
                }
                self.by_seq.clear();
                !fatal
            }
        }
    }

    fn dispatch(&mut self, event: SequenceEvent) {
        let seq = match &event {
            SequenceEvent::Token { seq, .. }
            | SequenceEvent::Finished { seq, .. }
            | SequenceEvent::Failed { seq, .. } => *seq,
        };
        let Some((request_id, index)) = self.by_seq.get(&seq).cloned() else { return };
        let Some(req) = self.live.get_mut(&request_id) else { return };
        let now = Instant::now();
        let sent = match event {
            SequenceEvent::Token { token, .. } => {
                match req.last_token {
                    None => self.metrics.first_token(now - req.arrived),
                    Some(t) => self.metrics.inter_token(now - t),
                }
                req.last_token = Some(now);
                req.produced[index as usize] += 1;
                req.events.try_send(RequestEvent::Token { index, token: token.token, logprob: token.logprob })
            }
            SequenceEvent::Finished { reason, usage, .. } => {
                self.by_seq.remove(&seq);
                req.ended[index as usize] = true;
                self.metrics.finished(Some((reason, usage)));
                req.events.try_send(RequestEvent::End { index, end: SampleEnd::Finished(reason), usage })
            }
            SequenceEvent::Failed { error, .. } => {
                self.metrics.failed();
                let _ = req.events.try_send(RequestEvent::Failed(error));
                self.abort(&request_id);
                return;
            }
        };
        let request_done = req.ended.iter().all(|&e| e);
        if request_done {
            self.metrics.request_done(now - req.arrived);
            self.live.remove(&request_id);
        } else if sent.is_err() {
            // Capacity covers every event, so a failed send means the client is gone.
            self.abort(&request_id);
        }
    }

    fn publish(&mut self) {
        self.log.publish(self.engine.take_kv_events());
        let snapshot = LoadSnapshot { load: self.engine.load(), kv_event_seq: self.log.last_seq() };
        self.metrics.load(&snapshot.load);
        self.load.send_if_modified(|old| {
            let changed = *old != snapshot;
            *old = snapshot;
            changed
        });
    }
}
