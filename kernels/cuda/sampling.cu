// Sampling on the device, so only token ids (or one row of logits) come back.
//
// sample_rows: out[r] = the next token of row r of a (rows, vocab) bf16 matrix of logits (row r
// at logits + r * vocab; vocab may be odd, then rows are unaligned and a scalar path runs).
// params: (rows, 5) 32-bit words per row:
//   [0] inv_t = 1 / temperature (f32 bits): 0, negative, NaN or infinite means greedy;
//   [1] top_k (u32, 0 = off); [2] top_p (f32 bits, in (0, 1], 1 = off);
//   [3] min_p (f32 bits, in [0, 1), 0 = off); [4] u (f32 bits), a uniform number in [0, 1)
//   drawn on the host.
// Grid (rows), blockDim a multiple of 32 up to 1024 (the result does not depend on it).
//
// Greedy rows: the arg-max of f32(logits), ties to the lowest index, NaN and -inf never win (a
// row with nothing above -inf gives 0), as the host's `argmax`. One pass over the row.
//
// Sampling rows (the host's Sampler::sample after penalties, with exact integer masses):
//  - candidates are the finite logits (none: the greedy answer), ordered by value descending,
//    then index ascending; best = the largest, p_i = expf((x_i - best) * inv_t) (best: 1);
//  - K = #candidates, min(K, top_k) if top_k > 0, max(1, min(K, #{p_i >= min_p})) if min_p > 0;
//  - masses in fixed point, P_i = rint(p_i * 2^40), T(j) = P of the first j candidates;
//  - top_p < 1: K = the smallest j with T(j) >= ceil(top_p * T(K)) (double);
//  - target = floor(u * T(K)) (double, at most T(K) - 1): the pick is the candidate at the
//    smallest position j with T(j) > target.
// No float atomics: the same logits and u give the same token on every run and any blockDim.
//
// How: bf16 values map to 16-bit order keys (larger key = larger value, equal keys = equal p).
//  pass 0: the arg-max, the best finite logit, and the count of candidates per high byte of the
//          key ("bin"; shared-memory counters in 8 copies against same-address atomics);
//  pass 1: the count per key of the bins that carry mass (P > 0 possible: the bins from the
//          best's down to where p < 2^-42; 32 bins at a time, more passes in the rare row that
//          has more), and #{p_i >= min_p}. A key's mass is count * P(key), so the bins' masses
//          are exact sums, without per-element 64-bit atomics;
//  then each position wanted (the K-th by count, the top_p boundary and the draw by mass) is
//  found by a warp scan over the bins from the top, then over the keys of the bin;
//  last pass: the index of the rank-th candidate with the drawn key (a shared list of its
//          indices, or for more than 1024 of them a block-wide ordered scan).
// Usually three passes over the row.
//
// bf16_rows_to_f32: out[i] = f32(in[i]) for i < n. Grid-stride: any grid, any blockDim.

#define TS_MASS_ONE 1099511627776.0f  // 2^40: fixed-point unit of probability mass
#define TS_P_NEGLIGIBLE (__uint_as_float(0x2a800000u))  // 2^-42: a bin whose largest p is below has no mass
#define TS_BIN_COPIES 8                 // copies of the pass-0 bin counters
#define TS_DETAIL_BINS 32               // bins whose per-key counts pass 1 builds at once
#define TS_LIST_MAX 1024                // the last pass lists the picked key's indices up to this many

// ---- Keys and masses ----

__device__ __forceinline__ bool finite_bf16(unsigned bits) { return (bits & 0x7f80u) != 0x7f80u; }

// bf16 bits -> order key: larger key = larger value; -0 shares the key of +0 (equal values).
__device__ __forceinline__ unsigned order_key(unsigned bits) {
    if (bits == 0x8000u) bits = 0u;
    return (bits & 0x8000u) ? (~bits & 0xffffu) : (bits | 0x8000u);
}
// The bf16 bits of a key (the inverse of order_key, +0 for the zero key).
__device__ __forceinline__ unsigned key_bits(unsigned key) {
    return (key & 0x8000u) ? (key & 0x7fffu) : (~key & 0xffffu);
}

