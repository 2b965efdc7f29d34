//! Opt-in per-kernel-class accounting: time, calls, bytes moved and FLOPs.
//!
//! `tessera bench engine` turns it on for one extra run and prints achieved GB/s and GFLOP/s per
//! class next to the machine's measured peaks. Off (the default), a kernel call costs one relaxed
//! atomic load. Invariants: counters only grow while enabled; [`take`] returns and clears them;
//! bytes count the data a kernel must move at least once (weights, activations, K/V it reads and
//! the outputs it writes), not cache traffic.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// The kernel classes accounted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelClass {
    /// Matmul with at most 8 token rows (decode): bandwidth-bound.
    MatmulDecode,
    /// Matmul with more token rows (prefill): compute-bound.
    MatmulPrefill,
    /// Paged attention.
    Attention,
    /// RMSNorm.
    RmsNorm,
    /// Rotary embedding.
    Rope,
    /// SwiGLU gate (SiLU · up).
    SiluMul,
}

impl KernelClass {
    /// Every class, in report order.
    pub const ALL: [KernelClass; 6] = [
        KernelClass::MatmulDecode,
        KernelClass::MatmulPrefill,
        KernelClass::Attention,
        KernelClass::RmsNorm,
        KernelClass::Rope,
        KernelClass::SiluMul,
    ];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            KernelClass::MatmulDecode => "matmul m<=8",
            KernelClass::MatmulPrefill => "matmul m>8",
            KernelClass::Attention => "attention",
            KernelClass::RmsNorm => "rms_norm",
            KernelClass::Rope => "rope",
            KernelClass::SiluMul => "silu_mul",
        }
    }
}

/// Totals of one class.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClassTotals {
    /// Calls.
    pub calls: u64,
    /// Wall time inside the calls.
    pub time: Duration,
    /// Bytes moved (see the module docs).
    pub bytes: u64,
    /// Floating-point operations (a fused multiply-add counts 2).
    pub flops: u64,
}

struct Counters {
    calls: AtomicU64,
    nanos: AtomicU64,
    bytes: AtomicU64,
    flops: AtomicU64,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static COUNTERS: [Counters; 6] = [const {
    Counters { calls: AtomicU64::new(0), nanos: AtomicU64::new(0), bytes: AtomicU64::new(0), flops: AtomicU64::new(0) }
}; 6];

/// Turns accounting on or off for the whole process.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Relaxed);
}

/// The totals since the last call, per class in [`KernelClass::ALL`] order; clears them.
pub fn take() -> Vec<(KernelClass, ClassTotals)> {
    KernelClass::ALL
        .iter()
        .map(|&class| {
            let c = &COUNTERS[class as usize];
            let totals = ClassTotals {
                calls: c.calls.swap(0, Relaxed),
                time: Duration::from_nanos(c.nanos.swap(0, Relaxed)),
                bytes: c.bytes.swap(0, Relaxed),
                flops: c.flops.swap(0, Relaxed),
            };
            (class, totals)
        })
        .collect()
}

/// Times one kernel call; adds to the class's totals when dropped (if accounting is on).
pub(crate) struct Scope {
    start: Option<(Instant, KernelClass, u64, u64)>,
}

/// Starts timing a call of `class` that moves `bytes` and performs `flops`.
#[inline]
pub(crate) fn scope(class: KernelClass, bytes: usize, flops: usize) -> Scope {
    Scope { start: ENABLED.load(Relaxed).then(|| (Instant::now(), class, bytes as u64, flops as u64)) }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((start, class, bytes, flops)) = self.start {
            let c = &COUNTERS[class as usize];
            c.calls.fetch_add(1, Relaxed);
            c.nanos.fetch_add(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX), Relaxed);
            c.bytes.fetch_add(bytes, Relaxed);
            c.flops.fetch_add(flops, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_while_enabled() {
        // The only test in this crate that enables accounting, so the counters are ours.
        let _ = take();
        drop(scope(KernelClass::Rope, 10, 20));
        assert!(take().iter().all(|(_, t)| t.calls == 0));
        set_enabled(true);
        drop(scope(KernelClass::Rope, 10, 20));
        drop(scope(KernelClass::Rope, 5, 1));
        set_enabled(false);
        let totals = take();
        let rope = totals.iter().find(|(c, _)| *c == KernelClass::Rope).unwrap().1;
        // Other unit tests may run rope kernels meanwhile: ours are at least these.
        assert!(rope.calls >= 2 && rope.bytes >= 15 && rope.flops >= 21, "{rope:?}");
        assert!(take().iter().all(|(_, t)| t.calls == 0));
    }
}
