//! Borrowed weight matrices in checkpoint layout.
//!
//! A [`WeightMatrix`] is row-major `(rows, cols)` = `(out_features, in_features)`, exactly as a
//! Hugging Face checkpoint stores a linear layer. Its invariant, checked by
//! [`WeightMatrix::new`], is `data.len() == rows * cols`; kernels rely on it.

use crate::error::{KernelError, check_len, mul};
use half::bf16;

/// The element storage of a weight matrix.
#[derive(Clone, Copy, Debug)]
pub enum WeightData<'a> {
    /// 32-bit floats.
    F32(&'a [f32]),
    /// bfloat16, widened to f32 inside the kernels.
    Bf16(&'a [bf16]),
}

impl WeightData<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            WeightData::F32(d) => d.len(),
            WeightData::Bf16(d) => d.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per element.
    pub fn elem_bytes(&self) -> usize {
        match self {
            WeightData::F32(_) => std::mem::size_of::<f32>(),
            WeightData::Bf16(_) => std::mem::size_of::<bf16>(),
        }
    }
}

/// A row-major `(rows, cols)` weight matrix; `rows` = output features, `cols` = input features.
#[derive(Clone, Copy, Debug)]
pub struct WeightMatrix<'a> {
    /// The elements, `rows * cols` of them.
    pub data: WeightData<'a>,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
}

impl<'a> WeightMatrix<'a> {
    /// Wraps `data` as a `(rows, cols)` matrix; fails unless `data.len() == rows * cols`.
    pub fn new(data: WeightData<'a>, rows: usize, cols: usize) -> Result<Self, KernelError> {
        let expected = mul("WeightMatrix::new", rows, cols)?;
        check_len("WeightMatrix::new", "data", data.len(), expected)?;
        Ok(WeightMatrix { data, rows, cols })
    }

    /// Storage size in bytes.
    pub fn bytes(&self) -> usize {
        self.data.len() * self.data.elem_bytes()
    }

    /// Writes row `r` widened to f32 into `out`.
    ///
    /// # Panics
    /// If `r >= self.rows` or `out.len() != self.cols` (a caller bug, not bad input).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} out of range for {} rows", self.rows);
        assert_eq!(out.len(), self.cols, "output row length");
        let span = r * self.cols..(r + 1) * self.cols;
        match self.data {
            WeightData::F32(d) => out.copy_from_slice(&d[span]),
            WeightData::Bf16(d) => {
                for (o, v) in out.iter_mut().zip(&d[span]) {
                    *o = v.to_f32();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_length() {
        let d = [1.0f32; 6];
        assert!(WeightMatrix::new(WeightData::F32(&d), 2, 3).is_ok());
        let err = WeightMatrix::new(WeightData::F32(&d), 2, 4).unwrap_err();
        assert!(err.to_string().contains("expected 8"), "{err}");
        assert!(WeightMatrix::new(WeightData::F32(&d), usize::MAX, 2).is_err());
    }

    #[test]
    fn bytes_and_rows() {
        let f: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let b: Vec<bf16> = f.iter().map(|&v| bf16::from_f32(v)).collect();
        let wf = WeightMatrix::new(WeightData::F32(&f), 2, 3).unwrap();
        let wb = WeightMatrix::new(WeightData::Bf16(&b), 2, 3).unwrap();
        assert_eq!(wf.bytes(), 24);
        assert_eq!(wb.bytes(), 12);
        let mut row = [0.0f32; 3];
        wf.row_to_f32(1, &mut row);
        assert_eq!(row, [3.0, 4.0, 5.0]);
        wb.row_to_f32(1, &mut row);
        assert_eq!(row, [3.0, 4.0, 5.0]);
    }
}
