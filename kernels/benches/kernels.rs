//! Criterion benches of the fast kernels at SmolLM-like sizes (hidden 576, MLP 1536).
//!
//! `cargo bench -p tessera-kernels` — decode matmuls report weight bytes/s (compare with the
//! read bandwidth printed first), prefill matmuls report FLOP/s as elements/s.
#![expect(missing_docs, reason = "criterion_group! generates an undocumented pub fn")]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;
use tessera_kernels::attention::{AttentionQuery, PagedKvLayer, paged_attention};
use tessera_kernels::bandwidth::measure_read_bandwidth;
use tessera_kernels::matmul::matmul;
use tessera_kernels::norm::rms_norm;
use tessera_kernels::{CpuPool, WeightData, WeightMatrix};

fn pool() -> CpuPool {
    match CpuPool::new(0) {
        Ok(p) => p,
        Err(e) => panic!("thread pool: {e}"),
    }
}

fn data(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect()
}

fn bench_matmul(c: &mut Criterion) {
    let pool = pool();
    let bw = measure_read_bandwidth(&pool, 256 << 20, 5);
    eprintln!(
        "read bandwidth ({} threads, {}): best {:.1} GB/s, median {:.1} GB/s",
        pool.threads(),
        pool.isa(),
        bw.best_gb_per_s,
        bw.median_gb_per_s
    );
    for (rows, cols) in [(576, 576), (1536, 576)] {
        let wf = data(rows * cols);
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        for (name, wd) in [("f32", WeightData::F32(&wf)), ("bf16", WeightData::Bf16(&wb))] {
            let w = match WeightMatrix::new(wd, rows, cols) {
                Ok(w) => w,
                Err(e) => panic!("{e}"),
            };
            for m in [1usize, 128] {
                let mut g = c.benchmark_group(if m == 1 { "matmul_decode" } else { "matmul_prefill" });
                g.throughput(if m == 1 {
                    Throughput::Bytes(w.bytes() as u64)
                } else {
                    Throughput::Elements((2 * m * rows * cols) as u64)
                });
                let x = data(m * cols);
                let mut y = vec![0.0; m * rows];
                g.bench_function(BenchmarkId::new(format!("{rows}x{cols}_{name}"), m), |b| {
                    b.iter(|| matmul(&pool, black_box(&x), m, &w, &mut y))
                });
                g.finish();
            }
        }
    }
}

fn bench_rms_norm(c: &mut Criterion) {
    let pool = pool();
    let (tokens, d) = (128, 576);
    let x = data(tokens * d);
    let w = data(d);
    let mut out = vec![0.0; tokens * d];
    let mut g = c.benchmark_group("rms_norm");
    g.throughput(Throughput::Elements((tokens * d) as u64));
    g.bench_function("128x576", |b| b.iter(|| rms_norm(&pool, black_box(&x), &w, 1e-5, &mut out)));
    g.finish();
}

fn bench_attention(c: &mut Criterion) {
    let pool = pool();
    let (bs, kvh, hd, n_heads, max_ctx) = (16, 3, 64, 9, 2048);
    let blocks = max_ctx / bs;
    let k = data(blocks * bs * kvh * hd);
    let v = data(blocks * bs * kvh * hd);
    // Reverse order: a non-contiguous block table.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let kv = PagedKvLayer { k: &k, v: &v, block_size: bs, n_kv_heads: kvh, head_dim: hd };
    let mut g = c.benchmark_group("paged_attention");
    // Decode of 1 and 8 sequences at a short and a long context, and a chunk of 16 prompt tokens.
    for (ctx, n_queries) in [(160, 1usize), (160, 8), (2048, 1), (2048, 8), (2048, 16)] {
        let queries: Vec<AttentionQuery> = (0..n_queries)
            .map(|i| {
                let context_len = if n_queries == 16 { ctx - n_queries + 1 + i } else { ctx };
                AttentionQuery { block_table: &table, context_len, window_start: 0 }
            })
            .collect();
        let q = data(n_queries * n_heads * hd);
        let mut out = vec![0.0; q.len()];
        g.bench_function(BenchmarkId::new(format!("ctx{ctx}_h9_kv3_d64"), n_queries), |b| {
            b.iter(|| paged_attention(&pool, black_box(&q), &queries, &kv, n_heads, &mut out))
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_matmul, bench_rms_norm, bench_attention
}
criterion_main!(benches);
