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

// Sum over the whole block; every thread gets the result. blockDim.x must be a multiple of 32
// (at most 1024) and every thread must call it. Safe to call several times in a row.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // a previous call may still be reading `scratch`
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