// Unnormalised probability relative to the best finite logit (the best gets 1).
__device__ __forceinline__ float rel_prob(float x, float best, float inv_t) { return expf((x - best) * inv_t); }
__device__ __forceinline__ unsigned long long fixed_mass(float p) { return __float2ull_rn(p * TS_MASS_ONE); }
__device__ __forceinline__ unsigned long long key_mass(unsigned key, float best, float inv_t) {
    return fixed_mass(rel_prob(bf16_to_f32((bf16_t)key_bits(key)), best, inv_t));
}

// floor (or ceil when up) of f * total in double, clamped to [lo, hi].
__device__ __forceinline__ unsigned long long scale_mass(double f, unsigned long long total, bool up,
                                                         unsigned long long lo, unsigned long long hi) {
    double v = f * (double)total;
    v = up ? ceil(v) : floor(v);
    if (!(v >= (double)lo)) return lo;  // NaN too
    if (v >= (double)hi) return hi;
    const unsigned long long r = (unsigned long long)v;
    return r < lo ? lo : (r > hi ? hi : r);
}

// ---- Passes over a row ----

// f(j, bits) for the elements j = threadIdx.x, threadIdx.x + blockDim.x, ... (8 at a time through
// 16-byte loads when the row allows it).
template <class F> __device__ __forceinline__ void for_each_bf16(const bf16_t* row, int vocab, F&& f) {
    if ((vocab & 7) == 0 && aligned16(row)) {
        const uint4* r8 = reinterpret_cast<const uint4*>(row);
        for (int c = threadIdx.x; c < (vocab >> 3); c += blockDim.x) {
            const uint4 w = r8[c];
            const unsigned ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                f(8 * c + 2 * k, ws[k] & 0xffffu);
                f(8 * c + 2 * k + 1, ws[k] >> 16);
            }
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) f(j, (unsigned)row[j]);
    }
}

// Is (v, i) better than (bv, bi)? Larger value, then lower index; NaN compares false.
__device__ __forceinline__ bool argmax_better(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi);
}

// Folds (v, j) into this thread's arg-max (bv, bi); bi = vocab until a value above -inf comes
// (-inf never wins, so a row without one gives 0, as the host's `argmax`).
__device__ __forceinline__ void argmax_step(float v, int j, float& bv, int& bi) {
    if (v > TS_NEG_INF && argmax_better(v, j, bv, bi)) { bv = v; bi = j; }
}

// The block's arg-max from each thread's; valid in thread 0 only. Every thread must call.
__device__ __forceinline__ unsigned block_argmax(float bv, int bi, int vocab) {
    __shared__ float s_val[32];
    __shared__ int s_idx[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(TS_FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(TS_FULL_MASK, bi, o);
        if (argmax_better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { s_val[warp] = bv; s_idx[warp] = bi; }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w)
            if (argmax_better(s_val[w], s_idx[w], bv, bi)) { bv = s_val[w]; bi = s_idx[w]; }
    return bi < vocab ? (unsigned)bi : 0u;
}

// ---- Scans ----

// Inclusive prefix sum over the lanes of a warp. All 32 lanes must call.
template <class T> __device__ __forceinline__ T warp_inclusive_scan(T v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const T n = __shfl_sync(TS_FULL_MASK, v, lane >= o ? lane - o : lane);
        if (lane >= o) v += n;
    }
    return v;
}

// Exclusive prefix sum over the block in thread order. Every thread must call; `scratch` (32
// words) must not be in use.
__device__ __forceinline__ unsigned block_exclusive_scan(unsigned v, unsigned* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const unsigned incl = warp_inclusive_scan(v);
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    const unsigned wsum = lane < n_warps ? scratch[lane] : 0u;
    const unsigned wincl = warp_inclusive_scan(wsum);
    const unsigned before = __shfl_sync(TS_FULL_MASK, wincl - wsum, warp);  // warps before mine
    return before + incl - v;
}

// ---- Locating a position in the candidate order ----

// A key, with the count and mass of all candidates of larger keys, its own mass P(key) and its
// number of candidates.
struct Located {
    unsigned key;
    unsigned cnt_above;
    unsigned long long mass_above;
    unsigned long long key_mass;
    unsigned count;
};

// Warp 0 (all its lanes): over 256 bins, bin 255 (the largest keys) first, with counts
// cnt_of(b) and masses mass_of(b, count), the first bin at which the running count (by_mass:
// mass) reaches target (in [1, total]), and the count and mass of the bins before it, written to
// *res. Lane l takes bins 255 - 8l ... 248 - 8l; a scan over the lanes gives each its start, and
// the one lane whose range holds the crossing writes it.
template <class CntOf, class MassOf>
__device__ __forceinline__ void warp_locate(CntOf cnt_of, MassOf mass_of, bool by_mass, unsigned long long target,
                                            Located* res) {
    const int top = 255 - 8 * (int)(threadIdx.x & 31);
    unsigned c[8], c_sum = 0u;
    unsigned long long m[8], m_sum = 0ull;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        c[k] = cnt_of(top - k);
        m[k] = mass_of(top - k, c[k]);
        c_sum += c[k];
        m_sum += m[k];
    }
    const unsigned c_incl = warp_inclusive_scan(c_sum);
    const unsigned long long m_incl = warp_inclusive_scan(m_sum);
    unsigned rc = c_incl - c_sum;
    unsigned long long rm = m_incl - m_sum;
    if ((by_mass ? rm : (unsigned long long)rc) < target && target <= (by_mass ? m_incl : (unsigned long long)c_incl)) {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            if ((by_mass ? rm + m[k] : (unsigned long long)(rc + c[k])) >= target) {
                res->key = (unsigned)(top - k); res->cnt_above = rc; res->mass_above = rm; res->count = c[k];
                break;
            }
            rc += c[k]; rm += m[k];
        }
    }
}

