//! Finding and loading the CUDA libraries at run time.
//!
//! The binary links no CUDA library; `cudarc` opens them by name on first use and panics when
//! one is missing. We therefore load each one first, by full path, from the folders users
//! actually have (the `--cuda-lib-dir` overrides, `LD_LIBRARY_PATH`, the toolkit and driver
//! folders, `ldconfig`'s cache, and the pip `nvidia/*/lib` folders of any Python environment),
//! with `RTLD_GLOBAL`: the dynamic linker then satisfies cudarc's later open-by-soname with the
//! library already in memory. Invariant: after [`load`] succeeds, every library cudarc will ask
//! for is resident, so no cudarc call can fail to find one.

use std::path::{Path, PathBuf};

use super::CudaError;

/// One library we need, with the file names (sonames first) it may have.
struct Wanted {
    what: &'static str,
    names: &'static [&'static str],
    required: bool,
}

const WANTED: &[Wanted] = &[
    Wanted { what: "the CUDA driver (libcuda)", names: &["libcuda.so.1", "libcuda.so"], required: true },
    Wanted { what: "NVRTC", names: &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"], required: true },
    Wanted { what: "cuBLASLt", names: &["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"], required: true },
    Wanted { what: "NCCL", names: &["libnccl.so.2", "libnccl.so"], required: false },
];

/// The libraries held open for the life of the process.
pub struct CudaLibraries {
    found: Vec<(&'static str, PathBuf)>,
    nccl: Option<PathBuf>,
    _handles: Vec<libloading::os::unix::Library>,
}

impl CudaLibraries {
    /// What was loaded from where, for start-up logs.
    pub fn describe(&self) -> String {
        self.found.iter().map(|(what, path)| format!("{what}: {}", path.display())).collect::<Vec<_>>().join("; ")
    }

    /// Where NCCL was found, if it was.
    pub fn nccl_path(&self) -> Option<&Path> {
        self.nccl.as_deref()
    }
}

/// Folders searched, in order.
pub fn search_dirs(extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = extra.to_vec();
    if let Some(ld) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&ld));
    }
    if let Some(home) = std::env::var_os("CUDA_HOME").or_else(|| std::env::var_os("CUDA_PATH")) {
        dirs.push(PathBuf::from(home).join("lib64"));
    }
    for d in [
        "/usr/local/nvidia/lib64",
        "/usr/local/nvidia/lib",
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib/wsl/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs.extend(ldconfig_dirs());
    dirs.extend(pip_nvidia_dirs());
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| d.is_dir() && seen.insert(d.clone()));
    dirs
}

/// Folders named by `ldconfig -p` for CUDA libraries.
fn ldconfig_dirs() -> Vec<PathBuf> {
    let Ok(out) = std::process::Command::new("/sbin/ldconfig").arg("-p").output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| ["libcuda", "libnvrtc", "libcublas", "libnccl"].iter().any(|n| l.contains(n)))
        .filter_map(|l| l.rsplit("=> ").next().and_then(|p| Path::new(p.trim()).parent().map(Path::to_path_buf)))
        .collect()
}

/// `nvidia/*/lib` folders of pip-installed CUDA wheels in the usual Python environments.
fn pip_nvidia_dirs() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    let mut prefixes: Vec<PathBuf> =
        ["/usr/lib", "/usr/local/lib", "/opt/conda/lib"].iter().map(PathBuf::from).collect();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        prefixes.push(PathBuf::from(venv).join("lib"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(home).join(".local/lib"));
    }
    // Virtual environments under /opt (e.g. /opt/torch/.venv).
    if let Ok(entries) = std::fs::read_dir("/opt") {
        for e in entries.flatten() {
            prefixes.push(e.path().join(".venv/lib"));
            prefixes.push(e.path().join("lib"));
        }
    }
    for prefix in prefixes {
        let Ok(entries) = std::fs::read_dir(&prefix) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with("python3") {
                roots.push(e.path().join("site-packages/nvidia"));
                roots.push(e.path().join("dist-packages/nvidia"));
            }
        }
    }
    let mut dirs = Vec::new();
    for root in roots {
        let Ok(entries) = std::fs::read_dir(&root) else { continue };
        for e in entries.flatten() {
            dirs.push(e.path().join("lib"));
        }
    }
    dirs
}

/// Opens `path` with `RTLD_NOW | RTLD_GLOBAL`.
fn open_global(path: &Path) -> Result<libloading::os::unix::Library, libloading::Error> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading a shared library runs its initialisers; these are NVIDIA's own libraries
    // (the same ones every CUDA program loads), opened once at start-up before any CUDA call.
    unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }
}

/// Finds and loads every required library (NCCL is optional), or says which is missing and
/// where we looked.
pub fn load(extra_dirs: &[PathBuf]) -> Result<CudaLibraries, CudaError> {
    let dirs = search_dirs(extra_dirs);
    let mut found = Vec::new();
    let mut handles = Vec::new();
    let mut nccl = None;
    for wanted in WANTED {
        let mut errors = Vec::new();
        let mut loaded = None;
        'search: for dir in &dirs {
            for name in wanted.names {
                let path = dir.join(name);
                if !path.exists() {
                    continue;
                }
                match open_global(&path) {
                    Ok(h) => {
                        loaded = Some((path, h));
                        break 'search;
                    }
                    Err(e) => errors.push(format!("{}: {e}", path.display())),
                }
            }
        }
        match loaded {
            Some((path, handle)) => {
                if wanted.what == "NCCL" {
                    nccl = Some(path.clone());
                }
                if wanted.what == "NVRTC" {
                    preload_nvrtc_builtins(&path, &mut handles);
                }
                found.push((wanted.what, path));
                handles.push(handle);
            }
            None if wanted.required => {
                let searched = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
                let tried =
                    if errors.is_empty() { String::new() } else { format!(" (failed to open: {})", errors.join("; ")) };
                return Err(CudaError::LibraryNotFound {
                    what: wanted.what,
                    names: wanted.names.join(" or "),
                    searched: format!("{searched}{tried}"),
                });
            }
            None => {}
        }
    }
    Ok(CudaLibraries { found, nccl, _handles: handles })
}

/// NVRTC opens its builtins library by soname at compile time; load the one beside it.
fn preload_nvrtc_builtins(nvrtc: &Path, handles: &mut Vec<libloading::os::unix::Library>) {
    let Some(dir) = nvrtc.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("libnvrtc-builtins.so")
            && let Ok(h) = open_global(&e.path())
        {
            handles.push(h);
            return;
        }
    }
}
