//! Rotary position embeddings, computed exactly like Hugging Face transformers.
//!
//! [`RopeTable`] precomputes, for positions `0..max_positions` and the `head_dim / 2`
//! frequencies, `cos` and `sin` of `angle = (pos as f32) * inv_freq[i]` (the product rounded to
//! f32, as in HF's f32 matmul), each evaluated in f64 and rounded to f32. `inv_freq[i] =
//! 1 / theta^(2i / head_dim)` in f32, then optionally rescaled (linear, or Llama 3's
//! `_compute_llama3_parameters`). Rotation uses HF's `rotate_half` pairing: element `j` pairs with
//! `j + head_dim / 2` inside each head. Both the reference and the fast kernel evaluate
//! `x1*cos - x2*sin`, `x2*cos + x1*sin` with separately rounded products (no FMA), so they agree
//! bit for bit.

use crate::error::{KernelError, check_len, mul};
use crate::isa::Isa;
use crate::pool::CpuPool;
use crate::profile::{self, KernelClass};

/// Frequency rescaling for context extension, as in a checkpoint's `rope_scaling`.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "linear"`: every `inv_freq` divided by `factor`.
    Linear {
        /// Divisor of every frequency.
        factor: f32,
    },
    /// `rope_type: "llama3"` (Llama 3.1+): low frequencies divided by `factor`, high ones kept,
    /// a smooth blend between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f32,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f32,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
}

/// Everything needed to build a [`RopeTable`].
#[derive(Clone, Debug)]
pub struct RopeConfig {
    /// Per-head dimension; must be even and non-zero.
    pub head_dim: usize,
    /// Base of the frequencies (`rope_theta`).
    pub theta: f32,
    /// Number of positions to precompute; positions at or past it are rejected.
    pub max_positions: usize,
    /// Optional frequency rescaling.
    pub scaling: Option<RopeScaling>,
}

/// Precomputed `cos`/`sin`, `(max_positions, head_dim / 2)` each.
#[derive(Clone, Debug)]
pub struct RopeTable {
    head_dim: usize,
    max_positions: usize,
    inv_freq: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

const KERNEL: &str = "RopeTable::new";

fn positive(name: &str, v: f32) -> Result<(), KernelError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(KernelError::shape(KERNEL, format!("{name} must be finite and > 0, got {v}")))
    }
}

