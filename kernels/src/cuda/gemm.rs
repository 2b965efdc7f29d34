//! bf16 GEMMs through cuBLASLt, with one plan (descriptors + chosen algorithm) per shape.
//!
//! `y (tokens, out) = x (tokens, in) · w (out, in)ᵀ`, bf16 in and out, f32 accumulation. Row-major
//! matrices are column-major transposes, so this is cuBLASLt's `D (out × tokens) = Wᵀ · X` with
//! `A = W` transposed. The heuristic query costs tens of microseconds, so plans are cached per
//! `(tokens, out, in)`: a decode step runs its GEMMs with no query at all. The first call of a
//! shape also times up to [`CANDIDATES`] of the heuristic's algorithms on the real operands and
//! keeps the fastest (the heuristic's first pick is often not the best for skinny decode GEMMs).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use super::{CudaError, guard};

/// cuBLASLt's recommended workspace on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// Algorithms asked of the heuristic and timed per shape.
pub const CANDIDATES: usize = 8;

/// Timed repetitions per candidate (after one warm-up).
const TUNING_REPS: usize = 5;

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are plain handles owned by this plan and used only under the `plans`
// mutex or while the owning `Gemm` is borrowed.
unsafe impl Send for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by this plan and is destroyed exactly once here.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// A cuBLASLt handle with its workspace and plan cache.
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    plans: Mutex<HashMap<(usize, usize, usize), Plan>>,
}

// SAFETY: the handle is used only through `&self` methods that enqueue on `stream`; cuBLASLt
// handles are thread-safe for concurrent use with distinct streams, and we use one stream.
unsafe impl Send for Gemm {}
// SAFETY: as above; the plan cache is behind a mutex.
unsafe impl Sync for Gemm {}

impl Drop for Gemm {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and is destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

fn set_transpose(
    desc: sys::cublasLtMatmulDesc_t,
    which: sys::cublasLtMatmulDescAttributes_t,
    t: bool,
) -> Result<(), CudaError> {
    let op: i32 = i32::from(t);
    // SAFETY: `op` outlives the call; the attribute takes a 4-byte cublasOperation_t.
    unsafe { lt::set_matmul_desc_attribute(desc, which, (&op as *const i32).cast(), 4)? };
    Ok(())
}

impl Gemm {
    /// A handle that enqueues on `stream`.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, CudaError> {
        guard(|| {
            let handle = lt::create_handle()?;
            let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES)?;
            Ok(Gemm { handle, workspace, stream, plans: Mutex::new(HashMap::new()) })
        })
    }

    /// Descriptors for a shape and the heuristic's candidate algorithms, best guess first.
    fn plan(
        &self,
        tokens: usize,
        out: usize,
        inner: usize,
    ) -> Result<(Plan, Vec<sys::cublasLtMatmulAlgo_t>), CudaError> {
        let bf = sys::cudaDataType_t::CUDA_R_16BF;
        let desc =
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)?;
        let a = lt::create_matrix_layout(bf, inner as u64, out as u64, inner as i64)?;
        let b = lt::create_matrix_layout(bf, inner as u64, tokens as u64, inner as i64)?;
        let c = lt::create_matrix_layout(bf, out as u64, tokens as u64, out as i64)?;
        let plan = Plan { desc, a, b, c, algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] } };
        set_transpose(desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, true)?;
        set_transpose(desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, false)?;
        let pref = lt::create_matmul_pref()?;
        let size = WORKSPACE_BYTES;
        // SAFETY: `size` and `results` outlive the calls; the heuristic writes at most
        // `CANDIDATES` results and reports how many in `count`.
        let (results, count) = unsafe {
            let mut results = [std::mem::zeroed::<sys::cublasLtMatmulHeuristicResult_t>(); CANDIDATES];
            let mut count: i32 = 0;
            let r = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&size as *const usize).cast(),
                std::mem::size_of::<usize>(),
            )
            .and_then(|()| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    desc,
                    a,
                    b,
                    c,
                    c,
                    pref,
                    CANDIDATES as i32,
                    results.as_mut_ptr(),
                    &mut count,
                )
                .result()
            });
            let _ = lt::destroy_matmul_pref(pref);
            r?;
            (results, count)
        };
        let algos: Vec<_> = results
            .iter()
            .take(count.max(0) as usize)
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        if algos.is_empty() {
            return Err(CudaError::Blas(format!("no cuBLASLt algorithm for {tokens}x{out}x{inner}")));
        }
        Ok((plan, algos))
    }

    /// Enqueues one GEMM with `algo` on raw pointers already checked by `matmul`.
    fn launch(&self, plan: &Plan, algo: &sys::cublasLtMatmulAlgo_t, x: u64, w: u64, y: u64) -> Result<(), CudaError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (ws, _rws) = self.workspace.device_ptr(&self.stream);
        // SAFETY: the caller checked every extent against the plan's layouts; the scalars and
        // the workspace outlive the call.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                w as *const c_void,
                plan.a,
                x as *const c_void,
                plan.b,
                y as *const c_void,
                plan.c,
                y as *mut c_void,
                plan.c,
                algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as sys::cudaStream_t,
            )?;
        }
        Ok(())
    }

    /// Times each candidate on the real operands and returns the fastest (the first candidate
    /// when only one runs at all). Synchronises the stream: call outside graph capture.
    fn tune(
        &self,
        plan: &Plan,
        algos: &[sys::cublasLtMatmulAlgo_t],
        x: u64,
        w: u64,
        y: u64,
    ) -> Result<sys::cublasLtMatmulAlgo_t, CudaError> {
        let mut best = (f64::INFINITY, algos[0]);
        for algo in algos {
            // A candidate that fails to launch is skipped, not fatal.
            if self.launch(plan, algo, x, w, y).is_err() {
                continue;
            }
            self.stream.synchronize()?;
            let start = std::time::Instant::now();
            for _ in 0..TUNING_REPS {
                self.launch(plan, algo, x, w, y)?;
            }
            self.stream.synchronize()?;
            let t = start.elapsed().as_secs_f64();
            if t < best.0 {
                best = (t, *algo);
            }
        }
        Ok(best.1)
    }

    /// `y (tokens, out) = x (tokens, inner) · w (out, inner)ᵀ`; slices may be longer than needed.
    pub fn matmul(
        &self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        y: &mut impl DevicePtrMut<bf16>,
        tokens: usize,
        out: usize,
        inner: usize,
    ) -> Result<(), CudaError> {
        if x.len() < tokens * inner || w.len() < out * inner || y.len() < tokens * out {
            return Err(CudaError::Shape {
                kernel: "gemm",
                detail: format!(
                    "x {} / w {} / y {} elements for tokens {tokens}, out {out}, inner {inner}",
                    x.len(),
                    w.len(),
                    y.len()
                ),
            });
        }
        if tokens == 0 {
            return Ok(());
        }
        guard(|| {
            let mut plans = self.plans.lock().map_err(|_| CudaError::Blas("plan cache poisoned".into()))?;
            let (xp, _rx) = x.device_ptr(&self.stream);
            let (wp, _rw) = w.device_ptr(&self.stream);
            let (yp, _ry) = y.device_ptr_mut(&self.stream);
            let key = (tokens, out, inner);
            let plan = match plans.entry(key) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let (mut plan, algos) = self.plan(tokens, out, inner)?;
                    plan.algo = if algos.len() > 1 { self.tune(&plan, &algos, xp, wp, yp)? } else { algos[0] };
                    e.insert(plan)
                }
            };
            self.launch(plan, &plan.algo, xp, wp, yp)?;
            Ok(())
        })
    }
}
