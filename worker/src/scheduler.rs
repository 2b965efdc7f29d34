//! Continuous batching: which sequences run in the next step, and how many of their tokens.
//!
//! Each step has a token budget (`max_batch_tokens`). Running sequences come first: every
//! decode (one token each), then sequences still prefilling, in arrival order, each taking as
//! much of the remaining budget as it needs (chunked prefill). Then waiting sequences are
//! admitted first-come-first-served while budget, sequence slots and KV blocks last; the head of
//! the queue is never overtaken, so a long prompt cannot be starved by shorter ones behind it.
//! When a running sequence cannot get a block, the latest-arrived sequence is preempted: its
//! blocks are released and it returns to the front of the queue to be recomputed later (its
//! full blocks usually survive in the prefix cache, so recomputing is mostly cache hits).
//!
//! Invariants: `running` is sorted by arrival; a waiting sequence holds no blocks and has
//! `computed == 0`; every planned chunk's positions are covered by its sequence's table.

use std::collections::{HashSet, VecDeque};

use crate::error::EngineError;
use crate::kv_cache::BlockAllocator;
use crate::sequence::{SeqId, Sequence};

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens run through the model per step, over all sequences.
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Sequences waiting for admission; more are refused (`QueueFull`).
    pub max_waiting: usize,
    /// Serve prompt blocks from the prefix cache.
    pub prefix_caching: bool,
}

impl SchedulerConfig {
    /// Rejects limits that would stall the scheduler.
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.max_running == 0 || self.max_waiting == 0 {
            return Err(EngineError::InvalidSchedulerConfig(
                "max running and waiting sequences must be positive".into(),
            ));
        }
        if self.max_batch_tokens < self.max_running {
            return Err(EngineError::InvalidSchedulerConfig(format!(
                "max batch tokens ({}) must be at least max running sequences ({}) so every decode fits a step",
                self.max_batch_tokens, self.max_running
            )));
        }
        Ok(())
    }
}

/// Tokens of one sequence to run in this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedChunk {
    /// The sequence.
    pub seq: SeqId,
    /// How many of its pending tokens.
    pub len: usize,
}

/// What the next step runs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StepPlan {
    /// Chunks, in the order the batch will hold them.
    pub chunks: Vec<PlannedChunk>,
    /// Sequences preempted while planning (now waiting again).
    pub preempted: Vec<SeqId>,
    /// Prompt tokens served from the prefix cache to sequences admitted in this plan.
    pub cached_tokens: usize,
}

/// The waiting queue and the running set.
pub struct Scheduler {
    config: SchedulerConfig,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new(config: SchedulerConfig) -> Result<Self, EngineError> {
        config.validate()?;
        Ok(Scheduler { config, waiting: VecDeque::new(), running: Vec::new() })
    }

    /// Its limits.
    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    /// Queues a new sequence; refused when the queue is full.
    pub fn enqueue(&mut self, seq: Sequence) -> Result<(), EngineError> {
        if self.waiting.len() >= self.config.max_waiting {
            return Err(EngineError::QueueFull { limit: self.config.max_waiting });
        }
        self.insert_waiting(seq);
        Ok(())
    }

    fn insert_waiting(&mut self, seq: Sequence) {
        let at = self.waiting.partition_point(|s| s.arrival < seq.arrival);
        self.waiting.insert(at, seq);
    }

    /// Whether anything is queued or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Running sequences, in arrival order.
    pub fn running(&self) -> &[Sequence] {
        &self.running
    }

    /// Running sequences, mutable.
    pub fn running_mut(&mut self) -> &mut [Sequence] {
        &mut self.running
    }

    /// Waiting sequences, in admission order.
    pub fn waiting(&self) -> impl Iterator<Item = &Sequence> {
        self.waiting.iter()
    }

