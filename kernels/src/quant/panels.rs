//! Q8_0 in row panels: a weight matrix's Q8_0 blocks regrouped so that 16 consecutive rows (a
//! panel) sit side by side, one row per 32-bit lane of a 512-bit vector. The decode kernel
//! `matmul::quantized_panels` reads it with AVX-512 VNNI's `vpdpwssd`: each step widens 16 rows'
//! next value pair with one `vpmovsxbw` and multiplies it by one token pair broadcast to every
//! lane, so each lane accumulates its own row's integer dot product for a block, the 16 rows'
//! block scales are applied by one vector operation per block and token, and a panel's 16 sums
//! come out in 16 lanes with no horizontal reduction.
//!
//! **Layout.** Rows are cut into panels of [`PANEL`] rows, the last one possibly shorter. A panel
//! of `h` rows and `n` blocks per row takes `h · n · 34` bytes — as many as its plain blocks — so
//! panel `p` starts at byte `16 · p · n · 34`. Within it, block column `c` starts at
//! `c · h · 34`: the `h` rows' f16 scales `d` in row order (`2h` bytes, little-endian), then 16
//! steps of `h` value pairs, step `s` holding values `2s` and `2s + 1` of each row's block in row
//! order (`2h` bytes each).
//!
//! The values are the blocks' own: `d · q`, dequantised exactly as plain Q8_0 ([`crate::quant`]).

use half::f16;

use super::{BlockQ8_0, QK, QuantBlock};
use crate::isa::Isa;
use crate::matmul::InputRounding;

/// Rows per panel: one per 32-bit lane of a 512-bit vector.
pub const PANEL: usize = 16;
/// Bytes per block, as in plain Q8_0: a 2-byte scale and 32 one-byte values.
pub const BLOCK_BYTES: usize = <BlockQ8_0 as QuantBlock>::BYTES;
/// Value pairs per block: the steps of a block column.
pub const STEPS: usize = QK / 2;

/// Whether Q8_0 matrices are best held in row panels for pools on `isa` whose matmul inputs may be
/// rounded as `rounding` allows: on the ISAs with VNNI ([`Isa::has_vnni`]), where matmuls read them
/// with 16-bit integer dot products, unless 8-bit inputs are allowed (plain Q8_0 keeps its 8-bit
/// VNNI path for those) or none at all. Other ISAs read panels only by widening rows to f32
/// (exact, but their slow path), so plain blocks suit them.
pub fn pays_off(isa: Isa, rounding: InputRounding) -> bool {
    isa.has_vnni() && rounding == InputRounding::Bf16
}

/// Where a panel lies: its first byte and its height.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Panel {
    /// Byte offset of the panel in the matrix.
    pub start: usize,
    /// Rows in it: [`PANEL`], or fewer for the last panel of a matrix whose rows are not whole
    /// panels.
    pub height: usize,
}

impl Panel {
    /// Panel `p` of a matrix of `rows` rows with `blocks` blocks per row.
    pub fn of(p: usize, rows: usize, blocks: usize) -> Self {
        Panel { start: p * PANEL * blocks * BLOCK_BYTES, height: (rows - p * PANEL).min(PANEL) }
    }

    /// Byte offset, from the panel's start, of block column `c`: its scales, then its steps.
    pub fn column(self, c: usize) -> usize {
        c * self.height * BLOCK_BYTES
    }

    /// Byte offset, from a block column's start, of step `s`: past the `height` scales and the
    /// `s` steps before it, `2 · height` bytes each. Row `l`'s pair lies `2l` bytes into it.
    pub fn step(self, s: usize) -> usize {
        2 * self.height * (1 + s)
    }
}

/// Plain Q8_0 rows (`rows` of `cols` values, whole blocks) in row panels: as many bytes as
/// `blocks` take.
///
/// # Panics
/// If `cols` is not a multiple of [`QK`] or `blocks` does not hold `rows` rows (a caller bug:
/// matrices are checked when loaded).
pub fn from_blocks(blocks: &[BlockQ8_0], rows: usize, cols: usize) -> Vec<u8> {
    assert!(cols.is_multiple_of(QK), "rows of whole blocks");
    let per_row = cols / QK;
    assert_eq!(blocks.len(), rows * per_row, "whole rows");
    let mut out = vec![0u8; blocks.len() * BLOCK_BYTES];
    for p in 0..rows.div_ceil(PANEL) {
        let panel = Panel::of(p, rows, per_row);
        for c in 0..per_row {
            let column = &mut out[panel.start + panel.column(c)..][..panel.height * BLOCK_BYTES];
            for l in 0..panel.height {
                let block = &blocks[(p * PANEL + l) * per_row + c];
                column[2 * l..2 * l + 2].copy_from_slice(&block.d.to_le_bytes());
                for s in 0..STEPS {
                    let at = panel.step(s) + 2 * l;
                    column[at] = block.qs[2 * s].to_le_bytes()[0];
                    column[at + 1] = block.qs[2 * s + 1].to_le_bytes()[0];
                }
            }
        }
    }
    out
}

