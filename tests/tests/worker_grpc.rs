//! The worker gRPC service, black-box: a real `tessera worker` process on SmolLM2-135M, driven
//! through the generated client as a router would.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use std::collections::HashMap;
use std::time::Duration;

use tessera_proto::worker_v1 as pb;
use tessera_proto::worker_v1::worker_client::WorkerClient;
use tessera_tests::WorkerProcess;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Status};

async fn client(w: &WorkerProcess) -> WorkerClient<Channel> {
    WorkerClient::connect(w.grpc_url.clone()).await.unwrap()
}

/// A deterministic prompt of `len` ordinary token ids.
fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| 200 + (seed.wrapping_mul(7919) + i * 104_729) % 20_000).collect()
}

fn greedy(prompt: Vec<u32>, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt,
        max_tokens,
        sampling: Some(pb::SamplingParams { temperature: 0.0, ..Default::default() }),
        ignore_eos: true,
        ..Default::default()
    }
}

struct Outcome {
    tokens: Vec<u32>,
    finish: pb::FinishReason,
    usage: pb::Usage,
}

async fn run(c: &mut WorkerClient<Channel>, r: pb::GenerateRequest) -> Result<Outcome, Status> {
    let mut stream = c.generate(r).await?.into_inner();
    let mut tokens = Vec::new();
    while let Some(msg) = stream.next().await {
        let msg = msg?;
        tokens.extend(msg.tokens.iter().map(|t| t.token_id));
        if msg.finish_reason != 0 {
            return Ok(Outcome { tokens, finish: msg.finish_reason(), usage: msg.usage.unwrap_or_default() });
        }
    }
    Err(Status::internal("stream ended without a finish reason"))
}

async fn load(c: &mut WorkerClient<Channel>) -> pb::LoadReport {
    c.get_load(pb::GetLoadRequest {}).await.unwrap().into_inner()
}

