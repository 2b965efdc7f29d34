//! Load-time tuning of the CUDA backend: which batch-1 decode products run on the GEMV kernel
//! rather than cuBLASLt, and which of cuBLASLt's candidate algorithms each runs, timed on the
//! device and kept as a record per device, cuBLASLt version, set of kernel sources and model
//! shape under `<cache>/cuda-tuning/`. Invariant: once a record exists, every process on that
//! device makes the same choices, so seeded sampling reproduces across runs.

use std::path::Path;

use cudarc::driver::CudaSlice;
use half::bf16;
use tessera_kernels::cuda::CudaError;
use tessera_kernels::cuda::device::kernel_sources_hash;
use tessera_kernels::cuda::gemm::Gemm;
use tessera_kernels::cuda::plan::{ProductTiming, gemv_fits};

use super::{CudaBackend, Layer};

impl CudaBackend {
    /// The batch-1 product timings that choose between the GEMV kernel and cuBLASLt, measured
    /// once per device, kernel sources and model shape and kept under `<cache>/cuda-tuning/`:
    /// the two kernels round differently, so a choice re-measured by every process could flip
    /// on timing noise and make two runs of the same seeded request differ. A record that cannot
    /// be read is measured again; one that cannot be written only costs a measurement next time.
    /// Returns them with a line saying where they came from.
    pub(super) fn decode_product_timings(&self, cache_dir: &Path) -> Result<(Vec<ProductTiming>, String), CudaError> {
        let products = self.decode_products();
        let shapes: Vec<String> = products.iter().map(|p| format!("{} {} {}", p.name, p.out, p.inner)).collect();
        let identity = format!(
            "{}\ncuBLASLt {}\n{:016x}\n{}",
            self.dev.describe(),
            Gemm::version(),
            kernel_sources_hash(),
            shapes.join("\n")
        );
        let key = xxhash_rust::xxh3::xxh3_64(identity.as_bytes());
        let path = cache_dir.join("cuda-tuning").join(format!("{key:016x}.txt"));
        let names: Vec<&'static str> = products.iter().map(|p| p.name).collect();
        if let Ok(text) = std::fs::read_to_string(&path) {
            let record: Option<Vec<ProductTiming>> =
                text.lines().map(|l| ProductTiming::from_line(l, &names)).collect();
            let matches = |t: &Vec<ProductTiming>| {
                t.len() == products.len()
                    && t.iter().zip(&products).all(|(t, p)| (t.name, t.out, t.inner) == (p.name, p.out, p.inner))
            };
            if let Some(timings) = record.filter(matches) {
                return Ok((timings, format!("decode product timings read from {}", path.display())));
            }
        }
        let timings = self.time_decode_products(&products)?;
        if let Some(dir) = path.parent()
            && std::fs::create_dir_all(dir).is_ok()
        {
            let text: String = timings.iter().map(|t| t.to_line() + "\n").collect();
            let tmp = path.with_extension(format!("txt.{}", std::process::id()));
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
        Ok((timings, format!("decode product timings measured now, kept in {}", path.display())))
    }

    /// The batch-1 decode products that may take the GEMV kernel.
    fn decode_products(&self) -> Vec<DecodeProduct<'_>> {
        let c = &self.config;
        let (h, qd, kvd, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let per_layer = |f: fn(&Layer) -> &CudaSlice<bf16>| self.layers.iter().map(f).collect::<Vec<_>>();
        let product = |name, out, inner, weights| DecodeProduct { name, out, inner, weights };
        let products = [
            product("qkv", qd + 2 * kvd, h, per_layer(|l| &l.qkv_proj)),
            product("o", h, qd, per_layer(|l| &l.o_proj)),
            product("gate_up", 2 * ffn, h, per_layer(|l| &l.gate_up_proj)),
            product("down", h, ffn, per_layer(|l| &l.down_proj)),
            product("lm_head", c.vocab_size, h, vec![head]),
        ];
        products.into_iter().filter(|p| !p.weights.is_empty() && gemv_fits(1, p.inner)).collect()
    }

    /// Makes each product's cuBLASLt plan run the candidate its timing chose.
    pub(super) fn apply_cublas_choices(&self, timings: &[ProductTiming]) -> Result<(), CudaError> {
        for t in timings {
            self.gemm.choose(1, t.out, t.inner, t.cublas_algo)?;
        }
        Ok(())
    }

    /// Times each of `products` with the GEMV kernel and with each of cuBLASLt's candidate
    /// algorithms. Each timed pass walks every layer's matrix once (the LM head's, several
    /// times), so the weights come from memory as in a decode step rather than from the L2 cache.
    /// As in a decode step, a small kernel (a one-row norm) runs before every product: the GEMV
    /// starts under it and loads its first weights early, which a product timed alone would not
    /// show. Both timings include that norm.
    fn time_decode_products(&self, products: &[DecodeProduct<'_>]) -> Result<Vec<ProductTiming>, CudaError> {
        let stream = self.dev.stream();
        let (h, eps) = (self.config.hidden_size, self.config.rms_norm_eps);
        let mut lead = (stream.alloc_zeros::<f32>(h)?, stream.alloc_zeros::<bf16>(h)?);
        let mut timings = Vec::with_capacity(products.len());
        for &DecodeProduct { name, out, inner, ref weights } in products {
            let x = stream.alloc_zeros::<bf16>(inner)?;
            let mut y = stream.alloc_zeros::<bf16>(out)?;
            let calls = weights.len().max(8);
            // The lead norm, then the product on layer `i`'s matrix by the GEMV or cuBLASLt.
            let mut run = |gemv: bool, i: usize| {
                let (lead_x, lead_out) = &mut lead;
                self.dev.add_rmsnorm(lead_x, None, &self.norm, lead_out, 1, h, eps)?;
                let w = weights[i % weights.len()];
                if gemv {
                    self.dev.gemv(&x, w, &mut y, 1, out, inner)
                } else {
                    self.gemm.matmul(&x, w, &mut y, 1, out, inner)
                }
            };
            let candidates = self.gemm.candidates(1, out, inner)?;
            // A warm-up pass each (plans, module loads), then the best of three alternating
            // passes, every kernel and candidate in each.
            self.dev.time_us(calls, |i| run(true, i))?;
            for algo in 0..candidates {
                self.gemm.choose(1, out, inner, algo)?;
                self.dev.time_us(calls, |i| run(false, i))?;
            }
            let mut gemv_us = f64::INFINITY;
            let mut cublas_us = vec![f64::INFINITY; candidates];
            for _ in 0..3 {
                gemv_us = gemv_us.min(self.dev.time_us(calls, |i| run(true, i))?);
                for (algo, best) in cublas_us.iter_mut().enumerate() {
                    self.gemm.choose(1, out, inner, algo)?;
                    *best = best.min(self.dev.time_us(calls, |i| run(false, i))?);
                }
            }
            // The heuristic's own first pick unless another candidate is strictly faster (the
            // backend applies the choice, as for a record read from disk).
            let (cublas_algo, cublas_us) =
                cublas_us.iter().copied().enumerate().fold((0, cublas_us[0]), |b, c| if c.1 < b.1 { c } else { b });
            timings.push(ProductTiming { name, out, inner, gemv_us, cublas_us, cublas_algo });
        }
        Ok(timings)
    }
}

/// A batch-1 decode product `y (1, out) = x (1, inner) · wᵀ`, with the weight of every layer.
struct DecodeProduct<'a> {
    name: &'static str,
    out: usize,
    inner: usize,
    weights: Vec<&'a CudaSlice<bf16>>,
}
