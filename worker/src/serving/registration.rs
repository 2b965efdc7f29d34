//! Registration in etcd (DESIGN.md, decisions 6 and 8): while the worker serves, its key
//! `/tessera/v1/workers/{model}/{worker_id}` holds its encoded `WorkerInfo` under a lease that a
//! keep-alive renews every TTL/3; routers watch the prefix.
//!
//! Invariants:
//! - One task owns the registration; [`Registration`] holds its cancellation token and join
//!   handle. Nothing else talks to etcd on the worker's behalf.
//! - The key is only ever written under a lease this task holds, so a worker that dies
//!   (`kill -9`, lost host) disappears within one TTL without anyone cleaning up.
//! - Any failure (no endpoint reachable, an RPC error or timeout, the keep-alive stream ending,
//!   the lease reported gone) ends the session: the worker counts as unregistered, and after a
//!   back-off (200 ms doubling to 3 s, reset by a successful registration) it grants a new lease
//!   and puts the key again, so it comes back on its own after an etcd outage.
//! - Cancellation (the start of the drain) stops the keep-alive at once and deletes the key and
//!   revokes the lease, best effort and bounded by [`DEREGISTER_TIMEOUT`]; afterwards the task
//!   never registers again.
//! - The state is visible as `tessera_worker_registered` (gauge) and
//!   `tessera_worker_registrations_total` (counter); transitions are logged on stderr.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tessera_proto::etcd_client::{
    Backoff, CONNECT_TIMEOUT, EndpointError, connect_first, endpoint, error_chain as causes,
};
use tessera_proto::etcd_v3 as etcd;
use tessera_proto::etcd_v3::kv_client::KvClient;
use tessera_proto::etcd_v3::lease_client::LeaseClient;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::serving::metrics::WorkerMetrics;

/// The shortest lease TTL accepted (etcd's own minimum with default timings is 1.5 s).
pub const MIN_TTL: Duration = Duration::from_secs(2);
/// How long deregistration (delete the key, revoke the lease) may take at shutdown.
pub const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);
/// Limit on each unary etcd call and on each TCP connect.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);

/// How the worker registers (part of `ServeConfig`).
#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    /// etcd client URLs (`http://host:2379`), tried in order.
    pub endpoints: Vec<String>,
    /// Lease time to live (whole seconds; at least [`MIN_TTL`]).
    pub ttl: Duration,
    /// `host:port` routers dial; `None`: the bound gRPC address (refused when unspecified).
    pub advertise: Option<String>,
}

/// A registration setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationConfigError {
    /// No etcd endpoint.
    #[error("no etcd endpoint given")]
    NoEndpoints,
    /// An endpoint that is not a plain `http://host:port` URL.
    #[error("etcd endpoint {endpoint:?}: {reason}")]
    BadEndpoint {
        /// As given.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// A lease TTL below [`MIN_TTL`].
    #[error("lease TTL {0:?} is below the minimum of 2s")]
    TtlTooShort(Duration),
    /// An advertise address that is not `host:port`.
    #[error("advertise address {0:?}: expected HOST:PORT with a host routers can dial")]
    BadAdvertise(String),
    /// No advertise address, and the listener's own address cannot be dialled.
    #[error(
        "the gRPC address {0} is not one routers can dial: give the address to advertise in etcd (--advertise HOST:PORT)"
    )]
    UnspecifiedListen(SocketAddr),
    /// A worker id that cannot be one path segment of a key.
    #[error("worker id {0:?}: must be non-empty and contain no '/'")]
    BadWorkerId(String),
}

impl RegistrationConfig {
    /// Checks everything that does not need the bound port; `listen` is the configured gRPC
    /// address. Called at start-up, before the model loads.
    pub fn validate(&self, listen: SocketAddr) -> Result<(), RegistrationConfigError> {
        if self.endpoints.is_empty() {
            return Err(RegistrationConfigError::NoEndpoints);
        }
        for e in &self.endpoints {
            endpoint(e)?;
        }
        if self.ttl < MIN_TTL {
            return Err(RegistrationConfigError::TtlTooShort(self.ttl));
        }
        self.advertise_address(listen).map(drop)
    }

