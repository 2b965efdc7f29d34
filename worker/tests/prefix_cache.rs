//! The prefix cache end to end: a prompt whose prefix was computed before reuses those K/V
//! blocks, and the tokens generated are exactly those of a run without the cache.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use std::path::Path;

use tessera_kernels::CpuPool;
use tessera_worker::WeightsDtype;
use tessera_worker::backend::cpu::CpuBackend;
use tessera_worker::engine::{Engine, EngineOptions, GenerationRequest};
use tessera_worker::kv_cache::KvCacheConfig;
use tessera_worker::loader::{self, ModelSpec, ResolveOptions};
use tessera_worker::model::LlamaModel;
use tessera_worker::sampler::SamplingParams;

fn engine(prefix_caching: bool, num_blocks: usize) -> (Engine, tokenizers::Tokenizer) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/stories260K");
    let options = ResolveOptions { cache_dir: std::env::temp_dir(), dummy_seed: 0 };
    let model = loader::resolve(&ModelSpec::HfDir(dir), &options).unwrap();
    let llama = LlamaModel::load(&model.config, model.weights.as_ref(), WeightsDtype::F32, |_| {}).unwrap();
    let kv = KvCacheConfig { num_blocks, block_size: 4 };
    let backend = Box::new(CpuBackend::new(llama, CpuPool::new(1).unwrap(), kv).unwrap());
    (
        Engine::with_options(backend, kv, EngineOptions { prefix_caching, ..EngineOptions::default() }).unwrap(),
        model.text.tokenizer,
    )
}

fn request(tok: &tokenizers::Tokenizer, text: &str, n: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: tok.encode(text, true).unwrap().get_ids().to_vec(),
        max_new_tokens: n,
        sampling: SamplingParams::greedy(),
        stop_token_ids: Vec::new(),
        min_tokens: 0,
        logprobs: None,
    }
}

#[test]
fn cached_prefixes_give_identical_tokens() {
    let texts = [
        "Once upon a time, there was a little girl named Lily. She loved to play",
        "Once upon a time, there was a little girl named Lily. She saw a big dog",
        "Once upon a time, there was a little girl named Lily. She loved to play",
        "The little dog was happy",
    ];
    let (mut plain, tok) = engine(false, 64);
    let (mut cached, _) = engine(true, 64);
    for (i, text) in texts.iter().enumerate() {
        let r = request(&tok, text, 12);
        let want = plain.generate(std::slice::from_ref(&r), |_, _| {}).unwrap();
        let got = cached.generate(std::slice::from_ref(&r), |_, _| {}).unwrap();
        assert_eq!(got.0[0].tokens, want.0[0].tokens, "prompt {i}");
        assert_eq!(want.0[0].cached_prompt_tokens, 0);
        let hit = got.0[0].cached_prompt_tokens;
        match i {
            0 | 3 => assert_eq!(hit, 0, "prompt {i}: nothing shared yet"),
            // Shares the first sentence with prompt 0 (whole 4-token blocks only).
            1 => assert!(hit >= 12 && hit < r.prompt.len(), "prompt 1 reused {hit} of {}", r.prompt.len()),
            // The same prompt again: everything but the last token's block comes from the cache.
            _ => assert!(hit >= r.prompt.len() - 4, "prompt 2 reused {hit} of {}", r.prompt.len()),
        }
        assert_eq!(got.1.prefill_tokens + got.1.cached_prompt_tokens, r.prompt.len());
    }
}

#[test]
fn cached_blocks_are_evicted_when_space_is_needed() {
    // 12 blocks of 4 tokens: one long request fills the cache; the next, unrelated, must evict.
    let (mut cached, tok) = engine(true, 12);
    let a = request(&tok, "Once upon a time, there was a little girl named Lily. She loved", 20);
    let b = request(&tok, "The little dog was happy and the big cat was sad and they", 20);
    let first = cached.generate(std::slice::from_ref(&a), |_, _| {}).unwrap();
    cached.generate(std::slice::from_ref(&b), |_, _| {}).unwrap();
    let again = cached.generate(std::slice::from_ref(&a), |_, _| {}).unwrap();
    assert_eq!(again.0[0].tokens, first.0[0].tokens);
    // Some of `a`'s blocks were evicted for `b`: less than its full cacheable prefix is reused.
    let cacheable = (a.prompt.len() - 1) / 4 * 4;
    assert!(again.0[0].cached_prompt_tokens < cacheable, "{} of {cacheable}", again.0[0].cached_prompt_tokens);
}
