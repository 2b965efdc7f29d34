//! GGUF v2/v3 reader: header parsing, the tensor directory and memory-mapped tensor access.
//!
//! Layout (all little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata
//! count, the metadata key/value pairs, the tensor directory (name, dims, ggml type, offset),
//! padding up to `general.alignment` (default 32), then the tensor data. [`parse_header`] reads
//! all of it from an untrusted byte slice; [`GgufFile`] maps a file and serves tensors from it.
//!
//! Invariants:
//! - Parsing never panics and allocates at most a small constant multiple of the input size:
//!   every count is checked against the bytes that remain before anything is reserved, all
//!   offset arithmetic is checked, arrays nest at most [`MAX_ARRAY_DEPTH`] deep and a file holds
//!   at most [`MAX_METADATA_VALUES`] metadata values in all.
//! - A parsed [`GgufHeader`] agrees with its bytes: keys and tensor names are unique, strings are
//!   UTF-8, `data_offset` is aligned and inside the input, every tensor offset is aligned, every
//!   tensor of a known [`GgmlType`] has a row length divisible by its block size and a byte range
//!   inside the input, and every tensor of an `Other` type at least starts inside it.
//! - `dims` are in GGUF order (`dims[0]` varies fastest); [`GgufTensorInfo::shape`] is the
//!   row-major view, i.e. the dims reversed.
//! - A [`GgufFile`] treats its file as immutable while it is open (as every mmap-based loader
//!   does): truncating the file underneath a running process is outside what we defend against.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::LoadError;
use crate::loader::gguf_quant;
pub use crate::loader::gguf_quant::GgmlType;

/// Deepest nesting of arrays accepted in metadata (an array of arrays is depth 2).
pub const MAX_ARRAY_DEPTH: usize = 4;
/// Most metadata values (array elements included) accepted in one file; real files hold a few
/// hundred thousand (vocabularies and merges).
pub const MAX_METADATA_VALUES: usize = 1 << 24;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Alignment of the data section and of tensor offsets when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

const MAGIC: &[u8; 4] = b"GGUF";
/// Smallest encoding of one metadata pair: empty key (8), type (4), a one-byte value.
const MIN_KV_BYTES: usize = 8 + 4 + 1;
/// Smallest encoding of one tensor info: empty name (8), n_dims (4), type (4), offset (8).
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 4 + 8;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7 (one byte, 0 or 1).
    Bool(bool),
    /// Type 8 (`u64` length, UTF-8 bytes).
    String(String),
    /// Type 9 (`u32` element type, `u64` count, elements); elements share one type.
    Array(Vec<GgufValue>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl GgufValue {
    /// The value as a `u64` if it is an integer of any width that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an `f32` if it is a float (an `F64` is rounded).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            GgufValue::F32(v) => Some(v),
            // Rounding to the nearest f32 is the point of this accessor.
            GgufValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// The value as an `f64` if it is a float.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The value if it is a `Bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value if it is a `String`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements if the value is an `Array`.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The GGUF type id of this value (0..=12).
    pub fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// Tensor name as in the file (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` varies fastest.
    pub dims: Vec<u64>,
    /// Encoding of the data.
    pub ggml_type: GgmlType,
    /// Offset of the data from [`GgufHeader::data_offset`].
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Row-major shape: the dims reversed, so a GGUF matrix with dims `[k, n]` is `[n, k]`.
    ///
    /// Dims beyond `usize` (only possible on 32-bit targets) saturate.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect()
    }

    /// Number of elements; saturates (parsed headers never overflow).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).unwrap_or(u64::MAX)
    }

    /// Bytes of data, for known types.
    pub fn byte_len(&self) -> Option<u64> {
        self.ggml_type.byte_len(self.n_elements())
    }
}

/// Everything before the tensor data.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, GgufValue>,
    /// The tensor directory, in file order.
    pub tensors: Vec<GgufTensorInfo>,
    /// Byte offset of the data section within the file.
    pub data_offset: usize,
}

