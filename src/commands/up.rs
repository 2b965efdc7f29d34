//! `tessera up`: a whole cluster on this machine — N worker processes and a router.
//!
//! Workers are child processes (`tessera worker`, this same binary) on free loopback ports; each
//! prints a ready line with its bound address, which `up` waits for. Without `--etcd` the router
//! gets the workers as a static list (the embedded default discovery); with it, workers register
//! in etcd and the router watches it. On Ctrl-C or SIGTERM the router drains first, then every
//! worker gets SIGTERM (they drain too) and is waited for; a worker that has not exited after
//! its drain timeout plus a grace period is killed. Invariant: `up` never returns while a child
//! it started is still running.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tessera_router::server::Discovery;

use crate::commands::model_args::ModelArgs;
use crate::commands::router::{self, RoutingArgs};

/// Options of `tessera up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    routing: RoutingArgs,
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

/// The started workers; dropping it stops them (SIGTERM, then SIGKILL after `grace`).
struct Workers {
    children: Vec<Child>,
    grace: Duration,
}

impl Workers {
    fn stop(&mut self) {
        for c in &self.children {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + self.grace;
        for c in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts one worker and returns it with the gRPC address from its ready line.
fn start_worker(args: &UpArgs, index: usize, threads: usize) -> anyhow::Result<(Child, String)> {
    let exe = std::env::current_exe().context("locating the tessera binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("worker")
        .args(["--model", &args.model.model])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--threads", &threads.to_string()])
        .args(["--kv-memory", &args.kv_memory])
        .args(["--block-size", &args.routing.block_size.to_string()])
        .args(["--worker-id", &format!("up-{}-{index}", std::process::id())])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let m = &args.model;
    for (flag, value) in
        [("--weights-dtype", m.weights_dtype.to_possible_value()), ("--device", m.device.to_possible_value())]
    {
        if let Some(v) = value {
            cmd.args([flag, v.get_name()]);
        }
    }
    cmd.args(["--dummy-seed", &m.dummy_seed.to_string()]);
    if let Some(dir) = &args.model.cache_dir {
        cmd.arg("--cache-dir").arg(dir);
    }
    if !args.etcd.is_empty() {
        cmd.args(["--etcd", &args.etcd.join(",")]);
    }
    let mut child = cmd.spawn().context("starting a worker process")?;
    let Some(stdout) = child.stdout.take() else { bail!("worker {index} has no stdout") };
    // The ready line is read on a thread so the wait can time out.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let ready = lines.by_ref().map_while(Result::ok).find_map(|l| {
            l.strip_prefix("tessera worker ready: grpc=").and_then(|r| r.split_whitespace().next()).map(str::to_string)
        });
        let _ = tx.send(ready);
        // Keep draining stdout so the worker never blocks on a full pipe.
        for _ in lines {}
    });
    match rx.recv_timeout(args.start_timeout) {
        Ok(Some(addr)) => Ok((child, addr)),
        Ok(None) => {
            let status = child.wait().ok();
            bail!("worker {index} exited before it was ready ({status:?}); see its errors above")
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("worker {index} was not ready within {}", humantime::format_duration(args.start_timeout))
        }
    }
}

/// Runs the subcommand.
pub fn run(args: UpArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    // Resolve (and fetch, on first use) the model once, before the workers race to do it.
    let model = router::text_model(&args.model, args.routing.block_size)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if args.model.threads > 0 { args.model.threads } else { (cores / args.workers).max(1) };
    let mut workers = Workers { children: Vec::new(), grace: Duration::from_secs(35) };
    let mut addrs = Vec::new();
    for i in 0..args.workers {
        let (child, addr) = start_worker(&args, i, threads)?;
        workers.children.push(child);
        eprintln!("tessera up: worker {i} ready at {addr}");
        addrs.push(addr);
    }
    let discovery =
        if args.etcd.is_empty() { Discovery::Static(addrs.clone()) } else { Discovery::Etcd(args.etcd.clone()) };
    let id = model.id.clone();
    let served = router::serve(model, &args.routing, discovery, |a| {
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
