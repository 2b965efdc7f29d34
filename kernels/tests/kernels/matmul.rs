use half::{bf16, f16};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tessera_kernels::matmul::{InputRounding, matmul, matmul_many, matmul_ref, matmul_with};
use tessera_kernels::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, QK, panels};
use tessera_kernels::{CpuPool, Isa, KernelError, WeightData, WeightMatrix};

use crate::{pools, rng, uniform};

/// Fast and reference sums differ only in summation order, so compare against the scale of the
/// terms: `|fast - ref| <= 1e-5 * Σ_k |x_k w_k| + 1e-6`.
const REL: f32 = 1e-5;
/// The AVX-512 BF16 path for decode-sized matmuls against bf16 and block-quantised weights
/// rounds the token rows (and the dequantised block values) to bf16, relative error ≤ 2⁻⁹ per
/// value, so its sums may move by up to 2⁻⁹ of the terms' scale per rounded factor; twice that is
/// allowed.
const REL_BF16_DOT: f32 = 1.0 / 256.0;

/// Whether a call rounding its rows at most as `rounding` takes the 8-bit VNNI path: 2 to 8
/// token rows against Q8_0 weights on an ISA with VNNI, where 8-bit rows are allowed.
fn vnni_path(isa: Isa, w: &WeightData, m: usize, rounding: InputRounding) -> bool {
    isa.has_vnni() && matches!(w, WeightData::Q8_0(_)) && (2..=8).contains(&m) && rounding == InputRounding::Int8
}

/// Whether such a call takes a 16-bit integer path: Q8_0 weights on any SIMD ISA, for a lone
/// token row, for two where 8-bit rows are not allowed, and for up to 8 on ISAs without bf16 dot
/// products and the 8-bit path does not take them; Q8_0 weights in row panels on the ISAs with
/// VNNI, for any number.
fn int16_path(isa: Isa, w: &WeightData, m: usize, rounding: InputRounding) -> bool {
    if rounding == InputRounding::Exact {
        return false;
    }
    match w {
        WeightData::Q8_0(_) => {
            isa.has_avx2()
                && !vnni_path(isa, w, m, rounding)
                && (m == 1 || isa != Isa::Avx512Bf16 && m <= 8 || m == 2 && rounding != InputRounding::Int8)
        }
        WeightData::Q8_0Panels(_) => isa.has_vnni(),
        _ => false,
    }
}

/// Whether such a call takes the AVX-512 BF16 dot products: bf16 and block-quantised weights,
/// up to 8 token rows, where neither integer path does.
fn bf16_dot_path(isa: Isa, w: &WeightData, m: usize, rounding: InputRounding) -> bool {
    isa == Isa::Avx512Bf16
        && !matches!(w, WeightData::F32(_) | WeightData::F16(_) | WeightData::Q8_0Panels(_))
        && rounding != InputRounding::Exact
        && m <= 8
        && !vnni_path(isa, w, m, rounding)
        && !int16_path(isa, w, m, rounding)
        && (m >= 2 || matches!(w, WeightData::Bf16(_)))
}

/// The token rows as the integer paths quantise them to `q_max` (127 for the VNNI path, 32767
/// for the 16-bit one): per 32-value block, `d = max|x| / q_max` and `q = round(x · (1/d))`, ties
/// to even.
fn quantize_rows(x: &[f32], q_max: f32) -> Vec<(f32, [i32; QK])> {
    x.chunks_exact(QK)
        .map(|c| {
            let d = c.iter().fold(0.0f32, |a, v| a.max(v.abs())) / q_max;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            (d, std::array::from_fn(|j| (c[j] * id).round_ties_even() as i32))
        })
        .collect()
}

/// `m` token rows of `cols` values for checking an integer path's quantisation (`q_max` as for
/// [`quantize_rows`]): random values, an all-zero block, and a block of exact ties — its maximum is
/// `q_max`, so `d = 1` and `x · (1/d)` is `x`, which sits halfway between integers.
fn rows_with_ties(r: &mut ChaCha8Rng, m: usize, cols: usize, q_max: f32) -> Vec<f32> {
    let mut x = uniform(r, m * cols, 4.0);
    x[..QK].fill(0.0);
    x[QK..2 * QK].iter_mut().enumerate().for_each(|(j, v)| *v = j as f32 - 12.5);
    x[2 * QK - 1] = q_max;
    x
}

