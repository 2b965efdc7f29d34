// Embedding gather: x[r, :] = f32(table[ids[r], :]).
//
// table: (vocab, hidden) bf16, ids: (n,) token ids (validated on the host: < vocab),
// x: (n, hidden) f32, the residual stream.
// Grid (n, gy) with any gy >= 1 (blockIdx.y splits a row), blockDim any multiple of 32.

extern "C" __global__ void embedding_gather(const bf16_t* __restrict__ table, const unsigned* __restrict__ ids,
                                            float* __restrict__ x, int n, int hidden) {
    const int r = blockIdx.x;
    if (r >= n) return;
    const bf16_t* src = table + (long long)ids[r] * hidden;
    float* dst = x + (long long)r * hidden;
    const int first = blockIdx.y * blockDim.x + threadIdx.x, stride = gridDim.y * blockDim.x;
    if ((hidden & 7) == 0 && aligned16(src) && aligned16(dst)) {
        const uint4* s8 = reinterpret_cast<const uint4*>(src);
        float4* d4 = reinterpret_cast<float4*>(dst);
        for (int c = first; c < (hidden >> 3); c += stride) {
            float f[8];
            unpack_bf16x8(s8[c], f);
            d4[2 * c] = make_float4(f[0], f[1], f[2], f[3]);
            d4[2 * c + 1] = make_float4(f[4], f[5], f[6], f[7]);
        }
    } else {
        for (int j = first; j < hidden; j += stride) dst[j] = bf16_to_f32(src[j]);
    }
}
