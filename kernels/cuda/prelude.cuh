// Prelude shared by every kernel file: the host prepends it to each `.cu` source before NVRTC
// compiles it, so it must stand alone (no #include; NVRTC runs without include paths).
//
// Conventions for all kernels:
// - bf16 values are stored as raw `unsigned short` bits (`bf16_t`); arithmetic is in f32.
// - f32 -> bf16 rounds to nearest even; NaN stays NaN (quiet).
// - Index arithmetic that can pass 2^31 (row * width over big buffers) is done in 64 bits.
// - 16-byte vector paths (`uint4` = 8 bf16, `float4` = 4 f32) are taken only when the row
//   length allows it and the pointers are 16-byte aligned; otherwise a scalar path runs.

typedef unsigned short bf16_t;

#define TS_FULL_MASK 0xffffffffu
#define TS_NEG_INF (__uint_as_float(0xff800000u))
#define TS_LOG2E 1.4426950408889634f
#define TS_LN2 0.6931471805599453f

__device__ __forceinline__ float bf16_to_f32(bf16_t v) { return __uint_as_float(((unsigned)v) << 16); }

__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x0040u);  // NaN: keep it quiet
    u += 0x7fffu + ((u >> 16) & 1u);                                            // round to nearest even
    return (bf16_t)(u >> 16);
}

// The low and high bf16 of a 32-bit word (element 2k is the low half: little-endian memory).
__device__ __forceinline__ float bf16_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    return (unsigned)f32_to_bf16(lo) | ((unsigned)f32_to_bf16(hi) << 16);
}

// 8 bf16 <-> 8 f32 through one 16-byte word.
__device__ __forceinline__ void unpack_bf16x8(uint4 w, float* f) {
    f[0] = bf16_lo(w.x); f[1] = bf16_hi(w.x); f[2] = bf16_lo(w.y); f[3] = bf16_hi(w.y);
    f[4] = bf16_lo(w.z); f[5] = bf16_hi(w.z); f[6] = bf16_lo(w.w); f[7] = bf16_hi(w.w);
}
__device__ __forceinline__ uint4 pack_bf16x8(const float* f) {
    uint4 w;
    w.x = pack_bf16x2(f[0], f[1]); w.y = pack_bf16x2(f[2], f[3]);
    w.z = pack_bf16x2(f[4], f[5]); w.w = pack_bf16x2(f[6], f[7]);
    return w;
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (((unsigned long long)p) & 15ull) == 0ull;
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// Butterfly reductions: every lane of the warp gets the result. All 32 lanes must call.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(TS_FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(TS_FULL_MASK, v, o));
    return v;
}

// Sum (block_sum) or maximum (block_max) over the whole block; every thread gets the result.
// blockDim.x must be a multiple of 32 (at most 1024) and every thread must call it. Safe to call
// several times in a row.
template <bool kMax> __device__ __forceinline__ float block_reduce(float v) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = kMax ? warp_max(v) : warp_sum(v);
    __syncthreads();  // a previous call may still be reading `scratch`
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : (kMax ? TS_NEG_INF : 0.0f);
    return kMax ? warp_max(v) : warp_sum(v);
}
__device__ __forceinline__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ __forceinline__ float block_max(float v) { return block_reduce<true>(v); }

// ---- Tensor cores and asynchronous copies (sm_80+), with plain-C++ fallbacks ----
// On sm_80 and later these are single PTX instructions. Elsewhere (older GPUs, and the CPU
// emulation of kernels/gpu/emu) they are spelled out with warp shuffles and plain copies, with
// exactly the PTX fragment layouts: slower, but the same results, so the kernels that use them
// run everywhere and can be tested without a GPU.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define TS_SM80 1
#else
#define TS_SM80 0
#endif
//
// Fragment layouts of mma.m16n8k16 (lane = 4 * g + t, g = lane / 4, t = lane % 4; each 32-bit
// register holds two bf16, the lower column or row index in the low half):
//   A (16 x 16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16 x 8, k x n):      b0 = B[2t..2t+1][g],  b1 = B[2t+8..2t+9][g]
//   C (16 x 8, f32):        c0, c1 = C[g][2t], C[g][2t+1];  c2, c3 = C[g+8][2t], C[g+8][2t+1]

// Shared-memory address of a generic pointer into shared memory (for ldmatrix / cp.async).
__device__ __forceinline__ unsigned smem_u32(const void* p) {
#if TS_SM80
    unsigned a;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
#else
    (void)p;
    return 0u;
#endif
}

