// Paged attention with CUDA cores, for decode rows and short chunks: GQA, causal (through
// per-query context lengths), sliding window, split over the KV length. Long prefill chunks go
// through flash_attention.cu (tensor cores) instead.
//
// Layouts (bf16 unless noted):
//   q:            query row i, head h at q[i * q_stride + h * head_dim + d]   (q_stride in elements)
//   k/v_cache:    (num_blocks, block_size, n_kv_heads, head_dim); 16-byte aligned base
//   block_tables: (n_seqs, max_blocks_per_seq) int; position p of sequence s lives in physical
//                 block block_tables[s * max_blocks_per_seq + p / block_size], slot p % block_size
//   query_seq:    (n_queries,) sequence of each query row
//   context_lens, window_starts: (n_queries,) query i attends positions [window_starts[i],
//                 context_lens[i]) of its sequence (prefill rows pass their own position + 1, so
//                 causality is the host's choice of context_lens)
//   rows:         (n_rows,) int, the query rows to compute (null: rows 0 .. n_rows - 1)
//   out:          (n_queries, n_heads, head_dim)
// kv head of query head h = h / (n_heads / n_kv_heads); scores = scale * dot(q, k) in f32.
//
// paged_attention: grid (n_rows, n_heads, n_parts), blockDim exactly 32 (one warp per
// listed query row, head and partition). head_dim a multiple of 32, at most 256. Partition k covers
// [ws + k * partition_size, min(ctx, ws + (k + 1) * partition_size)); the last partition runs to
// ctx whatever partition_size says. With n_parts == 1 the normalised result goes to `out`
// (part_* unused, may be null); otherwise each partition writes its unnormalised accumulator,
// running max (natural-log units) and sum of exp(score - max) to part_acc
// ((n_rows, n_heads, n_parts, head_dim) f32, indexed by the position in `rows`), part_max and
// part_sum ((n_rows, n_heads, n_parts) f32) -- an empty partition writes max = -inf, sum = 0,
// acc = 0 -- then counts itself in part_done[(j, h)] ((n_rows, n_heads) u32, all zero before the
// launch), and the warp that finishes last combines all the partitions into `out` and puts the
// counter back to zero, so the next launch (or graph replay) finds it zero again. That saves a
// separate reduce launch per layer: at batch 1 the split runs on every decode step.
//
// Inside a warp, lane l owns elements [l * D, l * D + D) of the head (D = head_dim / 32): its
// slice of q lives in registers and each K/V row is read by the whole warp, coalesced. Keys go
// four at a time: the four partial dot products are reduced with one transposing butterfly
// (6 shuffles instead of 20), and the next group's K/V loads are issued before the current group
// is consumed, so each iteration overlaps one memory round trip with arithmetic. The online
// softmax runs in base 2 on scores pre-scaled by log2(e).

// One lane's D consecutive bf16 of a K or V row, kept raw (two per 32-bit word) until used.
template <int D> struct KvChunk { unsigned w[(D + 1) / 2]; };

template <int D> __device__ __forceinline__ KvChunk<D> load_chunk(const bf16_t* p) {
    KvChunk<D> c;
    if constexpr (D == 8) {
        const uint4 t = *reinterpret_cast<const uint4*>(p);
        c.w[0] = t.x; c.w[1] = t.y; c.w[2] = t.z; c.w[3] = t.w;
    } else if constexpr (D == 4) {
        const uint2 t = *reinterpret_cast<const uint2*>(p);
        c.w[0] = t.x; c.w[1] = t.y;
    } else if constexpr (D == 2) {
        c.w[0] = *reinterpret_cast<const unsigned*>(p);
    } else {
#pragma unroll
        for (int k = 0; k < (D + 1) / 2; ++k) c.w[k] = 0u;
#pragma unroll
        for (int k = 0; k < D; ++k) c.w[k >> 1] |= (unsigned)p[k] << (16 * (k & 1));
    }
    return c;
}

template <int D> __device__ __forceinline__ float chunk_at(const KvChunk<D>& c, int k) {
    return (k & 1) ? bf16_hi(c.w[k >> 1]) : bf16_lo(c.w[k >> 1]);
}

