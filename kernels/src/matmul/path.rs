//! Which kernel a decode-sized or larger matmul call takes: the input rounding a call allows
//! ([`InputRounding`]), and the one decision (`path`) that both the input's preparation
//! (`Input::new`) and the per-task dispatch (`run_task`) read, so the two cannot disagree.

#[cfg(target_arch = "x86_64")]
use super::DECODE_MAX_TOKENS;
#[cfg(target_arch = "x86_64")]
use crate::isa::Isa;
#[cfg(target_arch = "x86_64")]
use crate::weights::WeightData;

/// The coarsest rounding a call may give its token rows (only the SIMD ISAs round them at all,
/// and only in decode-sized calls except against Q8_0 weights in row panels). A pool carries one ([`CpuPool::with_input_rounding`](crate::CpuPool::with_input_rounding)), and a call may ask for
/// finer ([`matmul_with`](super::matmul_with)). Declared from finest to coarsest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum InputRounding {
    /// None: f32 token rows on every path, the reference's arithmetic up to the order of the
    /// sums (for comparisons against it; slower for quantised and bf16 weights).
    Exact,
    /// bf16 at most (relative error 2⁻⁹ per value; the AVX-512 BF16 ISA's bf16 dot products,
    /// which attention over a bf16 KV cache also takes for its query and softmax weights, see
    /// [`paged_attention`](crate::attention::paged_attention)). The default, and what logits always
    /// get. Token rows against Q8_0 weights are quantised to 16 bits per 32-value block instead —
    /// in decode-sized calls (on the AVX-512 BF16 ISA up to two of them) against plain blocks, in
    /// every call against row panels ([`crate::quant::panels`]) on that ISA: each value moves by
    /// at most `max|x| / 65534` of its block, less than bf16 moves every value above 2⁻⁷ of that
    /// largest one.
    Bf16,
    /// 8 bits per 32-value block for the VNNI integer dot products (Q8_0 weights, 2 to 8 token
    /// rows on the AVX-512 BF16 ISA), as llama.cpp does: each value may move by half a
    /// quantisation step of its block (`max|x| / 254`). Opt-in: on SmolLM2-135M it moves short
    /// prompts' logits by up to 0.5, and on the test host (AMD Zen 4) it is no faster than the
    /// bf16 dot products, which share each token chunk's load across a tile of rows.
    Int8,
}

/// Most token rows for which Q8_0 weights keep the 16-bit path on the AVX-512 BF16 ISA. The 16-bit
/// path widens a block's weights once for up to four tokens but pays its integer products, the
/// conversion and the scales per token; the bf16 path dequantises once and pays one dot product
/// per token. Streaming SmolLM2-135M's Q8_0 layer matrices on the test host (2 threads,
/// alternating): 16-bit ÷ bf16 time 0.88 at 2 tokens, 1.00 at 3, 1.11 at 4, 1.56 at 8.
#[cfg(target_arch = "x86_64")]
const INT16_BESIDE_BF16_TOKENS: usize = 2;

/// Which path a call of `m` token rows against `w` takes on `isa` — the one decision both the
/// input's preparation (`Input::new`) and the per-task dispatch (`run_task`) read.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Path {
    /// bf16 dot products against bf16-rounded token rows (`bf16_dot`, `quantized_bf16`).
    Bf16Dot,
    /// f32 FMAs against bf16 weights widened in pairs, f32 token rows split to match
    /// (`bf16_pairs`).
    Bf16Pairs,
    /// Integer dot products against 8-bit-quantised token rows (`quantized_vnni`).
    Int8Dot,
    /// Integer dot products against 16-bit-quantised token rows (`quantized_i16`).
    Int16Dot,
    /// Integer dot products of Q8_0 weights in row panels against 16-bit-quantised token rows
    /// (`quantized_panels`).
    Int16Panels,
    /// f32 token rows: the tile kernels, or the quantised formats' own (`quantized`).
    F32,
}

/// Under [`InputRounding::Exact`] every call takes the f32 path. Otherwise:
/// - Q8_0 weights in row panels, on the ISAs with VNNI, any number of tokens: 16-bit integer dot
///   products (`quantized_panels`; prefill too, as they outrun the f32 tiles); on the other ISAs
///   the f32 path over widened rows;
/// - plain Q8_0 weights, 2 to [`DECODE_MAX_TOKENS`](super::DECODE_MAX_TOKENS) tokens on the ISAs
///   with VNNI where 8-bit rows are allowed: 8-bit integer dot products (`quantized_vnni`);
/// - plain Q8_0 weights, one token on every SIMD ISA, up to [`INT16_BESIDE_BF16_TOKENS`] on the
///   AVX-512 BF16 ISA unless 8-bit rows are allowed, or up to [`DECODE_MAX_TOKENS`](super::DECODE_MAX_TOKENS) off that ISA:
///   16-bit integer dot products (the f32 path's conversions, multiplies and FMAs would bind
///   before memory does);
/// - on the AVX-512 BF16 ISA, up to [`DECODE_MAX_TOKENS`](super::DECODE_MAX_TOKENS) tokens: bf16 weights always take bf16
///   dot products; block-quantised ones from 2 tokens on (with several tokens the f32 path's four
///   FMAs per block and token are what bind) take bf16 ones (plain Q8_0 from 3 tokens on, where
///   8-bit rows are not allowed);
/// - on the AVX-512 ISAs without bf16 dot products, bf16 weights against 2 to
///   [`DECODE_MAX_TOKENS`](super::DECODE_MAX_TOKENS) tokens: f32 FMAs with the weights widened
///   in pairs (`bf16_pairs`; the tiles' widening and reductions would bind before memory does);
/// - everything else (a lone Q4 token, which is bound by memory and which `quantized_avx2`
///   dequantises exactly; f32 and f16 weights; prefill) takes the f32 path.
#[cfg(target_arch = "x86_64")]
pub(super) fn path(isa: Isa, w: &WeightData, m: usize, rounding: InputRounding) -> Path {
    if rounding == InputRounding::Exact {
        return Path::F32;
    }
    if let WeightData::Q8_0Panels(_) = w {
        return if isa.has_vnni() { Path::Int16Panels } else { Path::F32 };
    }
    let q8_0 = matches!(w, WeightData::Q8_0(_));
    if q8_0 && isa.has_vnni() && (2..=DECODE_MAX_TOKENS).contains(&m) && rounding == InputRounding::Int8 {
        return Path::Int8Dot;
    }
    if q8_0
        && isa.has_avx2()
        && (m == 1
            || isa != Isa::Avx512Bf16 && m <= DECODE_MAX_TOKENS
            || m <= INT16_BESIDE_BF16_TOKENS && rounding < InputRounding::Int8)
    {
        return Path::Int16Dot;
    }
    if isa.has_wide_f32_tiles() && (2..=DECODE_MAX_TOKENS).contains(&m) && matches!(w, WeightData::Bf16(_)) {
        return Path::Bf16Pairs;
    }
    if isa != Isa::Avx512Bf16 || m > DECODE_MAX_TOKENS {
        return Path::F32;
    }
    match w {
        WeightData::Bf16(_) => Path::Bf16Dot,
        WeightData::Q8_0(_) | WeightData::Q4_0(_) | WeightData::Q4_1(_) if m >= 2 => Path::Bf16Dot,
        _ => Path::F32,
    }
}
