//! Per-request sampling in the engine: log-probabilities, minimum lengths, penalties, and
//! seeded sampling that does not depend on what else is in the batch.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use std::path::Path;

use tessera_kernels::CpuPool;
use tessera_worker::WeightsDtype;
use tessera_worker::backend::cpu::CpuBackend;
use tessera_worker::engine::{Engine, FinishReason, GenerationOutput, GenerationRequest};
use tessera_worker::kv_cache::KvCacheConfig;
use tessera_worker::loader::{self, ModelSpec, ResolveOptions};
use tessera_worker::model::LlamaModel;
use tessera_worker::sampler::SamplingParams;

fn engine() -> (Engine, Vec<u32>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/stories260K");
    let options = ResolveOptions { cache_dir: std::env::temp_dir(), dummy_seed: 0 };
    let model = loader::resolve(&ModelSpec::HfDir(dir), &options).unwrap();
    let prompt = model.text.tokenizer.encode("Once upon a time", true).unwrap().get_ids().to_vec();
    let llama = LlamaModel::load(&model.config, model.weights.as_ref(), WeightsDtype::F32, |_| {}).unwrap();
    let kv = KvCacheConfig { num_blocks: 128, block_size: 16 };
    (Engine::new(Box::new(CpuBackend::new(llama, CpuPool::new(1).unwrap(), kv).unwrap()), kv).unwrap(), prompt)
}

fn request(prompt: &[u32], n: usize, sampling: SamplingParams) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.to_vec(),
        max_new_tokens: n,
        sampling,
        stop_token_ids: Vec::new(),
        min_tokens: 0,
        logprobs: None,
    }
}

fn run(e: &mut Engine, requests: &[GenerationRequest]) -> Vec<GenerationOutput> {
    e.generate(requests, |_, _| {}).unwrap().0
}

#[test]
fn greedy_logprobs_pick_the_top_alternative() {
    let (mut e, prompt) = engine();
    let plain = run(&mut e, &[request(&prompt, 16, SamplingParams::greedy())]).remove(0);
    let r = GenerationRequest { logprobs: Some(3), ..request(&prompt, 16, SamplingParams::greedy()) };
    let out = run(&mut e, &[r]).remove(0);
    assert_eq!(out.tokens, plain.tokens, "asking for logprobs must not change greedy output");
    let lps = out.logprobs.unwrap();
    assert_eq!(lps.len(), out.tokens.len());
    for (lp, &t) in lps.iter().zip(&out.tokens) {
        assert_eq!(lp.token, t);
        assert_eq!(lp.top.len(), 3);
        assert_eq!(lp.top[0].0, t, "greedy picks the most likely token");
        assert!((lp.top[0].1 - lp.logprob).abs() < 1e-6);
        assert!(lp.logprob <= 0.0 && lp.top[1].1 <= lp.top[0].1 && lp.top[2].1 <= lp.top[1].1);
    }
    // More than 20 alternatives is refused before anything runs.
    let too_many = GenerationRequest { logprobs: Some(21), ..request(&prompt, 4, SamplingParams::greedy()) };
    assert!(e.generate(&[too_many], |_, _| {}).is_err());
    // A prompt plus max_new_tokens overflowing usize is a clean error, not a wrap-around.
    let huge = request(&prompt, usize::MAX, SamplingParams::greedy());
    assert!(e.generate(&[huge], |_, _| {}).is_err());
}

#[test]
fn min_tokens_holds_back_stop_ids() {
    let (mut e, prompt) = engine();
    let free = run(&mut e, &[request(&prompt, 12, SamplingParams::greedy())]).remove(0);
    // Make the first greedy token a stop id: generation ends at once…
    let stop = free.tokens[0];
    let stopped = run(
        &mut e,
        &[GenerationRequest { stop_token_ids: vec![stop], ..request(&prompt, 12, SamplingParams::greedy()) }],
    )
    .remove(0);
    assert_eq!((stopped.tokens.clone(), stopped.finish_reason), (vec![stop], FinishReason::Stop));
    // …unless min_tokens forbids it: then it never appears in the first 6 tokens.
    let held = run(
        &mut e,
        &[GenerationRequest {
            stop_token_ids: vec![stop],
            min_tokens: 6,
            ..request(&prompt, 12, SamplingParams::greedy())
        }],
    )
    .remove(0);
    assert!(held.tokens.len() >= 6, "{:?}", held.tokens);
    assert!(!held.tokens[..6].contains(&stop), "{:?}", held.tokens);
}