// Sums four per-lane values over the warp at once. Returns, on lane l, the total of value
// number (l >> 3): lanes 0-7 hold v0, 8-15 v1, 16-23 v2, 24-31 v3.
__device__ __forceinline__ float warp_sum4_transposed(float v0, float v1, float v2, float v3, int lane) {
    // Exchange halves across lane ^ 16: the low half keeps (v0, v1), the high half (v2, v3).
    const bool hi16 = (lane & 16) != 0;
    float a = hi16 ? v2 : v0, b = hi16 ? v3 : v1;
    a += __shfl_xor_sync(TS_FULL_MASK, hi16 ? v0 : v2, 16);
    b += __shfl_xor_sync(TS_FULL_MASK, hi16 ? v1 : v3, 16);
    // Across lane ^ 8: bit 3 clear keeps a, set keeps b. Now value index = 2 * bit4 + bit3.
    const bool hi8 = (lane & 8) != 0;
    float s = hi8 ? b : a;
    s += __shfl_xor_sync(TS_FULL_MASK, hi8 ? a : b, 8);
    s += __shfl_xor_sync(TS_FULL_MASK, s, 4);
    s += __shfl_xor_sync(TS_FULL_MASK, s, 2);
    s += __shfl_xor_sync(TS_FULL_MASK, s, 1);
    return s;
}

// Issues the K and V loads of the 4 keys at positions p0 .. p0 + 3 (p0 a multiple of 4, at
// least one of them in [start, end)). Keys outside the range load a valid in-range row instead
// (its weight is zero later), so no out-of-range block-table entry or cache row is touched.
template <int D>
__device__ __forceinline__ void fetch_group(int p0, int start, int end, const int* __restrict__ table,
                                            int block_size, int bs_shift, const bf16_t* __restrict__ k_base,
                                            const bf16_t* __restrict__ v_base, long long kv_dim, KvChunk<D>* kc,
                                            KvChunk<D>* vc) {
    if (bs_shift >= 2) {
        // block_size is a power of two >= 4: the aligned group lies in one block, one lookup.
        const int blk = imax(p0, start) >> bs_shift;
        const long long row0 = (long long)table[blk] * block_size + (p0 - (blk << bs_shift));
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int pk = imin(imax(p0 + k, start), end - 1);
            const long long off = (row0 + (pk - p0)) * kv_dim;
            kc[k] = load_chunk<D>(k_base + off);
            vc[k] = load_chunk<D>(v_base + off);
        }
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int pk = imin(imax(p0 + k, start), end - 1);
            const int blk = pk / block_size;
            const long long off = ((long long)table[blk] * block_size + (pk - blk * block_size)) * kv_dim;
            kc[k] = load_chunk<D>(k_base + off);
            vc[k] = load_chunk<D>(v_base + off);
        }
    }
}

// One warp combines a (row, head)'s partitions: out = sum_k w_k acc_k / sum_k w_k sum_k with
// w_k = exp(max_k - max) (0 for an empty partition; all empty gives zeros). Lane l owns elements
// [l * D, l * D + D) of the head. The partials were written by other blocks of this launch, so
// they are read through L2 (__ldcg), never a stale L1 line.
template <int D>
__device__ __forceinline__ void reduce_partitions(const float* __restrict__ acc, const float* __restrict__ pmax,
                                                  const float* __restrict__ psum, int n_parts, int lane,
                                                  bf16_t* __restrict__ o) {
    float mx = TS_NEG_INF;
    for (int k = lane; k < n_parts; k += 32) mx = fmaxf(mx, __ldcg(pmax + k));
    mx = warp_max(mx);
    float den = 0.0f;
    for (int k = lane; k < n_parts; k += 32) {
        const float mk = __ldcg(pmax + k);
        if (mk != TS_NEG_INF) den += expf(mk - mx) * __ldcg(psum + k);
    }
    den = warp_sum(den);
    const float inv = den > 0.0f ? 1.0f / den : 0.0f;
    float num[D];
#pragma unroll
    for (int d = 0; d < D; ++d) num[d] = 0.0f;
    const int head_dim = 32 * D;
    for (int k = 0; k < n_parts; ++k) {
        const float mk = __ldcg(pmax + k);
        if (mk == TS_NEG_INF) continue;  // uniform over the warp
        const float w = expf(mk - mx);
        const float* a = acc + (long long)k * head_dim + lane * D;
#pragma unroll
        for (int d = 0; d < D; ++d) num[d] = fmaf(w, __ldcg(a + d), num[d]);
    }
#pragma unroll
    for (int d = 0; d < D; ++d) o[d] = f32_to_bf16(num[d] * inv);
}

