//! The continuous-batching engine against a model double whose output is a pure function of
//! the tokens in its KV slots, so any wrong block table, prefix hit or recompute shows up as
//! different tokens. Property tests interleave admissions, steps, aborts and cache clears under
//! a small KV cache (forcing preemption) and check: no block leaks, every finished sequence has
//! exactly the tokens it has when run alone, and the KV event stream (snapshot + replay) always
//! equals the live prefix cache.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use std::collections::HashMap;

use proptest::prelude::*;
use tessera_worker::backend::{BackendInfo, ModelBackend};
use tessera_worker::config::ModelConfig;
use tessera_worker::engine::{Engine, EngineOptions, FinishReason, GenerationRequest, SequenceEvent};
use tessera_worker::error::EngineError;
use tessera_worker::kv_cache::KvCacheConfig;
use tessera_worker::kv_events::{KvEventLog, KvReplica, SubscriptionStart};
use tessera_worker::model::SeqChunk;
use tessera_worker::presets;
use tessera_worker::sampler::SamplingParams;
use tessera_worker::sequence::SeqId;

/// Stores each token in its KV slot; the logits of a position depend on every stored token up
/// to it (read back through the block table), so they are right only if the cache is.
struct SlotEcho {
    config: ModelConfig,
    kv: KvCacheConfig,
    slots: Vec<Option<u32>>,
}

impl SlotEcho {
    fn new(kv: KvCacheConfig) -> Self {
        let mut config = presets::find("tiny").unwrap().config;
        config.vocab_size = 64;
        SlotEcho { config, kv, slots: vec![None; kv.num_blocks * kv.block_size] }
    }
}

fn logits_for(history_hash: u64, vocab: usize) -> Vec<f32> {
    (0..vocab as u64).map(|i| ((i.wrapping_mul(0x9E37_79B9) ^ history_hash) % 97) as f32 / 8.0).collect()
}

impl ModelBackend for SlotEcho {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            device: "test double".into(),
            weights_dtype: "none".into(),
            weight_bytes_per_step: 0,
            kv_bytes_per_token: 0,
            tuning: Vec::new(),
        }
    }

    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, EngineError> {
        let mut out = Vec::new();
        for c in chunks {
            for (i, &t) in c.tokens.iter().enumerate() {
                let slot = self.kv.slot(c.block_table, c.start_pos + i)?;
                self.slots[slot] = Some(t);
            }
            let mut h = 0xcbf2_9ce4_8422_2325u64;
            for pos in 0..c.start_pos + c.tokens.len() {
                let slot = self.kv.slot(c.block_table, pos)?;
                let t =
                    self.slots[slot].ok_or_else(|| EngineError::Internal(format!("position {pos} never written")))?;
                h = (h ^ u64::from(t)).wrapping_mul(0x100_0000_01b3);
            }
            out.extend(logits_for(h, self.config.vocab_size));
        }
        Ok(out)
    }
}

fn engine(num_blocks: usize, options: EngineOptions) -> Engine {
    let kv = KvCacheConfig { num_blocks, block_size: 4 };
    Engine::with_options(Box::new(SlotEcho::new(kv)), kv, options).unwrap()
}

fn options(max_batch_tokens: usize, max_running: usize) -> EngineOptions {
    EngineOptions { prefix_caching: true, max_batch_tokens, max_running, max_waiting: 64 }
}

fn request(prompt: Vec<u32>, max_new: usize, seed: Option<u64>) -> GenerationRequest {
    let sampling = match seed {
        None => SamplingParams::greedy(),
        Some(seed) => SamplingParams { temperature: 1.0, seed, ..SamplingParams::greedy() },
    };
    GenerationRequest {
        prompt,
        max_new_tokens: max_new,
        sampling,
        stop_token_ids: Vec::new(),
        min_tokens: 0,
        logprobs: None,
    }
}

/// The tokens a request gets on an otherwise idle engine with room to spare.
fn alone(r: &GenerationRequest) -> Vec<u32> {
    let mut e = engine(64, options(256, 8));
    e.generate(std::slice::from_ref(r), |_, _| {}).unwrap().0.remove(0).tokens
}

#[derive(Default)]
struct Collected {
    tokens: HashMap<SeqId, Vec<u32>>,
    finished: HashMap<SeqId, (FinishReason, usize)>,
}

