//! `tessera bench route-sim`: a discrete-event simulation of a cluster whose router is the real
//! [`Router`] (policy, cost function, exact KV index, approximate view), fed with simulated
//! workers' KV events and load reports as the live router is fed over gRPC (DESIGN.md, decision 4).
//!
//! Model.
//! - **Workload**: `tenants` tenants, each with its own system prompt (random ids, fixed per
//!   tenant), picked with Zipf(`tenant_skew`) popularity. Conversations start as a Poisson process
//!   at `rate ÷ turns` per second. Turn k's prompt is the system prompt, every earlier user and
//!   assistant message and a new user message; the next turn is sent an exponential think time
//!   after the answer ends. Message lengths are uniform in ½–1½× their means. A conversation's
//!   start, tenant, tokens and think times come from the seed alone, so every policy replays the
//!   same trace (later turns shift in time only by each policy's own latency).
//! - **Worker** (mirrors the engine's allocator and scheduler): a KV cache of `kv_blocks` blocks
//!   keyed by the chained block hashes of `tessera_proto::hash_prefix_blocks`; full computed
//!   blocks are keyed (event `Stored`), a finished sequence's keyed blocks become evictable, and
//!   taking a block when none is free evicts the least recently released one (`Removed`). A
//!   sequence is admitted (FIFO, at most `max_batch` running) only when blocks for its whole
//!   prompt and output can be reserved, so it is never preempted. Each step runs every decode
//!   plus prefill chunks within `max_batch_tokens`, and lasts
//!   `step_base + step_per_seq · decodes + prefill_per_token · prefill tokens`.
//! - **Router**: [`Router::choose`] over every worker with the load last reported (running +
//!   waiting tokens, every `report_interval`, phase-shifted per worker) plus the prompt tokens
//!   routed to it since. Each policy gets the view it reads: `kv` the exact index, fed every
//!   worker's events when its step ends; `prefix` the approximate LRU, sized like the real cache.
//! - **Metrics** cover requests that arrive in `[warmup, duration)`; no turn starts after
//!   `duration`, and the cluster then drains (for at most another `duration`). Throughput counts
//!   completions inside the window; the hit rate is cached ÷ prompt tokens at admission; load
//!   (running + waiting tokens) spread is given both as the busiest worker's time average over
//!   the mean and as the instantaneous max ÷ mean averaged over the window.
//!
//! Invariants: simulated time never goes back (one event queue ordered by time, then by push
//! order, which also makes a run a pure function of its config and seed); each worker numbers
//! its KV events 1, 2, … without gaps and the index applies them in order, so after every step
//! the index holds exactly the worker's keyed blocks; a referenced block is never evicted, and
//! `free + keyed + anonymous in-use blocks = kv_blocks`, anonymous blocks being exactly those
//! the sequences' tables hold.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_router::routing::{BlockChange, Candidate, CostWeights, Policy, Router, WorkerSlot};

/// Token ids are drawn from this range (the exact values only matter through their hashes).
const VOCAB: u32 = 32_768;
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

/// Costs and limits of one simulated worker.
#[derive(Debug, Clone, Copy, PartialEq)]
struct WorkerModel {
    kv_blocks: usize,
    block_size: usize,
    max_batch: usize,
    max_batch_tokens: usize,
    prefill_us_per_token: f64,
    step_base_us: f64,
    step_per_seq_us: f64,
}

impl WorkerModel {
    fn step_us(&self, decodes: usize, prefill_tokens: usize) -> u64 {
        let t = self.step_base_us
            + self.step_per_seq_us * decodes as f64
            + self.prefill_us_per_token * prefill_tokens as f64;
        (t.round() as u64).max(1)
    }
}

/// The shape of the chat workload.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Workload {
    tenants: usize,
    tenant_skew: f64,
    turns: usize,
    system_prompt_len: usize,
    turn_len: usize,
    output_len: usize,
    think_us: f64,
}

impl Workload {
    /// Mean prompt tokens over a conversation's turns.
    fn mean_prompt_tokens(&self) -> f64 {
        let per_turn = (self.turn_len + self.output_len) as f64;
        (self.system_prompt_len + self.turn_len) as f64 + per_turn * (self.turns as f64 - 1.0) / 2.0
    }