impl RopeTable {
    /// Validates `cfg` and precomputes the table.
    pub fn new(cfg: &RopeConfig) -> Result<Self, KernelError> {
        if cfg.head_dim == 0 || !cfg.head_dim.is_multiple_of(2) {
            return Err(KernelError::shape(KERNEL, format!("head_dim must be even and > 0, got {}", cfg.head_dim)));
        }
        positive("theta", cfg.theta)?;
        let half = cfg.head_dim / 2;
        let total = mul(KERNEL, cfg.max_positions, half)?;
        let inv_freq = inv_freq(cfg)?;
        let mut cos = Vec::with_capacity(total);
        let mut sin = Vec::with_capacity(total);
        for pos in 0..cfg.max_positions {
            for &f in &inv_freq {
                let angle = f64::from(pos as f32 * f);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(RopeTable { head_dim: cfg.head_dim, max_positions: cfg.max_positions, inv_freq, cos, sin })
    }

    /// Number of precomputed positions.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Per-head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The (scaled) inverse frequencies, `head_dim / 2` of them.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `(cos, sin)` rows for `pos`, each `head_dim / 2` long; `None` past `max_positions`.
    pub fn cos_sin(&self, pos: usize) -> Option<(&[f32], &[f32])> {
        if pos >= self.max_positions {
            return None;
        }
        let half = self.head_dim / 2;
        let span = pos * half..(pos + 1) * half;
        Some((&self.cos[span.clone()], &self.sin[span]))
    }
}

/// HF `_compute_default_rope_parameters` plus the chosen scaling, all in f32.
fn inv_freq(cfg: &RopeConfig) -> Result<Vec<f32>, KernelError> {
    let dim = cfg.head_dim as f32;
    let base: Vec<f32> = (0..cfg.head_dim / 2).map(|i| 1.0 / cfg.theta.powf((2 * i) as f32 / dim)).collect();
    match &cfg.scaling {
        None => Ok(base),
        Some(RopeScaling::Linear { factor }) => {
            positive("linear factor", *factor)?;
            Ok(base.into_iter().map(|f| f / factor).collect())
        }
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            positive("llama3 factor", *factor)?;
            positive("llama3 low_freq_factor", *low_freq_factor)?;
            positive("llama3 high_freq_factor", *high_freq_factor)?;
            if high_freq_factor <= low_freq_factor || *original_max_position_embeddings == 0 {
                return Err(KernelError::shape(
                    KERNEL,
                    "llama3 needs high_freq_factor > low_freq_factor and \
                     original_max_position_embeddings > 0",
                ));
            }
            let (factor, low, high) = (*factor, *low_freq_factor, *high_freq_factor);
            let orig = *original_max_position_embeddings as f64;
            // Python floats (f64) meet f32 tensors: torch evaluates in f32.
            let low_wavelen = (orig / f64::from(low)) as f32;
            let high_wavelen = (orig / f64::from(high)) as f32;
            let band = (f64::from(high) - f64::from(low)) as f32;
            let two_pi = (2.0 * std::f64::consts::PI) as f32;
            Ok(base
                .into_iter()
                .map(|f| {
                    let wavelen = two_pi / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        let smooth = (orig as f32 / wavelen - low) / band;
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect())
        }
    }
}

fn check(
    kernel: &'static str,
    table: &RopeTable,
    x: &[f32],
    positions: &[u32],
    n_heads: usize,
) -> Result<(), KernelError> {
    let row = mul(kernel, n_heads, table.head_dim)?;
    check_len(kernel, "x", x.len(), mul(kernel, positions.len(), row)?)?;
    if let Some(&p) = positions.iter().find(|&&p| p as usize >= table.max_positions) {
        return Err(KernelError::shape(kernel, format!("position {p} >= max_positions {}", table.max_positions)));
    }
    Ok(())
}

/// Reference rotation of `x` `(positions.len(), n_heads * head_dim)` in place.
pub fn apply_rope_ref(table: &RopeTable, x: &mut [f32], positions: &[u32], n_heads: usize) -> Result<(), KernelError> {
    check("apply_rope_ref", table, x, positions, n_heads)?;
    let hd = table.head_dim;
    let half = hd / 2;
    if x.is_empty() {
        return Ok(());
    }
    for (token, &pos) in x.chunks_exact_mut(n_heads * hd).zip(positions) {
        let (cos, sin) = table.rows(pos);
        for head in token.chunks_exact_mut(hd) {
            for j in 0..half {
                let (x1, x2) = (head[j], head[j + half]);
                head[j] = x1 * cos[j] - x2 * sin[j];
                head[j + half] = x2 * cos[j] + x1 * sin[j];
            }
        }
    }
    Ok(())
}

/// Tokens' elements per parallel task (rounded to whole tokens).
const ELEMS_PER_TASK: usize = 16 * 1024;

/// Fast rotation: tokens in parallel on `pool`, SIMD across each half-head.
pub fn apply_rope(
    pool: &CpuPool,
    table: &RopeTable,
    x: &mut [f32],
    positions: &[u32],
    n_heads: usize,
) -> Result<(), KernelError> {
    check("apply_rope", table, x, positions, n_heads)?;
    let _timed = profile::scope(KernelClass::Rope, 8 * x.len(), 3 * x.len());
    if x.is_empty() {
        return Ok(());
    }
    let row = n_heads * table.head_dim;
    let tokens = (ELEMS_PER_TASK / row).max(1);
    let isa = pool.isa();
    pool.chunks_mut(x, tokens * row, |i, xs| {
        for (token, &pos) in xs.chunks_exact_mut(row).zip(&positions[i * tokens..]) {
            let (cos, sin) = table.rows(pos);
            for head in token.chunks_exact_mut(table.head_dim) {
                rotate(isa, head, cos, sin);
            }
        }
    });
    Ok(())
}

impl RopeTable {
    /// `(cos, sin)` for a position already checked against `max_positions`.
    fn rows(&self, pos: u32) -> (&[f32], &[f32]) {
        let half = self.head_dim / 2;
        let start = pos as usize * half;
        (&self.cos[start..start + half], &self.sin[start..start + half])
    }
}

fn rotate(isa: Isa, head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (a, b) = head.split_at_mut(half);
    #[cfg(target_arch = "x86_64")]
    let done = if isa.has_avx2() {
        // SAFETY: pools hold only supported ISAs, and every x86 SIMD ISA includes AVX2.
        unsafe { rotate_avx2(a, b, cos, sin) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = {
        let _ = isa;
        0
    };
    for j in done..half {
        let (x1, x2) = (a[j], b[j]);
        a[j] = x1 * cos[j] - x2 * sin[j];
        b[j] = x2 * cos[j] + x1 * sin[j];
    }
}

/// Rotates whole groups of 8 pairs; returns how many pairs it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn rotate_avx2(a: &mut [f32], b: &mut [f32], cos: &[f32], sin: &[f32]) -> usize {
    use crate::simd::avx2::{load, store};
    use std::arch::x86_64::*;
    let n = a.len().min(b.len()).min(cos.len()).min(sin.len());
    let mut j = 0;
    while j + 8 <= n {
        // SAFETY: `j + 8 <= n`, which bounds all four slices.
        unsafe {
            let (x1, x2) = (load(a, j), load(b, j));
            let (c, s) = (load(cos, j), load(sin, j));
            store(a, j, _mm256_sub_ps(_mm256_mul_ps(x1, c), _mm256_mul_ps(x2, s)));
            store(b, j, _mm256_add_ps(_mm256_mul_ps(x2, c), _mm256_mul_ps(x1, s)));
        }
        j += 8;
    }
    j
}
