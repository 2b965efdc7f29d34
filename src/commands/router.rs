//! `tessera router`: the public gRPC and OpenAI-compatible HTTP APIs in front of discovered
//! workers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tessera_router::ChatTemplate;
use tessera_router::openai::{self, OpenAiConfig};
use tessera_router::routing::{CostWeights, Policy};
use tessera_router::server::{self, Discovery, RouterAddrs, RouterConfig};
use tessera_router::service::TextModel;
use tessera_router::text::ToolCallStyle;

use crate::commands::model_args::ModelArgs;
use crate::commands::signals::shutdown_signal;
use crate::commands::telemetry::{self, TelemetryArgs};

/// Routing and listening options shared by `tessera router` and `tessera up`.
#[derive(Debug, Clone, Args)]
pub struct RoutingArgs {
    /// Public gRPC address (tessera.v1.Generation, health, reflection).
    #[arg(long, env = "TESSERA_LISTEN_GRPC", default_value = "127.0.0.1:50050")]
    pub listen_grpc: SocketAddr,
    /// HTTP address: the OpenAI-compatible API (/v1/...), /livez, /readyz and /metrics.
    #[arg(long, env = "TESSERA_LISTEN_HTTP", default_value = "127.0.0.1:8080")]
    pub listen_http: SocketAddr,
    /// How a worker is picked: round-robin, least-load, power-of-two, prefix or kv.
    #[arg(long, env = "TESSERA_POLICY", default_value = "kv")]
    pub policy: Policy,
    /// Cost per prompt token the chosen worker must compute (policies kv and prefix).
    #[arg(long, default_value_t = CostWeights::default().prefill)]
    pub prefill_weight: f64,
    /// Cost per token of work already on the worker (policies kv and prefix).
    #[arg(long, default_value_t = CostWeights::default().load)]
    pub load_weight: f64,
    /// Tokens per KV block on the workers (prefix hashes are computed per block).
    #[arg(long, env = "TESSERA_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// How long in-flight calls may finish after SIGTERM.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Most requests in flight through the router; more are refused (gRPC RESOURCE_EXHAUSTED,
    /// HTTP 429 with Retry-After).
    #[arg(long, env = "TESSERA_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
    /// File of API keys for the HTTP API, one per line (`#` comments allowed); without it the
    /// API is open.
    #[arg(long, env = "TESSERA_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Largest HTTP request body, in bytes (larger ones get 413).
    #[arg(long, default_value_t = openai::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Origin allowed to call the HTTP API from browsers (CORS), or `*`; none = CORS off.
    #[arg(long)]
    pub cors_origin: Option<String>,
    /// How long an HTTP client may take to send its request headers before it is disconnected.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// HTTP/2 keep-alive ping interval to workers: a worker cut off by the network leaves routing,
    /// and its streams migrate, within twice this.
    #[arg(long, env = "TESSERA_WORKER_KEEPALIVE", default_value = "2s", value_parser = parse_keepalive)]
    pub worker_keepalive: Duration,
}

/// Parses `--worker-keepalive`: at least 100 ms (pings more often than that only cost).
fn parse_keepalive(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) {
        return Err(format!("{s:?} is below the minimum of 100ms"));
    }
    Ok(d)
}

impl RoutingArgs {
    /// The HTTP API's settings; reads the key file.
    fn openai(&self) -> anyhow::Result<OpenAiConfig> {
        anyhow::ensure!(self.max_in_flight > 0, "--max-in-flight must be positive");
        anyhow::ensure!(self.max_body_bytes > 0, "--max-body-bytes must be positive");
        let api_keys = match &self.api_key_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --api-key-file {}", path.display()))?;
                let keys = openai::read_api_keys(&text);
                anyhow::ensure!(!keys.is_empty(), "--api-key-file {} holds no key", path.display());
                keys
            }
            None => {
                if !self.listen_http.ip().is_loopback() {
                    eprintln!(
                        "tessera router: warning: the HTTP API on {} is open to anyone who can reach it (no --api-key-file)",
                        self.listen_http
                    );
                }
                Vec::new()
            }
        };
        let config =
            OpenAiConfig { api_keys, max_body_bytes: self.max_body_bytes, cors_origin: self.cors_origin.clone() };
        config.validate().map_err(|e| anyhow::anyhow!("--cors-origin: {e}"))?;
        Ok(config)
    }
}

