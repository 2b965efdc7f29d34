//! Tensor parallelism on the CPU gives the same model: for every TP size a model allows, greedy
//! ids equal TP = 1's for 4 prompts × 48 tokens, and logits (first step and after the 48 tokens)
//! are within max-abs 1e-4 of TP = 1's. Each rank holds about 1/N of the weights; a layout the
//! model does not allow is refused at start-up; a failing rank fails the group, not the process.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_kernels::CpuPool;
use tessera_kernels::matmul::InputRounding;
use tessera_worker::backend::ModelBackend;
use tessera_worker::backend::cpu::CpuBackend;
use tessera_worker::backend::tp::{TpCpuBackend, TpOptions};
use tessera_worker::engine::{Engine, GenerationRequest};
use tessera_worker::kv_cache::KvCacheConfig;
use tessera_worker::loader::{self, ModelSpec, ResolveOptions, ResolvedModel};
use tessera_worker::model::LlamaModel;
use tessera_worker::parallel::fault::{FaultInjection, FaultKind};
use tessera_worker::sampler::SamplingParams;
use tessera_worker::{EngineError, WeightsDtype};

const LOGITS_TOLERANCE: f32 = 1e-4;
const GEN: usize = 48;
const KV: KvCacheConfig = KvCacheConfig { num_blocks: 64, block_size: 16 };

fn resolve(spec: ModelSpec) -> ResolvedModel {
    loader::resolve(&spec, &ResolveOptions { cache_dir: loader::fetch::default_cache_dir(), dummy_seed: 0 }).unwrap()
}

