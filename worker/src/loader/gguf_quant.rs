//! ggml tensor encodings: [`GgmlType`] (ids, names, block geometry) and dequantisation of
//! F32, F16, BF16, Q8_0, Q4_0 and Q4_1 to f32. (`GgmlType` is re-exported from `gguf`.)
//!
//! Invariants:
//! - Every element is computed in f32 in exactly the operation order of ggml's reference code and
//!   of the Python `gguf` package (which our reference fixtures use), so results agree
//!   bit-for-bit: Q8_0 `d * q`, Q4_0 `(q - 8) * d`, Q4_1 `q * d + m` (a multiply then an add,
//!   never fused), with the f16 scales widened to f32 first.
//! - Lengths are checked before any work: the output must be a whole number of blocks and the
//!   input exactly that many blocks' bytes, otherwise an error and no panic.

use half::{bf16, f16};
use tessera_kernels::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, QK, QuantBlock};

/// A tensor encoding. Only the ones we can dequantise have their own variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// ggml type 0.
    F32,
    /// ggml type 1.
    F16,
    /// ggml type 30.
    Bf16,
    /// ggml type 2: blocks of 32 as an f16 scale and 16 bytes of 4-bit values offset by 8.
    Q4_0,
    /// ggml type 3: blocks of 32 as an f16 scale, an f16 minimum and 16 bytes of 4-bit values.
    Q4_1,
    /// ggml type 8: blocks of 32 as an f16 scale and 32 `i8` values.
    Q8_0,
    /// Any other ggml type id (K-quants, i-quants, integers, …), kept so it can be named.
    Other(u32),
}

/// ggml's type names by id, space-separated; `-` marks ids that were removed from ggml.
const GGML_TYPE_NAMES: &str = "F32 F16 Q4_0 Q4_1 - - Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K IQ2_XXS IQ2_XS \
    IQ3_XXS IQ1_S IQ4_NL IQ3_S IQ2_S IQ4_XS I8 I16 I32 I64 F64 IQ1_M BF16 - - - TQ1_0 TQ2_0 - - - MXFP4";

impl GgmlType {
    /// The type with ggml id `id`.
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::Bf16,
            other => GgmlType::Other(other),
        }
    }

    /// The ggml id of this type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Bf16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// ggml's name for the type ("Q4_1", "Q6_K", …), or "unknown" for ids ggml never had.
    pub fn name(self) -> &'static str {
        let index = usize::try_from(self.id()).unwrap_or(usize::MAX);
        GGML_TYPE_NAMES.split_whitespace().nth(index).filter(|&n| n != "-").unwrap_or("unknown")
    }

    /// Elements per block (1 for plain floats); `None` for `Other` types.
    pub fn block_size(self) -> Option<u64> {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => Some(1),
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => Some(32),
            GgmlType::Other(_) => None,
        }
    }

    /// Bytes per block; `None` for `Other` types.
    pub fn block_bytes(self) -> Option<u64> {
        match self {
            GgmlType::F32 => Some(4),
            GgmlType::F16 | GgmlType::Bf16 => Some(2),
            GgmlType::Q4_0 => Some(2 + 16),
            GgmlType::Q4_1 => Some(2 + 2 + 16),
            GgmlType::Q8_0 => Some(2 + 32),
            GgmlType::Other(_) => None,
        }
    }

    /// Bytes taken by `n_elements` values, or `None` for `Other` types, counts that are not a
    /// whole number of blocks, and overflow.
    pub fn byte_len(self, n_elements: u64) -> Option<u64> {
        let block = self.block_size()?;
        if !n_elements.is_multiple_of(block) {
            return None;
        }
        (n_elements / block).checked_mul(self.block_bytes()?)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (ggml type {})", self.name(), self.id())
    }
}

