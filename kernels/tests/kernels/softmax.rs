use tessera_kernels::Isa;
use tessera_kernels::softmax::{softmax, softmax_isa, softmax_ref};

use crate::{assert_close, rng, uniform};

#[test]
fn fast_matches_reference() {
    let mut r = rng(3);
    for n in [1, 2, 7, 8, 9, 33, 577, 4096] {
        for scale in [1.0, 30.0] {
            let x = uniform(&mut r, n, scale);
            let mut want = x.clone();
            softmax_ref(&mut want);
            let total: f32 = want.iter().sum();
            assert!((total - 1.0).abs() < 1e-4, "ref sums to {total}");
            for isa in Isa::available() {
                let mut got = x.clone();
                softmax_isa(isa, &mut got);
                // Polynomial exp and reciprocal-multiply: relative 1e-5, absolute 1e-8.
                assert_close(&format!("n={n} {isa}"), &got, &want, 1e-5, 1e-8);
            }
            let mut got = x.clone();
            softmax(&mut got);
            assert_close(&format!("n={n} detected"), &got, &want, 1e-5, 1e-8);
        }
    }
}

#[test]
fn stable_for_large_inputs() {
    let mut x = vec![1000.0f32, 1000.0, 999.0, -1000.0, 1000.0, 0.0, 0.0, 0.0, 1000.0];
    softmax(&mut x);
    assert!(x.iter().all(|v| v.is_finite()));
    let e1 = (-1.0f32).exp();
    let want = 1.0 / (4.0 + e1);
    assert!((x[0] - want).abs() < 1e-6 && (x[2] - want * e1).abs() < 1e-6);
    assert!(x[3] < 1e-30);
    let mut empty: [f32; 0] = [];
    softmax(&mut empty);
    softmax_ref(&mut empty);
}
