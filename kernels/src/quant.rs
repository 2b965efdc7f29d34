//! ggml block-quantised weights — Q8_0, Q4_0, Q4_1 — as the matmul kernels read them.
//!
//! A block holds [`QK`] = 32 consecutive values of one weight row: an f16 scale `d` (and for
//! Q4_1 an f16 minimum `m`) followed by the quantised values. [`QuantBlock::dequantize`] defines
//! each value exactly as ggml's reference code does, in f32 and in ggml's operation order
//! (Q8_0 `d * q`; Q4_0 `(q - 8) * d`; Q4_1 `q * d + m`, a multiply then an add, never fused), so
//! the kernels' reference agrees bit for bit with ggml and the Python `gguf` package.
//!
//! Q4 nibble order: byte `j` of a block holds value `j` in its low nibble and value `j + 16` in
//! its high nibble.
//!
//! The fast kernels never expand a matrix: decode reads the blocks and widens them in registers
//! (`crate::matmul`), prefill widens a few L2-sized rows at a time into a per-thread buffer.

use half::f16;

pub mod panels;

/// Values per block.
pub const QK: usize = 32;

/// Q8_0: `x = d * q` with 32 `i8` values.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Quantised values.
    pub qs: [i8; QK],
}

/// Q4_0: `x = (q - 8) * d` with 4-bit `q`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ4_0 {
    /// Scale.
    pub d: f16,
    /// Nibbles: value `j` low, value `j + 16` high.
    pub qs: [u8; QK / 2],
}

/// Q4_1: `x = q * d + m` with 4-bit `q`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f16,
    /// Minimum.
    pub m: f16,
    /// Nibbles: value `j` low, value `j + 16` high.
    pub qs: [u8; QK / 2],
}

/// A block format the kernels can read.
pub trait QuantBlock: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// ggml's name of the format.
    const NAME: &'static str;
    /// Bytes per block in a GGUF file.
    const BYTES: usize;

    /// Decodes one block from its GGUF bytes (little-endian).
    ///
    /// # Panics
    /// If `bytes.len() != Self::BYTES` (a caller bug: lengths are checked at the file level).
    fn from_bytes(bytes: &[u8]) -> Self;

    /// The block's 32 values, exactly as ggml computes them.
    fn dequantize(&self) -> [f32; QK];
}

fn f16_at(bytes: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]])
}

impl QuantBlock for BlockQ8_0 {
    const NAME: &'static str = "Q8_0";
    const BYTES: usize = 2 + QK;

    fn from_bytes(bytes: &[u8]) -> Self {
        assert_eq!(bytes.len(), Self::BYTES, "Q8_0 block length");
        let mut qs = [0i8; QK];
        for (q, &b) in qs.iter_mut().zip(&bytes[2..]) {
            *q = i8::from_le_bytes([b]);
        }
        BlockQ8_0 { d: f16_at(bytes, 0), qs }
    }

    fn dequantize(&self) -> [f32; QK] {
        let d = self.d.to_f32();
        self.qs.map(|q| d * f32::from(q))
    }
}

impl BlockQ8_0 {
    /// Quantises 32 values as ggml's `quantize_row_q8_0_ref` does: `d = max|x| / 127`, each value
    /// rounded half away from zero after multiplying by `1 / d`.
    pub fn quantize(x: &[f32; QK]) -> Self {
        let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        // |x * id| ≤ 127 (plus rounding), so the cast cannot saturate except on NaN input.
        let qs = x.map(|v| (v * id).round() as i8);
        BlockQ8_0 { d: f16::from_f32(d), qs }
    }
}

/// The 32 nibbles of a Q4 block in value order.
fn nibbles(qs: &[u8; QK / 2]) -> [u8; QK] {
    std::array::from_fn(|i| if i < QK / 2 { qs[i] & 0x0F } else { qs[i - QK / 2] >> 4 })
}

impl QuantBlock for BlockQ4_0 {
    const NAME: &'static str = "Q4_0";
    const BYTES: usize = 2 + QK / 2;

    fn from_bytes(bytes: &[u8]) -> Self {
        assert_eq!(bytes.len(), Self::BYTES, "Q4_0 block length");
        let mut qs = [0u8; QK / 2];
        qs.copy_from_slice(&bytes[2..]);
        BlockQ4_0 { d: f16_at(bytes, 0), qs }
    }

    fn dequantize(&self) -> [f32; QK] {
        let d = self.d.to_f32();
        nibbles(&self.qs).map(|q| f32::from(i16::from(q) - 8) * d)
    }
}

impl QuantBlock for BlockQ4_1 {
    const NAME: &'static str = "Q4_1";
    const BYTES: usize = 4 + QK / 2;

    fn from_bytes(bytes: &[u8]) -> Self {
        assert_eq!(bytes.len(), Self::BYTES, "Q4_1 block length");
        let mut qs = [0u8; QK / 2];
        qs.copy_from_slice(&bytes[4..]);
        BlockQ4_1 { d: f16_at(bytes, 0), m: f16_at(bytes, 2), qs }
    }

    fn dequantize(&self) -> [f32; QK] {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        nibbles(&self.qs).map(|q| f32::from(q) * d + m)
    }
}

/// Writes the values of `blocks` (one or more whole rows' worth) into `out`.
///
/// # Panics
/// If `out.len() != blocks.len() * QK`.
pub fn dequantize_into<B: QuantBlock>(blocks: &[B], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK, "dequantize_into: output length");
    for (o, b) in out.chunks_exact_mut(QK).zip(blocks) {
        o.copy_from_slice(&b.dequantize());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trip_is_within_half_a_step() {
        let x: [f32; QK] = std::array::from_fn(|i| (i as f32 - 13.5) * 0.37);
        let b = BlockQ8_0::quantize(&x);
        let y = b.dequantize();
        let step = b.d.to_f32();
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() <= 0.5 * step + 1e-3 * step.max(1.0)));
        assert_eq!(BlockQ8_0::quantize(&[0.0; QK]).dequantize(), [0.0; QK]);
        let bytes: Vec<u8> = b.d.to_le_bytes().into_iter().chain(b.qs.iter().map(|q| q.to_le_bytes()[0])).collect();
        assert_eq!(BlockQ8_0::from_bytes(&bytes), b);
    }

    #[test]
    fn q4_nibble_order() {
        let mut bytes = f16::from_f32(2.0).to_le_bytes().to_vec();
        bytes.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let v = BlockQ4_0::from_bytes(&bytes).dequantize();
        for j in 0..16 {
            assert_eq!(v[j], (j as f32 - 8.0) * 2.0);
            assert_eq!(v[j + 16], (7.0 - j as f32) * 2.0);
        }
        let mut bytes = f16::from_f32(0.25).to_le_bytes().to_vec();
        bytes.extend(f16::from_f32(-1.5).to_le_bytes());
        bytes.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let v = BlockQ4_1::from_bytes(&bytes).dequantize();
        for j in 0..16 {
            assert_eq!(v[j], j as f32 * 0.25 - 1.5);
            assert_eq!(v[j + 16], (15 - j) as f32 * 0.25 - 1.5);
        }
    }
}
