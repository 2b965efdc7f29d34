//! The discrete-event loop of one (workers, policy) run, and its metrics.
//!
//! - **Routing**: [`Router::choose`] over every worker with the load last reported (running +
//!   waiting tokens, every `report_interval`, phase-shifted per worker) plus the prompt tokens
//!   routed to it since. Each policy gets the view it reads: `kv` the exact index, fed every
//!   worker's events when its step ends; `prefix` the approximate LRU, sized like the real cache.
//! - **Metrics** cover requests that arrive in `[warmup, duration)`; no turn starts after
//!   `duration`, and the cluster then drains (for at most another `duration`). Throughput counts
//!   completions inside the window; the hit rate is cached ÷ prompt tokens at admission; load
//!   (running + waiting tokens) spread is given both as the busiest worker's time average over
//!   the mean and as the instantaneous max ÷ mean averaged over the window.
//!
//! Invariants: simulated time never goes back (one event queue ordered by time, then by push
//! order, which also makes a run a pure function of its config and seed); the index applies each
//! worker's KV events in order, so after every step it holds exactly the worker's keyed blocks.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::rc::Rc;

use anyhow::Context;
use tessera_router::routing::{Candidate, CostWeights, Policy, Router, WorkerSlot};

use super::US_PER_S;
use super::worker::{RequestRecord, Seq, SimWorker, WorkerModel};
use super::workload::{Conversation, ConversationStart, Workload, conversation};

/// Everything one (workers, policy) run depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct SimConfig {
    pub(super) workers: u32,
    pub(super) policy: Policy,
    pub(super) weights: CostWeights,
    pub(super) model: WorkerModel,
    pub(super) workload: Workload,
    pub(super) duration_us: u64,
    pub(super) warmup_us: u64,
    pub(super) report_interval_us: u64,
    pub(super) seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    /// Conversation `i` of the trace starts (and schedules the next start).
    Start(usize),
    /// The next turn of a conversation is sent.
    Turn(usize),
    StepDone(WorkerSlot),
    Report(WorkerSlot),
}

/// What the router knows of a worker's load.
#[derive(Debug, Clone, Copy, Default)]
struct LoadView {
    running: u64,
    waiting: u64,
    in_flight: u64,
}

/// Results of one (workers, policy) run.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RunResult {
    /// Requests that arrived in the measurement window, and how many of those completed.
    pub(super) measured: usize,
    pub(super) completed: usize,
    pub(super) arrived_per_s: f64,
    pub(super) req_per_s: f64,
    pub(super) output_tok_per_s: f64,
    pub(super) hit_rate: f64,
    pub(super) ttft_ms: (f64, f64),
    pub(super) e2e_ms: (f64, f64),
    /// The busiest worker's time-averaged load over the cluster's mean (persistent hot spots).
    pub(super) load_max_over_mean: f64,
    /// Max over mean of the workers' loads at one moment, averaged over the window (transient
    /// imbalance).
    pub(super) instant_max_over_mean: f64,
}

pub(super) struct Sim<'t> {
    config: SimConfig,
    router: Router,
    workers: Vec<SimWorker>,
    views: Vec<LoadView>,
    queue: BinaryHeap<Reverse<(u64, u64, Action)>>,
    pushed: u64,
    trace: &'t [ConversationStart],
    systems: &'t [Vec<u32>],
    /// Conversations in progress, by trace index.
    conversations: Vec<Option<Conversation>>,
    requests: Vec<RequestRecord>,
    load_sum: Vec<f64>,
    /// Sum and count of the instantaneous max ÷ mean load, sampled at worker 0's reports.
    spread: (f64, u64),
    candidates: Vec<Candidate>,
}

