//! The prefix cache as a stream of events with gap-free sequence numbers (DESIGN.md, decision 3).
//!
//! The engine thread [`publish`](KvEventLog::publish)es what its [`BlockAllocator`] recorded
//! after each step; the log numbers the events (the first is 1, each next one is one more),
//! applies them to its own [`KvReplica`] of the keyed blocks, keeps the most recent ones for replay and
//! broadcasts them to live subscribers. Invariant: after the event numbered `s` has been
//! published, that replica holds exactly the blocks the allocator held when it recorded that event,
//! so a snapshot taken at `s` plus every event after `s` rebuilds the live state.
//!
//! [`BlockAllocator`]: crate::kv_cache::BlockAllocator

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use tessera_proto::BlockHash;
use tokio::sync::broadcast;

/// One change to the set of blocks held in the prefix cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEventKind {
    /// A full block was keyed by its chained hash.
    Stored {
        /// The block's hash.
        hash: BlockHash,
        /// The previous block's hash (`None` for the first block of a sequence).
        parent: Option<BlockHash>,
        /// The block's tokens.
        tokens: Vec<u32>,
    },
    /// A keyed block was evicted.
    Removed {
        /// The evicted block's hash.
        hash: BlockHash,
    },
    /// Every keyed block was dropped.
    Cleared,
}

/// An event with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEvent {
    /// Gap-free, starting at 1.
    pub seq: u64,
    /// What changed.
    pub kind: KvEventKind,
}

/// A stored block as listed in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotBlock {
    /// The block's hash.
    pub hash: BlockHash,
    /// Its parent's hash.
    pub parent: Option<BlockHash>,
    /// Its tokens.
    pub tokens: Vec<u32>,
}

/// Every keyed block as of event `seq` (parents before children).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvSnapshot {
    /// The last event reflected (0 before any event).
    pub seq: u64,
    /// The blocks.
    pub blocks: Vec<SnapshotBlock>,
}

/// Where a subscription starts.
#[derive(Debug)]
pub enum SubscriptionStart {
    /// The full state, then live events after `snapshot.seq`.
    Snapshot(KvSnapshot),
    /// The requested events were still held: these, then live events after the last one.
    Replay(Vec<KvEvent>),
}

/// A subscriber's starting point plus its live feed (events in published batches).
#[derive(Debug)]
pub struct Subscription {
    /// What to send first.
    pub start: SubscriptionStart,
    /// Batches published after the start; a lagging receiver gets `RecvError::Lagged` and should
    /// resubscribe from the next sequence number it needs.
    pub live: broadcast::Receiver<Arc<[KvEvent]>>,
}

struct State {
    /// Every event applied: the keyed blocks as of `view.seq`, the last published number.
    view: KvReplica,
    recent: VecDeque<KvEvent>,
}

/// The event log shared by the engine thread (publisher) and the gRPC streams (subscribers).
pub struct KvEventLog {
    /// Guards the replica (with its sequence number) and the replay buffer together, so that a subscriber's
    /// snapshot and its live receiver meet exactly at one sequence number. Held only for short,
    /// non-blocking sections (never across an await).
    state: Mutex<State>,
    live: broadcast::Sender<Arc<[KvEvent]>>,
    replay_capacity: usize,
}

/// Events kept for replay to subscribers that reconnect.
pub const DEFAULT_REPLAY_CAPACITY: usize = 65_536;

