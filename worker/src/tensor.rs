//! Weight tensors as the model holds them in memory.
//!
//! Invariant: the number of values in `data` equals `shape.iter().product()` (a block format
//! holds [`QK`] values per block, and a block-format tensor is a matrix whose rows are whole
//! blocks). Matrices are row-major `(out_features, in_features)` as in checkpoints. Compute is
//! always f32: the kernels widen every format in registers. Conversions round as PyTorch does
//! (bf16 and f16 to nearest even); Q8_0 is quantised as ggml's reference code does.

use half::{bf16, f16};
use tessera_kernels::Isa;
use tessera_kernels::matmul::InputRounding;
use tessera_kernels::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, QK, QuantBlock, panels};
use tessera_kernels::{HugePageBuf, WeightData, WeightMatrix};

use crate::error::LoadError;

/// How weight matrices should be held in memory (norm weights are always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsDtype {
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
    /// ggml Q8_0 blocks, quantised at load time; a matrix whose rows are not whole blocks of 32
    /// stays f32.
    Q8_0,
    /// The file's own format where the kernels read it (f32, bf16, f16, Q8_0, Q4_0, Q4_1) —
    /// e.g. a Q4_1 GGUF stays Q4_1; anything else (other ggml types, a tensor-parallel column
    /// shard that splits a block) is widened to f32.
    Keep,
}

impl WeightsDtype {
    /// Bytes per weight, when the format does not depend on the file.
    pub fn bytes_per_weight(self) -> Option<f64> {
        match self {
            WeightsDtype::F32 => Some(4.0),
            WeightsDtype::Bf16 => Some(2.0),
            WeightsDtype::Q8_0 => Some(BlockQ8_0::BYTES as f64 / QK as f64),
            WeightsDtype::Keep => None,
        }
    }
}

/// Tensor storage, on huge pages (decode streams every weight once per step; see
/// [`tessera_kernels::hugepage`]).
#[derive(Debug, Clone)]
pub enum TensorData {
    /// f32 values.
    F32(HugePageBuf<f32>),
    /// bf16 values.
    Bf16(HugePageBuf<bf16>),
    /// f16 values.
    F16(HugePageBuf<f16>),
    /// Q8_0 blocks.
    Q8_0(HugePageBuf<BlockQ8_0>),
    /// Q8_0 blocks in row panels ([`tessera_kernels::quant::panels`]), as raw bytes.
    Q8_0Panels(HugePageBuf<u8>),
    /// Q4_0 blocks.
    Q4_0(HugePageBuf<BlockQ4_0>),
    /// Q4_1 blocks.
    Q4_1(HugePageBuf<BlockQ4_1>),
}

impl TensorData {
    /// The kernels' view.
    fn view(&self) -> WeightData<'_> {
        match self {
            TensorData::F32(v) => WeightData::F32(v),
            TensorData::Bf16(v) => WeightData::Bf16(v),
            TensorData::F16(v) => WeightData::F16(v),
            TensorData::Q8_0(v) => WeightData::Q8_0(v),
            TensorData::Q8_0Panels(v) => WeightData::Q8_0Panels(v),
            TensorData::Q4_0(v) => WeightData::Q4_0(v),
            TensorData::Q4_1(v) => WeightData::Q4_1(v),
        }
    }
}

/// A named-shape weight tensor.
#[derive(Debug, Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

impl Tensor {
    /// Builds a tensor, checking that the data holds exactly the shape's values (and, for block
    /// formats, that it is a matrix of whole-block rows).
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Self, LoadError> {
        let view = data.view();
        let expected: usize = shape.iter().product();
        if view.len() != expected {
            return Err(LoadError::InvalidConfig(format!("tensor of shape {shape:?} given {} values", view.len())));
        }
        let block = view.block_len();
        if block > 1 && !matches!(shape[..], [_, cols] if cols % block == 0) {
            return Err(LoadError::InvalidConfig(format!(
                "a {} tensor must be a matrix of whole {block}-value blocks per row, not {shape:?}",
                view.format_name()
            )));
        }
        Ok(Tensor { shape, data })
    }

    /// Stores f32 values as `dtype` ([`WeightsDtype::Keep`] keeps them f32; Q8_0 falls back to
    /// f32 unless the tensor is a matrix of whole-block rows).
    pub fn from_f32(shape: Vec<usize>, values: Vec<f32>, dtype: WeightsDtype) -> Result<Self, LoadError> {
        let data = match dtype {
            WeightsDtype::F32 | WeightsDtype::Keep => TensorData::F32(values.into()),
            WeightsDtype::Bf16 => TensorData::Bf16(HugePageBuf::from_fn(values.len(), |i| bf16::from_f32(values[i]))),
            WeightsDtype::Q8_0 => match shape[..] {
                [_, cols] if cols % QK == 0 => {
                    let chunks = values.as_chunks::<QK>().0;
                    TensorData::Q8_0(HugePageBuf::from_fn(chunks.len(), |b| BlockQ8_0::quantize(&chunks[b])))
                }
                _ => TensorData::F32(values.into()),
            },
        };
        Tensor::new(shape, data)
    }

