//! Child processes of this binary on loopback ports: the workers `tessera up` and the router
//! benchmarks start. Each child prints one ready line with its bound addresses, which is awaited
//! (with a timeout); stdout is drained afterwards so a child never blocks on a full pipe.
//! Invariant: a [`Children`] value stops every process it holds before it is dropped (SIGTERM,
//! then SIGKILL after the grace period), so no child outlives its parent's normal exit.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Started child processes; dropping stops them.
pub struct Children {
    children: Vec<Child>,
    grace: Duration,
}

impl Children {
    /// No children yet; `grace` is how long a child may drain after SIGTERM before SIGKILL.
    pub fn new(grace: Duration) -> Self {
        Children { children: Vec::new(), grace }
    }

    /// Starts `tessera ARGS` and waits up to `timeout` for a stdout line starting with
    /// `ready_prefix`; returns that line.
    pub fn spawn(&mut self, args: &[String], ready_prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let exe = std::env::current_exe().context("locating the tessera binary")?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting tessera {}", args.first().map_or("", String::as_str)))?;
        let Some(stdout) = child.stdout.take() else { bail!("the child has no stdout") };
        let (tx, rx) = std::sync::mpsc::channel();
        let prefix = ready_prefix.to_string();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let ready = lines.by_ref().map_while(Result::ok).find(|l| l.starts_with(&prefix));
            let _ = tx.send(ready);
            for _ in lines {}
        });
        let outcome = rx.recv_timeout(timeout);
        self.children.push(child);
        match outcome {
            Ok(Some(line)) => Ok(line),
            Ok(None) => bail!("tessera {} exited before it was ready; see its errors above", args.join(" ")),
            Err(_) => bail!("tessera {} was not ready within {}", args.join(" "), humantime::format_duration(timeout)),
        }
    }

    /// SIGTERM to every child, then wait (SIGKILL after the grace period).
    pub fn stop(&mut self) {
        for c in &self.children {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + self.grace;
        for c in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The value of `name=` in a ready line (`tessera worker ready: grpc=ADDR metrics=ADDR …`).
pub fn field(line: &str, name: &str) -> anyhow::Result<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        .map(str::to_string)
        .with_context(|| format!("no {name}= in {line:?}"))
}
