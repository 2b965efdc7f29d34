use half::bf16;
use rand::seq::SliceRandom;
use tessera_kernels::attention::{AttentionQuery, PagedKvLayer, paged_attention, paged_attention_ref};
use tessera_kernels::matmul::InputRounding;
use tessera_kernels::{CpuPool, Elem};

use crate::{assert_close, pools, rng, uniform};

/// A randomly filled cache plus, per sequence, a shuffled (non-contiguous) block table.
struct Fixture {
    k: Vec<f32>,
    v: Vec<f32>,
    block_size: usize,
    n_kv_heads: usize,
    head_dim: usize,
    tables: Vec<Vec<u32>>,
}

impl Fixture {
    fn new(seed: u64, seqs: usize, blocks_per_seq: usize, bs: usize, kvh: usize, hd: usize) -> Self {
        let mut r = rng(seed);
        // One spare block nobody uses, so tables really are a scattered subset.
        let num_blocks = seqs * blocks_per_seq + 1;
        let n = num_blocks * bs * kvh * hd;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.shuffle(&mut r);
        let tables = ids[..seqs * blocks_per_seq].chunks(blocks_per_seq).map(<[u32]>::to_vec).collect();
        Fixture {
            k: uniform(&mut r, n, 1.0),
            v: uniform(&mut r, n, 1.0),
            block_size: bs,
            n_kv_heads: kvh,
            head_dim: hd,
            tables,
        }
    }

    fn layer(&self) -> PagedKvLayer<'_> {
        PagedKvLayer {
            k: &self.k,
            v: &self.v,
            block_size: self.block_size,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// The cache rounded to bf16 (K, V).
    fn bf16_cache(&self) -> (Vec<bf16>, Vec<bf16>) {
        (self.k.iter().map(|&x| bf16::from_f32(x)).collect(), self.v.iter().map(|&x| bf16::from_f32(x)).collect())
    }

    /// A layer over `cache` with this fixture's geometry.
    fn layer_of<'a>(&self, cache: &'a (Vec<bf16>, Vec<bf16>)) -> PagedKvLayer<'a, bf16> {
        PagedKvLayer {
            k: &cache.0,
            v: &cache.1,
            block_size: self.block_size,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// Row of K or V for (sequence, position, kv head), read through the block table.
    fn row<'a>(&self, cache: &'a [f32], seq: usize, p: usize, kvh: usize) -> &'a [f32] {
        let block = self.tables[seq][p / self.block_size] as usize;
        let off = ((block * self.n_kv_heads + kvh) * self.block_size + p % self.block_size) * self.head_dim;
        &cache[off..off + self.head_dim]
    }
}

/// Dense f64 attention written independently of the kernels.
fn dense(f: &Fixture, q: &[f32], qs: &[(usize, AttentionQuery)], n_heads: usize) -> Vec<f32> {
    let hd = f.head_dim;
    let group = n_heads / f.n_kv_heads;
    let mut out = Vec::new();
    for (t, (seq, qr)) in qs.iter().enumerate() {
        for h in 0..n_heads {
            let qh = &q[(t * n_heads + h) * hd..][..hd];
            let ps: Vec<usize> = (qr.window_start..qr.context_len).collect();
            let s: Vec<f64> = ps
                .iter()
                .map(|&p| {
                    let k = f.row(&f.k, *seq, p, h / group);
                    let d: f64 = qh.iter().zip(k).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                    d / (hd as f64).sqrt()
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let acc: f64 =
                    ps.iter().zip(&e).map(|(&p, w)| w / z * f64::from(f.row(&f.v, *seq, p, h / group)[d])).sum();
                out.push(acc as f32);
            }
        }
    }
    out
}

fn run_case(f: &Fixture, n_heads: usize, qs: &[(usize, AttentionQuery)], seed: u64) {
    let row = n_heads * f.head_dim;
    let q = uniform(&mut rng(seed), qs.len() * row, 1.0);
    let queries: Vec<AttentionQuery> = qs.iter().map(|(_, q)| *q).collect();
    let mut want = vec![0.0; q.len()];
    paged_attention_ref(&q, &queries, &f.layer(), n_heads, &mut want).unwrap();
    // Reference vs dense f64 maths: f32 rounding only.
    assert_close("ref vs dense", &want, &dense(f, &q, qs, n_heads), 1e-4, 1e-5);
    for pool in pools() {
        let mut got = vec![f32::NAN; q.len()];
        paged_attention(&pool, &q, &queries, &f.layer(), n_heads, &mut got).unwrap();
        // Reordered dot products and polynomial exp: 1e-5 relative, 1e-6 absolute.
        assert_close(&format!("fast {} x{}", pool.isa(), pool.threads()), &got, &want, 1e-5, 1e-6);
    }
    // A bf16 cache. Pools that keep their inputs exact widen its entries exactly, so they must
    // match the f32 kernels on the same (rounded) values; those that allow bf16 inputs may round
    // the query and the softmax weights to bf16 (the AVX-512 BF16 dot products), each moving by
    // at most 2⁻⁹ of itself: the scores by 2⁻⁹ of `scale · Σ|q k|` (at most 2⁻⁹ here: `|q|, |k| ≤ 1`
    // and `scale = head_dim^-½` bound it by `√head_dim`), so each weight by about `2⁻⁹ (1 + 2 √hd)`
    // relative, and the output, a weighted mean of values of at most 1, by twice that.
    let cache = f.bf16_cache();
    let layer_b = f.layer_of(&cache);
    let rounded = Fixture {
        k: cache.0.iter().map(|x| x.to_f32()).collect(),
        v: cache.1.iter().map(|x| x.to_f32()).collect(),
        tables: f.tables.clone(),
        ..*f
    };
    let mut want_b = vec![0.0; q.len()];
    paged_attention_ref(&q, &queries, &layer_b, n_heads, &mut want_b).unwrap();
    assert_close("bf16 ref vs dense", &want_b, &dense(&rounded, &q, qs, n_heads), 1e-4, 1e-5);
    let rounding_bound = 2.0 * (1.0 + 2.0 * (f.head_dim as f32).sqrt()) / 512.0;
    for rounding in [InputRounding::Exact, InputRounding::Bf16] {
        for pool in pools().into_iter().map(|p| p.with_input_rounding(rounding)) {
            let mut got = vec![f32::NAN; q.len()];
            paged_attention(&pool, &q, &queries, &layer_b, n_heads, &mut got).unwrap();
            let what = format!("fast bf16 cache {} x{} {rounding:?}", pool.isa(), pool.threads());
            let abs = if rounding == InputRounding::Exact { 1e-6 } else { rounding_bound };
            assert_close(&what, &got, &want_b, 1e-5, abs);
        }
    }
}

fn query(table: &[u32], context_len: usize, window_start: usize) -> AttentionQuery<'_> {
    AttentionQuery { block_table: table, context_len, window_start }
}

