// CPU emulation of the CUDA subset that kernels/cuda/*.cu use, so the very same kernel sources
// can be run and tested on a machine without a GPU (test_kernels.py --backend emu).
//
// Each block runs its threads as cooperative fibers (ucontext) on one OS thread; blocks run one
// after another. __syncthreads, __syncwarp and the warp shuffles are real barriers between the
// fibers, so a divergent barrier or shuffle (some lanes missing) is reported as a deadlock.
// __shared__ becomes `static` (fine, blocks never overlap). Built with AddressSanitizer and
// UBSan, out-of-bounds accesses on the host buffers and misaligned vector loads (uint4 is
// alignas(16) here as on the GPU) are caught too. What it cannot show: races the GPU memory
// model would expose, timing, and the exact rounding of GPU math functions (expf, exp2f).
#pragma once

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <functional>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
typedef dim3 uint3;
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }

inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }  // blocks run one after another: no stale caches
inline unsigned long long __float2ull_rn(float x) { return (unsigned long long)nearbyintf(x); }  // x in [0, 2^64)

// Atomics: fibers switch only at barriers and shuffles, so a plain read-modify-write is atomic.
inline int atomicAdd(int* p, int v) { const int old = *p; *p = (int)((unsigned)old + (unsigned)v); return old; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { const unsigned old = *p; *p = old + v; return old; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    const unsigned long long old = *p;
    *p = old + v;
    return old;
}
inline int atomicMax(int* p, int v) { const int old = *p; if (v > old) *p = v; return old; }
inline unsigned atomicMax(unsigned* p, unsigned v) { const unsigned old = *p; if (v > old) *p = v; return old; }
inline void __threadfence_block() {}
inline void __threadfence() {}

namespace emu {

struct Fiber {
    ucontext_t ctx;
    char* stack = nullptr;
    uint3 tid;
    int linear = 0;
    int shfl_parity = 0;
    bool done = false;
};

struct Group {  // a barrier: arrivals in this generation, and the generation number
    int count = 0, gen = 0, size = 0;
};

struct State {
    dim3 grid, block;
    uint3 bidx;
    std::vector<Fiber> fibers;
    int cur = 0;
    ucontext_t sched;
    Group block_bar;
    std::vector<Group> warp_bar;
    std::vector<unsigned long long> slots;  // [warp][parity][lane]
    std::function<void()> body;
    long long progress = 0;
};
inline State S;
constexpr size_t kStack = 512 * 1024;

inline Fiber& me() { return S.fibers[S.cur]; }
inline void yield() { swapcontext(&me().ctx, &S.sched); }

inline void arrive_and_wait(Group& g) {
    const int gen = g.gen;
    ++S.progress;
    if (++g.count == g.size) {
        g.count = 0;
        ++g.gen;
        return;
    }
    while (g.gen == gen) yield();
}

inline void trampoline() {
    S.body();
    me().done = true;
    ++S.progress;
}  // returns to S.sched through uc_link

inline void run_grid(dim3 grid, dim3 block) {
    S.grid = grid;
    S.block = block;
    const int n = (int)(block.x * block.y * block.z);
    if (n <= 0 || n > 1024) { fprintf(stderr, "emu: bad block size %d\n", n); abort(); }
    if (S.fibers.size() < (size_t)n) {
        const size_t old = S.fibers.size();
        S.fibers.resize(n);
        for (size_t t = old; t < (size_t)n; ++t) S.fibers[t].stack = (char*)malloc(kStack);
    }
    const int n_warps = (n + 31) / 32;
    S.warp_bar.assign(n_warps, Group{});
    for (int w = 0; w < n_warps; ++w) S.warp_bar[w].size = (n - 32 * w) < 32 ? (n - 32 * w) : 32;
    S.slots.assign((size_t)n_warps * 64, 0ull);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                S.bidx = uint3{bx, by, bz};
                S.block_bar = Group{};
                S.block_bar.size = n;
                for (int t = 0; t < n; ++t) {
                    Fiber& f = S.fibers[t];
                    f.linear = t;
                    f.tid = uint3{(unsigned)(t % block.x), (unsigned)((t / block.x) % block.y),
                                  (unsigned)(t / (block.x * block.y))};
                    f.done = false;
                    f.shfl_parity = 0;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack;
                    f.ctx.uc_stack.ss_size = kStack;
                    f.ctx.uc_link = &S.sched;
                    makecontext(&f.ctx, (void (*)())trampoline, 0);
                }
                int live = n;
                while (live > 0) {
                    const long long before = S.progress;
                    live = 0;
                    for (int t = 0; t < n; ++t) {
                        if (S.fibers[t].done) continue;
                        S.cur = t;
                        swapcontext(&S.sched, &S.fibers[t].ctx);
                        if (!S.fibers[t].done) ++live;
                    }
                    if (live > 0 && S.progress == before) {
                        fprintf(stderr, "emu: deadlock in block (%u,%u,%u): %d threads wait at a barrier or shuffle "
                                        "that the others never reach\n", bx, by, bz, live);
                        abort();
                    }
                }
            }
}

template <class T> inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    unsigned long long b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T> inline T from_bits(unsigned long long b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}

// One warp-wide exchange: every lane publishes v, then reads lane `src`'s value. Double-buffered
// by parity so one barrier suffices (a lane cannot get two exchanges ahead of a slower one).
template <class T> inline T exchange(T v, int src) {
    Fiber& f = me();
    const int w = f.linear / 32, lane = f.linear % 32, par = f.shfl_parity;
    f.shfl_parity ^= 1;
    unsigned long long* s = &S.slots[((size_t)w * 2 + par) * 32];
    s[lane] = to_bits(v);
    arrive_and_wait(S.warp_bar[w]);
    if (src < 0 || src >= S.warp_bar[w].size) { fprintf(stderr, "emu: shuffle from absent lane %d\n", src); abort(); }
    return from_bits<T>(s[src]);
}

inline void check_mask(unsigned mask) {
    if (mask != 0xffffffffu) { fprintf(stderr, "emu: only full-warp masks are emulated\n"); abort(); }
}

}  // namespace emu