impl<'t> Sim<'t> {
    pub(super) fn new(config: SimConfig, trace: &'t [ConversationStart], systems: &'t [Vec<u32>]) -> Self {
        let n = config.workers as usize;
        let mut router = Router::new(config.policy, config.weights, config.seed);
        for w in 0..config.workers {
            match config.policy {
                Policy::Kv => router.index.reset_worker(w, 0, []),
                Policy::Prefix => router.approx.add_worker(w, config.model.kv_blocks),
                Policy::RoundRobin | Policy::LeastLoad | Policy::PowerOfTwo => {}
            }
        }
        Sim {
            config,
            router,
            workers: (0..n).map(|_| SimWorker::new(config.model)).collect(),
            views: vec![LoadView::default(); n],
            queue: BinaryHeap::new(),
            pushed: 0,
            trace,
            systems,
            conversations: (0..trace.len()).map(|_| None).collect(),
            requests: Vec::new(),
            load_sum: vec![0.0; n],
            spread: (0.0, 0),
            candidates: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, at_us: u64, action: Action) {
        self.pushed += 1;
        self.queue.push(Reverse((at_us, self.pushed, action)));
    }

    fn in_window(&self, t: u64) -> bool {
        t >= self.config.warmup_us && t < self.config.duration_us
    }

    pub(super) fn run(&mut self) -> anyhow::Result<RunResult> {
        let n = u64::from(self.config.workers);
        for w in 0..self.config.workers {
            self.push(u64::from(w) * self.config.report_interval_us / n, Action::Report(w));
        }
        if let Some(first) = self.trace.first() {
            self.push(first.at_us, Action::Start(0));
        }
        let stop_us = self.config.duration_us.saturating_mul(2);
        while let Some(Reverse((now, _, action))) = self.queue.pop() {
            if now > stop_us {
                break;
            }
            match action {
                Action::Start(i) => self.start_conversation(now, i)?,
                Action::Turn(c) => self.submit(now, c)?,
                Action::StepDone(w) => self.step_done(now, w)?,
                Action::Report(w) => self.report(now, w),
            }
        }
        Ok(self.summarize())
    }

    fn start_conversation(&mut self, now: u64, i: usize) -> anyhow::Result<()> {
        if let Some(next) = self.trace.get(i + 1) {
            self.push(next.at_us, Action::Start(i + 1));
        }
        let start = self.trace.get(i).context("conversation start out of the trace")?;
        let system = self.systems.get(start.tenant).context("tenant without a system prompt")?;
        let c = conversation(&self.config.workload, system, start.seed, self.config.model.block_size);
        *self.conversations.get_mut(i).context("conversation start out of the trace")? = Some(c);
        self.submit(now, i)
    }

    /// Routes the conversation's next turn with the real router and queues it on that worker.
    fn submit(&mut self, now: u64, conv: usize) -> anyhow::Result<()> {
        let bs = self.config.model.block_size;
        let c = self.conversations.get_mut(conv).and_then(Option::as_mut).context("turn of a finished conversation")?;
        let turn = *c.turns.get(c.next).context("turn past the conversation's end")?;
        c.next += 1;
        let hashes = Rc::clone(&c.hashes);
        self.candidates.clear();
        self.candidates.extend(self.views.iter().enumerate().map(|(w, v)| Candidate {
            slot: w as WorkerSlot,
            running_tokens: v.running,
            waiting_tokens: v.waiting,
            in_flight_tokens: v.in_flight,
        }));
        let decision = self
            .router
            .choose(&self.candidates, &hashes[..turn.prompt_len / bs], bs, turn.prompt_len)
            .context("no worker to route to")?;
        let w = decision.slot;
        let view = self.views.get_mut(w as usize).context("router chose an unknown worker")?;
        view.in_flight += turn.prompt_len as u64;
        let request = self.requests.len();
        self.requests.push(RequestRecord {
            arrival_us: now,
            first_token_us: None,
            done_us: None,
            prompt_tokens: turn.prompt_len,
            cached_tokens: None,
            output_tokens: turn.output_len,
        });
        let worker = &mut self.workers[w as usize];
        worker.waiting.push_back(Seq {
            request,
            conversation: conv,
            hashes,
            prompt_len: turn.prompt_len,
            output_len: turn.output_len,
            computed: 0,
            generated: 0,
            table: Vec::new(),
            keyed_upto: 0,
        });
        if worker.step.is_none() {
            self.start_step(now, w);
        }
        Ok(())
    }

    fn start_step(&mut self, now: u64, w: WorkerSlot) {
        if let Some(us) = self.workers[w as usize].start_step(&mut self.requests) {
            self.push(now + us, Action::StepDone(w));
        }
    }

    /// Ends a worker's step: publishes its KV events, schedules follow-up turns, starts the next step.
    fn step_done(&mut self, now: u64, w: WorkerSlot) -> anyhow::Result<()> {
        let worker = &mut self.workers[w as usize];
        let finished = worker.finish_step(now, &mut self.requests);
        for (seq, change) in worker.take_events() {
            if self.config.policy == Policy::Kv {
                self.router.index.apply(w, seq, change)?;
            }
        }
        for conv in finished {
            let slot = self.conversations.get_mut(conv).context("finished turn of an unknown conversation")?;
            let c = slot.as_ref().context("finished turn of a finished conversation")?;
            let think = c.turns.get(c.next.saturating_sub(1)).map_or(0, |t| t.think_us);
            if c.next < c.turns.len() && now + think < self.config.duration_us {
                self.push(now + think, Action::Turn(conv));
            } else {
                *slot = None;
            }
        }
        self.start_step(now, w);
        Ok(())
    }

    /// A worker's load report: replaces the router's view and clears the in-flight tokens.
    fn report(&mut self, now: u64, w: WorkerSlot) {
        let (running, waiting) = self.workers[w as usize].load();
        self.views[w as usize] = LoadView { running, waiting, in_flight: 0 };
        if self.in_window(now) {
            self.load_sum[w as usize] += (running + waiting) as f64;
            if w == 0 {
                let loads: Vec<u64> = self.workers.iter().map(|x| x.load()).map(|(r, q)| r + q).collect();
                let mean = loads.iter().sum::<u64>() as f64 / loads.len() as f64;
                if mean > 0.0 {
                    let max = loads.iter().copied().max().unwrap_or(0);
                    self.spread = (self.spread.0 + max as f64 / mean, self.spread.1 + 1);
                }
            }
        }
        let next = now + self.config.report_interval_us;
        if next < self.config.duration_us {
            self.push(next, Action::Report(w));
        }
    }

    fn summarize(&self) -> RunResult {
        let measured: Vec<&RequestRecord> = self.requests.iter().filter(|r| self.in_window(r.arrival_us)).collect();
        let done_in_window: Vec<&RequestRecord> =
            self.requests.iter().filter(|r| r.done_us.is_some_and(|t| self.in_window(t))).collect();
        let window_s = (self.config.duration_us - self.config.warmup_us) as f64 / US_PER_S;
        let (prompt, cached) = measured
            .iter()
            .filter_map(|r| r.cached_tokens.map(|c| (r.prompt_tokens, c)))
            .fold((0, 0), |(p, c), (rp, rc)| (p + rp, c + rc));
        let mut ttft: Vec<u64> = measured.iter().filter_map(|r| r.first_token_us.map(|t| t - r.arrival_us)).collect();
        let mut e2e: Vec<u64> = measured.iter().filter_map(|r| r.done_us.map(|t| t - r.arrival_us)).collect();
        let mean = self.load_sum.iter().sum::<f64>() / self.load_sum.len().max(1) as f64;
        let max = self.load_sum.iter().copied().fold(0.0, f64::max);
        RunResult {
            measured: measured.len(),
            completed: e2e.len(),
            arrived_per_s: measured.len() as f64 / window_s,
            req_per_s: done_in_window.len() as f64 / window_s,
            output_tok_per_s: done_in_window.iter().map(|r| r.output_tokens).sum::<usize>() as f64 / window_s,
            hit_rate: cached as f64 / prompt.max(1) as f64,
            ttft_ms: (percentile_ms(&mut ttft, 50.0), percentile_ms(&mut ttft, 99.0)),
            e2e_ms: (percentile_ms(&mut e2e, 50.0), percentile_ms(&mut e2e, 99.0)),
            load_max_over_mean: if mean > 0.0 { max / mean } else { 0.0 },
            instant_max_over_mean: self.spread.0 / self.spread.1.max(1) as f64,
        }
    }
}

/// Nearest-rank percentile of microsecond samples, in milliseconds.
fn percentile_ms(xs: &mut [u64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_unstable();
    let rank = ((p / 100.0) * xs.len() as f64).ceil() as usize;
    xs[rank.clamp(1, xs.len()) - 1] as f64 / 1e3
}

#[cfg(test)]
mod tests {
    use super::super::tests::{model, workload};
    use super::super::worker::Slot;
    use super::super::workload::{arrival_trace, system_prompts};
    use super::*;

    fn config(workers: u32, policy: Policy, rate_seed: u64) -> SimConfig {
        SimConfig {
            workers,
            policy,
            weights: CostWeights::default(),
            model: model(256),
            workload: workload(),
            duration_us: 30_000_000,
            warmup_us: 0,
            report_interval_us: 100_000,
            seed: rate_seed,
        }
    }

    /// Runs `config` on a 2 req/s trace; returns the finished simulation's result and state checks.
    fn simulate(config: SimConfig) -> anyhow::Result<(RunResult, Vec<RequestRecord>)> {
        let systems = system_prompts(&config.workload, config.seed);
        let trace = arrival_trace(&config.workload, 2.0 / 3.0, config.duration_us, config.seed);
        let mut sim = Sim::new(config, &trace, &systems);
        let result = sim.run()?;
        if config.policy == Policy::Kv {
            for (w, worker) in sim.workers.iter().enumerate() {
                let w = w as WorkerSlot;
                anyhow::ensure!(sim.router.index.last_seq(w) == Some(worker.published), "worker {w}: events unapplied");
                let held = sim.router.index.blocks_of(w).context("untracked worker")?;
                let keyed: std::collections::HashSet<u64> = worker.cache.keyed.keys().copied().collect();
                anyhow::ensure!(*held == keyed, "worker {w}: the index differs from the cache");
            }
            sim.router.index.check_invariants().map_err(anyhow::Error::msg)?;
        }
        for worker in &sim.workers {
            let tables: Vec<&[Slot]> =
                worker.running.iter().chain(&worker.waiting).map(|s| s.table.as_slice()).collect();
            worker.cache.check(&tables).map_err(anyhow::Error::msg)?;
        }
        Ok((result, sim.requests))
    }

    #[test]
    fn a_tiny_run_completes_every_request_and_the_index_matches_the_caches() -> anyhow::Result<()> {
        for policy in [Policy::Kv, Policy::Prefix, Policy::LeastLoad, Policy::RoundRobin, Policy::PowerOfTwo] {
            let (result, requests) = simulate(config(3, policy, 7))?;
            assert!(result.measured > 20, "{policy}: {result:?}");
            assert_eq!(result.completed, result.measured, "{policy}");
            assert!(requests.iter().all(|r| r.done_us.is_some()), "{policy}: a request never finished");
            assert!(result.hit_rate > 0.0 && result.hit_rate < 1.0, "{policy}: {result:?}");
            assert!(result.ttft_ms.0 > 0.0 && result.ttft_ms.0 <= result.e2e_ms.0, "{policy}: {result:?}");
        }
        Ok(())
    }

    #[test]
    fn a_run_is_a_function_of_its_seed() -> anyhow::Result<()> {
        for policy in [Policy::Kv, Policy::PowerOfTwo] {
            let a = simulate(config(4, policy, 3))?;
            assert_eq!(a, simulate(config(4, policy, 3))?);
            assert_ne!(a.1, simulate(config(4, policy, 4))?.1);
        }
        Ok(())
    }

    #[test]
    fn kv_keeps_conversations_on_the_worker_that_holds_them() -> anyhow::Result<()> {
        // Light load: placement, not queueing, decides the hit rate.
        let kv = simulate(config(4, Policy::Kv, 5))?.0;
        let rr = simulate(config(4, Policy::RoundRobin, 5))?.0;
        assert!(kv.hit_rate > rr.hit_rate + 0.1, "kv {kv:?} vs round-robin {rr:?}");
        Ok(())
    }
}
