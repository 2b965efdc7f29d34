// Prefill attention on tensor cores (FlashAttention-2 style) over the paged KV cache: GQA,
// causal and sliding window through per-query context lengths, as in attention.cu, whose
// layouts (q, k/v_cache, block_tables, query_seq, context_lens, window_starts, out) it shares.
//
// flash_attention: grid (n_tiles, n_heads), blockDim exactly 128; head_dim 64 or 128 (other
// widths are routed to paged_attention by the host). tiles: (n_tiles, 2) int, the first query
// row and the row count (1..64) of each tile; the rows of one tile belong to one sequence.
//
// A block takes one query head and up to 64 query rows, 16 per warp, and walks the keys its
// rows can see, [min window start, max context end), in tiles of 64. Per key tile: S = Q K^T on
// tensor cores (mma.m16n8k16, bf16 in, f32 out; Q stays in registers as A fragments, K comes
// from shared memory through ldmatrix), masking per row, an online softmax in base 2 kept in
// registers (row max and sum over the 4 lanes of a row), then O += P V with P re-packed from
// the S accumulators as A fragments and V read through ldmatrix.trans. The full score matrix is
// never stored. K and V tiles arrive by cp.async into one buffer each: V of tile j loads while
// S of tile j is computed, K of tile j + 1 while P V of tile j is. Keys outside the block's
// range are zero-filled, so no stale cache slot (possibly NaN) reaches the products.

#define TS_FA_THREADS 128
#define TS_FA_ROWS 64  // query rows per block, 16 per warp
#define TS_FA_KEYS 64  // keys per tile

// Shared memory of one block, sized for the widest head (128) whatever is instantiated.
struct FlashShared {
    alignas(16) bf16_t k[TS_FA_KEYS * (128 + 8)];  // row stride D + 8: conflict-free ldmatrix
    alignas(16) bf16_t v[TS_FA_KEYS * (128 + 8)];
    long long off[2][TS_FA_KEYS];  // element offset of each key's K/V row, double-buffered
    int range[2][2];               // per warp 0/1: (min window start, max context end)
};

