//! Logs and traces of the long-running commands (`worker`, `router`, `up`).
//!
//! One global `tracing` subscriber: log lines on stderr (text, or one JSON object per line with
//! `--log-format json`), filtered by `RUST_LOG` (default `info`, with the transport crates at
//! `warn`); and, with `--otlp-endpoint`, an OpenTelemetry layer that batches Tessera's own spans
//! (never the transport crates') to an OTLP/gRPC collector. W3C trace context crosses the
//! router → worker hop in gRPC metadata (`tessera_proto::trace_context`). Invariants: the OTLP
//! exporter is built inside the command's Tokio runtime (its gRPC client needs one), and
//! [`Telemetry::shutdown`] flushes it before that runtime ends. Prompts and outputs are never
//! logged unless `--log-content` is given.

use std::io::IsTerminal as _;

use clap::{Args, ValueEnum};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, fmt};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log pipelines).
    Json,
}

/// Logging and tracing options.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log line format on stderr (filter with RUST_LOG, e.g. `info,tessera_router=debug`).
    #[arg(long, env = "TESSERA_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint to export traces to, e.g. http://otel-collector:4317 (none: no traces).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Log each request's prompt and output (off by default: they are users' data).
    #[arg(long, env = "TESSERA_LOG_CONTENT")]
    pub log_content: bool,
}

/// The installed telemetry; flush it with [`shutdown`](Self::shutdown) before the runtime ends.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports every span still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.force_flush() {
                tracing::warn!("flushing traces: {e}");
            }
            let _ = p.shutdown();
        }
    }
}

/// The serving runtime (two worker threads) with telemetry for `service` installed on it: the
/// trace exporter lives on this runtime, so call [`Telemetry::shutdown`] before dropping it.
pub fn serving_runtime(
    args: &TelemetryArgs,
    service: &'static str,
) -> anyhow::Result<(tokio::runtime::Runtime, Telemetry)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the async runtime: {e}"))?;
    let telemetry = {
        let _inside = runtime.enter();
        init(args, service)?
    };
    Ok((runtime, telemetry))
}

/// The crates whose spans are exported (never h2, hyper, tonic or tower: hundreds per request).
fn own_spans() -> Targets {
    Targets::new()
        .with_target("tessera", LevelFilter::INFO)
        .with_target("tessera_router", LevelFilter::INFO)
        .with_target("tessera_worker", LevelFilter::INFO)
}

/// Installs the global subscriber for `service` (e.g. "tessera-router"). Call inside the Tokio
/// runtime that serves, when traces are exported.
pub fn init(args: &TelemetryArgs, service: &'static str) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy()
        .add_directive("h2=warn".parse()?)
        .add_directive("hyper=warn".parse()?)
        .add_directive("tonic=warn".parse()?)
        .add_directive("tower=warn".parse()?);
    let logs = match args.log_format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .boxed(),
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).with_current_span(true).boxed(),
    };
    let (traces, provider) = match &args.otlp_endpoint {
        None => (None, None),
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| anyhow::anyhow!("--otlp-endpoint {endpoint}: {e}"))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name(service).build())
                .build();
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("tessera")).with_filter(own_spans());
            (Some(layer), Some(provider))
        }
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces)
        .try_init()
        .map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))?;
    Ok(Telemetry { provider })
}
