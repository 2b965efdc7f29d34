// Sampling helpers on the device, so only token ids (or one row of logits) come back.
//
// argmax_rows: out[r] = argmax_j f32(logits[r, j]) over a (rows, vocab) bf16 matrix; ties go
// to the lowest index and NaN never wins (a row of only NaN gives 0).
// Grid (rows), blockDim a multiple of 32 up to 1024 (256 is a good choice).
//
// bf16_rows_to_f32: out[i] = f32(in[i]) for i < n. Grid-stride: any grid, any blockDim.

// Is (v, i) better than (bv, bi)? Larger value, then lower index; NaN compares false.
__device__ __forceinline__ bool argmax_better(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi);
}

extern "C" __global__ void argmax_rows(const bf16_t* __restrict__ logits, int vocab, unsigned* __restrict__ out) {
    __shared__ float s_val[32];
    __shared__ int s_idx[32];
    const bf16_t* row = logits + (long long)blockIdx.x * vocab;
    float bv = TS_NEG_INF;
    int bi = vocab;  // sentinel: nothing seen yet (an index that cannot win a tie)
    if ((vocab & 7) == 0 && aligned16(row)) {
        const uint4* r8 = reinterpret_cast<const uint4*>(row);
        for (int c = threadIdx.x; c < (vocab >> 3); c += blockDim.x) {
            float f[8];
            unpack_bf16x8(r8[c], f);
#pragma unroll
            for (int k = 0; k < 8; ++k)
                if (argmax_better(f[k], 8 * c + k, bv, bi)) { bv = f[k]; bi = 8 * c + k; }
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float v = bf16_to_f32(row[j]);
            if (argmax_better(v, j, bv, bi)) { bv = v; bi = j; }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(TS_FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(TS_FULL_MASK, bi, o);
        if (argmax_better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { s_val[warp] = bv; s_idx[warp] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w)
            if (argmax_better(s_val[w], s_idx[w], bv, bi)) { bv = s_val[w]; bi = s_idx[w]; }
        out[blockIdx.x] = bi < vocab ? (unsigned)bi : 0u;
    }
}

extern "C" __global__ void bf16_rows_to_f32(const bf16_t* __restrict__ in, float* __restrict__ out, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = bf16_to_f32(in[i]);
}
