//! `tessera bench router`: what the router adds to each request, measured against workers that
//! do no model compute (`tessera worker --engine mock`).
//!
//! Starts `--workers` mock workers and one router (child processes of this binary, on loopback
//! ports). Then, at the same open-loop Poisson rate and with the same token-id prompts, it sends
//! unary requests (1) straight to the workers (round-robin, worker API) and (2) through the
//! router (public API), and reports the latency percentiles of both and their difference — the
//! router's added latency, with tokenization skipped on both sides (prompts are ids) but
//! routing, the KV index, detokenization and the extra hop included. Finally a closed loop with
//! `--max-concurrency` clients measures the most requests/s the router sustains. The client runs
//! in this process on one thread (a current-thread runtime: fewer wake-ups across threads, so it
//! takes as little as it can of the cores it shares with the router and the workers); on a small
//! machine the figures still include that contention.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_proto::v1 as api;
use tessera_proto::v1::generation_client::GenerationClient;
use tessera_proto::worker_v1 as wpb;
use tessera_proto::worker_v1::worker_client::WorkerClient;
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::commands::local_cluster::{Children, field};

/// Options of `tessera bench router`.
#[derive(Debug, Args)]
pub struct RouterBenchArgs {
    /// Model whose tokenizer the router and the mock workers use.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// Mock workers to start.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Open-loop arrival rate, requests per second.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Length of each open-loop phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Prompt tokens per request (random ids; 1 in 8 requests repeats an earlier prompt).
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 4)]
    max_tokens: u32,
    /// Clients of the closed-loop maximum-throughput phase.
    #[arg(long, default_value_t = 64)]
    max_concurrency: usize,
    /// Routing policy of the router.
    #[arg(long, default_value = "kv")]
    policy: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Latency percentiles of one phase.
#[derive(Debug, Clone, Copy)]
struct Phase {
    sent: u64,
    ok: u64,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    achieved_rate: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Clone)]
enum Target {
    Workers(Vec<WorkerClient<Channel>>),
    Router(GenerationClient<Channel>),
}

