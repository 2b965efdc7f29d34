//! Test-only GGUF writer: metadata of every value type, and F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors
//! quantised the way ggml's reference quantisers do.
//!
//! Invariant: `GgufWriter::to_bytes` emits a valid GGUF file (v2 or v3) whose tensor data is
//! aligned to `general.alignment` (default 32), tensors packed in the order they were added.
//! Raw escape hatches (`tensor_raw`, [`put_value`]) exist so tests can also build files that are
//! deliberately broken.

#![allow(dead_code, reason = "each test crate uses a different subset of the helpers")]

use half::{bf16, f16};
use tessera_worker::loader::gguf::{GgmlType, GgufValue};

/// A GGUF file under construction.
pub struct GgufWriter {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty version-3 file.
    pub fn new() -> Self {
        GgufWriter { version: 3, metadata: Vec::new(), tensors: Vec::new() }
    }

    /// Sets the header version field.
    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Adds a metadata pair (duplicates are written as given).
    pub fn meta(&mut self, key: &str, value: GgufValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor with GGUF-order `dims`, quantising `values` (row-major in the reversed dims,
    /// i.e. `dims[0]` fastest) to `ty`.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, values: &[f32]) -> &mut Self {
        let n: u64 = dims.iter().product();
        assert_eq!(n as usize, values.len(), "tensor {name}: dims and values disagree");
        self.tensor_raw(name, dims, ty, quantize(ty, values))
    }

    /// Adds a tensor whose data bytes are given as they are.
    pub fn tensor_raw(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_string(), dims.to_vec(), ty, data));
        self
    }

    fn alignment(&self) -> usize {
        self.metadata
            .iter()
            .rev()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .map_or(32, |a| a as usize)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment();
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            out.extend(value.type_id().to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0usize;
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.id().to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset = (offset + data.len()).next_multiple_of(align);
        }
        out.resize(out.len().next_multiple_of(align), 0);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            out.resize(out.len().next_multiple_of(align), 0);
        }
        out
    }
}

/// Appends a GGUF string (u64 length, bytes).
/// A GGUF header prefix: magic, version 3, tensor count, metadata count.
pub fn header_prefix(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(n_tensors.to_le_bytes());
    out.extend(n_kv.to_le_bytes());
    out
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Appends the encoding of `value` (without its type id). An empty array is written as an
/// array of `U8`.
pub fn put_value(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => out.extend(v.to_le_bytes()),
        GgufValue::I8(v) => out.extend(v.to_le_bytes()),
        GgufValue::U16(v) => out.extend(v.to_le_bytes()),
        GgufValue::I16(v) => out.extend(v.to_le_bytes()),
        GgufValue::U32(v) => out.extend(v.to_le_bytes()),
        GgufValue::I32(v) => out.extend(v.to_le_bytes()),
        GgufValue::F32(v) => out.extend(v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(items) => {
            let elem = items.first().map_or(0, GgufValue::type_id);
            assert!(items.iter().all(|v| v.type_id() == elem), "GGUF arrays hold one element type");
            out.extend(elem.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        GgufValue::U64(v) => out.extend(v.to_le_bytes()),
        GgufValue::I64(v) => out.extend(v.to_le_bytes()),
        GgufValue::F64(v) => out.extend(v.to_le_bytes()),
    }
}

/// A string value.
pub fn s(text: &str) -> GgufValue {
    GgufValue::String(text.to_string())
}

/// An array of strings.
pub fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> GgufValue {
    GgufValue::Array(items.into_iter().map(s).collect())
}

/// Encodes `values` as `ty`, quantising as ggml's reference `quantize_row_*` does (scales are
/// rounded to f16 first, so the stored scale is the one the values were divided by).
pub fn quantize(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    match ty {
        GgmlType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => values.iter().for_each(|&v| out.extend(f16::from_f32(v).to_le_bytes())),
        GgmlType::Bf16 => values.iter().for_each(|&v| out.extend(bf16::from_f32(v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for block in values.chunks_exact(32) {
                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = f16::from_f32(amax / 127.0);
                let id = if d.to_f32() == 0.0 { 0.0 } else { 1.0 / d.to_f32() };
                out.extend(d.to_le_bytes());
                out.extend(block.iter().map(|v| ((v * id).round().clamp(-128.0, 127.0) as i8).to_le_bytes()[0]));
            }
        }
        GgmlType::Q4_0 => {
            for block in values.chunks_exact(32) {
                // The value of largest magnitude, sign kept, maps to -8.
                let max = block.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = f16::from_f32(max / -8.0);
                let id = if d.to_f32() == 0.0 { 0.0 } else { 1.0 / d.to_f32() };
                let q = |v: f32| ((v * id + 8.5) as u8).min(15);
                out.extend(d.to_le_bytes());
                out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
            }
        }
        GgmlType::Q4_1 => {
            for block in values.chunks_exact(32) {
                let min = block.iter().copied().fold(f32::INFINITY, f32::min);
                let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = f16::from_f32((max - min) / 15.0);
                let m = f16::from_f32(min);
                let id = if d.to_f32() == 0.0 { 0.0 } else { 1.0 / d.to_f32() };
                let q = |v: f32| (((v - m.to_f32()) * id + 0.5).max(0.0) as u8).min(15);
                out.extend(d.to_le_bytes());
                out.extend(m.to_le_bytes());
                out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
            }
        }
        GgmlType::Other(id) => panic!("cannot quantise ggml type {id}"),
    }
    out
}

/// Largest error dequantisation may show per element of `values` encoded as `ty`: half a step
/// of the block's scale (a full step for Q4_0, whose grid is asymmetric) plus the rounding of
/// f16 scales and minima.
pub fn tolerance(ty: GgmlType, values: &[f32]) -> Vec<f32> {
    let per_block = |block: &[f32]| -> f32 {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let (min, max) = block.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        match ty {
            GgmlType::Q8_0 => amax / 127.0 * 0.51 + 1e-7,
            GgmlType::Q4_0 => amax / 8.0 * 1.01 + 1e-7,
            GgmlType::Q4_1 => (max - min) / 15.0 * 0.51 + min.abs() * 1e-3 + 1e-7,
            _ => 0.0,
        }
    };
    match ty {
        GgmlType::F32 => vec![0.0; values.len()],
        GgmlType::F16 => values.iter().map(|v| v.abs() * 1e-3).collect(),
        GgmlType::Bf16 => values.iter().map(|v| v.abs() * 8e-3).collect(),
        _ => values.chunks(32).flat_map(|b| std::iter::repeat_n(per_block(b), b.len())).collect(),
    }
}
