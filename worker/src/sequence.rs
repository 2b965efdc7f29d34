//! One sequence being generated: its tokens, how many of them have K/V in the cache, its blocks,
//! and how it picks and accepts tokens.
//!
//! Invariants: `tokens = prompt ++ output`; `computed <= tokens.len()`; the K/V of positions
//! `0..computed` sits at the slots of `table`; `hashes[k]` is the chained hash of block `k` of
//! `tokens` and is only recorded once block `k` is fully computed (so `hashes.len() * block_size
//! <= computed`). A sequence that is preempted loses its table and `computed` but keeps its
//! tokens and sampler, so recomputing it gives the same continuation.

use tessera_proto::{BlockHash, hash_block};

use crate::engine::{FinishReason, GenerationRequest};
use crate::error::EngineError;
use crate::sampler::{DevicePick, Sampler, TokenLogprob, logprobs};

/// Identifies a sequence inside one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(pub u64);

/// A constraint on the output enforced at sampling time (structured output).
pub trait OutputConstraint: Send {
    /// Sets the logits of every token not allowed next to −∞.
    fn mask_logits(&mut self, logits: &mut [f32]) -> Result<(), EngineError>;
    /// Advances past an accepted token.
    fn accept(&mut self, token: u32) -> Result<(), EngineError>;
    /// Whether the output is complete (the sequence then stops).
    fn is_finished(&self) -> bool;
}

/// A sequence's state in the engine.
pub struct Sequence {
    /// Its id.
    pub id: SeqId,
    /// Admission order (lower is earlier); scheduling and preemption follow it.
    pub arrival: u64,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    /// Length of the prompt.
    pub prompt_len: usize,
    /// Positions whose K/V is in the cache.
    pub computed: usize,
    /// The sequence's KV blocks (empty while waiting).
    pub table: Vec<u32>,
    /// Chained hashes of the fully computed blocks registered so far.
    pub hashes: Vec<BlockHash>,
    /// Prompt tokens served from the prefix cache at first admission (`None` until admitted).
    pub cached_prompt_tokens: Option<usize>,
    /// Times this sequence was preempted.
    pub preemptions: u32,
    /// A sequence of the same prompt whose prefill this one waits for, so that it can share the
    /// prompt's blocks instead of computing them again (`n > 1` samples).
    pub follows: Option<SeqId>,
    request: GenerationRequest,
    sampler: Sampler,
    constraint: Option<Box<dyn OutputConstraint>>,
}

/// A token picked for a sequence in one step.
#[derive(Debug, Clone, PartialEq)]
pub struct PickedToken {
    /// The token.
    pub token: u32,
    /// Its log-probability and alternatives, when the request asked.
    pub logprob: Option<TokenLogprob>,
}

impl Sequence {
    /// A new waiting sequence. The request must already be validated.
    pub fn new(
        id: SeqId,
        arrival: u64,
        request: GenerationRequest,
        constraint: Option<Box<dyn OutputConstraint>>,
        follows: Option<SeqId>,
    ) -> Result<Self, EngineError> {
        let sampler = Sampler::new(request.sampling.clone(), &request.prompt)?;
        Ok(Sequence {
            id,
            arrival,
            tokens: request.prompt.clone(),
            prompt_len: request.prompt.len(),
            computed: 0,
            table: Vec::new(),
            hashes: Vec::new(),
            cached_prompt_tokens: None,
            preemptions: 0,
            follows,
            request,
            sampler,
            constraint,
        })
    }

    /// Appends `tokens` as output this request already produced elsewhere (mid-stream
    /// migration): the constraint, the penalties and the random stream advance as if this
    /// sequence had picked them. Only before the sequence has run.
    pub fn resume(&mut self, tokens: &[u32]) -> Result<(), EngineError> {
        if self.computed != 0 || self.tokens.len() != self.prompt_len {
            return Err(EngineError::Internal("resume after the sequence started".into()));
        }
        for &token in tokens {
            if let Some(c) = self.constraint.as_mut() {
                c.accept(token)?;
            }
            self.sampler.replay(token);
            self.tokens.push(token);
        }
        Ok(())
    }