struct RowCtx {
    const bf16_t* row;
    int vocab;
    float best, inv_t;
};

struct SampleSmem {
    union {
        unsigned bin_cnt_copies[256][TS_BIN_COPIES];  // pass 0: candidates per bin, per copy
        unsigned key_cnt[TS_DETAIL_BINS][256];        // then: candidates per key, for the bins of `chunk`
    };
    unsigned bin_cnt[256];                            // candidates per bin
    unsigned long long bin_mass[256];                 // their mass (0 for bins without mass)
    int rank_of[256];                                 // bin -> rank among the bins with mass (from the top), or -1
    int bin_of_rank[256];
    int chunk;                                        // key_cnt holds bins of rank [32 chunk, 32 chunk + 32)
    unsigned n_fin, n_mass_bins, n_minp, n_list;
    unsigned long long total;                         // T(all candidates)
    Located loc1, loc2;
    unsigned scan[32];
};

// Pass 1 for the bins of rank [32 chunk, 32 chunk + 32) among those with mass: their per-key
// counts, and (first time) their masses; with count_minp, also #{p_i >= min_p} (added to
// s.n_minp). Every thread must call.
__device__ void build_chunk(SampleSmem& s, const RowCtx& rc, int chunk, bool first, bool count_minp,
                                         float min_p) {
    for (int i = threadIdx.x; i < TS_DETAIL_BINS * 256; i += blockDim.x) s.key_cnt[i >> 8][i & 255] = 0u;
    __syncthreads();
    const int lo = chunk * TS_DETAIL_BINS;
    unsigned n_minp = 0u;
    for_each_bf16(rc.row, rc.vocab, [&](int, unsigned bits) {
        if (!finite_bf16(bits)) return;
        const unsigned key = order_key(bits);
        const int slot = s.rank_of[key >> 8] - lo;
        if (slot >= 0 && slot < TS_DETAIL_BINS) atomicAdd(&s.key_cnt[slot][key & 255u], 1u);
        if (count_minp) n_minp += rel_prob(bf16_to_f32((bf16_t)bits), rc.best, rc.inv_t) >= min_p ? 1u : 0u;
    });
    if (count_minp) atomicAdd(&s.n_minp, n_minp);
    __syncthreads();
    if (first) {  // the chunk's bin masses: sums of count * P(key); thread t takes bin slot t % 32, a part of its keys
        const int per_slot = imax(1, (int)blockDim.x / TS_DETAIL_BINS), part = threadIdx.x / TS_DETAIL_BINS;
        const int slot = threadIdx.x % TS_DETAIL_BINS, len = (256 + per_slot - 1) / per_slot;
        if (lo + slot < (int)s.n_mass_bins && part < per_slot) {
            const unsigned bin = (unsigned)s.bin_of_rank[lo + slot];
            unsigned long long m = 0ull;
            for (int k = part * len; k < imin(256, (part + 1) * len); ++k) {
                const unsigned c = s.key_cnt[slot][k];
                if (c) m += c * key_mass((bin << 8) | (unsigned)k, rc.best, rc.inv_t);
            }
            if (m) atomicAdd(&s.bin_mass[bin], m);
        }
    }
    if (threadIdx.x == 0) s.chunk = chunk;  // everyone read the old value before the barriers
    __syncthreads();
}