/// The exact integer dot product of a Q8_0 block's values and a quantised token block.
fn block_dot(b: &BlockQ8_0, q: &[i32; QK]) -> i32 {
    b.qs.iter().zip(q).map(|(&a, &c)| i32::from(a) * c).sum()
}

/// Bound on how far an integer path's quantised token rows move each sum:
/// `Σ_b (d_b / 2) · Σ_{c in b} |w_c|` (with a hair more than half a step for the rounding of
/// `x · (1/d)`).
fn quantization_bound(x: &[f32], w: &[f32], q_max: f32) -> f32 {
    quantize_rows(x, q_max)
        .iter()
        .zip(w.chunks_exact(QK))
        .map(|((d, _), wb)| 0.501 * d * wb.iter().map(|v| v.abs()).sum::<f32>())
        .sum()
}

/// `values` (a whole number of blocks) quantised to Q8_0.
fn q8_0(values: &[f32]) -> Vec<BlockQ8_0> {
    values.chunks_exact(QK).map(|c| BlockQ8_0::quantize(c.try_into().unwrap())).collect()
}

fn check_one(m: usize, rows: usize, cols: usize, seed: u64) {
    let mut r = rng(seed);
    let x = uniform(&mut r, m * cols, 1.0);
    let wf = uniform(&mut r, rows * cols, 1.0);
    let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
    let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
    let mut mats = vec![
        WeightMatrix::new(WeightData::F32(&wf), rows, cols).unwrap(),
        WeightMatrix::new(WeightData::Bf16(&wb), rows, cols).unwrap(),
        WeightMatrix::new(WeightData::F16(&wh), rows, cols).unwrap(),
    ];
    // Block formats need whole blocks per row: random scales, minimums and values.
    let blocks = rows * cols / QK;
    let q8 = q8_0(&wf);
    let scale = |r: &mut rand_chacha::ChaCha8Rng| f16::from_f32(r.random_range(-0.2f32..0.2));
    let q4_0: Vec<BlockQ4_0> =
        (0..blocks).map(|_| BlockQ4_0 { d: scale(&mut r), qs: std::array::from_fn(|_| r.random()) }).collect();
    let q4_1: Vec<BlockQ4_1> = (0..blocks)
        .map(|_| BlockQ4_1 { d: scale(&mut r), m: scale(&mut r), qs: std::array::from_fn(|_| r.random()) })
        .collect();
    let q8_panels = if cols.is_multiple_of(QK) { panels::from_blocks(&q8, rows, cols) } else { Vec::new() };
    if cols.is_multiple_of(QK) {
        mats.push(WeightMatrix::new(WeightData::Q8_0(&q8), rows, cols).unwrap());
        mats.push(WeightMatrix::new(WeightData::Q8_0Panels(&q8_panels), rows, cols).unwrap());
        mats.push(WeightMatrix::new(WeightData::Q4_0(&q4_0), rows, cols).unwrap());
        mats.push(WeightMatrix::new(WeightData::Q4_1(&q4_1), rows, cols).unwrap());
    }
    for w in &mats {
        let mut want = vec![0.0; m * rows];
        matmul_ref(&x, m, w, &mut want).unwrap();
        // Scale of the terms, from the f32 view of the weight, and the VNNI path's bound.
        let mut scale = vec![0.0f32; m * rows];
        let mut quantized = vec![0.0f32; m * rows];
        let mut quantized16 = vec![0.0f32; m * rows];
        let mut row = vec![0.0f32; cols];
        for j in 0..rows {
            w.row_to_f32(j, &mut row);
            for i in 0..m {
                let xi = &x[i * cols..(i + 1) * cols];
                scale[i * rows + j] = xi.iter().zip(&row).map(|(a, b)| (a * b).abs()).sum();
                if cols.is_multiple_of(QK) {
                    quantized[i * rows + j] = quantization_bound(xi, &row, 127.0);
                    quantized16[i * rows + j] = quantization_bound(xi, &row, 32767.0);
                }
            }
        }
        for pool in pools() {
            let mut got = vec![f32::NAN; m * rows];
            matmul(&pool, &x, m, w, &mut got).unwrap();
            // `matmul` allows 8-bit rows; the test pools do too.
            let rounding = InputRounding::Int8;
            let vnni = vnni_path(pool.isa(), &w.data, m, rounding);
            let int16 = int16_path(pool.isa(), &w.data, m, rounding);
            let bf16_dot = bf16_dot_path(pool.isa(), &w.data, m, rounding);
            let rel = if bf16_dot { REL_BF16_DOT } else { REL };
            let quantization = |idx: usize| {
                if vnni {
                    quantized[idx]
                } else if int16 {
                    quantized16[idx]
                } else {
                    0.0
                }
            };
            for (idx, ((g, e), s)) in got.iter().zip(&want).zip(&scale).enumerate() {
                let tol = rel * s + 1e-6 + quantization(idx);
                assert!(
                    (g - e).abs() <= tol,
                    "m={m} rows={rows} cols={cols} {} {} x{}: y[{idx}] = {g}, ref {e}",
                    w.data.format_name(),
                    pool.isa(),
                    pool.threads()
                );
            }
            // Held to exact inputs, every path is the reference up to the order of the sums.
            let mut exact = vec![f32::NAN; m * rows];
            matmul_with(&pool, &x, m, w, &mut exact, InputRounding::Exact).unwrap();
            for (idx, ((g, e), s)) in exact.iter().zip(&want).zip(&scale).enumerate() {
                let tol = REL * s + 1e-6;
                assert!(
                    (g - e).abs() <= tol,
                    "exact m={m} {} {}: y[{idx}] = {g}, ref {e}",
                    w.data.format_name(),
                    pool.isa()
                );
            }
            // Held to bf16 rounding, the same call skips the 8-bit path.
            let mut bf16_only = vec![f32::NAN; m * rows];
            matmul_with(&pool, &x, m, w, &mut bf16_only, InputRounding::Bf16).unwrap();
            let int16 = int16_path(pool.isa(), &w.data, m, InputRounding::Bf16);
            let rel = if bf16_dot_path(pool.isa(), &w.data, m, InputRounding::Bf16) { REL_BF16_DOT } else { REL };
            for (idx, ((g, e), s)) in bf16_only.iter().zip(&want).zip(&scale).enumerate() {
                let tol = rel * s + 1e-6 + if int16 { quantized16[idx] } else { 0.0 };
                assert!(
                    (g - e).abs() <= tol,
                    "bf16-rounded m={m} {} {}: y[{idx}] = {g}, ref {e}",
                    w.data.format_name(),
                    pool.isa()
                );
            }
        }
    }
}

