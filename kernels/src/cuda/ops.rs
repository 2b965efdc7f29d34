//! Typed launches of the NVRTC kernels (`kernels/cuda/*.cu`), one method per kernel.
//!
//! Each method checks that every slice covers what the kernel will touch, then enqueues the
//! kernel on the device's stream. Integer metadata (token ids, positions, slots, block tables)
//! travels as `i32`/`u32` views into one per-step buffer.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::device::GpuDevice;
use super::plan::{GEMV_MAX_ROWS, flash_supports, gemv_fits};
use super::{CudaError, guard};

fn need(kernel: &'static str, what: &str, have: usize, want: usize) -> Result<(), CudaError> {
    if have < want {
        return Err(CudaError::Shape { kernel, detail: format!("{what} has {have} elements, needs {want}") });
    }
    Ok(())
}

fn to_i32(kernel: &'static str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Shape { kernel, detail: format!("{v} does not fit in an int") })
}

fn rows_config(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

fn elementwise_config(n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 65_535 * 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Arguments of [`GpuDevice::rope_kv_write`].
pub struct RopeKvArgs<'a> {
    /// Token positions, `(n)`.
    pub positions: &'a CudaView<'a, i32>,
    /// `cos` table, `(max_positions, head_dim / 2)`.
    pub cos: &'a CudaSlice<f32>,
    /// `sin` table, same shape.
    pub sin: &'a CudaSlice<f32>,
    /// Flat cache slot of each token (`block * block_size + offset`), `(n)`; negative = skip.
    pub slots: &'a CudaView<'a, i32>,
    /// Tokens.
    pub n: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key (and value) heads.
    pub n_kv_heads: usize,
    /// Elements per row of `qkv` (at least `(n_heads + 2 * n_kv_heads) * head_dim`).
    pub row_stride: usize,
    /// Head width.
    pub head_dim: usize,
}

/// 32-bit words per row of [`GpuDevice::sample`]'s parameters.
pub const SAMPLE_ROW_WORDS: usize = 5;

/// How `sample_rows` picks one row's token (its parameter words, in order).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleRow {
    /// `1 / temperature`; 0 means the arg-max.
    pub inv_temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: u32,
    /// Nucleus mass in (0, 1]; 1 keeps all.
    pub top_p: f32,
    /// Relative probability floor in [0, 1); 0 keeps all.
    pub min_p: f32,
    /// Uniform number in [0, 1) that picks the token.
    pub uniform: f32,
}

impl SampleRow {
    /// The arg-max.
    pub const GREEDY: SampleRow = SampleRow { inv_temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, uniform: 0.0 };

    /// The words the kernel reads (bit patterns, as the metadata buffer's `i32`s).
    pub fn words(&self) -> [i32; SAMPLE_ROW_WORDS] {
        [self.inv_temperature.to_bits(), self.top_k, self.top_p.to_bits(), self.min_p.to_bits(), self.uniform.to_bits()]
            .map(|w| w as i32)
    }
}

/// Arguments of [`GpuDevice::attention`].
pub struct AttentionArgs<'a> {
    /// Elements per row of the query buffer (queries start each row).
    pub q_stride: usize,
    /// Block tables, `(n_seqs, max_blocks_per_seq)`.
    pub block_tables: &'a CudaView<'a, i32>,
    /// Row length of `block_tables`.
    pub max_blocks_per_seq: usize,
    /// Sequence of each query, `(n_queries)`.
    pub query_seq: &'a CudaView<'a, i32>,
    /// Visible context end of each query, `(n_queries)`.
    pub context_lens: &'a CudaView<'a, i32>,
    /// Visible context start of each query, `(n_queries)`.
    pub window_starts: &'a CudaView<'a, i32>,
    /// Queries.
    pub n_queries: usize,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads.
    pub n_kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// The rows the CUDA-core kernel computes, with its split over the KV length.
    pub short_rows: ShortRows<'a>,
    /// Tiles of long chunks for the tensor-core kernel, `(n_tiles, 2)`: first row, row count;
    /// with `n_tiles` 0 that kernel does not run.
    pub flash_tiles: (&'a CudaView<'a, i32>, usize),
}

/// Which query rows go through the CUDA-core kernel (`paged_attention`).
#[derive(Clone, Copy)]
pub enum ShortRows<'a> {
    /// None of them (every row is in a flash tile).
    None,
    /// Every row, `0 .. n_queries`.
    All {
        /// `(n_parts, partition_size)` from [`attention_split`](super::plan::attention_split); the last partition of each
        /// query always runs to its context end.
        split: (usize, usize),
    },
    /// The listed rows.
    Listed {
        /// Row indices.
        rows: &'a CudaView<'a, i32>,
        /// How many.
        n: usize,
        /// As for `All`.
        split: (usize, usize),
    },
}

