//! `tessera bench route-sim`: a discrete-event simulation of a cluster whose router is the real
//! [`Router`](tessera_router::routing::Router) (policy, cost function, exact KV index, approximate
//! view), fed with simulated workers' KV events and load reports as the live router is fed over
//! gRPC (DESIGN.md, decision 4).
//!
//! Model, one submodule a part:
//! - `workload`: tenants' system prompts and multi-turn conversations, the same trace for every
//!   policy.
//! - `worker`: a worker's KV cache and FIFO scheduler, mirroring the engine's, and the KV events
//!   it publishes.
//! - `sim`: the event loop that routes every turn with the real router, delivers load reports and
//!   KV events, and measures throughput, latency, prefix hits and load spread.
//!
//! This module owns the command: its flags and their validation, `--rate auto` (a share of the
//! estimated no-cache capacity) and the printed comparison of every (workers, policy) pair.
//!
//! Invariant: nothing is simulated until the flags are validated; in particular a worker's cache
//! holds the longest conversation, so no request waits for more blocks than a worker has.

mod sim;
mod worker;
mod workload;

use std::time::{Duration, Instant};

use clap::Args;
use tessera_router::routing::{CostWeights, Policy};

use self::sim::{RunResult, Sim, SimConfig};
use self::worker::WorkerModel;
use self::workload::{Workload, arrival_trace, system_prompts};

/// Share of the estimated no-cache capacity that `--rate auto` offers.
const AUTO_LOAD: f64 = 0.7;
const US_PER_S: f64 = 1e6;

/// Arguments of `tessera bench route-sim`.
#[derive(Debug, Args)]
pub struct RouteSimArgs {
    /// Cluster sizes (workers), each simulated in turn.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    workers: Vec<u32>,
    /// Routing policies, each run on the same arrival trace.
    #[arg(long, value_delimiter = ',', default_value = "kv,prefix,least-load,round-robin,power-of-two")]
    policy: Vec<Policy>,
    /// Tenants, each with its own system prompt.
    #[arg(long, default_value_t = 32)]
    tenants: usize,
    /// Zipf exponent of tenant popularity (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    tenant_skew: f64,
    /// Turns per conversation.
    #[arg(long, default_value_t = 6)]
    turns: usize,
    /// Requests per second offered to the cluster, or `auto` (70% of the estimated capacity
    /// without any prefix-cache hit).
    #[arg(long, default_value = "auto", value_parser = parse_rate)]
    rate: Rate,
    /// Simulated time during which conversations start.
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Simulated time left out of the metrics (default: a fifth of `--duration`).
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Mean time between an answer and the next user turn.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    think_time: Duration,
    /// Tokens of each tenant's system prompt.
    #[arg(long, default_value_t = 1500)]
    system_prompt_len: usize,
    /// Mean tokens of a user message.
    #[arg(long, default_value_t = 150)]
    turn_len: usize,
    /// Mean tokens of an answer.
    #[arg(long, default_value_t = 200)]
    output_len: usize,
    /// KV-cache blocks per worker.
    #[arg(long, default_value_t = 8192)]
    kv_blocks_per_worker: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Most sequences a worker runs at once.
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Most tokens (decodes plus prefill chunks) in one worker step.
    #[arg(long, default_value_t = 2048)]
    max_batch_tokens: usize,
    /// Prefill time per uncached prompt token, in microseconds.
    #[arg(long, default_value_t = 80.0)]
    prefill_us_per_token: f64,
    /// Fixed time of a worker step, in milliseconds.
    #[arg(long, default_value_t = 20.0)]
    step_base_ms: f64,
    /// Added step time per decoding sequence, in milliseconds.
    #[arg(long, default_value_t = 0.15)]
    step_per_seq_ms: f64,
    /// Time between a worker's load reports.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    report_interval: Duration,
    /// Cost per uncached prompt token (policies kv and prefix).
    #[arg(long, default_value_t = CostWeights::default().prefill)]
    prefill_weight: f64,
    /// Cost per token of load (policies kv and prefix).
    #[arg(long, default_value_t = CostWeights::default().load)]
    load_weight: f64,
    /// Seed of the trace and of the router's tie-breaks.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object per (workers, policy) instead of the table.
    #[arg(long)]
    json: bool,
}

/// The offered request rate.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rate {
    /// [`AUTO_LOAD`] of the estimated no-cache capacity.
    Auto,
    /// Requests per second.
    PerSecond(f64),
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    if s == "auto" {
        return Ok(Rate::Auto);
    }
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(Rate::PerSecond(r)),
        _ => Err(format!("{s:?} is not a positive request rate or `auto`")),
    }
}

