//! `tessera bench …`: speed measured against this machine's own limits, in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_kernels::CpuPool;
use tessera_kernels::bandwidth::{ReadProbe, gb_per_s};
use tessera_kernels::peak::{measure_fma_peak, measure_int16_dot_peak};
use tessera_kernels::profile::{self, ClassTotals, KernelClass};
use tessera_kernels::quant::panels;
use tessera_worker::engine::{Engine, EngineOptions, GenerationRequest};
use tessera_worker::kv_cache::KvCacheConfig;
use tessera_worker::plan::human_bytes;
use tessera_worker::sampler::SamplingParams;

use super::model_args::{Device, ModelArgs, ParallelArgs};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode throughput of the engine, with decode compared to the memory-bandwidth
    /// roofline (read bandwidth ÷ bytes read per decoded token) on the CPU; with
    /// `--concurrency`, closed-loop serving load (throughput, TTFT, ITL, prefix-cache hits).
    Engine(EngineBenchArgs),
    /// Router overhead against mock workers: added latency (p50/p99) at a fixed request rate,
    /// and the most requests/s the router sustains.
    Router(super::bench_router::RouterBenchArgs),
    /// Open-loop multi-tenant, multi-turn chat load against a running router: throughput,
    /// TTFT / ITL / end-to-end percentiles, prefix-cache hit rate, spread over workers.
    Serve(super::bench_serve::ServeBenchArgs),
    /// Routing policies compared on a simulated cluster (multi-tenant multi-turn chat, finite
    /// KV caches, continuous batching) whose router runs the real policy code.
    RouteSim(super::bench_route_sim::RouteSimArgs),
}

/// Arguments of `tessera bench engine`.
#[derive(Debug, Args)]
pub struct EngineBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// Sequences decoded together; a comma-separated list runs each size in turn.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// Prompt tokens per sequence (random ids).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens generated per sequence (end-of-sequence is ignored).
    #[arg(long, default_value_t = 128)]
    pub gen_len: usize,
    /// Timed runs per batch size; the median and the range are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Buffer size of the CPU read-bandwidth measurement, in MiB (well above the last-level cache).
    #[arg(long, default_value_t = 1024)]
    bandwidth_mib: usize,
    /// Also read the bandwidth between decode steps (one pass over as many bytes as a step's
    /// weights after each step, outside the step's timing) and judge decode against it too. Off by
    /// default: the passes slow the steps they sit between (on the test host by 0.5–15%, median
    /// 4%, over 9 alternating pairs of runs; passes of 4 MiB as much as of 136 MiB), so decode
    /// then reads low.
    #[arg(long)]
    probe_between_steps: bool,
    /// Print one JSON object per batch size instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Serving mode: closed-loop clients, each keeping one request in flight; a comma-separated
    /// list runs each level (reports output tok/s, TTFT and ITL percentiles, prefix hit rate).
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Serving mode: tokens of a prefix every prompt shares (before its own `--prompt-len`).
    #[arg(long, default_value_t = 0)]
    pub shared_prefix_len: usize,
    /// Serving mode: requests completed per level (at least twice the concurrency).
    #[arg(long, default_value_t = 16)]
    pub requests: usize,
    /// Serving mode: turn the prefix cache off (to compare).
    #[arg(long)]
    pub no_prefix_cache: bool,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => 0.0,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// One timed run of `bench engine`.
struct Run {
    prefill: f64,
    decode: f64,
    /// CPU only: what the machine could do around the run, the higher of the readings right
    /// before and right after it, each limit on its own (a run lasts well under a second; where
    /// the host drifts during it, the higher reading is the stricter side).
    limits: Option<Reading>,
    /// With `--probe-between-steps`: all the passes that alternated with the run's decode steps,
    /// as one rate (bytes ÷ time, GB/s), aggregated the way decode tok/s is.
    between: Option<f64>,
}

