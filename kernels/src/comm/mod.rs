//! Collective communication between the ranks of one tensor-parallel group.
//!
//! A [`Communicator`] is one rank's handle on its group. Every rank must call the same
//! collectives in the same order with buffers of the same length; a rank that calls nothing
//! (hung) or something else (a bug) fails the whole group instead of blocking it forever.
//!
//! Failure model, shared by every implementation:
//! - every collective (for a device communicator: every `synchronize`, since its collectives
//!   are only queued) waits at most the group's timeout; when it runs out, the group is
//!   **aborted** and the call returns [`CommError::Timeout`] naming the ranks that never came;
//! - [`Communicator::abort`] (called by a rank that failed, panicked, or noticed a timeout) makes
//!   every pending and future collective on every rank return [`CommError::Aborted`] promptly;
//! - an aborted group stays aborted: ranks do not recover, the process owning them restarts.
//!
//! Implementations: [`host::HostComm`] (rank threads sharing memory, for the CPU backend) and,
//! with the `cuda` feature, `cuda::nccl::NcclComm` (one GPU per rank; its collectives are queued
//! on the rank's stream and the timeout applies in [`Communicator::synchronize`]).

pub mod host;

use std::time::Duration;

/// Why a collective did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    /// The ranks in `missing` did not join `op` within `waited`; the group is now aborted.
    #[error("{op}: {} within {waited:?}; the group is aborted", who_did_not_join(.missing))]
    Timeout {
        /// The collective.
        op: &'static str,
        /// Ranks that never arrived (empty when the transport cannot tell, as with NCCL).
        missing: Vec<usize>,
        /// How long this rank waited.
        waited: Duration,
    },
    /// The group was aborted (by a failing rank, a timeout or the owner); nothing completes.
    #[error("the group was aborted: {0}")]
    Aborted(String),
    /// Ranks called different collectives or passed buffers of different lengths (a bug); the
    /// group is now aborted.
    #[error("{0}; the group is aborted")]
    Mismatch(String),
    /// The transport itself failed (NCCL, CUDA).
    #[error("{0}")]
    Transport(String),
}

fn who_did_not_join(missing: &[usize]) -> String {
    if missing.is_empty() { "the group did not complete".into() } else { format!("rank(s) {missing:?} did not join") }
}

/// One rank's handle on its group.
pub trait Communicator: Send + Sync {
    /// What collectives operate on: host memory (`[f32]`) or device memory.
    type Buffer: ?Sized;

    /// This rank, in `0..size()`.
    fn rank(&self) -> usize;

    /// Ranks in the group.
    fn size(&self) -> usize;

    /// Replaces `buf` on every rank with the element-wise sum over all ranks.
    fn all_reduce_sum(&self, buf: &mut Self::Buffer) -> Result<(), CommError>;

    /// Fills `recv` (`size()` times the length of `send`) with every rank's `send`, in rank order.
    fn all_gather(&self, send: &Self::Buffer, recv: &mut Self::Buffer) -> Result<(), CommError>;

    /// Copies `root`'s `buf` into every other rank's `buf`.
    fn broadcast(&self, buf: &mut Self::Buffer, root: usize) -> Result<(), CommError>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), CommError>;

    /// Waits until every collective this rank has issued has completed, at most the group's
    /// timeout (aborting the group when it runs out). Host collectives complete before they
    /// return, so this is a no-op for them; device collectives are queued on a stream and this is
    /// where a hung peer is noticed.
    fn synchronize(&self) -> Result<(), CommError> {
        Ok(())
    }

    /// Aborts the group: every pending and future collective on every rank fails with `reason`.
    /// Idempotent; the first reason is kept.
    fn abort(&self, reason: &str);

    /// Why the group was aborted, once it has been.
    fn abort_reason(&self) -> Option<String>;
}