    /// Lays the tensor out as the CPU kernels read it fastest on `isa` with inputs rounded at most
    /// as `rounding` allows: a Q8_0 matrix in row panels where [`panels::pays_off`]. The values
    /// stay the same.
    pub fn lay_out_for(&mut self, isa: Isa, rounding: InputRounding) {
        if let (TensorData::Q8_0(blocks), &[rows, cols]) = (&self.data, &self.shape[..])
            && panels::pays_off(isa, rounding)
        {
            self.data = TensorData::Q8_0Panels(HugePageBuf::from_slice(&panels::from_blocks(blocks, rows, cols)));
        }
    }

    /// The row-major shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Storage bytes.
    pub fn bytes(&self) -> usize {
        self.data.view().bytes()
    }

    /// The storage format's name ("f32", "bf16", "Q4_1", …).
    pub fn format_name(&self) -> &'static str {
        self.data.view().format_name()
    }

    /// The values as f32 (a copy; block formats dequantised exactly as ggml does).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F32(v) => v.to_vec(),
            TensorData::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::Q8_0(_) | TensorData::Q8_0Panels(_) | TensorData::Q4_0(_) | TensorData::Q4_1(_) => {
                // Block formats are always matrices (checked in `new`).
                let (rows, cols) = (self.shape[0], self.shape[1]);
                let w = WeightMatrix { data: self.data.view(), rows, cols };
                let mut out = vec![0.0f32; rows * cols];
                for (r, row) in out.chunks_exact_mut(cols.max(1)).enumerate().take(rows) {
                    w.row_to_f32(r, row);
                }
                out
            }
        }
    }

    /// The values as bf16 (copied when already bf16, rounded to nearest even otherwise).
    pub fn into_bf16(self) -> Vec<bf16> {
        match self.data {
            TensorData::Bf16(v) => v.to_vec(),
            _ => self.to_f32_vec().into_iter().map(bf16::from_f32).collect(),
        }
    }

    /// A view for the kernels; the tensor must be 2-D.
    pub fn matrix(&self) -> Result<WeightMatrix<'_>, LoadError> {
        let [rows, cols] = self.shape[..] else {
            return Err(LoadError::InvalidConfig(format!("expected a matrix, got shape {:?}", self.shape)));
        };
        WeightMatrix::new(self.data.view(), rows, cols).map_err(|e| LoadError::InvalidConfig(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_needs_whole_block_rows_and_falls_back_to_f32() {
        let values: Vec<f32> = (0..128).map(|i| (i as f32 - 60.0) / 7.0).collect();
        let q = Tensor::from_f32(vec![2, 64], values.clone(), WeightsDtype::Q8_0).unwrap();
        assert_eq!(q.format_name(), "Q8_0");
        assert_eq!(q.bytes(), 4 * 34);
        let back = q.to_f32_vec();
        let step = values.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
        assert!(back.iter().zip(&values).all(|(a, b)| (a - b).abs() <= step));
        let odd = Tensor::from_f32(vec![4, 32], values, WeightsDtype::Q8_0).unwrap();
        assert_eq!(odd.format_name(), "Q8_0");
        let f = Tensor::from_f32(vec![2, 3], vec![1.0; 6], WeightsDtype::Q8_0).unwrap();
        assert_eq!(f.format_name(), "f32");
        assert_eq!(Tensor::from_f32(vec![6], vec![1.0; 6], WeightsDtype::Keep).unwrap().format_name(), "f32");
        let blocks: HugePageBuf<BlockQ8_0> = vec![BlockQ8_0::quantize(&[1.0; QK])].into();
        assert!(Tensor::new(vec![32], TensorData::Q8_0(blocks.clone())).is_err());
        assert!(Tensor::new(vec![2, 16], TensorData::Q8_0(blocks.clone())).is_err());
        assert!(Tensor::new(vec![1, 32], TensorData::Q8_0(blocks)).is_ok());
    }

    /// Only a Q8_0 matrix is laid out anew, and only where panels pay off; its values and size
    /// stay the same.
    #[test]
    fn lay_out_for_panels_q8_0_matrices_without_changing_their_values() {
        let values: Vec<f32> = (0..40 * 96).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let q = Tensor::from_f32(vec![40, 96], values.clone(), WeightsDtype::Q8_0).unwrap();
        let want = q.to_f32_vec();
        for isa in [Isa::Avx512Bf16, Isa::Avx512Vnni, Isa::Avx2Fma, Isa::Scalar] {
            for rounding in [InputRounding::Exact, InputRounding::Bf16, InputRounding::Int8] {
                let mut t = q.clone();
                t.lay_out_for(isa, rounding);
                let panelled = matches!(t.data, TensorData::Q8_0Panels(_));
                assert_eq!(panelled, panels::pays_off(isa, rounding), "{isa} {rounding:?}");
                assert_eq!((t.shape(), t.bytes(), t.format_name()), (q.shape(), q.bytes(), "Q8_0"));
                assert_eq!(t.to_f32_vec(), want, "{isa}");
                assert_eq!(t.matrix().unwrap().rows, 40);
            }
        }
        let mut bf16 = Tensor::from_f32(vec![40, 96], values, WeightsDtype::Bf16).unwrap();
        bf16.lay_out_for(Isa::Avx512Bf16, InputRounding::Bf16);
        assert_eq!(bf16.format_name(), "bf16");
    }
}
