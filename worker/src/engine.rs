//! The engine: a backend, its KV-cache bookkeeping and the continuous-batching scheduler, driven
//! one step at a time.
//!
//! [`Engine::add`] validates a request and queues it as a sequence; [`Engine::step`] plans a
//! batch (decodes plus prefill chunks within the token budget), runs one forward pass, registers
//! newly full blocks in the prefix cache, samples where a sequence reached its last token, and
//! reports tokens and finished sequences. [`Engine::generate`] is the batch convenience built on
//! the same loop (used by `tessera generate`, `batch` and `bench engine`); the serving loop
//! (`serving`) drives `add`/`step`/`abort` from a thread. Invariants: requests are validated
//! (non-empty prompt, ids in the vocabulary, prompt + max_new_tokens within the context and the
//! KV capacity) before any block is taken; a finished or aborted sequence's blocks are released
//! at once; after a failed step every sequence is dropped and the prefix cache cleared.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::backend::ModelBackend;
use crate::error::EngineError;
use crate::kv_cache::{BlockAllocator, KvCacheConfig};
use crate::kv_events::KvEventKind;
use crate::model::SeqChunk;
use crate::sampler::{DevicePick, SamplingParams, TokenLogprob};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::sequence::{OutputConstraint, PickedToken, SeqId, Sequence};

/// Most alternatives a request may ask log-probabilities for (OpenAI's and vLLM's bound).
pub const MAX_LOGPROBS: u32 = 20;

/// Longest prompt slice run through the model in one forward call by [`Engine::prompt_logits`].
const PREFILL_CHUNK: usize = 512;

/// One generation request, in token ids.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt ids (non-empty).
    pub prompt: Vec<u32>,
    /// Upper bound on new tokens.
    pub max_new_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Ids that end generation (included in the output, as the model produced them).
    pub stop_token_ids: Vec<u32>,
    /// Stop ids cannot end generation before this many tokens (they are masked out).
    pub min_tokens: usize,
    /// Report each token's log-probability and this many most likely alternatives.
    pub logprobs: Option<u32>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was produced, or the output constraint was complete.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

/// The result of one request.
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// Generated ids.
    pub tokens: Vec<u32>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Prompt tokens served from the prefix cache (not recomputed).
    pub cached_prompt_tokens: usize,
    /// Per-token log-probabilities, when requested.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// Timings of one `generate` call.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenerationStats {
    /// Prompt tokens computed (excluding those served from the prefix cache).
    pub prefill_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_prompt_tokens: usize,
    /// Wall time of the steps that ran prompt tokens (including their sampling).
    pub prefill_time: Duration,
    /// Tokens produced by decode-only steps.
    pub decode_tokens: usize,
    /// Decode-only steps run.
    pub decode_steps: usize,
    /// Wall time of the decode-only steps.
    pub decode_time: Duration,
}

/// Engine behaviour switches and limits.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Reuse the K/V of full blocks whose prefix was computed before (benchmarks that repeat
    /// the same prompts turn it off to measure real prefill).
    pub prefix_caching: bool,
    /// Tokens per step over all sequences (decodes plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Sequences waiting for admission before new ones are refused.
    pub max_waiting: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { prefix_caching: true, max_batch_tokens: 512, max_running: 256, max_waiting: 4096 }
    }
}

/// Something that happened to a sequence in a step.
#[derive(Debug)]
pub enum SequenceEvent {
    /// A token was produced.
    Token {
        /// The sequence.
        seq: SeqId,
        /// The token (and its log-probabilities when asked).
        token: PickedToken,
    },
    /// The sequence ended; its blocks are released.
    Finished {
        /// The sequence.
        seq: SeqId,
        /// Why.
        reason: FinishReason,
        /// Its totals.
        usage: SequenceUsage,
    },
    /// The sequence failed on its own (its constraint broke); its blocks are released.
    Failed {
        /// The sequence.
        seq: SeqId,
        /// What went wrong.
        error: EngineError,
    },
}

/// Token counts of a finished sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceUsage {
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_prompt_tokens: usize,
}