template <int D>
__device__ __forceinline__ void flash_block(const bf16_t* __restrict__ q, int q_stride,
                                            const bf16_t* __restrict__ k_cache, const bf16_t* __restrict__ v_cache,
                                            const int* __restrict__ block_tables, int max_blocks_per_seq,
                                            const int* __restrict__ query_seq, const int* __restrict__ context_lens,
                                            const int* __restrict__ window_starts, const int* __restrict__ tiles,
                                            bf16_t* __restrict__ out, int n_heads, int n_kv_heads, int block_size,
                                            float scale, FlashShared& sm) {
    constexpr int KS = D + 8;       // shared row stride, elements
    constexpr int KC = D / 16;      // k-chunks of S = Q K^T
    constexpr int ND = D / 8;       // n-blocks of O
    constexpr int NB = TS_FA_KEYS / 8;  // n-blocks of S
    constexpr int CHUNKS = D / 8;   // 16-byte chunks per K/V row
    static_assert(D == 64 || D == 128, "flash_attention supports head_dim 64 and 128");

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int first = tiles[2 * blockIdx.x], n_rows = tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, kvh = h / (n_heads / n_kv_heads);
    const long long kv_dim = (long long)n_kv_heads * D;
    const int* table = block_tables + (long long)query_seq[first] * max_blocks_per_seq;

    // The keys any row of the tile can see.
    {
        int lo = 0x7fffffff, hi = 0;
        if (tid < n_rows) {
            lo = imax(window_starts[first + tid], 0);
            hi = context_lens[first + tid];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            lo = imin(lo, __shfl_xor_sync(TS_FULL_MASK, lo, o));
            hi = imax(hi, __shfl_xor_sync(TS_FULL_MASK, hi, o));
        }
        if (lane == 0 && warp < 2) {
            sm.range[warp][0] = lo;
            sm.range[warp][1] = hi;
        }
    }
    __syncthreads();
    const int kmin = imin(sm.range[0][0], sm.range[1][0]), kmax = imax(sm.range[0][1], sm.range[1][1]);
    const int n_tiles = kmin < kmax ? (kmax - kmin + TS_FA_KEYS - 1) / TS_FA_KEYS : 0;

    // This lane's two rows (g and g + 8 of the warp's 16) and what they see.
    const int lr0 = warp * 16 + g, lr1 = lr0 + 8;
    const bool ok0 = lr0 < n_rows, ok1 = lr1 < n_rows;
    const int ws0 = ok0 ? imax(window_starts[first + lr0], 0) : 0, ctx0 = ok0 ? context_lens[first + lr0] : 0;
    const int ws1 = ok1 ? imax(window_starts[first + lr1], 0) : 0, ctx1 = ok1 ? context_lens[first + lr1] : 0;

    // Q as A fragments, straight from global memory (read once).
    unsigned qf[KC][4];
    {
        const bf16_t* q0 = q + (long long)(first + lr0) * q_stride + (long long)h * D + 2 * t;
        const bf16_t* q1 = q + (long long)(first + lr1) * q_stride + (long long)h * D + 2 * t;
#pragma unroll
        for (int kc = 0; kc < KC; ++kc) {
            qf[kc][0] = ok0 ? *reinterpret_cast<const unsigned*>(q0 + 16 * kc) : 0u;
            qf[kc][1] = ok1 ? *reinterpret_cast<const unsigned*>(q1 + 16 * kc) : 0u;
            qf[kc][2] = ok0 ? *reinterpret_cast<const unsigned*>(q0 + 16 * kc + 8) : 0u;
            qf[kc][3] = ok1 ? *reinterpret_cast<const unsigned*>(q1 + 16 * kc + 8) : 0u;
        }
    }

    float o[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
    float m0 = TS_NEG_INF, m1 = TS_NEG_INF, l0 = 0.0f, l1 = 0.0f;  // l: this lane's share of the row sum
    const float sl2 = scale * TS_LOG2E;
    const bf16_t* k_head = k_cache + (long long)kvh * D;
    const bf16_t* v_head = v_cache + (long long)kvh * D;

    // Row offsets of key tile j into sm.off[j & 1] (threads 0..63; positions past kmax re-use
    // the last valid one and are zero-filled by the copy).
    auto lookup = [&](int j) {
        if (tid < TS_FA_KEYS) {
            const int pos = imin(kmin + j * TS_FA_KEYS + tid, kmax - 1);
            const int blk = pos / block_size;
            sm.off[j & 1][tid] = ((long long)table[blk] * block_size + (pos - blk * block_size)) * kv_dim;
        }
    };
    // Queues the copy of K or V tile j into `dst`.
    auto load_tile = [&](const bf16_t* head, bf16_t* dst, int j) {
        const int n_valid = imin(TS_FA_KEYS, kmax - (kmin + j * TS_FA_KEYS));
#pragma unroll
        for (int it = 0; it < TS_FA_KEYS * CHUNKS / TS_FA_THREADS; ++it) {
            const int idx = it * TS_FA_THREADS + tid, key = idx / CHUNKS, c = idx % CHUNKS;
            cp_async16(dst + key * KS + 8 * c, head + sm.off[j & 1][key] + 8 * c, key < n_valid);
        }
        cp_async_commit();
    };

    if (n_tiles > 0) {
        lookup(0);
        __syncthreads();
        load_tile(k_head, sm.k, 0);
    }
    for (int j = 0; j < n_tiles; ++j) {
        cp_async_wait_all();
        __syncthreads();  // K of tile j has landed; every warp is done with V of tile j - 1
        load_tile(v_head, sm.v, j);
        if (j + 1 < n_tiles) lookup(j + 1);

        // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
        float s[NB][4];
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
            s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
            for (int kc = 0; kc < KC; kc += 2) {
                unsigned b[4];  // (b0, b1) of chunk kc, then of chunk kc + 1
                ldmatrix_x4<false>(b, sm.k + (nb * 8 + (lane & 7)) * KS + kc * 16 + (lane >> 3) * 8);
                mma_bf16_16816(s[nb], qf[kc], b[0], b[1]);
                mma_bf16_16816(s[nb], qf[kc + 1], b[2], b[3]);
            }
        }
        // Mask, then the online softmax (base 2) of rows g and g + 8.
        const int key0 = kmin + j * TS_FA_KEYS + 2 * t;
        float mx0 = TS_NEG_INF, mx1 = TS_NEG_INF;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int pos = key0 + nb * 8 + e;
                s[nb][e] = (pos >= ws0 && pos < ctx0) ? s[nb][e] * sl2 : TS_NEG_INF;
                s[nb][2 + e] = (pos >= ws1 && pos < ctx1) ? s[nb][2 + e] * sl2 : TS_NEG_INF;
                mx0 = fmaxf(mx0, s[nb][e]);
                mx1 = fmaxf(mx1, s[nb][2 + e]);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(TS_FULL_MASK, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(TS_FULL_MASK, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(TS_FULL_MASK, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(TS_FULL_MASK, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // A row with nothing visible yet keeps m = -inf; subtract 0 then, so exp2 gives 0, not NaN.
        const float base0 = mn0 == TS_NEG_INF ? 0.0f : mn0, base1 = mn1 == TS_NEG_INF ? 0.0f : mn1;
        const float corr0 = exp2f(m0 - base0), corr1 = exp2f(m1 - base1);
        m0 = mn0;
        m1 = mn1;
        float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
            s[nb][0] = exp2f(s[nb][0] - base0);
            s[nb][1] = exp2f(s[nb][1] - base0);
            s[nb][2] = exp2f(s[nb][2] - base1);
            s[nb][3] = exp2f(s[nb][3] - base1);
            sum0 += s[nb][0] + s[nb][1];
            sum1 += s[nb][2] + s[nb][3];
        }
        l0 = l0 * corr0 + sum0;
        l1 = l1 * corr1 + sum1;
#pragma unroll
        for (int nd = 0; nd < ND; ++nd) {
            o[nd][0] *= corr0;
            o[nd][1] *= corr0;
            o[nd][2] *= corr1;
            o[nd][3] *= corr1;
        }

        cp_async_wait_all();
        __syncthreads();  // V of tile j has landed; every warp is done with K of tile j
        if (j + 1 < n_tiles) load_tile(k_head, sm.k, j + 1);

        // O += P V: P from the S accumulators as A fragments (16 keys per k-chunk).
#pragma unroll
        for (int kc = 0; kc < TS_FA_KEYS / 16; ++kc) {
            unsigned a[4];
            a[0] = pack_bf16x2_rn(s[2 * kc][0], s[2 * kc][1]);
            a[1] = pack_bf16x2_rn(s[2 * kc][2], s[2 * kc][3]);
            a[2] = pack_bf16x2_rn(s[2 * kc + 1][0], s[2 * kc + 1][1]);
            a[3] = pack_bf16x2_rn(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
            for (int nd = 0; nd < ND; nd += 2) {
                unsigned b[4];  // (b0, b1) of n-block nd, then of nd + 1
                ldmatrix_x4<true>(b, sm.v + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * KS + nd * 8 +
                                         (lane >> 4) * 8);
                mma_bf16_16816(o[nd], a, b[0], b[1]);
                mma_bf16_16816(o[nd + 1], a, b[2], b[3]);
            }
        }
    }

    // Normalise and store rows g and g + 8.
    l0 += __shfl_xor_sync(TS_FULL_MASK, l0, 1);
    l0 += __shfl_xor_sync(TS_FULL_MASK, l0, 2);
    l1 += __shfl_xor_sync(TS_FULL_MASK, l1, 1);
    l1 += __shfl_xor_sync(TS_FULL_MASK, l1, 2);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    bf16_t* out0 = out + ((long long)(first + lr0) * n_heads + h) * D + 2 * t;
    bf16_t* out1 = out + ((long long)(first + lr1) * n_heads + h) * D + 2 * t;
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
        if (ok0) *reinterpret_cast<unsigned*>(out0 + nd * 8) = pack_bf16x2_rn(o[nd][0] * inv0, o[nd][1] * inv0);
        if (ok1) *reinterpret_cast<unsigned*>(out1 + nd * 8) = pack_bf16x2_rn(o[nd][2] * inv1, o[nd][3] * inv1);
    }
}

extern "C" __global__ void __launch_bounds__(TS_FA_THREADS)
    flash_attention(const bf16_t* __restrict__ q, int q_stride, const bf16_t* __restrict__ k_cache,
                    const bf16_t* __restrict__ v_cache, const int* __restrict__ block_tables, int max_blocks_per_seq,
                    const int* __restrict__ query_seq, const int* __restrict__ context_lens,
                    const int* __restrict__ window_starts, const int* __restrict__ tiles, bf16_t* __restrict__ out,
                    int n_tiles, int n_heads, int n_kv_heads, int head_dim, int block_size, float scale) {
    // Unsupported shapes are rejected on the host; here they only must not fault.
    if ((int)blockIdx.x >= n_tiles || blockDim.x != TS_FA_THREADS || n_kv_heads <= 0 || n_heads % n_kv_heads != 0)
        return;
    __shared__ FlashShared sm;
    if (head_dim == 64)
        flash_block<64>(q, q_stride, k_cache, v_cache, block_tables, max_blocks_per_seq, query_seq, context_lens,
                        window_starts, tiles, out, n_heads, n_kv_heads, block_size, scale, sm);
    else if (head_dim == 128)
        flash_block<128>(q, q_stride, k_cache, v_cache, block_tables, max_blocks_per_seq, query_seq, context_lens,
                         window_starts, tiles, out, n_heads, n_kv_heads, block_size, scale, sm);
}
