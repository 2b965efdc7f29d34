// Matrix-vector products for small batches: y (m, n) = x (m, k) · w (n, k)^T, bf16 in and out,
// f32 accumulation, for 1 <= m <= 4 (decode steps of a few sequences, where the product is a
// stream over the weights and a GEMM library's tiles would leave bandwidth unused).
//
// gemv_bf16: grid (ceil(n / 4)), blockDim exactly 128: warp w of block b computes output column
// j = 4 * b + w for all m rows. k a multiple of 8 and x, w 16-byte aligned (rejected otherwise on
// the host). Each lane streams 16-byte chunks of w's row j, eight loads in flight before the
// first is used; x's chunks are re-read through the read-only cache (x is small and shared by
// every warp). The lanes' partial sums are added with a butterfly.
//
// Launched with programmatic stream serialization (sm_90+), the kernel starts while the kernel
// before it (a norm, attention or SiLU, which let it) still runs: the first eight chunks of each
// row are loaded before grid_dependency_wait(), since weights are never written, and x is read
// and y written only after it.

#define TS_GEMV_WARPS 4
#define TS_GEMV_UNROLL 8

// Loads the TS_GEMV_UNROLL chunks of row `wr` that lane-group step `c0` covers (zeros past the end).
__device__ __forceinline__ void gemv_load(const uint4* __restrict__ wr, int c0, int chunks, uint4* wv) {
#pragma unroll
    for (int u = 0; u < TS_GEMV_UNROLL; ++u) {
        const int c = c0 + 32 * u;
        wv[u] = c < chunks ? __ldg(wr + c) : make_uint4(0u, 0u, 0u, 0u);
    }
}

template <int M>
__device__ __forceinline__ void gemv_warp(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w,
                                          bf16_t* __restrict__ y, int n, int k, int j, int lane) {
    const uint4* wr = reinterpret_cast<const uint4*>(w + (long long)j * k);
    const int chunks = k >> 3;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.0f;
    uint4 wv[TS_GEMV_UNROLL];
    gemv_load(wr, lane, chunks, wv);
    grid_dependency_wait();  // x comes from the kernel before
    for (int c0 = lane; c0 < chunks; c0 += 32 * TS_GEMV_UNROLL) {
        if (c0 != lane) gemv_load(wr, c0, chunks, wv);
#pragma unroll
        for (int u = 0; u < TS_GEMV_UNROLL; ++u) {
            const int c = c0 + 32 * u;
            if (c < chunks) {
                float wf[8];
                unpack_bf16x8(wv[u], wf);
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    float xf[8];
                    unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(x + (long long)m * k) + c), xf);
                    float a = acc[m];
#pragma unroll
                    for (int e = 0; e < 8; ++e) a = fmaf(wf[e], xf[e], a);
                    acc[m] = a;
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const float s = warp_sum(acc[m]);
        if (lane == 0) y[(long long)m * n + j] = f32_to_bf16(s);
    }
}

extern "C" __global__ void __launch_bounds__(32 * TS_GEMV_WARPS)
    gemv_bf16(const bf16_t* __restrict__ x, const bf16_t* __restrict__ w, bf16_t* __restrict__ y, int m, int n,
              int k) {
    const int lane = threadIdx.x & 31, j = blockIdx.x * TS_GEMV_WARPS + (threadIdx.x >> 5);
    if (j >= n || blockDim.x != 32 * TS_GEMV_WARPS || (k & 7) != 0) return;  // whole warps leave together
    switch (m) {
        case 1: gemv_warp<1>(x, w, y, n, k, j, lane); break;
        case 2: gemv_warp<2>(x, w, y, n, k, j, lane); break;
        case 3: gemv_warp<3>(x, w, y, n, k, j, lane); break;
        case 4: gemv_warp<4>(x, w, y, n, k, j, lane); break;
        default: break;
    }
}