// The candidate at the first position where the running count (by_mass: running mass) reaches
// target (in [1, total]): its key and mass, and the count and mass of the candidates of larger
// keys. (By count, a position in a bin without mass gets the bin's lowest key and mass 0: only
// its mass is used.) Every thread must call; all get the result.
__device__ Located locate(SampleSmem& s, const RowCtx& rc, bool by_mass, unsigned long long target) {
    if (threadIdx.x < 32) {
        if (threadIdx.x == 0) s.loc1 = Located{255u, 0u, 0ull, 0ull, 0u};  // only if target were out of range
        __syncwarp();
        warp_locate([&](int b) { return s.bin_cnt[b]; }, [&](int b, unsigned) { return s.bin_mass[b]; }, by_mass,
                    target, &s.loc1);
    }
    __syncthreads();
    const Located l1 = s.loc1;
    const int rank = s.rank_of[l1.key];
    if (rank < 0) return Located{l1.key << 8, l1.cnt_above, l1.mass_above, 0ull, 0u};
    if (rank / TS_DETAIL_BINS != s.chunk) build_chunk(s, rc, rank / TS_DETAIL_BINS, false, false, 0.0f);
    const int slot = rank % TS_DETAIL_BINS;
    if (threadIdx.x < 32) {
        if (threadIdx.x == 0) s.loc2 = Located{255u, 0u, 0ull, 0ull, 0u};
        __syncwarp();
        warp_locate([&](int k) { return s.key_cnt[slot][k]; },
                    [&](int k, unsigned c) { return c ? c * key_mass((l1.key << 8) | (unsigned)k, rc.best, rc.inv_t) : 0ull; },
                    by_mass, target - (by_mass ? l1.mass_above : l1.cnt_above), &s.loc2);
    }
    __syncthreads();
    const Located l2 = s.loc2;
    const unsigned key = (l1.key << 8) | l2.key;
    return Located{key, l1.cnt_above + l2.cnt_above, l1.mass_above + l2.mass_above, key_mass(key, rc.best, rc.inv_t),
                   l2.count};
}

// The bits of the kStep elements of row from j: one 16-byte load when kStep is 8 (then j is a
// multiple of 8 and the row 16-byte aligned).
template <int kStep> __device__ __forceinline__ void load_bf16s(const bf16_t* row, int j, unsigned* bits) {
    if constexpr (kStep == 8) {
        const uint4 w = *reinterpret_cast<const uint4*>(row + j);
        const unsigned ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int k = 0; k < 8; ++k) bits[k] = (k & 1) ? ws[k >> 1] >> 16 : ws[k >> 1] & 0xffffu;
    } else {
        bits[0] = row[j];
    }
}

// Writes *out = the index of the rank-th (from 1) of the `count` candidates with order key `key`,
// in index order, for count <= TS_LIST_MAX: one coalesced pass lists their indices in shared
// memory (in any order); the entry with exactly rank - 1 smaller ones is the answer.
__device__ __forceinline__ void write_nth_index_listed(SampleSmem& s, const bf16_t* row, int vocab, unsigned key,
                                                       unsigned rank, unsigned* out) {
    unsigned* list = &s.key_cnt[0][0];  // the per-key counts are no longer needed
    if (threadIdx.x == 0) s.n_list = 0u;
    __syncthreads();
    for_each_bf16(row, vocab, [&](int j, unsigned bits) {
        if (finite_bf16(bits) && order_key(bits) == key) {
            const unsigned at = atomicAdd(&s.n_list, 1u);
            if (at < TS_LIST_MAX) list[at] = (unsigned)j;
        }
    });
    __syncthreads();
    const unsigned n = s.n_list < TS_LIST_MAX ? s.n_list : TS_LIST_MAX;
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
        const unsigned j = list[i];
        unsigned smaller = 0u;
        for (unsigned k = 0; k < n; ++k) smaller += list[k] < j ? 1u : 0u;
        if (smaller + 1u == rank) *out = j;
    }
}