/// Requests per second one worker sustains with no prefix-cache hit at all, at its largest
/// batch (limited by `max_batch` and by the KV blocks a mean sequence needs).
fn capacity_per_worker(model: &WorkerModel, workload: &Workload) -> f64 {
    let prompt = workload.mean_prompt_tokens();
    let output = workload.output_len as f64;
    let blocks_per_seq = ((prompt + output) / model.block_size as f64).ceil().max(1.0);
    let batch = (model.max_batch as f64).min((model.kv_blocks as f64 / blocks_per_seq).floor()).max(1.0);
    let prefill_us = prompt * model.prefill_us_per_token;
    let decode_us = output * (model.step_base_us + model.step_per_seq_us * batch) / batch;
    US_PER_S / (prefill_us + decode_us)
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

fn validate(args: &RouteSimArgs, model: &WorkerModel, workload: &Workload, warmup: Duration) -> anyhow::Result<()> {
    anyhow::ensure!(!args.workers.is_empty() && args.workers.iter().all(|&w| w > 0), "worker counts must be positive");
    anyhow::ensure!(!args.policy.is_empty(), "no policy to simulate");
    anyhow::ensure!(args.tenants > 0 && args.turns > 0, "tenants and turns must be positive");
    anyhow::ensure!(args.turn_len > 0 && args.output_len > 0, "message lengths must be positive");
    anyhow::ensure!(args.tenant_skew.is_finite() && args.tenant_skew >= 0.0, "--tenant-skew must be ≥ 0");
    anyhow::ensure!(model.block_size > 0 && model.max_batch > 0, "block size and batch must be positive");
    anyhow::ensure!(model.max_batch_tokens > model.max_batch, "--max-batch-tokens must exceed --max-batch");
    let costs = [model.prefill_us_per_token, model.step_base_us, model.step_per_seq_us];
    anyhow::ensure!(costs.iter().all(|c| c.is_finite() && *c >= 0.0), "step costs must be finite and ≥ 0");
    let longest = workload.max_conversation_tokens().div_ceil(model.block_size);
    anyhow::ensure!(
        model.kv_blocks >= longest,
        "--kv-blocks-per-worker {} cannot hold the longest conversation ({longest} blocks)",
        model.kv_blocks
    );
    anyhow::ensure!(!args.report_interval.is_zero(), "--report-interval must be positive");
    anyhow::ensure!(warmup < args.duration, "--warmup must be shorter than --duration");
    Ok(())
}

/// Runs every (workers, policy) pair and prints the comparison.
pub fn run(args: &RouteSimArgs) -> anyhow::Result<()> {
    let model = WorkerModel {
        kv_blocks: args.kv_blocks_per_worker,
        block_size: args.block_size,
        max_batch: args.max_batch,
        max_batch_tokens: args.max_batch_tokens,
        prefill_us_per_token: args.prefill_us_per_token,
        step_base_us: args.step_base_ms * 1e3,
        step_per_seq_us: args.step_per_seq_ms * 1e3,
    };
    let workload = Workload {
        tenants: args.tenants,
        tenant_skew: args.tenant_skew,
        turns: args.turns,
        system_prompt_len: args.system_prompt_len,
        turn_len: args.turn_len,
        output_len: args.output_len,
        think_us: args.think_time.as_secs_f64() * US_PER_S,
    };
    let warmup = args.warmup.unwrap_or(args.duration / 5);
    validate(args, &model, &workload, warmup)?;
    let systems = system_prompts(&workload, args.seed);
    if !args.json {
        print_header(args, warmup);
    }
    for &n in &args.workers {
        let capacity = capacity_per_worker(&model, &workload) * f64::from(n);
        let rate = match args.rate {
            Rate::Auto => AUTO_LOAD * capacity,
            Rate::PerSecond(r) => r,
        };
        let trace = arrival_trace(&workload, rate / args.turns as f64, micros(args.duration), args.seed);
        if !args.json {
            let how = match args.rate {
                Rate::Auto => format!("auto: {:.0}% of", AUTO_LOAD * 100.0),
                Rate::PerSecond(_) => format!("{:.0}% of", rate / capacity * 100.0),
            };
            println!(
                "\n{n} workers: offered {rate:.1} req/s ({how} the estimated no-cache capacity {capacity:.1} req/s), {} conversations",
                trace.len()
            );
            print_columns();
        }
        for &policy in &args.policy {
            let config = SimConfig {
                workers: n,
                policy,
                weights: CostWeights { prefill: args.prefill_weight, load: args.load_weight },
                model,
                workload,
                duration_us: micros(args.duration),
                warmup_us: micros(warmup),
                report_interval_us: micros(args.report_interval).max(1),
                seed: args.seed,
            };
            let started = Instant::now();
            let result = Sim::new(config, &trace, &systems).run()?;
            let wall = started.elapsed();
            print_result(args.json, n, policy, rate, &result, wall);
        }
    }
    Ok(())
}

fn print_header(args: &RouteSimArgs, warmup: Duration) {
    println!(
        "route-sim: {} tenants (system prompt {} tokens, Zipf {}), {} turns of ~{} user + ~{} answer tokens, think ~{}",
        args.tenants,
        args.system_prompt_len,
        args.tenant_skew,
        args.turns,
        args.turn_len,
        args.output_len,
        humantime::format_duration(args.think_time)
    );
    println!(
        "worker: {} KV blocks × {} tokens, max batch {} / {} tokens per step, step {} ms + {} ms/seq, prefill {} µs/token; load reports every {}",
        args.kv_blocks_per_worker,
        args.block_size,
        args.max_batch,
        args.max_batch_tokens,
        args.step_base_ms,
        args.step_per_seq_ms,
        args.prefill_us_per_token,
        humantime::format_duration(args.report_interval)
    );
    println!(
        "window: arrivals in {}–{} simulated (same trace for every policy; seed {})",
        humantime::format_duration(warmup),
        humantime::format_duration(args.duration),
        args.seed
    );
}

fn print_columns() {
    println!(
        "{:>12} {:>13} {:>7} {:>7} {:>9} {:>6} {:>9} {:>9} {:>9} {:>9} {:>13} {:>13} {:>6}",
        "policy",
        "done/arrived",
        "arr/s",
        "req/s",
        "out tok/s",
        "hit",
        "TTFT p50",
        "TTFT p99",
        "E2E p50",
        "E2E p99",
        "load max/mean",
        "inst max/mean",
        "wall"
    );
}

fn print_result(json: bool, workers: u32, policy: Policy, rate: f64, r: &RunResult, wall: Duration) {
    if json {
        let line = serde_json::json!({
            "workers": workers, "policy": policy.to_string(), "offered_req_s": rate,
            "measured": r.measured, "completed": r.completed, "arrived_req_s": r.arrived_per_s, "req_s": r.req_per_s,
            "output_tok_s": r.output_tok_per_s, "prefix_hit_rate": r.hit_rate,
            "ttft_p50_ms": r.ttft_ms.0, "ttft_p99_ms": r.ttft_ms.1,
            "e2e_p50_ms": r.e2e_ms.0, "e2e_p99_ms": r.e2e_ms.1,
            "load_max_over_mean": r.load_max_over_mean, "instant_load_max_over_mean": r.instant_max_over_mean,
            "wall_s": wall.as_secs_f64(),
        });
        println!("{line}");
        return;
    }
    println!(
        "{:>12} {:>13} {:>7.1} {:>7.1} {:>9.0} {:>5.1}% {:>7.0}ms {:>7.0}ms {:>8.2}s {:>8.2}s {:>13.2} {:>13.2} {:>5.1}s",
        policy.to_string(),
        format!("{}/{}", r.completed, r.measured),
        r.arrived_per_s,
        r.req_per_s,
        r.output_tok_per_s,
        r.hit_rate * 100.0,
        r.ttft_ms.0,
        r.ttft_ms.1,
        r.e2e_ms.0 / 1e3,
        r.e2e_ms.1 / 1e3,
        r.load_max_over_mean,
        r.instant_max_over_mean,
        wall.as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn model(kv_blocks: usize) -> WorkerModel {
        WorkerModel {
            kv_blocks,
            block_size: 4,
            max_batch: 8,
            max_batch_tokens: 64,
            prefill_us_per_token: 100.0,
            step_base_us: 10_000.0,
            step_per_seq_us: 500.0,
        }
    }

    pub(super) fn workload() -> Workload {
        Workload {
            tenants: 3,
            tenant_skew: 1.0,
            turns: 3,
            system_prompt_len: 40,
            turn_len: 8,
            output_len: 6,
            think_us: 2e6,
        }
    }

    #[test]
    fn rates_parse_and_auto_uses_the_no_cache_capacity() {
        assert_eq!(parse_rate("auto"), Ok(Rate::Auto));
        assert_eq!(parse_rate("12.5"), Ok(Rate::PerSecond(12.5)));
        assert!(parse_rate("0").is_err() && parse_rate("fast").is_err());
        // Prompt mean 40 + 8 + 14 = 62 tokens → 6.2 ms prefill; decode at batch 8: 6 × 14 ms / 8.
        let per_worker = capacity_per_worker(&model(256), &workload());
        assert!((per_worker - 1e6 / (6_200.0 + 10_500.0)).abs() < 1e-6, "{per_worker}");
    }
}
