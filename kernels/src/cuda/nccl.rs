//! A minimal NCCL binding: create a communicator, all-reduce, abort.
//!
//! Bound by hand over `libloading` rather than through `cudarc`'s bindings, because `cudarc`
//! opens NCCL by names that miss its real soname (`libnccl.so.2`) and panics when it does not
//! find it, and because group failure handling needs `ncclCommAbort`. Invariant: a
//! communicator is destroyed exactly once, by `abort` or on drop.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::Path;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};

use super::CudaError;

/// NCCL's opaque unique id (128 bytes), shared by every rank of a group.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    internal: [c_char; 128],
}

type NcclResult = c_int;
type Comm = *mut c_void;
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;

struct Api {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(Comm) -> NcclResult,
    comm_abort: unsafe extern "C" fn(Comm) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
}

/// One rank's communicator.
pub struct Communicator {
    api: Api,
    _lib: libloading::Library,
    comm: Option<Comm>,
    world: usize,
}

// SAFETY: an NCCL communicator may be used from any one thread at a time; `&mut self` methods
// guarantee exclusive use.
unsafe impl Send for Communicator {}

impl Api {
    fn check(&self, what: &str, r: NcclResult) -> Result<(), CudaError> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let msg = unsafe { CStr::from_ptr((self.get_error_string)(r)) }.to_string_lossy();
        Err(CudaError::Nccl(format!("{what}: {msg} (code {r})")))
    }
}

fn load(path: &Path) -> Result<(libloading::Library, Api), CudaError> {
    let err = |e: libloading::Error| CudaError::Nccl(format!("{}: {e}", path.display()));
    // SAFETY: opening NVIDIA's NCCL runs its initialisers only; symbols are looked up with
    // their documented C signatures (nccl.h, NCCL 2.x).
    unsafe {
        let lib = libloading::Library::new(path).map_err(err)?;
        let api = Api {
            get_unique_id: *lib.get(b"ncclGetUniqueId\0").map_err(err)?,
            comm_init_rank: *lib.get(b"ncclCommInitRank\0").map_err(err)?,
            all_reduce: *lib.get(b"ncclAllReduce\0").map_err(err)?,
            comm_destroy: *lib.get(b"ncclCommDestroy\0").map_err(err)?,
            comm_abort: *lib.get(b"ncclCommAbort\0").map_err(err)?,
            get_error_string: *lib.get(b"ncclGetErrorString\0").map_err(err)?,
        };
        Ok((lib, api))
    }
}

/// A fresh unique id from the NCCL at `path` (rank 0 makes it and shares it with the others).
pub fn unique_id(path: &Path) -> Result<UniqueId, CudaError> {
    let (_lib, api) = load(path)?;
    let mut id = UniqueId { internal: [0; 128] };
    // SAFETY: `id` is a valid out-pointer of the right size.
    api.check("ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut id) })?;
    Ok(id)
}

impl Communicator {
    /// Joins group `id` as `rank` of `world` (the current CUDA context must be this rank's).
    pub fn init(path: &Path, id: UniqueId, rank: usize, world: usize) -> Result<Self, CudaError> {
        let (lib, api) = load(path)?;
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; rank < world is NCCL's contract, checked by it.
        api.check("ncclCommInitRank", unsafe { (api.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) })?;
        Ok(Communicator { api, _lib: lib, comm: Some(comm), world })
    }

    /// Group size.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Sums `buf` over all ranks, in place, on `stream`.
    pub fn all_reduce_sum(&mut self, buf: &mut CudaSlice<f32>, stream: &CudaStream) -> Result<(), CudaError> {
        let comm = self.comm.ok_or_else(|| CudaError::Nccl("communicator was aborted".into()))?;
        let n = buf.len();
        let (ptr, _record) = buf.device_ptr_mut(stream);
        // SAFETY: in-place all-reduce over exactly `n` f32 values owned by `buf`, enqueued on the
        // stream `_record` synchronises with.
        let r = unsafe {
            (self.api.all_reduce)(
                ptr as *const c_void,
                ptr as *mut c_void,
                n,
                NCCL_FLOAT32,
                NCCL_SUM,
                comm,
                stream.cu_stream() as *mut c_void,
            )
        };
        self.api.check("ncclAllReduce", r)
    }

    /// Aborts the communicator: pending and future collectives fail instead of hanging.
    pub fn abort(&mut self) -> Result<(), CudaError> {
        match self.comm.take() {
            // SAFETY: `c` is a live communicator, taken out so it is never used again.
            Some(c) => self.api.check("ncclCommAbort", unsafe { (self.api.comm_abort)(c) }),
            None => Ok(()),
        }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if let Some(c) = self.comm.take() {
            // SAFETY: `c` is live and destroyed once.
            let _ = unsafe { (self.api.comm_destroy)(c) };
        }
    }
}