/// Polls until nothing runs and no block is owned (fails after 20 s).
async fn wait_idle(c: &mut WorkerClient<Channel>) -> pb::LoadReport {
    for _ in 0..400 {
        let l = load(c).await;
        if l.running_sequences == 0 && l.waiting_sequences == 0 && l.kv_blocks_used == 0 {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the worker did not go idle: {:?}", load(c).await);
}

fn expect_status(r: Result<Outcome, Status>, code: Code, field: &str) {
    match r {
        Ok(_) => panic!("expected {code:?} mentioning {field}, got success"),
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(s.message().contains(field), "message {:?} should name {field}", s.message());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_the_field_named_and_the_worker_keeps_serving() {
    let w = WorkerProcess::start(&[]);
    let mut c = client(&w).await;
    let info = c.get_info(pb::GetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.vocab_size, 49_152);
    assert_eq!(info.block_size, 16);
    assert_eq!(info.tokenizer_sha256.len(), 64);
    assert!(info.kv_blocks > 0 && info.max_context == 8192);

    let ok = || greedy(prompt(1, 8), 4);
    expect_status(run(&mut c, greedy(vec![], 4)).await, Code::InvalidArgument, "prompt");
    expect_status(run(&mut c, greedy(vec![1, 49_152], 4)).await, Code::InvalidArgument, "prompt");
    expect_status(run(&mut c, greedy(prompt(1, 8), 9000)).await, Code::InvalidArgument, "max_tokens");
    let mut r = ok();
    r.sampling = Some(pb::SamplingParams { temperature: -0.5, ..Default::default() });
    expect_status(run(&mut c, r).await, Code::InvalidArgument, "temperature");
    for top_p in [0.0, 1.5] {
        let mut r = ok();
        r.sampling = Some(pb::SamplingParams { temperature: 1.0, top_p: Some(top_p), ..Default::default() });
        expect_status(run(&mut c, r).await, Code::InvalidArgument, "top_p");
    }
    let mut r = ok();
    r.constraint = Some(pb::Constraint { kind: Some(pb::constraint::Kind::JsonSchema(r#"{"type": 12}"#.into())) });
    expect_status(run(&mut c, r).await, Code::InvalidArgument, "constraint");
    let mut r = ok();
    r.stop_token_ids = vec![60_000];
    expect_status(run(&mut c, r).await, Code::InvalidArgument, "stop_token_ids");
    let mut r = ok();
    r.n = 17;
    expect_status(run(&mut c, r).await, Code::InvalidArgument, "n:");
    let abort =
        c.abort(pb::AbortRequest { request_id: "no-such-request".into(), sample_index: None }).await.unwrap_err();
    assert_eq!(abort.code(), Code::NotFound);
    assert!(abort.message().contains("request_id"));

    // Still serving, with usage.
    let out = run(&mut c, ok()).await.unwrap();
    assert_eq!(out.tokens.len(), 4);
    assert_eq!(out.finish, pb::FinishReason::Length);
    assert_eq!((out.usage.prompt_tokens, out.usage.completion_tokens), (8, 4));
    wait_idle(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_greedy_requests_get_exactly_their_solo_tokens_and_seeds_reproduce() {
    let w = WorkerProcess::start(&[]);
    let mut c = client(&w).await;
    let requests: Vec<pb::GenerateRequest> = (0..32).map(|i| greedy(prompt(i, 6 + (i as usize % 5) * 7), 10)).collect();
    let mut alone = Vec::new();
    for r in &requests {
        alone.push(run(&mut c, r.clone()).await.unwrap().tokens);
    }
    // Same requests, all at once, in reverse order of submission.
    let handles: Vec<_> = requests
        .iter()
        .rev()
        .map(|r| {
            let (mut c, r) = (c.clone(), r.clone());
            tokio::spawn(async move { run(&mut c, r).await.unwrap().tokens })
        })
        .collect();
    let mut together = Vec::new();
    for h in handles {
        together.push(h.await.unwrap());
    }
    together.reverse();
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i}: batched tokens differ from its solo run");
    }

    // Seeded sampling: the same seed gives the same tokens alone and among other requests.
    let seeded = |seed| {
        let mut r = greedy(prompt(99, 12), 12);
        r.sampling =
            Some(pb::SamplingParams { temperature: 1.0, top_p: Some(0.95), seed: Some(seed), ..Default::default() });
        r
    };
    let solo = run(&mut c, seeded(7)).await.unwrap().tokens;
    let again = run(&mut c, seeded(7)).await.unwrap().tokens;
    assert_eq!(solo, again, "same seed, same tokens across runs");
    let mut crowd = Vec::new();
    for i in 0..8u64 {
        let (mut c, r) = (c.clone(), if i == 3 { seeded(7) } else { seeded(100 + i) });
        crowd.push(tokio::spawn(async move { run(&mut c, r).await.unwrap().tokens }));
    }
    let mut outs = Vec::new();
    for h in crowd {
        outs.push(h.await.unwrap());
    }
    assert_eq!(outs[3], solo, "same seed, same tokens inside a batch");
    assert!(outs.iter().enumerate().any(|(i, o)| i != 3 && *o != solo), "other seeds sample differently");
    wait_idle(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborting_one_sample_stops_it_and_leaves_its_siblings_running() {
    let w = WorkerProcess::start(&[]);
    let mut c = client(&w).await;
    let mut r = greedy(prompt(9, 24), 300);
    r.request_id = "two-samples".into();
    r.n = 2;
    let mut stream = c.generate(r).await.unwrap().into_inner();
    stream.next().await.unwrap().unwrap();
    c.abort(pb::AbortRequest { request_id: "two-samples".into(), sample_index: Some(0) }).await.unwrap();
    // A sample index the request does not have is NOT_FOUND, and names the field.
    let missing = c.abort(pb::AbortRequest { request_id: "two-samples".into(), sample_index: Some(5) }).await;
    let status = missing.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().starts_with("sample_index"), "{status:?}");
    let (mut tokens, mut finish) = ([0usize; 2], [None; 2]);
    while let Some(msg) = stream.next().await {
        let msg = msg.unwrap();
        let i = msg.index as usize;
        assert!(finish[i].is_none(), "sample {i} sent after its end");
        tokens[i] += msg.tokens.len();
        if msg.finish_reason != 0 {
            finish[i] = Some(msg.finish_reason());
        }
    }
    assert_eq!(finish, [Some(pb::FinishReason::Aborted), Some(pb::FinishReason::Length)]);
    assert_eq!(tokens[1], 300, "the sibling runs to its own end");
    assert!(tokens[0] < 300, "the stopped sample ended early ({} tokens)", tokens[0]);
    wait_idle(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_streams_and_aborts_free_their_blocks_and_kv_events_track_the_cache() {
    let w = WorkerProcess::start(&[]);
    let mut c = client(&w).await;

    // Subscribe first: a snapshot (empty), then live events.
    let mut events = c.subscribe_kv_events(pb::SubscribeKvEventsRequest { from_seq: 0 }).await.unwrap().into_inner();
    let first = events.next().await.unwrap().unwrap();
    let Some(pb::kv_events_message::Body::Snapshot(snap)) = first.body else { panic!("expected a snapshot first") };
    assert_eq!(snap.block_size, 16);
    let mut replica: HashMap<u64, (Option<u64>, Vec<u32>)> =
        snap.blocks.iter().map(|b| (b.hash, (b.parent, b.tokens.clone()))).collect();
    let mut seq = snap.seq;

    // A client that drops its stream after the first token: the request is aborted, blocks freed.
    let mut stream = c.generate(greedy(prompt(5, 40), 400)).await.unwrap().into_inner();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    wait_idle(&mut c).await;

    // Abort by id: the stream ends with ABORTED.
    let mut r = greedy(prompt(6, 40), 400);
    r.request_id = "abort-me".into();
    let mut stream = c.generate(r).await.unwrap().into_inner();
    stream.next().await.unwrap().unwrap();
    c.abort(pb::AbortRequest { request_id: "abort-me".into(), sample_index: None }).await.unwrap();
    let mut finish = None;
    while let Some(msg) = stream.next().await {
        let msg = msg.unwrap();
        if msg.finish_reason != 0 {
            finish = Some(msg.finish_reason());
        }
    }
    assert_eq!(finish, Some(pb::FinishReason::Aborted));
    let idle = wait_idle(&mut c).await;

    // Every block the worker keeps cached arrived as events, numbered without gaps.
    let target = idle.kv_event_seq;
    assert!(target > 0, "prefix blocks should have been stored");
    while seq < target {
        let msg = tokio::time::timeout(Duration::from_secs(10), events.next()).await.unwrap().unwrap().unwrap();
        match msg.body {
            Some(pb::kv_events_message::Body::Events(batch)) => {
                for e in batch.events {
                    assert_eq!(e.seq, seq + 1, "gap in the event stream");
                    seq = e.seq;
                    match e.kind.unwrap() {
                        pb::kv_event::Kind::Stored(b) => {
                            assert_eq!(b.tokens.len(), 16);
                            replica.insert(b.hash, (b.parent, b.tokens));
                        }
                        pb::kv_event::Kind::Removed(b) => {
                            replica.remove(&b.hash);
                        }
                        pb::kv_event::Kind::Cleared(_) => replica.clear(),
                    }
                }
            }
            Some(pb::kv_events_message::Body::Load(_)) => {}
            other => panic!("unexpected message {other:?}"),
        }
    }
    // Load reports are interleaved with the events: new activity produces one.
    run(&mut c, greedy(prompt(7, 4), 2)).await.unwrap();
    let report = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), events.next()).await.unwrap().unwrap().unwrap();
        match msg.body {
            Some(pb::kv_events_message::Body::Load(report)) => break report,
            Some(pb::kv_events_message::Body::Events(batch)) => {
                for e in batch.events {
                    assert_eq!(e.seq, seq + 1, "gap in the event stream");
                    seq = e.seq;
                    if let Some(pb::kv_event::Kind::Stored(b)) = e.kind {
                        replica.insert(b.hash, (b.parent, b.tokens));
                    }
                }
            }
            other => panic!("unexpected message {other:?}"),
        }
    };
    assert_eq!(report.kv_blocks_total, c.get_info(pb::GetInfoRequest {}).await.unwrap().into_inner().kv_blocks);
    wait_idle(&mut c).await;

    // A late subscriber's snapshot equals the replica built from the stream.
    let mut late = c.subscribe_kv_events(pb::SubscribeKvEventsRequest { from_seq: 0 }).await.unwrap().into_inner();
    let Some(pb::kv_events_message::Body::Snapshot(snap)) = late.next().await.unwrap().unwrap().body else {
        panic!("expected a snapshot")
    };
    assert_eq!(snap.seq, seq);
    let late_view: HashMap<u64, (Option<u64>, Vec<u32>)> =
        snap.blocks.iter().map(|b| (b.hash, (b.parent, b.tokens.clone()))).collect();
    assert_eq!(late_view, replica);
    assert!(replica.len() >= 4, "both prompts' full blocks are cached");
    // Resuming from a number still held replays instead of sending a snapshot.
    let mut resumed = c.subscribe_kv_events(pb::SubscribeKvEventsRequest { from_seq: 1 }).await.unwrap().into_inner();
    let Some(pb::kv_events_message::Body::Events(batch)) = resumed.next().await.unwrap().unwrap().body else {
        panic!("expected a replay")
    };
    assert_eq!(batch.events.first().map(|e| e.seq), Some(1));
    assert_eq!(batch.events.last().map(|e| e.seq), Some(seq));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prefix_is_served_from_the_cache() {
    let w = WorkerProcess::start(&[]);
    let mut c = client(&w).await;
    let shared = prompt(11, 1024);
    let mut a = shared.clone();
    a.extend(prompt(12, 10));
    let mut b = shared.clone();
    b.extend(prompt(13, 10));
    let first = run(&mut c, greedy(a, 2)).await.unwrap();
    assert_eq!(first.usage.cached_prompt_tokens, 0);
    let second = run(&mut c, greedy(b, 2)).await.unwrap();
    assert!(second.usage.cached_prompt_tokens >= 1008, "cached {}", second.usage.cached_prompt_tokens);
    assert_eq!(second.usage.cached_prompt_tokens, 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams_and_exits_cleanly() {
    let mut w = WorkerProcess::start(&["--drain-timeout", "60s"]);
    let mut c = client(&w).await;
    let mut stream = c.generate(greedy(prompt(3, 10), 40)).await.unwrap().into_inner();
    let mut tokens = stream.next().await.unwrap().unwrap().tokens.len();
    w.terminate();
    // Not ready any more, but the in-flight stream runs to its end.
    let mut finish = None;
    while let Some(msg) = stream.next().await {
        let msg = msg.unwrap();
        tokens += msg.tokens.len();
        if msg.finish_reason != 0 {
            finish = Some(msg.finish_reason());
        }
    }
    assert_eq!(finish, Some(pb::FinishReason::Length));
    assert_eq!(tokens, 40);
    let status = w.wait_exit(Duration::from_secs(30)).expect("the worker should exit after draining");
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics() {
    let w = WorkerProcess::start(&[]);
    let mut c = client(&w).await;
    assert_eq!(w.http_get("/livez").0, 200);
    assert_eq!(w.http_get("/readyz").0, 200);
    run(&mut c, greedy(prompt(4, 20), 3)).await.unwrap();
    let (code, text) = w.http_get("/metrics");
    assert_eq!(code, 200);
    for name in [
        "tessera_worker_samples_finished_total{reason=\"length\"} 1",
        "tessera_worker_prompt_tokens_total 20",
        "tessera_worker_time_to_first_token_seconds_count 1",
        "tessera_worker_kv_blocks ",
    ] {
        assert!(text.contains(name), "missing {name:?} in\n{text}");
    }
    tessera_tests::assert_promtool_clean(&text);
    // Health and reflection, as grpcurl sees them.
    match tessera_tests::tool("grpcurl") {
        Some(grpcurl) => {
            let addr = w.grpc_url.trim_start_matches("http://");
            let out = std::process::Command::new(&grpcurl).args(["-plaintext", addr, "list"]).output().unwrap();
            let list = String::from_utf8_lossy(&out.stdout);
            assert!(list.contains("tessera.worker.v1.Worker") && list.contains("grpc.health.v1.Health"), "{list}");
            let out = std::process::Command::new(&grpcurl)
                .args([
                    "-plaintext",
                    "-d",
                    "{\"service\":\"tessera.worker.v1.Worker\"}",
                    addr,
                    "grpc.health.v1.Health/Check",
                ])
                .output()
                .unwrap();
            assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));
        }
        None => tessera_tests::missing_tool("grpcurl"),
    }
}