    /// Tokens generated so far.
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens still to be run through the model before the next token can be sampled.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Whether the prompt (all of it but what the first decode recomputes) is in the cache.
    pub fn prefill_done(&self) -> bool {
        self.computed >= self.prompt_len
    }

    /// The request this sequence serves.
    pub fn request(&self) -> &GenerationRequest {
        &self.request
    }

    /// Whether the backend may pick the step's token itself (see [`DevicePick`]): nothing needs
    /// the logits on the host (no penalties, log-probabilities, constraint or held-back stops).
    pub fn can_pick_on_device(&self) -> bool {
        self.sampler.picks_from_raw_logits()
            && self.request.logprobs.is_none()
            && self.constraint.is_none()
            && (self.output().len() >= self.request.min_tokens || self.request.stop_token_ids.is_empty())
    }

    /// The pick to hand to the backend, drawing its random number; `None` (and nothing drawn)
    /// unless [`can_pick_on_device`](Self::can_pick_on_device).
    pub fn device_pick(&mut self) -> Option<DevicePick> {
        if self.can_pick_on_device() { self.sampler.device_pick() } else { None }
    }

    /// Chained hashes of newly completed blocks: `(block index, hash, parent, tokens)` for every
    /// full block of `0..computed` not yet hashed. Records them.
    pub fn new_full_blocks(&mut self, block_size: usize) -> Vec<(usize, BlockHash, Option<BlockHash>)> {
        let mut out = Vec::new();
        while (self.hashes.len() + 1) * block_size <= self.computed {
            let k = self.hashes.len();
            let parent = self.hashes.last().copied();
            let h = hash_block(parent, &self.tokens[k * block_size..(k + 1) * block_size]);
            self.hashes.push(h);
            out.push((k, h, parent));
        }
        out
    }

    /// Picks the next token from the last position's raw logits: stop ids are masked until
    /// `min_tokens`, the constraint masks what it forbids, and log-probabilities are those of the
    /// raw distribution.
    pub fn pick(&mut self, logits: &[f32]) -> Result<PickedToken, EngineError> {
        let hold_back_stops = self.output().len() < self.request.min_tokens && !self.request.stop_token_ids.is_empty();
        let token = if hold_back_stops || self.constraint.is_some() {
            let mut masked = logits.to_vec();
            if hold_back_stops {
                for &t in &self.request.stop_token_ids {
                    if let Some(x) = masked.get_mut(t as usize) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            if let Some(c) = self.constraint.as_mut() {
                c.mask_logits(&mut masked)?;
            }
            self.sampler.sample(&masked)
        } else {
            self.sampler.sample(logits)
        };
        let logprob = self.request.logprobs.map(|n| logprobs(logits, token, n as usize));
        Ok(PickedToken { token, logprob })
    }

    /// Appends a picked token and says whether the sequence is now finished.
    pub fn accept(&mut self, picked: &PickedToken) -> Result<Option<FinishReason>, EngineError> {
        let token = picked.token;
        if let Some(c) = self.constraint.as_mut() {
            c.accept(token)?;
        }
        self.sampler.observe(token);
        self.tokens.push(token);
        let produced = self.output().len();
        let stopped = self.request.stop_token_ids.contains(&token) && produced >= self.request.min_tokens.max(1);
        let complete = self.constraint.as_ref().is_some_and(|c| c.is_finished());
        Ok(if stopped || complete {
            Some(FinishReason::Stop)
        } else if produced >= self.request.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        })
    }

    /// Drops the cache state after preemption: the blocks were released, everything must be
    /// recomputed (the tokens and sampler are kept).
    pub fn reset_after_preemption(&mut self) {
        self.computed = 0;
        self.hashes.clear();
        self.preemptions += 1;
    }
}
