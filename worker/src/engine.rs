//! A batch generator over one model: prefill every prompt, then decode all sequences in
//! lock-step until each stops.
//!
//! This is the engine core that `tessera generate` and `tessera bench engine` drive; the
//! continuous-batching scheduler of the serving engine replaces the fixed batch. Invariants:
//! requests are validated (non-empty prompt, ids in the vocabulary, prompt + max_new_tokens
//! within the context) before any KV block is taken; every block a request holds is released
//! when `generate` returns, on success and on error alike.

use std::time::{Duration, Instant};

use crate::backend::ModelBackend;
use crate::error::EngineError;
use crate::kv_cache::{BlockAllocator, KvCacheConfig};
use crate::model::SeqChunk;
use crate::sampler::{Sampler, SamplingParams, TokenLogprob, logprobs};

/// Most alternatives a request may ask log-probabilities for (OpenAI's and vLLM's bound).
pub const MAX_LOGPROBS: u32 = 20;

/// Longest prompt slice run through the model in one forward call (bounds activation memory).
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
    /// A stop token was produced.
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
    /// Wall time of prefill (including the first token's sampling).
    pub prefill_time: Duration,
    /// Tokens produced by decode steps (after the first).
    pub decode_tokens: usize,
    /// Decode steps run.
    pub decode_steps: usize,
    /// Wall time of the decode steps.
    pub decode_time: Duration,
}

struct Active {
    request: usize,
    table: Vec<u32>,
    len: usize,
    sampler: Sampler,
    output: Vec<u32>,
    finish: Option<FinishReason>,
    /// Prompt tokens whose K/V came from the prefix cache.
    cached: usize,
    logprobs: Option<Vec<TokenLogprob>>,
}

/// Engine behaviour switches.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Reuse the K/V of full blocks whose prefix was computed before (benchmarks that repeat
    /// the same prompts turn it off to measure real prefill).
    pub prefix_caching: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { prefix_caching: true }
    }
}

/// A backend plus the block bookkeeping of its KV cache.
pub struct Engine {
    backend: Box<dyn ModelBackend>,
    kv: BlockAllocator,
    options: EngineOptions,
}

impl Engine {
    /// Wraps a backend whose KV storage was sized for `kv_config`, with prefix caching on.
    pub fn new(backend: Box<dyn ModelBackend>, kv_config: KvCacheConfig) -> Result<Self, EngineError> {
        Self::with_options(backend, kv_config, EngineOptions::default())
    }

    /// Wraps a backend with explicit options.
    pub fn with_options(
        backend: Box<dyn ModelBackend>,
        kv_config: KvCacheConfig,
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        Ok(Engine { backend, kv: BlockAllocator::new(kv_config)?, options })
    }

    /// The backend.
    pub fn backend(&self) -> &dyn ModelBackend {
        self.backend.as_ref()
    }