    /// The address to register, given the bound gRPC address.
    pub fn advertise_address(&self, bound: SocketAddr) -> Result<String, RegistrationConfigError> {
        match &self.advertise {
            Some(a) => {
                let bad = || RegistrationConfigError::BadAdvertise(a.clone());
                let (host, port) = a.rsplit_once(':').ok_or_else(bad)?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let unspecified = host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified());
                if host.is_empty() || unspecified || port.parse::<u16>().map_or(true, |p| p == 0) {
                    return Err(bad());
                }
                Ok(a.clone())
            }
            None if bound.ip().is_unspecified() => Err(RegistrationConfigError::UnspecifiedListen(bound)),
            None => Ok(bound.to_string()),
        }
    }
}

/// Checks that `worker_id` can be the last segment of a key.
pub fn validate_worker_id(worker_id: &str) -> Result<(), RegistrationConfigError> {
    if worker_id.is_empty() || worker_id.contains('/') {
        return Err(RegistrationConfigError::BadWorkerId(worker_id.to_string()));
    }
    Ok(())
}

impl From<EndpointError> for RegistrationConfigError {
    fn from(e: EndpointError) -> Self {
        match e {
            EndpointError::None => RegistrationConfigError::NoEndpoints,
            EndpointError::Bad { endpoint, reason } => RegistrationConfigError::BadEndpoint { endpoint, reason },
        }
    }
}

/// Why a registration session ended (logged, then retried; never leaves this module).
#[derive(Debug, thiserror::Error)]
enum EtcdError {
    #[error("no etcd endpoint reachable (last: {endpoint}: {})", causes(.source))]
    Connect { endpoint: String, source: tonic::transport::Error },
    #[error("etcd {op}: {source}")]
    Rpc { op: &'static str, source: tonic::Status },
    #[error("etcd {op}: no answer within {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("etcd refused the lease: {0}")]
    Grant(String),
    #[error("lease {0:x} is gone (expired or revoked)")]
    LeaseLost(i64),
    #[error("the lease keep-alive stream ended")]
    KeepAliveEnded,
}

/// What one registration puts in etcd.
#[derive(Debug, Clone)]
pub struct RegistrationSpec {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// The key (`registry::worker_key`).
    pub key: String,
    /// The encoded `WorkerInfo`.
    pub value: Vec<u8>,
    /// Requested lease TTL.
    pub ttl: Duration,
}

/// The running registration task.
pub struct Registration {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Registration {
    /// Starts registering `spec` (returns at once; the first registration happens in the task).
    /// Cancelling `stop` (the drain signal holds a clone) deregisters and ends the task.
    /// Endpoints must have passed [`RegistrationConfig::validate`]; one that does not parse is
    /// skipped like an unreachable one.
    pub fn spawn(spec: RegistrationSpec, metrics: Arc<WorkerMetrics>, stop: CancellationToken) -> Self {
        let task = tokio::spawn(run(spec, metrics, stop.clone()));
        Registration { stop, task }
    }

    /// Deregisters (if not already begun) and waits for the task to end: at most about
    /// [`DEREGISTER_TIMEOUT`] after cancellation.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::error!("the etcd registration task failed: {e}");
        }
    }
}

/// The connection and lease of the current (or last) session, kept across a cancelled session
/// so deregistration can reuse them.
#[derive(Default)]
struct Session {
    channel: Option<Channel>,
    lease: Option<i64>,
    /// The key is in etcd under `lease` (as far as this task knows).
    registered: bool,
}