/// Options of `tessera router`.
#[derive(Debug, Args)]
pub struct RouterArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    routing: RoutingArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    /// A worker's gRPC address (repeat for more); static discovery.
    #[arg(long = "worker", value_name = "HOST:PORT", conflicts_with = "etcd")]
    workers: Vec<String>,
    /// etcd client URLs to discover workers in, comma-separated.
    #[arg(long = "etcd", env = "TESSERA_ETCD", value_delimiter = ',', value_name = "URL[,URL...]")]
    etcd: Vec<String>,
}

/// The router's text side of `model`: tokenizer, template, limits.
pub fn text_model(model: &ModelArgs, block_size: usize) -> anyhow::Result<TextModel> {
    anyhow::ensure!(block_size > 0, "--block-size must be positive");
    let resolved = model.resolve()?;
    let template = match &resolved.text.chat_template {
        Some(t) => Some(ChatTemplate::new(&t.source, t.bos_token.clone(), t.eos_token.clone())?),
        None => None,
    };
    let tool_style =
        resolved.text.chat_template.as_ref().map_or(ToolCallStyle::Json, |t| ToolCallStyle::detect(&t.source));
    Ok(TextModel {
        id: resolved.id.clone(),
        tokenizer: resolved.text.tokenizer.clone(),
        tokenizer_sha256: resolved.text.tokenizer_sha256.clone(),
        template,
        max_context: resolved.config.max_position_embeddings,
        vocab_size: resolved.config.vocab_size,
        block_size,
        tool_style,
    })
}

/// Runs a router for `model` with `discovery` until SIGTERM or Ctrl-C.
pub fn serve(
    model: TextModel,
    routing: &RoutingArgs,
    telemetry_args: &TelemetryArgs,
    discovery: Discovery,
    on_bound: impl FnOnce(RouterAddrs),
) -> anyhow::Result<()> {
    let config = RouterConfig {
        listen_grpc: routing.listen_grpc,
        listen_http: Some(routing.listen_http),
        discovery,
        policy: routing.policy,
        weights: CostWeights { prefill: routing.prefill_weight, load: routing.load_weight },
        drain_timeout: routing.drain_timeout,
        max_in_flight: routing.max_in_flight,
        openai: routing.openai()?,
        header_timeout: routing.header_timeout,
        worker_keepalive: routing.worker_keepalive,
        log_content: telemetry_args.log_content,
    };
    let (runtime, telemetry) = telemetry::serving_runtime(telemetry_args, "tessera-router")?;
    let served = runtime.block_on(server::serve(model, config, shutdown_signal(), on_bound));
    telemetry.shutdown();
    Ok(served?)
}

/// Runs the subcommand.
pub fn run(args: RouterArgs) -> anyhow::Result<()> {
    let discovery = if !args.etcd.is_empty() {
        Discovery::Etcd(args.etcd.clone())
    } else if !args.workers.is_empty() {
        Discovery::Static(args.workers.clone())
    } else {
        anyhow::bail!("give workers with --worker HOST:PORT (repeatable) or discover them with --etcd URL");
    };
    let model = text_model(&args.model, args.routing.block_size)?;
    let id = model.id.clone();
    serve(model, &args.routing, &args.telemetry, discovery, |a| {
        let http = a.http.map(|h| h.to_string()).unwrap_or_default();
        // One line on stdout that scripts and tests wait for.
        println!("tessera router ready: grpc={} http={http} model={id}", a.grpc);
    })?;
    eprintln!("tessera router: drained, exiting");
    Ok(())
}
