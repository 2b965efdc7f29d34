//! Which SIMD instruction set a kernel call uses.
//!
//! An [`Isa`] value held by a [`crate::CpuPool`] is always supported by the running CPU: the pool
//! checks it with [`Isa::is_supported`] when it is built, so kernels may dispatch on it without
//! re-detecting features on every call.

use std::fmt;

/// A SIMD code path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// x86-64 AVX-512 (F, BW, VL) plus AVX2+FMA: matmul uses 16-lane tiles with masked column
    /// tails; the other kernels use their AVX2 code. Opt-in through [`crate::CpuPool::with_isa`]:
    /// on AMD Zen 4, which executes 512-bit FMAs as two 256-bit halves, it measured within ±10%
    /// of AVX2 (neither reliably faster), so [`Isa::detect`] keeps AVX2. Cores with full-width
    /// AVX-512 FMA units may gain on prefill.
    Avx512,
    /// x86-64 AVX-512 (F, BW, VL) with VNNI but without BF16, as on Intel Ice Lake and Cascade
    /// Lake servers, whose two full-width FMA units make 16-lane f32 tiles twice as fast as
    /// AVX2's: matmul's f32 path takes the [`Isa::Avx512`] kernels (prefill-sized calls over
    /// packed weight panels), Q8_0 weights in row panels ([`crate::quant::panels`]) take VNNI's
    /// 16-bit integer dot products at any size as on [`Isa::Avx512Bf16`], and attention takes
    /// its AVX-512 body. There are no bf16 dot products: bf16 weights are widened to f32 in
    /// registers, and token rows are rounded only against Q8_0 weights (16 bits per block, or 8
    /// where the pool allows it, as on [`Isa::Avx512Bf16`]). Everything else runs the AVX2 code.
    Avx512Vnni,
    /// x86-64 AVX2 with fused multiply-add (and F16C, which every AVX2 CPU has), 8 f32 lanes.
    Avx2Fma,
    /// [`Isa::Avx2Fma`], plus AVX-512 BF16 and VNNI dot products for decode-sized matmuls (at most
    /// 8 token rows): against bf16 weights (and Q4_0/Q4_1 from two token rows on) the token rows
    /// are rounded to bf16 (nearest even) and each `vdpbf16ps` multiplies 32 pairs, twice the f32
    /// FMA rate; against Q8_0 weights, from two token rows on and where the call allows it
    /// (`matmul::InputRounding`), they are quantised to 8 bits per 32-value block, as ggml does,
    /// and each `vpdpbusd` multiplies 32 byte pairs; against Q8_0 weights in row panels
    /// ([`crate::quant::panels`]), at any size, they are quantised to 16 bits per block and each
    /// `vpdpwssd` multiplies 32 pairs of 16-bit values. Everything else runs the AVX2 code, so
    /// results differ from [`Isa::Avx2Fma`] only in those matmuls, by the rounding of their inputs
    /// (relative error at most 2⁻⁸ of `Σ|x·w|` for bf16; at most half a quantisation step per
    /// token value for Q8_0). Every CPU with AVX-512 BF16 so far also has VNNI; both are required.
    Avx512Bf16,
    /// Portable scalar code (written so the compiler can auto-vectorise the inner loops).
    Scalar,
}

impl Isa {
    /// The best path the running CPU supports, by measurement: [`Isa::Avx512Bf16`] where the CPU
    /// has AVX-512 BF16 and VNNI, else [`Isa::Avx512Vnni`] where it has AVX-512 and VNNI, else
    /// AVX2+FMA when present, else scalar. [`Isa::Avx512`] is opt-in (see its docs) and never
    /// chosen here.
    pub fn detect() -> Isa {
        [Isa::Avx512Bf16, Isa::Avx512Vnni, Isa::Avx2Fma]
            .into_iter()
            .find(|isa| isa.is_supported())
            .unwrap_or(Isa::Scalar)
    }

    /// Whether the running CPU can execute this path.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2Fma => avx2_fma_detected(),
            Isa::Avx512 => avx2_fma_detected() && avx512_detected(),
            Isa::Avx512Vnni => avx2_fma_detected() && avx512_detected() && avx512_vnni_detected(),
            Isa::Avx512Bf16 => avx2_fma_detected() && avx512_detected() && avx512_bf16_detected(),
        }
    }

    /// Whether this path may run the AVX2+FMA kernels (true for every x86 SIMD path).
    pub fn has_avx2(self) -> bool {
        match self {
            Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx2Fma | Isa::Avx512Bf16 => true,
            Isa::Scalar => false,
        }
    }

    /// Whether this path may run AVX-512 VNNI's integer dot products.
    pub fn has_vnni(self) -> bool {
        matches!(self, Isa::Avx512Vnni | Isa::Avx512Bf16)
    }

    /// Whether matmul's f32 path takes the 16-lane kernels (else the AVX2 or scalar ones).
    pub fn has_wide_f32_tiles(self) -> bool {
        matches!(self, Isa::Avx512 | Isa::Avx512Vnni)
    }

    /// Whether decode kernels prefetch a lone token's weight stream in software: on the
    /// AVX-512 ISAs without bf16 dot products, whose Intel cores' hardware prefetchers alone
    /// leave such a stream waiting on memory (there the 16-lane single-token driver prefetches
    /// every line, `matmul::prefetch`, and Q8_0 panels are prefetched ahead as for several
    /// tokens), but not on [`Isa::Avx512Bf16`] (AMD Zen 4), where that measured slower.
    pub fn prefetches_lone_token_streams(self) -> bool {
        self.has_wide_f32_tiles()
    }

    /// Every path the running CPU supports, widest first (for tests and benches).
    pub fn available() -> Vec<Isa> {
        [Isa::Avx512Bf16, Isa::Avx512Vnni, Isa::Avx512, Isa::Avx2Fma, Isa::Scalar]
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma_detected() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_fma_detected() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512_detected() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_detected() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512_vnni_detected() -> bool {
    is_x86_feature_detected!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_vnni_detected() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512_bf16_detected() -> bool {
    is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_bf16_detected() -> bool {
    false
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512, vnni decode",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Avx512Bf16 => "avx2+fma, avx512-bf16/vnni decode",
            Isa::Scalar => "scalar",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_is_supported_and_displays() {
        let isa = Isa::detect();
        assert!(isa.is_supported());
        assert!(Isa::available().contains(&isa));
        if Isa::Avx512Bf16.is_supported() {
            assert_eq!(isa, Isa::Avx512Bf16);
        } else if Isa::Avx512Vnni.is_supported() {
            assert_eq!(isa, Isa::Avx512Vnni);
        } else if Isa::Avx2Fma.is_supported() {
            assert_eq!(isa, Isa::Avx2Fma);
        }
        assert!(Isa::available().contains(&Isa::Scalar));
        assert_eq!(Isa::Scalar.to_string(), "scalar");
        assert_eq!(Isa::Avx2Fma.to_string(), "avx2+fma");
        assert_eq!(Isa::Avx512.to_string(), "avx512");
        // Every SIMD path implies the one below it.
        if Isa::Avx512Bf16.is_supported() {
            assert!(Isa::Avx512Vnni.is_supported());
        }
        if Isa::Avx512Vnni.is_supported() {
            assert!(Isa::Avx512.is_supported());
        }
        for isa in Isa::available() {
            assert_eq!(isa.has_vnni(), matches!(isa, Isa::Avx512Bf16 | Isa::Avx512Vnni));
        }
        if Isa::Avx512.is_supported() {
            assert!(Isa::Avx2Fma.is_supported());
        }
    }
}
