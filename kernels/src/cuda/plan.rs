//! Host-side launch policy of the CUDA backend, free of any device: how attention's rows are
//! split between the tensor-core and CUDA-core kernels, how far the CUDA-core kernel splits
//! over the KV length, and when a product goes to the GEMV kernel rather than cuBLASLt.
//!
//! Everything here is a pure function of shapes (and, for the GEMV choice, of timings taken on
//! the device at load), so it is unit-tested without a GPU.

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

/// One decode-step product timed both ways on the device at load (batch 1).
#[derive(Debug, Clone, PartialEq)]
pub struct ProductTiming {
    /// What the product is ("qkv", "down", ...), for logs.
    pub name: &'static str,
    /// Output width (rows of the weight matrix).
    pub out: usize,
    /// Inner width (columns of the weight matrix).
    pub inner: usize,
    /// Microseconds per call of a one-row norm and then [`GpuDevice::gemv`](super::GpuDevice::gemv)
    /// (which starts under the norm, as under the small kernel before each product of a decode step).
    pub gemv_us: f64,
    /// Microseconds per call of the same norm and then cuBLASLt, with its fastest candidate algorithm.
    pub cublas_us: f64,
    /// That candidate's index (see [`Gemm::choose`](super::gemm::Gemm::choose)).
    pub cublas_algo: usize,
}

impl ProductTiming {
    /// One line of a tuning record: `name out inner gemv_us cublas_us cublas_algo`.
    pub fn to_line(&self) -> String {
        format!("{} {} {} {} {} {}", self.name, self.out, self.inner, self.gemv_us, self.cublas_us, self.cublas_algo)
    }

    /// Parses [`to_line`](Self::to_line)'s output for one of `names`; `None` if it does not fit.
    pub fn from_line(line: &str, names: &[&'static str]) -> Option<Self> {
        let mut it = line.split_whitespace();
        let first = it.next()?;
        let name = names.iter().copied().find(|n| *n == first)?;
        let (out, inner) = (it.next()?.parse().ok()?, it.next()?.parse().ok()?);
        let (gemv_us, cublas_us): (f64, f64) = (it.next()?.parse().ok()?, it.next()?.parse().ok()?);
        let cublas_algo = it.next()?.parse().ok()?;
        let finite = gemv_us.is_finite() && cublas_us.is_finite();
        (finite && it.next().is_none()).then_some(ProductTiming { name, out, inner, gemv_us, cublas_us, cublas_algo })
    }
}

/// The batch-1 products that go to [`GpuDevice::gemv`](super::GpuDevice::gemv) instead of
/// cuBLASLt: those where the GEMV kernel was timed faster on this device. Which one wins depends
/// on the matrix, the card and cuBLASLt's plan (on an H200 at the 8B shape the GEMV beat
/// `torch.matmul` on the 4096 x 4096 output projection by 1.3-2.2x, but the engine's own
/// cuBLASLt plan beat the GEMV on every product, 13.5 against 15.6 us there, before the GEMV
/// started under the kernel ahead of it on sm_90; `kernels/gpu/results`), so it is measured,
/// not fixed. The backend measures once per device and model shape and keeps the record, so
/// every later process makes the same choice. Batches above one row always go to cuBLASLt,
/// which won every measured shape at 2-4 rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GemvShapes(Vec<(usize, usize)>);

impl GemvShapes {
    /// The shapes where the GEMV was strictly faster.
    pub fn from_timings(timings: &[ProductTiming]) -> Self {
        GemvShapes(timings.iter().filter(|t| t.gemv_us < t.cublas_us).map(|t| (t.out, t.inner)).collect())
    }

    /// Whether a product of `rows` rows and a `(out, inner)` weight goes to the GEMV kernel.
    pub fn preferred(&self, rows: usize, out: usize, inner: usize) -> bool {
        rows == 1 && gemv_fits(rows, inner) && self.0.contains(&(out, inner))
    }
}

#[cfg(test)]
mod tests {
    use super::{GemvShapes, ProductTiming, attention_split, plan_attention};

    #[test]
    fn timings_round_trip_through_record_lines() {
        let t =
            ProductTiming { name: "down", out: 4096, inner: 14336, gemv_us: 52.75, cublas_us: 32.5, cublas_algo: 3 };
        assert_eq!(ProductTiming::from_line(&t.to_line(), &["qkv", "down"]), Some(t.clone()));
        assert_eq!(ProductTiming::from_line(&t.to_line(), &["qkv"]), None, "unknown product");
        for bad in [
            "down 4096 14336 52.75 32.5",
            "down 4096 14336 52.75 32.5 1 9",
            "down 4096 14336 52.75 32.5 -1",
            "down x 14336 1 2 0",
            "down 1 2 NaN 3 0",
        ] {
            assert_eq!(ProductTiming::from_line(bad, &["down"]), None, "{bad}");
        }
    }

    #[test]
    fn gemv_takes_only_the_single_row_products_it_was_timed_faster_on() {
        let t = |name, out, inner, gemv_us, cublas_us| ProductTiming {
            name,
            out,
            inner,
            gemv_us,
            cublas_us,
            cublas_algo: 0,
        };
        let shapes = GemvShapes::from_timings(&[
            t("qkv", 6144, 4096, 20.2, 14.9),
            t("o", 4096, 4096, 13.1, 17.3),
            t("down", 4096, 14336, 31.7, 31.7),
        ]);
        assert!(shapes.preferred(1, 4096, 4096));
        assert!(!shapes.preferred(2, 4096, 4096), "more than one row goes to cuBLASLt");
        assert!(!shapes.preferred(1, 6144, 4096), "slower");
        assert!(!shapes.preferred(1, 4096, 14336), "a tie stays on cuBLASLt");
        assert!(!shapes.preferred(1, 4096, 4097), "not timed");
        assert!(!GemvShapes::default().preferred(1, 4096, 4096));
    }

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