    /// The longest a conversation (prompt and answer of its last turn) can be.
    fn max_conversation_tokens(&self) -> usize {
        self.system_prompt_len
            + self.turns * (self.turn_len + self.turn_len / 2 + self.output_len + self.output_len / 2)
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

// ---------------------------------------------------------------------------------------------
// Workload generation.

/// When a conversation starts, for which tenant, and the seed of its content.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ConversationStart {
    at_us: u64,
    tenant: usize,
    seed: u64,
}

/// One turn of a conversation, as offsets into the conversation's token stream.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Turn {
    prompt_len: usize,
    output_len: usize,
    think_us: u64,
}

/// A conversation: the chained block hashes of its whole token stream and its turns.
#[derive(Debug)]
struct Conversation {
    hashes: Rc<[u64]>,
    turns: Vec<Turn>,
    next: usize,
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

fn system_prompts(workload: &Workload, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5157_E111_9E37_79B9);
    (0..workload.tenants).map(|_| tokens(&mut rng, workload.system_prompt_len).collect()).collect()
}

/// Poisson conversation starts in `[0, until_us)`, tenants drawn with Zipf popularity.
fn arrival_trace(workload: &Workload, conversations_per_s: f64, until_us: u64, seed: u64) -> Vec<ConversationStart> {
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

fn conversation(workload: &Workload, system: &[u32], seed: u64, block_size: usize) -> Conversation {
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

// ---------------------------------------------------------------------------------------------
// The simulated worker.

/// Hashes a key that already is a uniformly distributed hash (a chained block hash) as itself.
#[derive(Debug, Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (u64 keys); fold anything else in so it stays a hash.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A block held by a sequence: keyed by its hash (shareable, cached after release) or anonymous
/// (not yet full, or its hash was already keyed by another block; freed on release).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Keyed(u64),
    Anon,
}

#[derive(Debug, Clone, Copy)]
struct KeyedBlock {
    refs: u32,
    /// Its key in `evictable` while `refs == 0`.
    released_at: u64,
}

/// A worker's KV cache by block hash, with LRU eviction of unreferenced keyed blocks.
#[derive(Debug)]
struct BlockCache {
    capacity: usize,
    /// In-use blocks without a key.
    anon: usize,
    keyed: HashMap<u64, KeyedBlock, BuildHasherDefault<PassThrough>>,
    /// Unreferenced keyed blocks by release tick, least recently released first.
    evictable: BTreeMap<u64, u64>,
    tick: u64,
    events: Vec<BlockChange>,
}

impl BlockCache {
    fn new(capacity: usize) -> Self {
        BlockCache {
            capacity,
            anon: 0,
            keyed: HashMap::default(),
            evictable: BTreeMap::new(),
            tick: 0,
            events: Vec::new(),
        }
    }

    /// Blocks neither in use nor cached.
    fn free(&self) -> usize {
        self.capacity.saturating_sub(self.keyed.len() + self.anon)
    }

    /// How many leading blocks of `hashes` are cached.
    fn lookup(&self, hashes: &[u64]) -> usize {
        hashes.iter().take_while(|h| self.keyed.contains_key(h)).count()
    }

    /// Takes a reference on each cached block of `hashes` (from [`lookup`](Self::lookup)).
    fn acquire(&mut self, hashes: &[u64]) {
        for h in hashes {
            if let Some(b) = self.keyed.get_mut(h) {
                if b.refs == 0 {
                    self.evictable.remove(&b.released_at);
                }
                b.refs += 1;
            }
        }
    }

    /// Takes `n` anonymous blocks, evicting the least recently released cached ones when no
    /// block is free; all or nothing.
    fn take(&mut self, n: usize) -> bool {
        if n > self.free() + self.evictable.len() {
            return false;
        }
        for _ in 0..n {
            if self.free() == 0
                && let Some((_, h)) = self.evictable.pop_first()
            {
                self.keyed.remove(&h);
                self.events.push(BlockChange::Removed(h));
            }
            self.anon += 1;
        }
        true
    }

    /// Keys a just-filled anonymous block by `hash`; false (it stays anonymous) when another block
    /// already holds that hash.
    fn register(&mut self, hash: u64) -> bool {
        if self.keyed.contains_key(&hash) {
            return false;
        }
        self.anon = self.anon.saturating_sub(1);
        self.keyed.insert(hash, KeyedBlock { refs: 1, released_at: 0 });
        self.events.push(BlockChange::Stored(hash));
        true
    }

    /// Drops a sequence's blocks, last first (so a prompt's tail is evicted before its head).
    fn release(&mut self, table: &[Slot]) {
        for slot in table.iter().rev() {
            match slot {
                Slot::Anon => self.anon = self.anon.saturating_sub(1),
                Slot::Keyed(h) => {
                    if let Some(b) = self.keyed.get_mut(h) {
                        b.refs = b.refs.saturating_sub(1);
                        if b.refs == 0 {
                            self.tick += 1;
                            b.released_at = self.tick;
                            self.evictable.insert(self.tick, *h);
                        }
                    }
                }
            }
        }
    }

    /// Checks block conservation and reference counts against the tables of the sequences
    /// holding blocks (tests).
    #[cfg(test)]
    fn check(&self, tables: &[&[Slot]]) -> Result<(), String> {
        let anon = tables.iter().flat_map(|t| t.iter()).filter(|s| **s == Slot::Anon).count();
        if anon != self.anon || self.keyed.len() + anon > self.capacity {
            return Err(format!(
                "{} keyed + {anon} anonymous blocks held ({} counted), capacity {}",
                self.keyed.len(),
                self.anon,
                self.capacity
            ));
        }
        for (h, b) in &self.keyed {
            let refs = tables.iter().flat_map(|t| t.iter()).filter(|s| **s == Slot::Keyed(*h)).count();
            if refs != b.refs as usize || (refs == 0) != (self.evictable.get(&b.released_at) == Some(h)) {
                return Err(format!("block {h}: {} refs counted, {refs} held, evictable mismatch", b.refs));
            }
        }
        if self.evictable.len() != self.keyed.values().filter(|b| b.refs == 0).count() {
            return Err("evictable blocks that are not keyed".to_string());
        }
        Ok(())
    }
}

/// A request on a worker.
#[derive(Debug)]
struct Seq {
    request: usize,
    conversation: usize,
    hashes: Rc<[u64]>,
    prompt_len: usize,
    output_len: usize,
    /// Tokens whose K/V is in the cache.
    computed: usize,
    generated: usize,
    table: Vec<Slot>,
    /// Blocks below this index have been offered to [`BlockCache::register`].
    keyed_upto: usize,
}

/// What a request went through, in simulated microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RequestRecord {
    arrival_us: u64,
    first_token_us: Option<u64>,
    done_us: Option<u64>,
    prompt_tokens: usize,
    cached_tokens: Option<usize>,
    output_tokens: usize,
}

