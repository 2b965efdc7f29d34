//! The worker server's lifecycle: bind, serve gRPC (worker service, health, reflection) and the
//! probe port, and drain on shutdown.
//!
//! Phases: **starting** (listeners bound, `/readyz` 503) → **serving** (health SERVING, `/readyz`
//! 200, and, when configured, the key registered in etcd under a lease) → **draining** once the
//! shutdown future resolves (first of all deregistration starts: the registration task deletes
//! the etcd key and revokes the lease, at most 2 s, while the rest proceeds, so routers stop
//! sending here at once; then health NOT_SERVING, `/readyz` 503, `Generate` refused with
//! UNAVAILABLE, no new connections, KV-event streams closed, in-flight streams run to completion) → after `drain_timeout`, whatever still runs is aborted →
//! the engine thread is joined and the probe port closed. Every task spawned here (the gRPC and
//! probe servers, one task per KV-event subscriber, the registration) is cancelled and joined
//! before [`serve`] returns; the registration also when serving fails without a drain.
//!
//! A failed tensor-parallel group starts the same sequence at once (deregistration first), with
//! [`GROUP_FAILURE_GRACE`] instead of the drain timeout (the engine thread has already failed
//! every in-flight request with UNAVAILABLE; the grace lets those statuses reach clients), does
//! not wait for an engine thread that may be stuck in a hung rank, and returns
//! [`ServeError::GroupFailed`] so the process exits non-zero and its supervisor restarts it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tessera_proto::worker_v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;

use crate::engine::Engine;
use crate::kv_events::{DEFAULT_REPLAY_CAPACITY, KvEventLog};
use crate::parallel::GroupHealth;
use crate::serving::engine_loop;
use crate::serving::grpc::WorkerService;
use crate::serving::http;
use crate::serving::metrics::WorkerMetrics;
use crate::serving::registration::{Registration, RegistrationConfig, RegistrationConfigError, RegistrationSpec};
use crate::structured::ConstraintCompiler;

/// How long aborted streams get to close after the drain timeout.
const ABORT_GRACE: Duration = Duration::from_secs(5);
/// How long in-flight streams get to deliver their failure once the group has failed, and how
/// long the engine thread gets to stop before it is left behind.
pub const GROUP_FAILURE_GRACE: Duration = Duration::from_millis(500);

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// gRPC address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Probe and metrics address, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// How long in-flight requests may run after shutdown begins.
    pub drain_timeout: Duration,
    /// Registration in etcd, if any.
    pub registration: Option<RegistrationConfig>,
}

/// What the server serves.
pub struct WorkerParts {
    /// The engine (moved onto its own thread).
    pub engine: Engine,
    /// What `GetInfo` answers.
    pub info: pb::WorkerInfo,
    /// Structured-output compiler, when the tokenizer supports it.
    pub compiler: Option<Arc<ConstraintCompiler>>,
}

/// The addresses actually bound.
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    /// gRPC.
    pub grpc: SocketAddr,
    /// Probes and metrics.
    pub metrics: Option<SocketAddr>,
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The gRPC transport failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The engine thread could not start or panicked.
    #[error("engine thread: {0}")]
    Engine(String),
    /// The tensor-parallel group failed; the worker must exit and be restarted.
    #[error("the tensor-parallel group failed: {0}")]
    GroupFailed(String),
    /// Reflection or the metrics registry could not be set up.
    #[error("setting up {0}")]
    Setup(String),
    /// The registration settings cannot work (e.g. nothing dialable to advertise).
    #[error("etcd registration: {0}")]
    Registration(#[from] RegistrationConfigError),
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })
}