/// Passes per bandwidth reading around a run; the fastest is the reading.
const PASSES_PER_READING: usize = 5;
/// Passes per compute-peak reading around a run (each some milliseconds); the fastest is the
/// reading.
const PEAK_PASSES_PER_READING: usize = 3;
/// Round trips per reading of the pool's thread round trip (a few milliseconds).
const ROUND_TRIPS_PER_READING: usize = 20_000;
/// How long a round-trip reading waits for a worker before it reports none.
const ROUND_TRIP_PATIENCE: Duration = Duration::from_secs(1);

/// The machine's limits, read right before and right after each timed run on the engine's own
/// threads: they drift with what else the host runs, and with where it runs the vCPUs.
#[derive(Clone, Copy)]
struct Reading {
    /// Read bandwidth, GB/s.
    bandwidth: f64,
    /// The pool's thread round trip ([`CpuPool::round_trip`]), ns; none on one thread.
    round_trip_ns: Option<f64>,
    /// f32 FMA peak, GFLOP/s.
    fma_peak: f64,
    /// 16-bit integer dot-product peak, GOP/s, where Q8_0 matrices sit in row panels (their
    /// matmuls run on it).
    dot_peak: Option<f64>,
}

impl Reading {
    /// Each limit the higher of `self`'s and `other`'s.
    fn higher(self, other: Reading) -> Reading {
        let higher = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Reading {
            bandwidth: self.bandwidth.max(other.bandwidth),
            round_trip_ns: higher(self.round_trip_ns, other.round_trip_ns),
            fma_peak: self.fma_peak.max(other.fma_peak),
            dot_peak: higher(self.dot_peak, other.dot_peak),
        }
    }
}

/// One timed run's decode against its own readings.
struct RunSummary {
    decode: f64,
    bandwidth: f64,
    round_trip_ns: Option<f64>,
    ratio: f64,
}

impl RunSummary {
    fn show(&self) -> String {
        let round_trip = self.round_trip_ns.map(|ns| format!(", round trip {ns:.0} ns")).unwrap_or_default();
        format!("{:.1} tok/s at {:.1} GB/s{round_trip}: {:.3} of roofline", self.decode, self.bandwidth, self.ratio)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "decode_tok_s": self.decode, "read_bandwidth_gb_s": self.bandwidth,
            "thread_round_trip_ns": self.round_trip_ns, "decode_over_roofline": self.ratio })
    }
}

/// Median and range of a set of runs.
struct Spread {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

impl Spread {
    fn of(xs: impl Iterator<Item = f64>) -> Self {
        let xs: Vec<f64> = xs.collect();
        let (min, max) = xs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        Spread { median: median(xs.clone()), min, max, n: xs.len() }
    }

    fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn show(&self, decimals: usize) -> String {
        format!("{:.d$} [{:.d$} – {:.d$}]", self.median, self.min, self.max, d = decimals)
    }

    fn json(&self) -> serde_json::Value {
        if self.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::json!({ "median": self.median, "min": self.min, "max": self.max })
        }
    }
}

/// One phase of the accounting run: its wall time and its kernels' totals per class.
struct PhaseProfile {
    phase: &'static str,
    wall: Duration,
    classes: Vec<(KernelClass, ClassTotals)>,
}

/// One more run with kernel accounting on: totals per class for the steps with prompt tokens
/// (until every sequence has its first token) and for the decode steps after them, with each
/// phase's wall time, so that what runs outside the kernels (sampling, scheduling, the engine's
/// bookkeeping) shows too.
fn profile_phases(engine: &mut Engine, requests: &[GenerationRequest]) -> anyhow::Result<Vec<PhaseProfile>> {
    let mut started = vec![false; requests.len()];
    let mut waiting = requests.len();
    let mut prefill = Vec::new();
    profile::set_enabled(true);
    let _ = profile::take();
    let start = Instant::now();
    let mut decode_start = start;
    let result = engine.generate(requests, |seq, _| {
        if let Some(s) = started.get_mut(seq).filter(|s| !**s) {
            *s = true;
            waiting -= 1;
            if waiting == 0 {
                prefill = profile::take();
                decode_start = Instant::now();
            }
        }
    });
    let end = Instant::now();
    profile::set_enabled(false);
    let decode = profile::take();
    result?;
    let used = |v: Vec<(KernelClass, ClassTotals)>| v.into_iter().filter(|(_, t)| t.calls > 0).collect();
    Ok(vec![
        PhaseProfile { phase: "prefill", wall: decode_start - start, classes: used(prefill) },
        PhaseProfile { phase: "decode", wall: end - decode_start, classes: used(decode) },
    ])
}