/// One simulated worker: cache, queue, running batch and the step in progress.
#[derive(Debug)]
struct SimWorker {
    model: WorkerModel,
    cache: BlockCache,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// `(index in running, tokens)` of the step in progress.
    step: Option<Vec<(usize, usize)>>,
    published: u64,
}

impl SimWorker {
    fn new(model: WorkerModel) -> Self {
        SimWorker {
            model,
            cache: BlockCache::new(model.kv_blocks),
            waiting: VecDeque::new(),
            running: Vec::new(),
            step: None,
            published: 0,
        }
    }

    /// Running tokens (prompt + generated) and waiting tokens, as the engine reports them.
    fn load(&self) -> (u64, u64) {
        let running = self.running.iter().map(|s| s.prompt_len + s.generated).sum::<usize>();
        let waiting = self.waiting.iter().map(|s| s.prompt_len).sum::<usize>();
        (running as u64, waiting as u64)
    }

    /// Plans the next step (decodes, then prefill chunks, then admissions) and returns its
    /// duration; `None` when there is nothing to run.
    fn start_step(&mut self, records: &mut [RequestRecord]) -> Option<u64> {
        let bs = self.model.block_size;
        let mut budget = self.model.max_batch_tokens;
        let mut chunks = Vec::new();
        let (mut decodes, mut prefill) = (0, 0);
        for (i, _) in self.running.iter().enumerate().filter(|(_, s)| s.computed >= s.prompt_len) {
            chunks.push((i, 1));
            decodes += 1;
            budget = budget.saturating_sub(1);
        }
        for (i, s) in self.running.iter().enumerate().filter(|(_, s)| s.computed < s.prompt_len) {
            let len = (s.prompt_len - s.computed).min(budget);
            if len > 0 {
                chunks.push((i, len));
                prefill += len;
                budget -= len;
            }
        }
        while budget > 0 && self.running.len() < self.model.max_batch {
            let Some(front) = self.waiting.front() else { break };
            // As the engine: the last prompt token is always computed (its logits are needed).
            let usable = (front.prompt_len - 1) / bs;
            let hashes = Rc::clone(&front.hashes);
            let hit = self.cache.lookup(&hashes[..usable]);
            let blocks = (front.prompt_len + front.output_len).div_ceil(bs);
            self.cache.acquire(&hashes[..hit]);
            if !self.cache.take(blocks - hit) {
                let held: Vec<Slot> = hashes[..hit].iter().map(|&h| Slot::Keyed(h)).collect();
                self.cache.release(&held);
                break;
            }
            let Some(mut s) = self.waiting.pop_front() else { break };
            s.table = hashes[..hit].iter().map(|&h| Slot::Keyed(h)).collect();
            s.table.resize(blocks, Slot::Anon);
            s.computed = hit * bs;
            s.keyed_upto = hit;
            if let Some(r) = records.get_mut(s.request) {
                r.cached_tokens = Some(s.computed);
            }
            let len = (s.prompt_len - s.computed).min(budget);
            chunks.push((self.running.len(), len));
            prefill += len;
            budget -= len;
            self.running.push(s);
        }
        if chunks.is_empty() {
            return None;
        }
        self.step = Some(chunks);
        Some(self.model.step_us(decodes, prefill))
    }

