//! Wire-level contracts shared by the router and the workers.
//!
//! This crate holds no logic beyond what both sides must compute identically: the id and unit
//! newtypes that cross the wire, and the chained block hash that keys prefix caches
//! (DESIGN.md, decision 2). Generated gRPC code joins it with the serving-engine work.

pub mod block_hash;
pub mod ids;

pub use block_hash::{BLOCK_HASH_SEED, BlockHash, hash_block, hash_prefix_blocks};
pub use ids::{Rank, TokenCount, TokenId};

/// Generated code of `tessera.worker.v1` (the worker's gRPC API).
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used, reason = "generated code")]
pub mod worker_v1 {
    tonic::include_proto!("tessera.worker.v1");
}

/// The encoded `FileDescriptorSet` of every Tessera proto (for gRPC server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tessera_descriptor");