impl<'a> ShortRows<'a> {
    /// `n_short` of the `n_queries` rows: none, all (the kernel then needs no list), or the
    /// first `n_short` entries of `rows`.
    pub fn of(n_short: usize, n_queries: usize, rows: &'a CudaView<'a, i32>, split: (usize, usize)) -> Self {
        if n_short == 0 {
            ShortRows::None
        } else if n_short == n_queries {
            ShortRows::All { split }
        } else {
            ShortRows::Listed { rows, n: n_short, split }
        }
    }
}

/// Scratch for the split-KV attention, grown on demand. `generation` changes whenever the
/// buffers move, so captured graphs that point at them know to re-capture. Invariant: every
/// `done` counter is zero between launches (allocated zeroed; the kernel's last partition of
/// each (row, head) puts its counter back to zero).
#[derive(Default)]
pub struct AttentionScratch {
    acc: Option<CudaSlice<f32>>,
    max: Option<CudaSlice<f32>>,
    sum: Option<CudaSlice<f32>>,
    done: Option<CudaSlice<u32>>,
    generation: u64,
}

impl AttentionScratch {
    /// Grows the buffers to hold `partials` partial results of `head_dim` (no-op when big enough).
    pub fn reserve(&mut self, stream: &Arc<CudaStream>, partials: usize, head_dim: usize) -> Result<(), CudaError> {
        if self.max.as_ref().is_some_and(|m| m.len() >= partials)
            && self.acc.as_ref().is_some_and(|a| a.len() >= partials * head_dim)
        {
            return Ok(());
        }
        guard(|| {
            // Captured graphs point at the old buffers: invalidate them first, even if the new
            // allocation then fails.
            self.generation += 1;
            self.acc = None;
            self.max = None;
            self.sum = None;
            self.done = None;
            self.acc = Some(stream.alloc_zeros::<f32>(partials * head_dim)?);
            self.max = Some(stream.alloc_zeros::<f32>(partials)?);
            self.sum = Some(stream.alloc_zeros::<f32>(partials)?);
            // One counter per (row, head) is enough; one per partial keeps the sizing simple.
            self.done = Some(stream.alloc_zeros::<u32>(partials)?);
            Ok(())
        })
    }

    /// Changes whenever the buffers are reallocated.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl GpuDevice {
    /// `x[r, :] = table[ids[r], :]` as f32.
    pub fn embedding(
        &self,
        table: &CudaSlice<bf16>,
        ids: &CudaView<'_, i32>,
        x: &mut CudaSlice<f32>,
        n: usize,
        hidden: usize,
    ) -> Result<(), CudaError> {
        const K: &str = "embedding_gather";
        need(K, "ids", ids.len(), n)?;
        need(K, "x", x.len(), n * hidden)?;
        let (n_i, h_i) = (to_i32(K, n)?, to_i32(K, hidden)?);
        guard(|| {
            let mut b = self.stream().launch_builder(&self.kernels.embedding_gather);
            b.arg(table).arg(ids).arg(x).arg(&n_i).arg(&h_i);
            // SAFETY: lengths checked above; ids are validated against the vocabulary on the host.
            unsafe { b.launch(rows_config(n, 256)) }?;
            Ok(())
        })
    }

    /// `x += delta` (if given), then `out = rmsnorm(x) * weight`, per row.
    #[expect(clippy::too_many_arguments, reason = "mirrors the kernel's signature one to one")]
    pub fn add_rmsnorm(
        &self,
        x: &mut CudaSlice<f32>,
        delta: Option<&CudaSlice<bf16>>,
        weight: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        const K: &str = "add_rmsnorm";
        need(K, "x", x.len(), n * hidden)?;
        need(K, "out", out.len(), n * hidden)?;
        need(K, "weight", weight.len(), hidden)?;
        if let Some(d) = delta {
            need(K, "delta", d.len(), n * hidden)?;
        }
        let (n_i, h_i) = (to_i32(K, n)?, to_i32(K, hidden)?);
        let null: u64 = 0;
        guard(|| {
            let mut b = self.stream().launch_builder(&self.kernels.add_rmsnorm);
            b.arg(x);
            match delta {
                Some(d) => b.arg(d),
                None => b.arg(&null),
            };
            b.arg(weight).arg(out).arg(&n_i).arg(&h_i).arg(&eps);
            // One 8-wide chunk per thread where the row allows it (see norm.cu).
            let threads =
                if hidden.is_multiple_of(8) { (hidden / 8).next_multiple_of(32).clamp(64, 1024) } else { 256 };
            // SAFETY: lengths checked above.
            unsafe { b.launch(rows_config(n, threads as u32)) }?;
            Ok(())
        })
    }

