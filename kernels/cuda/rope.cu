// Rotary position embedding, in place, Hugging Face `rotate_half` convention.
//
// qkv: (n, row_stride) bf16; the first n_rot_heads heads of each row (query heads, then key
// heads) are rotated: element (r, h, j) is qkv[r * row_stride + h * head_dim + j].
// positions: (n,) token positions. cos_table, sin_table: (max_pos, head_dim / 2) f32, entry
// [pos, j] = cos/sin(pos * theta_j). For j < head_dim / 2, pairs (x1, x2) = (x[j], x[j + half]):
//   x1' = x1 * c - x2 * s,   x2' = x2 * c + x1 * s      (f32, stored as bf16)
// Grid (n, n_rot_heads), one block per token and head, one thread per pair (blockDim any
// multiple of 32; head_dim / 2 rounded up to 32 is the natural choice), so every pair is one
// round trip to memory.

extern "C" __global__ void rope_inplace(bf16_t* __restrict__ qkv, const unsigned* __restrict__ positions,
                                        const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                                        int n, int n_rot_heads, int row_stride, int head_dim) {
    const int r = blockIdx.x, h = blockIdx.y;
    if (r >= n || h >= n_rot_heads) return;
    const int half = head_dim >> 1;
    bf16_t* row = qkv + (long long)r * row_stride;
    const float* cr = cos_table + (long long)positions[r] * half;
    const float* sr = sin_table + (long long)positions[r] * half;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        bf16_t* p = row + h * head_dim + j;
        const float x1 = bf16_to_f32(p[0]), x2 = bf16_to_f32(p[half]);
        const float c = cr[j], s = sr[j];
        p[0] = f32_to_bf16(x1 * c - x2 * s);
        p[half] = f32_to_bf16(x2 * c + x1 * s);
    }
}
