//! `tessera up`: a whole cluster on this machine — N worker processes and a router.
//!
//! Workers are child processes (`tessera worker`, this same binary) on free loopback ports; each
//! prints a ready line with its bound address, which `up` waits for. Without `--etcd` the router
//! gets the workers as a static list (the embedded default discovery); with it, workers register
//! in etcd and the router watches it. On Ctrl-C or SIGTERM the router drains first, then every
//! worker gets SIGTERM (they drain too) and is waited for; a worker that has not exited after
//! its drain timeout plus a grace period is killed. Invariant: `up` never returns while a child
//! it started is still running.

use std::time::Duration;

use clap::{Args, ValueEnum};
use tessera_router::server::Discovery;

use crate::commands::local_cluster::{Children, field};
use crate::commands::model_args::{ModelArgs, ParallelArgs};
use crate::commands::router::{self, RoutingArgs};
use crate::commands::telemetry::TelemetryArgs;

/// Options of `tessera up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    parallel: ParallelArgs,
    #[command(flatten)]
    routing: RoutingArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    /// Worker processes to start.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// KV-cache memory per worker, e.g. 512MiB.
    #[arg(long, default_value = "512MiB")]
    kv_memory: String,
    /// etcd client URLs: workers register there and the router discovers them (default: a
    /// static list, no etcd needed).
    #[arg(long = "etcd", value_delimiter = ',', value_name = "URL[,URL...]")]
    etcd: Vec<String>,
    /// How long to wait for each worker to load its model.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    start_timeout: Duration,
}

/// The `tessera worker` arguments of worker `index`.
fn worker_args(args: &UpArgs, index: usize, threads: usize) -> Vec<String> {
    let mut v: Vec<String> = vec!["worker".into(), "--model".into(), args.model.model.clone()];
    let m = &args.model;
    for (flag, value) in
        [("--weights-dtype", m.weights_dtype.to_possible_value()), ("--device", m.device.to_possible_value())]
    {
        if let Some(value) = value {
            v.extend([flag.to_string(), value.get_name().to_string()]);
        }
    }
    if m.int8_activations {
        v.push("--int8-activations".into());
    }
    for dir in &m.cuda_lib_dir {
        v.extend(["--cuda-lib-dir".into(), dir.display().to_string()]);
    }
    v.extend(["--cuda-device".into(), m.cuda_device.to_string()]);
    v.extend(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"].map(String::from));
    v.extend(["--threads".into(), threads.to_string(), "--kv-memory".into(), args.kv_memory.clone()]);
    v.extend([
        "--block-size".into(),
        args.routing.block_size.to_string(),
        "--dummy-seed".into(),
        m.dummy_seed.to_string(),
    ]);
    v.extend(["--worker-id".into(), format!("up-{}-{index}", std::process::id())]);
    if let Some(dir) = &m.cache_dir {
        v.extend(["--cache-dir".into(), dir.display().to_string()]);
    }
    if !args.etcd.is_empty() {
        v.extend(["--etcd".into(), args.etcd.join(",")]);
    }
    let t = &args.telemetry;
    if let Some(value) = t.log_format.to_possible_value() {
        v.extend(["--log-format".into(), value.get_name().to_string()]);
    }
    if let Some(endpoint) = &t.otlp_endpoint {
        v.extend(["--otlp-endpoint".into(), endpoint.clone()]);
    }
    let p = &args.parallel;
    v.extend(["--tp".into(), p.tp.to_string()]);
    v.extend(["--collective-timeout".into(), humantime::format_duration(p.collective_timeout).to_string()]);
    if let Some(f) = &p.fault_inject {
        v.extend(["--fault-inject".into(), f.to_string()]);
    }
    v
}

/// Runs the subcommand.
pub fn run(args: UpArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    // Resolve (and fetch, on first use) the model once, before the workers race to do it.
    let model = router::text_model(&args.model, args.routing.block_size)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if args.model.threads > 0 { args.model.threads } else { (cores / args.workers).max(1) };
    let mut workers = Children::new(Duration::from_secs(35));
    let mut addrs = Vec::new();
    for i in 0..args.workers {
        let line = workers.spawn(&worker_args(&args, i, threads), "tessera worker ready:", args.start_timeout)?;
        let addr = field(&line, "grpc")?;
        eprintln!("tessera up: worker {i} ready at {addr}");
        addrs.push(addr);
    }
    let discovery =
        if args.etcd.is_empty() { Discovery::Static(addrs.clone()) } else { Discovery::Etcd(args.etcd.clone()) };
    let id = model.id.clone();
    let served = router::serve(model, &args.routing, &args.telemetry, discovery, |a| {
        let http = a.http.map(|h| h.to_string()).unwrap_or_default();
        println!("tessera up ready: grpc={} http={http} model={id} workers={}", a.grpc, addrs.join(","));
        println!(
            "  try: grpcurl -plaintext -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}' {} tessera.v1.Generation/Chat",
            a.grpc
        );
    });
    eprintln!("tessera up: stopping workers");
    workers.stop();
    served
}
