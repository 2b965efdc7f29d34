//! The worker's side HTTP port: `/livez` (the process is up), `/readyz` (the model is loaded and
//! the worker is not draining) and `/metrics` (Prometheus text).

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
}

/// The probe and metrics routes.
pub fn router(ready: Arc<AtomicBool>, metrics: Arc<WorkerMetrics>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Probes { ready, metrics })
}

async fn readyz(State(p): State<Probes>) -> impl IntoResponse {
    if p.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics_text(State(p): State<Probes>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], p.metrics.encode())
}
