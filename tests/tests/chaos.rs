//! Chaos with real processes: a worker killed with `kill -9` while 100 greedy streams run through
//! the router costs the clients nothing — no error, and every output identical to a fault-free
//! run — because the router migrates each interrupted stream to another worker, which resumes
//! after the tokens already streamed. etcd killed for 30 s under load fails no request, and
//! discovery recovers when it returns. A worker cut off by the network (nft drops its packets)
//! leaves routing within twice the keep-alive interval and its streams migrate. At five times the
//! admitted load, every refusal is RESOURCE_EXHAUSTED, admitted requests keep their latency, and
//! memory stays bounded.

#![expect(clippy::unwrap_used, reason = "test helpers: a failed unwrap is a failed test")]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tessera_proto::v1 as api;
use tessera_proto::v1::generation_client::GenerationClient;
use tessera_tests::{EtcdProcess, RouterProcess, WorkerProcess, shared_models};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const STREAMS: usize = 100;
const MAX_TOKENS: u32 = 160;

fn request(i: usize) -> api::GenerateRequest {
    let prompt =
        format!("Once upon a time, a little {} named Tim number {i} went to the", ["dog", "girl", "bird"][i % 3]);
    api::GenerateRequest {
        prompt: Some(api::generate_request::Prompt::Text(prompt)),
        sampling: Some(api::SamplingParams {
            temperature: Some(0.0),
            max_tokens: MAX_TOKENS,
            ignore_eos: true,
            ..Default::default()
        }),
        return_token_ids: true,
        ..Default::default()
    }
}

/// Streams request `i` to the end; returns its token ids and text, counting tokens in `seen`.
async fn stream(mut c: GenerationClient<Channel>, i: usize, seen: Arc<AtomicUsize>) -> StreamOutcome {
    let mut s = c.generate_stream(request(i)).await.map_err(|e| format!("request {i}: {e}"))?.into_inner();
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(msg) = s.next().await {
        let msg = msg.map_err(|e| format!("request {i} after {} tokens: {e}", ids.len()))?;
        seen.fetch_add(msg.token_ids.len(), Ordering::Relaxed);
        ids.extend(msg.token_ids);
        text.push_str(&msg.text);
    }
    Ok((ids, text))
}

