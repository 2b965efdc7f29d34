//! The OpenAI-compatible HTTP API, driven by the official `openai` Python package: the suite in
//! `tests/openai/test_openai_api.py` (pytest; `scripts/test.sh` installs both into
//! `.venv-tools`) runs once against a router over one worker and once through
//! `tessera up --workers 2`, each with an API key file and small in-flight and body limits so
//! the 429 and 413 paths can be hit.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tessera_tests::{RouterProcess, TempDir, WorkerProcess, workspace_root};

const MAX_IN_FLIGHT: &str = "4";
const MAX_BODY_BYTES: &str = "262144";
const API_KEY: &str = "sk-tessera-test-key";

/// A Python that has `openai` and `pytest`, if the harness installed one.
fn python() -> Option<PathBuf> {
    let python = tessera_tests::tool("python3")?;
    let ok = Command::new(&python).args(["-c", "import openai, pytest"]).output().is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

/// A key file in `dir` holding [`API_KEY`] (and a comment and a second key, as operators write
/// them).
fn key_file(dir: &TempDir) -> PathBuf {
    let path = dir.path().join("keys");
    std::fs::write(&path, format!("# test keys\nsk-another-key\n{API_KEY}\n")).unwrap();
    path
}

/// Runs the Python suite against `router`; `dead` is a router with no reachable worker.
fn run_suite(python: &PathBuf, router: &RouterProcess, dead: &RouterProcess, model: &str) {
    let suite = workspace_root().join("tests/openai/test_openai_api.py");
    let out = Command::new(python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--color=no"])
        .arg(suite)
        .env("TESSERA_BASE_URL", format!("http://{}/v1", router.http_addr))
        .env("TESSERA_DEAD_URL", format!("http://{}/v1", dead.http_addr))
        .env("TESSERA_API_KEY", API_KEY)
        .env("TESSERA_MODEL", model)
        .env("TESSERA_MAX_IN_FLIGHT", MAX_IN_FLIGHT)
        .env("TESSERA_MAX_BODY_BYTES", MAX_BODY_BYTES)
        .output()
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{report}");
    assert!(out.status.success(), "the openai SDK suite failed:\n{report}");
}

fn limits(keys: &str) -> Vec<&str> {
    vec!["--api-key-file", keys, "--max-in-flight", MAX_IN_FLIGHT, "--max-body-bytes", MAX_BODY_BYTES]
}

#[test]
fn the_official_openai_sdk_works_against_the_router_and_through_tessera_up() {
    let Some(python) = python() else {
        tessera_tests::missing_tool("python3 with openai and pytest");
        return;
    };
    let temp = TempDir::new();
    let keys = key_file(&temp);
    let keys = keys.to_str().unwrap();
    let model = "smollm2-135m-instruct";
    let mut dead_args = vec!["--worker", "127.0.0.1:1"];
    dead_args.extend(limits(keys));
    let dead = RouterProcess::start(&dead_args);

    {
        let worker = WorkerProcess::start(&["--kv-memory", "128MiB"]);
        let mut args = vec!["--worker", worker.grpc_url.trim_start_matches("http://")];
        args.extend(limits(keys));
        let router = RouterProcess::start(&args);
        assert!(router.wait_healthy(1, Duration::from_secs(30)));
        run_suite(&python, &router, &dead, model);
    }

    let mut args = vec!["--workers", "2", "--threads", "1", "--kv-memory", "128MiB"];
    args.extend(limits(keys));
    let up = RouterProcess::start_up(&args);
    assert!(up.wait_healthy(2, Duration::from_secs(60)));
    run_suite(&python, &up, &dead, model);
}
