//! The cluster over etcd, black-box: real etcd, real `tessera worker` processes registering
//! under leases, real `tessera router` processes watching them; clients on the public API.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use std::time::{Duration, Instant};

use tessera_proto::v1 as api;
use tessera_proto::v1::generation_client::GenerationClient;
use tessera_tests::{EtcdProcess, RouterProcess, WorkerProcess};
use tonic::transport::Channel;

async fn client(r: &RouterProcess) -> GenerationClient<Channel> {
    GenerationClient::connect(r.grpc_url.clone()).await.unwrap()
}

fn request(i: usize, max_tokens: u32) -> api::GenerateRequest {
    let system = "You are the Tessera cluster's test assistant. Answer briefly. ".repeat(12);
    api::GenerateRequest {
        prompt: Some(api::generate_request::Prompt::Text(format!("{system}Request {i}."))),
        sampling: Some(api::SamplingParams {
            temperature: Some(0.0),
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Sends `n` requests one after another; every one must succeed.
async fn all_succeed(c: &mut GenerationClient<Channel>, from: usize, n: usize) {
    for i in from..from + n {
        let r = c.generate(request(i, 2)).await.unwrap_or_else(|e| panic!("request {i} failed: {e:?}"));
        assert_eq!(r.into_inner().completions[0].finish_reason, api::FinishReason::Length as i32);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_come_and_go_through_etcd_without_failing_requests() {
    let Some(mut etcd) = EtcdProcess::start() else { return };
    let ep = etcd.endpoint();
    let common = ["--etcd", ep.as_str(), "--lease-ttl", "2s", "--kv-memory", "64MiB"];
    let mut a = WorkerProcess::start(&[&common[..], &["--worker-id", "a"]].concat());
    let mut b = WorkerProcess::start(&[&common[..], &["--worker-id", "b", "--drain-timeout", "60s"]].concat());
    let c_worker = WorkerProcess::start(&[&common[..], &["--worker-id", "c"]].concat());
    let router = RouterProcess::start(&["--etcd", &ep]);
    assert!(router.wait_healthy(3, Duration::from_secs(30)), "router did not find 3 workers in etcd");
    let mut c = client(&router).await;
    all_succeed(&mut c, 0, 6).await;

    // A late second router builds the same exact index from the workers' snapshots.
    let late = RouterProcess::start(&["--etcd", &ep]);
    assert!(late.wait_healthy(3, Duration::from_secs(30)));
    assert_eq!(router.kv_index(), late.kv_index(), "the late router's index differs");

    // etcd restarts while requests flow: nobody fails, and the workers are still routable after.
    let mut flowing = client(&router).await;
    let load = tokio::spawn(async move { all_succeed(&mut flowing, 100, 12).await });
    etcd.restart();
    load.await.unwrap();
    assert!(router.wait_healthy(3, Duration::from_secs(10)));

    // SIGTERM: the worker leaves discovery at once and still finishes its in-flight stream.
    let mut to_b = tessera_proto::worker_v1::worker_client::WorkerClient::connect(b.grpc_url.clone()).await.unwrap();
    let mut stream = to_b
        .generate(tessera_proto::worker_v1::GenerateRequest {
            prompt: vec![1, 2, 3, 4],
            max_tokens: 120,
            ignore_eos: true,
            sampling: Some(tessera_proto::worker_v1::SamplingParams::default()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap();
    b.terminate();
    let gone = Instant::now();
    assert!(router.wait_healthy(2, Duration::from_secs(1)), "a draining worker stayed routable");
    assert!(gone.elapsed() < Duration::from_secs(1));
    let mut last = None;
    while let Some(m) = stream.message().await.unwrap() {
        last = Some(m.finish_reason);
    }
    assert_eq!(last, Some(tessera_proto::worker_v1::FinishReason::Length as i32));
    assert!(b.wait_exit(Duration::from_secs(30)).is_some_and(|s| s.success()));
    all_succeed(&mut c, 200, 4).await;

    // kill -9: the worker leaves routing within the lease TTL, and requests keep succeeding.
    a.kill_hard();
    let killed = Instant::now();
    assert!(router.wait_healthy(1, Duration::from_secs(3)), "a killed worker stayed routable");
    assert!(killed.elapsed() <= Duration::from_secs(3));
    all_succeed(&mut c, 300, 4).await;
    drop(c_worker);
}
