//! Structured output through the engine with the real SmolLM2-135M model: 100 samples at
//! temperature 1.0 under a JSON schema with nested objects, enums and arrays all finish, parse
//! and validate.

use std::collections::{HashMap, HashSet};

use serde_json::json;
use tessera_kernels::CpuPool;
use tessera_worker::WeightsDtype;
use tessera_worker::backend::cpu::CpuBackend;
use tessera_worker::engine::{Engine, EngineOptions, FinishReason, GenerationRequest, SequenceEvent};
use tessera_worker::kv_cache::KvCacheConfig;
use tessera_worker::loader::{self, ModelSpec, ResolveOptions};
use tessera_worker::model::LlamaModel;
use tessera_worker::sampler::SamplingParams;
use tessera_worker::structured::{ConstraintCompiler, ConstraintSpec};

#[test]
fn hundred_temperature_one_samples_under_a_schema_all_validate() {
    let options = ResolveOptions { cache_dir: loader::fetch::default_cache_dir(), dummy_seed: 0 };
    let model = loader::resolve(&ModelSpec::parse("smollm2-135m-instruct").unwrap(), &options).unwrap();
    let llama = LlamaModel::load(&model.config, model.weights.as_ref(), WeightsDtype::Bf16, |_| {}).unwrap();
    let kv = KvCacheConfig { num_blocks: 2048, block_size: 16 };
    let backend = CpuBackend::new(llama, CpuPool::new(0).unwrap(), kv).unwrap();
    let options = EngineOptions { max_running: 100, ..EngineOptions::default() };
    let mut engine = Engine::with_options(Box::new(backend), kv, options).unwrap();
    let eos = model.config.eos_token_ids.clone();
    let compiler = ConstraintCompiler::new(&model.text.tokenizer, &eos, model.config.vocab_size).unwrap();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 16},
                    "zip": {"type": "integer", "minimum": 0, "maximum": 99999}
                },
                "required": ["city", "zip"],
                "additionalProperties": false
            }
        },
        "required": ["name", "role", "tags", "address"],
        "additionalProperties": false
    });
    let spec = ConstraintSpec::JsonSchema(schema.to_string());
    let prompt = model
        .text
        .tokenizer
        .encode("<|im_start|>user\nDescribe a user account as JSON.<|im_end|>\n<|im_start|>assistant\n", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let mut ids = Vec::new();
    for seed in 0..100u64 {
        let request = GenerationRequest {
            prompt: prompt.clone(),
            // The schema bounds the content to well under 200 tokens, but at temperature 1 this
            // small model can spend many tokens on the indentation the grammar allows between
            // lexemes (a line break and up to 20 spaces or tabs each); room for that.
            max_new_tokens: 400,
            sampling: SamplingParams { temperature: 1.0, seed, ..SamplingParams::greedy() },
            stop_token_ids: eos.clone(),
            min_tokens: 0,
            logprobs: None,
        };
        let constraint = compiler.compile(&spec).unwrap();
        ids.push(engine.add(request, Some(Box::new(constraint)), ids.first().copied()).unwrap());
    }
    let mut tokens: HashMap<_, Vec<u32>> = HashMap::new();
    let mut finished = HashMap::new();
    while engine.has_work() {
        for event in engine.step().unwrap().events {
            match event {
                SequenceEvent::Token { seq, token } => tokens.entry(seq).or_default().push(token.token),
                SequenceEvent::Finished { seq, reason, .. } => {
                    finished.insert(seq, reason);
                }
                SequenceEvent::Failed { seq, error } => panic!("{seq:?} failed: {error}"),
            }
        }
    }
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut distinct = HashSet::new();
    for id in &ids {
        let text_so_far = model.text.tokenizer.decode(&tokens[id], false).unwrap();
        assert_eq!(finished.get(id), Some(&FinishReason::Stop), "{id:?} did not complete its JSON: {text_so_far:?}");
        let text_ids: Vec<u32> = tokens[id].iter().copied().filter(|t| !eos.contains(t)).collect();
        let text = model.text.tokenizer.decode(&text_ids, false).unwrap();
        let value: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
        assert!(validator.is_valid(&value), "does not validate: {text}");
        distinct.insert(text);
    }
    assert!(distinct.len() > 50, "temperature-1 samples should vary ({} distinct)", distinct.len());
}