#[test]
fn gqa_shuffled_blocks_and_windows() {
    // 32 to 128: the bf16 dot products' one to four chunks per row; 12, 16 and 136 are not whole
    // chunks (the f32 kernels take them).
    for head_dim in [16, 12, 32, 64, 96, 128, 136] {
        let f = Fixture::new(21, 3, 6, 4, 2, head_dim);
        let t = &f.tables;
        let qs = [
            (0, query(&t[0], 1, 0)), // context_len 1
            (0, query(&t[0], 2, 0)),
            (1, query(&t[1], 23, 0)),  // ends mid-block
            (1, query(&t[1], 24, 0)),  // all six blocks
            (2, query(&t[2], 17, 9)),  // sliding window starting mid-block
            (2, query(&t[2], 13, 12)), // window of one position
        ];
        // Groups of 3, 4 and 7 query heads per KV head: whole and partial passes of the SIMD
        // kernels' three-heads-at-a-time grouping.
        for n_heads in [6, 8, 14] {
            run_case(&f, n_heads, &qs, 31);
        }
    }
}

/// The x86 kernels take a group's heads one (AVX2) or three (AVX-512) at a time, but form each
/// head's sums in the same order, so every SIMD path gives the same bits.
#[test]
fn simd_paths_agree_bit_for_bit() {
    let f = Fixture::new(12, 2, 5, 16, 2, 64);
    let t = &f.tables;
    let queries = [query(&t[0], 80, 0), query(&t[1], 37, 0), query(&t[1], 70, 20)];
    let n_heads = 14;
    let q = uniform(&mut rng(13), queries.len() * n_heads * 64, 1.0);
    let mut outs = Vec::new();
    for pool in pools().into_iter().filter(|p| p.isa().has_avx2()) {
        let mut out = vec![0.0f32; q.len()];
        paged_attention(&pool, &q, &queries, &f.layer(), n_heads, &mut out).unwrap();
        outs.push((pool.isa(), out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()));
    }
    for (isa, bits) in &outs[1..] {
        assert!(*bits == outs[0].1, "{isa} differs from {}", outs[0].0);
    }
}

