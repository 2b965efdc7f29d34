//! Wire-level contracts shared by the router and the workers.
//!
//! This crate holds no logic beyond what both sides must compute identically: the id and unit
//! newtypes that cross the wire, and the chained block hash that keys prefix caches
//! (DESIGN.md, decision 2). Generated gRPC code joins it with the serving-engine work.

pub mod block_hash;
pub mod ids;

pub use block_hash::{BLOCK_HASH_SEED, BlockHash, hash_block, hash_prefix_blocks};
pub use ids::{Rank, TokenCount, TokenId};
