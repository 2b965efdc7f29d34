//! The simulated chat workload: `tenants` tenants, each with its own system prompt (random ids,
//! fixed per tenant), picked with Zipf(`tenant_skew`) popularity. Conversations start as a Poisson
//! process at `rate ÷ turns` per second. Turn k's prompt is the system prompt, every earlier user
//! and assistant message and a new user message; the next turn is sent an exponential think time
//! after the answer ends. Message lengths are uniform in ½–1½× their means.
//!
//! Invariant: a conversation's start, tenant, tokens and think times come from the seed alone, so
//! every policy replays the same trace (later turns shift in time only by each policy's own
//! latency).

use std::rc::Rc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::US_PER_S;

/// Token ids are drawn from this range (the exact values only matter through their hashes).
const VOCAB: u32 = 32_768;

/// The shape of the chat workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Workload {
    pub(super) tenants: usize,
    pub(super) tenant_skew: f64,
    pub(super) turns: usize,
    pub(super) system_prompt_len: usize,
    pub(super) turn_len: usize,
    pub(super) output_len: usize,
    pub(super) think_us: f64,
}

impl Workload {
    /// Mean prompt tokens over a conversation's turns.
    pub(super) fn mean_prompt_tokens(&self) -> f64 {
        let per_turn = (self.turn_len + self.output_len) as f64;
        (self.system_prompt_len + self.turn_len) as f64 + per_turn * (self.turns as f64 - 1.0) / 2.0
    }

    /// The longest a conversation (prompt and answer of its last turn) can be.
    pub(super) fn max_conversation_tokens(&self) -> usize {
        self.system_prompt_len
            + self.turns * (self.turn_len + self.turn_len / 2 + self.output_len + self.output_len / 2)
    }
}

/// When a conversation starts, for which tenant, and the seed of its content.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct ConversationStart {
    pub(super) at_us: u64,
    pub(super) tenant: usize,
    pub(super) seed: u64,
}

/// One turn of a conversation, as offsets into the conversation's token stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Turn {
    pub(super) prompt_len: usize,
    pub(super) output_len: usize,
    pub(super) think_us: u64,
}

/// A conversation: the chained block hashes of its whole token stream and its turns.
#[derive(Debug)]
pub(super) struct Conversation {
    pub(super) hashes: Rc<[u64]>,
    pub(super) turns: Vec<Turn>,
    pub(super) next: usize,
}

fn exponential(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    -(1.0 - rng.random::<f64>()).ln() * mean
}

/// Uniform in ½–1½× `mean`, at least 1.
fn around(rng: &mut ChaCha8Rng, mean: usize) -> usize {
    rng.random_range(mean / 2..=mean + mean / 2).max(1)
}

fn tokens(rng: &mut ChaCha8Rng, n: usize) -> impl Iterator<Item = u32> + '_ {
    (0..n).map(|_| rng.random_range(0..VOCAB))
}

pub(super) fn system_prompts(workload: &Workload, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5157_E111_9E37_79B9);
    (0..workload.tenants).map(|_| tokens(&mut rng, workload.system_prompt_len).collect()).collect()
}

/// Poisson conversation starts in `[0, until_us)`, tenants drawn with Zipf popularity.
pub(super) fn arrival_trace(
    workload: &Workload,
    conversations_per_s: f64,
    until_us: u64,
    seed: u64,
) -> Vec<ConversationStart> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let weights: Vec<f64> = (1..=workload.tenants).map(|i| (i as f64).powf(-workload.tenant_skew)).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    let cdf: Vec<f64> = weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect();
    let mut out = Vec::new();
    let mut t = 0.0;
    loop {
        t += exponential(&mut rng, US_PER_S / conversations_per_s);
        if t >= until_us as f64 {
            return out;
        }
        let u = rng.random::<f64>();
        let tenant = cdf.partition_point(|&c| c < u).min(workload.tenants - 1);
        out.push(ConversationStart { at_us: t as u64, tenant, seed: rng.random() });
    }
}

pub(super) fn conversation(workload: &Workload, system: &[u32], seed: u64, block_size: usize) -> Conversation {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut stream = system.to_vec();
    let mut turns = Vec::with_capacity(workload.turns);
    for _ in 0..workload.turns {
        let user = around(&mut rng, workload.turn_len);
        stream.extend(tokens(&mut rng, user));
        let prompt_len = stream.len();
        let output_len = around(&mut rng, workload.output_len);
        stream.extend(tokens(&mut rng, output_len));
        let think_us = exponential(&mut rng, workload.think_us) as u64;
        turns.push(Turn { prompt_len, output_len, think_us });
    }
    let hashes = tessera_proto::hash_prefix_blocks(&stream, block_size).into_iter().map(|h| h.0).collect();
    Conversation { hashes, turns, next: 0 }
}