/// Little-endian reader over an untrusted slice; every read is bounds-checked.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Metadata values still allowed (see [`MAX_METADATA_VALUES`]).
    value_budget: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let slice =
            self.pos.checked_add(n).and_then(|end| self.bytes.get(self.pos..end)).ok_or_else(|| {
                format!("truncated: {n} bytes needed at offset {}, {} left", self.pos, self.remaining())
            })?;
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let slice = self.take(N)?;
        <[u8; N]>::try_from(slice).map_err(|_| format!("internal: short read at offset {}", self.pos))
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    /// A `u64` length or count of items of at least `min_item_bytes` each, rejected unless that
    /// many items could fit in the bytes left.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize, String> {
        let n = self.u64()?;
        let room = self.remaining() / min_item_bytes.max(1);
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= room)
            .ok_or_else(|| format!("{what} {n} cannot fit in the {} bytes left", self.remaining()))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.count(what, 1)?;
        let raw = self.take(len)?;
        std::str::from_utf8(raw).map(str::to_owned).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue, String> {
        self.value_budget = self
            .value_budget
            .checked_sub(1)
            .ok_or_else(|| format!("more than {MAX_METADATA_VALUES} metadata values"))?;
        Ok(match ty {
            0 => GgufValue::U8(u8::from_le_bytes(self.array()?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array()?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match u8::from_le_bytes(self.array()?) {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(format!("bool byte {b} is neither 0 nor 1")),
            },
            8 => GgufValue::String(self.string("string length")?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let elem = self.u32()?;
                let min = min_value_bytes(elem).ok_or_else(|| format!("unknown array element type {elem}"))?;
                let n = self.count("array length", min)?;
                if n > self.value_budget {
                    return Err(format!("more than {MAX_METADATA_VALUES} metadata values"));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown value type {other}")),
        })
    }
}

/// Smallest encoding of a value of type `ty`, or `None` for unknown types.
fn min_value_bytes(ty: u32) -> Option<usize> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        8 | 10..=12 => Some(8),
        9 => Some(4 + 8),
        _ => None,
    }
}

/// Widening `usize` → `u64`; lossless on every target Rust supports (pointers are ≤ 64 bits).
fn to_u64(x: usize) -> u64 {
    x as u64
}

/// Parses and validates everything up to the tensor data. Never panics; see the module docs.
pub fn parse_header(bytes: &[u8]) -> Result<GgufHeader, String> {
    let mut c = Cursor { bytes, pos: 0, value_budget: MAX_METADATA_VALUES };
    let magic = c.take(4).map_err(|_| format!("{} bytes is too short for a GGUF header", bytes.len()))?;
    if magic != MAGIC {
        return Err(format!("bad magic {magic:02x?} (expected \"GGUF\")"));
    }
    let version = c.u32()?;
    match version {
        2 | 3 => {}
        1 => return Err("GGUF version 1 is not supported (convert the file again)".into()),
        v if (1..=3).contains(&v.swap_bytes()) => {
            return Err(format!("big-endian GGUF (version {}) is not supported", v.swap_bytes()));
        }
        v => return Err(format!("unsupported GGUF version {v}")),
    }
    let n_tensors = c.count("tensor count", MIN_TENSOR_INFO_BYTES)?;
    let n_kv = c.count("metadata count", MIN_KV_BYTES)?;
    let needed = n_tensors
        .checked_mul(MIN_TENSOR_INFO_BYTES)
        .and_then(|t| n_kv.checked_mul(MIN_KV_BYTES).and_then(|k| k.checked_add(t)));
    if needed.is_none_or(|n| n > c.remaining()) {
        return Err(format!("{n_tensors} tensors and {n_kv} metadata pairs cannot fit in {} bytes", bytes.len()));
    }

    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key length")?;
        let ty = c.u32()?;
        let value = c.value(ty, 0).map_err(|e| format!("metadata {key:?}: {e}"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("duplicate metadata key {key:?}"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| format!("general.alignment {v:?} is not a power of two"))?,
    };

    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string("tensor name length")?;
        let n_dims = usize::try_from(c.u32()?).unwrap_or(usize::MAX);
        if n_dims > MAX_DIMS {
            return Err(format!("tensor {name:?} has {n_dims} dims (at most {MAX_DIMS})"));
        }
        let dims = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<_>, _>>()?;
        let ggml_type = GgmlType::from_id(c.u32()?);
        let offset = c.u64()?;
        if names.insert(name.clone(), i).is_some() {
            return Err(format!("duplicate tensor name {name:?}"));
        }
        tensors.push(GgufTensorInfo { name, dims, ggml_type, offset });
    }

    let data_offset =
        to_u64(c.pos).checked_next_multiple_of(alignment).filter(|&d| d <= to_u64(bytes.len())).ok_or_else(|| {
            format!("data section (aligned to {alignment}) starts past the end of the {} bytes", bytes.len())
        })?;
    for t in &tensors {
        check_tensor(t, data_offset, alignment, to_u64(bytes.len()))?;
    }
    let data_offset = usize::try_from(data_offset).map_err(|_| "data offset overflows usize".to_string())?;
    Ok(GgufHeader { version, metadata, tensors, data_offset })
}

/// Checks one tensor's element count, block divisibility, alignment and byte range.
fn check_tensor(t: &GgufTensorInfo, data_offset: u64, alignment: u64, file_len: u64) -> Result<(), String> {
    let name = &t.name;
    let n = t
        .dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| i64::try_from(n).is_ok())
        .ok_or_else(|| format!("tensor {name:?}: element count of dims {:?} overflows", t.dims))?;
    if !t.offset.is_multiple_of(alignment) {
        return Err(format!("tensor {name:?}: offset {} is not a multiple of {alignment}", t.offset));
    }
    let start =
        data_offset.checked_add(t.offset).ok_or_else(|| format!("tensor {name:?}: offset {} overflows", t.offset))?;
    let Some(block) = t.ggml_type.block_size() else {
        if start >= file_len {
            return Err(format!("tensor {name:?} ({}) starts at {start}, past the end ({file_len})", t.ggml_type));
        }
        return Ok(());
    };
    let row = t.dims.first().copied().unwrap_or(1);
    if !row.is_multiple_of(block) {
        return Err(format!(
            "tensor {name:?}: row length {row} is not a multiple of the {} block size {block}",
            t.ggml_type
        ));
    }
    let len = t
        .ggml_type
        .byte_len(n)
        .ok_or_else(|| format!("tensor {name:?}: byte size of {n} {} elements overflows", t.ggml_type))?;
    match start.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(format!("tensor {name:?}: {len} bytes at {start} run past the end of the file ({file_len} bytes)")),
    }
}

