//! Tolerance tests of every fast kernel against its reference, on seeded random data of awkward
//! sizes, for every ISA the CPU supports and for 1 and 2 threads.
#![expect(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

mod activation;
mod attention;
mod matmul;
mod norm;
mod rope;
mod softmax;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_kernels::matmul::InputRounding;
use tessera_kernels::{CpuPool, Isa};

/// A deterministic RNG per test.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in `[-scale, scale)`.
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// One pool per (supported ISA, thread count in {1, 2}), each allowing 8-bit matmul inputs so
/// that every kernel path runs (tests ask for bf16 inputs per call where they need them).
pub fn pools() -> Vec<CpuPool> {
    let mut out = Vec::new();
    for isa in Isa::available() {
        for threads in [1, 2] {
            out.push(CpuPool::with_isa(threads, isa).unwrap().with_input_rounding(InputRounding::Int8));
        }
    }
    assert!(out.iter().any(|p| p.isa() == Isa::detect()));
    out
}

/// Asserts `|got - want| <= abs + rel * |want|` element-wise.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32, abs: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = abs + rel * w.abs();
        assert!(
            (g - w).abs() <= tol && g.is_finite() == w.is_finite(),
            "{what}: index {i}: got {g}, want {w} (tol {tol})"
        );
    }
}
