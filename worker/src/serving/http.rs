//! The worker's side HTTP port: `/livez` (the process is up), `/readyz` (the model is loaded, the
//! worker is not draining and, when it registers in etcd, its key is there now) and `/metrics`
//! (Prometheus text).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::serving::metrics::WorkerMetrics;

#[derive(Clone)]
struct Probes {
    ready: Arc<AtomicBool>,
    metrics: Arc<WorkerMetrics>,
    registers: bool,
}

/// The probe and metrics routes; `registers`: the worker registers in etcd, and is ready only
/// while registered.
pub fn router(ready: Arc<AtomicBool>, metrics: Arc<WorkerMetrics>, registers: bool) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Probes { ready, metrics, registers })
}

async fn readyz(State(p): State<Probes>) -> impl IntoResponse {
    if !p.ready.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    } else if p.registers && !p.metrics.is_registered() {
        (StatusCode::SERVICE_UNAVAILABLE, "not registered in etcd\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn metrics_text(State(p): State<Probes>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], p.metrics.encode())
}