#[test]
fn repetition_penalty_reduces_repeats() {
    let (mut e, prompt) = engine();
    let repeats = |o: &GenerationOutput| {
        let mut seen = std::collections::HashSet::new();
        o.tokens.iter().filter(|t| !seen.insert(**t)).count()
    };
    let plain = run(&mut e, &[request(&prompt, 64, SamplingParams::greedy())]).remove(0);
    let penalised =
        run(&mut e, &[request(&prompt, 64, SamplingParams { repetition_penalty: 1.5, ..SamplingParams::greedy() })])
            .remove(0);
    assert!(repeats(&penalised) < repeats(&plain), "{} vs {}", repeats(&penalised), repeats(&plain));
}

#[test]
fn seeded_sampling_is_batch_independent() {
    let (mut e, prompt) = engine();
    let sampled = |seed| SamplingParams { temperature: 1.0, top_p: 0.95, seed, ..SamplingParams::greedy() };
    let alone = run(&mut e, &[request(&prompt, 24, sampled(7))]).remove(0);
    let other_prompt: Vec<u32> = prompt.iter().rev().copied().collect();
    let batch = run(
        &mut e,
        &[
            request(&other_prompt, 10, sampled(1)),
            request(&prompt, 24, sampled(7)),
            request(&prompt, 30, SamplingParams::greedy()),
        ],
    );
    assert_eq!(batch[1].tokens, alone.tokens);
    let different = run(&mut e, &[request(&prompt, 24, sampled(8))]).remove(0);
    assert_ne!(different.tokens, alone.tokens, "another seed samples differently");
}

/// Runs `r` as if it had already produced `resumed` elsewhere; returns what it adds.
fn run_resumed(e: &mut Engine, r: GenerationRequest, resumed: &[u32]) -> Vec<u32> {
    let id = e.add_resumed(r, None, None, resumed).unwrap();
    let mut out = Vec::new();
    while e.has_work() {
        for event in e.step().unwrap().events {
            if let tessera_worker::engine::SequenceEvent::Token { seq, token } = event
                && seq == id
            {
                out.push(token.token);
            }
        }
    }
    out
}

#[test]
fn a_resumed_request_continues_exactly_where_it_stopped() {
    // Mid-stream migration: the tokens already streamed go to another worker as `resumed`; what
    // it generates next must be what the first worker would have generated, for greedy and for
    // seeded sampling with penalties (their counts and the random stream are replayed).
    let (mut e, prompt) = engine();
    let seeded = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        frequency_penalty: 0.4,
        repetition_penalty: 1.1,
        seed: 1234,
        ..SamplingParams::greedy()
    };
    for sampling in [SamplingParams::greedy(), seeded] {
        let whole = run(&mut e, &[request(&prompt, 40, sampling.clone())]).remove(0).tokens;
        assert_eq!(whole.len(), 40);
        for cut in [1, 17, 39] {
            let rest = run_resumed(&mut e, request(&prompt, 40, sampling.clone()), &whole[..cut]);
            assert_eq!(rest, whole[cut..], "resumed after {cut} tokens with {sampling:?}");
        }
    }
    // Nothing left to generate, or ids outside the vocabulary: refused.
    assert!(e.add_resumed(request(&prompt, 4, SamplingParams::greedy()), None, None, &[5, 6, 7, 8]).is_err());
    assert!(e.add_resumed(request(&prompt, 4, SamplingParams::greedy()), None, None, &[100_000]).is_err());
}

/// Without penalties or log-probabilities the backend picks each token from its own logits
/// (`forward_pick`, on the device for a GPU); asking for log-probabilities moves the logits to the
/// host and the sequence's sampler picks. The same seed must give the same tokens either way.
#[test]
fn backend_picks_match_host_picks() {
    let (mut e, prompt) = engine();
    for sampling in [
        SamplingParams { temperature: 0.9, top_k: Some(12), top_p: 0.9, seed: 21, ..SamplingParams::greedy() },
        SamplingParams { temperature: 1.3, min_p: 0.05, seed: 22, ..SamplingParams::greedy() },
        SamplingParams::greedy(),
    ] {
        let on_backend = run(&mut e, &[request(&prompt, 24, sampling.clone())]).remove(0);
        let on_host = GenerationRequest { logprobs: Some(1), ..request(&prompt, 24, sampling.clone()) };
        let on_host = run(&mut e, &[on_host]).remove(0);
        assert_eq!(on_backend.tokens, on_host.tokens, "{sampling:?}");
    }
}