async fn run(spec: RegistrationSpec, metrics: Arc<WorkerMetrics>, stop: CancellationToken) {
    let mut session = Session::default();
    let mut backoff = Backoff::new();
    let mut failures: u64 = 0;
    loop {
        let error = tokio::select! {
            e = register_and_keep_alive(&spec, &metrics, &mut session, &mut backoff) => e,
            () = stop.cancelled() => break,
        };
        let delay = backoff.next_delay();
        if std::mem::take(&mut session.registered) {
            metrics.set_registered(false);
            failures = 0;
            tracing::warn!("etcd registration of {} lost: {error}; re-registering", spec.key);
        } else {
            failures += 1;
            // Logged on the 1st, 2nd, 4th, 8th … failure in a row: an outage stays visible
            // without a line every few seconds.
            if failures.is_power_of_two() {
                tracing::warn!("etcd registration of {} failed: {error}; retrying in {delay:?}", spec.key);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => break,
        }
    }
    deregister(&spec, &metrics, session).await;
}

/// Connects, grants a lease, puts the key and keeps the lease alive until something fails;
/// returns why (it never ends otherwise).
async fn register_and_keep_alive(
    spec: &RegistrationSpec,
    metrics: &WorkerMetrics,
    session: &mut Session,
    backoff: &mut Backoff,
) -> EtcdError {
    let (channel, endpoint) = match connect(&spec.endpoints).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    session.channel = Some(channel.clone());
    let mut leases = LeaseClient::new(channel.clone());
    let ttl_secs = spec.ttl.as_secs_f64().ceil() as i64;
    let grant = match call("lease grant", leases.lease_grant(etcd::LeaseGrantRequest { ttl: ttl_secs, id: 0 })).await {
        Ok(g) => g,
        Err(e) => return e,
    };
    if !grant.error.is_empty() {
        return EtcdError::Grant(grant.error);
    }
    session.lease = Some(grant.id);
    let put = etcd::PutRequest {
        key: spec.key.clone().into_bytes(),
        value: spec.value.clone(),
        lease: grant.id,
        prev_kv: false,
    };
    if let Err(e) = call("put", KvClient::new(channel).put(put)).await {
        return e;
    }
    session.registered = true;
    metrics.set_registered(true);
    metrics.registration_succeeded();
    backoff.reset();
    tracing::info!("registered in etcd at {endpoint} as {} (lease {:x}, TTL {}s)", spec.key, grant.id, grant.ttl);
    keep_alive(&mut leases, grant.id, Duration::from_secs(grant.ttl.max(1) as u64)).await
}

/// Renews `lease` every `ttl / 3` over one keep-alive stream; returns when the stream fails, a
/// renewal is not answered within two intervals (by then the lease is about to expire), or etcd
/// reports the lease gone.
async fn keep_alive(leases: &mut LeaseClient<Channel>, lease: i64, ttl: Duration) -> EtcdError {
    let interval = ttl / 3;
    let answer_within = interval * 2;
    // The first request is queued before the call: the call returns only once etcd answers.
    let (tx, rx) = mpsc::channel(1);
    if tx.send(etcd::LeaseKeepAliveRequest { id: lease }).await.is_err() {
        return EtcdError::KeepAliveEnded;
    }
    let mut responses = match tokio::time::timeout(RPC_TIMEOUT, leases.lease_keep_alive(ReceiverStream::new(rx))).await
    {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(source)) => return EtcdError::Rpc { op: "lease keep-alive", source },
        Err(_) => return EtcdError::Timeout { op: "lease keep-alive", after: RPC_TIMEOUT },
    };
    loop {
        match tokio::time::timeout(answer_within, responses.message()).await {
            Err(_) => return EtcdError::Timeout { op: "lease keep-alive", after: answer_within },
            Ok(Err(source)) => return EtcdError::Rpc { op: "lease keep-alive", source },
            Ok(Ok(None)) => return EtcdError::KeepAliveEnded,
            Ok(Ok(Some(r))) if r.ttl <= 0 => return EtcdError::LeaseLost(lease),
            Ok(Ok(Some(_))) => {}
        }
        tokio::time::sleep(interval).await;
        if tx.send(etcd::LeaseKeepAliveRequest { id: lease }).await.is_err() {
            return EtcdError::KeepAliveEnded;
        }
    }
}

/// Deletes the key and revokes the lease, once, within [`DEREGISTER_TIMEOUT`]. Skipped when
/// no session ever reached etcd (then this worker wrote nothing).
async fn deregister(spec: &RegistrationSpec, metrics: &WorkerMetrics, session: Session) {
    let was_registered = session.registered;
    metrics.set_registered(false);
    let Some(channel) = session.channel else { return };
    let work = async {
        // The session's connection first; a fresh one if it has gone bad (etcd restarted).
        match remove(channel, &spec.key, session.lease).await {
            Ok(()) => Ok(()),
            Err(_) => remove(connect(&spec.endpoints).await?.0, &spec.key, session.lease).await,
        }
    };
    match tokio::time::timeout(DEREGISTER_TIMEOUT, work).await {
        Ok(Ok(())) => tracing::info!("deregistered {} from etcd", spec.key),
        Ok(Err(e)) => tracing::warn!("deregistering {} failed: {e}", spec.key),
        Err(_) if was_registered => tracing::warn!(
            "deregistering {} timed out after {DEREGISTER_TIMEOUT:?}; it expires with its lease",
            spec.key
        ),
        Err(_) => {}
    }
}