impl Target {
    async fn call(&self, i: u64, prompt: Vec<u32>, max_tokens: u32) -> bool {
        match self {
            Target::Workers(ws) => {
                let mut c = ws[(i as usize) % ws.len()].clone();
                let req = wpb::GenerateRequest {
                    prompt,
                    max_tokens,
                    sampling: Some(wpb::SamplingParams { temperature: 0.0, ..Default::default() }),
                    ignore_eos: true,
                    ..Default::default()
                };
                let Ok(resp) = c.generate(req).await else { return false };
                let mut s = resp.into_inner();
                let mut done = false;
                while let Ok(Some(m)) = s.message().await {
                    done |= m.finish_reason != 0;
                }
                done
            }
            Target::Router(r) => {
                let mut c = r.clone();
                let req = api::GenerateRequest {
                    prompt: Some(api::generate_request::Prompt::TokenIds(api::TokenIds { ids: prompt })),
                    sampling: Some(api::SamplingParams {
                        temperature: Some(0.0),
                        max_tokens,
                        ignore_eos: true,
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                c.generate(req).await.is_ok()
            }
        }
    }
}

/// The prompt of request `i`: random ids, every 8th a repeat of an earlier one (prefix hits).
fn prompt(i: u64, len: usize, vocab: u32) -> Vec<u32> {
    let seed = if i % 8 == 7 { i / 2 } else { i };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(3..vocab)).collect()
}

async fn open_loop(target: &Target, args: &RouterBenchArgs, vocab: u32) -> Phase {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let ok = Arc::new(AtomicU64::new(0));
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let start = Instant::now();
    let mut next = start;
    let mut tasks = tokio::task::JoinSet::new();
    let mut sent = 0u64;
    while next.duration_since(start) < args.duration {
        tokio::time::sleep_until(next.into()).await;
        let (t, lat, ok, p, n) =
            (target.clone(), latencies.clone(), ok.clone(), prompt(sent, args.prompt_len, vocab), args.max_tokens);
        tasks.spawn(async move {
            let began = Instant::now();
            if t.call(sent, p, n).await {
                ok.fetch_add(1, Ordering::Relaxed);
                lat.lock().await.push(began.elapsed());
            }
        });
        sent += 1;
        // Exponential inter-arrival times (Poisson arrivals).
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        next += Duration::from_secs_f64(-u.ln() / args.rate);
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat = latencies.lock().await.clone();
    lat.sort();
    Phase {
        sent,
        ok: ok.load(Ordering::Relaxed),
        p50: percentile(&lat, 50.0),
        p90: percentile(&lat, 90.0),
        p99: percentile(&lat, 99.0),
        achieved_rate: lat.len() as f64 / elapsed,
    }
}

async fn closed_loop(target: &Target, args: &RouterBenchArgs, vocab: u32) -> f64 {
    let ok = Arc::new(AtomicU64::new(0));
    let counter = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + args.duration.min(Duration::from_secs(5));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.max_concurrency {
        let (t, ok, counter, len, n) = (target.clone(), ok.clone(), counter.clone(), args.prompt_len, args.max_tokens);
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                if t.call(i, prompt(i, len, vocab), n).await {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    ok.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the benchmark.
pub fn run(args: RouterBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.workers >= 1 && args.rate > 0.0 && args.prompt_len > 0,
        "workers, rate and prompt length must be positive"
    );
    let mut children = Children::new(Duration::from_secs(5));
    let timeout = Duration::from_secs(300);
    let mut worker_addrs = Vec::new();
    for i in 0..args.workers {
        let a: Vec<String> = [
            "worker",
            "--engine",
            "mock",
            "--model",
            &args.model,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--kv-memory",
            "256MiB",
            "--worker-id",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("bench-mock-{i}")])
        .collect();
        worker_addrs.push(field(&children.spawn(&a, "tessera worker ready:", timeout)?, "grpc")?);
    }
    let mut router_args: Vec<String> = [
        "router",
        "--model",
        &args.model,
        "--listen-grpc",
        "127.0.0.1:0",
        "--listen-http",
        "127.0.0.1:0",
        "--policy",
        &args.policy,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for a in &worker_addrs {
        router_args.extend(["--worker".to_string(), a.clone()]);
    }
    let router_addr = field(&children.spawn(&router_args, "tessera router ready:", timeout)?, "grpc")?;

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (direct, routed, max_rps) = runtime.block_on(async {
        let mut workers = Vec::new();
        for a in &worker_addrs {
            workers.push(
                WorkerClient::connect(format!("http://{a}")).await.with_context(|| format!("connecting to {a}"))?,
            );
        }
        let mut router =
            GenerationClient::connect(format!("http://{router_addr}")).await.context("connecting to the router")?;
        // Wait until the router routes to every worker.
        let everyone_routable = |m: api::ListModelsResponse| {
            m.models.first().is_some_and(|c| c.healthy_workers as usize == worker_addrs.len())
        };
        while !everyone_routable(router.list_models(api::ListModelsRequest {}).await?.into_inner()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let vocab = workers[0].get_info(wpb::GetInfoRequest {}).await?.into_inner().vocab_size.max(4);
        let direct_t = Target::Workers(workers);
        let routed_t = Target::Router(router);
        // Warm-up of connections and caches on both paths.
        for i in 0..50 {
            direct_t.call(i, prompt(i, args.prompt_len, vocab), args.max_tokens).await;
            routed_t.call(i, prompt(i, args.prompt_len, vocab), args.max_tokens).await;
        }
        let direct = open_loop(&direct_t, &args, vocab).await;
        let routed = open_loop(&routed_t, &args, vocab).await;
        let max_rps = closed_loop(&routed_t, &args, vocab).await;
        anyhow::Ok((direct, routed, max_rps))
    })?;
    children.stop();
    if args.json {
        let phase = |p: &Phase| serde_json::json!({"sent": p.sent, "ok": p.ok, "p50_ms": ms(p.p50), "p90_ms": ms(p.p90), "p99_ms": ms(p.p99), "achieved_rps": p.achieved_rate});
        println!(
            "{}",
            serde_json::json!({
                "rate": args.rate, "workers": args.workers, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                "direct": phase(&direct), "routed": phase(&routed),
                "added_p50_ms": ms(routed.p50) - ms(direct.p50), "added_p99_ms": ms(routed.p99) - ms(direct.p99),
                "max_rps": max_rps,
            })
        );
        return Ok(());
    }
    println!(
        "router overhead: {} mock workers, {:.0} req/s open loop for {}, prompt {} ids, {} tokens out, policy {}",
        args.workers,
        args.rate,
        humantime::format_duration(args.duration),
        args.prompt_len,
        args.max_tokens,
        args.policy
    );
    println!("path          sent      ok   achieved/s    p50 ms    p90 ms    p99 ms");
    for (name, p) in [("direct", &direct), ("via router", &routed)] {
        println!(
            "{name:<12} {:>5} {:>7} {:>12.0} {:>9.3} {:>9.3} {:>9.3}",
            p.sent,
            p.ok,
            p.achieved_rate,
            ms(p.p50),
            ms(p.p90),
            ms(p.p99)
        );
    }
    println!(
        "added by the router: p50 {:.3} ms, p99 {:.3} ms",
        ms(routed.p50) - ms(direct.p50),
        ms(routed.p99) - ms(direct.p99)
    );
    println!("max throughput via router: {max_rps:.0} req/s ({} clients, closed loop)", args.max_concurrency);
    Ok(())
}