impl KvEventLog {
    /// An empty log keeping up to `replay_capacity` events for replay.
    pub fn new(replay_capacity: usize) -> Self {
        let (live, _) = broadcast::channel(1024);
        KvEventLog {
            state: Mutex::new(State { view: KvReplica::default(), recent: VecDeque::new() }),
            live,
            replay_capacity: replay_capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is applied whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The sequence number of the last published event (0 before any).
    pub fn last_seq(&self) -> u64 {
        self.lock().view.seq
    }

    /// Numbers, records and broadcasts `kinds` (in order).
    pub fn publish(&self, kinds: Vec<KvEventKind>) {
        if kinds.is_empty() {
            return;
        }
        let mut state = self.lock();
        let mut batch = Vec::with_capacity(kinds.len());
        for kind in kinds {
            state.view.seq += 1;
            state.view.apply_kind(&kind);
            let event = KvEvent { seq: state.view.seq, kind };
            state.recent.push_back(event.clone());
            batch.push(event);
        }
        while state.recent.len() > self.replay_capacity {
            state.recent.pop_front();
        }
        // No receivers is fine: nobody is subscribed.
        let _ = self.live.send(batch.into());
    }

    /// Starts a subscription at `from_seq` (see [`SubscriptionStart`]).
    pub fn subscribe(&self, from_seq: u64) -> Subscription {
        let state = self.lock();
        let live = self.live.subscribe();
        let last_seq = state.view.seq;
        let oldest = state.recent.front().map_or(last_seq + 1, |e| e.seq);
        let start = if from_seq >= 1 && from_seq >= oldest && from_seq <= last_seq + 1 {
            SubscriptionStart::Replay(state.recent.iter().filter(|e| e.seq >= from_seq).cloned().collect())
        } else {
            SubscriptionStart::Snapshot(snapshot(&state.view))
        };
        Subscription { start, live }
    }

    /// The current state as a snapshot.
    pub fn snapshot(&self) -> KvSnapshot {
        snapshot(&self.lock().view)
    }
}

/// `view` as a snapshot, each block after its parent.
fn snapshot(view: &KvReplica) -> KvSnapshot {
    let mut depth = HashMap::with_capacity(view.blocks.len());
    for &h in view.blocks.keys() {
        chain_depth(view, h, &mut depth);
    }
    let mut blocks: Vec<_> = view.blocks.iter().collect();
    blocks.sort_by_key(|(h, _)| (depth.get(*h).copied().unwrap_or(0), **h));
    KvSnapshot {
        seq: view.seq,
        blocks: blocks
            .into_iter()
            .map(|(h, (parent, tokens))| SnapshotBlock { hash: *h, parent: *parent, tokens: tokens.clone() })
            .collect(),
    }
}

/// Records in `memo` how many of `h`'s ancestors are held (0 when its parent is not), walking
/// up only until a block whose depth is known.
fn chain_depth(view: &KvReplica, h: BlockHash, memo: &mut HashMap<BlockHash, usize>) {
    let mut path = Vec::new();
    let mut cur = Some(h);
    let mut top = 0;
    while let Some(c) = cur {
        if let Some(&known) = memo.get(&c) {
            top = known + 1;
            break;
        }
        // A chained hash cannot cycle; the bound only keeps a corrupt view from looping.
        if path.len() > view.blocks.len() {
            break;
        }
        path.push(c);
        cur = view.blocks.get(&c).and_then(|(p, _)| *p).filter(|p| view.blocks.contains_key(p));
    }
    for (i, c) in path.into_iter().rev().enumerate() {
        memo.insert(c, top + i);
    }
}

/// A subscriber-side replica: applies a snapshot and then events, checking continuity. The
/// router keeps one per worker; tests use it to check the stream against the allocator.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KvReplica {
    /// Last applied sequence number.
    pub seq: u64,
    /// Keyed blocks: hash → (parent, tokens).
    pub blocks: HashMap<BlockHash, (Option<BlockHash>, Vec<u32>)>,
}

/// An event arrived out of order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KV event {got} arrived after {last}: the stream has a gap")]
pub struct SequenceGap {
    /// The last applied sequence number.
    pub last: u64,
    /// The sequence number received.
    pub got: u64,
}

impl KvReplica {
    /// Replaces the state with a snapshot.
    pub fn reset(&mut self, snapshot: &KvSnapshot) {
        self.seq = snapshot.seq;
        self.blocks = snapshot.blocks.iter().map(|b| (b.hash, (b.parent, b.tokens.clone()))).collect();
    }

    /// Applies the next event; it must be numbered `seq + 1`.
    pub fn apply(&mut self, event: &KvEvent) -> Result<(), SequenceGap> {
        if event.seq != self.seq + 1 {
            return Err(SequenceGap { last: self.seq, got: event.seq });
        }
        self.seq = event.seq;
        self.apply_kind(&event.kind);
        Ok(())
    }

    fn apply_kind(&mut self, kind: &KvEventKind) {
        match kind {
            KvEventKind::Stored { hash, parent, tokens } => {
                self.blocks.insert(*hash, (*parent, tokens.clone()));
            }
            KvEventKind::Removed { hash } => {
                self.blocks.remove(hash);
            }
            KvEventKind::Cleared => self.blocks.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(h: u64, parent: Option<u64>) -> KvEventKind {
        KvEventKind::Stored { hash: BlockHash(h), parent: parent.map(BlockHash), tokens: vec![h as u32] }
    }

    #[test]
    fn replay_and_snapshot_meet_without_gaps() {
        let log = KvEventLog::new(3);
        log.publish(vec![stored(1, None), stored(2, Some(1))]);
        log.publish(vec![KvEventKind::Removed { hash: BlockHash(2) }, stored(3, Some(1))]);
        assert_eq!(log.last_seq(), 4);
        // Events 2..=4 are held: replay from 2.
        let sub = log.subscribe(2);
        let SubscriptionStart::Replay(events) = sub.start else { panic!("expected a replay") };
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3, 4]);
        // Event 1 fell out of the buffer: snapshot, parents first.
        let sub = log.subscribe(1);
        let SubscriptionStart::Snapshot(snap) = sub.start else { panic!("expected a snapshot") };
        assert_eq!(snap.seq, 4);
        assert_eq!(snap.blocks.iter().map(|b| b.hash.0).collect::<Vec<_>>(), vec![1, 3]);
        // Caught up: an empty replay, then live.
        let mut sub = log.subscribe(5);
        assert!(matches!(sub.start, SubscriptionStart::Replay(ref e) if e.is_empty()));
        log.publish(vec![KvEventKind::Cleared]);
        let batch = sub.live.try_recv().unwrap();
        assert_eq!(batch[0].seq, 5);
        // A number from the future is answered with a snapshot.
        assert!(matches!(log.subscribe(99).start, SubscriptionStart::Snapshot(_)));
    }

    #[test]
    fn replica_rejects_gaps() {
        let mut r = KvReplica::default();
        r.apply(&KvEvent { seq: 1, kind: stored(1, None) }).unwrap();
        assert_eq!(r.apply(&KvEvent { seq: 3, kind: KvEventKind::Cleared }), Err(SequenceGap { last: 1, got: 3 }));
    }
}
