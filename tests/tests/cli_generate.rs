//! `tessera generate`, `plan`, `pull` and `bench engine` as a user runs them.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use tessera_tests::{TempDir, shared_models, tessera};

fn stdout_of(args: &[&str]) -> String {
    let out = tessera(args);
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn stories260k_greedy_story() {
    let model = shared_models().join("stories260K").display().to_string();
    let text = stdout_of(&["generate", "--model", &model, "--prompt", "Once upon a time", "--max-tokens", "40"]);
    // What llama2.c, transformers and llama.cpp all generate (shared/models/README.md).
    assert!(
        text.starts_with(", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball."),
        "{text:?}"
    );
}

#[test]
fn default_model_answers_chat() {
    let text = stdout_of(&["generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "32"]);
    assert_eq!(text.trim_end(), "The capital of France is Paris.");
}

#[test]
fn bf16_weights_give_the_same_story_start() {
    let model = shared_models().join("stories260K").display().to_string();
    let text = stdout_of(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "12",
        "--weights-dtype",
        "bf16",
    ]);
    assert!(text.starts_with(", there was a little girl named Lily."), "{text:?}");
}

#[test]
fn seeded_sampling_is_reproducible() {
    let args = [
        "generate",
        "--model",
        "dummy:tiny",
        "--prompt",
        "hello",
        "--max-tokens",
        "16",
        "--temperature",
        "0.9",
        "--seed",
    ];
    let a = stdout_of(&[&args[..], &["7"]].concat());
    let b = stdout_of(&[&args[..], &["7"]].concat());
    let c = stdout_of(&[&args[..], &["8"]].concat());
    assert_eq!(a, b);
    assert_ne!(a, c, "different seeds should sample differently");
}

/// `tessera batch` with a sampling block: the same seed gives the same tokens (the engine picks
/// them through the backend's `forward_pick`), another seed other tokens, bad values an error.
#[test]
fn batch_samples_reproducibly_and_rejects_bad_sampling() {
    let temp = TempDir::new();
    let dir = temp.path();
    let run = |name: &str, sampling: &str| {
        let (input, output) = (dir.join(format!("{name}-in.json")), dir.join(format!("{name}-out.json")));
        let body = format!(r#"{{"prompts": [[1, 5, 9], [7]], "max_new_tokens": 24, "sampling": {sampling}}}"#);
        std::fs::write(&input, body).unwrap();
        let args = [
            "batch",
            "--model",
            "dummy:tiny",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ];
        let out = tessera(&args);
        let tokens = std::fs::read_to_string(&output).ok().map(|text| {
            let json: serde_json::Value = serde_json::from_str(&text).unwrap();
            json["outputs"].as_array().unwrap().iter().map(|o| o["tokens"].clone()).collect::<Vec<_>>()
        });
        (out, tokens)
    };
    let sampling = |seed: u32| format!(r#"{{"temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": {seed}}}"#);
    let (_, a) = run("a", &sampling(3));
    let (_, b) = run("b", &sampling(3));
    let (_, c) = run("c", &sampling(4));
    assert!(a.is_some() && a == b, "{a:?} vs {b:?}");
    assert_ne!(a, c, "different seeds should sample differently");
    let (bad, tokens) = run("bad", r#"{"temperature": 0.9, "top_p": 1.5}"#);
    assert!(!bad.status.success() && tokens.is_none());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("top_p"), "{}", String::from_utf8_lossy(&bad.stderr));
}

#[test]
fn plan_mistral_large_2() {
    let text = stdout_of(&["plan", "--model", "dummy:mistral-large-2", "--tp", "8", "--gpu-mem", "80GiB"]);
    assert!(text.contains("352.0 KiB whole model"), "{text}");
    assert!(text.contains("44.0 KiB per rank"), "{text}");
    let out = tessera(&["plan", "--model", "dummy:mistral-large-2", "--tp", "1", "--gpu-mem", "80GiB"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("raise --tp"));
}

#[test]
fn pull_prints_cached_path() {
    let path = stdout_of(&["pull"]);
    assert!(path.trim().ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"), "{path}");
    assert!(std::path::Path::new(path.trim()).is_file());
}

#[test]
fn bench_engine_reports_roofline() {
    let args = [
        "bench",
        "engine",
        "--model",
        "dummy:tiny",
        "--batch",
        "2",
        "--prompt-len",
        "16",
        "--gen-len",
        "8",
        "--runs",
        "2",
    ];
    let text = stdout_of(&[&args[..], &["--bandwidth-mib", "64", "--threads", "2"]].concat());
    for needle in [
        "prefill",
        "decode",
        "weights read per step",
        "read bandwidth",
        "around each run",
        "decode / roofline",
        "thread round trip",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    assert!(!text.contains("between decode steps"), "{text}");
    // Each run on a line of its own, with its own readings.
    assert_eq!(text.matches(" ns: ").count(), 2, "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("each run ")).count(), 1, "{text}");
    // f32 weights are judged against the FMA peak only.
    assert!(text.contains("f32 FMA peak") && !text.contains("int16 dot peak"), "{text}");
    let text = stdout_of(&[&args[..], &["--bandwidth-mib", "64", "--probe-between-steps", "--threads", "1"]].concat());
    assert_eq!(text.matches("between its steps").count(), 1, "{text}");
    assert!(text.contains("between decode steps"), "{text}");
    // One thread has no round trip to read.
    assert!(!text.contains("round trip"), "{text}");
    assert_eq!(text.matches(" of roofline").count(), 2, "{text}");
    // Q8_0 weights sit in row panels and multiply on 16-bit integer dot products where the CPU
    // has AVX-512 (F, BW, VL) and VNNI, and prefill is then judged against that rate too.
    let text = stdout_of(&[&args[..], &["--bandwidth-mib", "64", "--weights-dtype", "q8_0"]].concat());
    #[cfg(target_arch = "x86_64")]
    let vnni = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    let vnni = false;
    assert_eq!(text.contains("int16 dot peak"), vnni, "{text}");
    assert_eq!(text.contains("prefill / dot peak"), vnni, "{text}");
}
