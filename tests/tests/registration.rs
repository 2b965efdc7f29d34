//! Worker registration in a real etcd, black-box (DESIGN.md, decisions 6 and 8): `tessera worker
//! --etcd` puts its `WorkerInfo` under a lease, drops it first thing on SIGTERM, loses it within
//! the TTL when killed, and registers again after an etcd outage; the router's
//! `discovery::etcd::watch_workers` sees every one of these changes, re-listing after the outage.
//!
//! Keys are read with our own generated etcd client (`tessera_proto::etcd_v3`). Each test runs
//! its own etcd and worker on free loopback ports.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use prost::Message;
use tessera_proto::etcd_v3 as etcd;
use tessera_proto::registry::worker_key;
use tessera_proto::worker_v1 as pb;
use tessera_proto::worker_v1::worker_client::WorkerClient;
use tessera_router::discovery::etcd::watch_workers;
use tessera_router::discovery::{DiscoveredWorker, MembershipEvent};
use tessera_tests::{EtcdProcess, WorkerProcess, tessera};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

/// The model the worker serves by default (the tests' small model, as in `worker_grpc.rs`).
const MODEL: &str = "smollm2-135m-instruct";

/// The key-value stored under `key`, if any.
async fn get(endpoint: &str, key: &str) -> Option<etcd::KeyValue> {
    let mut kv = etcd::kv_client::KvClient::connect(endpoint.to_string()).await.unwrap();
    let r = kv.range(etcd::RangeRequest { key: key.as_bytes().to_vec(), ..Default::default() }).await.unwrap();
    r.into_inner().kvs.into_iter().next()
}

/// Polls `check` every 20 ms until it yields a value; fails after `timeout`.
async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `key` exists (and `accept` likes it).
async fn key_present(
    etcd: &EtcdProcess,
    key: &str,
    timeout: Duration,
    accept: impl Fn(&etcd::KeyValue) -> bool,
) -> etcd::KeyValue {
    let endpoint = etcd.endpoint();
    eventually(&format!("{key} is registered"), timeout, || async { get(&endpoint, key).await.filter(&accept) }).await
}

/// Waits until `key` is gone; returns when that was seen.
async fn key_gone(etcd: &EtcdProcess, key: &str, timeout: Duration) -> Instant {
    let endpoint = etcd.endpoint();
    eventually(&format!("{key} is gone"), timeout, || async { get(&endpoint, key).await.is_none().then(Instant::now) })
        .await
}

/// A metric line's value on the worker's `/metrics`.
fn metric(w: &WorkerProcess, name: &str) -> Option<f64> {
    let (_, text) = w.http_get("/metrics");
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn metric_becomes(w: &WorkerProcess, name: &str, ok: impl Fn(f64) -> bool) {
    eventually(&format!("{name} is as expected"), Duration::from_secs(10), || async {
        metric(w, name).filter(|v| ok(*v))
    })
    .await;
}

/// The router's view, built from `watch_workers` exactly as a consumer would.
struct Watcher {
    events: mpsc::Receiver<MembershipEvent>,
    view: HashMap<String, DiscoveredWorker>,
    snapshots: usize,
    deletes: Vec<String>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    fn start(etcd: &EtcdProcess) -> Self {
        let (tx, events) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(watch_workers(vec![etcd.endpoint()], MODEL.into(), tx, cancel.clone()));
        Watcher { events, view: HashMap::new(), snapshots: 0, deletes: Vec::new(), cancel, task }
    }

    fn apply(&mut self, event: MembershipEvent) {
        match event {
            MembershipEvent::Snapshot(workers) => {
                self.snapshots += 1;
                self.view = workers.into_iter().map(|w| (w.key.clone(), w)).collect();
            }
            MembershipEvent::Put(w) => {
                self.view.insert(w.key.clone(), *w);
            }
            MembershipEvent::Delete { key } => {
                self.view.remove(&key);
                self.deletes.push(key);
            }
        }
    }

    /// Applies events until `done` holds (checked before each wait too).
    async fn until(&mut self, what: &str, timeout: Duration, done: impl Fn(&Watcher) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(self) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) => self.apply(e),
                Ok(None) => panic!("the watch ended while waiting until {what}"),
                Err(_) => panic!("timed out after {timeout:?} waiting until {what}; view {:?}", self.view.keys()),
            }
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task).await.unwrap().unwrap();
    }
}

