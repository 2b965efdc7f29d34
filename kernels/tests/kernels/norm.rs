use tessera_kernels::norm::{rms_norm, rms_norm_ref};

use crate::{assert_close, pools, rng, uniform};

#[test]
fn fast_matches_reference() {
    let mut r = rng(7);
    for d in [1, 7, 33, 577, 2048] {
        for tokens in [1, 3, 17, 40] {
            let x = uniform(&mut r, tokens * d, 3.0);
            let w = uniform(&mut r, d, 2.0);
            let mut want = vec![0.0; x.len()];
            rms_norm_ref(&x, &w, 1e-5, &mut want).unwrap();
            for pool in pools() {
                let mut got = vec![f32::NAN; x.len()];
                rms_norm(&pool, &x, &w, 1e-5, &mut got).unwrap();
                // Only the sum of squares is reordered: relative 1e-5 of each element.
                assert_close(&format!("d={d} t={tokens} {}", pool.isa()), &got, &want, 1e-5, 1e-7);
            }
        }
    }
}

#[test]
fn reference_matches_formula() {
    // Row [3, 4]: mean square 12.5, eps 0.5 -> inv = 1/sqrt(13) = 0.27735.
    let x = [3.0f32, 4.0];
    let w = [1.0f32, 2.0];
    let mut out = [0.0; 2];
    rms_norm_ref(&x, &w, 0.5, &mut out).unwrap();
    let inv = 1.0 / 13.0f32.sqrt();
    assert_eq!(out, [3.0 * inv, 4.0 * inv * 2.0]);
}

#[test]
fn bad_shapes_are_errors() {
    let pool = &pools()[0];
    let mut out = [0.0; 6];
    assert!(rms_norm(pool, &[0.0; 6], &[1.0; 4], 1e-6, &mut out).is_err());
    assert!(rms_norm(pool, &[0.0; 6], &[], 1e-6, &mut out).is_err());
    assert!(rms_norm_ref(&[0.0; 6], &[1.0; 3], 1e-6, &mut out[..5]).is_err());
}