impl Collected {
    fn absorb(&mut self, events: Vec<SequenceEvent>) {
        for event in events {
            match event {
                SequenceEvent::Token { seq, token } => self.tokens.entry(seq).or_default().push(token.token),
                SequenceEvent::Finished { seq, reason, usage } => {
                    self.finished.insert(seq, (reason, usage.cached_prompt_tokens));
                }
                SequenceEvent::Failed { seq, error } => panic!("{seq:?} failed: {error}"),
            }
        }
    }
}

/// Steps until idle; a scheduler that stalls fails instead of hanging.
fn drain(e: &mut Engine, got: &mut Collected, mut on_step: impl FnMut(&mut Engine)) {
    for _ in 0..10_000 {
        if !e.has_work() {
            return;
        }
        got.absorb(e.step().unwrap().events);
        on_step(e);
    }
    panic!("the engine still has work after 10000 steps: the scheduler stalled");
}

fn same_blocks(replica: &KvReplica, e: &Engine) -> bool {
    let live: HashMap<_, _> = e.kv().keyed_blocks().into_iter().map(|(h, p, t)| (h, (p, t))).collect();
    replica.blocks == live
}

#[derive(Debug, Clone)]
enum Op {
    Add { base: u8, len: usize, max_new: usize, seed: Option<u64> },
    Step,
    Abort(usize),
    Subscribe,
    ClearAll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, 1usize..22, 1usize..10, proptest::option::of(0u64..4))
            .prop_map(|(base, len, max_new, seed)| Op::Add { base, len, max_new, seed }),
        6 => Just(Op::Step),
        1 => (0usize..8).prop_map(Op::Abort),
        1 => Just(Op::Subscribe),
        1 => prop_oneof![19 => Just(Op::Step), 1 => Just(Op::ClearAll)],
    ]
}

/// Prompts from a few shared stems, so prefixes collide and the cache is exercised.
fn prompt(base: u8, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| if i < 9 { u32::from(base) + 1 } else { (i * 7 + u32::from(base)) % 5 + 1 }).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_interleaving_keeps_blocks_tokens_and_events_exact(ops in proptest::collection::vec(op(), 1..60)) {
        // 9 blocks of 4 = 36 tokens: a few sequences fill it and force preemption.
        let mut e = engine(9, options(12, 4));
        let log = KvEventLog::new(8);
        let mut replicas: Vec<KvReplica> = Vec::new();
        let mut requests: HashMap<SeqId, GenerationRequest> = HashMap::new();
        let mut live: Vec<SeqId> = Vec::new();
        let mut aborted = Vec::new();
        let mut got = Collected::default();
        let publish = |e: &mut Engine, replicas: &mut Vec<KvReplica>| {
            let events = e.take_kv_events();
            let before = log.last_seq();
            log.publish(events);
            let SubscriptionStart::Replay(new) = log.subscribe(before + 1).start else {
                panic!("just-published events must be replayable")
            };
            for r in replicas.iter_mut() {
                for ev in &new {
                    r.apply(ev).unwrap();
                }
            }
        };
        for op in ops {
            match op {
                Op::Add { base, len, max_new, seed } => {
                    let r = request(prompt(base, len), max_new, seed);
                    if let Ok(id) = e.add(r.clone(), None, None) {
                        requests.insert(id, r);
                        live.push(id);
                    }
                }
                Op::Step => got.absorb(e.step().unwrap().events),
                Op::Abort(i) if !live.is_empty() => {
                    let id = live.remove(i % live.len());
                    if e.abort(id) {
                        aborted.push(id);
                    }
                }
                Op::Abort(_) => {}
                Op::Subscribe => {
                    let mut r = KvReplica::default();
                    match log.subscribe(0).start {
                        SubscriptionStart::Snapshot(s) => r.reset(&s),
                        SubscriptionStart::Replay(_) => panic!("from_seq 0 must give a snapshot"),
                    }
                    replicas.push(r);
                }
                Op::ClearAll => {
                    for id in e.abort_all() {
                        aborted.push(id);
                    }
                }
            }
            live.retain(|id| !got.finished.contains_key(id));
            publish(&mut e, &mut replicas);
            prop_assert_eq!(e.check_invariants(), Ok(()));
            for r in &replicas {
                prop_assert!(same_blocks(r, &e), "replica diverged from the live cache");
            }
        }
        drain(&mut e, &mut got, |e| {
            publish(e, &mut replicas);
            assert_eq!(e.check_invariants(), Ok(()));
        });
        // No leaks: nothing is owned once every sequence is gone.
        prop_assert_eq!(e.load().kv_blocks_used, 0);
        let mut last = KvReplica::default();
        if let SubscriptionStart::Snapshot(s) = log.subscribe(0).start {
            last.reset(&s);
        }
        prop_assert!(same_blocks(&last, &e));
        for r in &replicas {
            prop_assert!(same_blocks(r, &e));
        }
        // Every sequence that finished has exactly the tokens it gets alone.
        for (id, r) in &requests {
            if aborted.contains(id) {
                continue;
            }
            prop_assert!(got.finished.contains_key(id), "{:?} never finished", id);
            prop_assert_eq!(&got.tokens[id], &alone(r), "{:?} differs from its solo run", id);
        }
    }
}

