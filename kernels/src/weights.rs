//! Borrowed weight matrices in checkpoint layout.
//!
//! A [`WeightMatrix`] is row-major `(rows, cols)` = `(out_features, in_features)`, exactly as a
//! Hugging Face checkpoint stores a linear layer. Its invariants, checked by
//! [`WeightMatrix::new`], are `data.len() == rows * cols` and, for block formats, that `cols` is a
//! multiple of the block length (every row is whole blocks); kernels rely on both.

use half::{bf16, f16};

use crate::error::{KernelError, check_len, mul};
use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, QK, QuantBlock, dequantize_into, panels};

/// The element storage of a weight matrix.
#[derive(Clone, Copy, Debug)]
pub enum WeightData<'a> {
    /// 32-bit floats.
    F32(&'a [f32]),
    /// bfloat16, widened to f32 inside the kernels.
    Bf16(&'a [bf16]),
    /// IEEE half precision, widened to f32 inside the kernels.
    F16(&'a [f16]),
    /// ggml Q8_0 blocks (see [`crate::quant`]); rows are whole blocks.
    Q8_0(&'a [BlockQ8_0]),
    /// ggml Q8_0 blocks regrouped in row panels ([`crate::quant::panels`]), as raw bytes (as many
    /// as the plain blocks); rows are whole blocks. What the CPU backend holds Q8_0 matrices in
    /// where decode reads them fastest that way ([`crate::quant::panels::pays_off`]).
    Q8_0Panels(&'a [u8]),
    /// ggml Q4_0 blocks; rows are whole blocks.
    Q4_0(&'a [BlockQ4_0]),
    /// ggml Q4_1 blocks; rows are whole blocks.
    Q4_1(&'a [BlockQ4_1]),
}

impl WeightData<'_> {
    /// Number of values (a block format holds [`QK`] per block).
    pub fn len(&self) -> usize {
        match self {
            WeightData::F32(d) => d.len(),
            WeightData::Bf16(d) => d.len(),
            WeightData::F16(d) => d.len(),
            WeightData::Q8_0(d) => d.len() * QK,
            WeightData::Q8_0Panels(d) => d.len() / panels::BLOCK_BYTES * QK,
            WeightData::Q4_0(d) => d.len() * QK,
            WeightData::Q4_1(d) => d.len() * QK,
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of storage.
    pub fn bytes(&self) -> usize {
        match self {
            WeightData::F32(d) => std::mem::size_of_val(*d),
            WeightData::Bf16(d) => std::mem::size_of_val(*d),
            WeightData::F16(d) => std::mem::size_of_val(*d),
            WeightData::Q8_0(d) => std::mem::size_of_val(*d),
            WeightData::Q8_0Panels(d) => d.len(),
            WeightData::Q4_0(d) => std::mem::size_of_val(*d),
            WeightData::Q4_1(d) => std::mem::size_of_val(*d),
        }
    }

    /// Values per storage unit along a row: 1 for plain floats, [`QK`] for block formats.
    pub fn block_len(&self) -> usize {
        match self {
            WeightData::F32(_) | WeightData::Bf16(_) | WeightData::F16(_) => 1,
            WeightData::Q8_0(_) | WeightData::Q8_0Panels(_) | WeightData::Q4_0(_) | WeightData::Q4_1(_) => QK,
        }
    }

    /// The format's name ("f32", "bf16", "f16", "Q8_0", …).
    pub fn format_name(&self) -> &'static str {
        match self {
            WeightData::F32(_) => "f32",
            WeightData::Bf16(_) => "bf16",
            WeightData::F16(_) => "f16",
            WeightData::Q8_0(_) | WeightData::Q8_0Panels(_) => BlockQ8_0::NAME,
            WeightData::Q4_0(_) => BlockQ4_0::NAME,
            WeightData::Q4_1(_) => BlockQ4_1::NAME,
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
        let w = WeightMatrix { data, rows, cols };
        w.check("WeightMatrix::new")?;
        Ok(w)
    }

    /// Checks the type's invariants (the fields are public, so a kernel re-checks a matrix it is
    /// given); errors name `kernel`.
    pub(crate) fn check(&self, kernel: &'static str) -> Result<(), KernelError> {
        if let WeightData::Q8_0Panels(d) = self.data
            && !d.len().is_multiple_of(panels::BLOCK_BYTES)
        {
            return Err(KernelError::shape(
                kernel,
                format!("{} bytes are not whole Q8_0 blocks of {}", d.len(), panels::BLOCK_BYTES),
            ));
        }
        check_len(kernel, "weight data", self.data.len(), mul(kernel, self.rows, self.cols)?)?;
        if !self.cols.is_multiple_of(self.data.block_len()) {
            return Err(KernelError::shape(
                kernel,
                format!(
                    "{} columns are not whole {} blocks of {}",
                    self.cols,
                    self.data.format_name(),
                    self.data.block_len()
                ),
            ));
        }
        Ok(())
    }

    /// Storage size in bytes.
    pub fn bytes(&self) -> usize {
        self.data.bytes()
    }

    /// Writes row `r` widened to f32 into `out`.
    ///
    /// # Panics
    /// If `r >= self.rows` or `out.len() != self.cols` (a caller bug, not bad input).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} out of range for {} rows", self.rows);
        assert_eq!(out.len(), self.cols, "output row length");
        let span = r * self.cols..(r + 1) * self.cols;
        let blocks = r * self.cols / QK..(r + 1) * self.cols / QK;
        match self.data {
            WeightData::F32(d) => out.copy_from_slice(&d[span]),
            WeightData::Bf16(d) => out.iter_mut().zip(&d[span]).for_each(|(o, v)| *o = v.to_f32()),
            WeightData::F16(d) => out.iter_mut().zip(&d[span]).for_each(|(o, v)| *o = v.to_f32()),
            WeightData::Q8_0(d) => dequantize_into(&d[blocks], out),
            WeightData::Q8_0Panels(d) => panels::dequantize_rows(d, self.rows, self.cols, r, out),
            WeightData::Q4_0(d) => dequantize_into(&d[blocks], out),
            WeightData::Q4_1(d) => dequantize_into(&d[blocks], out),
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