/// Decodes `bytes` (encoded as `ty`) into `out`, which fixes the element count.
///
/// Errors if `ty` cannot be dequantised here or the lengths do not match.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    let (Some(block), Some(block_bytes)) = (ty.block_size(), ty.block_bytes()) else {
        return Err(format!("cannot dequantise {ty}"));
    };
    // Both are small constants (≤ 34); they fit any usize.
    let (block, block_bytes) = (block as usize, block_bytes as usize);
    if !out.len().is_multiple_of(block) {
        return Err(format!("{} values are not a whole number of {ty} blocks of {block}", out.len()));
    }
    let expected = (out.len() / block).checked_mul(block_bytes);
    if expected != Some(bytes.len()) {
        return Err(format!("{} bytes of {ty} data for {} values (expected {expected:?})", bytes.len(), out.len()));
    }
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.as_chunks::<4>().0) {
                *o = f32::from_le_bytes(*b);
            }
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.as_chunks::<2>().0) {
                *o = f16::from_le_bytes(*b).to_f32();
            }
        }
        GgmlType::Bf16 => {
            for (o, b) in out.iter_mut().zip(bytes.as_chunks::<2>().0) {
                *o = bf16::from_le_bytes(*b).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.as_chunks_mut::<QK>().0.iter_mut().zip(bytes.chunks_exact(BlockQ8_0::BYTES)) {
                dequantize_block::<BlockQ8_0>(b, o);
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.as_chunks_mut::<QK>().0.iter_mut().zip(bytes.chunks_exact(BlockQ4_0::BYTES)) {
                dequantize_block::<BlockQ4_0>(b, o);
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.as_chunks_mut::<QK>().0.iter_mut().zip(bytes.chunks_exact(BlockQ4_1::BYTES)) {
                dequantize_block::<BlockQ4_1>(b, o);
            }
        }
        GgmlType::Other(_) => return Err(format!("cannot dequantise {ty}")),
    }
    Ok(())
}

/// One block, decoded by the kernels' definition of the format (ggml's, bit for bit).
fn dequantize_block<B: QuantBlock>(block: &[u8], out: &mut [f32; QK]) {
    *out = B::from_bytes(block).dequantize();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn plain_floats() {
        let mut out = [0.0f32; 3];
        let bytes: Vec<u8> = [1.5f32, -2.25, 1e-30].iter().flat_map(|x| x.to_le_bytes()).collect();
        dequantize(GgmlType::F32, &bytes, &mut out).unwrap();
        assert_eq!(out, [1.5, -2.25, 1e-30]);

        let bytes: Vec<u8> = [1.5f32, -2.25, 65504.0].iter().flat_map(|&x| f16_bytes(x)).collect();
        dequantize(GgmlType::F16, &bytes, &mut out).unwrap();
        assert_eq!(out, [1.5, -2.25, 65504.0]);

        // bf16 is the top half of an f32: 0x3FC0 = 1.5, 0xC010 = -2.25, 0x7F80 = +inf.
        let bytes = [0xC0, 0x3F, 0x10, 0xC0, 0x80, 0x7F];
        dequantize(GgmlType::Bf16, &bytes, &mut out).unwrap();
        assert_eq!(out, [1.5, -2.25, f32::INFINITY]);
    }

    #[test]
    fn q8_0_block() {
        let mut block = f16_bytes(0.5).to_vec();
        let qs: Vec<i8> = (0..32i16).map(|i| i8::try_from(i * 8 - 128).unwrap()).collect();
        block.extend(qs.iter().map(|q| q.to_le_bytes()[0]));
        let mut out = [0.0f32; 32];
        dequantize(GgmlType::Q8_0, &block, &mut out).unwrap();
        for (i, (&x, &q)) in out.iter().zip(&qs).enumerate() {
            assert_eq!(x, 0.5 * f32::from(q), "element {i}");
        }
        assert_eq!(out[0], -64.0);
        assert_eq!(out[31], 0.5 * 120.0);
    }

    #[test]
    fn q4_0_block_nibble_order() {
        let mut block = f16_bytes(2.0).to_vec();
        // Byte j holds value j in its low nibble and 15 - j in its high nibble.
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = [0.0f32; 32];
        dequantize(GgmlType::Q4_0, &block, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 2.0, "low nibble {j}");
            assert_eq!(out[j + 16], (7.0 - j as f32) * 2.0, "high nibble {j}");
        }
    }

    #[test]
    fn q4_1_block_nibble_order_and_min() {
        let mut block = f16_bytes(0.25).to_vec();
        block.extend(f16_bytes(-1.5));
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = [0.0f32; 32];
        dequantize(GgmlType::Q4_1, &block, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.25 - 1.5, "low nibble {j}");
            assert_eq!(out[j + 16], (15 - j) as f32 * 0.25 - 1.5, "high nibble {j}");
        }
    }

    #[test]
    fn multiple_blocks_in_order() {
        let mut bytes = Vec::new();
        for d in [1.0f32, -3.0] {
            bytes.extend(f16_bytes(d));
            bytes.extend([1u8; 32]);
        }
        let mut out = [0.0f32; 64];
        dequantize(GgmlType::Q8_0, &bytes, &mut out).unwrap();
        assert!(out[..32].iter().all(|&x| x == 1.0));
        assert!(out[32..].iter().all(|&x| x == -3.0));
    }

    #[test]
    fn length_mismatches_and_unknown_types_are_errors() {
        let mut out = [0.0f32; 32];
        assert!(dequantize(GgmlType::Q8_0, &[0; 33], &mut out).is_err());
        assert!(dequantize(GgmlType::Q4_0, &[0; 19], &mut out).is_err());
        assert!(dequantize(GgmlType::F32, &[0; 127], &mut out).is_err());
        assert!(dequantize(GgmlType::Q4_1, &[0; 20], &mut out[..31]).is_err());
        assert!(dequantize(GgmlType::Other(12), &[0; 144], &mut out).is_err());
        assert!(dequantize(GgmlType::F16, &[], &mut []).is_ok());
    }
}