/// What one step did.
#[derive(Debug, Default)]
pub struct StepReport {
    /// Per-sequence events, in batch order.
    pub events: Vec<SequenceEvent>,
    /// Prompt (or recomputed) tokens run.
    pub prefill_tokens: usize,
    /// Decode tokens run.
    pub decode_tokens: usize,
    /// Prompt tokens served from the prefix cache to newly admitted sequences.
    pub cached_tokens: usize,
    /// Sequences preempted (to be recomputed).
    pub preempted: usize,
}

/// The scheduler's load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineLoad {
    /// Sequences running.
    pub running: usize,
    /// Sequences waiting.
    pub waiting: usize,
    /// Tokens of running sequences.
    pub running_tokens: usize,
    /// Uncomputed tokens of waiting sequences.
    pub waiting_tokens: usize,
    /// KV blocks in all.
    pub kv_blocks_total: usize,
    /// KV blocks owned by sequences.
    pub kv_blocks_used: usize,
    /// Cached, unowned KV blocks.
    pub kv_blocks_cached: usize,
}

/// A backend plus the block bookkeeping of its KV cache and the scheduler.
pub struct Engine {
    backend: Box<dyn ModelBackend>,
    kv: BlockAllocator,
    scheduler: Scheduler,
    next_id: u64,
}

impl Engine {
    /// Wraps a backend whose KV storage was sized for `kv_config`, with default options.
    pub fn new(backend: Box<dyn ModelBackend>, kv_config: KvCacheConfig) -> Result<Self, EngineError> {
        Self::with_options(backend, kv_config, EngineOptions::default())
    }

    /// Wraps a backend with explicit options.
    pub fn with_options(
        backend: Box<dyn ModelBackend>,
        kv_config: KvCacheConfig,
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        let scheduler = Scheduler::new(SchedulerConfig {
            max_batch_tokens: options.max_batch_tokens,
            max_running: options.max_running,
            max_waiting: options.max_waiting,
            prefix_caching: options.prefix_caching,
        })?;
        Ok(Engine { backend, kv: BlockAllocator::new(kv_config)?, scheduler, next_id: 0 })
    }

    /// The backend.
    pub fn backend(&self) -> &dyn ModelBackend {
        self.backend.as_ref()
    }

    /// The KV capacity.
    pub fn kv_config(&self) -> KvCacheConfig {
        self.kv.config()
    }

    /// The KV block bookkeeping (read-only).
    pub fn kv(&self) -> &BlockAllocator {
        &self.kv
    }

