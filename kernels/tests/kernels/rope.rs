use tessera_kernels::rope::{RopeConfig, RopeScaling, RopeTable, apply_rope, apply_rope_ref};

use crate::{pools, rng, uniform};

fn config(head_dim: usize, theta: f32, scaling: Option<RopeScaling>) -> RopeConfig {
    RopeConfig { head_dim, theta, max_positions: 4096, scaling }
}

#[test]
fn table_matches_direct_formula() {
    let table = RopeTable::new(&config(64, 10_000.0, None)).unwrap();
    assert_eq!((table.head_dim(), table.max_positions()), (64, 4096));
    for pos in [0usize, 1, 7, 100, 4095] {
        let (cos, sin) = table.cos_sin(pos).unwrap();
        for i in 0..32 {
            // Exact maths in f64; the table rounds inv_freq and the angle to f32 first, which
            // moves the angle by at most ~2 f32 ulp of its size.
            let angle = pos as f64 / 10_000f64.powf(2.0 * i as f64 / 64.0);
            let tol = 1e-6 + angle * 3e-7;
            assert!((f64::from(cos[i]) - angle.cos()).abs() <= tol, "cos pos={pos} i={i}");
            assert!((f64::from(sin[i]) - angle.sin()).abs() <= tol, "sin pos={pos} i={i}");
        }
    }
    assert!(table.cos_sin(4096).is_none());
}

#[test]
fn rotation_uses_rotate_half_pairing() {
    let table = RopeTable::new(&config(8, 10_000.0, None)).unwrap();
    // Two heads at position 3; element j pairs with j + 4 inside each head.
    let mut x: Vec<f32> = (0..16).map(|v| v as f32 * 0.25 - 1.0).collect();
    let orig = x.clone();
    apply_rope_ref(&table, &mut x, &[3], 2).unwrap();
    let (cos, sin) = table.cos_sin(3).unwrap();
    for h in 0..2 {
        for j in 0..4 {
            let (x1, x2) = (orig[h * 8 + j], orig[h * 8 + j + 4]);
            assert_eq!(x[h * 8 + j], x1 * cos[j] - x2 * sin[j]);
            assert_eq!(x[h * 8 + j + 4], x2 * cos[j] + x1 * sin[j]);
        }
    }
    // Position 0 is the identity.
    let mut y = orig.clone();
    apply_rope_ref(&table, &mut y, &[0], 2).unwrap();
    assert_eq!(y, orig);
}

#[test]
fn fast_matches_reference_bit_for_bit() {
    let mut r = rng(5);
    for head_dim in [2, 6, 18, 64, 80, 128] {
        let table = RopeTable::new(&config(head_dim, 500_000.0, None)).unwrap();
        for (tokens, n_heads) in [(1, 1), (3, 5), (37, 9)] {
            let positions: Vec<u32> = (0..tokens).map(|t| (t * 97 % 4096) as u32).collect();
            let x = uniform(&mut r, tokens * n_heads * head_dim, 2.0);
            let mut want = x.clone();
            apply_rope_ref(&table, &mut want, &positions, n_heads).unwrap();
            for pool in pools() {
                let mut got = x.clone();
                apply_rope(&pool, &table, &mut got, &positions, n_heads).unwrap();
                assert_eq!(got, want, "head_dim={head_dim} tokens={tokens} {}", pool.isa());
            }
        }
    }
}

#[test]
fn llama3_scaling_matches_hand_computed_inv_freq() {
    // Llama-3.1: head_dim 128, theta 500000, factor 8, low 1, high 4, original 8192.
    // Wavelengths below 8192 / 4 = 2048 keep their frequency, above 8192 / 1 are divided by 8,
    // in between smooth = (8192 / wavelen - 1) / 3 blends inv/8 and inv (values worked out in
    // f64 from the formula in transformers' `_compute_llama3_parameters`).
    let table = RopeTable::new(&config(
        128,
        500_000.0,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }),
    ))
    .unwrap();
    let inv = table.inv_freq();
    assert_eq!(inv.len(), 64);
    let expected = [
        (0, 1.0),                        // wavelen 6.28: kept
        (20, 0.016_560_440_080_994_446), // wavelen 379: kept
        (29, 0.002_166_570_763_503_359), // wavelen 2402: smoothed
        (30, 0.001_371_893_567_761_138_1),
        (32, 0.000_524_846_160_992_954_7),
        (34, 0.000_178_507_812_767_996_38), // wavelen 6695: smoothed
        (35, 9.556_212_353_964_683e-5),     // wavelen 8219: divided by 8
        (40, 3.428_102_195_952_591e-5),
        (63, 3.068_925_988_914_511e-7),
    ];
    for (i, want) in expected {
        let got = f64::from(inv[i]);
        assert!(((got - want) / want).abs() < 2e-6, "inv_freq[{i}] = {got}, want {want}");
    }
}

#[test]
fn linear_scaling_divides_every_frequency() {
    let plain = RopeTable::new(&config(32, 10_000.0, None)).unwrap();
    let linear = RopeTable::new(&config(32, 10_000.0, Some(RopeScaling::Linear { factor: 4.0 }))).unwrap();
    for (p, l) in plain.inv_freq().iter().zip(linear.inv_freq()) {
        assert_eq!(*l, p / 4.0);
    }
}

#[test]
fn bad_input_is_an_error() {
    assert!(RopeTable::new(&config(7, 10_000.0, None)).is_err());
    assert!(RopeTable::new(&config(0, 10_000.0, None)).is_err());
    assert!(RopeTable::new(&config(8, -1.0, None)).is_err());
    let bad_llama = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 4.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    assert!(RopeTable::new(&config(8, 10_000.0, Some(bad_llama))).is_err());
    assert!(RopeTable::new(&config(8, 1e4, Some(RopeScaling::Linear { factor: 0.0 }))).is_err());
    let table = RopeTable::new(&config(8, 10_000.0, None)).unwrap();
    let pool = &pools()[0];
    let mut x = vec![0.0; 16];
    assert!(apply_rope(pool, &table, &mut x, &[4096], 2).is_err());
    assert!(apply_rope_ref(&table, &mut x, &[4096], 2).is_err());
    assert!(apply_rope(pool, &table, &mut x, &[1, 2], 2).is_err());
    assert!(apply_rope(pool, &table, &mut x, &[1, 2], 1).is_ok());
}