#[test]
fn preempted_sequences_resume_with_the_same_tokens() {
    // Room for about one long sequence: the second must be preempted and recomputed.
    let mut e = engine(8, options(32, 4));
    let a = request(prompt(0, 14), 16, None);
    let b = request(prompt(1, 14), 16, Some(3));
    let ids = [e.add(a.clone(), None, None).unwrap(), e.add(b.clone(), None, None).unwrap()];
    let mut got = Collected::default();
    let mut preempted = 0;
    while e.has_work() {
        let report = e.step().unwrap();
        preempted += report.preempted;
        got.absorb(report.events);
    }
    assert!(preempted > 0, "the cache is too small for both: one must be preempted");
    assert_eq!(got.tokens[&ids[0]], alone(&a));
    assert_eq!(got.tokens[&ids[1]], alone(&b));
    assert_eq!(e.check_invariants(), Ok(()));
    assert_eq!(e.load().kv_blocks_used, 0);
}

#[test]
fn long_prompts_are_prefilled_in_chunks_beside_running_decodes() {
    let mut e = engine(64, options(8, 4));
    let short = request(prompt(0, 5), 20, None);
    let long = request(prompt(2, 40), 4, None);
    let short_id = e.add(short.clone(), None, None).unwrap();
    let mut got = Collected::default();
    got.absorb(e.step().unwrap().events);
    let long_id = e.add(long.clone(), None, None).unwrap();
    // While the long prompt is prefilled (5 steps of at most 8 tokens), the short one keeps
    // decoding every step.
    for _ in 0..5 {
        let before = got.tokens.get(&short_id).map_or(0, Vec::len);
        let report = e.step().unwrap();
        assert!(report.prefill_tokens + report.decode_tokens <= 8);
        got.absorb(report.events);
        assert_eq!(got.tokens[&short_id].len(), before + 1, "the decode was not starved by the prefill");
    }
    drain(&mut e, &mut got, |_| {});
    assert_eq!(got.tokens[&short_id], alone(&short));
    assert_eq!(got.tokens[&long_id], alone(&long));
}

#[test]
fn samples_of_one_prompt_share_its_blocks() {
    let mut e = engine(64, options(64, 8));
    let p = prompt(1, 18); // 4 full blocks + 2 tokens
    let first = e.add(request(p.clone(), 4, Some(0)), None, None).unwrap();
    let second = e.add(request(p.clone(), 4, Some(1)), None, Some(first)).unwrap();
    let mut got = Collected::default();
    drain(&mut e, &mut got, |_| {});
    assert_eq!(got.finished[&first].1, 0);
    assert_eq!(got.finished[&second].1, 16, "the follower reuses every full prompt block");
}

#[test]
fn a_full_queue_is_refused_and_impossible_requests_are_rejected() {
    let mut e = engine(16, EngineOptions { max_waiting: 2, ..options(16, 2) });
    e.add(request(prompt(0, 4), 2, None), None, None).unwrap();
    e.add(request(prompt(0, 4), 2, None), None, None).unwrap();
    let err = e.add(request(prompt(0, 4), 2, None), None, None).unwrap_err();
    assert!(matches!(err, EngineError::QueueFull { limit: 2 }), "{err}");
    let err = e.add(request(prompt(0, 60), 10, None), None, None).unwrap_err();
    assert!(matches!(err, EngineError::ExceedsKvCapacity { tokens: 70, capacity: 64 }), "{err}");
    assert!(matches!(e.add(request(vec![], 2, None), None, None), Err(EngineError::EmptyPrompt)));
    assert!(matches!(e.add(request(vec![64], 2, None), None, None), Err(EngineError::TokenOutOfRange { .. })));
}
