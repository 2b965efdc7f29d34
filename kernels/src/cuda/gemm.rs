//! bf16 GEMMs through cuBLASLt, with one plan (descriptors + chosen algorithm) per shape.
//!
//! `y (tokens, out) = x (tokens, in) · w (out, in)ᵀ`, bf16 in and out, f32 accumulation. Row-major
//! matrices are column-major transposes, so this is cuBLASLt's `D (out × tokens) = Wᵀ · X` with
//! `A = W` transposed. The heuristic query costs tens of microseconds, so plans are cached per
//! `(tokens, out, in)`: a decode step runs its GEMMs with no query at all.
//!
//! A plan keeps up to [`CANDIDATES`] algorithms from the heuristic, in its order, and runs the
//! first unless told otherwise ([`Gemm::choose`]): for the small-batch products of a decode
//! step the heuristic's first pick is not always the fastest, so the backend times the
//! candidates at load and records its choice by index (stable for one cuBLASLt version, device
//! and shape; [`Gemm::version`] goes into that record's key).

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

/// Most heuristic candidates a plan keeps.
pub const CANDIDATES: usize = 8;

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    /// The heuristic's algorithms, best guess first (never empty).
    candidates: Vec<sys::cublasLtMatmulAlgo_t>,
    /// Index into `candidates` of the one that runs.
    chosen: usize,
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

    fn plan(&self, tokens: usize, out: usize, inner: usize) -> Result<Plan, CudaError> {
        let bf = sys::cudaDataType_t::CUDA_R_16BF;
        let desc =
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)?;
        let a = lt::create_matrix_layout(bf, inner as u64, out as u64, inner as i64)?;
        let b = lt::create_matrix_layout(bf, inner as u64, tokens as u64, inner as i64)?;
        let c = lt::create_matrix_layout(bf, out as u64, tokens as u64, out as i64)?;
        let mut plan = Plan { desc, a, b, c, candidates: Vec::new(), chosen: 0 };
        set_transpose(desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, true)?;
        set_transpose(desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, false)?;
        let pref = lt::create_matmul_pref()?;
        let size = WORKSPACE_BYTES;
        // SAFETY: all-zero bytes are a valid value of this plain C struct (it is only read
        // where cuBLASLt filled it in).
        let mut results: [sys::cublasLtMatmulHeuristicResult_t; CANDIDATES] = unsafe { std::mem::zeroed() };
        let mut found = 0i32;
        // SAFETY: `size` outlives the call (the attribute takes a size_t); `results` has room
        // for the `CANDIDATES` results asked for and `found` receives how many were written.
        let queried = unsafe {
            let set = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&size as *const usize).cast(),
                std::mem::size_of::<usize>(),
            );
            let q = set.and_then(|()| {
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
                    &mut found,
                )
                .result()
            });
            let _ = lt::destroy_matmul_pref(pref);
            q
        };
        queried?;
        plan.candidates = results
            .iter()
            .take(found.clamp(0, CANDIDATES as i32) as usize)
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        if plan.candidates.is_empty() {
            return Err(CudaError::Blas(format!("no algorithm for a {tokens} x {out} x {inner} bf16 GEMM")));
        }
        Ok(plan)
    }

    /// cuBLASLt's version (e.g. 130100 for 13.1.0).
    pub fn version() -> usize {
        // SAFETY: a plain query of the loaded library, no arguments.
        unsafe { sys::cublasLtGetVersion() }
    }

    /// Runs `f` on the plan of `(tokens, out, inner)`, made now if there is none yet.
    fn with_plan<T>(
        &self,
        tokens: usize,
        out: usize,
        inner: usize,
        f: impl FnOnce(&mut Plan) -> Result<T, CudaError>,
    ) -> Result<T, CudaError> {
        guard(|| {
            let mut plans = self.plans.lock().map_err(|_| CudaError::Blas("plan cache poisoned".into()))?;
            let plan = match plans.entry((tokens, out, inner)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(tokens, out, inner)?),
            };
            f(plan)
        })
    }

    /// How many algorithms the plan of `(tokens, out, inner)` can choose from (at least one).
    pub fn candidates(&self, tokens: usize, out: usize, inner: usize) -> Result<usize, CudaError> {
        self.with_plan(tokens, out, inner, |plan| Ok(plan.candidates.len()))
    }

    /// Makes the plan of `(tokens, out, inner)` run its `index`-th candidate from now on.
    pub fn choose(&self, tokens: usize, out: usize, inner: usize, index: usize) -> Result<(), CudaError> {
        self.with_plan(tokens, out, inner, |plan| {
            if index >= plan.candidates.len() {
                return Err(CudaError::Blas(format!(
                    "candidate {index} of a {tokens} x {out} x {inner} GEMM: there are {}",
                    plan.candidates.len()
                )));
            }
            plan.chosen = index;
            Ok(())
        })
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
        self.with_plan(tokens, out, inner, |plan| {
            let (alpha, beta) = (1.0f32, 0.0f32);
            let (xp, _rx) = x.device_ptr(&self.stream);
            let (wp, _rw) = w.device_ptr(&self.stream);
            let (yp, _ry) = y.device_ptr_mut(&self.stream);
            let (ws, _rws) = self.workspace.device_ptr(&self.stream);
            // SAFETY: every pointer covers the extent checked above and lives until the guards
            // drop after the call; the plan's layouts describe exactly these extents.
            unsafe {
                lt::matmul(
                    self.handle,
                    plan.desc,
                    (&alpha as *const f32).cast(),
                    (&beta as *const f32).cast(),
                    wp as *const c_void,
                    plan.a,
                    xp as *const c_void,
                    plan.b,
                    yp as *const c_void,
                    plan.c,
                    yp as *mut c_void,
                    plan.c,
                    &plan.candidates[plan.chosen],
                    ws as *mut c_void,
                    WORKSPACE_BYTES,
                    self.stream.cu_stream() as sys::cudaStream_t,
                )?;
            }
            Ok(())
        })
    }
}
