//! Weights from `*.safetensors` files (single or sharded), memory-mapped.
//!
//! Every file is fully validated when opened (header JSON, dtypes, offsets covering the file
//! exactly), so a truncated or corrupt checkpoint fails at start-up with the file's name, not in
//! the middle of loading. Tensors are read from the mapping and converted to the requested dtype.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::weights::{TensorPart, WeightSource, check_shape};
use crate::error::LoadError;
use crate::tensor::{Tensor, TensorData, WeightsDtype};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// A set of safetensors shards indexed by tensor name.
pub struct SafetensorsWeights {
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
}

/// Maps a file read-only.
#[expect(unsafe_code, reason = "memory-mapping a checkpoint file is inherently unsafe")]
pub(crate) fn map_file(path: &Path) -> Result<Mmap, LoadError> {
    let file = File::open(path).map_err(|source| LoadError::Io { path: path.to_path_buf(), source })?;
    // SAFETY: the mapping is read-only and private to this process; checkpoint files are not
    // expected to be modified while a worker runs (as in every peer engine). A concurrent
    // truncation could fault, which we accept for the zero-copy benefit.
    unsafe { Mmap::map(&file) }.map_err(|source| LoadError::Io { path: path.to_path_buf(), source })
}

fn malformed(path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError::Malformed { path: path.to_path_buf(), format: "safetensors", reason: reason.into() }
}

/// Validates a safetensors buffer; the fuzz tests call this on random and truncated bytes.
pub fn validate_safetensors(bytes: &[u8]) -> Result<Vec<String>, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    Ok(st.names().into_iter().map(str::to_string).collect())
}

impl SafetensorsWeights {
    /// Opens the given shard files.
    pub fn open(paths: &[PathBuf]) -> Result<Self, LoadError> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let mmap = map_file(path)?;
            let names = validate_safetensors(&mmap).map_err(|e| malformed(path, e))?;
            for name in names {
                index.insert(name, shards.len());
            }
            shards.push(Shard { path: path.clone(), mmap });
        }
        Ok(SafetensorsWeights { shards, index })
    }

    /// Opens the checkpoint of a Hugging Face directory: the shards named by
    /// `model.safetensors.index.json`, else `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self, LoadError> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|source| LoadError::Io { path: index_path.clone(), source })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| malformed(&index_path, e.to_string()))?;
            let map = v["weight_map"].as_object().ok_or_else(|| malformed(&index_path, "no `weight_map` object"))?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
            files.sort();
            files.dedup();
            if files.iter().any(|f| f.contains('/') || f.contains("..")) {
                return Err(malformed(&index_path, "shard names must be plain file names"));
            }
            let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
            return Self::open(&paths);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open(&[single]);
        }
        Err(LoadError::Io {
            path: single,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors or model.safetensors.index.json",
            ),
        })
    }
}

impl WeightSource for SafetensorsWeights {
    fn load_part(
        &self,
        name: &str,
        shape: &[usize],
        part: &TensorPart,
        dtype: WeightsDtype,
    ) -> Result<Tensor, LoadError> {
        let shard = self
            .index
            .get(name)
            .and_then(|&i| self.shards.get(i))
            .ok_or_else(|| LoadError::MissingTensor(name.into()))?;
        let st = SafeTensors::deserialize(&shard.mmap).map_err(|e| malformed(&shard.path, e.to_string()))?;
        let view = st.tensor(name).map_err(|_| LoadError::MissingTensor(name.into()))?;
        check_shape(name, view.shape(), shape)?;
        let part_shape = part.shape_of(name, shape)?;
        let bytes = view.data();
        let size = match view.dtype() {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => return Err(LoadError::UnsupportedDtype { tensor: name.into(), dtype: format!("{other:?}") }),
        };
        // Only the part's bytes are read and converted.
        let spans = part.spans(shape);
        let selected: Cow<'_, [u8]> = match &spans[..] {
            [one] => Cow::Borrowed(&bytes[one.start * size..one.end * size]),
            many => Cow::Owned(many.iter().flat_map(|s| &bytes[s.start * size..s.end * size]).copied().collect()),
        };
        let data = match (view.dtype(), dtype) {
            (Dtype::F32, WeightsDtype::F32 | WeightsDtype::Keep) => {
                TensorData::F32(bytemuck::pod_collect_to_vec::<u8, f32>(&selected).into())
            }
            (Dtype::BF16, WeightsDtype::Bf16 | WeightsDtype::Keep) => {
                TensorData::Bf16(bytemuck::pod_collect_to_vec::<u8, bf16>(&selected).into())
            }
            (Dtype::F16, WeightsDtype::Keep) => {
                TensorData::F16(bytemuck::pod_collect_to_vec::<u8, f16>(&selected).into())
            }
            (file, target) => {
                let f: Vec<f32> = match file {
                    Dtype::F32 => bytemuck::pod_collect_to_vec(&selected),
                    Dtype::BF16 => {
                        bytemuck::pod_collect_to_vec::<u8, bf16>(&selected).into_iter().map(bf16::to_f32).collect()
                    }
                    _ => bytemuck::pod_collect_to_vec::<u8, f16>(&selected).into_iter().map(f16::to_f32).collect(),
                };
                return Tensor::from_f32(part_shape, f, target);
            }
        };
        Tensor::new(part_shape, data)
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}
