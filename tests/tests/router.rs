//! The router, black-box: real `tessera worker` processes (SmolLM2-135M) behind a real
//! `tessera router`, driven through the public `tessera.v1.Generation` API as clients would.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use std::time::Duration;

use tessera_proto::v1 as api;
use tessera_proto::v1::generation_client::GenerationClient;
use tessera_proto::worker_v1 as wpb;
use tessera_proto::worker_v1::worker_client::WorkerClient;
use tessera_tests::{RouterProcess, WorkerProcess, http_get};
use tonic::Code;
use tonic::transport::Channel;

async fn client(r: &RouterProcess) -> GenerationClient<Channel> {
    GenerationClient::connect(r.grpc_url.clone()).await.unwrap()
}

fn kv_index(r: &RouterProcess) -> serde_json::Value {
    serde_json::from_str(&r.kv_index()).unwrap()
}

fn addr(w: &WorkerProcess) -> String {
    w.grpc_url.trim_start_matches("http://").to_string()
}

fn greedy(max_tokens: u32) -> Option<api::SamplingParams> {
    Some(api::SamplingParams { temperature: Some(0.0), max_tokens, ignore_eos: true, ..Default::default() })
}

fn text_request(text: &str, max_tokens: u32) -> api::GenerateRequest {
    api::GenerateRequest {
        prompt: Some(api::generate_request::Prompt::Text(text.into())),
        sampling: greedy(max_tokens),
        return_token_ids: true,
        ..Default::default()
    }
}