fn stories() -> ResolvedModel {
    resolve(ModelSpec::HfDir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/stories260K")))
}

/// The 4 prompts of the reference fixtures.
fn prompts(model: &str) -> Vec<Vec<u32>> {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(model).join("reference.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    cases
        .iter()
        .map(|c| c["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect()
}

fn options(size: usize) -> TpOptions {
    TpOptions {
        size,
        threads: 2,
        collective_timeout: Duration::from_secs(60),
        fault: None,
        input_rounding: InputRounding::Bf16,
    }
}

fn single(model: &ResolvedModel) -> Engine {
    let llama = LlamaModel::load(&model.config, model.weights.as_ref(), WeightsDtype::F32, |_| {}).unwrap();
    Engine::new(Box::new(CpuBackend::new(llama, CpuPool::new(2).unwrap(), KV).unwrap()), KV).unwrap()
}

fn group(model: &ResolvedModel, options: &TpOptions) -> TpCpuBackend {
    TpCpuBackend::new(&model.config, model.weights.as_ref(), WeightsDtype::F32, KV, options, |_| {}).unwrap()
}

fn greedy(engine: &mut Engine, prompt: &[u32]) -> Vec<u32> {
    let request = GenerationRequest {
        prompt: prompt.to_vec(),
        max_new_tokens: GEN,
        sampling: SamplingParams::greedy(),
        stop_token_ids: Vec::new(),
        min_tokens: 0,
        logprobs: None,
    };
    engine.generate(&[request], |_, _| {}).unwrap().0.remove(0).tokens
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// TP = `size` against TP = 1 on every prompt.
fn check_equivalent(model: &ResolvedModel, fixtures: &str, size: usize) {
    let mut reference = single(model);
    let mut tp = Engine::new(Box::new(group(model, &options(size))), KV).unwrap();
    let mut worst = 0.0f32;
    for (i, prompt) in prompts(fixtures).iter().enumerate() {
        let want = greedy(&mut reference, prompt);
        let got = greedy(&mut tp, prompt);
        assert_eq!(got, want, "prompt {i}: TP {size} greedy ids differ from TP 1");
        let full: Vec<u32> = prompt.iter().chain(&want).copied().collect();
        for p in [&prompt[..], &full[..]] {
            let d = max_abs(&tp.prompt_logits(p).unwrap(), &reference.prompt_logits(p).unwrap());
            assert!(d <= LOGITS_TOLERANCE, "prompt {i} ({} tokens): logits differ by {d:e}", p.len());
            worst = worst.max(d);
        }
    }
    eprintln!("{fixtures}: TP {size} = TP 1 on 4 prompts × {GEN} greedy ids; logits max-abs {worst:.2e}");
}

/// Every rank holds at most 1/N of the whole model's weights, plus 5% (replicated norms).
fn check_footprint(model: &ResolvedModel, size: usize) {
    let whole = LlamaModel::load(&model.config, model.weights.as_ref(), WeightsDtype::F32, |_| {}).unwrap();
    let tp = group(model, &options(size));
    let total = whole.weight_bytes();
    for (rank, f) in tp.footprints().iter().enumerate() {
        let share = f.weight_bytes as f64 / total as f64;
        eprintln!("TP {size} rank {rank}: {} of {total} weight bytes ({:.1}%)", f.weight_bytes, 100.0 * share);
        assert!(share <= 1.05 / size as f64, "rank {rank} holds {:.1}% of the weights", 100.0 * share);
    }
}

#[test]
fn stories260k_tp2_and_tp4_match_tp1() {
    let model = stories();
    for size in [2, 4] {
        check_equivalent(&model, "stories260K", size);
        check_footprint(&model, size);
    }
}

#[test]
fn stories260k_tp8_replicates_kv_heads_and_matches_tp1() {
    // 4 K/V heads over 8 ranks: each K/V head lives on the 2 ranks whose query heads use it.
    check_equivalent(&stories(), "stories260K", 8);
}

#[test]
fn smollm2_tp3_matches_tp1() {
    let model = resolve(ModelSpec::Default);
    check_equivalent(&model, "smollm2-135m-instruct", 3);
    check_footprint(&model, 3);
}

#[test]
fn layouts_the_model_cannot_take_are_refused_at_start_up() {
    let model = stories();
    for size in [3, 5, 16] {
        let err =
            TpCpuBackend::new(&model.config, model.weights.as_ref(), WeightsDtype::F32, KV, &options(size), |_| {})
                .err()
                .unwrap()
                .to_string();
        assert!(err.contains(&format!("--tp {size}")), "{err}");
    }
}

#[test]
fn a_failing_rank_fails_the_group_within_the_timeout() {
    let model = stories();
    let prompt = &prompts("stories260K")[0];
    for kind in [FaultKind::Panic, FaultKind::Error, FaultKind::Hang] {
        let options = TpOptions {
            collective_timeout: Duration::from_millis(500),
            fault: Some(FaultInjection { rank: 1, step: 3, kind }),
            ..options(2)
        };
        let backend = group(&model, &options);
        let health = backend.group_health().unwrap();
        let mut engine = Engine::new(Box::new(backend), KV).unwrap();
        let started = Instant::now();
        let request = GenerationRequest {
            prompt: prompt.clone(),
            max_new_tokens: GEN,
            sampling: SamplingParams::greedy(),
            stop_token_ids: Vec::new(),
            min_tokens: 0,
            logprobs: None,
        };
        let err = engine.generate(&[request], |_, _| {}).unwrap_err();
        assert!(matches!(err, EngineError::GroupFailed(_)), "{kind:?}: {err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{kind:?}: took {:?}", started.elapsed());
        let reason = health.failure().unwrap().to_string();
        // The reason names the failed rank. A panicking rank reports itself once unwinding
        // reaches its handler, but the panic hook runs first: where it prints a backtrace
        // (RUST_BACKTRACE, as in CI) that can outlast the collective timeout, and rank 0's
        // timeout, naming rank 1 as missing, is then the first failure recorded.
        let expected: &[&str] = match kind {
            FaultKind::Panic => &["rank 1 panicked", "rank(s) [1] did not join"],
            FaultKind::Error => &["rank 1: device: injected fault"],
            FaultKind::Hang => &["rank(s) [1] did not join"],
        };
        assert!(expected.iter().any(|e| reason.contains(e)), "{kind:?}: {reason}");
        // The group stays failed.
        assert!(matches!(engine.prompt_logits(prompt), Err(EngineError::GroupFailed(_))));
        eprintln!("{kind:?}: {reason}");
    }
}