    /// Checks a request against the model and the cache.
    pub fn validate(&self, r: &GenerationRequest) -> Result<(), EngineError> {
        let c = self.backend.config();
        if r.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if let Some(&id) = r.prompt.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(EngineError::TokenOutOfRange { id, vocab: c.vocab_size });
        }
        if r.logprobs.is_some_and(|n| n > MAX_LOGPROBS) {
            return Err(EngineError::InvalidSampling(format!(
                "at most {MAX_LOGPROBS} top log-probabilities per token"
            )));
        }
        let total = r.prompt.len().checked_add(r.max_new_tokens);
        if total.is_none_or(|t| t > c.max_position_embeddings) {
            return Err(EngineError::ContextOverflow {
                prompt: r.prompt.len(),
                max_new: r.max_new_tokens,
                context: c.max_position_embeddings,
            });
        }
        let kv = self.kv.config();
        let capacity = kv.num_blocks * kv.block_size;
        if let Some(tokens) = total.filter(|&t| t > capacity) {
            return Err(EngineError::ExceedsKvCapacity { tokens, capacity });
        }
        r.sampling.validate()
    }

    /// Validates and queues a request. `follows` names an earlier sequence with the same prompt
    /// whose prefill this one waits for, to share its prompt blocks (`n > 1` samples).
    pub fn add(
        &mut self,
        request: GenerationRequest,
        constraint: Option<Box<dyn OutputConstraint>>,
        follows: Option<SeqId>,
    ) -> Result<SeqId, EngineError> {
        self.add_resumed(request, constraint, follows, &[])
    }

    /// Like [`add`](Self::add) for a request that already produced `resumed` elsewhere (a
    /// migrated request): the sequence continues after them (see [`Sequence::resume`]).
    pub fn add_resumed(
        &mut self,
        request: GenerationRequest,
        constraint: Option<Box<dyn OutputConstraint>>,
        follows: Option<SeqId>,
        resumed: &[u32],
    ) -> Result<SeqId, EngineError> {
        self.validate(&request)?;
        let vocab = self.backend.config().vocab_size;
        if let Some(&id) = resumed.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::TokenOutOfRange { id, vocab });
        }
        if !resumed.is_empty() && resumed.len() >= request.max_new_tokens {
            return Err(EngineError::InvalidSampling(format!(
                "resume_output: {} tokens already reach max_tokens {}",
                resumed.len(),
                request.max_new_tokens
            )));
        }
        let id = SeqId(self.next_id);
        let follows = follows.filter(|_| self.scheduler.config().prefix_caching);
        let mut seq = Sequence::new(id, self.next_id, request, constraint, follows)?;
        seq.resume(resumed)?;
        self.scheduler.enqueue(seq)?;
        self.next_id += 1;
        Ok(id)
    }

    /// Drops a queued or running sequence and frees its blocks; false if it is not live.
    pub fn abort(&mut self, seq: SeqId) -> bool {
        self.scheduler.remove(seq, &mut self.kv).is_some()
    }

    /// Drops every sequence (after a device failure) and clears the prefix cache, whose
    /// contents can no longer be trusted. Returns the dropped ids.
    pub fn abort_all(&mut self) -> Vec<SeqId> {
        let ids: Vec<SeqId> = self.scheduler.running().iter().chain(self.scheduler.waiting()).map(|s| s.id).collect();
        for &id in &ids {
            self.scheduler.remove(id, &mut self.kv);
        }
        self.kv.clear_prefix_cache();
        ids
    }

    /// Checks the block bookkeeping against the live sequences (see
    /// [`BlockAllocator::check_invariants`]) and that waiting sequences hold no blocks.
    pub fn check_invariants(&self) -> Result<(), String> {
        if let Some(s) = self.scheduler.waiting().find(|s| !s.table.is_empty() || s.computed != 0) {
            return Err(format!("waiting sequence {:?} holds blocks", s.id));
        }
        let tables: Vec<&[u32]> = self.scheduler.running().iter().map(|s| s.table.as_slice()).collect();
        self.kv.check_invariants(&tables)
    }

    /// Whether any sequence is queued or running.
    pub fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    /// The prefix-cache changes since the last call (for the KV event log).
    pub fn take_kv_events(&mut self) -> Vec<KvEventKind> {
        self.kv.take_events()
    }

    /// The current load.
    pub fn load(&self) -> EngineLoad {
        let running = self.scheduler.running();
        EngineLoad {
            running: running.len(),
            waiting: self.scheduler.waiting().count(),
            running_tokens: running.iter().map(|s| s.tokens.len()).sum(),
            waiting_tokens: self.scheduler.waiting().map(Sequence::pending).sum(),
            kv_blocks_total: self.kv.config().num_blocks,
            kv_blocks_used: self.kv.used_blocks(),
            kv_blocks_cached: self.kv.evictable_blocks(),
        }
    }

    /// Runs one step. An `Err` is a device failure: every sequence has then been dropped (see
    /// [`abort_all`](Self::abort_all)).
    pub fn step(&mut self) -> Result<StepReport, EngineError> {
        let result = self.try_step();
        if result.is_err() {
            self.abort_all();
        }
        result
    }

    fn try_step(&mut self) -> Result<StepReport, EngineError> {
        let plan = self.scheduler.schedule(&mut self.kv);
        let mut report =
            StepReport { cached_tokens: plan.cached_tokens, preempted: plan.preempted.len(), ..Default::default() };
        if plan.chunks.is_empty() {
            return Ok(report);
        }
        let index: HashMap<SeqId, usize> =
            self.scheduler.running().iter().enumerate().map(|(i, s)| (s.id, i)).collect();
        let mut rows = Vec::with_capacity(plan.chunks.len());
        for c in &plan.chunks {
            let &i = index.get(&c.seq).ok_or_else(|| EngineError::Internal("planned sequence not running".into()))?;
            rows.push((i, c.len));
        }
        // The backend picks the tokens itself only when no row needs its logits on the host. A
        // row still mid-prompt picks nothing (its pick is ignored), so it asks for the arg-max.
        let on_device = rows.iter().all(|&(i, len)| {
            let s = &self.scheduler.running()[i];
            s.computed + len < s.tokens.len() || s.can_pick_on_device()
        });
        let picks = if on_device {
            let running = self.scheduler.running_mut();
            let picks: Option<Vec<DevicePick>> = rows
                .iter()
                .map(|&(i, len)| {
                    let s = &mut running[i];
                    if s.computed + len < s.tokens.len() { Some(DevicePick::Greedy) } else { s.device_pick() }
                })
                .collect();
            Some(picks.ok_or_else(|| EngineError::Internal("a device pick was refused after being allowed".into()))?)
        } else {
            None
        };
        let (picked_on_device, logits) = {
            let running = self.scheduler.running();
            let chunks: Vec<SeqChunk<'_>> = rows
                .iter()
                .map(|&(i, len)| {
                    let s = &running[i];
                    SeqChunk {
                        tokens: &s.tokens[s.computed..s.computed + len],
                        start_pos: s.computed,
                        block_table: &s.table,
                    }
                })
                .collect();
            for (&(i, len), c) in rows.iter().zip(&chunks) {
                let s = &running[i];
                if len == 1 && s.prefill_done() {
                    report.decode_tokens += 1;
                } else {
                    report.prefill_tokens += c.tokens.len();
                }
            }
            match &picks {
                Some(picks) => (Some(self.backend.forward_pick(&chunks, picks)?), None),
                None => (None, Some(self.backend.forward(&chunks)?)),
            }
        };
        let vocab = self.backend.config().vocab_size;
        let block_size = self.kv.config().block_size;
        let prefix_caching = self.scheduler.config().prefix_caching;
        let mut done: Vec<(SeqId, Result<FinishReason, EngineError>)> = Vec::new();
        for (row, &(i, len)) in rows.iter().enumerate() {
            let s = &mut self.scheduler.running_mut()[i];
            s.computed += len;
            for (k, hash, parent) in s.new_full_blocks(block_size) {
                if prefix_caching {
                    let tokens = &s.tokens[k * block_size..(k + 1) * block_size];
                    self.kv.register_block(s.table[k], hash, parent, tokens);
                }
            }
            if s.computed < s.tokens.len() {
                continue; // mid-prompt chunk: nothing to sample yet
            }
            if s.output().len() >= s.request().max_new_tokens {
                done.push((s.id, Ok(FinishReason::Length))); // nothing to generate (max_new_tokens = 0)
                continue;
            }
            let picked = match (&picked_on_device, &logits) {
                (Some(tokens), _) => Ok(PickedToken { token: tokens[row], logprob: None }),
                (None, Some(l)) => s.pick(&l[row * vocab..(row + 1) * vocab]),
                (None, None) => Err(EngineError::Internal("no forward output".into())),
            };
            match picked.and_then(|p| s.accept(&p).map(|finish| (p, finish))) {
                Ok((token, finish)) => {
                    report.events.push(SequenceEvent::Token { seq: s.id, token });
                    if let Some(reason) = finish {
                        done.push((s.id, Ok(reason)));
                    }
                }
                Err(e) => done.push((s.id, Err(e))),
            }
        }
        for (id, outcome) in done {
            let Some(seq) = self.scheduler.remove(id, &mut self.kv) else { continue };
            report.events.push(match outcome {
                Ok(reason) => SequenceEvent::Finished { seq: id, reason, usage: usage(&seq) },
                Err(error) => SequenceEvent::Failed { seq: id, error },
            });
        }
        Ok(report)
    }

    /// The logits of the prompt's last position (the first generation step), `(vocab)`.
    pub fn prompt_logits(&mut self, prompt: &[u32]) -> Result<Vec<f32>, EngineError> {
        let request = GenerationRequest {
            prompt: prompt.to_vec(),
            max_new_tokens: 0,
            sampling: SamplingParams::greedy(),
            stop_token_ids: Vec::new(),
            min_tokens: 0,
            logprobs: None,
        };
        self.validate(&request)?;
        let mut table = Vec::new();
        let result = self.kv.reserve(&mut table, prompt.len()).and_then(|()| self.prefill(prompt, 0, &table));
        self.kv.release(&mut table);
        result
    }

    /// Runs `prompt[start..]` in chunks (positions before `start` are already in the KV cache)
    /// and returns the last position's logits.
    fn prefill(&mut self, prompt: &[u32], start: usize, table: &[u32]) -> Result<Vec<f32>, EngineError> {
        let mut logits = Vec::new();
        for (i, chunk) in prompt[start..].chunks(PREFILL_CHUNK).enumerate() {
            let seq = SeqChunk { tokens: chunk, start_pos: start + i * PREFILL_CHUNK, block_table: table };
            logits = self.backend.forward(&[seq])?;
        }
        Ok(logits)
    }

    /// Generates for every request (all queued at once, then stepped until done);
    /// `on_token(request_index, token)` is called as each token is produced (in step order).
    pub fn generate(
        &mut self,
        requests: &[GenerationRequest],
        mut on_token: impl FnMut(usize, u32),
    ) -> Result<(Vec<GenerationOutput>, GenerationStats), EngineError> {
        // `add` validates; on the first refusal the ones already queued are withdrawn before any
        // step runs, so a batch is all-or-nothing.
        let mut ids = Vec::with_capacity(requests.len());
        for r in requests {
            match self.add(r.clone(), None, None) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for &id in &ids {
                        self.abort(id);
                    }
                    return Err(e);
                }
            }
        }
        let by_id: HashMap<SeqId, usize> = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let mut outputs: Vec<Option<GenerationOutput>> = vec![None; requests.len()];
        let mut produced: Vec<Vec<u32>> = vec![Vec::new(); requests.len()];
        let mut logprobs: Vec<Option<Vec<TokenLogprob>>> =
            requests.iter().map(|r| r.logprobs.map(|_| Vec::new())).collect();
        let mut stats = GenerationStats::default();
        while outputs.iter().any(Option::is_none) {
            let start = Instant::now();
            let report = self.step()?;
            let elapsed = start.elapsed();
            if report.prefill_tokens > 0 {
                stats.prefill_time += elapsed;
            } else {
                stats.decode_time += elapsed;
                stats.decode_steps += 1;
            }
            stats.prefill_tokens += report.prefill_tokens;
            stats.cached_prompt_tokens += report.cached_tokens;
            for event in report.events {
                match event {
                    SequenceEvent::Token { seq, token } => {
                        let Some(&i) = by_id.get(&seq) else { continue };
                        on_token(i, token.token);
                        produced[i].push(token.token);
                        if let (Some(list), Some(lp)) = (logprobs[i].as_mut(), token.logprob) {
                            list.push(lp);
                        }
                        if report.prefill_tokens == 0 {
                            stats.decode_tokens += 1;
                        }
                    }
                    SequenceEvent::Finished { seq, reason, usage } => {
                        let Some(&i) = by_id.get(&seq) else { continue };
                        outputs[i] = Some(GenerationOutput {
                            tokens: std::mem::take(&mut produced[i]),
                            finish_reason: reason,
                            cached_prompt_tokens: usage.cached_prompt_tokens,
                            logprobs: logprobs[i].take(),
                        });
                    }
                    SequenceEvent::Failed { seq, error } => {
                        for &id in &ids {
                            if id != seq {
                                self.abort(id);
                            }
                        }
                        return Err(error);
                    }
                }
            }
            if !self.has_work() && outputs.iter().any(Option::is_none) {
                return Err(EngineError::Internal("a request vanished without finishing".into()));
            }
        }
        let outputs = outputs.into_iter().flatten().collect();
        Ok((outputs, stats))
    }
}

fn usage(seq: &Sequence) -> SequenceUsage {
    SequenceUsage {
        prompt_tokens: seq.prompt_len,
        completion_tokens: seq.output().len(),
        cached_prompt_tokens: seq.cached_prompt_tokens.unwrap_or(0),
    }
}
