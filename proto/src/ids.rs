//! Newtypes for ids and units that cross crate and wire boundaries.
//!
//! Invariant: a value of one of these types is always meaningful; "none" is `Option<T>`, never a
//! sentinel such as `u32::MAX`.

use std::fmt;

/// A vocabulary index as the model sees it.
pub type TokenId = u32;

/// A count of tokens (prompt length, KV capacity, generated length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TokenCount(pub u32);

impl fmt::Display for TokenCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} tokens", self.0)
    }
}

/// The index of one tensor-parallel rank inside a worker's TP group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Rank(pub u16);

impl fmt::Display for Rank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {}", self.0)
    }
}