/// A deterministic prompt of ordinary token ids.
fn prompt(len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| 200 + (7919 + i * 104_729) % 20_000).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_worker_is_dialable_and_leaves_discovery_first_thing_on_sigterm() {
    let Some(etcd) = EtcdProcess::start() else { return };
    let mut watch = Watcher::start(&etcd);
    watch.until("the first snapshot", Duration::from_secs(10), |w| w.snapshots == 1).await;
    assert!(watch.view.is_empty());

    // An unreachable endpoint first: the next one is tried.
    let endpoints = format!("http://127.0.0.1:1,{}", etcd.endpoint());
    let mut w = WorkerProcess::start(&["--etcd", &endpoints, "--worker-id", "w-drain", "--drain-timeout", "60s"]);
    let key = worker_key(MODEL, "w-drain");
    let kv = key_present(&etcd, &key, Duration::from_secs(10), |_| true).await;
    assert_ne!(kv.lease, 0, "the key must live under a lease");
    let registered = pb::WorkerInfo::decode(kv.value.as_slice()).unwrap();
    assert_eq!(registered.address, w.grpc_url.trim_start_matches("http://"));

    // The registered address is dialable, and says what the worker itself says.
    let mut c = WorkerClient::connect(format!("http://{}", registered.address)).await.unwrap();
    let info = c.get_info(pb::GetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info, registered);
    assert_eq!((info.model_id.as_str(), info.worker_id.as_str()), (MODEL, "w-drain"));
    assert_eq!(info.tokenizer_sha256.len(), 64);
    metric_becomes(&w, "tessera_worker_registered", |v| v == 1.0).await;
    metric_becomes(&w, "tessera_worker_registrations_total", |v| v >= 1.0).await;
    // Ready means loaded and registered.
    assert_eq!(w.http_get("/readyz").0, 200);

    watch.until("the router sees the worker", Duration::from_secs(10), |v| v.view.contains_key(&key)).await;
    let seen = &watch.view[&key];
    assert_eq!((seen.address.as_str(), seen.info.as_ref()), (registered.address.as_str(), Some(&registered)));

    // A long stream is in flight when SIGTERM arrives.
    let request = pb::GenerateRequest {
        prompt: prompt(10),
        max_tokens: 200,
        sampling: Some(pb::SamplingParams { temperature: 0.0, ..Default::default() }),
        ignore_eos: true,
        ..Default::default()
    };
    let mut stream = c.generate(request).await.unwrap().into_inner();
    let first = stream.next().await.unwrap().unwrap().tokens.len();
    let signalled = Instant::now();
    w.terminate();
    let rest = tokio::spawn(async move {
        let (mut tokens, mut finish) = (first, None);
        while let Some(msg) = stream.next().await {
            let msg = msg.unwrap();
            tokens += msg.tokens.len();
            if msg.finish_reason != 0 {
                finish = Some(msg.finish_reason());
            }
        }
        (tokens, finish, Instant::now())
    });

    // The key goes at once (the TTL is 10 s), before the stream ends.
    let gone = key_gone(&etcd, &key, Duration::from_secs(5)).await;
    assert!(gone - signalled < Duration::from_secs(2), "deregistered after {:?}", gone - signalled);
    let (tokens, finish, finished) = rest.await.unwrap();
    assert!(gone < finished, "the key must be gone while the in-flight stream still runs");
    assert_eq!((tokens, finish), (200, Some(pb::FinishReason::Length)));
    watch.until("the router sees the worker leave", Duration::from_secs(5), |v| v.deletes.contains(&key)).await;
    assert!(watch.view.is_empty());
    let status = w.wait_exit(Duration::from_secs(30)).expect("the worker should exit after draining");
    assert!(status.success(), "exit status {status:?}");
    watch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_leaves_discovery_when_its_lease_expires() {
    let Some(etcd) = EtcdProcess::start() else { return };
    let mut watch = Watcher::start(&etcd);
    let mut w = WorkerProcess::start(&["--etcd", &etcd.endpoint(), "--worker-id", "w-kill", "--lease-ttl", "2s"]);
    let key = worker_key(MODEL, "w-kill");
    key_present(&etcd, &key, Duration::from_secs(10), |_| true).await;
    watch.until("the router sees the worker", Duration::from_secs(10), |v| v.view.contains_key(&key)).await;

    // kill -9: no drain, nobody deletes the key; the lease runs out.
    w.kill_hard();
    let killed = Instant::now();
    let gone = key_gone(&etcd, &key, Duration::from_secs(10)).await;
    let ttl = Duration::from_secs(2);
    assert!(gone - killed <= ttl + Duration::from_secs(1), "gone {:?} after kill -9 (TTL {ttl:?})", gone - killed);
    watch.until("the router sees the worker leave", Duration::from_secs(5), |v| v.deletes.contains(&key)).await;
    assert!(watch.view.is_empty());
    watch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_etcd_outage_the_worker_registers_again_and_the_router_re_lists() {
    let Some(mut etcd) = EtcdProcess::start() else { return };
    let mut watch = Watcher::start(&etcd);
    let w = WorkerProcess::start(&["--etcd", &etcd.endpoint(), "--worker-id", "w-outage", "--lease-ttl", "2s"]);
    let key = worker_key(MODEL, "w-outage");
    let before = key_present(&etcd, &key, Duration::from_secs(10), |_| true).await;
    watch.until("the router sees the worker", Duration::from_secs(10), |v| v.view.contains_key(&key)).await;
    let snapshots = watch.snapshots;

    etcd.stop();
    metric_becomes(&w, "tessera_worker_registered", |v| v == 0.0).await;
    // Out of discovery means not ready.
    assert_eq!(w.http_get("/readyz").0, 503);
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.restart();

    // etcd kept the old key and lease on disk; the worker puts its key under a new lease.
    let after = key_present(&etcd, &key, Duration::from_secs(10), |kv| kv.lease != before.lease && kv.lease != 0).await;
    assert!(after.mod_revision > before.mod_revision);
    assert_eq!(after.value, before.value);
    metric_becomes(&w, "tessera_worker_registered", |v| v == 1.0).await;
    metric_becomes(&w, "tessera_worker_registrations_total", |v| v >= 2.0).await;
    assert_eq!(w.http_get("/readyz").0, 200);
    // …and keeps it alive: still there after the old lease has had time to expire.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = get(&etcd.endpoint(), &key).await.expect("the re-registered key must stay");
    assert_ne!(later.lease, before.lease);

    // The router lost its watch with etcd, so it listed again: a fresh snapshot that has the
    // worker (and events after it keep it).
    watch
        .until("the router re-lists after the outage", Duration::from_secs(10), |v| {
            v.snapshots > snapshots && v.view.contains_key(&key)
        })
        .await;
    watch.stop().await;
}

#[test]
fn registration_settings_that_cannot_work_fail_at_start_up() {
    // Checked before the model loads: one error line naming the fix, exit status 1.
    for (args, mention) in [
        (&["--etcd", "http://127.0.0.1:1", "--listen", "0.0.0.0:0"][..], "--advertise HOST:PORT"),
        (&["--etcd", "http://127.0.0.1:1", "--listen", "[::]:0"][..], "--advertise HOST:PORT"),
        (&["--etcd", "http://127.0.0.1:1", "--advertise", "0.0.0.0:80"][..], "advertise address"),
        (&["--etcd", "https://127.0.0.1:1"][..], "TLS is not supported"),
        (&["--etcd", "http://127.0.0.1:1", "--worker-id", "a/b"][..], "worker id"),
    ] {
        let out = tessera(&[&["worker"][..], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: ") && stderr.trim().lines().count() == 1, "{args:?}: {stderr}");
        assert!(stderr.contains(mention), "{args:?}: {stderr:?} should mention {mention:?}");
    }
    let out = tessera(&["worker", "--lease-ttl", "1500ms"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("below the minimum of 2s"));
}
