//! One GPU: its context and stream, and the kernels compiled for its architecture.
//!
//! Kernel sources are `kernels/cuda/*.cu`, each compiled with `prelude.cuh` prepended by NVRTC
//! for the device's compute capability (e.g. `compute_90` on Hopper; the driver turns the PTX
//! into `sm_90` code when loading it). The PTX is cached on disk under
//! `<cache>/cuda-kernels/<hash>.ptx`, the hash covering the source, the architecture and the
//! compile options, so an edited kernel or another GPU never reuses a stale build.
//!
//! On compute capability 9.0 and later, kernels written for it (the GEMV) are launched to
//! overlap the end of the kernel before them (programmatic dependent launch), once a probe at
//! open has shown the driver runs such launches eagerly and in captured graphs; otherwise every
//! launch is a plain one and [`GpuDevice::launch_overlap`] says why.

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::libs::{self, CudaLibraries};
use super::{CudaError, guard};

const PRELUDE: &str = include_str!("../../cuda/prelude.cuh");

/// Kernel sources, by file.
const SOURCES: &[(&str, &str)] = &[
    ("embedding.cu", include_str!("../../cuda/embedding.cu")),
    ("norm.cu", include_str!("../../cuda/norm.cu")),
    ("rope.cu", include_str!("../../cuda/rope.cu")),
    ("activation.cu", include_str!("../../cuda/activation.cu")),
    ("attention.cu", include_str!("../../cuda/attention.cu")),
    ("flash_attention.cu", include_str!("../../cuda/flash_attention.cu")),
    ("gemv.cu", include_str!("../../cuda/gemv.cu")),
    ("sampling.cu", include_str!("../../cuda/sampling.cu")),
];

/// A hash of every kernel source (with the prelude): measurements that depend on the kernels,
/// such as the backend's tuning record, are keyed by it so that an edited kernel is re-measured.
pub fn kernel_sources_hash() -> u64 {
    let all: String = std::iter::once(PRELUDE).chain(SOURCES.iter().map(|(_, src)| *src)).collect();
    xxhash_rust::xxh3::xxh3_64(all.as_bytes())
}

/// How to open a device.
#[derive(Debug, Clone)]
pub struct GpuOptions {
    /// Device ordinal.
    pub device: usize,
    /// Folders searched first for the CUDA libraries.
    pub lib_dirs: Vec<PathBuf>,
    /// Where compiled kernels are cached.
    pub cache_dir: PathBuf,
}

/// Every kernel function, loaded.
pub struct Kernels {
    pub(crate) embedding_gather: CudaFunction,
    pub(crate) add_rmsnorm: CudaFunction,
    pub(crate) gather_rows: CudaFunction,
    pub(crate) rope_kv_write: CudaFunction,
    pub(crate) silu_mul: CudaFunction,
    pub(crate) paged_attention: CudaFunction,
    pub(crate) flash_attention: CudaFunction,
    pub(crate) gemv_bf16: CudaFunction,
    pub(crate) sample_rows: CudaFunction,
    pub(crate) bf16_rows_to_f32: CudaFunction,
}

/// An opened GPU.
pub struct GpuDevice {
    // The stream and the modules hold the context alive.
    stream: Arc<CudaStream>,
    name: String,
    compute_capability: (i32, i32),
    sm_count: usize,
    pub(crate) kernels: Kernels,
    libs: CudaLibraries,
    /// Whether kernels that allow it are launched to overlap the kernel before them (see
    /// [`GpuDevice::launch_overlapping`]), and if not, why.
    overlap: Result<(), String>,
}

fn arch_option(cc: (i32, i32)) -> Result<&'static str, CudaError> {
    Ok(match cc {
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (major, minor) => {
            return Err(CudaError::Driver(format!(
                "compute capability {major}.{minor} is not supported (need 8.0, 8.6, 8.7, 8.9, 9.0, 10.0 or 12.0)"
            )));
        }
    })
}