#[test]
fn fast_matches_reference_on_awkward_shapes() {
    let mut seed = 0;
    for m in [1, 2, 3, 4, 5, 8, 9, 17, 130] {
        for cols in [1, 7, 32, 33, 96, 577] {
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
    check_one(8, 1536, 576, 103);
    check_one(128, 576, 576, 104);
}

/// On the paths that promise it, a decode step's token gets the same bits whether it is alone
/// or batched with up to seven others, so a sequence's greedy output does not depend on its
/// neighbours: bf16 weights through AVX-512 BF16 dot products (and from two tokens on through the
/// pairwise-widened f32 FMAs of the other AVX-512 ISAs), Q8_0 weights in row panels on the
/// ISAs with VNNI (16-bit integer dot products, and the same bits again in prefill-sized calls),
/// and plain Q8_0 weights (16-bit integer dot products) on the other SIMD ISAs. With VNNI (and
/// these pools' 8-bit inputs allowed), plain Q8_0 weights take 8-bit dot products from two tokens
/// on, so there batches of 2 to 8 agree with each other but not with a lone token. (The f32 tiles sum a lone token and a tile's tokens in
/// different orders.)
#[test]
fn decode_sized_results_do_not_depend_on_the_batch() {
    // 53 rows: three whole Q8_0 panels (a group where the ISA groups them) and a partial one.
    let (rows, cols) = (53, 577);
    let mut r = rng(7);
    let x = uniform(&mut r, 8 * cols, 1.0);
    let wf = uniform(&mut r, rows * cols, 1.0);
    let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
    let w = WeightMatrix::new(WeightData::Bf16(&wb), rows, cols).unwrap();
    let (qcols, qf) = (576, uniform(&mut r, 8 * 576, 1.0));
    let wq_f = uniform(&mut r, rows * qcols, 1.0);
    let q8 = q8_0(&wq_f);
    let wq = WeightMatrix::new(WeightData::Q8_0(&q8), rows, qcols).unwrap();
    let q8_panels = panels::from_blocks(&q8, rows, qcols);
    let wp = WeightMatrix::new(WeightData::Q8_0Panels(&q8_panels), rows, qcols).unwrap();
    for pool in pools().into_iter().filter(|p| p.isa().has_avx2()) {
        let vnni = pool.isa().has_vnni();
        let mut cases = vec![(&wq, qcols, &qf, if vnni { 2 } else { 1 })];
        if pool.isa() == Isa::Avx512Bf16 {
            cases.push((&w, cols, &x, 1));
        }
        if pool.isa().has_wide_f32_tiles() {
            cases.push((&w, cols, &x, 2));
        }
        if vnni {
            cases.push((&wp, qcols, &qf, 1));
        }
        for (w, cols, x, smallest) in cases {
            // Each token's result in the smallest batch the promise covers (the token first).
            let reference = |i: usize| {
                let mut xs = x[i * cols..(i + 1) * cols].to_vec();
                xs.extend_from_slice(&x[((i + 1) % 8) * cols..((i + 1) % 8 + 1) * cols]);
                let mut y = vec![0.0; smallest * rows];
                matmul(&pool, &xs[..smallest * cols], smallest, w, &mut y).unwrap();
                y.truncate(rows);
                y
            };
            for m in smallest..=8 {
                let mut batched = vec![0.0; m * rows];
                matmul(&pool, &x[..m * cols], m, w, &mut batched).unwrap();
                for (i, got) in batched.chunks_exact(rows).enumerate() {
                    let same = reference(i).iter().zip(got).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{} {}: token {i} of {m} differs", w.data.format_name(), pool.isa());
                }
            }
        }
    }
}

/// The test pools whose ISA has VNNI (none, with a note, on CPUs without it).
fn vnni_pools() -> Vec<CpuPool> {
    let vnni: Vec<CpuPool> = pools().into_iter().filter(|p| p.isa().has_vnni()).collect();
    if vnni.is_empty() {
        eprintln!("skipped: this CPU has no AVX-512 VNNI");
    }
    vnni
}

/// The VNNI path computes what its module promises: per block, the exact integer dot product of
/// the weight's bytes and the token's quantised bytes, times `d_w · d_x`, summed in f32 — checked
/// against that arithmetic in f64, tightly enough that one quantised value off by one fails.
#[test]
fn q8_0_decode_is_the_integer_dot_product_of_quantised_rows() {
    for pool in &vnni_pools() {
        let mut r = rng(13);
        // Rows of whole groups of 8 blocks, and rows of 18 whose tails share groups four rows at a
        // time (29 rows: the last set is short).
        for (rows, cols) in [(29, 1536), (29, 576)] {
            let q8 = q8_0(&uniform(&mut r, rows * cols, 1.0));
            let w = WeightMatrix::new(WeightData::Q8_0(&q8), rows, cols).unwrap();
            for m in [2, 3, 8] {
                let x = rows_with_ties(&mut r, m, cols, 127.0);
                let mut got = vec![f32::NAN; m * rows];
                matmul(pool, &x, m, &w, &mut got).unwrap();
                for i in 0..m {
                    let xq = quantize_rows(&x[i * cols..(i + 1) * cols], 127.0);
                    for (j, row) in q8.chunks_exact(cols / QK).enumerate() {
                        let (mut want, mut step) = (0.0f64, 0.0f64);
                        for (b, (dx, q)) in row.iter().zip(&xq) {
                            let scale = f64::from(b.d.to_f32() * dx);
                            want += scale * f64::from(block_dot(b, q));
                            step = step.max(scale);
                        }
                        let g = f64::from(got[i * rows + j]);
                        // One quantised token value off by one moves the sum by `scale · |q_w|`, at
                        // least `scale` for the weights here; f32 summation stays far below that.
                        assert!(
                            (g - want).abs() < 0.25 * step,
                            "{} m={m} token {i} row {j}: {g} vs {want}",
                            pool.isa()
                        );
                    }
                }
            }
        }
    }
}

/// The panelled Q8_0 path computes exactly what its module promises, for decode and prefill
/// sizes alike, bit for bit: per block in order, the exact integer dot product of the weight's
/// bytes and the token's values quantised to 16 bits, converted to f32, times `d_w · d_x` (an f32
/// product), added to the row's f32 sum by one fused multiply-add. 29 rows end in a partial panel.
#[test]
fn panelled_q8_0_is_the_integer_dot_product_of_quantised_rows() {
    for pool in &vnni_pools() {
        let mut r = rng(19);
        for (rows, cols) in [(29, 1536), (29, 576), (16, 64)] {
            let q8 = q8_0(&uniform(&mut r, rows * cols, 1.0));
            let q8_panels = panels::from_blocks(&q8, rows, cols);
            let w = WeightMatrix::new(WeightData::Q8_0Panels(&q8_panels), rows, cols).unwrap();
            for m in [1, 3, 8, 11] {
                let x = rows_with_ties(&mut r, m, cols, 32767.0);
                let mut got = vec![f32::NAN; m * rows];
                matmul(pool, &x, m, &w, &mut got).unwrap();
                for i in 0..m {
                    let xq = quantize_rows(&x[i * cols..(i + 1) * cols], 32767.0);
                    for (j, row) in q8.chunks_exact(cols / QK).enumerate() {
                        let want = row
                            .iter()
                            .zip(&xq)
                            .fold(0.0f32, |acc, (b, (dx, q))| (block_dot(b, q) as f32).mul_add(b.d.to_f32() * dx, acc));
                        let g = got[i * rows + j];
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "{} {rows}x{cols} m={m} token {i} row {j}: {g} vs {want}",
                            pool.isa()
                        );
                    }
                }
            }
        }
    }
}

/// A NaN in a lone token row makes every output of it NaN on every path, including the 16-bit one,
/// which quantises the row (where a NaN would otherwise become a finite integer).
#[test]
fn a_nan_in_a_lone_token_row_reaches_every_output() {
    let (rows, cols) = (37, 576);
    let mut r = rng(17);
    let q8 = q8_0(&uniform(&mut r, rows * cols, 1.0));
    let q8_panels = panels::from_blocks(&q8, rows, cols);
    let plain = WeightMatrix::new(WeightData::Q8_0(&q8), rows, cols).unwrap();
    let panelled = WeightMatrix::new(WeightData::Q8_0Panels(&q8_panels), rows, cols).unwrap();
    for at in [0, 100, cols - 1] {
        let mut x = uniform(&mut r, cols, 1.0);
        x[at] = f32::NAN;
        for (w, pool) in [&plain, &panelled].into_iter().flat_map(|w| pools().into_iter().map(move |p| (w, p))) {
            let mut y = vec![0.0; rows];
            matmul(&pool, &x, 1, w, &mut y).unwrap();
            let (format, isa) = (w.data.format_name(), pool.isa());
            assert!(y.iter().all(|v| v.is_nan()), "NaN at {at}, {format} {isa} x{}: {y:?}", pool.threads());
        }
    }
}

/// One launch over several weights gives each output exactly what `matmul` gives it alone,
/// across formats and row counts that do not divide into the shared row blocks.
#[test]
fn matmul_many_matches_one_matmul_per_weight() {
    let cols = 96;
    let mut r = rng(11);
    let wf = uniform(&mut r, 77 * cols, 1.0);
    let wb: Vec<bf16> = uniform(&mut r, 130 * cols, 1.0).iter().map(|&v| bf16::from_f32(v)).collect();
    let q8 = q8_0(&uniform(&mut r, 5 * cols, 1.0));
    let q8_panels = panels::from_blocks(&q8_0(&uniform(&mut r, 70 * cols, 1.0)), 70, cols);
    let weights = [
        WeightMatrix::new(WeightData::F32(&wf), 77, cols).unwrap(),
        WeightMatrix::new(WeightData::Bf16(&wb), 130, cols).unwrap(),
        WeightMatrix::new(WeightData::Q8_0(&q8), 5, cols).unwrap(),
        WeightMatrix::new(WeightData::Q8_0Panels(&q8_panels), 70, cols).unwrap(),
    ];
    for m in [1, 3, 8, 9] {
        let x = uniform(&mut r, m * cols, 1.0);
        for pool in pools() {
            let mut ys: Vec<Vec<f32>> = weights.iter().map(|w| vec![f32::NAN; m * w.rows]).collect();
            let mut targets: Vec<(&WeightMatrix, &mut [f32])> =
                weights.iter().zip(ys.iter_mut()).map(|(w, y)| (w, y.as_mut_slice())).collect();
            matmul_many(&pool, &x, m, &mut targets).unwrap();
            for (w, got) in weights.iter().zip(&ys) {
                let mut want = vec![0.0; m * w.rows];
                matmul(&pool, &x, m, w, &mut want).unwrap();
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "m={m} {} {} x{}", w.data.format_name(), pool.isa(), pool.threads());
            }
        }
    }
    let pool = &pools()[0];
    let mut short = vec![0.0; 76];
    let mut fine = vec![0.0; 130];
    let x = vec![0.0; cols];
    let mut targets: Vec<(&WeightMatrix, &mut [f32])> = vec![(&weights[1], &mut fine), (&weights[0], &mut short)];
    assert!(matches!(matmul_many(pool, &x, 1, &mut targets), Err(KernelError::Shape { .. })));
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
    // Block formats need whole blocks per row.
    let blocks = [BlockQ8_0::quantize(&[0.5; QK]); 3];
    assert!(WeightMatrix::new(WeightData::Q8_0(&blocks), 2, 48).is_err());
    let bad = WeightMatrix { data: WeightData::Q8_0(&blocks), rows: 2, cols: 48 };
    let (x, mut y) = (vec![0.0f32; 48], vec![0.0f32; 2]);
    assert!(matmul(pool, &x, 1, &bad, &mut y).is_err());
    assert!(matmul_ref(&x, 1, &bad, &mut y).is_err());
    // Panelled Q8_0 bytes must be whole blocks (here 2 blocks' worth plus one byte).
    let bytes = [0u8; 69];
    assert!(WeightMatrix::new(WeightData::Q8_0Panels(&bytes), 1, 64).is_err());
    assert!(WeightMatrix::new(WeightData::Q8_0Panels(&bytes[..68]), 1, 64).is_ok());
}

/// A pool rounds matmul inputs to bf16 at most unless it is told otherwise: a default pool gives
/// exactly what an 8-bit-allowing pool gives when the call asks for bf16.
#[test]
fn pools_default_to_bf16_inputs() {
    let (rows, cols, m) = (40, 576, 8);
    let mut r = rng(17);
    let q8 = q8_0(&uniform(&mut r, rows * cols, 1.0));
    let w = WeightMatrix::new(WeightData::Q8_0(&q8), rows, cols).unwrap();
    let x = uniform(&mut r, m * cols, 1.0);
    for int8_pool in pools() {
        let plain = CpuPool::with_isa(int8_pool.threads(), int8_pool.isa()).unwrap();
        assert_eq!(plain.input_rounding(), InputRounding::Bf16);
        let (mut a, mut b) = (vec![0.0; m * rows], vec![0.0; m * rows]);
        matmul(&plain, &x, m, &w, &mut a).unwrap();
        matmul_with(&int8_pool, &x, m, &w, &mut b, InputRounding::Bf16).unwrap();
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()), "{}", plain.isa());
    }
}
