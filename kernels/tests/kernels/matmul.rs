use half::bf16;
use tessera_kernels::matmul::{matmul, matmul_ref};
use tessera_kernels::{KernelError, WeightData, WeightMatrix};

use crate::{pools, rng, uniform};

/// Fast and reference sums differ only in summation order, so compare against the scale of the
/// terms: `|fast - ref| <= 1e-5 * Σ_k |x_k w_k| + 1e-6`.
const REL: f32 = 1e-5;

fn check_one(m: usize, rows: usize, cols: usize, seed: u64) {
    let mut r = rng(seed);
    let x = uniform(&mut r, m * cols, 1.0);
    let wf = uniform(&mut r, rows * cols, 1.0);
    let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
    let mats = [
        WeightMatrix::new(WeightData::F32(&wf), rows, cols).unwrap(),
        WeightMatrix::new(WeightData::Bf16(&wb), rows, cols).unwrap(),
    ];
    for w in &mats {
        let mut want = vec![0.0; m * rows];
        matmul_ref(&x, m, w, &mut want).unwrap();
        // Scale of the terms, from the f32 view of the weight.
        let mut scale = vec![0.0f32; m * rows];
        let mut row = vec![0.0f32; cols];
        for j in 0..rows {
            w.row_to_f32(j, &mut row);
            for i in 0..m {
                let xi = &x[i * cols..(i + 1) * cols];
                scale[i * rows + j] = xi.iter().zip(&row).map(|(a, b)| (a * b).abs()).sum();
            }
        }
        for pool in pools() {
            let mut got = vec![f32::NAN; m * rows];
            matmul(&pool, &x, m, w, &mut got).unwrap();
            for (idx, ((g, e), s)) in got.iter().zip(&want).zip(&scale).enumerate() {
                let tol = REL * s + 1e-6;
                assert!(
                    (g - e).abs() <= tol,
                    "m={m} rows={rows} cols={cols} {:?} {} x{}: y[{idx}] = {g}, ref {e}",
                    std::mem::discriminant(&w.data),
                    pool.isa(),
                    pool.threads()
                );
            }
        }
    }
}

#[test]
fn fast_matches_reference_on_awkward_shapes() {
    let mut seed = 0;
    for m in [1, 3, 5, 17, 130] {
        for cols in [1, 7, 33, 577] {
            for rows in [1, 5, 150] {
                seed += 1;
                check_one(m, rows, cols, seed);
            }
        }
    }
}

#[test]
fn fast_matches_reference_on_model_shapes() {
    check_one(1, 576, 576, 100);
    check_one(4, 1536, 576, 101);
    check_one(9, 576, 1536, 102);
}

#[test]
fn reference_matches_hand_computed_values() {
    // x = [[1, 2], [3, 4]], w = [[1, 0], [0.5, -1], [2, 2]] -> y = x · wᵀ.
    let x = [1.0, 2.0, 3.0, 4.0];
    let w = [1.0, 0.0, 0.5, -1.0, 2.0, 2.0];
    let w = WeightMatrix::new(WeightData::F32(&w), 3, 2).unwrap();
    let mut y = [0.0; 6];
    matmul_ref(&x, 2, &w, &mut y).unwrap();
    assert_eq!(y, [1.0, -1.5, 6.0, 3.0, -2.5, 14.0]);
    for pool in pools() {
        let mut yf = [0.0; 6];
        matmul(&pool, &x, 2, &w, &mut yf).unwrap();
        assert_eq!(yf, y);
    }
}

#[test]
fn zero_sized_shapes() {
    let pool = &pools()[0];
    let w = WeightMatrix::new(WeightData::F32(&[]), 3, 0).unwrap();
    let mut y = [7.0; 6];
    matmul(pool, &[], 2, &w, &mut y).unwrap();
    assert_eq!(y, [0.0; 6]);
    let mut y = [7.0; 6];
    matmul_ref(&[], 2, &w, &mut y).unwrap();
    assert_eq!(y, [0.0; 6]);
    let w = WeightMatrix::new(WeightData::F32(&[]), 0, 4).unwrap();
    matmul(pool, &[0.0; 8], 2, &w, &mut []).unwrap();
    let w = WeightMatrix::new(WeightData::F32(&[1.0; 8]), 2, 4).unwrap();
    matmul(pool, &[], 0, &w, &mut []).unwrap();
}

#[test]
fn bad_shapes_are_errors() {
    let pool = &pools()[0];
    let wd = [0.0f32; 12];
    let w = WeightMatrix::new(WeightData::F32(&wd), 3, 4).unwrap();
    let x = [0.0f32; 8];
    let mut y = [0.0f32; 6];
    assert!(matches!(matmul(pool, &x[..7], 2, &w, &mut y), Err(KernelError::Shape { kernel: "matmul", .. })));
    assert!(matmul(pool, &x, 2, &w, &mut y[..5]).is_err());
    assert!(matmul_ref(&x, 3, &w, &mut y).is_err());
    // A hand-built matrix whose fields lie about its size is rejected too.
    let bad = WeightMatrix { data: WeightData::F32(&wd[..10]), rows: 3, cols: 4 };
    assert!(matmul(pool, &x, 2, &bad, &mut y).is_err());
    assert!(matmul_ref(&x, 2, &bad, &mut y).is_err());
}
