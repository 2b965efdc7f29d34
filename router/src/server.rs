//! The router process: discovery → worker pool → `tessera.v1.Generation` over gRPC (with
//! `grpc.health.v1` and reflection v1 + v1alpha), plus `/livez`, `/readyz` (at least one
//! routable worker), `/metrics` and `/debug/kv-index` (the exact index, per worker address) on
//! a side HTTP port.
//!
//! Lifecycle: listeners bound → `on_bound` → serving until `shutdown` resolves → health goes
//! NOT_SERVING, no new connections, in-flight calls finish (bounded by `drain_timeout`) →
//! discovery, the pool's tasks and the HTTP server are cancelled and joined.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tessera_proto::v1::generation_server::GenerationServer;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;

use crate::discovery::{self, MembershipEvent};
use crate::http_server;
use crate::metrics::RouterMetrics;
use crate::openai::{self, OpenAiConfig};
use crate::pool::{PoolConfig, WorkerPool};
use crate::routing::{CostWeights, Policy, Router};
use crate::service::{GenerationService, TextModel};

/// Where workers come from.
#[derive(Debug, Clone)]
pub enum Discovery {
    /// A fixed list of worker addresses (`host:port`).
    Static(Vec<String>),
    /// Watch etcd (endpoints as URLs).
    Etcd(Vec<String>),
}

/// How to run the router.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// gRPC address.
    pub listen_grpc: SocketAddr,
    /// Probe and metrics address, if any.
    pub listen_http: Option<SocketAddr>,
    /// Where workers come from.
    pub discovery: Discovery,
    /// Routing policy.
    pub policy: Policy,
    /// Cost weights.
    pub weights: CostWeights,
    /// How long in-flight calls may run after shutdown begins.
    pub drain_timeout: Duration,
    /// Most requests in flight through this router (more get `RESOURCE_EXHAUSTED` / 429).
    pub max_in_flight: usize,
    /// The OpenAI-compatible HTTP API (on `listen_http`).
    pub openai: OpenAiConfig,
    /// How long an HTTP client may take to send its request headers.
    pub header_timeout: Duration,
    /// Log each request's prompt and output (users' data: off unless asked for).
    pub log_content: bool,
    /// HTTP/2 keep-alive interval on worker connections (see `PoolConfig::keepalive`).
    pub worker_keepalive: Duration,
}

/// The addresses actually bound.
#[derive(Debug, Clone, Copy)]
pub struct RouterAddrs {
    /// gRPC.
    pub grpc: SocketAddr,
    /// HTTP probes and metrics.
    pub http: Option<SocketAddr>,
}

/// Why the router could not run.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Metrics or reflection could not be set up.
    #[error("setting up {0}")]
    Setup(String),
    /// The gRPC transport failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, RouterError> {
    TcpListener::bind(addr).await.map_err(|source| RouterError::Bind { addr, source })
}

#[derive(Clone)]
struct Probes {
    pool: WorkerPool,
    metrics: Arc<RouterMetrics>,
    /// Set when the drain begins: not ready any more (load balancers stop sending here).
    draining: Arc<AtomicBool>,
}