/// The per-class table, with each class's rates next to the machine's peaks and its share of
/// the phase's wall time; the phase's time outside the kernels closes it.
fn print_classes(phases: &[PhaseProfile], bandwidth: f64, fma_peak: f64) {
    println!(
        "per kernel class (one more run with accounting on; against the median readings: {bandwidth:.1} GB/s read, \
         {fma_peak:.1} GFLOP/s f32 FMA)"
    );
    println!("  phase    class          calls   time ms  share    GB/s  of bw   GFLOP/s  of peak");
    for p in phases {
        let wall = p.wall.as_secs_f64().max(1e-12);
        let mut in_kernels = 0.0;
        for (class, t) in &p.classes {
            let secs = t.time.as_secs_f64().max(1e-12);
            in_kernels += secs;
            let (gbs, gflops) = (t.bytes as f64 / secs / 1e9, t.flops as f64 / secs / 1e9);
            println!(
                "  {:<8} {:<13} {:>6} {:>9.2} {:>5.1}% {:>7.1} {:>5.2} {:>9.1} {:>7.2}",
                p.phase,
                class.name(),
                t.calls,
                secs * 1e3,
                100.0 * secs / wall,
                gbs,
                gbs / bandwidth.max(1e-9),
                gflops,
                gflops / fma_peak.max(1e-9)
            );
        }
        let outside = (wall - in_kernels).max(0.0);
        println!("  {:<8} {:<13} {:>6} {:>9.2} {:>5.1}%", p.phase, "other", "", outside * 1e3, 100.0 * outside / wall);
    }
}

fn per_second(count: usize, time: Duration) -> f64 {
    count as f64 / time.as_secs_f64().max(1e-9)
}

/// Runs a benchmark subcommand.
pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Engine(args) => engine(args),
        BenchCommand::Router(args) => super::bench_router::run(args),
        BenchCommand::Serve(args) => super::bench_serve::run(args),
        BenchCommand::RouteSim(args) => super::bench_route_sim::run(&args),
    }
}

