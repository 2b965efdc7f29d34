//! The worker's Prometheus metrics (served as text on `/metrics`).
//!
//! The engine thread records; the HTTP server encodes. Every metric is registered once in
//! [`WorkerMetrics::new`], named `tessera_worker_*`, and uses base units (seconds, tokens,
//! blocks); the output passes `promtool check metrics`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::{EngineLoad, FinishReason, SequenceUsage, StepReport};
use crate::error::EngineError;

type Labels = Vec<(&'static str, &'static str)>;

/// Every metric the worker exports.
pub struct WorkerMetrics {
    registry: Registry,
    samples_finished: Family<Labels, Counter>,
    requests_rejected: Family<Labels, Counter>,
    prompt_tokens: Counter,
    cached_prompt_tokens: Counter,
    generated_tokens: Counter,
    prefill_tokens: Counter,
    preemptions: Counter,
    running: Gauge,
    waiting: Gauge,
    kv_blocks_total: Gauge,
    kv_blocks_used: Gauge,
    kv_blocks_cached: Gauge,
    ttft: Histogram,
    itl: Histogram,
    request_duration: Histogram,
    step_duration: Histogram,
    ready: Gauge<i64, std::sync::atomic::AtomicI64>,
    _info: Family<Vec<(&'static str, String)>, Gauge<u64, AtomicU64>>,
}

impl WorkerMetrics {
    /// Registers every metric; `info` labels (model, device, version) go on `tessera_worker_info`.
    pub fn new(info: Vec<(&'static str, String)>) -> Self {
        let mut registry = Registry::default();
        let m = WorkerMetrics {
            samples_finished: Family::default(),
            requests_rejected: Family::default(),
            prompt_tokens: Counter::default(),
            cached_prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            prefill_tokens: Counter::default(),
            preemptions: Counter::default(),
            running: Gauge::default(),
            waiting: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            kv_blocks_used: Gauge::default(),
            kv_blocks_cached: Gauge::default(),
            ttft: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            itl: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            request_duration: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            step_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            ready: Gauge::default(),
            _info: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("tessera_worker_samples_finished", "Samples ended, by finish reason", m.samples_finished.clone());
        r.register("tessera_worker_requests_rejected", "Requests refused, by reason", m.requests_rejected.clone());
        r.register("tessera_worker_prompt_tokens", "Prompt tokens of finished samples", m.prompt_tokens.clone());
        r.register(
            "tessera_worker_cached_prompt_tokens",
            "Prompt tokens of finished samples served from the prefix cache",
            m.cached_prompt_tokens.clone(),
        );
        r.register("tessera_worker_generated_tokens", "Tokens generated", m.generated_tokens.clone());
        r.register("tessera_worker_prefill_tokens", "Prompt tokens computed (not cached)", m.prefill_tokens.clone());
        r.register("tessera_worker_preemptions", "Sequences preempted for KV space", m.preemptions.clone());
        r.register("tessera_worker_running_sequences", "Sequences running", m.running.clone());
        r.register("tessera_worker_waiting_sequences", "Sequences waiting for admission", m.waiting.clone());
        r.register("tessera_worker_kv_blocks", "KV cache blocks in all", m.kv_blocks_total.clone());
        r.register("tessera_worker_kv_blocks_used", "KV cache blocks owned by sequences", m.kv_blocks_used.clone());
        r.register(
            "tessera_worker_kv_blocks_cached",
            "Unowned KV blocks kept for prefix reuse",
            m.kv_blocks_cached.clone(),
        );
        r.register("tessera_worker_time_to_first_token_seconds", "Arrival to first token", m.ttft.clone());
        r.register("tessera_worker_inter_token_latency_seconds", "Time between tokens of a request", m.itl.clone());
        r.register("tessera_worker_request_duration_seconds", "Arrival to last token", m.request_duration.clone());
        r.register("tessera_worker_step_duration_seconds", "Duration of one engine step", m.step_duration.clone());
        r.register("tessera_worker_ready", "1 while the worker accepts requests", m.ready.clone());
        let info_family: Family<Vec<(&'static str, String)>, Gauge<u64, AtomicU64>> = Family::default();
        info_family.get_or_create(&info).set(1);
        r.register("tessera_worker_info", "Static facts about the worker", info_family.clone());
        WorkerMetrics { registry, _info: info_family, ..m }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Marks the worker ready (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    pub(crate) fn rejected(&self, e: &EngineError) {
        let reason = match e {
            EngineError::QueueFull { .. } => "queue_full",
            _ => "invalid",
        };
        self.requests_rejected.get_or_create(&vec![("reason", reason)]).inc();
    }

    /// Counts a request refused before it reached the engine.
    pub fn rejected_overloaded(&self) {
        self.requests_rejected.get_or_create(&vec![("reason", "overloaded")]).inc();
    }

    pub(crate) fn finished(&self, outcome: Option<(FinishReason, SequenceUsage)>) {
        let reason = match outcome {
            Some((FinishReason::Stop, _)) => "stop",
            Some((FinishReason::Length, _)) => "length",
            None => "aborted",
        };
        self.samples_finished.get_or_create(&vec![("reason", reason)]).inc();
        if let Some((_, u)) = outcome {
            self.prompt_tokens.inc_by(u.prompt_tokens as u64);
            self.cached_prompt_tokens.inc_by(u.cached_prompt_tokens as u64);
        }
    }

    pub(crate) fn failed(&self) {
        self.samples_finished.get_or_create(&vec![("reason", "error")]).inc();
    }

    pub(crate) fn first_token(&self, d: Duration) {
        self.generated_tokens.inc();
        self.ttft.observe(d.as_secs_f64());
    }

    pub(crate) fn inter_token(&self, d: Duration) {
        self.generated_tokens.inc();
        self.itl.observe(d.as_secs_f64());
    }

    pub(crate) fn request_done(&self, d: Duration) {
        self.request_duration.observe(d.as_secs_f64());
    }

    pub(crate) fn step(&self, d: Duration, report: &StepReport) {
        self.step_duration.observe(d.as_secs_f64());
        self.prefill_tokens.inc_by(report.prefill_tokens as u64);
        self.preemptions.inc_by(report.preempted as u64);
    }

    pub(crate) fn load(&self, load: &EngineLoad) {
        self.running.set(load.running as i64);
        self.waiting.set(load.waiting as i64);
        self.kv_blocks_total.set(load.kv_blocks_total as i64);
        self.kv_blocks_used.set(load.kv_blocks_used as i64);
        self.kv_blocks_cached.set(load.kv_blocks_cached as i64);
    }
}