/// A lone sequence's few (query, KV head) pairs are cut into chunk tasks that several threads
/// share and the calling thread merges; a full batch runs each pair's chunks in one task. Both
/// must give every head the same bits, whatever the pool's size or the rest of the batch.
#[test]
fn results_do_not_depend_on_how_the_chunks_are_shared_out() {
    let f = Fixture::new(17, 4, 48, 16, 2, 64);
    let t = &f.tables;
    // Contexts of several chunks (the last partial), of one, and a sliding window cutting the
    // first block.
    let lone = [query(&t[0], 700, 0), query(&t[1], 40, 0), query(&t[2], 751, 37)];
    let n_heads = 6;
    let row = n_heads * 64;
    let others = [query(&t[3], 200, 0), query(&t[3], 90, 0), query(&t[1], 250, 0)];
    let q = uniform(&mut rng(23), 4 * row, 1.0);
    let cache = f.bf16_cache();
    for pool in pools() {
        // An f32 cache, and a bf16 one (on the AVX-512 BF16 ISA, its bf16 dot products).
        for (cache, ok) in [
            ("f32", shared_out_agrees(&pool, &f.layer(), &q, &lone, &others)),
            ("bf16", shared_out_agrees(&pool, &f.layer_of(&cache), &q, &lone, &others)),
        ] {
            if let Err(i) = ok {
                panic!("{cache} cache, query {i} on {} x{}: alone and batched differ", pool.isa(), pool.threads());
            }
        }
    }
}

/// Whether each of `lone` gets the same bits alone and as the first of a batch with `others`
/// (else the first that does not).
fn shared_out_agrees<E: Elem>(
    pool: &CpuPool,
    layer: &PagedKvLayer<E>,
    q: &[f32],
    lone: &[AttentionQuery],
    others: &[AttentionQuery; 3],
) -> Result<(), usize> {
    let n_heads = 6;
    let row = n_heads * layer.head_dim;
    for (i, qr) in lone.iter().enumerate() {
        // Alone: two pairs, so a pool of two threads cuts them into chunk tasks.
        let mut alone = vec![0.0f32; row];
        paged_attention(pool, &q[..row], &[*qr], layer, n_heads, &mut alone).unwrap();
        // First of a batch of four: eight pairs, one task each.
        let batch = [*qr, others[0], others[1], others[2]];
        let mut batched = vec![0.0f32; 4 * row];
        paged_attention(pool, q, &batch, layer, n_heads, &mut batched).unwrap();
        if alone.iter().zip(&batched[..row]).any(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(i);
        }
    }
    Ok(())
}

#[test]
fn context_len_one_returns_the_value_row() {
    let f = Fixture::new(4, 1, 1, 8, 1, 33);
    let qs = [(0, query(&f.tables[0], 1, 0))];
    let q = uniform(&mut rng(5), 2 * 33, 1.0);
    let want = f.row(&f.v, 0, 0, 0);
    for pool in pools() {
        let mut out = vec![0.0; 66];
        paged_attention(&pool, &q, &[qs[0].1], &f.layer(), 2, &mut out).unwrap();
        assert_close("head 0", &out[..33], want, 0.0, 1e-7);
        assert_close("head 1", &out[33..], want, 0.0, 1e-7);
    }
}

#[test]
fn long_context() {
    let f = Fixture::new(8, 2, 200, 16, 3, 64);
    let t = &f.tables;
    let qs = [(0, query(&t[0], 3200, 0)), (1, query(&t[1], 2999, 1000))];
    run_case(&f, 9, &qs, 9);
}

#[test]
fn bad_input_is_an_error() {
    let f = Fixture::new(1, 1, 2, 4, 2, 8);
    let pool = &pools()[0];
    let kv = f.layer();
    let q = vec![0.0; 4 * 8];
    let mut out = vec![0.0; 4 * 8];
    let num_blocks = (f.k.len() / (4 * 2 * 8)) as u32;
    let check = |queries: &[AttentionQuery], n_heads: usize, out: &mut [f32]| {
        let fast = paged_attention(pool, &q, queries, &kv, n_heads, out);
        let slow = paged_attention_ref(&q, queries, &kv, n_heads, out);
        fast.is_err() && slow.is_err()
    };
    let out_of_range = [0, num_blocks];
    assert!(check(&[query(&out_of_range, 5, 0)], 4, &mut out));
    assert!(!check(&[query(&out_of_range, 4, 0)], 4, &mut out), "second block unused");
    assert!(check(&[query(&f.tables[0], 9, 0)], 4, &mut out), "table too short");
    assert!(check(&[query(&f.tables[0], 0, 0)], 4, &mut out), "empty context");
    assert!(check(&[query(&f.tables[0], 5, 5)], 4, &mut out), "empty window");
    assert!(check(&[query(&f.tables[0], 5, 0)], 3, &mut out[..24]), "heads not a multiple");
    assert!(check(&[query(&f.tables[0], 5, 0)], 4, &mut out[..31]), "out length");
    let bad_kv = PagedKvLayer { k: &f.k[..f.k.len() - 1], ..kv };
    let queries = [query(&f.tables[0], 5, 0)];
    assert!(paged_attention(pool, &q, &queries, &bad_kv, 4, &mut out).is_err());
    assert!(paged_attention_ref(&q, &queries, &bad_kv, 4, &mut out).is_err());
}
