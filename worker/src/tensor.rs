//! Weight tensors as the model holds them in memory.
//!
//! Invariant: `data.len() == shape.iter().product()`. Matrices are row-major
//! `(out_features, in_features)` as in checkpoints. Weights are held either as f32 or as bf16
//! (rounded to nearest even, as `torch.Tensor.to(torch.bfloat16)` does); compute is always f32.

use half::bf16;
use tessera_kernels::{HugePageBuf, WeightData, WeightMatrix};

use crate::error::LoadError;

/// The in-memory format of weight matrices (norm weights are always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsDtype {
    /// 32-bit floats.
    F32,
    /// bfloat16, converted to f32 in registers.
    Bf16,
}

impl WeightsDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WeightsDtype::F32 => 4,
            WeightsDtype::Bf16 => 2,
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
}

/// A named-shape weight tensor.
#[derive(Debug, Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

impl Tensor {
    /// Builds a tensor, checking that the data length matches the shape.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Self, LoadError> {
        let len = match &data {
            TensorData::F32(v) => v.len(),
            TensorData::Bf16(v) => v.len(),
        };
        let expected: usize = shape.iter().product();
        if len != expected {
            return Err(LoadError::InvalidConfig(format!("tensor of shape {shape:?} given {len} values")));
        }
        Ok(Tensor { shape, data })
    }

    /// Converts f32 values into the requested storage format.
    pub fn from_f32(shape: Vec<usize>, values: Vec<f32>, dtype: WeightsDtype) -> Result<Self, LoadError> {
        let data = match dtype {
            WeightsDtype::F32 => TensorData::F32(values.into()),
            WeightsDtype::Bf16 => TensorData::Bf16(HugePageBuf::from_fn(values.len(), |i| bf16::from_f32(values[i]))),
        };
        Tensor::new(shape, data)
    }

    /// The row-major shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Storage bytes.
    pub fn bytes(&self) -> usize {
        match &self.data {
            TensorData::F32(v) => v.len() * 4,
            TensorData::Bf16(v) => v.len() * 2,
        }
    }

    /// The values as f32 (a copy).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F32(v) => v.to_vec(),
            TensorData::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// The values as bf16 (moved when already bf16, rounded to nearest even otherwise).
    pub fn into_bf16(self) -> Vec<bf16> {
        match self.data {
            TensorData::Bf16(v) => v.to_vec(),
            TensorData::F32(v) => v.iter().copied().map(bf16::from_f32).collect(),
        }
    }

    /// A view for the kernels; the tensor must be 2-D.
    pub fn matrix(&self) -> Result<WeightMatrix<'_>, LoadError> {
        let [rows, cols] = self.shape[..] else {
            return Err(LoadError::InvalidConfig(format!("expected a matrix, got shape {:?}", self.shape)));
        };
        let data = match &self.data {
            TensorData::F32(v) => WeightData::F32(v),
            TensorData::Bf16(v) => WeightData::Bf16(v),
        };
        WeightMatrix::new(data, rows, cols).map_err(|e| LoadError::InvalidConfig(e.to_string()))
    }
}
