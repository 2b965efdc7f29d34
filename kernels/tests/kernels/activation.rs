use tessera_kernels::activation::{add_assign, silu_mul, silu_mul_ref};

use crate::{assert_close, pools, rng, uniform};

#[test]
fn silu_mul_fast_matches_reference() {
    let mut r = rng(11);
    // 12_289 is split over two threads of a 2-thread pool, with a tail in the second share.
    for n in [0, 1, 7, 33, 577, 12_289, 40_001] {
        let gate = uniform(&mut r, n, 20.0);
        let up = uniform(&mut r, n, 2.0);
        let mut want = vec![0.0; n];
        silu_mul_ref(&gate, &up, &mut want).unwrap();
        for pool in pools() {
            let mut got = vec![f32::NAN; n];
            silu_mul(&pool, &gate, &up, &mut got).unwrap();
            // The AVX2 path uses a polynomial exp (a few ulp): relative 1e-5.
            assert_close(&format!("n={n} {}", pool.isa()), &got, &want, 1e-5, 1e-7);
        }
    }
}

#[test]
fn silu_mul_reference_values() {
    let mut out = [0.0f32; 3];
    silu_mul_ref(&[0.0, 1.0, -2.0], &[5.0, 2.0, 1.0], &mut out).unwrap();
    let s1 = 1.0 / (1.0 + (-1.0f32).exp());
    let s2 = 1.0 / (1.0 + 2.0f32.exp());
    assert_eq!(out, [0.0, s1 * 2.0, -2.0 * s2]);
}

#[test]
fn add_assign_adds_and_checks() {
    let mut d = [1.0, 2.0, 3.0];
    add_assign(&mut d, &[0.5, -2.0, 1.0]).unwrap();
    assert_eq!(d, [1.5, 0.0, 4.0]);
    assert!(add_assign(&mut d, &[1.0]).is_err());
    let pool = &pools()[0];
    let mut out = [0.0; 2];
    assert!(silu_mul(pool, &[0.0; 2], &[0.0; 3], &mut out).is_err());
    assert!(silu_mul_ref(&[0.0; 2], &[0.0; 2], &mut out[..1]).is_err());
}
