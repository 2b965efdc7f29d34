//! `tessera batch`: offline generation over token ids from a JSON file (for scripts and
//! correctness checks against other implementations).
//!
//! Input: `{"prompts": [[ids…], …], "max_new_tokens": N}`, optionally with `"sampling":
//! {"temperature", "top_p", "top_k", "min_p", "seed"}` (each optional; greedy without it).
//! Output: `{"outputs": [{"tokens": [ids…], "first_logits": [vocab floats]}, …]}`, each prompt
//! run on its own (batch 1) so results do not depend on what else is in the batch.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;
use tessera_worker::engine::{Engine, EngineOptions, GenerationRequest};
use tessera_worker::kv_cache::KvCacheConfig;
use tessera_worker::sampler::SamplingParams;

use super::model_args::{ModelArgs, ParallelArgs};

/// Arguments of `tessera batch`.
#[derive(Debug, Args)]
pub struct BatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    parallel: ParallelArgs,
    /// The input JSON file.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the output JSON.
    #[arg(long)]
    output: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    prompts: Vec<Vec<u32>>,
    max_new_tokens: usize,
    #[serde(default)]
    sampling: Option<Sampling>,
}

/// Sampling without penalties: what a backend may do on its device.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Sampling {
    #[serde(default)]
    temperature: f32,
    #[serde(default = "one")]
    top_p: f32,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    min_p: f32,
    #[serde(default)]
    seed: u64,
}

fn one() -> f32 {
    1.0
}

impl Sampling {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed: self.seed,
            ..SamplingParams::greedy()
        }
    }
}

/// Runs the subcommand.
pub fn run(args: BatchArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let input: Input = serde_json::from_str(&text).with_context(|| format!("parsing {}", args.input.display()))?;
    let sampling = input.sampling.as_ref().map_or_else(SamplingParams::greedy, Sampling::params);
    sampling.validate().context("sampling")?;
    let resolved = args.model.resolve()?;
    let longest = input.prompts.iter().map(Vec::len).max().unwrap_or(0);
    let total = longest
        .checked_add(input.max_new_tokens)
        .filter(|&t| t <= resolved.config.max_position_embeddings)
        .with_context(|| {
            format!("prompts of up to {longest} tokens plus {} new ones exceed the context", input.max_new_tokens)
        })?;
    let kv = KvCacheConfig::for_sequences(1, total, 16);
    // Each prompt runs alone and from scratch, so results never depend on the other prompts.
    let options = EngineOptions { prefix_caching: false, ..EngineOptions::default() };
    let mut engine = Engine::with_options(args.model.backend(&resolved, kv, &args.parallel)?, kv, options)?;
    let mut outputs = Vec::with_capacity(input.prompts.len());
    for (i, prompt) in input.prompts.iter().enumerate() {
        let first_logits = engine.prompt_logits(prompt).with_context(|| format!("prompt {i}"))?;
        let request = GenerationRequest {
            prompt: prompt.clone(),
            max_new_tokens: input.max_new_tokens,
            sampling: sampling.clone(),
            stop_token_ids: Vec::new(),
            min_tokens: 0,
            logprobs: None,
        };
        let (out, _) =
            engine.generate(std::slice::from_ref(&request), |_, _| {}).with_context(|| format!("prompt {i}"))?;
        let tokens = out.into_iter().next().map(|o| o.tokens).unwrap_or_default();
        outputs.push(serde_json::json!({ "tokens": tokens, "first_logits": first_logits }));
    }
    let out = serde_json::json!({ "model": resolved.id, "device": engine.backend().info().device, "outputs": outputs });
    std::fs::write(&args.output, out.to_string()).with_context(|| format!("writing {}", args.output.display()))?;
    Ok(())
}
