//! A tensor-parallel group on the CPU: `N` rank threads, each with its own thread-pool slice,
//! its own shard of the weights and its own K/V heads, joined by a shared-memory communicator.
//!
//! Rank 0 is the caller's thread (the engine thread, which runs the scheduler): each `forward`
//! sends the same step plan to every other rank over its channel, then computes rank 0's part;
//! the ranks meet in the model's collectives. Failure handling: an error, a panic or a collective
//! timeout on any rank aborts the communicator, which wakes every rank and marks the
//! [`GroupHealth`] failed (observed by the server, even if rank 0 itself is stuck); from then on
//! every `forward` fails with `GroupFailed`. A failed group is never repaired: the worker exits
//! and its supervisor restarts it. Invariants: followers only compute on a plan from rank 0, so
//! they are idle (blocked on their channel, with no timeout) between steps; dropping a healthy
//! group joins its threads, dropping a failed one leaves a possibly hung rank to the process exit.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use tessera_kernels::CpuPool;
use tessera_kernels::comm::Communicator;
use tessera_kernels::comm::host::{AbortHook, host_group};
use tessera_kernels::matmul::InputRounding;

use super::cpu::CpuBackend;
use super::{BackendInfo, ModelBackend};
use crate::config::ModelConfig;
use crate::error::{EngineError, LoadError};
use crate::kv_cache::KvCacheConfig;
use crate::loader::WeightSource;
use crate::model::{LlamaModel, SeqChunk};
use crate::parallel::fault::FaultInjection;
use crate::parallel::{GroupHealth, TpShard};
use crate::tensor::WeightsDtype;

/// How to build a group.
#[derive(Debug, Clone)]
pub struct TpOptions {
    /// Ranks.
    pub size: usize,
    /// Compute threads over all ranks (0 = all cores); each rank gets an equal slice, at least 1.
    pub threads: usize,
    /// How long a collective may wait for the slowest rank before the group is failed.
    pub collective_timeout: Duration,
    /// A fault to inject (tests only).
    pub fault: Option<FaultInjection>,
    /// The coarsest rounding the ranks' matmuls may give their inputs.
    pub input_rounding: InputRounding,
}

/// One step's batch, owned, as sent to the other ranks.
struct StepPlan {
    chunks: Vec<(Vec<u32>, usize, Vec<u32>)>,
}

impl StepPlan {
    fn new(chunks: &[SeqChunk<'_>]) -> Self {
        StepPlan { chunks: chunks.iter().map(|c| (c.tokens.to_vec(), c.start_pos, c.block_table.to_vec())).collect() }
    }

    fn chunks(&self) -> Vec<SeqChunk<'_>> {
        self.chunks
            .iter()
            .map(|(tokens, start_pos, table)| SeqChunk { tokens, start_pos: *start_pos, block_table: table })
            .collect()
    }
}

/// What each rank holds, measured after loading.
#[derive(Debug, Clone, Copy)]
pub struct RankFootprint {
    /// Bytes of weights in memory.
    pub weight_bytes: usize,
    /// Bytes of weights read per decoded token.
    pub weight_bytes_per_token: usize,
    /// Bytes of K+V stored per token.
    pub kv_bytes_per_token: usize,
}

/// A CPU tensor-parallel group behind the [`ModelBackend`] interface.
pub struct TpCpuBackend {
    leader: CpuBackend,
    plans: Vec<Sender<Arc<StepPlan>>>,
    followers: Vec<JoinHandle<()>>,
    footprints: Vec<RankFootprint>,
    fault: Option<FaultInjection>,
    health: GroupHealth,
    step: u64,
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs one rank's part of a step, turning an error or a panic into the reason the group fails.
fn rank_step(
    backend: &mut CpuBackend,
    step: u64,
    fault: Option<FaultInjection>,
    chunks: &[SeqChunk<'_>],
) -> Result<Vec<f32>, String> {
    let rank = backend.comm().rank();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        if let Some(f) = fault {
            f.maybe_fire(rank, step)?;
        }
        backend.forward(chunks)
    }));
    match outcome {
        Ok(Ok(logits)) => Ok(logits),
        Ok(Err(e)) => Err(format!("rank {rank}: {e}")),
        Err(payload) => Err(format!("rank {rank} panicked: {}", panic_message(payload.as_ref()))),
    }
}

fn follower(mut backend: CpuBackend, plans: Receiver<Arc<StepPlan>>, fault: Option<FaultInjection>) {
    let mut step = 0;
    // Ends when rank 0 drops its sender (shutdown or failure).
    while let Ok(plan) = plans.recv() {
        step += 1;
        if let Err(reason) = rank_step(&mut backend, step, fault, &plan.chunks()) {
            backend.comm().abort(&reason);
            return;
        }
    }
}

