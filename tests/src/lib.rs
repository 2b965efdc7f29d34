//! Helpers for black-box tests: locate (and build, if needed) the `tessera` binary and run it
//! as a user would; run the services it talks to (etcd) on free loopback ports.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A fresh directory under the system's temporary directory (`tessera-test-<pid>-<n>`), removed
/// with everything in it when dropped, so a test leaves nothing behind, failed or not.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates the directory.
    ///
    /// # Panics
    /// If it cannot be created.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "tessera-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The shared small models beside the checkout.
pub fn shared_models() -> PathBuf {
    workspace_root().join("../shared/models")
}

/// Path of the `tessera` binary, built with the same profile as this test (cargo does not build
/// another package's binaries for integration tests, so we ask it to; a no-op when fresh).
pub fn tessera_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // current_exe: <target>/<profile>/deps/<test-binary>
        let exe = std::env::current_exe().unwrap_or_default();
        let profile_dir = exe.parent().and_then(|d| d.parent()).map(PathBuf::from).unwrap_or_default();
        let target_dir = profile_dir.parent().map(PathBuf::from).unwrap_or_default();
        let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_string();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(workspace_root())
            .args(["build", "--quiet", "--bin", "tessera", "--target-dir"])
            .arg(&target_dir);
        if profile == "release" {
            cmd.arg("--release");
        }
        let status = cmd.status();
        assert!(status.is_ok_and(|s| s.success()), "building the tessera binary failed");
        profile_dir.join("tessera")
    })
    .clone()
}

/// Runs `tessera ARGS` to completion.
pub fn tessera(args: &[&str]) -> Output {
    Command::new(tessera_bin())
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap_or_else(|e| panic!("spawning tessera: {e}"))
}

/// The `tessera … ready: key=value …` line a process prints once it serves.
struct ReadyLine(String);

impl ReadyLine {
    /// The value after `name` (e.g. `grpc=`).
    fn field(&self, name: &str) -> String {
        let line = &self.0;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_string()
    }
}

