//! Hugging Face checkpoint variants, built from stories260K in a temporary directory: sharded
//! safetensors with an index, an untied LM head, and a Mistral config with a sliding window.
//! Each must load and generate exactly what the plain checkpoint generates (the window case:
//! a window at least as long as the sequence changes nothing; a short one changes the output).

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use serde_json::Value;
use tessera_kernels::CpuPool;
use tessera_worker::WeightsDtype;
use tessera_worker::backend::cpu::CpuBackend;
use tessera_worker::engine::{Engine, GenerationRequest};
use tessera_worker::kv_cache::KvCacheConfig;
use tessera_worker::loader::{self, ModelSpec, ResolveOptions};
use tessera_worker::model::LlamaModel;
use tessera_worker::sampler::SamplingParams;

fn stories() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/stories260K")
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("tessera-hf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies stories260K's text files into `dir` with `config` edited, and writes `shards`
/// (file name → tensor names) from its checkpoint, plus `extra` tensors copied under new names.
fn build(dir: &Path, edit: impl FnOnce(&mut Value), shards: &[(&str, Vec<String>)], extra: &[(&str, &str)]) {
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(stories().join(f), dir.join(f)).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(stories().join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(stories().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut weight_map = serde_json::Map::new();
    for (file, names) in shards {
        let mut views: Vec<(String, TensorView<'_>)> =
            names.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        for (new, from) in extra {
            if *file == shards[0].0 {
                views.push((new.to_string(), st.tensor(from).unwrap()));
            }
        }
        for (n, _) in &views {
            weight_map.insert(n.clone(), Value::String(file.to_string()));
        }
        safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
    }
    if shards.len() > 1 {
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

fn greedy(dir: &Path, prompt: &str, steps: usize) -> Vec<u32> {
    let options = ResolveOptions { cache_dir: std::env::temp_dir(), dummy_seed: 0 };
    let model = loader::resolve(&ModelSpec::HfDir(dir.to_path_buf()), &options).unwrap();
    let ids = model.text.tokenizer.encode(prompt, true).unwrap().get_ids().to_vec();
    let llama = LlamaModel::load(&model.config, model.weights.as_ref(), WeightsDtype::F32, |_| {}).unwrap();
    let kv = KvCacheConfig { num_blocks: 16, block_size: 16 };
    let mut engine = Engine::new(Box::new(CpuBackend::new(llama, CpuPool::new(1).unwrap(), kv).unwrap()), kv).unwrap();
    let request = GenerationRequest {
        prompt: ids,
        max_new_tokens: steps,
        sampling: SamplingParams::greedy(),
        stop_token_ids: vec![],
        min_tokens: 0,
        logprobs: None,
    };
    engine.generate(&[request], |_, _| {}).unwrap().0.remove(0).tokens
}

fn all_names() -> Vec<String> {
    let bytes = std::fs::read(stories().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    names
}

const PROMPT: &str = "Once upon a time";

#[test]
fn sharded_checkpoint_matches_single_file() {
    let want = greedy(&stories(), PROMPT, 24);
    let names = all_names();
    let (a, b) = names.split_at(names.len() / 2);
    let dir = TempDir::new("sharded");
    build(
        &dir.0,
        |_| {},
        &[("model-00001-of-00002.safetensors", a.to_vec()), ("model-00002-of-00002.safetensors", b.to_vec())],
        &[],
    );
    assert_eq!(greedy(&dir.0, PROMPT, 24), want);
}

#[test]
fn untied_lm_head_is_used() {
    let want = greedy(&stories(), PROMPT, 24);
    let dir = TempDir::new("untied");
    // The same matrix as a separate lm_head: identical output, read from the other tensor.
    build(
        &dir.0,
        |c| c["tie_word_embeddings"] = Value::Bool(false),
        &[("model.safetensors", all_names())],
        &[("lm_head.weight", "model.embed_tokens.weight")],
    );
    assert_eq!(greedy(&dir.0, PROMPT, 24), want);
    // Without the tensor the untied config is an error naming it.
    let missing = TempDir::new("untied-missing");
    build(&missing.0, |c| c["tie_word_embeddings"] = Value::Bool(false), &[("model.safetensors", all_names())], &[]);
    let options = ResolveOptions { cache_dir: std::env::temp_dir(), dummy_seed: 0 };
    let model = loader::resolve(&ModelSpec::HfDir(missing.0.clone()), &options).unwrap();
    let err = LlamaModel::load(&model.config, model.weights.as_ref(), WeightsDtype::F32, |_| {}).err().unwrap();
    assert!(err.to_string().contains("lm_head.weight"), "{err}");
}

#[test]
fn mistral_sliding_window() {
    let want = greedy(&stories(), PROMPT, 32);
    let mistral = |window: u64| {
        move |c: &mut Value| {
            c["architectures"] = serde_json::json!(["MistralForCausalLM"]);
            c["model_type"] = Value::String("mistral".into());
            c["sliding_window"] = Value::from(window);
        }
    };
    let wide = TempDir::new("window-wide");
    build(&wide.0, mistral(4096), &[("model.safetensors", all_names())], &[]);
    assert_eq!(greedy(&wide.0, PROMPT, 32), want, "a window longer than the sequence changes nothing");
    let narrow = TempDir::new("window-narrow");
    build(&narrow.0, mistral(4), &[("model.safetensors", all_names())], &[]);
    let got = greedy(&narrow.0, PROMPT, 32);
    assert_ne!(got, want, "a 4-token window must change what the model sees");
}
