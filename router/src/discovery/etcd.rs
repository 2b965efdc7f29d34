//! Discovery from etcd: list `/tessera/v1/workers/{model}/`, then watch it from the revision
//! after the list, so no change between the two is missed (DESIGN.md, decision 8).
//!
//! Invariants (on top of the module-level ones in `discovery`):
//! - Every list sends a [`MembershipEvent::Snapshot`] taken at one store revision `R`, and the
//!   watch that follows starts at `R + 1`: the consumer sees every change exactly once, in order.
//! - Continuity is never assumed across a break. When the watch is compacted away or cancelled,
//!   the stream ends or fails, or etcd is unreachable, the source backs off (200 ms doubling to
//!   3 s, reset once a watch is established) and lists again: a fresh `Snapshot`, a new watch.
//! - A key directly under the prefix is a worker; anything else is ignored. A value that does not
//!   decode as `WorkerInfo`, or names no address, is logged and skipped, never a panic: in a
//!   snapshot it is left out, as a live change it is sent as a `Delete` (the key no longer names
//!   a usable worker; deleting an unknown key is a no-op for the consumer).
//! - [`watch_workers`] returns only when cancelled or when the consumer has gone (the sink is
//!   closed); it owns no task, so its caller's join point is the future itself.

use std::time::Duration;

use prost::Message as _;
use tessera_proto::etcd_client::{Backoff, CONNECT_TIMEOUT, connect_first, error_chain as causes};
pub use tessera_proto::etcd_client::{EndpointError, validate_endpoints};
use tessera_proto::etcd_v3 as etcd;
use tessera_proto::etcd_v3::kv_client::KvClient;
use tessera_proto::etcd_v3::watch_client::WatchClient;
use tessera_proto::registry::{prefix_range_end, worker_id_in, worker_prefix};
use tessera_proto::worker_v1::WorkerInfo;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::discovery::{DiscoveredWorker, MembershipEvent};

const RANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why one list-and-watch round ended.
#[derive(Debug, thiserror::Error)]
enum RoundEnd {
    #[error("the consumer has gone")]
    SinkClosed,
    #[error("no etcd endpoint reachable (last: {endpoint}: {})", causes(.source))]
    Connect { endpoint: String, source: tonic::transport::Error },
    #[error("etcd {op}: {source}")]
    Rpc { op: &'static str, source: tonic::Status },
    #[error("etcd {op}: no answer within {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("etcd answered without a response header")]
    NoHeader,
    #[error("the watch start revision was compacted (oldest kept: {0})")]
    Compacted(i64),
    #[error("etcd cancelled the watch: {0:?}")]
    Canceled(String),
    #[error("the watch stream ended")]
    Ended,
}

/// Why a key-value is not a usable worker.
#[derive(Debug, thiserror::Error, PartialEq)]
enum Skip {
    #[error("not a worker key under the prefix")]
    NotAWorkerKey,
    #[error("value is not a WorkerInfo: {0}")]
    Malformed(prost::DecodeError),
    #[error("WorkerInfo names no address")]
    NoAddress,
}

/// Watches the workers of `model` in etcd and sends their membership to `sink` (see the module
/// invariants) until `cancel` fires or `sink` is closed.
pub async fn watch_workers(
    endpoints: Vec<String>,
    model: String,
    sink: mpsc::Sender<MembershipEvent>,
    cancel: CancellationToken,
) {
    let prefix = worker_prefix(&model);
    let mut backoff = Backoff::new();
    let mut failures: u64 = 0;
    loop {
        let end = tokio::select! {
            end = list_and_watch(&endpoints, &prefix, &sink, &mut backoff, &mut failures) => end,
            () = cancel.cancelled() => return,
            () = sink.closed() => return,
        };
        if matches!(end, RoundEnd::SinkClosed) {
            return;
        }
        let delay = backoff.next_delay();
        failures += 1;
        // The 1st, 2nd, 4th … failure in a row: an outage stays visible without flooding.
        if failures.is_power_of_two() {
            tracing::warn!("etcd discovery of {prefix}: {end}; listing again in {delay:?}");
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return,
            () = sink.closed() => return,
        }
    }
}

/// One round: connect, list (→ `Snapshot`), watch from the next revision (→ `Put`/`Delete`)
/// until something breaks; returns why.
async fn list_and_watch(
    endpoints: &[String],
    prefix: &str,
    sink: &mpsc::Sender<MembershipEvent>,
    backoff: &mut Backoff,
    failures: &mut u64,
) -> RoundEnd {
    let (channel, url) = match connect(endpoints).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let range_end = prefix_range_end(prefix.as_bytes());
    let list =
        etcd::RangeRequest { key: prefix.as_bytes().to_vec(), range_end: range_end.clone(), ..Default::default() };
    let listed = match tokio::time::timeout(RANGE_TIMEOUT, KvClient::new(channel.clone()).range(list)).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(source)) => return RoundEnd::Rpc { op: "range", source },
        Err(_) => return RoundEnd::Timeout { op: "range", after: RANGE_TIMEOUT },
    };
    let Some(revision) = listed.header.map(|h| h.revision) else { return RoundEnd::NoHeader };
    let workers = snapshot(prefix, &listed.kvs);
    if sink.send(MembershipEvent::Snapshot(workers)).await.is_err() {
        return RoundEnd::SinkClosed;
    }

    let create = etcd::WatchCreateRequest {
        key: prefix.as_bytes().to_vec(),
        range_end,
        start_revision: revision + 1,
        progress_notify: true,
        ..Default::default()
    };
    let request = etcd::WatchRequest { request_union: Some(etcd::watch_request::RequestUnion::CreateRequest(create)) };
    // Queued before the call (which returns once etcd answers); `requests` stays open for the
    // life of the watch: closing it would half-close the stream.
    let (requests, rx) = mpsc::channel(1);
    if requests.send(request).await.is_err() {
        return RoundEnd::Ended;
    }
    let mut stream =
        match tokio::time::timeout(RANGE_TIMEOUT, WatchClient::new(channel).watch(ReceiverStream::new(rx))).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(source)) => return RoundEnd::Rpc { op: "watch", source },
            Err(_) => return RoundEnd::Timeout { op: "watch", after: RANGE_TIMEOUT },
        };
    loop {
        let response = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return RoundEnd::Ended,
            Err(source) => return RoundEnd::Rpc { op: "watch", source },
        };
        if response.compact_revision > 0 {
            return RoundEnd::Compacted(response.compact_revision);
        }
        if response.canceled {
            return RoundEnd::Canceled(response.cancel_reason);
        }
        if response.created {
            if *failures > 0 {
                tracing::info!("etcd discovery of {prefix} resumed at {url} (revision {revision})");
            }
            backoff.reset();
            *failures = 0;
        }
        for event in &response.events {
            if let Some(change) = change(prefix, event)
                && sink.send(change).await.is_err()
            {
                return RoundEnd::SinkClosed;
            }
        }
    }
}

