//! Collective communication between the ranks of one tensor-parallel group.
//!
//! A [`Communicator`] is one rank's handle on its group. Every rank must call the same
//! collectives in the same order with buffers of the same length; a rank that calls nothing
//! (hung) or something else (a bug) fails the whole group instead of blocking it forever.
//!
//! Failure model, shared by every implementation:
//! - every collective waits at most the group's timeout; when it runs out, the group is
//!   **aborted** and the call returns [`CommError::Timeout`] naming the ranks that never came;
//! - [`Communicator::abort`] (called by a rank that failed, panicked, or noticed a timeout) makes
//!   every pending and future collective on every rank return [`CommError::Aborted`] promptly;
//! - an aborted group stays aborted: ranks do not recover, the process owning them restarts.
//!
//! Implementations: [`host::HostComm`] (rank threads sharing memory, for the CPU backend) and,
//! with the `cuda` feature, `cuda::nccl::NcclComm` (one GPU per rank).

pub mod host;

use std::time::Duration;

/// Why a collective did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    /// The ranks in `missing` did not join `op` within `waited`; the group is now aborted.
    #[error("{op}: rank(s) {missing:?} did not join within {waited:?}; the group is aborted")]
    Timeout {
        /// The collective.
        op: &'static str,
        /// Ranks that never arrived.
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

    /// Aborts the group: every pending and future collective on every rank fails with `reason`.
    /// Idempotent; the first reason is kept.
    fn abort(&self, reason: &str);

    /// Why the group was aborted, once it has been.
    fn abort_reason(&self) -> Option<String>;
}
