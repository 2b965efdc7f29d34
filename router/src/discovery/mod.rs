//! Which workers exist: a static list (`--worker ADDR`, repeated) or an etcd watch on
//! `/tessera/v1/workers/{model}/` (DESIGN.md, decision 8).
//!
//! A discovery source produces [`MembershipEvent`]s on a channel. Invariants every source keeps:
//! the first event is a [`MembershipEvent::Snapshot`] of every worker the source knows; after it,
//! `Put` / `Delete` events describe changes in order; whenever a source loses continuity (etcd
//! compaction, reconnect after an outage) it sends a fresh `Snapshot`, and the consumer replaces
//! its whole view with it (workers missing from the snapshot are gone). Keys identify workers:
//! the etcd key, or `static/{addr}` for static entries.

pub mod etcd;

use tessera_proto::worker_v1::WorkerInfo;

/// One worker as discovery knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveredWorker {
    /// Stable identity within the source (the etcd key, or `static/{addr}`).
    pub key: String,
    /// The gRPC address to dial (`host:port`).
    pub address: String,
    /// What the worker registered (`None` for static entries: the pool asks `GetInfo`).
    pub info: Option<WorkerInfo>,
}

/// A change in membership.
#[derive(Debug, Clone, PartialEq)]
pub enum MembershipEvent {
    /// The complete set of workers (replaces everything known before).
    Snapshot(Vec<DiscoveredWorker>),
    /// A worker appeared or changed.
    Put(Box<DiscoveredWorker>),
    /// A worker left (lease expired, deregistered on drain).
    Delete {
        /// Its key.
        key: String,
    },
}

/// The snapshot a static list gives (it never changes afterwards).
pub fn static_snapshot(addresses: &[String]) -> MembershipEvent {
    MembershipEvent::Snapshot(
        addresses
            .iter()
            .map(|a| DiscoveredWorker { key: format!("static/{a}"), address: a.clone(), info: None })
            .collect(),
    )
}
