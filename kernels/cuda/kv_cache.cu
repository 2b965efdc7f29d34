// KV-cache write: copies each token's key and value rows out of the fused QKV projection into
// the paged cache.
//
// qkv: (n, row_stride) bf16; token r's key is qkv[r * row_stride + k_offset + i] and its value
// qkv[r * row_stride + v_offset + i], i < kv_dim (= n_kv_heads * head_dim).
// k_cache, v_cache: (num_blocks, block_size, n_kv_heads, head_dim) bf16, i.e. row `slot` at
// slot * kv_dim, with slot = block * block_size + pos % block_size computed on the host.
// slots: (n,); a negative slot skips the token.
// Grid (n), one block per token; blockDim any multiple of 32 (128 is a good choice).

extern "C" __global__ void kv_write(const bf16_t* __restrict__ qkv, bf16_t* __restrict__ k_cache,
                                    bf16_t* __restrict__ v_cache, const int* __restrict__ slots, int n,
                                    int row_stride, int k_offset, int v_offset, int kv_dim) {
    const int r = blockIdx.x;
    if (r >= n) return;
    const int slot = slots[r];
    if (slot < 0) return;
    const bf16_t* ks = qkv + (long long)r * row_stride + k_offset;
    const bf16_t* vs = qkv + (long long)r * row_stride + v_offset;
    bf16_t* kd = k_cache + (long long)slot * kv_dim;
    bf16_t* vd = v_cache + (long long)slot * kv_dim;
    if ((kv_dim & 7) == 0 && aligned16(ks) && aligned16(vs) && aligned16(kd) && aligned16(vd)) {
        for (int c = threadIdx.x; c < (kv_dim >> 3); c += blockDim.x) {
            reinterpret_cast<uint4*>(kd)[c] = reinterpret_cast<const uint4*>(ks)[c];
            reinterpret_cast<uint4*>(vd)[c] = reinterpret_cast<const uint4*>(vs)[c];
        }
    } else {
        for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
            kd[i] = ks[i];
            vd[i] = vs[i];
        }
    }
}