/// The workers among a listing's key-values (unusable ones logged and left out).
fn snapshot(prefix: &str, kvs: &[etcd::KeyValue]) -> Vec<DiscoveredWorker> {
    kvs.iter()
        .filter_map(|kv| match worker(prefix, kv) {
            Ok(w) => Some(w),
            Err(Skip::NotAWorkerKey) => None,
            Err(why) => {
                tracing::warn!("skipping {}: {why}", String::from_utf8_lossy(&kv.key));
                None
            }
        })
        .collect()
}

/// The membership change an etcd event makes, if any.
fn change(prefix: &str, event: &etcd::Event) -> Option<MembershipEvent> {
    let kv = event.kv.as_ref()?;
    let key = std::str::from_utf8(&kv.key).ok().filter(|k| worker_id_in(prefix, k).is_some())?;
    match etcd::event::EventType::try_from(event.r#type) {
        Ok(etcd::event::EventType::Put) => match worker(prefix, kv) {
            Ok(w) => Some(MembershipEvent::Put(Box::new(w))),
            Err(why) => {
                tracing::warn!("{key} no longer names a usable worker: {why}");
                Some(MembershipEvent::Delete { key: key.to_string() })
            }
        },
        Ok(etcd::event::EventType::Delete) => Some(MembershipEvent::Delete { key: key.to_string() }),
        Err(_) => {
            tracing::warn!("ignoring an etcd event of unknown type {} on {key}", event.r#type);
            None
        }
    }
}

/// A key-value as a worker.
fn worker(prefix: &str, kv: &etcd::KeyValue) -> Result<DiscoveredWorker, Skip> {
    let key = std::str::from_utf8(&kv.key).map_err(|_| Skip::NotAWorkerKey)?;
    worker_id_in(prefix, key).ok_or(Skip::NotAWorkerKey)?;
    let info = WorkerInfo::decode(kv.value.as_slice()).map_err(Skip::Malformed)?;
    if info.address.is_empty() {
        return Err(Skip::NoAddress);
    }
    Ok(DiscoveredWorker { key: key.to_string(), address: info.address.clone(), info: Some(info) })
}

/// The first endpoint that accepts a connection, with its URL.
async fn connect(endpoints: &[String]) -> Result<(Channel, String), RoundEnd> {
    connect_first(endpoints, |e| tracing::warn!("skipping {e}")).await.map_err(|last| match last {
        Some((endpoint, source)) => RoundEnd::Connect { endpoint, source },
        None => RoundEnd::Timeout { op: "connect", after: CONNECT_TIMEOUT },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::registry::worker_key;

    fn info(address: &str) -> WorkerInfo {
        WorkerInfo { worker_id: "w1".into(), model_id: "m".into(), address: address.into(), ..Default::default() }
    }

    fn kv(key: &str, value: Vec<u8>) -> etcd::KeyValue {
        etcd::KeyValue { key: key.as_bytes().to_vec(), value, ..Default::default() }
    }

    fn event(kind: etcd::event::EventType, kv: etcd::KeyValue) -> etcd::Event {
        etcd::Event { r#type: kind as i32, kv: Some(kv), prev_kv: None }
    }

    #[test]
    fn a_snapshot_keeps_workers_and_skips_what_is_not_one() {
        let p = worker_prefix("m");
        let good = kv(&worker_key("m", "w1"), info("10.0.0.1:50051").encode_to_vec());
        let kvs = [
            good.clone(),
            kv(&worker_key("m", "garbage"), vec![0xff, 0xff, 0xff]),
            kv(&worker_key("m", "no-address"), info("").encode_to_vec()),
            kv(&worker_key("m/nested", "w2"), info("10.0.0.2:1").encode_to_vec()),
            etcd::KeyValue { key: vec![0xc3], ..Default::default() },
        ];
        let workers = snapshot(&p, &kvs);
        assert_eq!(
            workers,
            vec![DiscoveredWorker {
                key: worker_key("m", "w1"),
                address: "10.0.0.1:50051".into(),
                info: Some(info("10.0.0.1:50051")),
            }]
        );
        assert!(matches!(worker(&p, &kvs[1]), Err(Skip::Malformed(_))));
        assert_eq!(worker(&p, &kvs[2]), Err(Skip::NoAddress));
        assert_eq!(worker(&p, &kvs[3]), Err(Skip::NotAWorkerKey));
    }

    #[test]
    fn events_become_puts_and_deletes() {
        use etcd::event::EventType::{Delete, Put};
        let p = worker_prefix("m");
        let key = worker_key("m", "w1");
        let value = info("h:1").encode_to_vec();
        match change(&p, &event(Put, kv(&key, value))) {
            Some(MembershipEvent::Put(w)) => assert_eq!((w.key.as_str(), w.address.as_str()), (key.as_str(), "h:1")),
            other => panic!("expected a Put, got {other:?}"),
        }
        assert_eq!(change(&p, &event(Delete, kv(&key, vec![]))), Some(MembershipEvent::Delete { key: key.clone() }));
        // A value that stops being a worker removes it.
        assert_eq!(change(&p, &event(Put, kv(&key, vec![0xff]))), Some(MembershipEvent::Delete { key: key.clone() }));
        // Keys that are not workers of this model, unknown types and empty events change nothing.
        assert_eq!(change(&p, &event(Put, kv(&worker_key("m/x", "w"), info("h:1").encode_to_vec()))), None);
        assert_eq!(change(&p, &event(Delete, kv(&p, vec![]))), None);
        assert_eq!(change(&p, &etcd::Event { r#type: 7, kv: Some(kv(&key, vec![])), prev_kv: None }), None);
        assert_eq!(change(&p, &etcd::Event::default()), None);
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(validate_endpoints(&["http://127.0.0.1:2379".into(), "http://etcd-0.etcd:2379".into()]).is_ok());
        assert!(matches!(validate_endpoints(&[]), Err(EndpointError::None)));
        for bad in ["https://e:2379", "e:2379", "http://"] {
            assert!(matches!(validate_endpoints(&[bad.into()]), Err(EndpointError::Bad { .. })), "{bad}");
        }
    }

    #[tokio::test]
    async fn it_returns_when_cancelled_or_when_the_consumer_goes_even_with_etcd_unreachable() {
        // Port 1 on loopback refuses at once: the watch keeps backing off, sending nothing.
        let endpoints = vec!["http://127.0.0.1:1".to_string()];
        let (tx, mut rx) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(watch_workers(endpoints.clone(), "m".into(), tx, cancel.clone()));
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(rx.try_recv().is_err(), "nothing is sent while etcd is unreachable");
        cancel.cancel();
        let done = tokio::time::timeout(Duration::from_secs(2), task).await;
        assert!(done.is_ok_and(|r| r.is_ok()), "cancellation ends the watch");

        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(watch_workers(endpoints, "m".into(), tx, CancellationToken::new()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(rx);
        let done = tokio::time::timeout(Duration::from_secs(2), task).await;
        assert!(done.is_ok_and(|r| r.is_ok()), "a closed sink ends the watch");
    }
}