/// Starts `tessera SUBCOMMAND FIXED ARGS` and waits up to `timeout` for its ready line; a
/// thread keeps draining its stdout afterwards so it never blocks on it.
fn spawn_until_ready(
    subcommand: &str,
    fixed: &[&str],
    args: &[&str],
    envs: &[(&str, &str)],
    timeout: std::time::Duration,
) -> (std::process::Child, ReadyLine) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(tessera_bin())
        .arg(subcommand)
        .args(fixed)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning tessera {subcommand}: {e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let (tx, rx) = std::sync::mpsc::channel();
    let ready = format!("tessera {subcommand} ready:");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with(&ready) {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx.recv_timeout(timeout).unwrap_or_else(|_| panic!("tessera {subcommand} did not become ready"));
    (child, ReadyLine(line))
}

/// A `tessera worker` process on free loopback ports, killed when dropped.
pub struct WorkerProcess {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT` of its gRPC server.
    pub grpc_url: String,
    /// `127.0.0.1:PORT` of its probe and metrics port.
    pub metrics_addr: String,
}

impl WorkerProcess {
    /// Starts `tessera worker --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 ARGS` and waits
    /// for its ready line (up to two minutes: the first start may build the binary).
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// Like [`start`](Self::start), with extra environment variables.
    pub fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let fixed = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--threads", "2"];
        let (child, ready) = spawn_until_ready("worker", &fixed, args, envs, std::time::Duration::from_secs(120));
        WorkerProcess {
            grpc_url: format!("http://{}", ready.field("grpc=")),
            metrics_addr: ready.field("metrics="),
            child,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (the drain signal).
    pub fn terminate(&self) {
        terminate(&self.child);
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        wait_exit(&mut self.child, timeout)
    }

    /// GETs `path` on the probe port; returns (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(&self.metrics_addr, path).unwrap_or_else(|e| panic!("GET {path} on {}: {e}", self.metrics_addr))
    }

    /// Sends SIGKILL (no drain, no deregistration) and reaps the process.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET of `path` on `addr` (`host:port`); returns (status code, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("finding a free port: {e}"))
}

/// A single-member etcd on free loopback ports with its data under `/dev/shm` (a temp dir where
/// there is none). It keeps its ports and data across [`EtcdProcess::stop`] /
/// [`EtcdProcess::restart`], so a test can stage an outage; dropping it kills it and removes its
/// files. Its log is `etcd.log` beside the data, shown when it fails to come up.
pub struct EtcdProcess {
    binary: PathBuf,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<std::process::Child>,
}

impl EtcdProcess {
    /// Starts etcd and waits until it is healthy; `None` (after [`missing_tool`]) when etcd is
    /// not installed.
    pub fn start() -> Option<Self> {
        let Some(binary) = tool("etcd") else {
            missing_tool("etcd");
            return None;
        };
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let shm = PathBuf::from("/dev/shm");
        let base = if shm.is_dir() { shm } else { std::env::temp_dir() };
        let dir = base.join(format!("tessera-etcd-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let mut etcd = EtcdProcess { binary, dir, client_port: free_port(), peer_port: free_port(), child: None };
        etcd.spawn();
        Some(etcd)
    }

    /// The client URL (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops it with SIGTERM (SIGKILL after 10 s) and waits for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills it with SIGKILL and waits for the exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again (stopping it first if it runs) on the same ports and data, and waits
    /// until it is healthy.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn spawn(&mut self) {
        let (client, peer) =
            (format!("http://127.0.0.1:{}", self.client_port), format!("http://127.0.0.1:{}", self.peer_port));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .unwrap_or_else(|e| panic!("opening the etcd log: {e}"));
        let child = Command::new(&self.binary)
            .args(["--name", "tessera-test", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("tessera-test={peer}"), "--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", self.binary.display()));
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.client_port);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Ok((200, body)) = http_get(&addr, "/health")
                && body.contains("\"true\"")
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("etcd exited with {status}:\n{}", self.log());
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        panic!("etcd did not become healthy within 20 s:\n{}", self.log());
    }

    /// What etcd has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A helper tool the test harness installs (`promtool`, `grpcurl`): found in the folder named by
/// `TESSERA_TEST_TOOLS`, then `.venv-tools/bin`, then `PATH`.
pub fn tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("TESSERA_TEST_TOOLS").map(PathBuf::from).into_iter().collect();
    dirs.push(workspace_root().join(".venv-tools/bin"));
    dirs.extend(std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default());
    // Administration tools (nft) live here, which a non-login PATH may lack.
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Reports a missing tool: a failure under CI (where `scripts/test.sh` installs it), a notice
/// otherwise.
pub fn missing_tool(name: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{name} is missing: scripts/test.sh installs it");
    }
    eprintln!("note: {name} not installed; that check was not run (scripts/test.sh installs it)");
}

/// Runs `cmd` with `input` on its stdin and collects its output.
pub fn run_with_stdin(cmd: &mut Command, input: &str) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).unwrap_or_else(|e| panic!("writing stdin: {e}"));
    }
    child.wait_with_output().unwrap_or_else(|e| panic!("waiting for {cmd:?}: {e}"))
}

/// A `tessera router` (or `tessera up`) process on free loopback ports, stopped when dropped.
pub struct RouterProcess {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT` of its public gRPC API.
    pub grpc_url: String,
    /// `127.0.0.1:PORT` of its HTTP port (OpenAI API, probes, metrics, debug).
    pub http_addr: String,
    /// Whether it started processes of its own (`tessera up`) that it must be let stop.
    stops_children: bool,
}

impl RouterProcess {
    /// Starts `tessera router --listen-grpc 127.0.0.1:0 --listen-http 127.0.0.1:0 ARGS` and waits
    /// for its ready line.
    pub fn start(args: &[&str]) -> Self {
        Self::spawn("router", args, &[])
    }

    /// Starts a whole local cluster, `tessera up --listen-grpc 127.0.0.1:0 --listen-http
    /// 127.0.0.1:0 ARGS`, and waits for its ready line; dropping it stops it with SIGTERM (it then
    /// stops its workers).
    pub fn start_up(args: &[&str]) -> Self {
        Self::spawn("up", args, &[])
    }

    /// Like [`start`](Self::start), with extra environment variables.
    pub fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Self {
        Self::spawn("router", args, envs)
    }

    fn spawn(subcommand: &'static str, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let fixed = ["--listen-grpc", "127.0.0.1:0", "--listen-http", "127.0.0.1:0"];
        let (child, ready) = spawn_until_ready(subcommand, &fixed, args, envs, std::time::Duration::from_secs(240));
        RouterProcess {
            grpc_url: format!("http://{}", ready.field("grpc=")),
            http_addr: ready.field("http="),
            child,
            stops_children: subcommand == "up",
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (the drain signal).
    pub fn terminate(&self) {
        terminate(&self.child);
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        wait_exit(&mut self.child, timeout)
    }

    /// The value of an unlabelled metric on `/metrics` (None when absent).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = http_get(&self.http_addr, "/metrics").ok()?;
        body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Waits up to `timeout` until exactly `n` workers are routable; false if that never happened.
    pub fn wait_healthy(&self, n: usize, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.metric("tessera_router_workers_healthy") == Some(n as f64) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }

    /// The router's exact KV index (`/debug/kv-index`, JSON text).
    pub fn kv_index(&self) -> String {
        let (code, body) = http_get(&self.http_addr, "/debug/kv-index").unwrap_or_else(|e| panic!("kv-index: {e}"));
        assert_eq!(code, 200, "kv-index: {body}");
        body
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        // `tessera up` must be let stop its workers; an exited process ignores the signal.
        if self.stops_children
            && Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().is_ok()
            && wait_exit(&mut self.child, std::time::Duration::from_secs(60)).is_some()
        {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails unless `promtool check metrics` finds `text` (a `/metrics` body) clean; skips (with a
/// note) where promtool is not installed.
pub fn assert_promtool_clean(text: &str) {
    match tool("promtool") {
        Some(promtool) => {
            let out = run_with_stdin(Command::new(promtool).args(["check", "metrics"]), text);
            let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics:\n{report}");
        }
        None => missing_tool("promtool"),
    }
}

/// Resident memory of process `pid` in bytes (Linux `/proc`), if it can be read.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Sends SIGTERM to `child`.
fn terminate(child: &std::process::Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -TERM failed");
}

/// Waits for `child` to exit, up to `timeout`.
fn wait_exit(child: &mut std::process::Child, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    None
}