    /// Takes a sequence out (finished or aborted), releasing its blocks.
    pub fn remove(&mut self, id: SeqId, kv: &mut BlockAllocator) -> Option<Sequence> {
        let mut seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)?
        };
        kv.release(&mut seq.table);
        Some(seq)
    }

    /// Plans the next step, taking and preempting blocks as needed.
    pub fn schedule(&mut self, kv: &mut BlockAllocator) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.config.max_batch_tokens;
        let mut preempted: HashSet<SeqId> = HashSet::new();

        // Decodes first, then unfinished prefills; each group in arrival order.
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| (self.running[i].pending() > 1, self.running[i].arrival));
        for i in order {
            if budget == 0 {
                break;
            }
            if preempted.contains(&self.running[i].id) {
                continue;
            }
            let len = self.running[i].pending().min(budget);
            if len == 0 {
                continue;
            }
            if self.make_room(i, len, kv, &mut plan, &mut budget, &mut preempted) {
                plan.chunks.push(PlannedChunk { seq: self.running[i].id, len });
                budget -= len;
            }
        }
        if !preempted.is_empty() {
            let (gone, kept): (Vec<Sequence>, Vec<Sequence>) =
                std::mem::take(&mut self.running).into_iter().partition(|s| preempted.contains(&s.id));
            self.running = kept;
            for seq in gone {
                plan.preempted.push(seq.id);
                self.insert_waiting(seq);
            }
            // Under memory pressure, admit nothing new this step.
            return plan;
        }
        self.admit(kv, &mut plan, budget);
        plan
    }

    /// Ensures `running[i]` has blocks for `len` more tokens, preempting later arrivals (or
    /// `running[i]` itself when it is the latest). Returns whether `running[i]` can run.
    fn make_room(
        &mut self,
        i: usize,
        len: usize,
        kv: &mut BlockAllocator,
        plan: &mut StepPlan,
        budget: &mut usize,
        preempted: &mut HashSet<SeqId>,
    ) -> bool {
        loop {
            let need = self.running[i].computed + len;
            if kv.reserve(&mut self.running[i].table, need).is_ok() {
                return true;
            }
            let victim = (0..self.running.len())
                .filter(|&j| !preempted.contains(&self.running[j].id))
                .max_by_key(|&j| self.running[j].arrival)
                .unwrap_or(i);
            let v = &mut self.running[victim];
            kv.release(&mut v.table);
            v.reset_after_preemption();
            preempted.insert(v.id);
            if let Some(k) = plan.chunks.iter().position(|c| c.seq == v.id) {
                *budget += plan.chunks.remove(k).len;
            }
            if victim == i {
                return false;
            }
        }
    }

    /// Admits waiting sequences in order while budget, slots and blocks last.
    fn admit(&mut self, kv: &mut BlockAllocator, plan: &mut StepPlan, mut budget: usize) {
        let block_size = kv.config().block_size;
        while budget > 0 && self.running.len() < self.config.max_running {
            let Some(front) = self.waiting.front() else { break };
            if let Some(leader) = front.follows
                && self.leader_still_prefilling(leader)
            {
                break;
            }
            let hit = if self.config.prefix_caching { kv.lookup_prefix(&front.tokens) } else { Vec::new() };
            let cached = hit.len() * block_size;
            let len = (front.tokens.len() - cached).min(budget);
            let mut table = Vec::new();
            kv.acquire(&mut table, &hit);
            if kv.reserve(&mut table, cached + len).is_err() {
                kv.release(&mut table);
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else { break };
            seq.table = table;
            seq.computed = cached;
            let first_admission = seq.cached_prompt_tokens.is_none();
            seq.cached_prompt_tokens.get_or_insert(cached.min(seq.prompt_len));
            if first_admission {
                plan.cached_tokens += cached.min(seq.prompt_len);
            }
            plan.chunks.push(PlannedChunk { seq: seq.id, len });
            budget -= len;
            let at = self.running.partition_point(|s| s.arrival < seq.arrival);
            self.running.insert(at, seq);
        }
    }

    fn leader_still_prefilling(&self, leader: SeqId) -> bool {
        self.waiting.iter().any(|s| s.id == leader) || self.running.iter().any(|s| s.id == leader && !s.prefill_done())
    }
}
