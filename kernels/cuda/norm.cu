// Fused residual add + RMSNorm, and a row gather of the residual stream.
//
// add_rmsnorm: per row r of x (n, hidden) f32, the residual stream, updated in place:
//   if delta != nullptr: x[r] += f32(delta[r])          (delta: (n, hidden) bf16, a layer's output)
//   out[r] = bf16(x[r] * rsqrt(mean(x[r]^2) + eps) * f32(weight))   (weight: (hidden,) bf16)
// Grid (n), one block per row; blockDim a multiple of 32, at most 1024. With hidden % 8 == 0
// and blockDim >= hidden / 8 (hidden / 8 rounded up to 32 is the natural choice), each thread
// owns one 8-element chunk in registers: every load of the row (x, delta, weight) is issued
// before the one reduction, so a decode step's norm costs one memory round trip, not three.
//
// gather_rows: out[i, :] = x[rows[i], :] for f32 rows of width hidden (e.g. the last token of
// each sequence before the final norm). Grid (n_out, gy) with any gy >= 1, any blockDim.

// One row with one 8-element chunk per thread (threads past hidden / 8 only join the sum).
__device__ __forceinline__ void add_rmsnorm_chunk(float* __restrict__ xr, const bf16_t* __restrict__ dr,
                                                  const bf16_t* __restrict__ weight, bf16_t* __restrict__ orow,
                                                  int hidden, float eps) {
    const int c = threadIdx.x;
    const bool mine = c < (hidden >> 3);
    float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}, w[8];
    float4* x4 = reinterpret_cast<float4*>(xr);
    if (mine) {
        const float4 a = x4[2 * c], b = x4[2 * c + 1];
        const uint4 wv = reinterpret_cast<const uint4*>(weight)[c];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        if (dr) {
            float d[8];
            unpack_bf16x8(reinterpret_cast<const uint4*>(dr)[c], d);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] += d[k];
            x4[2 * c] = make_float4(v[0], v[1], v[2], v[3]);
            x4[2 * c + 1] = make_float4(v[4], v[5], v[6], v[7]);
        }
        unpack_bf16x8(wv, w);
    }
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) ss += v[k] * v[k];
    const float inv = rsqrtf(block_sum(ss) / (float)hidden + eps);
    if (mine) {
        float o[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) o[k] = v[k] * inv * w[k];
        reinterpret_cast<uint4*>(orow)[c] = pack_bf16x8(o);
    }
}

extern "C" __global__ void add_rmsnorm(float* __restrict__ x, const bf16_t* __restrict__ delta,
                                       const bf16_t* __restrict__ weight, bf16_t* __restrict__ out, int n,
                                       int hidden, float eps) {
    grid_dependents_launch();  // the product after this norm may start loading its weights now
    const int r = blockIdx.x;
    if (r >= n) return;  // uniform over the block, so block_sum below stays collective
    float* xr = x + (long long)r * hidden;
    const bf16_t* dr = delta ? delta + (long long)r * hidden : nullptr;
    bf16_t* orow = out + (long long)r * hidden;
    const bool vec = (hidden & 7) == 0 && aligned16(xr) && aligned16(weight) && aligned16(orow) &&
                     (dr == nullptr || aligned16(dr));
    if (vec && (hidden >> 3) <= (int)blockDim.x) {  // uniform over the block
        add_rmsnorm_chunk(xr, dr, weight, orow, hidden, eps);
        return;
    }
    float ss = 0.0f;
    if (vec) {
        float4* x4 = reinterpret_cast<float4*>(xr);
        for (int c = threadIdx.x; c < (hidden >> 3); c += blockDim.x) {
            float4 a = x4[2 * c], b = x4[2 * c + 1];
            if (dr) {
                float d[8];
                unpack_bf16x8(reinterpret_cast<const uint4*>(dr)[c], d);
                a.x += d[0]; a.y += d[1]; a.z += d[2]; a.w += d[3];
                b.x += d[4]; b.y += d[5]; b.z += d[6]; b.w += d[7];
                x4[2 * c] = a;
                x4[2 * c + 1] = b;
            }
            ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w + b.x * b.x + b.y * b.y + b.z * b.z + b.w * b.w;
        }
    } else {
        for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
            float v = xr[j];
            if (dr) {
                v += bf16_to_f32(dr[j]);
                xr[j] = v;
            }
            ss += v * v;
        }
    }
    // block_sum's barriers also order this thread's x writes before the reads below (each
    // thread reads back only the elements it wrote, so no cross-thread hazard either way).
    const float inv = rsqrtf(block_sum(ss) / (float)hidden + eps);
    if (vec) {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        for (int c = threadIdx.x; c < (hidden >> 3); c += blockDim.x) {
            float4 a = x4[2 * c], b = x4[2 * c + 1];
            float w[8], o[8];
            unpack_bf16x8(reinterpret_cast<const uint4*>(weight)[c], w);
            o[0] = a.x * inv * w[0]; o[1] = a.y * inv * w[1]; o[2] = a.z * inv * w[2]; o[3] = a.w * inv * w[3];
            o[4] = b.x * inv * w[4]; o[5] = b.y * inv * w[5]; o[6] = b.z * inv * w[6]; o[7] = b.w * inv * w[7];
            reinterpret_cast<uint4*>(orow)[c] = pack_bf16x8(o);
        }
    } else {
        for (int j = threadIdx.x; j < hidden; j += blockDim.x)
            orow[j] = f32_to_bf16(xr[j] * inv * bf16_to_f32(weight[j]));
    }
}

extern "C" __global__ void gather_rows(const float* __restrict__ x, const int* __restrict__ rows,
                                       float* __restrict__ out, int n_out, int hidden) {
    const int i = blockIdx.x;
    if (i >= n_out) return;
    const float* src = x + (long long)rows[i] * hidden;
    float* dst = out + (long long)i * hidden;
    const int first = blockIdx.y * blockDim.x + threadIdx.x, stride = gridDim.y * blockDim.x;
    if ((hidden & 3) == 0 && aligned16(src) && aligned16(dst)) {
        const float4* s4 = reinterpret_cast<const float4*>(src);
        float4* d4 = reinterpret_cast<float4*>(dst);
        for (int c = first; c < (hidden >> 2); c += stride) d4[c] = s4[c];
    } else {
        for (int j = first; j < hidden; j += stride) dst[j] = src[j];
    }
}