/// Runs the router for `model` until `shutdown` resolves.
pub async fn serve(
    model: TextModel,
    config: RouterConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(RouterAddrs),
) -> Result<(), RouterError> {
    let grpc_listener = bind(config.listen_grpc).await?;
    let http_listener = match config.listen_http {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    on_bound(RouterAddrs {
        grpc: grpc_listener.local_addr().unwrap_or(config.listen_grpc),
        http: http_listener.as_ref().and_then(|l| l.local_addr().ok()),
    });
    let metrics = Arc::new(RouterMetrics::new().map_err(|e| RouterError::Setup(format!("metrics: {e}")))?);
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();

    let (membership_tx, membership_rx) = mpsc::channel::<MembershipEvent>(64);
    match &config.discovery {
        Discovery::Static(addrs) => {
            // The channel holds the one snapshot; the sender is dropped after it.
            let _ = membership_tx.send(discovery::static_snapshot(addrs)).await;
        }
        Discovery::Etcd(endpoints) => {
            let (endpoints, model_id, cancel) = (endpoints.clone(), model.id.clone(), stop.clone());
            let tx = membership_tx.clone();
            tasks.spawn(async move { discovery::etcd::watch_workers(endpoints, model_id, tx, cancel).await });
        }
    }
    drop(membership_tx);
    let pool_config = PoolConfig {
        keepalive: config.worker_keepalive,
        ..PoolConfig::new(model.id.clone(), model.tokenizer_sha256.clone())
    };
    let router = Router::new(config.policy, config.weights, rand::random());
    let pool = WorkerPool::spawn(pool_config, router, metrics.clone(), membership_rx);

    let service = Arc::new(GenerationService::new(
        Arc::new(model),
        pool.clone(),
        metrics.clone(),
        config.max_in_flight,
        config.log_content,
    ));
    let draining = Arc::new(AtomicBool::new(false));
    let http_task = http_listener.map(|l| {
        let app = axum::Router::new()
            .route("/livez", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text))
            .route("/debug/kv-index", get(kv_index))
            .with_state(Probes { pool: pool.clone(), metrics: metrics.clone(), draining: draining.clone() })
            .merge(openai::routes(service.clone(), &config.openai));
        let stop = stop.clone();
        tokio::spawn(http_server::serve(l, app, config.header_timeout, stop))
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GenerationServer<GenerationService>>().await;
    // Reflection lists exactly the services served here (the descriptor set also describes the
    // worker's API, which the router does not serve).
    let reflection = |own: &str| {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("tessera.v1.Generation")
            .with_service_name("grpc.health.v1.Health")
            .with_service_name(own)
    };
    let reflection_error = |e: tonic_reflection::server::Error| RouterError::Setup(format!("reflection: {e}"));
    let reflection_v1 = reflection("grpc.reflection.v1.ServerReflection").build_v1().map_err(reflection_error)?;
    let reflection_v1alpha =
        reflection("grpc.reflection.v1alpha.ServerReflection").build_v1alpha().map_err(reflection_error)?;
    let drain_started = CancellationToken::new();
    let signal = {
        let (drain_started, draining) = (drain_started.clone(), draining.clone());
        async move {
            shutdown.await;
            draining.store(true, Ordering::Release);
            health.set_not_serving::<GenerationServer<GenerationService>>().await;
            health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            drain_started.cancel();
        }
    };
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(GenerationServer::from_arc(service))
            .serve_with_incoming_shutdown(
                // TCP_NODELAY on every accepted connection: `Server::tcp_nodelay` covers only the
                // listeners tonic binds itself, and with Nagle on, a small response frame can wait
                // for the peer's delayed ACK (~40 ms).
                TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                signal,
            ),
    );
    let served = tokio::select! {
        r = &mut server => r,
        () = drain_started.cancelled() => match tokio::time::timeout(config.drain_timeout, &mut server).await {
            Ok(r) => r,
            Err(_) => {
                server.abort();
                Ok(Ok(()))
            }
        },
    };
    stop.cancel();
    pool.shutdown().await;
    tasks.close();
    tasks.wait().await;
    if let Some(t) = http_task {
        let _ = t.await;
    }
    match served {
        Ok(r) => r.map_err(RouterError::from),
        Err(e) => Err(RouterError::Setup(format!("server task: {e}"))),
    }
}

async fn readyz(State(p): State<Probes>) -> impl IntoResponse {
    if p.draining.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if p.pool.healthy() > 0 {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no routable worker\n")
    }
}

/// The exact KV index as JSON: `{"workers": {address: [block hashes, ascending]}}` (to compare
/// router replicas; hashes are decimal u64).
async fn kv_index(State(p): State<Probes>) -> impl IntoResponse {
    let body = serde_json::json!({ "workers": p.pool.index_by_address() });
    ([(header::CONTENT_TYPE, "application/json")], body.to_string())
}

async fn metrics_text(State(p): State<Probes>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], p.metrics.encode())
}
