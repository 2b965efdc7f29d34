//! Wire-level contracts shared by the router and the workers.
//!
//! This crate holds no logic beyond what both sides must compute identically: the id and unit
//! newtypes that cross the wire, the chained block hash that keys prefix caches
//! (DESIGN.md, decision 2), the etcd key layout of worker registration and how both sides
//! connect to etcd, W3C trace context in gRPC metadata, and generated gRPC code.

pub mod block_hash;
pub mod etcd_client;
pub mod ids;
pub mod registry;
pub mod trace_context;

pub use block_hash::{BLOCK_HASH_SEED, BlockHash, hash_block, hash_prefix_blocks};
pub use ids::{Rank, TokenCount, TokenId};

/// Generated code of `tessera.v1` (the public API, served by the router).
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used, reason = "generated code")]
pub mod v1 {
    tonic::include_proto!("tessera.v1");
}

/// Generated code of `tessera.worker.v1` (the worker's gRPC API).
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used, reason = "generated code")]
pub mod worker_v1 {
    tonic::include_proto!("tessera.worker.v1");
}

/// Generated client code of the slice of etcd's v3 API we use (`proto/etcd/etcd_v3.proto`:
/// package `etcdserverpb`, field numbers as etcd's own protos): worker registration and the
/// router's discovery watch.
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used, reason = "generated code")]
pub mod etcd_v3 {
    tonic::include_proto!("etcdserverpb");
}

/// The encoded `FileDescriptorSet` of every Tessera proto (for gRPC server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tessera_descriptor");