template <int D>
__device__ __forceinline__ void attention_warp(const bf16_t* __restrict__ q, int q_stride,
                                               const bf16_t* __restrict__ k_cache, const bf16_t* __restrict__ v_cache,
                                               const int* __restrict__ block_tables, int max_blocks_per_seq,
                                               const int* __restrict__ query_seq, const int* __restrict__ context_lens,
                                               const int* __restrict__ window_starts, const int* __restrict__ rows,
                                               bf16_t* __restrict__ out,
                                               float* __restrict__ part_acc, float* __restrict__ part_max,
                                               float* __restrict__ part_sum, unsigned* __restrict__ part_done,
                                               int n_heads, int n_kv_heads, int block_size, int partition_size,
                                               int n_parts, float scale) {
    const int j = blockIdx.x, h = blockIdx.y, part = blockIdx.z, lane = threadIdx.x;
    const int i = rows ? rows[j] : j;
    const int head_dim = 32 * D;
    const int kvh = h / (n_heads / n_kv_heads);
    const long long kv_dim = (long long)n_kv_heads * head_dim;
    const int* table = block_tables + (long long)query_seq[i] * max_blocks_per_seq;
    const int ctx = context_lens[i];
    const long long start_ll = (long long)imax(window_starts[i], 0) + (long long)part * partition_size;
    const int start = start_ll < ctx ? (int)start_ll : ctx;
    const int end = (part == n_parts - 1 || start_ll + partition_size >= ctx) ? ctx : (int)(start_ll + partition_size);
    int bs_shift = -1;
    if ((block_size & (block_size - 1)) == 0) bs_shift = __ffs(block_size) - 1;

    float qv[D], acc[D];
    const bf16_t* qp = q + (long long)i * q_stride + (long long)h * head_dim + lane * D;
    const float q_scale = scale * TS_LOG2E;  // base-2 softmax below
#pragma unroll
    for (int j = 0; j < D; ++j) {
        qv[j] = bf16_to_f32(qp[j]) * q_scale;
        acc[j] = 0.0f;
    }
    float m = TS_NEG_INF, l = 0.0f;  // running max (base 2) and sum of 2^(s - m)

    if (start < end) {
        const bf16_t* k_base = k_cache + (long long)kvh * head_dim + lane * D;
        const bf16_t* v_base = v_cache + (long long)kvh * head_dim + lane * D;
        KvChunk<D> kc[4], vc[4];
        int p0 = start & ~3;
        fetch_group<D>(p0, start, end, table, block_size, bs_shift, k_base, v_base, kv_dim, kc, vc);
        for (;;) {
            const int next = p0 + 4;
            const bool more = next < end;
            // Prefetch the next group (head_dim <= 128; above that the extra registers would
            // cost more occupancy than the overlap gains, so the load is issued after use).
            constexpr bool kPrefetch = D <= 4;
            KvChunk<D> kn[4], vn[4];
            if (kPrefetch && more)
                fetch_group<D>(next, start, end, table, block_size, bs_shift, k_base, v_base, kv_dim, kn, vn);

            float dot[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                float d = 0.0f;
#pragma unroll
                for (int j = 0; j < D; ++j) d = fmaf(qv[j], chunk_at<D>(kc[k], j), d);
                dot[k] = d;
            }
            const float mine = warp_sum4_transposed(dot[0], dot[1], dot[2], dot[3], lane);
            float s[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                s[k] = __shfl_sync(TS_FULL_MASK, mine, 8 * k);
                if (p0 + k < start || p0 + k >= end) s[k] = TS_NEG_INF;
            }
            // At least one key of the group is in range, so m_new is finite.
            const float m_new = fmaxf(m, fmaxf(fmaxf(s[0], s[1]), fmaxf(s[2], s[3])));
            const float corr = exp2f(m - m_new);  // 0 on the first group (m = -inf)
            float p[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) p[k] = exp2f(s[k] - m_new);
            l = l * corr + ((p[0] + p[1]) + (p[2] + p[3]));
#pragma unroll
            for (int j = 0; j < D; ++j) {
                float a = acc[j] * corr;
#pragma unroll
                for (int k = 0; k < 4; ++k) a = fmaf(p[k], chunk_at<D>(vc[k], j), a);
                acc[j] = a;
            }
            m = m_new;
            if (!more) break;
            p0 = next;
            if (kPrefetch) {
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    kc[k] = kn[k];
                    vc[k] = vn[k];
                }
            } else {
                fetch_group<D>(p0, start, end, table, block_size, bs_shift, k_base, v_base, kv_dim, kc, vc);
            }
        }
    }

    if (n_parts == 1) {
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        bf16_t* o = out + ((long long)i * n_heads + h) * head_dim + lane * D;
#pragma unroll
        for (int j = 0; j < D; ++j) o[j] = f32_to_bf16(acc[j] * inv);
    } else {
        const long long pair = (long long)j * n_heads + h, base = pair * n_parts;
        float* a = part_acc + (base + part) * head_dim + lane * D;
#pragma unroll
        for (int j = 0; j < D; ++j) a[j] = acc[j];
        if (lane == 0) {
            part_max[base + part] = l > 0.0f ? m * TS_LN2 : TS_NEG_INF;
            part_sum[base + part] = l;
        }
        // Publish the partials device-wide, then count this partition; the last one reduces.
        __threadfence();
        unsigned done = 0u;
        if (lane == 0) done = atomicAdd(part_done + pair, 1u);
        done = __shfl_sync(TS_FULL_MASK, done, 0);
        if (done != (unsigned)n_parts - 1u) return;
        if (lane == 0) part_done[pair] = 0u;  // every partition has counted: reset for the next launch
        __threadfence();
        reduce_partitions<D>(part_acc + base * head_dim, part_max + base, part_sum + base, n_parts, lane,
                             out + ((long long)i * n_heads + h) * head_dim + lane * D);
    }
}

