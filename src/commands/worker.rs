//! `tessera worker`: serve one model over the worker gRPC API until SIGTERM or Ctrl-C, then drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tessera_proto::worker_v1 as pb;
use tessera_worker::backend::{self, ModelBackend, mock::MockBackend};
use tessera_worker::engine::{Engine, EngineOptions};
use tessera_worker::kv_cache::KvCacheConfig;
use tessera_worker::serving::registration::{self, RegistrationConfig};
use tessera_worker::serving::server::{self, ServeConfig, WorkerParts};
use tessera_worker::structured::ConstraintCompiler;

use crate::commands::model_args::{Device, ModelArgs, ParallelArgs};
use crate::commands::signals::shutdown_signal;
use crate::commands::telemetry::{self, TelemetryArgs};
use crate::commands::units::parse_bytes;

/// What computes the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// The model's forward pass.
    Model,
    /// No compute: deterministic tokens (see `tessera_worker::backend::mock`).
    Mock,
}

/// Options of `tessera worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    parallel: ParallelArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    /// `model` runs the model; `mock` streams deterministic tokens with no model compute (the
    /// tokenizer, limits, scheduler, KV bookkeeping and gRPC are real) — for router benchmarks.
    #[arg(long, env = "TESSERA_ENGINE", value_enum, default_value = "model")]
    engine: EngineKind,
    /// gRPC listen address (port 0 picks a free one; the bound address is printed).
    #[arg(long, env = "TESSERA_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Address of the HTTP port with /livez, /readyz and /metrics.
    #[arg(long, env = "TESSERA_METRICS_LISTEN", default_value = "127.0.0.1:9091")]
    metrics_listen: SocketAddr,
    /// KV-cache memory of the whole worker (all tensor-parallel ranks together), e.g. 2GiB
    /// (ignored when --kv-blocks is given).
    #[arg(long, env = "TESSERA_KV_MEMORY", default_value = "1GiB", value_parser = parse_bytes)]
    kv_memory: u64,
    /// KV-cache capacity in blocks (overrides --kv-memory).
    #[arg(long, env = "TESSERA_KV_BLOCKS")]
    kv_blocks: Option<usize>,
    /// Tokens per KV block (also the prefix-cache granularity).
    #[arg(long, env = "TESSERA_BLOCK_SIZE", default_value_t = 16)]
    block_size: usize,
    /// Tokens run per engine step over all sequences (chunked-prefill budget).
    #[arg(long, env = "TESSERA_MAX_BATCH_TOKENS", default_value_t = 512)]
    max_batch_tokens: usize,
    /// Sequences running at once.
    #[arg(long, env = "TESSERA_MAX_RUNNING", default_value_t = 256)]
    max_running: usize,
    /// Sequences queued before new requests are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "TESSERA_MAX_WAITING", default_value_t = 4096)]
    max_waiting: usize,
    /// Turn the prefix cache off.
    #[arg(long, env = "TESSERA_NO_PREFIX_CACHE")]
    no_prefix_cache: bool,
    /// How long in-flight requests may finish after SIGTERM before they are aborted.
    #[arg(long, env = "TESSERA_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// This worker's id in discovery and metrics [default: random].
    #[arg(long, env = "TESSERA_WORKER_ID")]
    worker_id: Option<String>,
    /// etcd client URLs to register in, comma-separated (e.g. http://etcd:2379); without it the
    /// worker does not register (routers then need --worker ADDR).
    #[arg(long = "etcd", env = "TESSERA_ETCD", value_delimiter = ',', value_name = "URL[,URL...]")]
    etcd: Vec<String>,
    /// TTL of the etcd lease (at least 2s): a worker that dies leaves discovery within it.
    #[arg(long, env = "TESSERA_LEASE_TTL", default_value = "10s", value_parser = parse_lease_ttl)]
    lease_ttl: Duration,
    /// HOST:PORT that routers dial, as registered in etcd [default: the bound gRPC address;
    /// required when listening on 0.0.0.0 or ::].
    #[arg(long, env = "TESSERA_ADVERTISE", value_name = "HOST:PORT")]
    advertise: Option<String>,
}

