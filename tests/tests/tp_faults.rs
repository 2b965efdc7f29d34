//! Group failure handling with real processes and a real etcd: a `tessera worker --tp 2` whose
//! rank 1 panics, hangs or fails mid-generation leaves discovery within 2 s of noticing, ends
//! its in-flight streams with UNAVAILABLE, and exits non-zero within `--collective-timeout` + 2 s
//! of the fault; it never hangs. Fault injection itself is refused without the opt-in variable.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use std::time::{Duration, Instant};

use tessera_proto::etcd_v3 as etcd;
use tessera_proto::registry::worker_key;
use tessera_proto::worker_v1 as pb;
use tessera_proto::worker_v1::worker_client::WorkerClient;
use tessera_tests::{EtcdProcess, WorkerProcess, shared_models, tessera};
use tokio_stream::StreamExt;

const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// The forward pass at which rank 1 fails: well into the streams (step 1 is their prefill).
const FAULT_STEP: u32 = 150;

async fn registered(endpoint: &str, key: &str) -> bool {
    let mut kv = etcd::kv_client::KvClient::connect(endpoint.to_string()).await.unwrap();
    let r = kv.range(etcd::RangeRequest { key: key.as_bytes().to_vec(), ..Default::default() }).await.unwrap();
    !r.into_inner().kvs.is_empty()
}

/// How one stream ended: tokens received, the time of the last one, and its final status.
struct StreamEnd {
    tokens: usize,
    last_token: Instant,
    error: Option<tonic::Status>,
    ended: Instant,
}

async fn run_stream(mut client: WorkerClient<tonic::transport::Channel>, seed: u32) -> StreamEnd {
    let request = pb::GenerateRequest {
        prompt: (0..8).map(|i| 10 + (seed * 31 + i * 17) % 400).collect(),
        max_tokens: 400,
        sampling: Some(pb::SamplingParams { temperature: 0.0, ..Default::default() }),
        ignore_eos: true,
        ..Default::default()
    };
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let (mut tokens, mut last_token) = (0, Instant::now());
    loop {
        match stream.next().await {
            Some(Ok(msg)) => {
                tokens += msg.tokens.len();
                last_token = Instant::now();
            }
            Some(Err(status)) => return StreamEnd { tokens, last_token, error: Some(status), ended: Instant::now() },
            None => return StreamEnd { tokens, last_token, error: None, ended: Instant::now() },
        }
    }
}

async fn check_fault(kind: &str) {
    let Some(etcd) = EtcdProcess::start() else { return };
    let model = shared_models().join("stories260K");
    let worker_id = format!("w-tp-{kind}");
    let fault = format!("rank=1,step={FAULT_STEP},kind={kind}");
    let timeout = format!("{}s", COLLECTIVE_TIMEOUT.as_secs());
    let mut w = WorkerProcess::start_with_env(
        &[
            "--model",
            model.to_str().unwrap(),
            "--tp",
            "2",
            "--collective-timeout",
            &timeout,
            "--fault-inject",
            &fault,
            "--etcd",
            &etcd.endpoint(),
            "--worker-id",
            &worker_id,
        ],
        &[("TESSERA_ALLOW_FAULT_INJECTION", "1")],
    );
    let key = worker_key(model.to_str().unwrap(), &worker_id);
    let endpoint = etcd.endpoint();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !registered(&endpoint, &key).await {
        assert!(Instant::now() < deadline, "{kind}: the worker never registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Two streams in flight when the fault hits.
    let client = WorkerClient::connect(w.grpc_url.clone()).await.unwrap();
    let streams: Vec<_> = (0..2).map(|i| tokio::spawn(run_stream(client.clone(), i))).collect();

    // Discovery: watch for the key to go, in parallel with the streams.
    let gone = tokio::spawn(async move {
        while registered(&endpoint, &key).await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Instant::now()
    });
    let mut ends = Vec::new();
    for s in streams {
        ends.push(
            tokio::time::timeout(Duration::from_secs(30), s).await.unwrap_or_else(|_| panic!("a stream hung")).unwrap(),
        );
    }
    let gone = tokio::time::timeout(Duration::from_secs(15), gone)
        .await
        .unwrap_or_else(|_| panic!("never left discovery"))
        .unwrap();
    let fault_seen = ends.iter().map(|e| e.last_token).max().unwrap();
    let status = w
        .wait_exit(COLLECTIVE_TIMEOUT + Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{kind}: the worker did not exit"));
    let exited = Instant::now();

    for (i, e) in ends.iter().enumerate() {
        let error = e.error.as_ref().unwrap_or_else(|| panic!("{kind}: stream {i} ended without an error"));
        assert_eq!(error.code(), tonic::Code::Unavailable, "{kind}: stream {i}: {error:?}");
        assert!(error.message().contains("tensor-parallel group failed"), "{kind}: {}", error.message());
        assert!(e.tokens > 0 && e.tokens < 400, "{kind}: stream {i} got {} tokens", e.tokens);
    }
    let noticed = ends.iter().map(|e| e.ended).min().unwrap();
    assert!(!status.success(), "{kind}: the worker exited with {status}");
    let to_leave = gone.saturating_duration_since(noticed);
    let to_exit = exited.saturating_duration_since(fault_seen);
    eprintln!(
        "{kind}: streams failed {:?} after the last token; out of discovery {to_leave:?} after that; \
         exited ({status}) {to_exit:?} after the last token",
        noticed - fault_seen
    );
    assert!(to_leave < Duration::from_secs(2), "{kind}: left discovery {to_leave:?} after the failure");
    // `wait_exit` polls every 50 ms.
    assert!(to_exit < COLLECTIVE_TIMEOUT + Duration::from_secs(2), "{kind}: exited {to_exit:?} after the fault");
    if kind != "hang" {
        // Nothing to wait for: a panic or an error is noticed at once.
        assert!(gone.saturating_duration_since(fault_seen) < Duration::from_secs(2));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_rank_fails_the_group_and_the_worker_exits() {
    check_fault("panic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_rank_is_caught_by_the_collective_timeout() {
    check_fault("hang").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rank_fails_the_group_and_the_worker_exits() {
    check_fault("error").await;
}

#[test]
fn fault_injection_is_refused_without_the_opt_in() {
    let out =
        tessera(&["generate", "--model", "dummy:tiny", "--fault-inject", "rank=0,step=1,kind=panic", "--prompt", "x"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TESSERA_ALLOW_FAULT_INJECTION=1"), "{stderr}");
}