// The same for any count: each thread counts the matches in its contiguous range of the row, a
// block scan gives each thread the matches before its range, and the thread holding the rank-th
// finds it. kStep 8: 16-byte loads (vocab % 8 == 0, row aligned), else 1.
template <int kStep>
__device__ __forceinline__ void write_nth_index(SampleSmem& s, const bf16_t* row, int vocab, unsigned key,
                                                unsigned rank, unsigned* out) {
    const int per = kStep * ((vocab / kStep + (int)blockDim.x - 1) / (int)blockDim.x);
    const int lo = imin(vocab, (int)threadIdx.x * per), hi = imin(vocab, lo + per);
    auto is_match = [&](unsigned bits) { return finite_bf16(bits) && order_key(bits) == key; };
    unsigned n = 0u, bits[kStep];
    for (int j = lo; j < hi; j += kStep) {
        load_bf16s<kStep>(row, j, bits);
#pragma unroll
        for (int k = 0; k < kStep; ++k) n += is_match(bits[k]) ? 1u : 0u;
    }
    unsigned seen = block_exclusive_scan(n, s.scan);
    if (seen < rank && rank <= seen + n) {
        for (int j = lo; j < hi; j += kStep) {
            load_bf16s<kStep>(row, j, bits);
#pragma unroll
            for (int k = 0; k < kStep; ++k)
                if (is_match(bits[k]) && ++seen == rank) { *out = (unsigned)(j + k); return; }
        }
    }
}

// ---- The kernel ----

