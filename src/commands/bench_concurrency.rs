//! `tessera bench engine --concurrency …`: closed-loop serving load on the in-process engine.
//!
//! `C` clients each keep one request in flight (a new one is submitted as soon as one finishes)
//! until `requests` have completed. Prompts are a shared prefix (`--shared-prefix-len`, the same
//! random ids for every request, as a long system prompt) plus a unique suffix. Reported per
//! concurrency level: output tok/s over the wall time, time to first token and inter-token
//! latency (p50 / p99), and the prefix-cache hit rate (cached ÷ prompt tokens). A warm-up
//! request (not timed) computes the shared prefix first, as an earlier user would have.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_worker::engine::{Engine, EngineOptions, GenerationRequest, SequenceEvent};
use tessera_worker::kv_cache::KvCacheConfig;
use tessera_worker::sampler::SamplingParams;

use super::bench::EngineBenchArgs;

/// One concurrency level's results.
struct LevelResult {
    concurrency: usize,
    requests: usize,
    output_tok_s: f64,
    ttft_p50: Duration,
    ttft_p99: Duration,
    itl_p50: Duration,
    itl_p99: Duration,
    hit_rate: f64,
}

fn percentile(xs: &mut [Duration], p: f64) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    xs.sort();
    let rank = ((p / 100.0) * xs.len() as f64).ceil() as usize;
    xs[rank.clamp(1, xs.len()) - 1]
}

struct InFlight {
    submitted: Instant,
    last: Option<Instant>,
}

/// Runs every `--concurrency` level.
pub fn run(args: &EngineBenchArgs) -> anyhow::Result<()> {
    let resolved = args.model.resolve()?;
    let vocab = resolved.config.vocab_size as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(3..vocab.max(4))).collect() };
    let shared = ids(args.shared_prefix_len);
    let max_c = args.concurrency.iter().copied().max().unwrap_or(1);
    let per_request = args.shared_prefix_len + args.prompt_len + args.gen_len;
    // Room for every in-flight sequence plus the cached shared prefix.
    let kv = KvCacheConfig::for_sequences(max_c + 1, per_request, 16);
    let mut results = Vec::new();
    for &c in &args.concurrency {
        let total = args.requests.max(2 * c);
        let prompts: Vec<Vec<u32>> = (0..total + 1).map(|_| [shared.clone(), ids(args.prompt_len)].concat()).collect();
        let options = EngineOptions {
            prefix_caching: !args.no_prefix_cache,
            max_running: max_c.max(1),
            max_batch_tokens: EngineOptions::default().max_batch_tokens.max(max_c),
            ..EngineOptions::default()
        };
        let mut engine = Engine::with_options(args.model.backend(&resolved, kv, &args.parallel)?, kv, options)?;
        let request = |prompt: &Vec<u32>, n| GenerationRequest {
            prompt: prompt.clone(),
            max_new_tokens: n,
            sampling: SamplingParams::greedy(),
            stop_token_ids: Vec::new(),
            min_tokens: 0,
            logprobs: None,
        };
        // Warm-up: pages in weights and computes the shared prefix (an earlier user's request).
        engine.generate(&[request(&prompts[total], 2)], |_, _| {})?;
        results.push(level(&mut engine, c, &prompts[..total], &|p| request(p, args.gen_len))?);
    }
    print(args, &resolved.id, &results);
    Ok(())
}

fn level(
    engine: &mut Engine,
    concurrency: usize,
    prompts: &[Vec<u32>],
    request: &dyn Fn(&Vec<u32>) -> GenerationRequest,
) -> anyhow::Result<LevelResult> {
    let mut next = 0;
    let mut in_flight = HashMap::new();
    let (mut ttft, mut itl) = (Vec::new(), Vec::new());
    let (mut generated, mut prompt_tokens, mut cached) = (0usize, 0usize, 0usize);
    let start = Instant::now();
    let mut done = 0;
    while done < prompts.len() {
        while in_flight.len() < concurrency && next < prompts.len() {
            let id = engine.add(request(&prompts[next]), None, None)?;
            in_flight.insert(id, InFlight { submitted: Instant::now(), last: None });
            next += 1;
        }
        let report = engine.step()?;
        let now = Instant::now();
        for event in report.events {
            match event {
                SequenceEvent::Token { seq, .. } => {
                    generated += 1;
                    if let Some(f) = in_flight.get_mut(&seq) {
                        match f.last {
                            None => ttft.push(now - f.submitted),
                            Some(t) => itl.push(now - t),
                        }
                        f.last = Some(now);
                    }
                }
                SequenceEvent::Finished { seq, usage, .. } => {
                    in_flight.remove(&seq);
                    prompt_tokens += usage.prompt_tokens;
                    cached += usage.cached_prompt_tokens;
                    done += 1;
                }
                SequenceEvent::Failed { error, .. } => return Err(error.into()),
            }
        }
    }
    let wall = start.elapsed();
    Ok(LevelResult {
        concurrency,
        requests: prompts.len(),
        output_tok_s: generated as f64 / wall.as_secs_f64().max(1e-9),
        ttft_p50: percentile(&mut ttft, 50.0),
        ttft_p99: percentile(&mut ttft, 99.0),
        itl_p50: percentile(&mut itl, 50.0),
        itl_p99: percentile(&mut itl, 99.0),
        hit_rate: cached as f64 / prompt_tokens.max(1) as f64,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print(args: &EngineBenchArgs, model: &str, results: &[LevelResult]) {
    let base = results.iter().find(|r| r.concurrency == 1).map(|r| r.output_tok_s);
    if args.json {
        for r in results {
            let line = serde_json::json!({
                "model": model, "concurrency": r.concurrency, "requests": r.requests,
                "shared_prefix_len": args.shared_prefix_len, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                "prefix_cache": !args.no_prefix_cache, "output_tok_s": r.output_tok_s,
                "ttft_p50_ms": ms(r.ttft_p50), "ttft_p99_ms": ms(r.ttft_p99),
                "itl_p50_ms": ms(r.itl_p50), "itl_p99_ms": ms(r.itl_p99),
                "prefix_hit_rate": r.hit_rate, "vs_concurrency_1": base.map(|b| r.output_tok_s / b),
            });
            println!("{line}");
        }
        return;
    }
    println!(
        "model {model}; prompts: shared prefix {} + unique {} tokens; {} generated each; prefix cache {}",
        args.shared_prefix_len,
        args.prompt_len,
        args.gen_len,
        if args.no_prefix_cache { "off" } else { "on" }
    );
    println!(
        "{:>11} {:>8} {:>10} {:>7} {:>10} {:>10} {:>9} {:>9} {:>8}",
        "concurrency", "requests", "out tok/s", "vs c=1", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "hit rate"
    );
    for r in results {
        let ratio = base.map_or("-".to_string(), |b| format!("{:.2}x", r.output_tok_s / b));
        println!(
            "{:>11} {:>8} {:>10.1} {:>7} {:>8.1}ms {:>8.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}%",
            r.concurrency,
            r.requests,
            r.output_tok_s,
            ratio,
            ms(r.ttft_p50),
            ms(r.ttft_p99),
            ms(r.itl_p50),
            ms(r.itl_p99),
            r.hit_rate * 100.0
        );
    }
}
