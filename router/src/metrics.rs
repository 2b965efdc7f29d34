//! The router's Prometheus metrics (served as text on `/metrics`).
//!
//! Every metric is registered once in [`RouterMetrics::new`], named `tessera_router_*`, in base
//! units (seconds, tokens). Routing outcomes are counted by whether the prefix expectation was
//! exact (KV events) or approximate, so a fallback is always visible.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Every metric the router exports.
pub struct RouterMetrics {
    registry: Registry,
    /// Workers discovery knows.
    pub workers_known: IntGauge,
    /// Workers routable now.
    pub workers_healthy: IntGauge,
    /// Routable workers whose KV events stream (exact index).
    pub workers_exact: IntGauge,
    /// Workers refused (model or tokenizer mismatch).
    pub workers_refused: IntCounter,
    /// KV event streams that ended (the worker's exact view dropped; approximate until resubscribed).
    pub kv_stream_fallbacks: IntCounter,
    /// Requests routed, by `mode` (exact / approximate).
    pub routed: IntCounterVec,
    /// Prompt tokens routed.
    pub routed_prompt_tokens: IntCounter,
    /// Requests routed per worker address.
    pub worker_requests: IntCounterVec,
    /// Prompt tokens the router expected the chosen worker to hold.
    pub predicted_cached_tokens: IntCounter,
    /// Prompt tokens the workers reported served from cache.
    pub cached_prompt_tokens: IntCounter,
    /// Requests finished, by `method` and gRPC `code`.
    pub requests: IntCounterVec,
    /// Retries of a request on another worker before its first token.
    pub retries: IntCounter,
    /// Requests moved to another worker after tokens were streamed (resumed there).
    pub migrations: IntCounter,
    /// Circuit breakers opened by a failed request.
    pub breaker_trips: IntCounter,
    /// Workers whose circuit breaker is open or half-open now.
    pub workers_circuit_open: IntGauge,
    /// Time to first token as the client sees it, by method.
    pub ttft: HistogramVec,
    /// Whole request duration.
    pub request_duration: Histogram,
    /// Tokens generated.
    pub generated_tokens: IntCounter,
}

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

impl RouterMetrics {
    /// Registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| add(&registry, IntCounter::new(name, help));
        let gauge = |name: &str, help: &str| add(&registry, IntGauge::new(name, help));
        Ok(RouterMetrics {
            workers_known: gauge("tessera_router_workers", "Workers known from discovery")?,
            workers_healthy: gauge("tessera_router_workers_healthy", "Workers routable now")?,
            workers_exact: gauge("tessera_router_workers_exact", "Routable workers whose KV events stream")?,
            workers_refused: counter(
                "tessera_router_workers_refused_total",
                "Workers refused for a model or tokenizer mismatch",
            )?,
            kv_stream_fallbacks: counter(
                "tessera_router_kv_stream_fallbacks_total",
                "KV event streams lost (worker routed with the approximate view until resubscribed)",
            )?,
            routed: add(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "tessera_router_routed_total",
                        "Requests routed, by policy, prefix view (exact / approximate) and reason (prefix_hit: the chosen worker holds part of the prompt; no_prefix: chosen by load alone)",
                    ),
                    &["policy", "mode", "reason"],
                ),
            )?,
            routed_prompt_tokens: counter("tessera_router_routed_prompt_tokens_total", "Prompt tokens routed")?,
            worker_requests: add(
                &registry,
                IntCounterVec::new(
                    Opts::new("tessera_router_worker_requests_total", "Requests routed, by worker address"),
                    &["worker"],
                ),
            )?,
            predicted_cached_tokens: counter(
                "tessera_router_predicted_cached_tokens_total",
                "Prompt tokens the router expected the chosen worker to hold",
            )?,
            cached_prompt_tokens: counter(
                "tessera_router_cached_prompt_tokens_total",
                "Prompt tokens workers served from their prefix cache",
            )?,
            requests: add(
                &registry,
                IntCounterVec::new(
                    Opts::new("tessera_router_requests_total", "Requests finished, by method and gRPC code"),
                    &["method", "code"],
                ),
            )?,
            retries: counter(
                "tessera_router_retries_total",
                "Requests retried on another worker before the first token",
            )?,
            migrations: counter(
                "tessera_router_migrations_total",
                "Requests migrated mid-stream to another worker, resuming after the tokens already streamed",
            )?,
            breaker_trips: counter(
                "tessera_router_circuit_breaker_trips_total",
                "Worker circuit breakers opened by a failed request",
            )?,
            workers_circuit_open: gauge(
                "tessera_router_workers_circuit_open",
                "Workers whose circuit breaker is open or half-open",
            )?,
            ttft: add(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new("tessera_router_time_to_first_token_seconds", "Arrival to first token")
                        .buckets(buckets(0.001, 16)),
                    &["method"],
                ),
            )?,
            request_duration: add(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("tessera_router_request_duration_seconds", "Arrival to last token")
                        .buckets(buckets(0.001, 18)),
                ),
            )?,
            generated_tokens: counter("tessera_router_generated_tokens_total", "Tokens generated")?,
            registry,
        })
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new().encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