    /// Ends the step in progress at `now`: keys newly full blocks, records first tokens and
    /// releases finished sequences. Returns the conversations whose turn finished.
    fn finish_step(&mut self, now: u64, records: &mut [RequestRecord]) -> Vec<usize> {
        let bs = self.model.block_size;
        for (i, len) in self.step.take().unwrap_or_default() {
            let Some(s) = self.running.get_mut(i) else { continue };
            let prefilling = s.computed < s.prompt_len;
            s.computed += len;
            let full = s.computed / bs;
            for k in s.keyed_upto..full {
                if self.cache.register(s.hashes[k]) {
                    s.table[k] = Slot::Keyed(s.hashes[k]);
                }
            }
            s.keyed_upto = s.keyed_upto.max(full);
            if !prefilling {
                s.generated += 1;
            } else if s.computed == s.prompt_len {
                s.generated = 1;
                if let Some(r) = records.get_mut(s.request) {
                    r.first_token_us = Some(now);
                }
            }
        }
        let mut finished = Vec::new();
        let cache = &mut self.cache;
        self.running.retain(|s| {
            if s.generated < s.output_len {
                return true;
            }
            cache.release(&s.table);
            if let Some(r) = records.get_mut(s.request) {
                r.done_us = Some(now);
            }
            finished.push(s.conversation);
            false
        });
        finished
    }