extern "C" __global__ void __launch_bounds__(32, 24)
    paged_attention(const bf16_t* __restrict__ q, int q_stride, const bf16_t* __restrict__ k_cache,
                    const bf16_t* __restrict__ v_cache, const int* __restrict__ block_tables, int max_blocks_per_seq,
                    const int* __restrict__ query_seq, const int* __restrict__ context_lens,
                    const int* __restrict__ window_starts, const int* __restrict__ rows, bf16_t* __restrict__ out,
                    float* __restrict__ part_acc, float* __restrict__ part_max, float* __restrict__ part_sum,
                    unsigned* __restrict__ part_done, int n_rows, int n_heads, int n_kv_heads, int head_dim,
                    int block_size, int partition_size, int n_parts, float scale) {
    grid_dependents_launch();  // the output projection may start loading its weights now
    // Unsupported shapes are rejected on the host; here they only must not fault.
    if ((int)blockIdx.x >= n_rows || blockDim.x != 32 || (head_dim & 31) != 0) return;
#define TS_ATTN_CASE(D)                                                                                        \
    case D:                                                                                                    \
        attention_warp<D>(q, q_stride, k_cache, v_cache, block_tables, max_blocks_per_seq, query_seq,          \
                          context_lens, window_starts, rows, out, part_acc, part_max, part_sum, part_done,     \
                          n_heads, n_kv_heads, block_size, partition_size, n_parts, scale);                    \
        break;
    switch (head_dim >> 5) {
        TS_ATTN_CASE(1)
        TS_ATTN_CASE(2)
        TS_ATTN_CASE(3)
        TS_ATTN_CASE(4)
        TS_ATTN_CASE(5)
        TS_ATTN_CASE(6)
        TS_ATTN_CASE(7)
        TS_ATTN_CASE(8)
        default: break;
    }
#undef TS_ATTN_CASE
}
