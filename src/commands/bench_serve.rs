//! `tessera bench serve`: an open-loop load generator for a running cluster (a router's public
//! gRPC API) with a multi-tenant, multi-turn chat workload.
//!
//! Workload `shared-prefix`: each of `--tenants` tenants has its own long system prompt;
//! conversations arrive as a Poisson process at `--rate` per second, each picks a tenant and
//! runs `--turns` turns one after another over `ChatStream` (each turn's prompt is the system
//! prompt plus the whole conversation so far, so prompts grow turn by turn and share long
//! prefixes). New conversations stop after `--duration`; the run ends when the started ones
//! finish (or after a grace period, whose stragglers count as failed). Reported: requests done
//! and failed, throughput, time to first token, inter-token latency and end-to-end latency
//! percentiles, the prefix-cache hit rate (cached ÷ prompt tokens as the workers reported them
//! in each response's usage), and, with `--metrics`, the spread of requests over workers from
//! the router's metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_proto::v1 as api;
use tessera_proto::v1::generation_client::GenerationClient;
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// The workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Tenants with long system prompts, multi-turn conversations.
    SharedPrefix,
}

/// Options of `tessera bench serve`.
#[derive(Debug, Args)]
pub struct ServeBenchArgs {
    /// The router's gRPC address (host:port).
    #[arg(long)]
    target: String,
    /// The router's HTTP address, to read per-worker request counts from /metrics.
    #[arg(long)]
    metrics: Option<String>,
    /// The workload.
    #[arg(long, value_enum, default_value = "shared-prefix")]
    workload: Workload,
    /// Tenants, each with its own system prompt.
    #[arg(long, default_value_t = 4)]
    tenants: usize,
    /// Turns per conversation.
    #[arg(long, default_value_t = 3)]
    turns: usize,
    /// New conversations per second (Poisson arrivals).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// How long new conversations start.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Words in each tenant's system prompt.
    #[arg(long, default_value_t = 400)]
    system_words: usize,
    /// Words in each user message.
    #[arg(long, default_value_t = 12)]
    user_words: usize,
    /// Tokens generated per turn.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Seed of the workload (prompts and arrivals).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Measurements of one turn.
#[derive(Debug, Clone, Copy)]
struct Turn {
    ttft: Duration,
    e2e: Duration,
    itl: Option<Duration>,
    prompt_tokens: u32,
    cached_tokens: u32,
    completion_tokens: u32,
}

#[derive(Default)]
struct Results {
    turns: Vec<Turn>,
    failed: usize,
    errors: Vec<String>,
}

const WORDS: &[&str] = &[
    "cluster", "router", "worker", "cache", "prefix", "token", "stream", "latency", "policy", "block", "tenant",
    "model", "request", "replica", "lease", "batch", "queue", "memory", "kernel", "context", "reply", "system",
    "answer", "turn",
];

fn words(rng: &mut ChaCha8Rng, n: usize) -> String {
    (0..n).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect::<Vec<_>>().join(" ")
}

fn sampling(max_tokens: u32) -> Option<api::SamplingParams> {
    Some(api::SamplingParams { temperature: Some(0.0), max_tokens, ignore_eos: true, ..Default::default() })
}

/// Runs one conversation; records each turn.
async fn conversation(
    mut client: GenerationClient<Channel>,
    system: String,
    users: Vec<String>,
    max_tokens: u32,
    results: Arc<Mutex<Results>>,
) {
    let mut messages = vec![api::ChatMessage { role: "system".into(), content: system, ..Default::default() }];
    for user in users {
        messages.push(api::ChatMessage { role: "user".into(), content: user, ..Default::default() });
        let started = Instant::now();
        let req = api::ChatRequest { messages: messages.clone(), sampling: sampling(max_tokens), ..Default::default() };
        let outcome = async {
            let mut stream = client.chat_stream(req).await?.into_inner();
            let (mut first, mut last, mut gaps, mut n) = (None, None, Duration::ZERO, 0u32);
            let (mut text, mut usage) = (String::new(), None);
            while let Some(m) = stream.message().await? {
                let now = Instant::now();
                if !m.content.is_empty() {
                    if first.is_none() {
                        first = Some(now - started);
                    } else if let Some(prev) = last {
                        gaps += now - prev;
                        n += 1;
                    }
                    last = Some(now);
                }
                text.push_str(&m.content);
                usage = m.usage.or(usage);
            }
            Ok::<_, tonic::Status>((first, (n > 0).then(|| gaps / n), text, usage))
        }
        .await;
        let mut r = results.lock().await;
        match outcome {
            Ok((first, itl, text, Some(u))) => {
                r.turns.push(Turn {
                    ttft: first.unwrap_or_else(|| started.elapsed()),
                    e2e: started.elapsed(),
                    itl,
                    prompt_tokens: u.prompt_tokens,
                    cached_tokens: u.cached_prompt_tokens,
                    completion_tokens: u.completion_tokens,
                });
                messages.push(api::ChatMessage { role: "assistant".into(), content: text, ..Default::default() });
            }
            Ok((_, _, _, None)) => {
                r.failed += 1;
                r.errors.push("a stream ended without usage".into());
                return;
            }
            Err(status) => {
                r.failed += 1;
                if r.errors.len() < 5 {
                    r.errors.push(format!("{:?}: {}", status.code(), status.message()));
                }
                return;
            }
        }
    }
}

fn percentiles(mut xs: Vec<Duration>) -> [f64; 3] {
    if xs.is_empty() {
        return [0.0; 3];
    }
    xs.sort();
    [50.0, 90.0, 99.0].map(|p| {
        let rank = ((p / 100.0) * xs.len() as f64).ceil() as usize;
        xs[rank.clamp(1, xs.len()) - 1].as_secs_f64() * 1e3
    })
}

/// Requests per worker, from the router's `tessera_router_worker_requests_total{worker=…}`.
fn worker_requests(metrics_addr: &str) -> anyhow::Result<Vec<(String, f64)>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(metrics_addr).with_context(|| format!("connecting to {metrics_addr}"))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {metrics_addr}\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("tessera_router_worker_requests_total{worker=\"")?;
            let (worker, value) = rest.split_once("\"} ")?;
            Some((worker.to_string(), value.trim().parse().ok()?))
        })
        .collect())
}