// Two f32 -> bf16 (round to nearest even), lo in the low half.
__device__ __forceinline__ unsigned pack_bf16x2_rn(float lo, float hi) {
#if TS_SM80
    unsigned d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
#else
    return pack_bf16x2(lo, hi);
#endif
}

// c += A * B for one m16n8k16 tile, bf16 inputs, f32 accumulation. All 32 lanes must call.
__device__ __forceinline__ void mma_bf16_16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#if TS_SM80
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    // Each lane publishes its fragments in shared memory, then reads the rows and columns it
    // needs (two warp barriers instead of a shuffle per element).
    __shared__ unsigned frag[32][32][6];  // [warp][lane][a0..a3, b0, b1]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    unsigned* mine = frag[warp][lane];
    mine[0] = a[0]; mine[1] = a[1]; mine[2] = a[2]; mine[3] = a[3]; mine[4] = b0; mine[5] = b1;
    __syncwarp();
    float acc[4] = {c[0], c[1], c[2], c[3]};
    for (int kp = 0; kp < 8; ++kp) {  // k pairs: k = 2 * (kp % 4) + 8 * (kp / 4) + {0, 1}
        const int hi8 = kp >> 2, src = kp & 3;
        const unsigned a_lo = frag[warp][4 * g + src][2 * hi8];                  // A[g][k..k+1]
        const unsigned a_hi = frag[warp][4 * g + src][2 * hi8 + 1];              // A[g+8][k..k+1]
        const unsigned b_c0 = frag[warp][4 * (2 * t) + src][4 + hi8];            // B[k..k+1][2t]
        const unsigned b_c1 = frag[warp][4 * (2 * t + 1) + src][4 + hi8];        // B[k..k+1][2t+1]
        acc[0] += bf16_lo(a_lo) * bf16_lo(b_c0) + bf16_hi(a_lo) * bf16_hi(b_c0);
        acc[1] += bf16_lo(a_lo) * bf16_lo(b_c1) + bf16_hi(a_lo) * bf16_hi(b_c1);
        acc[2] += bf16_lo(a_hi) * bf16_lo(b_c0) + bf16_hi(a_hi) * bf16_hi(b_c0);
        acc[3] += bf16_lo(a_hi) * bf16_lo(b_c1) + bf16_hi(a_hi) * bf16_hi(b_c1);
    }
    c[0] = acc[0]; c[1] = acc[1]; c[2] = acc[2]; c[3] = acc[3];
    __syncwarp();  // the next call overwrites `frag`
#endif
}

// ldmatrix.x4: four 8x8 bf16 matrices; lane l passes the address of row (l % 8) of matrix
// (l / 8) (16-byte aligned). Plain: r[j] = M_j[g][2t..2t+1]. Transposed: r[j] = M_j[2t..2t+1][g]
// (two rows, one column), which is the B fragment of a row-major (k x n) matrix.
template <bool kTrans> __device__ __forceinline__ void ldmatrix_x4(unsigned* r, const bf16_t* row_ptr) {
#if TS_SM80
    const unsigned a = smem_u32(row_ptr);
    if constexpr (kTrans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#else
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    for (int j = 0; j < 4; ++j) {
        if (kTrans) {
            const bf16_t* p0 = __shfl_sync(TS_FULL_MASK, row_ptr, 8 * j + 2 * t);
            const bf16_t* p1 = __shfl_sync(TS_FULL_MASK, row_ptr, 8 * j + 2 * t + 1);
            r[j] = (unsigned)p0[g] | ((unsigned)p1[g] << 16);
        } else {
            const bf16_t* p = __shfl_sync(TS_FULL_MASK, row_ptr, 8 * j + g);
            r[j] = (unsigned)p[2 * t] | ((unsigned)p[2 * t + 1] << 16);
        }
    }
#endif
}

// 16-byte global -> shared copy that completes asynchronously (zero-fills when !valid; `src`
// must still be a valid address). Complete with cp_async_wait_all() plus a barrier.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if TS_SM80
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
#else
    *reinterpret_cast<uint4*>(dst) = valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if TS_SM80
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if TS_SM80
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// ---- Programmatic dependent launch (sm_90+; no-ops elsewhere and in the CPU emulation) ----
// A kernel launched with programmatic stream serialization (the host does so for gemv_bf16 on
// sm_90+) may start before the kernel ahead of it in the stream has finished, once every block
// of that kernel has called grid_dependents_launch() or exited. It must call
// grid_dependency_wait() before it reads anything the earlier kernel writes or writes anything
// at all: that waits for the earlier kernel to complete with its memory visible. Without such
// a launch both are no-ops, so any kernel may call them.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