async fn remove(channel: Channel, key: &str, lease: Option<i64>) -> Result<(), EtcdError> {
    let delete = etcd::DeleteRangeRequest { key: key.as_bytes().to_vec(), ..Default::default() };
    call("delete", KvClient::new(channel.clone()).delete_range(delete)).await?;
    if let Some(id) = lease {
        match call("lease revoke", LeaseClient::new(channel).lease_revoke(etcd::LeaseRevokeRequest { id })).await {
            // Already expired or revoked: nothing left to do.
            Err(EtcdError::Rpc { source, .. }) if source.code() == tonic::Code::NotFound => {}
            other => other.map(drop)?,
        }
    }
    Ok(())
}

/// The first endpoint that accepts a connection, with its URL (bad URLs were refused at
/// start-up by [`RegistrationConfig::validate`]).
async fn connect(endpoints: &[String]) -> Result<(Channel, String), EtcdError> {
    connect_first(endpoints, |_| {}).await.map_err(|last| match last {
        Some((endpoint, source)) => EtcdError::Connect { endpoint, source },
        None => EtcdError::Timeout { op: "connect", after: CONNECT_TIMEOUT },
    })
}

/// One unary call with [`RPC_TIMEOUT`].
async fn call<T>(
    op: &'static str,
    f: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(RPC_TIMEOUT, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(source)) => Err(EtcdError::Rpc { op, source }),
        Err(_) => Err(EtcdError::Timeout { op, after: RPC_TIMEOUT }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(advertise: Option<&str>) -> RegistrationConfig {
        RegistrationConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            ttl: Duration::from_secs(10),
            advertise: advertise.map(str::to_string),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn the_bound_address_is_advertised_unless_it_is_unspecified() {
        let c = config(None);
        assert_eq!(c.advertise_address(addr("127.0.0.1:5000")).ok(), Some("127.0.0.1:5000".into()));
        for wildcard in ["0.0.0.0:5000", "[::]:5000"] {
            let e = c.advertise_address(addr(wildcard)).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("--advertise"), "{e}");
        }
        let c = config(Some("worker-0.workers:50051"));
        assert_eq!(c.advertise_address(addr("0.0.0.0:50051")).ok(), Some("worker-0.workers:50051".into()));
        assert!(config(Some("[::1]:7")).advertise_address(addr("[::]:1")).is_ok());
    }

    #[test]
    fn bad_settings_are_refused_before_start() {
        let listen = addr("127.0.0.1:0");
        assert!(config(None).validate(listen).is_ok());
        for bad in ["no-port", "host:0", "host:99999", ":5", "0.0.0.0:5", "[::]:5"] {
            assert!(
                matches!(config(Some(bad)).validate(listen), Err(RegistrationConfigError::BadAdvertise(_))),
                "{bad}"
            );
        }
        let mut c = config(None);
        c.ttl = Duration::from_millis(1500);
        assert!(matches!(c.validate(listen), Err(RegistrationConfigError::TtlTooShort(_))));
        c = config(None);
        c.endpoints = vec![];
        assert!(matches!(c.validate(listen), Err(RegistrationConfigError::NoEndpoints)));
        for bad in ["https://etcd:2379", "127.0.0.1:2379", "http://"] {
            c.endpoints = vec![bad.into()];
            assert!(matches!(c.validate(listen), Err(RegistrationConfigError::BadEndpoint { .. })), "{bad}");
        }
        assert!(validate_worker_id("w-1").is_ok());
        assert!(validate_worker_id("").is_err() && validate_worker_id("a/b").is_err());
    }

    #[tokio::test]
    async fn an_unreachable_etcd_never_counts_as_registered_and_shutdown_is_prompt() {
        let metrics = Arc::new(WorkerMetrics::new(vec![]).unwrap_or_else(|e| panic!("{e}")));
        // Port 1 on loopback refuses connections at once.
        let spec = RegistrationSpec {
            endpoints: vec!["http://127.0.0.1:1".into()],
            key: "/k".into(),
            value: vec![],
            ttl: Duration::from_secs(2),
        };
        let r = Registration::spawn(spec, metrics.clone(), CancellationToken::new());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(metrics.encode().contains("tessera_worker_registered 0"));
        let started = tokio::time::Instant::now();
        r.shutdown().await;
        assert!(started.elapsed() <= DEREGISTER_TIMEOUT);
        assert!(metrics.encode().contains("tessera_worker_registrations_total 0"));
    }
}