#define threadIdx (emu::me().tid)
#define blockIdx (emu::S.bidx)
#define blockDim (emu::S.block)
#define gridDim (emu::S.grid)

inline void __syncthreads() { emu::arrive_and_wait(emu::S.block_bar); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu::check_mask(mask);
    emu::arrive_and_wait(emu::S.warp_bar[emu::me().linear / 32]);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    emu::check_mask(mask);
    if (width != 32) abort();
    return emu::exchange(v, (emu::me().linear % 32) ^ lane_mask);
}
template <class T> inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    emu::check_mask(mask);
    if (width != 32) abort();
    return emu::exchange(v, src_lane & 31);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    emu::check_mask(mask);
    if (width != 32) abort();
    const int lane = emu::me().linear % 32;
    return emu::exchange(v, lane + (int)delta < 32 ? lane + (int)delta : lane);
}

namespace emu {
template <class... A, size_t... I> void call_kernel(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<A*>(args[I])...);
}
template <class... A> void launch(void (*k)(A...), dim3 g, dim3 b, void** args) {
    S.body = [=] { call_kernel(k, args, std::index_sequence_for<A...>{}); };
    run_grid(g, b);
}
}  // namespace emu

// Appended after the kernel source, once per kernel: an entry point that Python calls through
// ctypes with cuLaunchKernel-style arguments (an array of pointers to each argument's value).
#define EMU_KERNEL(name)                                                                                        \
    extern "C" void emu_launch_##name(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,          \
                                      unsigned bz, void** args) {                                               \
        emu::launch(name, dim3{gx, gy, gz}, dim3{bx, by, bz}, args);                                            \
    }
