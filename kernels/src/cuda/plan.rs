//! Host-side launch policy of the CUDA backend, free of any device: how attention's rows are
//! split between the tensor-core and CUDA-core kernels, how far the CUDA-core kernel splits
//! over the KV length, and when a product goes to the GEMV kernel rather than cuBLASLt.
//!
//! Everything here is a pure function of shapes, so it is unit-tested without a GPU; the GEMV
//! bound cites the H200 measurements it was chosen from (`kernels/gpu/results`).

/// Shortest partition of the split over the KV length: four of the kernel's four-key groups, so
/// a warp's serial walk is short at batch 1 (one memory round trip per group); the reduce pass
/// costs a few round trips whatever the count.
pub const MIN_ATTENTION_PARTITION: usize = 16;

/// Chunks of at least this many rows go through the tensor-core kernel (when the head width
/// allows it); shorter ones, decode rows included, through the CUDA-core kernel.
pub const FLASH_MIN_ROWS: usize = 16;

/// Query rows per tile of the tensor-core kernel.
pub const FLASH_TILE_ROWS: usize = 64;

/// Whether the tensor-core kernel supports this head width.
pub fn flash_supports(head_dim: usize) -> bool {
    head_dim == 64 || head_dim == 128
}

/// How to split attention over the KV length: `(n_parts, partition_size)`, given the
/// (query row, head) pairs of the CUDA-core kernel (one warp each). Enough partitions to keep
/// every SM busy (about four warps per SM) when the pairs alone are too few, as in small-batch
/// decode, never shorter than [`MIN_ATTENTION_PARTITION`]; one partition otherwise.
pub fn attention_split(pairs: usize, max_context: usize, sm_count: usize) -> (usize, usize) {
    let target_warps = 4 * sm_count.max(1);
    let max_parts = max_context.div_ceil(MIN_ATTENTION_PARTITION).max(1);
    let n_parts = if pairs >= target_warps { 1 } else { target_warps.div_ceil(pairs.max(1)).min(max_parts) };
    // Multiples of 4 keep the kernel's four-key groups inside one partition.
    let partition = max_context.div_ceil(n_parts).next_multiple_of(4).max(4);
    (n_parts, partition)
}

/// Splits a step's chunks between the two attention kernels: `(short_rows, flash_tiles)`, the
/// rows for the CUDA-core kernel and `(first row, row count)` pairs for the tensor-core one.
/// `chunk_lens` are the chunks' row counts in row order; a chunk goes to flash when it has at
/// least [`FLASH_MIN_ROWS`] rows and the head width is supported, in tiles of at most
/// [`FLASH_TILE_ROWS`] rows that never straddle two chunks.
pub fn plan_attention(chunk_lens: &[usize], head_dim: usize) -> (Vec<i32>, Vec<i32>) {
    let (mut rows, mut tiles) = (Vec::new(), Vec::new());
    let mut first = 0usize;
    for &len in chunk_lens {
        if len >= FLASH_MIN_ROWS && flash_supports(head_dim) {
            let mut start = first;
            while start < first + len {
                let n = FLASH_TILE_ROWS.min(first + len - start);
                tiles.extend([start as i32, n as i32]);
                start += n;
            }
        } else {
            rows.extend((first..first + len).map(|r| r as i32));
        }
        first += len;
    }
    (rows, tiles)
}

/// Most rows [`GpuDevice::gemv`](super::GpuDevice::gemv) takes; larger batches go to cuBLASLt.
pub const GEMV_MAX_ROWS: usize = 4;

/// Whether [`GpuDevice::gemv`](super::GpuDevice::gemv) takes a product of `rows` rows of width `inner`.
pub fn gemv_fits(rows: usize, inner: usize) -> bool {
    (1..=GEMV_MAX_ROWS).contains(&rows) && inner.is_multiple_of(8)
}

/// Largest weight matrix (elements) the decode path sends to [`GpuDevice::gemv`](super::GpuDevice::gemv) at batch 1.
/// Measured on an H200 at the 8B shape against `torch.matmul` (`test_kernels.py --bench`, four
/// runs, `kernels/gpu/results`): the kernel is 1.3-2.2x faster on the output projection
/// (4096 x 4096); on the QKV projection (6144 x 4096) it was 1.2x faster once and 1.3-1.4x
/// slower three times, so the QKV projection is the next to move back to cuBLASLt (a bound of
/// 16 Mi elements); it loses on the MLP and LM-head matrices and at batch 2 to 4, which stay on
/// cuBLASLt.
pub const GEMV_DECODE_MAX_ELEMS: usize = 32 << 20;

/// Whether the decode path should use [`GpuDevice::gemv`](super::GpuDevice::gemv) rather than cuBLASLt.
pub fn gemv_preferred(rows: usize, out: usize, inner: usize) -> bool {
    rows == 1 && out * inner <= GEMV_DECODE_MAX_ELEMS && gemv_fits(rows, inner)
}

#[cfg(test)]
mod tests {
    use super::{attention_split, plan_attention};

    #[test]
    fn split_fills_the_gpu_only_when_needed() {
        // Batch-1 decode of a 32-head model at 256 context on 132 SMs: 16 partitions of 16.
        assert_eq!(attention_split(32, 256, 132), (16, 16));
        // At 8192 context: enough warps for four per SM.
        assert_eq!(attention_split(32, 8192, 132), (17, 484));
        // Prefill or large batches: one partition.
        assert_eq!(attention_split(2048 * 32, 2048, 132).0, 1);
        assert_eq!(attention_split(128 * 32, 300, 132).0, 1);
        // Tiny contexts never split below one partition of at least 4 keys.
        assert_eq!(attention_split(1, 1, 132), (1, 4));
    }

    #[test]
    fn long_chunks_go_to_flash_in_tiles_that_never_straddle_chunks() {
        // decode row, a 150-row prefill chunk, another decode row, a 15-row chunk
        let (rows, tiles) = plan_attention(&[1, 150, 1, 15], 128);
        assert_eq!(tiles, vec![1, 64, 65, 64, 129, 22]);
        let mut want = vec![0, 151];
        want.extend(152..167);
        assert_eq!(rows, want);
        // Unsupported head width: everything through the CUDA-core kernel.
        let (rows, tiles) = plan_attention(&[1, 150], 96);
        assert!(tiles.is_empty());
        assert_eq!(rows.len(), 151);
    }
}
