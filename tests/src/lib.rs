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
