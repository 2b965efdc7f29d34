//! `tessera generate`: one prompt in, text out on stdout (streamed as it is produced).

use std::io::Write;

use anyhow::{Context, bail};
use clap::Args;
use tessera_router::text::Detokenizer;
use tessera_router::{ChatMessage, ChatTemplate};
use tessera_worker::engine::Engine;
use tessera_worker::kv_cache::KvCacheConfig;
use tessera_worker::sampler::SamplingParams;
use tessera_worker::{EngineError, GenerationRequest};

use super::model_args::{ModelArgs, ParallelArgs};

/// Arguments of `tessera generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    parallel: ParallelArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Sample only among the k most likely tokens.
    #[arg(long)]
    top_k: Option<u32>,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Penalise tokens already in the prompt or output (> 1 discourages repeats).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Subtracted from the logits of tokens already generated.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Subtracted per occurrence from the logits of tokens already generated.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Generate at least this many tokens before end-of-sequence may stop generation.
    #[arg(long, default_value_t = 0)]
    min_tokens: usize,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    kv_block_size: usize,
}

/// Runs the subcommand.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        seed: args.seed,
    };
    sampling.validate()?;
    let resolved = args.model.resolve()?;
    let tokenizer = &resolved.text.tokenizer;
    let prompt_ids: Vec<u32> = if args.chat {
        let Some(t) = &resolved.text.chat_template else {
            bail!("{} has no chat template; drop --chat", resolved.id);
        };
        let template = ChatTemplate::new(&t.source, t.bos_token.clone(), t.eos_token.clone())?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.push(ChatMessage::new("user", args.prompt.clone()));
        let text = template.render(&messages, true)?;
        // The template already placed every special token, as transformers does.
        tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec()
    } else {
        tokenizer.encode(args.prompt.as_str(), true).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec()
    };
    let config = &resolved.config;
    let context = config.max_position_embeddings;
    if prompt_ids.len() >= context {
        return Err(EngineError::ContextOverflow { prompt: prompt_ids.len(), max_new: args.max_tokens, context }.into());
    }
    // Clamp to the room left in the context.
    let max_new = args.max_tokens.min(context - prompt_ids.len());
    let stop_token_ids = if args.ignore_eos { Vec::new() } else { config.eos_token_ids.clone() };
    let request = GenerationRequest {
        prompt: prompt_ids,
        max_new_tokens: max_new,
        sampling,
        stop_token_ids,
        min_tokens: args.min_tokens,
        logprobs: None,
    };
    let kv = KvCacheConfig::for_sequences(1, request.prompt.len() + request.max_new_tokens, args.kv_block_size);
    let mut engine = Engine::new(args.model.backend(&resolved, kv, &args.parallel)?, kv)?;
    let mut detok = Detokenizer::after_prompt(tokenizer, true, &request.prompt);
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    engine.generate(std::slice::from_ref(&request), |_, id| {
        let delta = detok.push(&[id]).map_err(anyhow::Error::from);
        let result = delta.and_then(|d| {
            stdout.write_all(d.as_bytes())?;
            stdout.flush()?;
            Ok(())
        });
        if let Err(e) = result {
            write_error.get_or_insert(e);
        }
    })?;
    if let Some(e) = write_error {
        return Err(e).context("writing the output");
    }
    write!(stdout, "{}", detok.finish()?)?;
    writeln!(stdout)?;
    Ok(())
}
