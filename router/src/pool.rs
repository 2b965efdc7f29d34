//! The workers a router can send requests to, kept current from discovery.
//!
//! [`WorkerPool::spawn`] consumes [`MembershipEvent`]s; for every worker it knows it runs one
//! supervisor task that
//! 1. asks `GetInfo` and admits the worker only if its model and tokenizer hash equal the
//!    router's (DESIGN.md, decision 1) — a mismatch is logged, counted and never routed to;
//! 2. subscribes to its KV events (snapshot, then the stream) and feeds the shared [`Router`]'s
//!    exact index, taking the interleaved load reports as the worker's load;
//! 3. when the event stream fails, drops the worker from the exact index (the `kv` policy then
//!    uses the approximate view for it — logged and counted, never silent), checks the worker
//!    with `GetLoad`, and marks it unhealthy (not routable) while that fails too; then retries
//!    with backoff.
//!
//! Invariants: a worker is routable only while its supervisor has admitted it and its last
//! contact succeeded; a worker removed by discovery has its supervisor cancelled and its slot
//! removed from the index and the approximate view at once. Every task is owned by the pool's
//! tracker and stops with [`WorkerPool::shutdown`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tessera_proto::worker_v1 as pb;
use tessera_proto::worker_v1::worker_client::WorkerClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};

use crate::breaker::Breaker;
use crate::discovery::{DiscoveredWorker, MembershipEvent};
use crate::metrics::RouterMetrics;
use crate::routing::{BlockChange, Candidate, Decision, Router, WorkerSlot};

/// What the pool checks workers against.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The model id workers must serve.
    pub model_id: String,
    /// The router's tokenizer hash (hex SHA-256).
    pub tokenizer_sha256: String,
    /// Timeout of `GetInfo` / `GetLoad` and of connecting.
    pub rpc_timeout: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// HTTP/2 keep-alive ping interval on worker connections (a ping may go unanswered for half
    /// of it): a worker cut off by the network is noticed within twice this, its streams fail
    /// (and migrate) and it leaves routing.
    pub keepalive: Duration,
}

impl PoolConfig {
    /// Defaults for `model_id` and `tokenizer_sha256`.
    pub fn new(model_id: impl Into<String>, tokenizer_sha256: impl Into<String>) -> Self {
        PoolConfig {
            model_id: model_id.into(),
            tokenizer_sha256: tokenizer_sha256.into(),
            rpc_timeout: Duration::from_secs(2),
            max_backoff: Duration::from_secs(2),
            keepalive: Duration::from_secs(2),
        }
    }
}

/// Where a worker stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerState {
    /// Not yet reached.
    Connecting,
    /// Admitted and reachable; `exact` while its KV events stream.
    Ready {
        /// Whether the exact index covers it.
        exact: bool,
    },
    /// Admitted once, but its last contact failed.
    Unhealthy(String),
    /// Refused for good (model or tokenizer mismatch).
    Refused(String),
}

/// A routable worker, as handed to a request.
#[derive(Debug, Clone)]
pub struct RoutedWorker {
    /// Its slot.
    pub slot: WorkerSlot,
    /// A client on its shared connection.
    pub client: WorkerClient<Channel>,
    /// The address dialled.
    pub address: String,
    /// The routing decision.
    pub decision: Decision,
}

struct Entry {
    key: String,
    address: String,
    client: WorkerClient<Channel>,
    info: Option<pb::WorkerInfo>,
    state: WorkerState,
    load: pb::LoadReport,
    in_flight_tokens: u64,
    /// What requests experience here (the supervisor's `state` is reachability).
    breaker: Breaker,
    cancel: CancellationToken,
}

#[derive(Default)]
struct State {
    workers: HashMap<WorkerSlot, Entry>,
    by_key: HashMap<String, WorkerSlot>,
    next_slot: WorkerSlot,
}

struct Shared {
    config: PoolConfig,
    state: Mutex<State>,
    router: Mutex<Router>,
    metrics: Arc<RouterMetrics>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// Why no worker could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No worker is healthy (or none is known).
    #[error("no healthy worker for model {0}")]
    NoWorker(String),
}

