//! Helpers for black-box tests: locate (and build, if needed) the `tessera` binary and run it
//! as a user would.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
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
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(tessera_bin())
            .args(["worker", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--threads", "2"])
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning tessera worker: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the ready line, then keeps draining stdout so the worker never blocks on it.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("tessera worker ready:") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("tessera worker did not become ready"));
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .to_string()
        };
        WorkerProcess { grpc_url: format!("http://{}", field("grpc=")), metrics_addr: field("metrics="), child }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (the drain signal).
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -TERM failed");
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }

    /// GETs `path` on the probe port; returns (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics_addr).unwrap_or_else(|e| panic!("connect: {e}"));
        let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.metrics_addr);
        s.write_all(request.as_bytes()).unwrap_or_else(|e| panic!("write: {e}"));
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap_or_else(|e| panic!("read: {e}"));
        let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (code, body)
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
