//! Bad input gives one clear error line and a non-zero exit: never a panic or a backtrace.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use std::path::Path;

use tessera_tests::{TempDir, shared_models, tessera};

/// Runs generate on `model` and checks the failure shape; returns stderr.
fn expect_clean_failure(args: &[&str], must_mention: &str) -> String {
    let out = tessera(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} succeeded; stderr: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{args:?} panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(stderr.contains(must_mention), "{args:?}: {stderr:?} should mention {must_mention:?}");
    stderr
}

/// A copy of stories260K's directory in a temp dir, with `edit` applied.
fn stories_copy(edit: impl FnOnce(&Path)) -> TempDir {
    let dir = TempDir::new();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        std::fs::copy(shared_models().join("stories260K").join(f), dir.path().join(f)).unwrap();
    }
    edit(dir.path());
    dir
}

fn generate_args(model: &Path) -> Vec<String> {
    ["generate", "--model", &model.display().to_string(), "--prompt", "Once upon a time", "--max-tokens", "4"]
        .map(String::from)
        .to_vec()
}

fn run_generate(model: &Path, must_mention: &str) {
    let args = generate_args(model);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    expect_clean_failure(&refs, must_mention);
}

#[test]
fn nonexistent_model_path() {
    run_generate(Path::new("/nonexistent/model/dir"), "/nonexistent/model/dir");
}

#[test]
fn unknown_file_kind() {
    let dir = TempDir::new();
    let f = dir.path().join("weights.bin");
    std::fs::write(&f, b"hello").unwrap();
    run_generate(&f, "unknown model");
}

#[test]
fn truncated_safetensors() {
    let dir = stories_copy(|d| {
        let p = d.join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    });
    run_generate(dir.path(), "safetensors");
}

#[test]
fn missing_safetensors() {
    let dir = stories_copy(|d| std::fs::remove_file(d.join("model.safetensors")).unwrap());
    run_generate(dir.path(), "model.safetensors");
}

#[test]
fn garbage_safetensors_header() {
    let dir = stories_copy(|d| {
        std::fs::write(d.join("model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json").unwrap()
    });
    run_generate(dir.path(), "safetensors");
}

#[test]
fn wrong_dtype() {
    let dir = stories_copy(|d| {
        // One I32 tensor where the embedding should be: a valid file of the wrong dtype.
        let n = 512 * 64 * 4;
        let header =
            format!(r#"{{"model.embed_tokens.weight":{{"dtype":"I32","shape":[512,64],"data_offsets":[0,{n}]}}}}"#);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + n, 0);
        std::fs::write(d.join("model.safetensors"), bytes).unwrap();
    });
    run_generate(dir.path(), "I32");
}

#[test]
fn unknown_architecture() {
    let dir = stories_copy(|d| {
        let p = d.join("config.json");
        let text = std::fs::read_to_string(&p).unwrap().replace("LlamaForCausalLM", "GPT2LMHeadModel");
        std::fs::write(&p, text).unwrap();
    });
    run_generate(dir.path(), "GPT2LMHeadModel");
}

#[test]
fn truncated_gguf() {
    let dir = TempDir::new();
    let gguf = default_gguf_path();
    let bytes = std::fs::read(&gguf).unwrap();
    for len in [0usize, 3, 4096, bytes.len() / 3] {
        let p = dir.path().join(format!("cut-{len}.gguf"));
        std::fs::write(&p, &bytes[..len]).unwrap();
        run_generate(&p, "GGUF");
    }
}

/// The default model's GGUF, as `tessera pull` reports it (fetched if absent).
fn default_gguf_path() -> std::path::PathBuf {
    let out = tessera(&["pull"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn prompt_longer_than_context() {
    let long = "Once upon a time ".repeat(200); // > 512 tokens, stories260K's context
    let model = shared_models().join("stories260K").display().to_string();
    expect_clean_failure(&["generate", "--model", &model, "--prompt", &long], "context length");
}

#[test]
fn unknown_dummy_preset_and_config_only_preset() {
    expect_clean_failure(&["generate", "--model", "dummy:nope", "--prompt", "x"], "tiny");
    expect_clean_failure(&["generate", "--model", "dummy:mistral-large-2", "--prompt", "x"], "tessera plan");
}

#[test]
fn chat_without_template() {
    let model = shared_models().join("stories260K").display().to_string();
    expect_clean_failure(&["generate", "--model", &model, "--prompt", "hi", "--chat"], "chat template");
}

#[test]
fn bad_sampling_parameters() {
    let model = shared_models().join("stories260K").display().to_string();
    expect_clean_failure(&["generate", "--model", &model, "--prompt", "hi", "--top-p", "0"], "top_p");
}