/// The router's view of its workers (cheap to clone).
#[derive(Clone)]
pub struct WorkerPool {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl WorkerPool {
    /// Starts consuming `membership` (from a discovery source) with `router` deciding.
    pub fn spawn(
        config: PoolConfig,
        router: Router,
        metrics: Arc<RouterMetrics>,
        mut membership: mpsc::Receiver<MembershipEvent>,
    ) -> Self {
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(State::default()),
            router: Mutex::new(router),
            metrics,
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
        });
        let pool = WorkerPool { shared };
        let this = pool.clone();
        pool.shared.tracker.spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = this.shared.cancel.cancelled() => break,
                    e = membership.recv() => e,
                };
                match event {
                    Some(e) => this.apply_membership(e),
                    None => break,
                }
            }
        });
        pool
    }

    fn apply_membership(&self, event: MembershipEvent) {
        match event {
            MembershipEvent::Snapshot(all) => {
                let keep: std::collections::HashSet<String> = all.iter().map(|w| w.key.clone()).collect();
                let gone: Vec<String> =
                    lock(&self.shared.state).by_key.keys().filter(|k| !keep.contains(*k)).cloned().collect();
                for key in gone {
                    self.remove(&key);
                }
                for w in all {
                    self.upsert(w);
                }
            }
            MembershipEvent::Put(w) => self.upsert(*w),
            MembershipEvent::Delete { key } => self.remove(&key),
        }
    }

    fn upsert(&self, w: DiscoveredWorker) {
        let mut st = lock(&self.shared.state);
        if let Some(slot) = st.by_key.get(&w.key).copied() {
            if st.workers.get(&slot).is_some_and(|e| e.address == w.address) {
                return;
            }
            drop(st);
            self.remove(&w.key);
            st = lock(&self.shared.state);
        }
        let endpoint = match Endpoint::from_shared(format!("http://{}", w.address)) {
            Ok(e) => e
                .connect_timeout(self.shared.config.rpc_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(self.shared.config.keepalive)
                // Half the interval: a ping due at most one interval after the cut, unanswered
                // for half of one, leaves margin within twice the interval.
                .keep_alive_timeout(self.shared.config.keepalive / 2)
                .keep_alive_while_idle(true),
            Err(e) => {
                tracing::warn!("ignoring worker {} with a bad address {:?}: {e}", w.key, w.address);
                return;
            }
        };
        let client = WorkerClient::new(endpoint.connect_lazy());
        let slot = st.next_slot;
        st.next_slot += 1;
        let cancel = self.shared.cancel.child_token();
        st.by_key.insert(w.key.clone(), slot);
        st.workers.insert(
            slot,
            Entry {
                key: w.key.clone(),
                address: w.address.clone(),
                client: client.clone(),
                info: w.info,
                state: WorkerState::Connecting,
                load: pb::LoadReport::default(),
                in_flight_tokens: 0,
                breaker: Breaker::default(),
                cancel: cancel.clone(),
            },
        );
        drop(st);
        tracing::info!("worker {} at {} discovered", w.key, w.address);
        let this = self.clone();
        self.shared.tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = this.supervise(slot, client) => {}
            }
        });
        self.refresh_gauges();
    }

    fn remove(&self, key: &str) {
        let removed = {
            let mut st = lock(&self.shared.state);
            st.by_key.remove(key).and_then(|slot| st.workers.remove(&slot).map(|e| (slot, e)))
        };
        if let Some((slot, entry)) = removed {
            entry.cancel.cancel();
            lock(&self.shared.router).remove_worker(slot);
            tracing::info!("worker {key} at {} removed", entry.address);
        }
        self.refresh_gauges();
    }

    fn set_state(&self, slot: WorkerSlot, state: WorkerState) {
        let mut st = lock(&self.shared.state);
        if let Some(e) = st.workers.get_mut(&slot) {
            if e.state != state {
                tracing::info!("worker {} at {}: {state:?}", e.key, e.address);
            }
            e.state = state;
        }
        drop(st);
        self.refresh_gauges();
    }

    fn refresh_gauges(&self) {
        let st = lock(&self.shared.state);
        let healthy = st.workers.values().filter(|e| matches!(e.state, WorkerState::Ready { .. })).count();
        let exact = st.workers.values().filter(|e| e.state == WorkerState::Ready { exact: true }).count();
        self.shared.metrics.workers_known.set(st.workers.len() as i64);
        self.shared.metrics.workers_healthy.set(healthy as i64);
        self.shared.metrics.workers_exact.set(exact as i64);
        let open = st.workers.values().filter(|e| e.breaker.is_open()).count();
        self.shared.metrics.workers_circuit_open.set(open as i64);
    }

    /// One worker's lifetime: admit, stream events, fall back, retry.
    async fn supervise(&self, slot: WorkerSlot, mut client: WorkerClient<Channel>) {
        let cfg = &self.shared.config;
        let mut backoff = Duration::from_millis(100);
        let mut admitted = false;
        loop {
            if !admitted {
                match tokio::time::timeout(cfg.rpc_timeout, client.get_info(pb::GetInfoRequest {})).await {
                    Ok(Ok(info)) => {
                        let info = info.into_inner();
                        if let Err(why) = self.admit(&info) {
                            self.shared.metrics.workers_refused.inc();
                            self.set_state(slot, WorkerState::Refused(why));
                            return;
                        }
                        let blocks = info.kv_blocks as usize;
                        if let Some(e) = lock(&self.shared.state).workers.get_mut(&slot) {
                            e.info = Some(info);
                        }
                        lock(&self.shared.router).approx.add_worker(slot, blocks);
                        admitted = true;
                    }
                    Ok(Err(status)) => {
                        self.set_state(slot, WorkerState::Unhealthy(format!("GetInfo: {}", status.message())))
                    }
                    Err(_) => self.set_state(slot, WorkerState::Unhealthy("GetInfo timed out".into())),
                }
            }
            if admitted {
                let outcome = self.stream_events(slot, &mut client).await;
                // The stream ended: the exact view of this worker is no longer current, and it is
                // not routable until it answers again (a cut-off worker must not wait out the
                // load probe's timeout in routing).
                lock(&self.shared.router).index.remove_worker(slot);
                self.set_state(slot, WorkerState::Unhealthy(outcome.clone()));
                self.shared.metrics.kv_stream_fallbacks.inc();
                match tokio::time::timeout(cfg.rpc_timeout, client.get_load(pb::GetLoadRequest {})).await {
                    Ok(Ok(load)) => {
                        tracing::warn!(
                            "KV events of worker slot {slot} stopped ({outcome}); routing to it with the approximate prefix view"
                        );
                        self.record_load(slot, load.into_inner());
                        self.set_state(slot, WorkerState::Ready { exact: false });
                    }
                    _ => self.set_state(slot, WorkerState::Unhealthy(outcome)),
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(cfg.max_backoff);
        }
    }

    fn admit(&self, info: &pb::WorkerInfo) -> Result<(), String> {
        let cfg = &self.shared.config;
        if info.model_id != cfg.model_id {
            return Err(format!("serves model {:?}, this router serves {:?}", info.model_id, cfg.model_id));
        }
        if info.tokenizer_sha256 != cfg.tokenizer_sha256 {
            return Err(format!(
                "tokenizer sha256 {} differs from the router's {}",
                info.tokenizer_sha256, cfg.tokenizer_sha256
            ));
        }
        Ok(())
    }

    /// Follows the worker's KV events until the stream fails; returns why it ended.
    async fn stream_events(&self, slot: WorkerSlot, client: &mut WorkerClient<Channel>) -> String {
        let mut stream = match client.subscribe_kv_events(pb::SubscribeKvEventsRequest { from_seq: 0 }).await {
            Ok(s) => s.into_inner(),
            Err(status) => return format!("SubscribeKvEvents: {}", status.message()),
        };
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return "event stream closed".into(),
                Err(status) => return format!("event stream: {}", status.message()),
            };
            match msg.body {
                Some(pb::kv_events_message::Body::Snapshot(snap)) => {
                    lock(&self.shared.router).index.reset_worker(slot, snap.seq, snap.blocks.iter().map(|b| b.hash));
                    // A fresh connection to a live worker: past request failures no longer count.
                    if let Some(e) = lock(&self.shared.state).workers.get_mut(&slot) {
                        e.breaker.reset();
                    }
                    self.set_state(slot, WorkerState::Ready { exact: true });
                }
                Some(pb::kv_events_message::Body::Events(batch)) => {
                    let mut router = lock(&self.shared.router);
                    for ev in batch.events {
                        let change = match ev.kind {
                            Some(pb::kv_event::Kind::Stored(b)) => BlockChange::Stored(b.hash),
                            Some(pb::kv_event::Kind::Removed(b)) => BlockChange::Removed(b.hash),
                            Some(pb::kv_event::Kind::Cleared(_)) => BlockChange::Cleared,
                            None => return format!("event {} has no kind", ev.seq),
                        };
                        if let Err(gap) = router.index.apply(slot, ev.seq, change) {
                            return gap.to_string();
                        }
                    }
                }
                Some(pb::kv_events_message::Body::Load(load)) => self.record_load(slot, load),
                None => {}
            }
        }
    }

    fn record_load(&self, slot: WorkerSlot, load: pb::LoadReport) {
        if let Some(e) = lock(&self.shared.state).workers.get_mut(&slot) {
            e.load = load;
            // The report covers everything this router sent before it.
            e.in_flight_tokens = 0;
        }
    }

    /// Picks a worker for a prompt with chained block `hashes`, excluding `exclude` (workers that
    /// already failed this request), and charges the prompt to its in-flight load.
    pub fn route(
        &self,
        hashes: &[u64],
        block_size: usize,
        prompt_tokens: usize,
        exclude: &[WorkerSlot],
    ) -> Result<RoutedWorker, RouteError> {
        let now = Instant::now();
        let candidates: Vec<Candidate> = {
            let st = lock(&self.shared.state);
            st.workers
                .iter()
                .filter(|(slot, e)| {
                    matches!(e.state, WorkerState::Ready { .. }) && e.breaker.allows(now) && !exclude.contains(slot)
                })
                .map(|(slot, e)| Candidate {
                    slot: *slot,
                    running_tokens: e.load.running_tokens,
                    waiting_tokens: e.load.waiting_tokens,
                    in_flight_tokens: e.in_flight_tokens,
                })
                .collect()
        };
        let (decision, policy) = {
            let mut router = lock(&self.shared.router);
            let decision = router
                .choose(&candidates, hashes, block_size, prompt_tokens)
                .ok_or_else(|| RouteError::NoWorker(self.shared.config.model_id.clone()))?;
            (decision, router.policy())
        };
        let mut st = lock(&self.shared.state);
        let e = st
            .workers
            .get_mut(&decision.slot)
            .ok_or_else(|| RouteError::NoWorker(self.shared.config.model_id.clone()))?;
        e.in_flight_tokens += prompt_tokens as u64;
        e.breaker.routed(now);
        let m = &self.shared.metrics;
        let mode = if decision.exact { "exact" } else { "approximate" };
        let reason = if decision.matched_blocks > 0 { "prefix_hit" } else { "no_prefix" };
        m.routed.with_label_values(&[&policy.to_string(), mode, reason]).inc();
        m.routed_prompt_tokens.inc_by(prompt_tokens as u64);
        m.worker_requests.with_label_values(&[e.address.as_str()]).inc();
        m.predicted_cached_tokens.inc_by(((decision.matched_blocks * block_size).min(prompt_tokens)) as u64);
        Ok(RoutedWorker { slot: decision.slot, client: e.client.clone(), address: e.address.clone(), decision })
    }

    /// A request failed on this worker: its circuit breaker opens (see [`Breaker`]).
    pub fn report_failure(&self, slot: WorkerSlot, why: &str) {
        let mut st = lock(&self.shared.state);
        let Some(e) = st.workers.get_mut(&slot) else { return };
        if e.breaker.failed(Instant::now()) {
            self.shared.metrics.breaker_trips.inc();
            tracing::warn!("worker {} at {}: circuit opened after a failed request: {why}", e.key, e.address);
        }
        drop(st);
        self.refresh_gauges();
    }

    /// A request completed on this worker: its circuit breaker closes.
    pub fn report_success(&self, slot: WorkerSlot) {
        let mut st = lock(&self.shared.state);
        let Some(e) = st.workers.get_mut(&slot) else { return };
        if e.breaker.is_open() {
            e.breaker.reset();
            tracing::info!("worker {} at {}: circuit closed", e.key, e.address);
            drop(st);
            self.refresh_gauges();
        }
    }

    /// Number of routable workers.
    pub fn healthy(&self) -> usize {
        lock(&self.shared.state).workers.values().filter(|e| matches!(e.state, WorkerState::Ready { .. })).count()
    }

    /// Blocks the exact index holds per worker address (to compare router replicas).
    pub fn index_by_address(&self) -> std::collections::BTreeMap<String, std::collections::BTreeSet<u64>> {
        let st = lock(&self.shared.state);
        let router = lock(&self.shared.router);
        st.workers
            .iter()
            .filter_map(|(slot, e)| {
                router.index.blocks_of(*slot).map(|b| (e.address.clone(), b.iter().copied().collect()))
            })
            .collect()
    }

    /// Stops every supervisor and the membership task, and waits for them.
    pub async fn shutdown(&self) {
        self.shared.cancel.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }
}