    /// `out[i] = x[rows[i]]` for f32 rows of `hidden`.
    pub fn gather_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: &CudaView<'_, i32>,
        out: &mut CudaSlice<f32>,
        n_out: usize,
        hidden: usize,
    ) -> Result<(), CudaError> {
        const K: &str = "gather_rows";
        need(K, "rows", rows.len(), n_out)?;
        need(K, "out", out.len(), n_out * hidden)?;
        let (n_i, h_i) = (to_i32(K, n_out)?, to_i32(K, hidden)?);
        guard(|| {
            let mut b = self.stream().launch_builder(&self.kernels.gather_rows);
            b.arg(x).arg(rows).arg(out).arg(&n_i).arg(&h_i);
            // SAFETY: lengths checked above; row indices are produced by the backend (< n rows of x).
            unsafe { b.launch(rows_config(n_out, 256)) }?;
            Ok(())
        })
    }

    /// RoPE (rotate-half) on each row's query heads in place and on its key heads into
    /// `k_cache`, and its value heads copied into `v_cache`, at each token's slot.
    pub fn rope_kv_write(
        &self,
        qkv: &mut CudaSlice<bf16>,
        k_cache: &mut CudaSlice<bf16>,
        v_cache: &mut CudaSlice<bf16>,
        a: &RopeKvArgs<'_>,
    ) -> Result<(), CudaError> {
        const K: &str = "rope_kv_write";
        let heads = a.n_heads + 2 * a.n_kv_heads;
        if a.row_stride < heads * a.head_dim || !a.head_dim.is_multiple_of(2) {
            return Err(CudaError::Shape {
                kernel: K,
                detail: format!("rows of {} cannot hold {heads} heads of {}", a.row_stride, a.head_dim),
            });
        }
        need(K, "qkv", qkv.len(), a.n * a.row_stride)?;
        need(K, "positions", a.positions.len(), a.n)?;
        need(K, "slots", a.slots.len(), a.n)?;
        let args = [
            to_i32(K, a.n)?,
            to_i32(K, a.n_heads)?,
            to_i32(K, a.n_kv_heads)?,
            to_i32(K, a.row_stride)?,
            to_i32(K, a.head_dim)?,
        ];
        guard(|| {
            let mut b = self.stream().launch_builder(&self.kernels.rope_kv_write);
            b.arg(qkv).arg(a.positions).arg(a.cos).arg(a.sin).arg(k_cache).arg(v_cache).arg(a.slots);
            for v in &args {
                b.arg(v);
            }
            let threads = (a.head_dim / 2).next_multiple_of(32).clamp(32, 1024) as u32;
            let cfg = LaunchConfig {
                grid_dim: (a.n as u32, heads as u32, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: lengths checked above; positions were checked against the table on the host,
            // and slots come from block tables the engine allocated within the cache's capacity.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })
    }

    /// `out = silu(gate) * up` with `gate_up` rows `[gate | up]` of `2 * ffn`.
    pub fn silu_mul(
        &self,
        gate_up: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
        n: usize,
        ffn: usize,
    ) -> Result<(), CudaError> {
        const K: &str = "silu_mul";
        need(K, "gate_up", gate_up.len(), n * 2 * ffn)?;
        need(K, "out", out.len(), n * ffn)?;
        let (n_i, f_i) = (to_i32(K, n)?, to_i32(K, ffn)?);
        guard(|| {
            let mut b = self.stream().launch_builder(&self.kernels.silu_mul);
            b.arg(gate_up).arg(out).arg(&n_i).arg(&f_i);
            // SAFETY: lengths checked above.
            // Split each row over blockIdx.y so a decode step (few rows) still fills the GPU.
            let per_row = ffn.div_ceil(8 * 256).clamp(1, 16) as u32;
            let cfg = LaunchConfig { grid_dim: (n as u32, per_row, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            unsafe { b.launch(cfg) }?;
            Ok(())
        })
    }

    /// Paged attention: the tiles of long chunks on tensor cores (`flash_attention`), the
    /// other rows with CUDA cores (`paged_attention`, split over the KV length when too few
    /// blocks would leave the GPU idle; the last partition of each row and head combines them).
    pub fn attention(
        &self,
        q: &CudaSlice<bf16>,
        k_cache: &CudaSlice<bf16>,
        v_cache: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
        scratch: &mut AttentionScratch,
        a: &AttentionArgs<'_>,
    ) -> Result<(), CudaError> {
        const K: &str = "paged_attention";
        let q_dim = a.n_heads * a.head_dim;
        need(K, "q", q.len(), a.n_queries.saturating_sub(1) * a.q_stride + q_dim)?;
        need(K, "out", out.len(), a.n_queries * q_dim)?;
        need(K, "query_seq", a.query_seq.len(), a.n_queries)?;
        need(K, "context_lens", a.context_lens.len(), a.n_queries)?;
        need(K, "window_starts", a.window_starts.len(), a.n_queries)?;
        if a.n_kv_heads == 0 || !a.n_heads.is_multiple_of(a.n_kv_heads) {
            return Err(CudaError::Shape {
                kernel: K,
                detail: format!("{} query heads over {} KV heads", a.n_heads, a.n_kv_heads),
            });
        }
        if !a.head_dim.is_multiple_of(32) || a.head_dim > 256 {
            return Err(CudaError::Shape {
                kernel: K,
                detail: format!("needs head_dim a multiple of 32 up to 256, got {}", a.head_dim),
            });
        }
        let scale = 1.0 / (a.head_dim as f32).sqrt();
        let (q_stride, max_blocks) = (to_i32(K, a.q_stride)?, to_i32(K, a.max_blocks_per_seq)?);
        let (n_heads, n_kv_heads) = (to_i32(K, a.n_heads)?, to_i32(K, a.n_kv_heads)?);
        let (head_dim, block_size) = (to_i32(K, a.head_dim)?, to_i32(K, a.block_size)?);
        let (tiles, n_tiles) = a.flash_tiles;
        if n_tiles > 0 {
            const F: &str = "flash_attention";
            if !flash_supports(a.head_dim) {
                return Err(CudaError::Shape {
                    kernel: F,
                    detail: format!("head_dim {} is not 64 or 128", a.head_dim),
                });
            }
            need(F, "tiles", tiles.len(), 2 * n_tiles)?;
            let n_tiles_i = to_i32(F, n_tiles)?;
            guard(|| {
                let mut b = self.stream().launch_builder(&self.kernels.flash_attention);
                b.arg(q).arg(&q_stride).arg(k_cache).arg(v_cache).arg(a.block_tables).arg(&max_blocks);
                b.arg(a.query_seq).arg(a.context_lens).arg(a.window_starts).arg(tiles).arg(&mut *out);
                b.arg(&n_tiles_i).arg(&n_heads).arg(&n_kv_heads).arg(&head_dim).arg(&block_size).arg(&scale);
                let cfg = LaunchConfig {
                    grid_dim: (n_tiles as u32, a.n_heads as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: lengths checked above; tiles, block tables and context lengths are
                // built by the backend from the engine's allocations.
                unsafe { b.launch(cfg) }?;
                Ok(())
            })?;
        }
        let (rows, n_rows, (n_parts, partition)) = match a.short_rows {
            ShortRows::None => return Ok(()),
            ShortRows::All { split } => (None, a.n_queries, split),
            ShortRows::Listed { rows, n, split } => {
                need(K, "rows", rows.len(), n)?;
                (Some(rows), n, split)
            }
        };
        if n_rows == 0 {
            return Ok(());
        }
        if n_parts == 0 || partition == 0 {
            return Err(CudaError::Shape { kernel: K, detail: format!("invalid split {n_parts} x {partition}") });
        }
        if n_parts > 1 {
            scratch.reserve(self.stream(), n_rows * a.n_heads * n_parts, a.head_dim)?;
        }
        let (n_rows_i, partition_i, n_parts_i) = (to_i32(K, n_rows)?, to_i32(K, partition)?, to_i32(K, n_parts)?);
        guard(|| {
            let stream = self.stream();
            let null: u64 = 0;
            let mut b = stream.launch_builder(&self.kernels.paged_attention);
            b.arg(q).arg(&q_stride).arg(k_cache).arg(v_cache).arg(a.block_tables).arg(&max_blocks);
            b.arg(a.query_seq).arg(a.context_lens).arg(a.window_starts);
            match rows {
                Some(r) => b.arg(r),
                None => b.arg(&null),
            };
            b.arg(&mut *out);
            match (&mut scratch.acc, &mut scratch.max, &mut scratch.sum, &mut scratch.done) {
                (Some(acc), Some(max), Some(sum), Some(done)) if n_parts > 1 => {
                    b.arg(acc).arg(max).arg(sum).arg(done);
                }
                _ if n_parts > 1 => return Err(CudaError::Shape { kernel: K, detail: "missing scratch".into() }),
                _ => {
                    b.arg(&null).arg(&null).arg(&null).arg(&null);
                }
            }
            b.arg(&n_rows_i).arg(&n_heads).arg(&n_kv_heads).arg(&head_dim).arg(&block_size);
            b.arg(&partition_i).arg(&n_parts_i).arg(&scale);
            let cfg = LaunchConfig {
                grid_dim: (n_rows as u32, a.n_heads as u32, n_parts as u32),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: lengths checked above; block tables and context lengths are built by the
            // backend from the engine's allocations.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })
    }

    /// Picks each bf16 row's token (`sample_rows`): the arg-max for a greedy row, else a draw
    /// by the row's [`SampleRow`] words in `params` (`rows * SAMPLE_ROW_WORDS`).
    pub fn sample(
        &self,
        logits: &CudaSlice<bf16>,
        params: &CudaView<'_, i32>,
        rows: usize,
        vocab: usize,
        out: &mut CudaSlice<u32>,
    ) -> Result<(), CudaError> {
        const K: &str = "sample_rows";
        need(K, "logits", logits.len(), rows * vocab)?;
        need(K, "params", params.len(), rows * SAMPLE_ROW_WORDS)?;
        need(K, "out", out.len(), rows)?;
        let v = to_i32(K, vocab)?;
        guard(|| {
            let mut b = self.stream().launch_builder(&self.kernels.sample_rows);
            b.arg(logits).arg(&v).arg(params).arg(out);
            // SAFETY: lengths checked above; the kernel writes only `out[..rows]`.
            unsafe { b.launch(rows_config(rows, 1024)) }?;
            Ok(())
        })
    }

    /// `y (rows, out) = x (rows, inner) · w (out, inner)ᵀ` for a few rows (see [`gemv_fits`]),
    /// streaming the weights at close to the memory bandwidth.
    pub fn gemv(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        y: &mut CudaSlice<bf16>,
        rows: usize,
        out: usize,
        inner: usize,
    ) -> Result<(), CudaError> {
        const K: &str = "gemv_bf16";
        if !gemv_fits(rows, inner) {
            return Err(CudaError::Shape {
                kernel: K,
                detail: format!("{rows} rows of width {inner} (needs 1..={GEMV_MAX_ROWS} rows, width a multiple of 8)"),
            });
        }
        need(K, "x", x.len(), rows * inner)?;
        need(K, "w", w.len(), out * inner)?;
        need(K, "y", y.len(), rows * out)?;
        let (m, n, k) = (to_i32(K, rows)?, to_i32(K, out)?, to_i32(K, inner)?);
        let cfg =
            LaunchConfig { grid_dim: (out.div_ceil(4) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        guard(|| {
            if self.overlaps_launches() {
                // The weights stream in while the kernel before (which lets it) finishes.
                let stream = self.stream();
                let ((xp, _x), (wp, _w), (yp, _y)) =
                    (x.device_ptr(stream), w.device_ptr(stream), y.device_ptr_mut(stream));
                let pointer = |p: &u64| (p as *const u64).cast_mut().cast::<c_void>();
                let int = |i: &i32| (i as *const i32).cast_mut().cast::<c_void>();
                let mut params = [pointer(&xp), pointer(&wp), pointer(&yp), int(&m), int(&n), int(&k)];
                // SAFETY: as below; `params` point at a CUdeviceptr per pointer parameter and an
                // i32 per int, in the kernel's order, alive for the call; gemv_bf16 waits on the
                // kernel before it ahead of reading x or writing y (`gemv.cu`).
                return unsafe { self.launch_overlapping(&self.kernels.gemv_bf16, cfg, &mut params) };
            }
            let mut b = self.stream().launch_builder(&self.kernels.gemv_bf16);
            b.arg(x).arg(w).arg(y).arg(&m).arg(&n).arg(&k);
            // SAFETY: lengths checked above; device allocations are 256-byte aligned, as the
            // kernel's 16-byte loads need.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })
    }

    /// Widens `n` bf16 values to f32.
    pub fn bf16_to_f32(&self, input: &CudaSlice<bf16>, out: &mut CudaSlice<f32>, n: usize) -> Result<(), CudaError> {
        const K: &str = "bf16_rows_to_f32";
        need(K, "input", input.len(), n)?;
        need(K, "out", out.len(), n)?;
        let n_i = n as i64;
        guard(|| {
            let mut b = self.stream().launch_builder(&self.kernels.bf16_rows_to_f32);
            b.arg(input).arg(out).arg(&n_i);
            // SAFETY: lengths checked above.
            unsafe { b.launch(elementwise_config(n)) }?;
            Ok(())
        })
    }
}
