//! The router's public API as a generic gRPC client sees it: `grpcurl` (installed by
//! `scripts/test.sh`) once through server reflection, once given nothing but
//! `proto/tessera/v1/generation.proto` (no reflection, no generated Rust code). Both must list,
//! describe and call `tessera.v1.Generation`, and both must see the same answers.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tessera_tests::{RouterProcess, WorkerProcess, workspace_root};

/// How grpcurl learns the schema.
#[derive(Clone, Copy, Debug)]
enum Schema {
    Reflection,
    ProtoFile,
}

struct Grpcurl {
    bin: PathBuf,
    addr: String,
}

/// What one grpcurl call gave: its JSON messages (one per streamed response), or its error text.
struct Called {
    ok: bool,
    messages: Vec<Value>,
    stderr: String,
}

impl Grpcurl {
    fn command(&self, schema: Schema) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(["-plaintext", "-max-time", "60"]);
        if let Schema::ProtoFile = schema {
            let protos = workspace_root().join("proto");
            c.arg("-import-path").arg(protos).args(["-proto", "tessera/v1/generation.proto"]);
        }
        c
    }

    /// `grpcurl … ADDR VERB [SYMBOL]` (list, describe): its standard output.
    fn inspect(&self, schema: Schema, verb: &str, symbol: Option<&str>) -> String {
        let out = self.command(schema).arg(&self.addr).arg(verb).args(symbol).output().unwrap();
        assert!(
            out.status.success(),
            "grpcurl {verb} {symbol:?} ({schema:?}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Calls `method` with the JSON request `body`.
    fn call(&self, schema: Schema, method: &str, body: &Value) -> Called {
        let out = self.command(schema).arg("-d").arg(body.to_string()).arg(&self.addr).arg(method).output().unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let messages = serde_json::Deserializer::from_str(&stdout).into_iter::<Value>().map(Result::unwrap).collect();
        Called { ok: out.status.success(), messages, stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
    }

    /// Calls `method` and expects success.
    fn ok(&self, schema: Schema, method: &str, body: &Value) -> Vec<Value> {
        let c = self.call(schema, method, body);
        assert!(c.ok, "{method} ({schema:?}) failed: {}", c.stderr);
        c.messages
    }
}

fn greedy_chat(model: &str, content: &str, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "sampling": {"temperature": 0, "maxTokens": max_tokens, "ignoreEos": true},
    })
}

#[test]
fn grpcurl_lists_describes_and_calls_the_public_api_with_and_without_reflection() {
    let Some(bin) = tessera_tests::tool("grpcurl") else {
        tessera_tests::missing_tool("grpcurl");
        return;
    };
    let worker = WorkerProcess::start(&["--kv-memory", "64MiB"]);
    let router = RouterProcess::start(&["--worker", worker.grpc_url.trim_start_matches("http://")]);
    assert!(router.wait_healthy(1, Duration::from_secs(30)));
    let g = Grpcurl { bin, addr: router.grpc_url.trim_start_matches("http://").to_string() };

    // Listing and describing.
    let services = g.inspect(Schema::Reflection, "list", None);
    // Exactly what the router serves (grpcurl speaks reflection v1alpha, so that is the one it
    // lists; the worker's API, also in the descriptor set, is not offered here).
    let listed: Vec<&str> = services.lines().map(str::trim).collect();
    assert_eq!(
        listed,
        ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "tessera.v1.Generation"],
        "{services}"
    );
    for schema in [Schema::Reflection, Schema::ProtoFile] {
        let methods = g.inspect(schema, "describe", Some("tessera.v1.Generation"));
        for rpc in ["Generate", "GenerateStream", "Chat", "ChatStream", "Tokenize", "ListModels"] {
            assert!(methods.contains(&format!("rpc {rpc} (")), "{schema:?}: no {rpc} in\n{methods}");
        }
    }
    let health = g.ok(Schema::Reflection, "grpc.health.v1.Health/Check", &json!({"service": "tessera.v1.Generation"}));
    assert_eq!(health[0]["status"], "SERVING");

    // The same calls, through both schemas, give the same answers.
    let mut answers = Vec::new();
    for schema in [Schema::Reflection, Schema::ProtoFile] {
        let models = g.ok(schema, "tessera.v1.Generation/ListModels", &json!({}));
        let card = &models[0]["models"][0];
        let model = card["id"].as_str().unwrap().to_string();
        assert_eq!(card["healthyWorkers"], 1, "{card}");

        let tokens = g.ok(schema, "tessera.v1.Generation/Tokenize", &json!({"model": model, "text": "Hello, world!"}));
        let ids = tokens[0]["tokenIds"].as_array().unwrap().len();
        assert!((2..=8).contains(&ids), "{tokens:?}");

        let chat = g.ok(schema, "tessera.v1.Generation/Chat", &greedy_chat(&model, "Name a colour.", 6));
        let choice = &chat[0]["choices"][0];
        assert_eq!(choice["finishReason"], "FINISH_REASON_LENGTH", "{chat:?}");
        let content = choice["message"]["content"].as_str().unwrap().to_string();
        assert!(!content.is_empty());
        let usage = &chat[0]["usage"];
        assert_eq!(usage["completionTokens"], 6, "{usage}");
        assert!(usage["promptTokens"].as_u64().unwrap() > 5, "{usage}");

        // Streaming: several messages whose text adds up to the unary answer.
        let stream = g.ok(schema, "tessera.v1.Generation/ChatStream", &greedy_chat(&model, "Name a colour.", 6));
        assert!(stream.len() >= 2, "one message for a 6-token stream: {stream:?}");
        let streamed: String = stream.iter().filter_map(|m| m["content"].as_str()).collect();
        assert_eq!(streamed, content, "{schema:?}: streamed and unary text differ");
        assert_eq!(stream.last().unwrap()["finishReason"], "FINISH_REASON_LENGTH");

        // Errors arrive as gRPC statuses grpcurl can print.
        let bad = g.call(schema, "tessera.v1.Generation/Chat", &greedy_chat("no-such-model", "Hi", 4));
        assert!(!bad.ok && bad.stderr.contains("Code: NotFound"), "{schema:?}: {}", bad.stderr);
        let bad = g.call(schema, "tessera.v1.Generation/Generate", &json!({"model": model}));
        assert!(!bad.ok && bad.stderr.contains("Code: InvalidArgument"), "{schema:?}: {}", bad.stderr);
        answers.push((ids, content));
    }
    assert_eq!(answers[0], answers[1], "reflection and proto-file clients saw different answers");
}