/// A long shared "system prompt" plus a per-request suffix.
fn shared_prefix_prompt(i: usize) -> String {
    let system = "You are a meticulous assistant for the Tessera project. ".repeat(20);
    format!("{system}Question number {i}: what is {i} plus {i}?")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_routing_sends_shared_prefixes_to_the_worker_that_holds_them_and_a_late_router_agrees() {
    let workers = [WorkerProcess::start(&["--kv-memory", "64MiB"]), WorkerProcess::start(&["--kv-memory", "64MiB"])];
    let addrs: Vec<String> = workers.iter().map(addr).collect();
    let router = RouterProcess::start(&["--worker", &addrs[0], "--worker", &addrs[1], "--policy", "kv"]);
    assert!(router.wait_healthy(2, Duration::from_secs(30)));
    let mut c = client(&router).await;

    // The first request computes the prefix somewhere; every later one must find it cached.
    let mut cached = Vec::new();
    for i in 0..4 {
        let r = c.generate(text_request(&shared_prefix_prompt(i), 2)).await.unwrap().into_inner();
        let u = r.usage.unwrap();
        assert_eq!(r.completions.len(), 1);
        assert_eq!(r.completions[0].token_ids.len(), 2);
        cached.push((u.prompt_tokens, u.cached_prompt_tokens));
    }
    let (prompt, _) = cached[0];
    assert!(prompt > 200, "prompt of {prompt} tokens");
    for (i, (p, hit)) in cached.iter().enumerate().skip(1) {
        // All full blocks of the shared system prompt (the suffix differs).
        assert!(*hit >= p - 32, "request {i}: {hit} of {p} prompt tokens cached: {cached:?}");
    }

    // A second router started late builds the same exact index from snapshots.
    let late = RouterProcess::start(&["--worker", &addrs[0], "--worker", &addrs[1]]);
    assert!(late.wait_healthy(2, Duration::from_secs(30)));
    let (a, b) = (kv_index(&router), kv_index(&late));
    let total: usize = a["workers"].as_object().unwrap().values().map(|v| v.as_array().unwrap().len()).sum();
    assert!(total >= 12, "the index holds {total} blocks: {a}");
    assert_eq!(a, b, "late router's index differs");

    let metrics = http_get(&router.http_addr, "/metrics").unwrap().1;
    // By policy, view and reason: the first request found no prefix anywhere, the others did.
    assert!(
        metrics.contains("tessera_router_routed_total{mode=\"exact\",policy=\"kv\",reason=\"no_prefix\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tessera_router_routed_total{mode=\"exact\",policy=\"kv\",reason=\"prefix_hit\"} 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_and_bad_input_through_the_router() {
    let worker = WorkerProcess::start(&["--kv-memory", "64MiB"]);
    let router = RouterProcess::start(&["--worker", &addr(&worker)]);
    assert!(router.wait_healthy(1, Duration::from_secs(30)));
    let mut c = client(&router).await;

    let chat = api::ChatRequest {
        messages: vec![api::ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
            ..Default::default()
        }],
        sampling: Some(api::SamplingParams { temperature: Some(0.0), max_tokens: 24, ..Default::default() }),
        ..Default::default()
    };
    let r = c.chat(chat.clone()).await.unwrap().into_inner();
    let answer = r.choices[0].message.as_ref().unwrap().content.clone();
    assert!(answer.contains("Paris"), "{answer:?}");
    assert_eq!(r.choices[0].finish_reason, api::FinishReason::Stop as i32);

    // Streaming gives the same text, in deltas, with usage last.
    let mut stream = c.chat_stream(chat).await.unwrap().into_inner();
    let (mut text, mut usage, mut deltas) = (String::new(), None, 0);
    while let Some(m) = stream.message().await.unwrap() {
        text.push_str(&m.content);
        deltas += 1;
        if m.usage.is_some() {
            usage = m.usage;
        }
    }
    assert_eq!(text, answer);
    assert!(deltas > 3);
    assert!(usage.unwrap().completion_tokens > 3);

    // Stop strings end the stream without the stop text.
    let mut req = text_request("Once upon a time", 40);
    req.sampling.as_mut().unwrap().stop = vec![" the".into()];
    let r = c.generate(req).await.unwrap().into_inner();
    assert_eq!(r.completions[0].matched_stop, " the");
    assert!(!r.completions[0].text.contains(" the"));
    // With n = 2 each sample stops on its own; the router stops the first on the worker while
    // its sibling is still open (the worker's `Aborted` end for it is dropped, not an error).
    let mut req = text_request("Once upon a time", 40);
    let sampling = req.sampling.as_mut().unwrap();
    sampling.stop = vec![" the".into()];
    sampling.n = 2;
    let two = c.generate(req).await.unwrap().into_inner();
    assert_eq!(two.completions.len(), 2);
    for done in &two.completions {
        assert_eq!(done.matched_stop, " the");
        assert_eq!(done.text, r.completions[0].text);
    }

    // Bad input: the right code and the field named.
    let cases: Vec<(api::GenerateRequest, Code, &str)> = vec![
        (api::GenerateRequest { model: "gpt-9".into(), ..text_request("x", 1) }, Code::NotFound, "model"),
        (api::GenerateRequest { prompt: None, ..text_request("x", 1) }, Code::InvalidArgument, "prompt"),
        (text_request("x", 1_000_000), Code::InvalidArgument, "sampling.max_tokens"),
        (
            api::GenerateRequest {
                prompt: Some(api::generate_request::Prompt::TokenIds(api::TokenIds { ids: vec![1, 999_999] })),
                ..text_request("", 1)
            },
            Code::InvalidArgument,
            "prompt",
        ),
        (
            api::GenerateRequest {
                sampling: Some(api::SamplingParams { top_p: Some(1.5), ..Default::default() }),
                ..text_request("x", 1)
            },
            Code::InvalidArgument,
            "sampling.top_p",
        ),
        (
            api::GenerateRequest {
                response_format: Some(api::ResponseFormat {
                    format: Some(api::response_format::Format::JsonSchema(api::JsonSchema {
                        name: "s".into(),
                        schema_json: "{not json".into(),
                    })),
                }),
                ..text_request("x", 1)
            },
            Code::InvalidArgument,
            "response_format.json_schema",
        ),
        (text_request(&"word ".repeat(9000), 1), Code::InvalidArgument, "prompt"),
    ];
    for (req, code, field) in cases {
        let err = c.generate(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{field}: {err:?}");
        assert!(err.message().starts_with(field), "{field}: {}", err.message());
    }
    let bad_tool = api::ChatRequest {
        messages: vec![api::ChatMessage { role: "user".into(), content: "hi".into(), ..Default::default() }],
        tools: vec![api::Tool { name: "f".into(), parameters_json: "{oops".into(), ..Default::default() }],
        ..Default::default()
    };
    let err = c.chat(bad_tool).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("tools[0].parameters_json"), "{}", err.message());
    let not_a_schema = api::ChatRequest {
        messages: vec![api::ChatMessage { role: "user".into(), content: "hi".into(), ..Default::default() }],
        tools: vec![api::Tool { name: "f".into(), parameters_json: r#"{"type": 12}"#.into(), ..Default::default() }],
        ..Default::default()
    };
    let err = c.chat(not_a_schema).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("not a valid JSON Schema"), "{}", err.message());

    // Tools are validated and handed to the template; a chat with tools runs.
    let weather = api::Tool {
        name: "get_weather".into(),
        description: "Current weather in a city".into(),
        parameters_json: r#"{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}"#.into(),
    };
    let messages = vec![api::ChatMessage {
        role: "user".into(),
        content: "What's the weather in Paris?".into(),
        ..Default::default()
    }];
    let t = c
        .tokenize(api::TokenizeRequest {
            model: String::new(),
            input: Some(api::tokenize_request::Input::Messages(api::ChatMessages {
                messages: messages.clone(),
                tools: vec![weather.clone()],
            })),
        })
        .await
        .unwrap()
        .into_inner();
    // SmolLM2's template ignores `tools` (as in transformers); the request is still valid.
    assert!(t.text.contains("What's the weather in Paris?"), "{}", t.text);
    let with_tools = api::ChatRequest {
        messages,
        tools: vec![weather],
        sampling: Some(api::SamplingParams { temperature: Some(0.0), max_tokens: 40, ..Default::default() }),
        ..Default::default()
    };
    let r = c.chat(with_tools).await.unwrap().into_inner();
    let choice = &r.choices[0];
    let msg = choice.message.as_ref().unwrap();
    if msg.tool_calls.is_empty() {
        assert_ne!(choice.finish_reason, api::FinishReason::ToolCalls as i32);
    } else {
        assert_eq!(choice.finish_reason, api::FinishReason::ToolCalls as i32);
        assert!(msg.tool_calls.iter().all(|c| c.name == "get_weather" && c.arguments_json.starts_with('{')));
    }

    let bad_role = api::ChatRequest {
        messages: vec![api::ChatMessage { role: "wizard".into(), content: "hi".into(), ..Default::default() }],
        ..Default::default()
    };
    assert_eq!(c.chat(bad_role).await.unwrap_err().code(), Code::InvalidArgument);

    // A short deadline ends a long generation, and the worker request is aborted with it
    // (tonic clients report their own timer as CANCELLED; the router passes the deadline on).
    let mut short = tonic::Request::new(text_request("Once upon a time", 1000));
    short.set_timeout(Duration::from_millis(300));
    let err = c.generate(short).await.unwrap_err();
    assert!(matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled), "{err:?}");
    wait_idle(&worker).await;

    // A client that drops its stream aborts the worker request.
    let mut stream = c.generate_stream(text_request("Once upon a time", 1000)).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    drop(stream);
    wait_idle(&worker).await;

    // Tokenize agrees with what Generate counted.
    let t = c
        .tokenize(api::TokenizeRequest {
            model: String::new(),
            input: Some(api::tokenize_request::Input::Text("Once upon a time".into())),
        })
        .await
        .unwrap()
        .into_inner();
    let g = c.generate(text_request("Once upon a time", 1)).await.unwrap().into_inner();
    assert_eq!(t.token_ids.len() as u32, g.usage.unwrap().prompt_tokens);
    assert_eq!(t.max_context, 8192);
}

/// Waits until `worker` runs nothing and owns no KV blocks.
async fn wait_idle(worker: &WorkerProcess) {
    let mut wc = WorkerClient::connect(worker.grpc_url.clone()).await.unwrap();
    for _ in 0..100 {
        let load = wc.get_load(wpb::GetLoadRequest {}).await.unwrap().into_inner();
        if load.running_sequences == 0 && load.waiting_sequences == 0 && load.kv_blocks_used == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the worker still runs a request its client gave up on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_tokenizer_is_refused() {
    // stories260K has its own tokenizer: a SmolLM2 router must never route to it.
    let model = tessera_tests::shared_models().join("stories260K");
    let worker = WorkerProcess::start(&["--model", model.to_str().unwrap(), "--kv-memory", "16MiB"]);
    let router = RouterProcess::start(&["--worker", &addr(&worker)]);
    let mut refused = false;
    for _ in 0..100 {
        let m = http_get(&router.http_addr, "/metrics").unwrap().1;
        if m.contains("tessera_router_workers_refused_total 1") {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "the mismatched worker was not refused");
    let mut c = client(&router).await;
    let err = c.generate(text_request("hello", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(http_get(&router.http_addr, "/readyz").unwrap().0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_drains_on_sigterm_finishing_what_runs_and_refusing_readiness() {
    let model = tessera_tests::shared_models().join("stories260K");
    let model = model.to_str().unwrap();
    let worker = WorkerProcess::start(&["--model", model, "--kv-memory", "16MiB"]);
    let mut router = RouterProcess::start(&["--model", model, "--worker", &addr(&worker), "--drain-timeout", "30s"]);
    assert!(router.wait_healthy(1, Duration::from_secs(30)));
    assert_eq!(http_get(&router.http_addr, "/readyz").unwrap().0, 200);
    let mut c = client(&router).await;
    let request = api::GenerateRequest {
        prompt: Some(api::generate_request::Prompt::Text("Once upon a time".into())),
        sampling: greedy(400),
        return_token_ids: true,
        ..Default::default()
    };
    let mut stream = c.generate_stream(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    router.terminate();
    // Not ready at once, so load balancers stop sending here…
    let signalled = std::time::Instant::now();
    while http_get(&router.http_addr, "/readyz").map(|r| r.0).unwrap_or(503) != 503 {
        assert!(signalled.elapsed() < Duration::from_secs(2), "still ready after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // …while the stream in flight runs to its end…
    let mut tokens = first.token_ids.len();
    let mut finish = first.finish_reason;
    while let Some(msg) = stream.message().await.unwrap() {
        tokens += msg.token_ids.len();
        finish = msg.finish_reason;
    }
    assert_eq!((tokens, finish), (400, api::FinishReason::Length as i32));
    // …and then the router exits cleanly.
    let status = router.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}");
}
