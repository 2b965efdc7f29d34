// Weights pulled into the L2 cache ahead of the product that reads them.
//
// Between two weight products of a decode step run small kernels (norms, RoPE, attention,
// SiLU) that leave the memory bus nearly idle for a few microseconds each. Launched on a second
// stream at the start of such a stretch, this kernel asks the L2 cache to fetch the start of the
// next product's weights meanwhile, so that product finds them there. A prefetch is only a hint:
// no result depends on it, and nothing waits for it to land.
//
// l2_prefetch: any grid and block; the `bytes` from `base` (16-byte aligned, `bytes` a multiple
// of 16; both checked on the host) are cut into `chunk`-byte pieces (a multiple of 16; the last
// piece may be shorter), dealt out block by block (piece p to block p % gridDim.x), so a grid of
// one small block per SM issues from every SM. On sm_90+ each piece is one
// bulk prefetch (TMA); on sm_80/86/89 one line prefetch per 128 bytes; in the CPU emulation,
// nothing.

extern "C" __global__ void l2_prefetch(const unsigned char* __restrict__ base, long long bytes, int chunk) {
    const long long pieces = (bytes + chunk - 1) / chunk;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long p = (long long)threadIdx.x * gridDim.x + blockIdx.x; p < pieces; p += stride) {
        const long long at = p * chunk;
        const long long left = bytes - at;
        prefetch_l2(base + at, (unsigned)(left < chunk ? left : chunk));
    }
}