/// Parses `--lease-ttl`: a humantime duration of at least [`registration::MIN_TTL`].
fn parse_lease_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < registration::MIN_TTL {
        return Err(format!("{s:?} is below the minimum of {}", humantime::format_duration(registration::MIN_TTL)));
    }
    Ok(d)
}

/// Runs the worker until a shutdown signal, then drains.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let (runtime, telemetry) = telemetry::serving_runtime(&args.telemetry, "tessera-worker")?;
    let worker_id = args.worker_id.clone().unwrap_or_else(|| format!("worker-{:08x}", rand::random::<u32>()));
    // Registration settings are checked before the (slow) model load.
    let registration = if args.etcd.is_empty() {
        None
    } else {
        let r =
            RegistrationConfig { endpoints: args.etcd.clone(), ttl: args.lease_ttl, advertise: args.advertise.clone() };
        r.validate(args.listen).context("--etcd / --advertise")?;
        registration::validate_worker_id(&worker_id).context("--worker-id")?;
        Some(r)
    };
    let resolved = args.model.resolve()?;
    let bytes_per_elem = match args.model.device {
        Device::Cpu => backend::cpu_kv_elem_bytes(args.model.weights_dtype.into()),
        Device::Cuda => backend::CUDA_KV_ELEM_BYTES,
    };
    let kv = match args.kv_blocks {
        Some(num_blocks) => KvCacheConfig { num_blocks, block_size: args.block_size },
        None => KvCacheConfig::for_memory(
            args.kv_memory,
            args.parallel.kv_bytes_per_token(&resolved.config, bytes_per_elem),
            args.block_size,
        ),
    };
    kv.validate().context("--kv-memory / --kv-blocks / --block-size")?;
    let backend = match args.engine {
        EngineKind::Model => args.model.backend(&resolved, kv, &args.parallel)?,
        EngineKind::Mock => Box::new(MockBackend::new(resolved.config.clone())) as Box<dyn ModelBackend>,
    };
    let info = backend.info();
    for line in &info.tuning {
        tracing::info!("tuned at load: {line}");
    }
    let device = info.device;
    let options = EngineOptions {
        prefix_caching: !args.no_prefix_cache,
        max_batch_tokens: args.max_batch_tokens,
        max_running: args.max_running,
        max_waiting: args.max_waiting,
    };
    let engine = Engine::with_options(backend, kv, options).context("engine limits")?;
    let compiler =
        ConstraintCompiler::new(&resolved.text.tokenizer, &resolved.config.eos_token_ids, resolved.config.vocab_size)
            .map_err(|e| eprintln!("warning: structured output is unavailable for this model: {e}"))
            .ok()
            .map(Arc::new);
    let info = pb::WorkerInfo {
        worker_id,
        model_id: resolved.id.clone(),
        architecture: resolved.config.architecture.hf_name().to_string(),
        tp_size: u32::from(args.parallel.tp),
        block_size: kv.block_size as u32,
        kv_blocks: kv.num_blocks as u32,
        kv_capacity_tokens: (kv.num_blocks * kv.block_size) as u64,
        max_context: resolved.config.max_position_embeddings as u32,
        vocab_size: resolved.config.vocab_size as u32,
        tokenizer_sha256: resolved.text.tokenizer_sha256.clone(),
        eos_token_ids: resolved.config.eos_token_ids.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        device,
        // Filled in once the gRPC listener is bound (the port may be chosen by the OS).
        address: String::new(),
    };
    let parts = WorkerParts { engine, info, compiler };
    let config = ServeConfig {
        listen: args.listen,
        metrics_listen: Some(args.metrics_listen),
        drain_timeout: args.drain_timeout,
        registration,
    };
    let served = runtime.block_on(async move {
        let model = parts.info.model_id.clone();
        server::serve(parts, config, shutdown_signal(), |a| {
            let metrics = a.metrics.map(|m| m.to_string()).unwrap_or_default();
            // One line on stdout that scripts and tests wait for.
            println!("tessera worker ready: grpc={} metrics={metrics} model={model}", a.grpc);
        })
        .await
    });
    telemetry.shutdown();
    // Everything was joined on a clean exit; after a group failure nothing left may hold the
    // process (a hung rank is not a runtime task).
    runtime.shutdown_timeout(Duration::from_secs(1));
    served?;
    eprintln!("tessera worker: drained, exiting");
    Ok(())
}
