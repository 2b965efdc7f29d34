//! NCCL as a [`Communicator`]: one rank per GPU, collectives queued on the rank's stream.
//!
//! Bound by hand over `libloading` rather than through `cudarc`'s bindings, because `cudarc`
//! opens NCCL by names that miss its real soname (`libnccl.so.2`) and panics when it does not
//! find it, and because group failure handling needs `ncclCommAbort`.
//!
//! Hang handling (no NCCL watchdog, no hang): collectives only enqueue; [`Communicator::synchronize`]
//! polls an event recorded after them until the group timeout, and on expiry aborts the
//! communicator with `ncclCommAbort`, which makes NCCL's kernels return instead of spinning on a
//! peer that will never come. `abort` may be called from any thread (a watchdog, a failing
//! rank). Invariants: the raw communicator is used only under `comm`'s lock, and is destroyed
//! exactly once, by `abort` or on drop; once aborted, every call fails with `Aborted`.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::CudaError;
use crate::comm::{CommError, Communicator};

/// NCCL's opaque unique id (128 bytes), shared by every rank of a group.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    internal: [c_char; 128],
}

type NcclResult = c_int;
type Comm = *mut c_void;
type Stream = *mut c_void;
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;

struct Api {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> NcclResult,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> NcclResult,
    broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(Comm) -> NcclResult,
    comm_abort: unsafe extern "C" fn(Comm) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
}

/// The raw communicator, `None` once destroyed or aborted.
struct RawComm(Option<Comm>);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not race;
// every use goes through the `Mutex` that owns this value.
unsafe impl Send for RawComm {}

/// One rank's NCCL communicator.
pub struct NcclComm {
    api: Api,
    _lib: libloading::Library,
    comm: Mutex<RawComm>,
    aborted: OnceLock<String>,
    rank: usize,
    world: usize,
    stream: Arc<CudaStream>,
    timeout: Duration,
    /// Scratch for `barrier` (one f32 all-reduced).
    token: Mutex<Option<CudaSlice<f32>>>,
}

impl Api {
    fn check(&self, what: &str, r: NcclResult) -> Result<(), String> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let msg = unsafe { CStr::from_ptr((self.get_error_string)(r)) }.to_string_lossy();
        Err(format!("{what}: {msg} (code {r})"))
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
            all_gather: *lib.get(b"ncclAllGather\0").map_err(err)?,
            broadcast: *lib.get(b"ncclBroadcast\0").map_err(err)?,
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
    api.check("ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut id) }).map_err(CudaError::Nccl)?;
    Ok(id)
}

impl NcclComm {
    /// Joins group `id` as `rank` of `world` on `stream`'s device (the calling thread's current
    /// CUDA context must be that device's). Collectives on it wait at most `timeout`.
    pub fn init(
        path: &Path,
        id: UniqueId,
        rank: usize,
        world: usize,
        stream: Arc<CudaStream>,
        timeout: Duration,
    ) -> Result<Self, CudaError> {
        let (lib, api) = load(path)?;
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; rank < world is NCCL's contract, checked by it.
        let r = unsafe { (api.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) };
        api.check("ncclCommInitRank", r).map_err(CudaError::Nccl)?;
        Ok(NcclComm {
            api,
            _lib: lib,
            comm: Mutex::new(RawComm(Some(comm))),
            aborted: OnceLock::new(),
            rank,
            world,
            stream,
            timeout,
            token: Mutex::new(None),
        })
    }

    /// Runs `call` on the live communicator, or fails if the group was aborted. An NCCL error
    /// aborts the group (its peers would otherwise wait for this rank forever).
    fn with_comm(&self, what: &'static str, call: impl FnOnce(Comm, Stream) -> NcclResult) -> Result<(), CommError> {
        let result = {
            let guard = self.comm.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(comm) = guard.0 else {
                return Err(CommError::Aborted(self.aborted.get().cloned().unwrap_or_else(|| "destroyed".into())));
            };
            self.api.check(what, call(comm, self.stream.cu_stream() as Stream))
        };
        result.map_err(|msg| {
            let reason = format!("rank {}: {msg}", self.rank);
            self.abort(&reason);
            CommError::Transport(reason)
        })
    }
}

impl Communicator for NcclComm {
    type Buffer = CudaSlice<f32>;

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut CudaSlice<f32>) -> Result<(), CommError> {
        let n = buf.len();
        let (ptr, _record) = buf.device_ptr_mut(&self.stream);
        // SAFETY: in-place all-reduce over exactly the `n` f32 values `buf` owns, enqueued on the
        // stream `_record` synchronises with.
        self.with_comm("ncclAllReduce", |comm, stream| unsafe {
            (self.api.all_reduce)(ptr as *const c_void, ptr as *mut c_void, n, NCCL_FLOAT32, NCCL_SUM, comm, stream)
        })
    }