/// Serves until `shutdown` resolves, then drains. `on_bound` is called once serving has begun
/// (listeners bound, with the real ports; `/readyz` 200).
pub async fn serve(
    mut parts: WorkerParts,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(BoundAddrs),
) -> Result<(), ServeError> {
    let grpc_listener = bind(config.listen).await?;
    let http_listener = match config.metrics_listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let local = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
    let bound = BoundAddrs {
        grpc: local(&grpc_listener, config.listen),
        metrics: http_listener.as_ref().zip(config.metrics_listen).map(|(l, a)| local(l, a)),
    };
    let registration = match &config.registration {
        Some(r) => {
            crate::serving::registration::validate_worker_id(&parts.info.worker_id)?;
            parts.info.address = r.advertise_address(bound.grpc)?;
            let spec = RegistrationSpec {
                endpoints: r.endpoints.clone(),
                key: tessera_proto::registry::worker_key(&parts.info.model_id, &parts.info.worker_id),
                value: prost::Message::encode_to_vec(&parts.info),
                ttl: r.ttl,
            };
            Some(spec)
        }
        None => None,
    };
    let metrics = Arc::new(
        WorkerMetrics::new(vec![
            ("model", parts.info.model_id.clone()),
            ("device", parts.info.device.clone()),
            ("version", parts.info.version.clone()),
            ("worker_id", parts.info.worker_id.clone()),
        ])
        .map_err(|e| ServeError::Setup(format!("the metrics registry: {e}")))?,
    );
    let ready = Arc::new(AtomicBool::new(false));
    let draining = Arc::new(AtomicBool::new(false));
    let kv_events = Arc::new(KvEventLog::new(DEFAULT_REPLAY_CAPACITY));
    let group = parts.engine.backend().group_health();
    let (engine, engine_thread) =
        engine_loop::spawn(parts.engine, kv_events, metrics.clone()).map_err(|e| ServeError::Engine(e.to_string()))?;

    let http_stop = CancellationToken::new();
    let http_task = http_listener.map(|l| {
        let app = http::router(ready.clone(), metrics.clone(), registration.is_some());
        let stop = http_stop.clone();
        tokio::spawn(async move { axum::serve(l, app).with_graceful_shutdown(stop.cancelled_owned()).await })
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<pb::worker_server::WorkerServer<WorkerService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error = |e: tonic_reflection::server::Error| ServeError::Setup(format!("reflection: {e}"));
    let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;

    let streams_stop = CancellationToken::new();
    let stream_tasks = TaskTracker::new();
    let drain_started = CancellationToken::new();
    let deregister = CancellationToken::new();
    let service = WorkerService {
        engine: engine.clone(),
        info: Arc::new(parts.info),
        compiler: parts.compiler,
        draining: draining.clone(),
        metrics: metrics.clone(),
        shutdown: streams_stop.clone(),
        tasks: stream_tasks.clone(),
    };
    let signal = {
        let (ready, draining, metrics, drain_started, streams_stop, deregister) = (
            ready.clone(),
            draining.clone(),
            metrics.clone(),
            drain_started.clone(),
            streams_stop.clone(),
            deregister.clone(),
        );
        let group = group.clone();
        async move {
            match &group {
                Some(g) => {
                    tokio::select! {
                        () = shutdown => {}
                        reason = g.failed() => tracing::error!("{reason}; leaving discovery and exiting"),
                    }
                }
                None => shutdown.await,
            }
            // First: leave discovery (the registration task deletes the key and revokes the
            // lease while the rest of the drain proceeds; it is joined after the drain).
            deregister.cancel();
            ready.store(false, Ordering::Release);
            draining.store(true, Ordering::Release);
            metrics.set_ready(false);
            health.set_not_serving::<pb::worker_server::WorkerServer<WorkerService>>().await;
            // The whole server ("") reports draining too, so generic probes stop routing here.
            health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            streams_stop.cancel();
            drain_started.cancel();
        }
    };
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pb::worker_server::WorkerServer::new(service))
        .serve_with_incoming_shutdown(
            // TCP_NODELAY on every accepted connection: `Server::tcp_nodelay` covers only the
            // listeners tonic binds itself, and with Nagle on, a small response frame can wait
            // for the peer's delayed ACK (~40 ms).
            TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            signal,
        );
    let mut server = tokio::spawn(server);
    ready.store(true, Ordering::Release);
    metrics.set_ready(true);
    // Only now: whoever waits for this (the ready line of `tessera worker`) may rely on
    // `/readyz` answering 200 and on `Generate` being served.
    on_bound(bound);
    let registration = registration.map(|spec| Registration::spawn(spec, metrics.clone(), deregister));

    let served = tokio::select! {
        r = &mut server => r,
        () = drain_started.cancelled() => match tokio::time::timeout(drain_limit(group.as_ref(), config.drain_timeout), &mut server).await {
            Ok(r) => r,
            Err(_) => {
                // Out of time: abort what still runs; its streams end with ABORTED.
                engine.shutdown();
                match tokio::time::timeout(ABORT_GRACE, &mut server).await {
                    Ok(r) => r,
                    Err(_) => {
                        server.abort();
                        Ok(Ok(()))
                    }
                }
            }
        },
    };
    if let Some(r) = registration {
        // Already deregistering when the drain began; this also covers a server that failed.
        r.shutdown().await;
    }
    streams_stop.cancel();
    stream_tasks.close();
    // Stream tasks end on the token; waiting here makes them joined, not detached.
    let _ = tokio::time::timeout(ABORT_GRACE, stream_tasks.wait()).await;
    engine.shutdown();
    drop(engine);
    let failure = group.as_ref().and_then(|g| g.failure().map(str::to_string));
    // A failed group's engine thread may be stuck in a hung rank: wait a little, then leave it
    // to the process exit. A healthy one always stops after `shutdown`.
    let joined = if wait_finished(&engine_thread, failure.is_some()).await {
        Some(tokio::task::spawn_blocking(move || engine_thread.join()).await)
    } else {
        None
    };
    http_stop.cancel();
    if let Some(t) = http_task {
        // The probe server ends with the token; its own errors do not change the outcome.
        let _ = t.await;
    }
    if let Some(reason) = failure {
        return Err(ServeError::GroupFailed(reason));
    }
    match joined {
        Some(Ok(Ok(()))) => {}
        _ => return Err(ServeError::Engine("the engine thread panicked".into())),
    }
    served.map_err(|e| ServeError::Engine(format!("server task: {e}")))??;
    Ok(())
}

/// How long in-flight requests may run once the drain has begun.
fn drain_limit(group: Option<&GroupHealth>, drain_timeout: Duration) -> Duration {
    match group.and_then(GroupHealth::failure) {
        Some(_) => GROUP_FAILURE_GRACE,
        None => drain_timeout,
    }
}

/// Waits until `thread` has finished: without limit, or at most [`GROUP_FAILURE_GRACE`] when
/// `bounded`; whether it finished.
async fn wait_finished(thread: &std::thread::JoinHandle<()>, bounded: bool) -> bool {
    let started = tokio::time::Instant::now();
    while !thread.is_finished() {
        if bounded && started.elapsed() >= GROUP_FAILURE_GRACE {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}