/// A memory-mapped GGUF file with its parsed header.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    header: GgufHeader,
    by_name: HashMap<String, usize>,
}

#[expect(unsafe_code, reason = "memory-mapping a file is unsafe in Rust; this is the crate's one mapping")]
fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the mapping is read-only and private to this process, and we only ever read it as
    // `&[u8]`. The one hazard is another process truncating or rewriting the file while it is
    // mapped; model files are treated as immutable while loaded (see the module invariants).
    unsafe { Mmap::map(file) }
}

impl GgufFile {
    /// Maps `path` and parses its header.
    ///
    /// Errors: `LoadError::Io` if the file cannot be opened or mapped, `LoadError::Malformed`
    /// (format "GGUF") if its bytes are not a valid GGUF file.
    pub fn open(path: &Path) -> Result<GgufFile, LoadError> {
        let io = |source| LoadError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let map = map_file(&file).map_err(io)?;
        let header = parse_header(&map).map_err(|reason| LoadError::Malformed {
            path: path.to_path_buf(),
            format: "GGUF",
            reason,
        })?;
        let by_name = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile { path: path.to_path_buf(), map, header, by_name })
    }

    /// The parsed header.
    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory entry of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).and_then(|&i| self.header.tensors.get(i))
    }

    /// The raw bytes of a tensor of a known type; empty for `Other` types (their size is not
    /// known here) and for an `info` that does not describe this file.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        let range = info.byte_len().and_then(|len| {
            let start = to_u64(self.header.data_offset).checked_add(info.offset)?;
            let end = start.checked_add(len)?;
            Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
        });
        range.and_then(|r| self.map.get(r)).unwrap_or(&[])
    }

    /// Tensor `name` dequantised to f32, with its row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), LoadError> {
        let info = self.tensor_info(name).ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
        if info.ggml_type.block_size().is_none() {
            return Err(LoadError::UnsupportedDtype { tensor: name.to_string(), dtype: info.ggml_type.to_string() });
        }
        let malformed = |reason: String| LoadError::Malformed { path: self.path.clone(), format: "GGUF", reason };
        let n = usize::try_from(info.n_elements())
            .map_err(|_| malformed(format!("tensor {name:?} has too many elements for this machine")))?;
        let mut values = vec![0.0f32; n];
        gguf_quant::dequantize(info.ggml_type, self.tensor_bytes(info), &mut values)
            .map_err(|e| malformed(format!("tensor {name:?}: {e}")))?;
        Ok((info.shape(), values))
    }

    /// Rows `rows` of matrix `name` dequantised to f32 (only their bytes are read), with the
    /// full row-major shape. GGUF quantises within rows, so any row range is self-contained.
    pub fn tensor_rows_f32(&self, name: &str, rows: Range<usize>) -> Result<(Vec<usize>, Vec<f32>), LoadError> {
        let (info, span) = self.tensor_rows_raw(name, rows.clone())?;
        let shape = info.shape();
        let mut values = vec![0.0f32; rows.len() * shape[1]];
        gguf_quant::dequantize(info.ggml_type, span, &mut values).map_err(|e| LoadError::Malformed {
            path: self.path.clone(),
            format: "GGUF",
            reason: format!("tensor {name:?}: {e}"),
        })?;
        Ok((shape, values))
    }

    /// The encoded bytes of rows `rows` of matrix `name` (a whole number of blocks per row, in
    /// the file's own type), with the tensor's info.
    pub fn tensor_rows_raw(&self, name: &str, rows: Range<usize>) -> Result<(&GgufTensorInfo, &[u8]), LoadError> {
        let info = self.tensor_info(name).ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
        let malformed = |reason: String| LoadError::Malformed { path: self.path.clone(), format: "GGUF", reason };
        let shape = info.shape();
        let (&[n_rows, cols], Some(_)) = (&shape[..], info.ggml_type.block_size()) else {
            return Err(LoadError::UnsupportedDtype { tensor: name.to_string(), dtype: info.ggml_type.to_string() });
        };
        if rows.start > rows.end || rows.end > n_rows {
            return Err(malformed(format!("tensor {name:?} has {n_rows} rows; rows {rows:?} asked")));
        }
        let row_bytes = info
            .ggml_type
            .byte_len(cols as u64)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| malformed(format!("tensor {name:?}: rows of {cols} values are not whole blocks")))?;
        let bytes = self.tensor_bytes(info);
        let span = bytes
            .get(rows.start * row_bytes..rows.end * row_bytes)
            .ok_or_else(|| malformed(format!("tensor {name:?}: data is shorter than its shape")))?;
        Ok((info, span))
    }

    /// Metadata `key` as an unsigned integer (any non-negative integer type).
    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        self.header.metadata.get(key).and_then(GgufValue::as_u64)
    }

    /// Metadata `key` as an `f32` (an `F32` or `F64` value).
    pub fn meta_f32(&self, key: &str) -> Option<f32> {
        self.header.metadata.get(key).and_then(GgufValue::as_f32)
    }

    /// Metadata `key` as a string.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.header.metadata.get(key).and_then(GgufValue::as_str)
    }
}
