// Rotary position embedding fused with the KV-cache write, Hugging Face `rotate_half` convention.
//
// qkv: (n, row_stride) bf16, the fused projection: query heads, then key heads, then value heads,
// each head_dim wide: element (r, h, j) is qkv[r * row_stride + h * head_dim + j].
// positions: (n,) token positions. cos_table, sin_table: (max_pos, head_dim / 2) f32, entry
// [pos, j] = cos/sin(pos * theta_j). For j < head_dim / 2, pairs (x1, x2) = (x[j], x[j + half]):
//   x1' = x1 * c - x2 * s,   x2' = x2 * c + x1 * s      (f32, stored as bf16)
// k_cache, v_cache: (num_blocks, block_size, n_kv_heads, head_dim) bf16, i.e. the row of flat slot
// `slot` at slot * n_kv_heads * head_dim; slots: (n,) from the host (block * block_size + offset),
// a negative slot skips the token's K/V.
//
// rope_kv_write: grid (n, n_heads + 2 * n_kv_heads), one block per token and head, one thread
// per pair (blockDim any multiple of 32; head_dim / 2 rounded up to 32 is the natural choice):
//   head y < n_heads:                       query head y, rotated in place in qkv;
//   n_heads <= y < n_heads + n_kv_heads:     key head y - n_heads, rotated into k_cache;
//   y >= n_heads + n_kv_heads:               value head, copied into v_cache.
// Only the query part of qkv changes (attention reads keys and values from the cache), and every
// element is one round trip to memory, so one launch does what a rotation and a copy did.

extern "C" __global__ void rope_kv_write(bf16_t* __restrict__ qkv, const unsigned* __restrict__ positions,
                                         const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                                         bf16_t* __restrict__ k_cache, bf16_t* __restrict__ v_cache,
                                         const int* __restrict__ slots, int n, int n_heads, int n_kv_heads,
                                         int row_stride, int head_dim) {
    const int r = blockIdx.x, h = blockIdx.y;
    if (r >= n || h >= n_heads + 2 * n_kv_heads) return;
    const int half = head_dim >> 1;
    bf16_t* src = qkv + (long long)r * row_stride + (long long)h * head_dim;
    bf16_t* dst = src;  // query heads: in place
    if (h >= n_heads) {
        const int slot = slots[r];
        if (slot < 0) return;
        const int kv_head = h < n_heads + n_kv_heads ? h - n_heads : h - n_heads - n_kv_heads;
        bf16_t* cache = h < n_heads + n_kv_heads ? k_cache : v_cache;
        dst = cache + ((long long)slot * n_kv_heads + kv_head) * head_dim;
    }
    if (h >= n_heads + n_kv_heads) {  // value head: a copy
        for (int j = threadIdx.x; j < head_dim; j += blockDim.x) dst[j] = src[j];
        return;
    }
    const float* cr = cos_table + (long long)positions[r] * half;
    const float* sr = sin_table + (long long)positions[r] * half;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        const float x1 = bf16_to_f32(src[j]), x2 = bf16_to_f32(src[j + half]);
        const float c = cr[j], s = sr[j];
        dst[j] = f32_to_bf16(x1 * c - x2 * s);
        dst[j + half] = f32_to_bf16(x2 * c + x1 * s);
    }
}