fn compile_cached(file: &'static str, source: &str, arch: &'static str, cache: &Path) -> Result<Ptx, CudaError> {
    let full = format!("{PRELUDE}\n{source}");
    let options = vec!["--std=c++17".to_string()];
    let key = xxhash_rust::xxh3::xxh3_64(format!("{arch}\n{options:?}\n{full}").as_bytes());
    let path = cache.join(format!("{}-{key:016x}.ptx", file.trim_end_matches(".cu")));
    if let Ok(ptx) = std::fs::read_to_string(&path) {
        return Ok(Ptx::from_src(ptx));
    }
    let opts = CompileOptions { arch: Some(arch), options, name: Some(file.to_string()), ..Default::default() };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(&full, opts)
        .map_err(|e| CudaError::Compile { file, log: format!("{e:?}") })?;
    // Best effort: a cache that cannot be written only costs a recompile next time.
    if std::fs::create_dir_all(cache).is_ok() {
        let tmp = path.with_extension(format!("ptx.{}", std::process::id()));
        if std::fs::write(&tmp, ptx.to_src()).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(ptx)
}

impl GpuDevice {
    /// Loads the libraries, opens device `options.device`, and compiles (or loads from the cache)
    /// every kernel.
    pub fn open(options: &GpuOptions) -> Result<Self, CudaError> {
        let libs = libs::load(&options.lib_dirs)?;
        guard(|| {
            let ctx = CudaContext::new(options.device)?;
            // A stream of our own: the legacy default stream cannot be captured into a graph.
            let stream = ctx.new_stream()?;
            // SAFETY: every operation of this device is queued on this one stream, so stream
            // order alone orders all reads and writes; cudarc's cross-stream events are not needed.
            unsafe { ctx.disable_event_tracking() };
            let name = ctx.name()?;
            let compute_capability = ctx.compute_capability()?;
            let sm_count = ctx
                .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
                as usize;
            let arch = arch_option(compute_capability)?;
            let cache = options.cache_dir.join("cuda-kernels");
            let mut modules: Vec<(&str, Arc<CudaModule>)> = Vec::new();
            for (file, source) in SOURCES {
                let ptx = compile_cached(file, source, arch, &cache)?;
                modules.push((file, ctx.load_module(ptx)?));
            }
            let f = |file: &str, name: &str| -> Result<CudaFunction, CudaError> {
                let module = modules
                    .iter()
                    .find(|(f, _)| *f == file)
                    .map(|(_, m)| m)
                    .ok_or_else(|| CudaError::Driver(format!("no module {file}")))?;
                module.load_function(name).map_err(|e| CudaError::Driver(format!("{file}: {name}: {e}")))
            };
            let kernels = Kernels {
                embedding_gather: f("embedding.cu", "embedding_gather")?,
                add_rmsnorm: f("norm.cu", "add_rmsnorm")?,
                gather_rows: f("norm.cu", "gather_rows")?,
                rope_kv_write: f("rope.cu", "rope_kv_write")?,
                silu_mul: f("activation.cu", "silu_mul")?,
                paged_attention: f("attention.cu", "paged_attention")?,
                flash_attention: f("flash_attention.cu", "flash_attention")?,
                gemv_bf16: f("gemv.cu", "gemv_bf16")?,
                sample_rows: f("sampling.cu", "sample_rows")?,
                bf16_rows_to_f32: f("sampling.cu", "bf16_rows_to_f32")?,
            };
            let mut dev = GpuDevice { stream, name, compute_capability, sm_count, kernels, libs, overlap: Ok(()) };
            dev.overlap = if compute_capability.0 < 9 {
                Err(format!(
                    "needs compute capability 9.0, this GPU has {}.{}",
                    compute_capability.0, compute_capability.1
                ))
            } else {
                // Should the driver refuse such launches, eagerly or in a captured graph, run
                // without them rather than fail every step.
                dev.probe_overlapping_launches().map_err(|e| format!("probe failed: {e}"))
            };
            Ok(dev)
        })
    }

    /// Runs two overlapping GEMV launches eagerly and the same two captured into a graph.
    fn probe_overlapping_launches(&self) -> Result<(), CudaError> {
        let s = &self.stream;
        let (x, w, mut y) = (s.alloc_zeros::<half::bf16>(8)?, s.alloc_zeros::<half::bf16>(8)?, s.alloc_zeros(1)?);
        let twice = |y: &mut cudarc::driver::CudaSlice<half::bf16>| -> Result<(), CudaError> {
            self.gemv(&x, &w, y, 1, 1, 8)?;
            self.gemv(&x, &w, y, 1, 1, 8)
        };
        twice(&mut y)?;
        let graph = self.capture(|| twice(&mut y))??;
        graph.launch()?;
        self.synchronize()
    }

    /// "on", or why kernels are not launched to overlap the kernel before them.
    pub fn launch_overlap(&self) -> String {
        match &self.overlap {
            Ok(()) => "on".into(),
            Err(why) => format!("off ({why})"),
        }
    }

    /// The stream every operation is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// "NVIDIA H100 80GB HBM3 (sm_90)".
    pub fn describe(&self) -> String {
        format!("{} (sm_{}{})", self.name, self.compute_capability.0, self.compute_capability.1)
    }

    /// The loaded libraries.
    pub fn libraries(&self) -> &CudaLibraries {
        &self.libs
    }

    /// Whether kernels can be launched to overlap the end of the kernel before them
    /// (programmatic dependent launch, compute capability 9.0 and later).
    pub(crate) fn overlaps_launches(&self) -> bool {
        self.overlap.is_ok()
    }

    /// Queues `function` on this device's stream with programmatic stream serialization: it may
    /// start before the kernel ahead of it has finished, once that kernel's blocks have all
    /// called `grid_dependents_launch()` or exited (see `prelude.cuh`).
    ///
    /// # Safety
    /// `params` holds one pointer per kernel parameter, in order, each to a value of exactly the
    /// parameter's type, alive for the call; the kernel calls `grid_dependency_wait()` before it
    /// reads what earlier kernels write or writes anything; and [`Self::overlaps_launches`].
    pub(crate) unsafe fn launch_overlapping(
        &self,
        function: &CudaFunction,
        config: LaunchConfig,
        params: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        use cudarc::driver::sys;
        // SAFETY: the attribute value is a plain C union; zero is a valid value of every member
        // and the member set below is the one the attribute id selects.
        let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attribute = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let launch = sys::CUlaunchConfig {
            gridDimX: config.grid_dim.0,
            gridDimY: config.grid_dim.1,
            gridDimZ: config.grid_dim.2,
            blockDimX: config.block_dim.0,
            blockDimY: config.block_dim.1,
            blockDimZ: config.block_dim.2,
            sharedMemBytes: config.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attribute,
            numAttrs: 1,
        };
        self.stream.context().bind_to_thread()?;
        // SAFETY: `launch` and `attribute` outlive the call; the parameters are the caller's
        // promise; the function belongs to this device's context.
        unsafe {
            sys::cuLaunchKernelEx(&launch, function.cu_function(), params.as_mut_ptr(), std::ptr::null_mut())
                .result()?
        };
        Ok(())
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        guard(|| Ok(self.stream.synchronize()?))
    }

    /// Device time of `calls` calls of `enqueue(i)`, `i` in `0..calls`, in microseconds per
    /// call: the launches are queued between two timing events and the stream is waited on.
    pub fn time_us(
        &self,
        calls: usize,
        mut enqueue: impl FnMut(usize) -> Result<(), CudaError>,
    ) -> Result<f64, CudaError> {
        use cudarc::driver::sys::CUevent_flags;
        let ctx = self.stream.context();
        let (start, end) = guard(|| {
            Ok((
                ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?,
                ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?,
            ))
        })?;
        guard(|| Ok(start.record(&self.stream)?))?;
        for i in 0..calls {
            enqueue(i)?;
        }
        guard(|| {
            end.record(&self.stream)?;
            Ok(f64::from(start.elapsed_ms(&end)?) * 1e3 / calls.max(1) as f64)
        })
    }
}

/// A captured sequence of launches, replayed as one.
pub struct Graph(cudarc::driver::CudaGraph);

// SAFETY: a CUDA graph exec may be launched from any thread as long as launches of the same
// exec are not concurrent; `Graph` is only launched through `&mut`-exclusive owners (the backend
// that captured it), and the driver objects carry no thread affinity.
unsafe impl Send for Graph {}

impl Graph {
    /// Replays the graph on the stream it was captured from.
    pub fn launch(&self) -> Result<(), CudaError> {
        guard(|| Ok(self.0.launch()?))
    }
}

impl GpuDevice {
    /// Records everything `enqueue` queues on this device's stream into a graph instead of
    /// running it. The capture is ended whatever `enqueue` returns.
    pub fn capture<E>(&self, enqueue: impl FnOnce() -> Result<(), E>) -> Result<Result<Graph, CudaError>, E> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let begun =
            guard(|| Ok(self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?));
        if let Err(e) = begun {
            return Ok(Err(e));
        }
        let queued = enqueue();
        let ended = guard(|| {
            self.stream
                .end_capture(CUgraphInstantiate_flags(0))?
                .map(Graph)
                .ok_or_else(|| CudaError::Driver("stream capture produced no graph".into()))
        });
        queued?;
        Ok(ended)
    }
}