fn engine(args: EngineBenchArgs) -> anyhow::Result<()> {
    if !args.concurrency.is_empty() {
        anyhow::ensure!(
            args.concurrency.iter().all(|&c| c > 0) && args.gen_len > 0 && args.prompt_len > 0,
            "concurrency levels and lengths must be positive"
        );
        return super::bench_concurrency::run(&args);
    }
    let max_batch = args.batch.iter().copied().max().unwrap_or(0);
    anyhow::ensure!(
        args.batch.iter().all(|&b| b > 0) && args.gen_len > 0 && args.prompt_len > 0 && args.runs > 0,
        "batch sizes, lengths and runs must be positive"
    );
    let resolved = args.model.resolve()?;
    let config = resolved.config.clone();
    anyhow::ensure!(
        args.prompt_len + args.gen_len <= config.max_position_embeddings,
        "prompt + generation ({}) exceeds the model's context of {}",
        args.prompt_len + args.gen_len,
        config.max_position_embeddings
    );
    let kv = KvCacheConfig::for_sequences(max_batch, args.prompt_len + args.gen_len, 16);
    // Every run repeats the same prompts: without turning the prefix cache off, runs after the
    // first would measure cache hits instead of prefill.
    let mut engine = Engine::with_options(
        args.model.backend(&resolved, kv, &args.parallel)?,
        kv,
        EngineOptions { prefix_caching: false, ..EngineOptions::default() },
    )?;
    let info = engine.backend().info();
    // The CPU ceilings, measured in this run on the engine's own threads (a separate pool of as
    // many threads for a tensor-parallel group) right before and right after every timed run
    // (`Reading`: they drift with what else the host runs, so each run gets its own roofline and
    // peaks), and with `--probe-between-steps` the bandwidth between its decode steps too.
    let probe: Option<Arc<CpuPool>> = match args.model.device {
        Device::Cpu => match engine.backend().cpu_pool() {
            Some(pool) => Some(pool),
            None => Some(Arc::new(CpuPool::new(args.model.threads)?)),
        },
        Device::Cuda => None,
    };
    // Q8_0 matrices in row panels multiply on 16-bit integer dot products, which outrun f32 FMAs:
    // their prefill is judged against that rate too.
    let panelled =
        |pool: &CpuPool| info.weights_dtype.contains("Q8_0") && panels::pays_off(pool.isa(), pool.input_rounding());
    let flops_per_token = config.matmul_flops_per_token() as f64;

    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let vocab = config.vocab_size as u32;
    for &batch in &args.batch {
        let requests: Vec<GenerationRequest> = (0..batch)
            .map(|_| GenerationRequest {
                prompt: (0..args.prompt_len).map(|_| rng.random_range(3..vocab.max(4))).collect(),
                max_new_tokens: args.gen_len,
                sampling: SamplingParams::greedy(),
                stop_token_ids: Vec::new(),
                min_tokens: 0,
                logprobs: None,
            })
            .collect();
        // Warm-up: page in weights, start threads, compile and cache kernels.
        let warm: Vec<GenerationRequest> =
            requests.iter().map(|r| GenerationRequest { max_new_tokens: args.gen_len.min(4), ..r.clone() }).collect();
        engine.generate(&warm, |_, _| {})?;
        // KV read per decode step: every sequence reads its whole context; the mean context over
        // the decode steps is prompt_len + gen_len / 2.
        let mean_context = args.prompt_len as f64 + args.gen_len as f64 / 2.0;
        let kv_per_step = batch as f64 * mean_context * info.kv_bytes_per_token as f64;
        let weights_per_step = info.weight_bytes_per_step as f64;
        let bytes_per_token = (weights_per_step + kv_per_step) / batch as f64;
        // A pass between steps reads as many bytes as a decode step's weights, up to the size of
        // the readings around runs.
        let pass_bytes = info.weight_bytes_per_step.min(args.bandwidth_mib << 20);
        let around_runs = probe.as_deref().map(|pool| (pool, ReadProbe::new(args.bandwidth_mib << 20)));
        let between_steps =
            probe.as_deref().filter(|_| args.probe_between_steps).map(|pool| (pool, ReadProbe::new(pass_bytes)));
        let mut runs: Vec<Run> = Vec::with_capacity(args.runs);
        // One reading between consecutive runs serves as the after of one and the before of the
        // next.
        let read_around = || {
            around_runs.as_ref().map(|(pool, big)| Reading {
                bandwidth: big.report(pool, PASSES_PER_READING).best_gb_per_s,
                round_trip_ns: pool
                    .round_trip(ROUND_TRIPS_PER_READING, ROUND_TRIP_PATIENCE)
                    .map(|t| t.as_secs_f64() * 1e9),
                fma_peak: measure_fma_peak(pool, PEAK_PASSES_PER_READING).best_gflop_per_s,
                dot_peak: Some(pool)
                    .filter(|pool| panelled(pool))
                    .and_then(|pool| measure_int16_dot_peak(pool, PEAK_PASSES_PER_READING))
                    .map(|p| p.best_gflop_per_s),
            })
        };
        let mut reading_before = read_around();
        for _ in 0..args.runs {
            let (mut read, mut reading) = (0usize, Duration::ZERO);
            let mut first_token_seen = false;
            // After each step that gave the first sequence a token past its first, outside the
            // step's timing (`generate` times only its steps).
            let stats = engine
                .generate(&requests, |seq, _| {
                    if seq == 0
                        && std::mem::replace(&mut first_token_seen, true)
                        && let Some((pool, pass)) = &between_steps
                    {
                        read += pass.bytes();
                        reading += pass.pass(pool);
                    }
                })?
                .1;
            let after = read_around();
            let before = std::mem::replace(&mut reading_before, after);
            runs.push(Run {
                prefill: per_second(stats.prefill_tokens, stats.prefill_time),
                decode: per_second(stats.decode_tokens, stats.decode_time),
                limits: before.zip(after).map(|(before, after)| before.higher(after)),
                between: (read > 0).then(|| gb_per_s(read, reading)),
            });
        }
        let classes = match probe {
            Some(_) => profile_phases(&mut engine, &requests)?,
            None => Vec::new(),
        };
        let prefill = Spread::of(runs.iter().map(|r| r.prefill));
        let decode = Spread::of(runs.iter().map(|r| r.decode));
        // Each run's reading of one limit, and the run's speed over it, in the limit's units:
        // decode as the bytes it read per second (its ratio to the roofline), prefill as GFLOP/s.
        let decode_gb_s = |r: &Run| r.decode * bytes_per_token / 1e9;
        let prefill_gflop_s = |r: &Run| r.prefill * flops_per_token / 1e9;
        let limits = |limit: &dyn Fn(&Run) -> Option<f64>| Spread::of(runs.iter().filter_map(limit));
        let over = |limit: &dyn Fn(&Run) -> Option<f64>, speed: &dyn Fn(&Run) -> f64| {
            Spread::of(runs.iter().filter_map(|r| limit(r).map(|l| speed(r) / l)))
        };
        let bandwidth_of = |r: &Run| r.limits.map(|l| l.bandwidth);
        let fma_peak_of = |r: &Run| r.limits.map(|l| l.fma_peak);
        let dot_peak_of = |r: &Run| r.limits.and_then(|l| l.dot_peak);
        let (bandwidth, ratio) = (limits(&bandwidth_of), over(&bandwidth_of, &decode_gb_s));
        let (bandwidth_between, ratio_between) = (limits(&|r| r.between), over(&|r| r.between, &decode_gb_s));
        let round_trip = limits(&|r| r.limits.and_then(|l| l.round_trip_ns));
        let (fma_peak, prefill_over_fma) = (limits(&fma_peak_of), over(&fma_peak_of, &prefill_gflop_s));
        let (dot_peak, prefill_over_dot) = (limits(&dot_peak_of), over(&dot_peak_of, &prefill_gflop_s));
        let prefill_gflops = prefill.median * flops_per_token / 1e9;
        // Each run on its own: its regime shows in its bandwidth and round trip together.
        let each_run: Vec<RunSummary> = runs
            .iter()
            .filter_map(|r| {
                let l = r.limits?;
                let ratio = decode_gb_s(r) / l.bandwidth;
                Some(RunSummary { decode: r.decode, bandwidth: l.bandwidth, round_trip_ns: l.round_trip_ns, ratio })
            })
            .collect();
        if args.json {
            let class_json: Vec<serde_json::Value> = classes
                .iter()
                .flat_map(|p| {
                    p.classes.iter().map(|(class, t)| {
                        serde_json::json!({ "phase": p.phase, "class": class.name(), "calls": t.calls,
                            "seconds": t.time.as_secs_f64(), "bytes": t.bytes, "flops": t.flops })
                    })
                })
                .collect();
            let phase_json: serde_json::Map<String, serde_json::Value> =
                classes.iter().map(|p| (p.phase.to_string(), p.wall.as_secs_f64().into())).collect();
            let line = serde_json::json!({
                "model": resolved.id, "device": info.device, "weights_dtype": info.weights_dtype,
                "batch": batch, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "runs": args.runs,
                "prefill_tok_s": prefill.json(), "decode_tok_s": decode.json(),
                "weight_bytes_per_step": weights_per_step, "kv_bytes_per_step_mean": kv_per_step,
                "read_bandwidth_gb_s": bandwidth.json(), "decode_over_roofline": ratio.json(),
                "read_bandwidth_between_steps_gb_s": bandwidth_between.json(),
                "decode_over_roofline_between_steps": ratio_between.json(),
                "thread_round_trip_ns": round_trip.json(),
                "each_run": each_run.iter().map(RunSummary::json).collect::<Vec<_>>(),
                "prefill_gflop_s": prefill_gflops, "fma_peak_gflop_s": fma_peak.json(),
                "prefill_over_fma_peak": prefill_over_fma.json(), "int16_dot_peak_gop_s": dot_peak.json(),
                "prefill_over_int16_dot_peak": prefill_over_dot.json(),
                "kernel_classes": class_json, "phase_seconds": phase_json, "tuning": info.tuning,
            });
            println!("{line}");
            continue;
        }
        println!("model                 {} ({} weights, {})", resolved.id, info.weights_dtype, info.device);
        for line in &info.tuning {
            println!("tuned at load         {line}");
        }
        println!(
            "shape                 batch {batch} × prompt {} + gen {}; {} runs: median [min – max]",
            args.prompt_len, args.gen_len, args.runs
        );
        println!("prefill               {} tok/s ({prefill_gflops:.1} GFLOP/s in matmuls)", prefill.show(1));
        if !fma_peak.is_empty() {
            println!(
                "f32 FMA peak          {} GFLOP/s around each run (fastest of {PEAK_PASSES_PER_READING} passes right \
                 before it and right after it, the higher); prefill / peak {} (each run against its own)",
                fma_peak.show(1),
                prefill_over_fma.show(3)
            );
        }
        if !dot_peak.is_empty() {
            println!(
                "int16 dot peak        {} GOP/s around each run (Q8_0 matmuls run on it); prefill / dot peak {}",
                dot_peak.show(1),
                prefill_over_dot.show(3)
            );
        }
        println!("decode                {} tok/s (output tokens, all sequences)", decode.show(1));
        println!("weights read per step {} ({weights_per_step:.0} bytes)", human_bytes(weights_per_step as u64));
        println!(
            "bytes read per token  {} (weights ÷ batch + KV at mean context {mean_context:.0})",
            human_bytes(bytes_per_token as u64)
        );
        if !bandwidth.is_empty() {
            println!(
                "read bandwidth        {} GB/s around each run (fastest of {PASSES_PER_READING} passes of {} MiB \
                 right before it and right after it, the higher)",
                bandwidth.show(1),
                args.bandwidth_mib
            );
            if !bandwidth_between.is_empty() {
                println!(
                    "                      {} GB/s between decode steps (one {} pass after each step)",
                    bandwidth_between.show(1),
                    human_bytes(pass_bytes as u64)
                );
            }
            if !round_trip.is_empty() {
                println!(
                    "thread round trip     {} ns around each run (launching thread to a worker and back, the \
                     higher of right before and right after; higher where the threads share no cache)",
                    round_trip.show(0)
                );
            }
            let roofline = bandwidth.median * 1e9 / bytes_per_token;
            println!("roofline decode       {roofline:.1} tok/s at the median bandwidth (bandwidth ÷ bytes per token)");
            println!("decode / roofline     {} (each run against the bandwidth around it)", ratio.show(3));
            for (i, run) in each_run.iter().enumerate() {
                println!("{:<22}{}", if i == 0 { "each run" } else { "" }, run.show());
            }
            if !ratio_between.is_empty() {
                println!(
                    "                      {} (each run against the bandwidth between its steps)",
                    ratio_between.show(3)
                );
            }
        }
        if !classes.is_empty() {
            print_classes(&classes, bandwidth.median, fma_peak.median);
        }
        println!();
    }
    Ok(())
}