/// Starts every stream, counting their tokens in `seen`.
async fn run_all(
    c: &GenerationClient<Channel>,
    seen: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<StreamOutcome>> {
    (0..STREAMS).map(|i| tokio::spawn(stream(c.clone(), i, seen.clone()))).collect()
}

/// One stream's outcome: its token ids and text, or the client-visible error.
type StreamOutcome = Result<(Vec<u32>, String), String>;

/// The fault-free outputs of the streams.
async fn reference_outputs(c: &GenerationClient<Channel>) -> Vec<(Vec<u32>, String)> {
    let seen = Arc::new(AtomicUsize::new(0));
    let mut reference = Vec::new();
    for h in run_all(c, &seen).await {
        reference.push(h.await.unwrap().unwrap());
    }
    assert!(reference.iter().all(|(ids, _)| ids.len() == MAX_TOKENS as usize));
    reference
}

/// Starts the streams again; returns once a tenth of their tokens have arrived.
async fn streams_a_tenth_through(
    c: &GenerationClient<Channel>,
) -> (Vec<tokio::task::JoinHandle<StreamOutcome>>, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let handles = run_all(c, &seen).await;
    while seen.load(Ordering::Relaxed) < STREAMS * MAX_TOKENS as usize / 10 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (handles, seen)
}

/// The worker running the most sequences right now (the fault must hit streams).
fn busiest(workers: &[WorkerProcess]) -> usize {
    let running = |w: &WorkerProcess| {
        let (_, text) = w.http_get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix("tessera_worker_running_sequences "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (0..workers.len()).max_by(|&a, &b| running(&workers[a]).total_cmp(&running(&workers[b]))).unwrap()
}

/// Waits for every stream; each that ends must equal the fault-free run. Returns the
/// client-visible errors.
async fn finish_like(
    handles: Vec<tokio::task::JoinHandle<StreamOutcome>>,
    reference: &[(Vec<u32>, String)],
) -> Vec<String> {
    let mut errors = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        match h.await.unwrap() {
            Ok(out) => assert_eq!(out, reference[i], "request {i}: output differs from the fault-free run"),
            Err(e) => errors.push(e),
        }
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_worker_mid_stream_loses_nothing() {
    let model = shared_models().join("stories260K");
    let model = model.to_str().unwrap();
    let mut workers: Vec<WorkerProcess> =
        (0..3).map(|_| WorkerProcess::start(&["--model", model, "--kv-memory", "32MiB"])).collect();
    let mut args = vec!["--model", model];
    let addrs: Vec<String> = workers.iter().map(|w| w.grpc_url.trim_start_matches("http://").to_string()).collect();
    for a in &addrs {
        args.extend(["--worker", a.as_str()]);
    }
    let router = RouterProcess::start(&args);
    assert!(router.wait_healthy(3, Duration::from_secs(30)));
    let c = GenerationClient::connect(router.grpc_url.clone()).await.unwrap();

    // The fault-free reference; then again, and `kill -9` the busiest worker once a tenth of the
    // tokens have streamed.
    let reference = reference_outputs(&c).await;
    let (handles, seen) = streams_a_tenth_through(&c).await;
    let victim = busiest(&workers);
    workers[victim].kill_hard();
    let killed_at = seen.load(Ordering::Relaxed);
    let total = STREAMS * MAX_TOKENS as usize;
    let errors = finish_like(handles, &reference).await;
    let migrations = router.metric("tessera_router_migrations_total").unwrap_or(0.0);
    let retries = router.metric("tessera_router_retries_total").unwrap_or(0.0);
    eprintln!(
        "killed a worker after {killed_at} of {total} tokens: {} client errors, {migrations} migrations, {retries} retries",
        errors.len()
    );
    assert!(errors.is_empty(), "client-visible errors: {errors:#?}");
    assert!(migrations > 0.0, "the kill hit no stream in flight: the test proved nothing");

    // The router's metrics, with retries and migrations counted, are valid Prometheus text.
    let (_, text) = tessera_tests::http_get(&router.http_addr, "/metrics").unwrap();
    assert!(text.contains("tessera_router_migrations_total"));
    tessera_tests::assert_promtool_clean(&text);

    // Every series the Grafana dashboard plots exists on the router or the workers.
    let mut all = text;
    for (i, w) in workers.iter().enumerate() {
        if i != victim {
            all.push_str(&w.http_get("/metrics").1);
        }
    }
    let dashboard =
        std::fs::read_to_string(tessera_tests::workspace_root().join("deploy/grafana/tessera-dashboard.json")).unwrap();
    let mut plotted: Vec<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("tessera_"))
        .collect();
    plotted.sort_unstable();
    plotted.dedup();
    assert!(plotted.len() >= 15, "{plotted:?}");
    for name in plotted {
        assert!(all.lines().any(|l| l.starts_with(name)), "the dashboard plots {name}, which no process exports");
    }
}

/// How long etcd stays dead in [`etcd_down_for_30_seconds_fails_no_request`].
const ETCD_OUTAGE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_for_30_seconds_fails_no_request() {
    let Some(mut etcd) = EtcdProcess::start() else { return };
    let model = shared_models().join("stories260K");
    let model = model.to_str().unwrap();
    let ep = etcd.endpoint();
    let worker = |id: &str| {
        WorkerProcess::start(&[
            "--model",
            model,
            "--kv-memory",
            "16MiB",
            "--etcd",
            &ep,
            "--lease-ttl",
            "3s",
            "--worker-id",
            id,
        ])
    };
    let _workers = [worker("w0"), worker("w1")];
    let router = RouterProcess::start(&["--model", model, "--etcd", &ep]);
    assert!(router.wait_healthy(2, Duration::from_secs(30)));
    let c = GenerationClient::connect(router.grpc_url.clone()).await.unwrap();

    // Requests flow, one after another, through the whole outage and after it.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (mut c, stop) = (c.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, Vec::new());
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let mut r = request(i);
                r.sampling.as_mut().unwrap().max_tokens = 8;
                match c.generate(r).await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("request {i}: {e}")),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    etcd.kill();
    let killed = Instant::now();
    tokio::time::sleep(ETCD_OUTAGE).await;
    // A worker that starts during the outage cannot register until etcd returns.
    let late = worker("w-late");
    etcd.restart();
    let back = Instant::now();
    assert!(router.wait_healthy(3, Duration::from_secs(20)), "discovery did not recover after the outage");
    let recovered = back.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    eprintln!(
        "etcd down {:?}: {ok} requests succeeded, {} failed; the late worker was routable {recovered:?} after etcd returned",
        back - killed,
        failed.len()
    );
    assert!(failed.is_empty(), "requests failed during the etcd outage: {failed:#?}");
    assert!(ok > 100, "too few requests ran through the outage: {ok}");
    drop(late);
}

/// Requests the router admits at once in [`overload_is_refused_cleanly_and_admitted_requests_keep_their_latency`].
const CAPACITY: usize = 8;

/// `clients` closed-loop clients for `duration`: each sends a short greedy request, waits for it,
/// and after a refusal waits 20 ms (a client honouring Retry-After). Returns the admitted
/// requests' latencies, the refusals, and any other error.
async fn closed_loop(
    c: &GenerationClient<Channel>,
    clients: usize,
    duration: Duration,
) -> (Vec<Duration>, usize, Vec<String>) {
    let until = Instant::now() + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|k| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let (mut latencies, mut refused, mut errors) = (Vec::new(), 0, Vec::new());
                let mut i = k * 100_000;
                while Instant::now() < until {
                    let mut r = request(i);
                    if let Some(s) = r.sampling.as_mut() {
                        s.max_tokens = 24;
                    }
                    let sent = Instant::now();
                    match c.generate(r).await {
                        Ok(_) => latencies.push(sent.elapsed()),
                        Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => errors.push(format!("{:?}: {}", e.code(), e.message())),
                    }
                    i += 1;
                }
                (latencies, refused, errors)
            })
        })
        .collect();
    let (mut latencies, mut refused, mut errors) = (Vec::new(), 0, Vec::new());
    for t in tasks {
        let (l, r, e) = t.await.unwrap();
        latencies.extend(l);
        refused += r;
        errors.extend(e);
    }
    latencies.sort_unstable();
    (latencies, refused, errors)
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_cleanly_and_admitted_requests_keep_their_latency() {
    let model = shared_models().join("stories260K");
    let model = model.to_str().unwrap();
    let workers: Vec<WorkerProcess> =
        (0..2).map(|_| WorkerProcess::start(&["--model", model, "--kv-memory", "16MiB"])).collect();
    let mut args = vec!["--model".to_string(), model.to_string(), "--max-in-flight".into(), CAPACITY.to_string()];
    for w in &workers {
        args.extend(["--worker".into(), w.grpc_url.trim_start_matches("http://").to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let router = RouterProcess::start(&args);
    assert!(router.wait_healthy(2, Duration::from_secs(30)));
    let c = GenerationClient::connect(router.grpc_url.clone()).await.unwrap();
    let pids: Vec<u32> = std::iter::once(router.pid()).chain(workers.iter().map(WorkerProcess::pid)).collect();
    let memory = || pids.iter().map(|&p| tessera_tests::resident_bytes(p).unwrap_or(0)).sum::<u64>();

    // Warm-up, one client alone (for the record), then the reference: exactly as many clients as
    // the router admits, none refused.
    closed_loop(&c, CAPACITY, Duration::from_secs(1)).await;
    let (alone, _, _) = closed_loop(&c, 1, Duration::from_secs(2)).await;
    let (at_capacity, refused, errors) = closed_loop(&c, CAPACITY, Duration::from_secs(4)).await;
    assert!(errors.is_empty() && refused == 0, "at capacity: {refused} refused, errors {errors:?}");
    let before = memory();

    // Five times as many clients.
    let (admitted, refused, errors) = closed_loop(&c, 5 * CAPACITY, Duration::from_secs(4)).await;
    let after = memory();
    let (base, loaded) = (p99(&at_capacity), p99(&admitted));
    eprintln!(
        "one client: p99 {:?}; at capacity: {} requests, p99 {base:?}; at 5×: {} admitted, p99 {loaded:?} ({:.2}×), \
         {refused} refused; resident memory {} → {} MiB",
        p99(&alone),
        at_capacity.len(),
        admitted.len(),
        loaded.as_secs_f64() / base.as_secs_f64(),
        before >> 20,
        after >> 20
    );
    assert!(errors.is_empty(), "errors other than RESOURCE_EXHAUSTED: {errors:?}");
    assert!(refused > 0, "5× capacity was never refused: the test proved nothing");
    assert!(loaded <= base * 2, "admitted p99 {loaded:?} is over twice the p99 at capacity {base:?}");
    assert!(after <= before + (64 << 20), "memory grew from {before} to {after} bytes under overload");
}

/// Keep-alive interval of the router's worker connections in the partition test.
const KEEPALIVE: Duration = Duration::from_secs(1);

/// Every packet to or from one loopback TCP port dropped (an nft table of its own), until dropped.
struct Partition {
    /// The command that runs nft: `nft`, or `sudo -n nft` when not root (as `scripts/test.sh`
    /// installs packages).
    nft: Vec<String>,
    table: String,
}

impl Partition {
    /// Cuts `port` off; `None` (after saying why) where nft cannot be used here, which fails
    /// under CI (it runs as root or with sudo, as its package installs do).
    fn cut(port: u16) -> Option<Partition> {
        let Some(nft) = tessera_tests::tool("nft") else {
            tessera_tests::missing_tool("nft");
            return None;
        };
        let nft = nft.display().to_string();
        let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        let nft: Vec<String> = if root { vec![nft] } else { vec!["sudo".into(), "-n".into(), nft] };
        let table = format!("tessera_chaos_{}", std::process::id());
        let rules = format!(
            "table inet {table} {{\n  chain output {{\n    type filter hook output priority 0; policy accept;\n    \
             tcp dport {port} drop\n    tcp sport {port} drop\n  }}\n}}\n"
        );
        let out = tessera_tests::run_with_stdin(
            std::process::Command::new(&nft[0]).args(&nft[1..]).args(["-f", "-"]),
            &rules,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let privilege =
                stderr.contains("Operation not permitted") || stderr.contains("password") || stderr.contains("sudo");
            assert!(privilege, "nft failed on\n{rules}{stderr}");
            assert!(
                std::env::var_os("CI").is_none(),
                "the partition test needs root or passwordless sudo: {}",
                stderr.trim()
            );
            eprintln!("note: nft needs root here ({}); the partition test was not run", stderr.trim());
            return None;
        }
        Some(Partition { nft, table })
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.nft[0])
            .args(&self.nft[1..])
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_by_the_network_leaves_routing_and_its_streams_migrate() {
    let model = shared_models().join("stories260K");
    let model = model.to_str().unwrap();
    let workers: Vec<WorkerProcess> =
        (0..3).map(|_| WorkerProcess::start(&["--model", model, "--kv-memory", "32MiB"])).collect();
    let keepalive = format!("{}ms", KEEPALIVE.as_millis());
    let mut args = vec!["--model".to_string(), model.to_string(), "--worker-keepalive".into(), keepalive];
    let addrs: Vec<String> = workers.iter().map(|w| w.grpc_url.trim_start_matches("http://").to_string()).collect();
    for a in &addrs {
        args.extend(["--worker".into(), a.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let router = RouterProcess::start(&args);
    assert!(router.wait_healthy(3, Duration::from_secs(30)));
    let c = GenerationClient::connect(router.grpc_url.clone()).await.unwrap();

    let reference = reference_outputs(&c).await;
    let (handles, _) = streams_a_tenth_through(&c).await;
    let victim = busiest(&workers);
    let port: u16 = addrs[victim].rsplit(':').next().unwrap().parse().unwrap();
    let Some(partition) = Partition::cut(port) else {
        for h in handles {
            let _ = h.await;
        }
        return;
    };
    let cut = Instant::now();
    // Out of routing: the router's own count of routable workers drops to 2.
    while router.metric("tessera_router_workers_healthy") != Some(2.0) {
        assert!(cut.elapsed() < Duration::from_secs(10), "the cut-off worker stayed routable");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = cut.elapsed();
    let errors = finish_like(handles, &reference).await;
    drop(partition);
    let migrations = router.metric("tessera_router_migrations_total").unwrap_or(0.0);
    eprintln!(
        "worker {victim} cut off: out of routing after {left:?} (keep-alive {KEEPALIVE:?}); {} client errors, {migrations} migrations",
        errors.len()
    );
    assert!(errors.is_empty(), "client-visible errors: {errors:#?}");
    assert!(migrations > 0.0, "the partition hit no stream in flight: the test proved nothing");
    assert!(left <= 2 * KEEPALIVE, "out of routing only after {left:?}, over twice the keep-alive interval");
}