impl TpCpuBackend {
    /// Loads every rank's shard (in parallel, each reading only its parts of `weights`), starts
    /// the rank threads and allocates each rank's K/V heads for `kv`. `on_layer` is called as
    /// rank 0 loads each layer.
    pub fn new(
        config: &ModelConfig,
        weights: &dyn WeightSource,
        dtype: WeightsDtype,
        kv: KvCacheConfig,
        options: &TpOptions,
        on_layer: impl FnMut(usize) + Send,
    ) -> Result<Self, LoadError> {
        let shards = TpShard::layout(config, options.size)?;
        if let Some(f) = options.fault
            && f.rank >= options.size
        {
            return Err(LoadError::InvalidConfig(format!(
                "--fault-inject names rank {} of a {}-rank group",
                f.rank, options.size
            )));
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let total = if options.threads == 0 { cores } else { options.threads };
        let per_rank = (total / options.size).max(1);

        let health = GroupHealth::default();
        let hook: AbortHook = {
            let health = health.clone();
            Arc::new(move |reason: &str| health.fail(reason))
        };
        let comms = host_group(options.size, options.collective_timeout, Some(hook));

        let mut on_layer = Some(on_layer);
        let models: Vec<Result<LlamaModel, LoadError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = shards
                .iter()
                .map(|shard| {
                    let progress = if shard.rank == 0 { on_layer.take() } else { None };
                    scope.spawn(move || {
                        let mut progress = progress;
                        LlamaModel::load_shard(config, shard, weights, dtype, |l| {
                            if let Some(p) = progress.as_mut() {
                                p(l);
                            }
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(LoadError::Device("a loading thread panicked".into()))))
                .collect()
        });
        let mut ranks = Vec::with_capacity(options.size);
        let mut footprints = Vec::with_capacity(options.size);
        for (model, comm) in models.into_iter().zip(comms) {
            let model = model?;
            let pool = CpuPool::new(per_rank)
                .map_err(|e| LoadError::Device(e.to_string()))?
                .with_input_rounding(options.input_rounding);
            let (weight_bytes, weight_bytes_per_token) = (model.weight_bytes(), model.weight_bytes_per_token());
            let backend = CpuBackend::rank(model, pool, kv, comm).map_err(|e| LoadError::Device(e.to_string()))?;
            footprints.push(RankFootprint {
                weight_bytes,
                weight_bytes_per_token,
                kv_bytes_per_token: backend.kv_bytes_per_token(),
            });
            ranks.push(backend);
        }
        let mut ranks = ranks.into_iter();
        let leader = ranks.next().ok_or_else(|| LoadError::InvalidConfig("an empty group".into()))?;
        let mut plans = Vec::with_capacity(options.size - 1);
        let mut followers = Vec::with_capacity(options.size - 1);
        for (i, backend) in ranks.enumerate() {
            let (tx, rx) = channel();
            let fault = options.fault;
            let thread = std::thread::Builder::new()
                .name(format!("tessera-tp-rank-{}", i + 1))
                .spawn(move || follower(backend, rx, fault))
                .map_err(|e| LoadError::Device(format!("starting rank {}: {e}", i + 1)))?;
            plans.push(tx);
            followers.push(thread);
        }
        Ok(TpCpuBackend { leader, plans, followers, footprints, fault: options.fault, health, step: 0 })
    }

    /// What each rank holds, in rank order.
    pub fn footprints(&self) -> &[RankFootprint] {
        &self.footprints
    }

    fn failed(&self) -> EngineError {
        let reason = self.health.failure().map(str::to_string).or_else(|| self.leader.comm().abort_reason());
        EngineError::GroupFailed(reason.unwrap_or_else(|| "the group failed".into()))
    }
}

impl ModelBackend for TpCpuBackend {
    fn config(&self) -> &ModelConfig {
        self.leader.model().config()
    }

    fn info(&self) -> BackendInfo {
        let rank0 = self.leader.info();
        BackendInfo {
            device: format!("{} × tp {}", rank0.device, self.footprints.len()),
            weights_dtype: rank0.weights_dtype,
            weight_bytes_per_step: self.footprints.iter().map(|f| f.weight_bytes_per_token).sum(),
            kv_bytes_per_token: self.footprints.iter().map(|f| f.kv_bytes_per_token).sum(),
            tuning: rank0.tuning,
        }
    }

    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, EngineError> {
        if self.health.failure().is_some() {
            return Err(self.failed());
        }
        self.step += 1;
        let plan = Arc::new(StepPlan::new(chunks));
        for (i, tx) in self.plans.iter().enumerate() {
            if tx.send(plan.clone()).is_err() {
                self.leader.comm().abort(&format!("rank {} has stopped", i + 1));
                return Err(self.failed());
            }
        }
        match rank_step(&mut self.leader, self.step, self.fault, chunks) {
            Ok(logits) => Ok(logits),
            Err(reason) => {
                self.leader.comm().abort(&reason);
                Err(self.failed())
            }
        }
    }

    fn group_health(&self) -> Option<GroupHealth> {
        Some(self.health.clone())
    }
}

impl Drop for TpCpuBackend {
    fn drop(&mut self) {
        // Closing the channels ends every follower's loop.
        self.plans.clear();
        if self.health.failure().is_none() {
            for thread in self.followers.drain(..) {
                // A follower that panicked already aborted the group; nothing more to report.
                let _ = thread.join();
            }
        }
    }
}
