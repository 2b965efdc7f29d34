// SwiGLU activation: out[r, j] = bf16(silu(gate[r, j]) * up[r, j]), silu(g) = g / (1 + exp(-g)).
//
// gate_up: (n, 2 * ffn) bf16, the fused gate/up projection: gate = row[0:ffn], up = row[ffn:2ffn].
// out: (n, ffn) bf16. Grid (n, gy) with any gy >= 1 (blockIdx.y splits a row; use gy > 1 when
// n is small so the whole GPU works), blockDim any multiple of 32.

__device__ __forceinline__ float silu_f32(float g) { return g / (1.0f + expf(-g)); }

extern "C" __global__ void silu_mul(const bf16_t* __restrict__ gate_up, bf16_t* __restrict__ out, int n, int ffn) {
    grid_dependents_launch();  // the down projection may start loading its weights now
    const int r = blockIdx.x;
    if (r >= n) return;
    const bf16_t* gate = gate_up + (long long)r * 2 * ffn;
    const bf16_t* up = gate + ffn;
    bf16_t* o = out + (long long)r * ffn;
    const int first = blockIdx.y * blockDim.x + threadIdx.x, stride = gridDim.y * blockDim.x;
    if ((ffn & 7) == 0 && aligned16(gate) && aligned16(o)) {  // ffn % 8 == 0 makes `up` aligned too
        for (int c = first; c < (ffn >> 3); c += stride) {
            float g[8], u[8];
            unpack_bf16x8(reinterpret_cast<const uint4*>(gate)[c], g);
            unpack_bf16x8(reinterpret_cast<const uint4*>(up)[c], u);
#pragma unroll
            for (int k = 0; k < 8; ++k) g[k] = silu_f32(g[k]) * u[k];
            reinterpret_cast<uint4*>(o)[c] = pack_bf16x8(g);
        }
    } else {
        for (int j = first; j < ffn; j += stride) o[j] = f32_to_bf16(silu_f32(bf16_to_f32(gate[j])) * bf16_to_f32(up[j]));
    }
}