    fn validate(&self, r: &GenerationRequest) -> Result<(), EngineError> {
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
        if r.prompt.len().checked_add(r.max_new_tokens).is_none_or(|t| t > c.max_position_embeddings) {
            return Err(EngineError::ContextOverflow {
                prompt: r.prompt.len(),
                max_new: r.max_new_tokens,
                context: c.max_position_embeddings,
            });
        }
        r.sampling.validate()
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

    /// Generates for every request; `on_token(request_index, token)` is called as each token is
    /// produced (in step order).
    pub fn generate(
        &mut self,
        requests: &[GenerationRequest],
        mut on_token: impl FnMut(usize, u32),
    ) -> Result<(Vec<GenerationOutput>, GenerationStats), EngineError> {
        for r in requests {
            self.validate(r)?;
        }
        let mut active: Vec<Active> = Vec::with_capacity(requests.len());
        let result = self.run(requests, &mut active, &mut on_token);
        for a in &mut active {
            if result.is_ok() && self.options.prefix_caching {
                // K/V exists for the prompt and every generated token but the last.
                let r = &requests[a.request];
                let tokens: Vec<u32> = r.prompt.iter().chain(&a.output).copied().collect();
                self.kv.register(&a.table, &tokens, a.len.saturating_sub(1).max(r.prompt.len()));
            }
            self.kv.release(&mut a.table);
        }
        let stats = result?;
        active.sort_by_key(|a| a.request);
        let outputs = active
            .into_iter()
            .map(|a| GenerationOutput {
                tokens: a.output,
                finish_reason: a.finish.unwrap_or(FinishReason::Length),
                cached_prompt_tokens: a.cached,
                logprobs: a.logprobs,
            })
            .collect();
        Ok((outputs, stats))
    }

    fn run(
        &mut self,
        requests: &[GenerationRequest],
        active: &mut Vec<Active>,
        on_token: &mut impl FnMut(usize, u32),
    ) -> Result<GenerationStats, EngineError> {
        let mut stats = GenerationStats::default();
        let start = Instant::now();
        for (i, r) in requests.iter().enumerate() {
            // Everything fallible that owns no blocks comes before the blocks are taken.
            let sampler = Sampler::new(r.sampling.clone(), &r.prompt)?;
            let mut table = Vec::new();
            let hit = if self.options.prefix_caching { self.kv.lookup_prefix(&r.prompt) } else { Vec::new() };
            self.kv.acquire(&mut table, &hit);
            let reserved = self.kv.reserve(&mut table, r.prompt.len() + r.max_new_tokens);
            active.push(Active {
                request: i,
                table,
                len: r.prompt.len(),
                sampler,
                logprobs: r.logprobs.map(|_| Vec::new()),
                output: Vec::new(),
                finish: None,
                cached: hit.len() * self.kv.config().block_size,
            });
            reserved?;
        }
        for a in active.iter_mut() {
            let r = &requests[a.request];
            let logits = self.prefill(&r.prompt, a.cached, &a.table)?;
            if self.options.prefix_caching {
                self.kv.register(&a.table, &r.prompt, r.prompt.len());
            }
            stats.prefill_tokens += r.prompt.len() - a.cached;
            stats.cached_prompt_tokens += a.cached;
            if r.max_new_tokens == 0 {
                a.finish = Some(FinishReason::Length);
                continue;
            }
            pick(a, r, &logits, on_token);
        }
        stats.prefill_time = start.elapsed();

        let decode_start = Instant::now();
        loop {
            let running: Vec<usize> = (0..active.len()).filter(|&i| active[i].finish.is_none()).collect();
            if running.is_empty() {
                break;
            }
            let last_tokens: Vec<[u32; 1]> =
                running.iter().map(|&i| [active[i].output[active[i].output.len() - 1]]).collect();
            let chunks: Vec<SeqChunk<'_>> = running
                .iter()
                .zip(&last_tokens)
                .map(|(&i, tok)| SeqChunk { tokens: tok, start_pos: active[i].len - 1, block_table: &active[i].table })
                .collect();
            // The backend may pick tokens itself only when nothing needs the logits on the host.
            let argmax_only = running.iter().all(|&i| {
                let (a, r) = (&active[i], &requests[active[i].request]);
                a.sampler.is_plain_greedy() && r.logprobs.is_none() && a.output.len() >= r.min_tokens
            });
            if argmax_only {
                let tokens = self.backend.forward_greedy(&chunks)?;
                for (&token, &i) in tokens.iter().zip(&running) {
                    let a = &mut active[i];
                    accept(a, &requests[a.request], token, on_token);
                }
            } else {
                let logits = self.backend.forward(&chunks)?;
                let vocab = self.backend.config().vocab_size;
                for (row, &i) in logits.chunks_exact(vocab).zip(&running) {
                    let a = &mut active[i];
                    pick(a, &requests[a.request], row, on_token);
                }
            }
            stats.decode_steps += 1;
            stats.decode_tokens += running.len();
        }
        stats.decode_time = decode_start.elapsed();
        Ok(stats)
    }
}

/// Samples from one sequence's logits (stop ids masked until `min_tokens`), records the
/// log-probabilities if asked, and accepts the token.
fn pick(a: &mut Active, r: &GenerationRequest, logits: &[f32], on_token: &mut impl FnMut(usize, u32)) {
    let masked;
    let row = if a.output.len() < r.min_tokens && !r.stop_token_ids.is_empty() {
        let mut m = logits.to_vec();
        for &t in &r.stop_token_ids {
            if let Some(x) = m.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        masked = m;
        &masked[..]
    } else {
        logits
    };
    let token = a.sampler.sample(row);
    if let (Some(list), Some(n)) = (a.logprobs.as_mut(), r.logprobs) {
        list.push(logprobs(logits, token, n as usize));
    }
    accept(a, r, token, on_token);
}

/// Records a chosen token and decides whether the sequence is done.
fn accept(a: &mut Active, r: &GenerationRequest, token: u32, on_token: &mut impl FnMut(usize, u32)) {
    a.sampler.observe(token);
    a.output.push(token);
    a.len += 1;
    on_token(a.request, token);
    if r.stop_token_ids.contains(&token) && a.output.len() > r.min_tokens.saturating_sub(1) {
        a.finish = Some(FinishReason::Stop);
    } else if a.output.len() >= r.max_new_tokens {
        a.finish = Some(FinishReason::Length);
    }
}