extern "C" __global__ void sample_rows(const bf16_t* __restrict__ logits, int vocab,
                                       const unsigned* __restrict__ params, unsigned* __restrict__ out) {
    __shared__ SampleSmem s;
    const bf16_t* row = logits + (long long)blockIdx.x * vocab;
    const unsigned* prm = params + 5ll * blockIdx.x;
    const float inv_t = __uint_as_float(prm[0]);
    float bv = TS_NEG_INF;
    int bi = vocab;

    if (!(inv_t > 0.0f && inv_t < __uint_as_float(0x7f800000u))) {  // greedy: one pass
        for_each_bf16(row, vocab, [&](int j, unsigned bits) { argmax_step(bf16_to_f32((bf16_t)bits), j, bv, bi); });
        const unsigned g = block_argmax(bv, bi, vocab);
        if (threadIdx.x == 0) out[blockIdx.x] = g;
        return;
    }

    // Pass 0: the greedy answer (the fallback), the best finite logit, candidates per bin.
    for (int i = threadIdx.x; i < 256 * TS_BIN_COPIES; i += blockDim.x)
        s.bin_cnt_copies[i / TS_BIN_COPIES][i % TS_BIN_COPIES] = 0u;
    if (threadIdx.x == 0) { s.n_fin = 0u; s.n_mass_bins = 0u; s.n_minp = 0u; s.total = 0ull; s.chunk = -1; }
    __syncthreads();
    const int copy = threadIdx.x % TS_BIN_COPIES;
    float fmax = TS_NEG_INF;
    for_each_bf16(row, vocab, [&](int j, unsigned bits) {
        const float v = bf16_to_f32((bf16_t)bits);
        argmax_step(v, j, bv, bi);
        if (finite_bf16(bits)) {
            fmax = fmaxf(fmax, v);
            atomicAdd(&s.bin_cnt_copies[order_key(bits) >> 8][copy], 1u);
        }
    });
    const unsigned greedy = block_argmax(bv, bi, vocab);
    const float best = block_max(fmax);  // its barriers also complete the counting
    if (threadIdx.x == 0) out[blockIdx.x] = greedy;  // final unless a candidate is picked below
    if (best == TS_NEG_INF) return;                   // no finite logit
    const RowCtx rc{row, vocab, best, inv_t};

    // The bins' counts; which bins can carry mass (their largest key's p >= 2^-42), ranked from the top.
    unsigned n_fin = 0u;
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
        unsigned c = 0u;
        for (int k = 0; k < TS_BIN_COPIES; ++k) c += s.bin_cnt_copies[b][k];
        s.bin_cnt[b] = c;
        s.bin_mass[b] = 0ull;
        n_fin += c;
    }
    atomicAdd(&s.n_fin, n_fin);
    __syncthreads();
    if (threadIdx.x < 32) {
        const int top = 255 - 8 * (int)threadIdx.x;
        const unsigned best_key = order_key(__float_as_uint(best) >> 16);
        bool has[8];
        unsigned n = 0u;
        for (int k = 0; k < 8; ++k) {
            const unsigned bin_top = ((unsigned)(top - k) << 8) | 255u;
            const unsigned hi_key = bin_top < best_key ? bin_top : best_key;  // a finite key
            has[k] = s.bin_cnt[top - k] > 0u &&
                     rel_prob(bf16_to_f32((bf16_t)key_bits(hi_key)), best, inv_t) >= TS_P_NEGLIGIBLE;
            n += has[k] ? 1u : 0u;
        }
        const unsigned incl = warp_inclusive_scan(n);
        unsigned r = incl - n;
        for (int k = 0; k < 8; ++k) {
            s.rank_of[top - k] = has[k] ? (int)r : -1;
            if (has[k]) s.bin_of_rank[r++] = top - k;
        }
        if (threadIdx.x == 31) s.n_mass_bins = incl;
    }
    __syncthreads();
    const float min_p = __uint_as_float(prm[3]);
    const int n_chunks = (int)((s.n_mass_bins + TS_DETAIL_BINS - 1) / TS_DETAIL_BINS);  // >= 1: the best's bin
    for (int c = 0; c < n_chunks; ++c) build_chunk(s, rc, c, true, c == 0 && min_p > 0.0f, min_p);
    if (threadIdx.x < 32) {
        unsigned long long m = 0ull;
        for (int b = threadIdx.x; b < 256; b += 32) m += s.bin_mass[b];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m += __shfl_xor_sync(TS_FULL_MASK, m, o);
        if (threadIdx.x == 0) s.total = m;
    }
    __syncthreads();
    n_fin = s.n_fin;

    // K by count (top_k, min_p) and T(K).
    const unsigned top_k = prm[1];
    unsigned k_keep = n_fin;
    if (top_k > 0u && top_k < k_keep) k_keep = top_k;
    if (min_p > 0.0f) k_keep = s.n_minp < k_keep ? (s.n_minp > 0u ? s.n_minp : 1u) : k_keep;
    unsigned long long t_keep = s.total;
    if (k_keep < n_fin) {
        const Located at = locate(s, rc, false, k_keep);
        t_keep = at.mass_above + (k_keep - at.cnt_above) * at.key_mass;
    }
    // top_p: the shortest prefix with mass >= ceil(top_p * T(K)); only its mass matters.
    const float top_p = __uint_as_float(prm[2]);
    if (top_p < 1.0f) {
        const unsigned long long need = scale_mass(top_p, t_keep, true, 1ull, t_keep);
        if (need < t_keep) {
            const Located at = locate(s, rc, true, need);
            const unsigned long long pm = at.key_mass;
            t_keep = at.mass_above + (pm ? (need - at.mass_above + pm - 1ull) / pm : 1ull) * pm;
        }
    }
    // The draw: the first position whose running mass exceeds floor(u * T(K)).
    const float u = __uint_as_float(prm[4]);
    const unsigned long long target = scale_mass(u, t_keep, false, 0ull, t_keep - 1ull) + 1ull;
    const Located at = locate(s, rc, true, target);
    const unsigned long long pm = at.key_mass;
    const unsigned rank = pm ? (unsigned)((target - at.mass_above + pm - 1ull) / pm) : 1u;
    if (at.count <= TS_LIST_MAX) write_nth_index_listed(s, row, vocab, at.key, rank, out + blockIdx.x);
    else if ((vocab & 7) == 0 && aligned16(row)) write_nth_index<8>(s, row, vocab, at.key, rank, out + blockIdx.x);
    else write_nth_index<1>(s, row, vocab, at.key, rank, out + blockIdx.x);
}

extern "C" __global__ void bf16_rows_to_f32(const bf16_t* __restrict__ in, float* __restrict__ out, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = bf16_to_f32(in[i]);
}