    fn all_gather(&self, send: &CudaSlice<f32>, recv: &mut CudaSlice<f32>) -> Result<(), CommError> {
        let n = send.len();
        if recv.len() != n * self.world {
            let msg =
                format!("rank {}: all_gather of {n} values into {} ({} ranks)", self.rank, recv.len(), self.world);
            self.abort(&msg);
            return Err(CommError::Mismatch(msg));
        }
        let (src, _r1) = send.device_ptr(&self.stream);
        let (dst, _r2) = recv.device_ptr_mut(&self.stream);
        // SAFETY: `send` holds `n` values and `recv` `n * world`, as ncclAllGather requires.
        self.with_comm("ncclAllGather", |comm, stream| unsafe {
            (self.api.all_gather)(src as *const c_void, dst as *mut c_void, n, NCCL_FLOAT32, comm, stream)
        })
    }

    fn broadcast(&self, buf: &mut CudaSlice<f32>, root: usize) -> Result<(), CommError> {
        if root >= self.world {
            let msg = format!("rank {}: broadcast from rank {root} of a {}-rank group", self.rank, self.world);
            self.abort(&msg);
            return Err(CommError::Mismatch(msg));
        }
        let n = buf.len();
        let (ptr, _record) = buf.device_ptr_mut(&self.stream);
        // SAFETY: in-place broadcast of the `n` values `buf` owns.
        self.with_comm("ncclBroadcast", |comm, stream| unsafe {
            (self.api.broadcast)(ptr as *const c_void, ptr as *mut c_void, n, NCCL_FLOAT32, root as c_int, comm, stream)
        })
    }

    fn barrier(&self) -> Result<(), CommError> {
        let mut token = self.token.lock().unwrap_or_else(PoisonError::into_inner);
        if token.is_none() {
            let fresh = self.stream.alloc_zeros::<f32>(1).map_err(|e| CommError::Transport(e.to_string()))?;
            *token = Some(fresh);
        }
        if let Some(t) = token.as_mut() {
            self.all_reduce_sum(t)?;
        }
        drop(token);
        self.synchronize()
    }

    fn synchronize(&self) -> Result<(), CommError> {
        let started = Instant::now();
        let event = self.stream.record_event(None).map_err(|e| CommError::Transport(e.to_string()))?;
        let mut pause = Duration::from_micros(20);
        loop {
            if let Some(reason) = self.aborted.get() {
                return Err(CommError::Aborted(reason.clone()));
            }
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    let reason = format!("rank {}: CUDA error while waiting for collectives: {e}", self.rank);
                    self.abort(&reason);
                    return Err(CommError::Transport(reason));
                }
            }
            if started.elapsed() >= self.timeout {
                let err = CommError::Timeout { op: "synchronize", missing: Vec::new(), waited: started.elapsed() };
                self.abort(&format!("rank {}: {err}", self.rank));
                return Err(err);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    fn abort(&self, reason: &str) {
        let _ = self.aborted.set(reason.to_string());
        let mut guard = self.comm.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = guard.0.take() {
            // SAFETY: `c` is live, taken out under the lock so it is never used again; an abort
            // failing leaves nothing more to do.
            let _ = unsafe { (self.api.comm_abort)(c) };
        }
    }

    fn abort_reason(&self) -> Option<String> {
        self.aborted.get().cloned()
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let guard = self.comm.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = guard.0.take() {
            // SAFETY: `c` is live and destroyed once.
            let _ = unsafe { (self.api.comm_destroy)(c) };
        }
    }
}