/// Runs the benchmark.
pub fn run(args: ServeBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.tenants > 0 && args.turns > 0 && args.rate > 0.0, "tenants, turns and rate must be positive");
    let before = args.metrics.as_deref().map(worker_requests).transpose()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (results, wall) = runtime.block_on(async {
        let client = GenerationClient::connect(format!("http://{}", args.target))
            .await
            .with_context(|| format!("connecting to {}", args.target))?;
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
        let systems: Vec<String> = (0..args.tenants)
            .map(|t| format!("You are assistant number {t} of tenant {t}. {}", words(&mut rng, args.system_words)))
            .collect();
        let results = Arc::new(Mutex::new(Results::default()));
        let mut tasks = tokio::task::JoinSet::new();
        let start = Instant::now();
        let mut next = start;
        let mut n = 0usize;
        while next.duration_since(start) < args.duration {
            tokio::time::sleep_until(next.into()).await;
            let tenant = n % args.tenants;
            let users: Vec<String> = (0..args.turns).map(|_| words(&mut rng, args.user_words)).collect();
            tasks.spawn(conversation(client.clone(), systems[tenant].clone(), users, args.max_tokens, results.clone()));
            n += 1;
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            next += Duration::from_secs_f64(-u.ln() / args.rate);
        }
        let grace = tokio::time::sleep(args.duration.max(Duration::from_secs(30)));
        tokio::pin!(grace);
        loop {
            tokio::select! {
                r = tasks.join_next() => if r.is_none() { break },
                () = &mut grace => {
                    let left = tasks.len();
                    tasks.abort_all();
                    let mut r = results.lock().await;
                    r.failed += left;
                    r.errors.push(format!("{left} conversations still running after the grace period"));
                    break;
                }
            }
        }
        let wall = start.elapsed();
        let r = std::mem::take(&mut *results.lock().await);
        anyhow::Ok((r, wall))
    })?;
    let after = args.metrics.as_deref().map(worker_requests).transpose()?;
    let t = &results.turns;
    let secs = wall.as_secs_f64();
    let prompt: u64 = t.iter().map(|x| u64::from(x.prompt_tokens)).sum();
    let cached: u64 = t.iter().map(|x| u64::from(x.cached_tokens)).sum();
    let out: u64 = t.iter().map(|x| u64::from(x.completion_tokens)).sum();
    let hit = if prompt > 0 { cached as f64 / prompt as f64 } else { 0.0 };
    let ttft = percentiles(t.iter().map(|x| x.ttft).collect());
    let itl = percentiles(t.iter().filter_map(|x| x.itl).collect());
    let e2e = percentiles(t.iter().map(|x| x.e2e).collect());
    let spread: Vec<(String, f64)> = match (before, after) {
        (Some(b), Some(a)) => a
            .into_iter()
            .map(|(w, v)| {
                let prev = b.iter().find(|(x, _)| *x == w).map_or(0.0, |(_, p)| *p);
                (w, v - prev)
            })
            .collect(),
        _ => Vec::new(),
    };
    let mean = if spread.is_empty() { 0.0 } else { spread.iter().map(|(_, v)| v).sum::<f64>() / spread.len() as f64 };
    let max_over_mean = if mean > 0.0 { spread.iter().map(|(_, v)| *v).fold(0.0, f64::max) / mean } else { 0.0 };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "requests": t.len(), "failed": results.failed, "errors": results.errors, "seconds": secs,
                "requests_per_s": t.len() as f64 / secs, "output_tok_per_s": out as f64 / secs,
                "hit_rate": hit, "prompt_tokens": prompt, "cached_tokens": cached,
                "ttft_ms": {"p50": ttft[0], "p90": ttft[1], "p99": ttft[2]},
                "itl_ms": {"p50": itl[0], "p90": itl[1], "p99": itl[2]},
                "e2e_ms": {"p50": e2e[0], "p90": e2e[1], "p99": e2e[2]},
                "worker_requests": spread.iter().map(|(w, v)| (w.clone(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
                "max_over_mean_load": max_over_mean,
            })
        );
        return Ok(());
    }
    println!(
        "workload shared-prefix: {} tenants × {} turns, {:.2} conversations/s for {}, {} tokens per turn",
        args.tenants,
        args.turns,
        args.rate,
        humantime::format_duration(args.duration),
        args.max_tokens
    );
    println!("requests {} done, {} failed in {secs:.1} s", t.len(), results.failed);
    for e in &results.errors {
        println!("  error: {e}");
    }
    println!("throughput {:.2} req/s, {:.1} output tok/s", t.len() as f64 / secs, out as f64 / secs);
    println!("prefix-cache hit rate {:.1}% ({cached} of {prompt} prompt tokens)", hit * 100.0);
    println!("                p50 ms    p90 ms    p99 ms");
    for (name, p) in [("TTFT", ttft), ("ITL", itl), ("end-to-end", e2e)] {
        println!("{name:<12} {:>9.1} {:>9.1} {:>9.1}", p[0], p[1], p[2]);
    }
    if !spread.is_empty() {
        let list: Vec<String> = spread.iter().map(|(w, v)| format!("{w}={v:.0}")).collect();
        println!("requests per worker: {} (max / mean {max_over_mean:.2})", list.join(" "));
    }
    Ok(())
}
