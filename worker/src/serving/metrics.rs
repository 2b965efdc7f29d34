//! The worker's Prometheus metrics (served as text on `/metrics`).
//!
//! The engine thread records; the HTTP server encodes in the classic Prometheus text format.
//! Every metric is registered once in [`WorkerMetrics::new`], named `tessera_worker_*`, and uses
//! base units (seconds, tokens, blocks); the output passes `promtool check metrics`.

use std::time::Duration;

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::engine::{EngineLoad, FinishReason, SequenceUsage, StepReport};
use crate::error::EngineError;

/// Every metric the worker exports.
pub struct WorkerMetrics {
    registry: Registry,
    samples_finished: IntCounterVec,
    requests_rejected: IntCounterVec,
    prompt_tokens: IntCounter,
    cached_prompt_tokens: IntCounter,
    generated_tokens: IntCounter,
    prefill_tokens: IntCounter,
    preemptions: IntCounter,
    running: IntGauge,
    waiting: IntGauge,
    kv_blocks_total: IntGauge,
    kv_blocks_used: IntGauge,
    kv_blocks_cached: IntGauge,
    ttft: Histogram,
    itl: Histogram,
    request_duration: Histogram,
    step_duration: Histogram,
    ready: IntGauge,
    registered: IntGauge,
    registrations: IntCounter,
}

/// Registers `m` on `registry` and hands it back.
fn add<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    m: Result<M, prometheus::Error>,
) -> Result<M, prometheus::Error> {
    let m = m?;
    registry.register(Box::new(m.clone()))?;
    Ok(m)
}

fn buckets(start: f64, count: usize) -> Vec<f64> {
    (0..count).map(|i| start * 2f64.powi(i as i32)).collect()
}

impl WorkerMetrics {
    /// Registers every metric; `info` labels (model, device, version, worker id) go on
    /// `tessera_worker_info`.
    pub fn new(info: Vec<(&'static str, String)>) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| add(&registry, IntCounter::new(name, help));
        let labelled = |name: &str, help: &str| add(&registry, IntCounterVec::new(Opts::new(name, help), &["reason"]));
        let gauge = |name: &str, help: &str| add(&registry, IntGauge::new(name, help));
        let histogram = |name: &str, help: &str, start, n| {
            add(&registry, Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets(start, n))))
        };
        let m = WorkerMetrics {
            samples_finished: labelled("tessera_worker_samples_finished_total", "Samples ended, by finish reason")?,
            requests_rejected: labelled("tessera_worker_requests_rejected_total", "Requests refused, by reason")?,
            prompt_tokens: counter("tessera_worker_prompt_tokens_total", "Prompt tokens of finished samples")?,
            cached_prompt_tokens: counter(
                "tessera_worker_cached_prompt_tokens_total",
                "Prompt tokens of finished samples served from the prefix cache",
            )?,
            generated_tokens: counter("tessera_worker_generated_tokens_total", "Tokens generated")?,
            prefill_tokens: counter("tessera_worker_prefill_tokens_total", "Prompt tokens computed (not cached)")?,
            preemptions: counter("tessera_worker_preemptions_total", "Sequences preempted for KV space")?,
            running: gauge("tessera_worker_running_sequences", "Sequences running")?,
            waiting: gauge("tessera_worker_waiting_sequences", "Sequences waiting for admission")?,
            kv_blocks_total: gauge("tessera_worker_kv_blocks", "KV cache blocks in all")?,
            kv_blocks_used: gauge("tessera_worker_kv_blocks_used", "KV cache blocks owned by sequences")?,
            kv_blocks_cached: gauge("tessera_worker_kv_blocks_cached", "Unowned KV blocks kept for prefix reuse")?,
            ttft: histogram("tessera_worker_time_to_first_token_seconds", "Arrival to first token", 0.005, 14)?,
            itl: histogram(
                "tessera_worker_inter_token_latency_seconds",
                "Time between tokens of a request",
                0.001,
                14,
            )?,
            request_duration: histogram("tessera_worker_request_duration_seconds", "Arrival to last token", 0.01, 16)?,
            step_duration: histogram(
                "tessera_worker_step_duration_seconds",
                "Duration of one engine step",
                0.0005,
                16,
            )?,
            ready: gauge("tessera_worker_ready", "1 while the worker accepts requests")?,
            registered: gauge("tessera_worker_registered", "1 while the worker's key is registered in etcd")?,
            registrations: counter(
                "tessera_worker_registrations_total",
                "Times the worker registered in etcd (1 + re-registrations after a lost lease or outage)",
            )?,
            registry: registry.clone(),
        };
        let names: Vec<&str> = info.iter().map(|(k, _)| *k).collect();
        let info_gauge: prometheus::IntGaugeVec = add(
            &registry,
            prometheus::IntGaugeVec::new(Opts::new("tessera_worker_info", "Static facts about the worker"), &names),
        )?;
        let values: Vec<&str> = info.iter().map(|(_, v)| v.as_str()).collect();
        if let Ok(g) = info_gauge.get_metric_with_label_values(&values) {
            g.set(1);
        }
        Ok(m)
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        // Encoding gathered families into memory only fails on malformed families, which
        // registration rules out; an empty page is the fallback.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Marks the worker ready (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Records whether the worker's etcd key is registered.
    pub fn set_registered(&self, registered: bool) {
        self.registered.set(i64::from(registered));
    }

    /// Whether the worker's key is in etcd now.
    pub fn is_registered(&self) -> bool {
        self.registered.get() == 1
    }

    /// Counts a successful registration (lease granted, key put).
    pub fn registration_succeeded(&self) {
        self.registrations.inc();
    }

    fn count(vec: &IntCounterVec, label: &str) {
        vec.with_label_values(&[label]).inc();
    }

    pub(crate) fn rejected(&self, e: &EngineError) {
        let reason = match e {
            EngineError::QueueFull { .. } => "queue_full",
            _ => "invalid",
        };
        Self::count(&self.requests_rejected, reason);
    }

    /// Counts a request refused before it reached the engine.
    pub fn rejected_overloaded(&self) {
        Self::count(&self.requests_rejected, "overloaded");
    }

    pub(crate) fn finished(&self, outcome: Option<(FinishReason, SequenceUsage)>) {
        let reason = match outcome {
            Some((FinishReason::Stop, _)) => "stop",
            Some((FinishReason::Length, _)) => "length",
            None => "aborted",
        };
        Self::count(&self.samples_finished, reason);
        if let Some((_, u)) = outcome {
            self.prompt_tokens.inc_by(u.prompt_tokens as u64);
            self.cached_prompt_tokens.inc_by(u.cached_prompt_tokens as u64);
        }
    }

    pub(crate) fn failed(&self) {
        Self::count(&self.samples_finished, "error");
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