/// Writes rows `first..first + out.len() / cols` of the panelled matrix `bytes` (`rows` rows of
/// `cols` values) into `out`, exactly as plain Q8_0 dequantises them.
///
/// # Panics
/// If the rows lie outside the matrix or the lengths disagree (a caller bug: matrices are checked
/// when loaded).
pub fn dequantize_rows(bytes: &[u8], rows: usize, cols: usize, first: usize, out: &mut [f32]) {
    assert!(cols.is_multiple_of(QK), "rows of whole blocks");
    if cols == 0 {
        return;
    }
    assert!(out.len().is_multiple_of(cols), "whole rows");
    let per_row = cols / QK;
    assert_eq!(bytes.len(), rows * per_row * BLOCK_BYTES, "dequantize_rows: matrix length");
    assert!(first + out.len() / cols <= rows, "dequantize_rows: rows out of range");
    for (i, values) in out.chunks_exact_mut(cols).enumerate() {
        let r = first + i;
        let (panel, l) = (Panel::of(r / PANEL, rows, per_row), r % PANEL);
        for (c, block) in values.chunks_exact_mut(QK).enumerate() {
            let column = &bytes[panel.start + panel.column(c)..][..panel.height * BLOCK_BYTES];
            let d = f16::from_le_bytes([column[2 * l], column[2 * l + 1]]).to_f32();
            for (s, pair) in block.chunks_exact_mut(2).enumerate() {
                let at = panel.step(s) + 2 * l;
                pair[0] = d * f32::from(i8::from_le_bytes([column[at]]));
                pair[1] = d * f32::from(i8::from_le_bytes([column[at + 1]]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_into;

    fn blocks(rows: usize, per_row: usize) -> Vec<BlockQ8_0> {
        (0..rows * per_row)
            .map(|b| {
                let v: [f32; QK] = std::array::from_fn(|i| ((b * 37 + i * 11) % 29) as f32 - 14.0 + b as f32 * 0.5);
                BlockQ8_0::quantize(&v)
            })
            .collect()
    }

    #[test]
    fn panels_tile_the_matrix() {
        assert_eq!(Panel::of(0, 40, 3), Panel { start: 0, height: 16 });
        assert_eq!(Panel::of(2, 40, 3), Panel { start: 2 * 16 * 3 * 34, height: 8 });
        assert_eq!(Panel::of(2, 40, 3).column(1), 8 * 34);
        assert_eq!(Panel::of(2, 40, 3).step(0), 16);
        assert_eq!(Panel::of(2, 40, 3).step(15), 16 * 16);
    }

    #[test]
    fn round_trip_matches_plain_q8_0_for_every_row_range() {
        for (rows, per_row) in [(1, 1), (16, 18), (17, 2), (40, 3), (5, 48)] {
            let blocks = blocks(rows, per_row);
            let cols = per_row * QK;
            let panels = from_blocks(&blocks, rows, cols);
            assert_eq!(panels.len(), blocks.len() * BlockQ8_0::BYTES);
            let mut plain = vec![0.0; rows * cols];
            dequantize_into(&blocks, &mut plain);
            let mut back = vec![0.0; rows * cols];
            dequantize_rows(&panels, rows, cols, 0, &mut back);
            assert_eq!(plain, back, "{rows} rows of {per_row} blocks");
            // A range that starts and ends inside panels.
            let (first, count) = (rows / 3, rows - rows / 3 - rows / 4);
            let mut part = vec![0.0; count * cols];
            dequantize_rows(&panels, rows, cols, first, &mut part);
            assert_eq!(part, plain[first * cols..(first + count) * cols], "rows {first}.. of {rows}");
        }
    }

    #[test]
    fn empty_matrices_have_no_bytes() {
        assert!(from_blocks(&[], 0, 64).is_empty());
        assert!(from_blocks(&[], 3, 0).is_empty());
    }
}