    /// The cache changes since the last call, numbered on from the last published event.
    fn take_events(&mut self) -> Vec<(u64, BlockChange)> {
        let events = std::mem::take(&mut self.cache.events);
        events
            .into_iter()
            .map(|e| {
                self.published += 1;
                (self.published, e)
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The simulation.

/// Everything one (workers, policy) run depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SimConfig {
    workers: u32,
    policy: Policy,
    weights: CostWeights,
    model: WorkerModel,
    workload: Workload,
    duration_us: u64,
    warmup_us: u64,
    report_interval_us: u64,
    seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    /// Conversation `i` of the trace starts (and schedules the next start).
    Start(usize),
    /// The next turn of a conversation is sent.
    Turn(usize),
    StepDone(WorkerSlot),
    Report(WorkerSlot),
}

/// What the router knows of a worker's load.
#[derive(Debug, Clone, Copy, Default)]
struct LoadView {
    running: u64,
    waiting: u64,
    in_flight: u64,
}

/// Results of one (workers, policy) run.
#[derive(Debug, Clone, PartialEq)]
struct RunResult {
    /// Requests that arrived in the measurement window, and how many of those completed.
    measured: usize,
    completed: usize,
    arrived_per_s: f64,
    req_per_s: f64,
    output_tok_per_s: f64,
    hit_rate: f64,
    ttft_ms: (f64, f64),
    e2e_ms: (f64, f64),
    /// The busiest worker's time-averaged load over the cluster's mean (persistent hot spots).
    load_max_over_mean: f64,
    /// Max over mean of the workers' loads at one moment, averaged over the window (transient
    /// imbalance).
    instant_max_over_mean: f64,
}

struct Sim<'t> {
    config: SimConfig,
    router: Router,
    workers: Vec<SimWorker>,
    views: Vec<LoadView>,
    queue: BinaryHeap<Reverse<(u64, u64, Action)>>,
    pushed: u64,
    trace: &'t [ConversationStart],
    systems: &'t [Vec<u32>],
    /// Conversations in progress, by trace index.
    conversations: Vec<Option<Conversation>>,
    requests: Vec<RequestRecord>,
    load_sum: Vec<f64>,
    /// Sum and count of the instantaneous max ÷ mean load, sampled at worker 0's reports.
    spread: (f64, u64),
    candidates: Vec<Candidate>,
}

impl<'t> Sim<'t> {
    fn new(config: SimConfig, trace: &'t [ConversationStart], systems: &'t [Vec<u32>]) -> Self {
        let n = config.workers as usize;
        let mut router = Router::new(config.policy, config.weights, config.seed);
        for w in 0..config.workers {
            match config.policy {
                Policy::Kv => router.index.reset_worker(w, 0, []),
                Policy::Prefix => router.approx.add_worker(w, config.model.kv_blocks),
                Policy::RoundRobin | Policy::LeastLoad | Policy::PowerOfTwo => {}
            }
        }
        Sim {
            config,
            router,
            workers: (0..n).map(|_| SimWorker::new(config.model)).collect(),
            views: vec![LoadView::default(); n],
            queue: BinaryHeap::new(),
            pushed: 0,
            trace,
            systems,
            conversations: (0..trace.len()).map(|_| None).collect(),
            requests: Vec::new(),
            load_sum: vec![0.0; n],
            spread: (0.0, 0),
            candidates: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, at_us: u64, action: Action) {
        self.pushed += 1;
        self.queue.push(Reverse((at_us, self.pushed, action)));
    }

    fn in_window(&self, t: u64) -> bool {
        t >= self.config.warmup_us && t < self.config.duration_us
    }

    fn run(&mut self) -> anyhow::Result<RunResult> {
        let n = u64::from(self.config.workers);
        for w in 0..self.config.workers {
            self.push(u64::from(w) * self.config.report_interval_us / n, Action::Report(w));
        }
        if let Some(first) = self.trace.first() {
            self.push(first.at_us, Action::Start(0));
        }
        let stop_us = self.config.duration_us.saturating_mul(2);
        while let Some(Reverse((now, _, action))) = self.queue.pop() {
            if now > stop_us {
                break;
            }
            match action {
                Action::Start(i) => self.start_conversation(now, i)?,
                Action::Turn(c) => self.submit(now, c)?,
                Action::StepDone(w) => self.step_done(now, w)?,
                Action::Report(w) => self.report(now, w),
            }
        }
        Ok(self.summarize())
    }

    fn start_conversation(&mut self, now: u64, i: usize) -> anyhow::Result<()> {
        if let Some(next) = self.trace.get(i + 1) {
            self.push(next.at_us, Action::Start(i + 1));
        }
        let start = self.trace.get(i).context("conversation start out of the trace")?;
        let system = self.systems.get(start.tenant).context("tenant without a system prompt")?;
        let c = conversation(&self.config.workload, system, start.seed, self.config.model.block_size);
        *self.conversations.get_mut(i).context("conversation start out of the trace")? = Some(c);
        self.submit(now, i)
    }

    /// Routes the conversation's next turn with the real router and queues it on that worker.
    fn submit(&mut self, now: u64, conv: usize) -> anyhow::Result<()> {
        let bs = self.config.model.block_size;
        let c = self.conversations.get_mut(conv).and_then(Option::as_mut).context("turn of a finished conversation")?;
        let turn = *c.turns.get(c.next).context("turn past the conversation's end")?;
        c.next += 1;
        let hashes = Rc::clone(&c.hashes);
        self.candidates.clear();
        self.candidates.extend(self.views.iter().enumerate().map(|(w, v)| Candidate {
            slot: w as WorkerSlot,
            running_tokens: v.running,
            waiting_tokens: v.waiting,
            in_flight_tokens: v.in_flight,
        }));
        let decision = self
            .router
            .choose(&self.candidates, &hashes[..turn.prompt_len / bs], bs, turn.prompt_len)
            .context("no worker to route to")?;
        let w = decision.slot;
        let view = self.views.get_mut(w as usize).context("router chose an unknown worker")?;
        view.in_flight += turn.prompt_len as u64;
        let request = self.requests.len();
        self.requests.push(RequestRecord {
            arrival_us: now,
            first_token_us: None,
            done_us: None,
            prompt_tokens: turn.prompt_len,
            cached_tokens: None,
            output_tokens: turn.output_len,
        });
        let worker = &mut self.workers[w as usize];
        worker.waiting.push_back(Seq {
            request,
            conversation: conv,
            hashes,
            prompt_len: turn.prompt_len,
            output_len: turn.output_len,
            computed: 0,
            generated: 0,
            table: Vec::new(),
            keyed_upto: 0,
        });
        if worker.step.is_none() {
            self.start_step(now, w);
        }
        Ok(())
    }

    fn start_step(&mut self, now: u64, w: WorkerSlot) {
        if let Some(us) = self.workers[w as usize].start_step(&mut self.requests) {
            self.push(now + us, Action::StepDone(w));
        }
    }

    /// Ends a worker's step: publishes its KV events, schedules follow-up turns, starts the next step.
    fn step_done(&mut self, now: u64, w: WorkerSlot) -> anyhow::Result<()> {
        let worker = &mut self.workers[w as usize];
        let finished = worker.finish_step(now, &mut self.requests);
        for (seq, change) in worker.take_events() {
            if self.config.policy == Policy::Kv {
                self.router.index.apply(w, seq, change)?;
            }
        }
        for conv in finished {
            let slot = self.conversations.get_mut(conv).context("finished turn of an unknown conversation")?;
            let c = slot.as_ref().context("finished turn of a finished conversation")?;
            let think = c.turns.get(c.next.saturating_sub(1)).map_or(0, |t| t.think_us);
            if c.next < c.turns.len() && now + think < self.config.duration_us {
                self.push(now + think, Action::Turn(conv));
            } else {
                *slot = None;
            }
        }
        self.start_step(now, w);
        Ok(())
    }

    /// A worker's load report: replaces the router's view and clears the in-flight tokens.
    fn report(&mut self, now: u64, w: WorkerSlot) {
        let (running, waiting) = self.workers[w as usize].load();
        self.views[w as usize] = LoadView { running, waiting, in_flight: 0 };
        if self.in_window(now) {
            self.load_sum[w as usize] += (running + waiting) as f64;
            if w == 0 {
                let loads: Vec<u64> = self.workers.iter().map(|x| x.load()).map(|(r, q)| r + q).collect();
                let mean = loads.iter().sum::<u64>() as f64 / loads.len() as f64;
                if mean > 0.0 {
                    let max = loads.iter().copied().max().unwrap_or(0);
                    self.spread = (self.spread.0 + max as f64 / mean, self.spread.1 + 1);
                }
            }
        }
        let next = now + self.config.report_interval_us;
        if next < self.config.duration_us {
            self.push(next, Action::Report(w));
        }
    }

    fn summarize(&self) -> RunResult {
        let measured: Vec<&RequestRecord> = self.requests.iter().filter(|r| self.in_window(r.arrival_us)).collect();
        let done_in_window: Vec<&RequestRecord> =
            self.requests.iter().filter(|r| r.done_us.is_some_and(|t| self.in_window(t))).collect();
        let window_s = (self.config.duration_us - self.config.warmup_us) as f64 / US_PER_S;
        let (prompt, cached) = measured
            .iter()
            .filter_map(|r| r.cached_tokens.map(|c| (r.prompt_tokens, c)))
            .fold((0, 0), |(p, c), (rp, rc)| (p + rp, c + rc));
        let mut ttft: Vec<u64> = measured.iter().filter_map(|r| r.first_token_us.map(|t| t - r.arrival_us)).collect();
        let mut e2e: Vec<u64> = measured.iter().filter_map(|r| r.done_us.map(|t| t - r.arrival_us)).collect();
        let mean = self.load_sum.iter().sum::<f64>() / self.load_sum.len().max(1) as f64;
        let max = self.load_sum.iter().copied().fold(0.0, f64::max);
        RunResult {
            measured: measured.len(),
            completed: e2e.len(),
            arrived_per_s: measured.len() as f64 / window_s,
            req_per_s: done_in_window.len() as f64 / window_s,
            output_tok_per_s: done_in_window.iter().map(|r| r.output_tokens).sum::<usize>() as f64 / window_s,
            hit_rate: cached as f64 / prompt.max(1) as f64,
            ttft_ms: (percentile_ms(&mut ttft, 50.0), percentile_ms(&mut ttft, 99.0)),
            e2e_ms: (percentile_ms(&mut e2e, 50.0), percentile_ms(&mut e2e, 99.0)),
            load_max_over_mean: if mean > 0.0 { max / mean } else { 0.0 },
            instant_max_over_mean: self.spread.0 / self.spread.1.max(1) as f64,
        }
    }
}

/// Nearest-rank percentile of microsecond samples, in milliseconds.
fn percentile_ms(xs: &mut [u64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_unstable();
    let rank = ((p / 100.0) * xs.len() as f64).ceil() as usize;
    xs[rank.clamp(1, xs.len()) - 1] as f64 / 1e3
}

// ---------------------------------------------------------------------------------------------
// The command.

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

    fn model(kv_blocks: usize) -> WorkerModel {
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

    fn workload() -> Workload {
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

    fn config(workers: u32, policy: Policy, rate_seed: u64) -> SimConfig {
        SimConfig {
            workers,
            policy,
            weights: CostWeights::default(),
            model: model(256),
            workload: workload(),
            duration_us: 30_000_000,
            warmup_us: 0,
            report_interval_us: 100_000,
            seed: rate_seed,
        }
    }

    /// Runs `config` on a 2 req/s trace; returns the finished simulation's result and state checks.
    fn simulate(config: SimConfig) -> anyhow::Result<(RunResult, Vec<RequestRecord>)> {
        let systems = system_prompts(&config.workload, config.seed);
        let trace = arrival_trace(&config.workload, 2.0 / 3.0, config.duration_us, config.seed);
        let mut sim = Sim::new(config, &trace, &systems);
        let result = sim.run()?;
        if config.policy == Policy::Kv {
            for (w, worker) in sim.workers.iter().enumerate() {
                let w = w as WorkerSlot;
                anyhow::ensure!(sim.router.index.last_seq(w) == Some(worker.published), "worker {w}: events unapplied");
                let held = sim.router.index.blocks_of(w).context("untracked worker")?;
                let keyed: std::collections::HashSet<u64> = worker.cache.keyed.keys().copied().collect();
                anyhow::ensure!(*held == keyed, "worker {w}: the index differs from the cache");
            }
            sim.router.index.check_invariants().map_err(anyhow::Error::msg)?;
        }
        for worker in &sim.workers {
            let tables: Vec<&[Slot]> =
                worker.running.iter().chain(&worker.waiting).map(|s| s.table.as_slice()).collect();
            worker.cache.check(&tables).map_err(anyhow::Error::msg)?;
        }
        Ok((result, sim.requests))
    }

    #[test]
    fn cache_evicts_the_least_recently_released_unreferenced_block() {
        let mut c = BlockCache::new(4);
        assert!(c.take(3));
        assert!(c.register(10) && c.register(11) && !c.register(10), "a hash names one block");
        // Sequence A holds [10, 11, anon]; release keys 10 and 11 as evictable, 11 first (tail first).
        c.release(&[Slot::Keyed(10), Slot::Keyed(11), Slot::Anon]);
        assert_eq!((c.free(), c.evictable.len()), (2, 2));
        assert_eq!(c.lookup(&[10, 11, 12]), 2);
        // B reuses 10 (referenced: not evictable); needing 3 blocks takes 2 free ones and evicts 11.
        c.acquire(&[10]);
        assert!(c.take(3));
        assert!(!c.take(1), "10 is referenced, nothing else is left");
        assert_eq!(c.lookup(&[10, 11]), 1);
        assert_eq!(c.events, [BlockChange::Stored(10), BlockChange::Stored(11), BlockChange::Removed(11)]);
        c.release(&[Slot::Keyed(10), Slot::Anon, Slot::Anon, Slot::Anon]);
        assert_eq!((c.free(), c.evictable.len(), c.keyed.len()), (3, 1, 1));
        // LRU: 20 released after 10, so 10 goes first.
        assert!(c.take(1) && c.register(20));
        c.release(&[Slot::Keyed(20)]);
        assert!(c.take(4));
        assert_eq!(&c.events[3..], [BlockChange::Stored(20), BlockChange::Removed(10), BlockChange::Removed(20)]);
    }

    #[test]
    fn worker_numbers_its_events_without_gaps_and_they_rebuild_the_cache() -> anyhow::Result<()> {
        let mut w = SimWorker::new(model(32));
        let mut index = Router::new(Policy::Kv, CostWeights::default(), 0).index;
        index.reset_worker(0, 0, []);
        let hashes: Rc<[u64]> = (100..120).collect();
        let mut records = vec![RequestRecord {
            arrival_us: 0,
            first_token_us: None,
            done_us: None,
            prompt_tokens: 30,
            cached_tokens: None,
            output_tokens: 5,
        }];
        let seq = |request| Seq {
            request,
            conversation: 0,
            hashes: Rc::clone(&hashes),
            prompt_len: 30,
            output_len: 5,
            computed: 0,
            generated: 0,
            table: Vec::new(),
            keyed_upto: 0,
        };
        w.waiting.push_back(seq(0));
        let mut now = 0;
        let mut numbers = Vec::new();
        while let Some(us) = w.start_step(&mut records) {
            now += us;
            w.finish_step(now, &mut records);
            let tables: Vec<&[Slot]> = w.running.iter().map(|s| s.table.as_slice()).collect();
            w.cache.check(&tables).map_err(anyhow::Error::msg)?;
            for (n, change) in w.take_events() {
                numbers.push(n);
                index.apply(0, n, change)?;
            }
        }
        assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>());
        // 30 prompt + 4 decoded tokens computed: 8 full blocks keyed; nothing evicted.
        assert_eq!(numbers.len(), 8);
        let held = index.blocks_of(0).context("tracked")?;
        assert_eq!(*held, hashes[..8].iter().copied().collect());
        assert_eq!(records[0].cached_tokens, Some(0));
        assert!(records[0].first_token_us.is_some() && records[0].done_us.is_some());
        // The same prompt again hits its first 7 blocks (the last prompt token is recomputed).
        records.push(records[0]);
        w.waiting.push_back(seq(1));
        while let Some(us) = w.start_step(&mut records) {
            now += us;
            w.finish_step(now, &mut records);
        }
        assert_eq!(records[1].cached_tokens, Some(28));
        Ok(())
    }

    #[test]
    fn a_tiny_run_completes_every_request_and_the_index_matches_the_caches() -> anyhow::Result<()> {
        for policy in [Policy::Kv, Policy::Prefix, Policy::LeastLoad, Policy::RoundRobin, Policy::PowerOfTwo] {
            let (result, requests) = simulate(config(3, policy, 7))?;
            assert!(result.measured > 20, "{policy}: {result:?}");
            assert_eq!(result.completed, result.measured, "{policy}");
            assert!(requests.iter().all(|r| r.done_us.is_some()), "{policy}: a request never finished");
            assert!(result.hit_rate > 0.0 && result.hit_rate < 1.0, "{policy}: {result:?}");
            assert!(result.ttft_ms.0 > 0.0 && result.ttft_ms.0 <= result.e2e_ms.0, "{policy}: {result:?}");
        }
        Ok(())
    }

    #[test]
    fn a_run_is_a_function_of_its_seed() -> anyhow::Result<()> {
        for policy in [Policy::Kv, Policy::PowerOfTwo] {
            let a = simulate(config(4, policy, 3))?;
            assert_eq!(a, simulate(config(4, policy, 3))?);
            assert_ne!(a.1, simulate(config(4, policy, 4))?.1);
        }
        Ok(())
    }

    #[test]
    fn kv_keeps_conversations_on_the_worker_that_holds_them() -> anyhow::Result<()> {
        // Light load: placement, not queueing, decides the hit rate.
        let kv = simulate(config(4, Policy::Kv, 5))?.0;
        let rr = simulate(config(4, Policy::RoundRobin, 5))?.0;
        assert!(kv.hit_rate > rr.hit_rate + 0.1, "kv {kv:?} vs round-robin {rr:?}");
        Ok(())
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
