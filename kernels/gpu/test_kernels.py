#!/usr/bin/env python3
"""Tests every kernel in kernels/cuda/*.cu against a plain PyTorch (CPU, f32) reference on random
data of awkward sizes.

Backends:
  cupy  (default, on a GPU machine): each file is compiled with cupy.RawModule from prelude.cuh +
        the .cu source (as the engine compiles it) and run on the GPU.
  emu   (no GPU needed): the same sources are compiled by g++ against emu/emu_cuda.h, which runs
        each block's threads as fibers, with AddressSanitizer and UBSan; sizes are reduced.

Criteria: relative error ||a - b|| / ||b|| (f32 copies) <= 1e-2 for bf16 outputs; exact for
gathers, copies, the cache writes of rope_kv_write and argmax (inputs without near-ties); no NaN in any output.
Prints one line per test and a summary; --out writes the results as JSON; exit 1 on a failure.

    python3 kernels/gpu/test_kernels.py [--backend cupy|emu] [--out results.json] [--only NAME]
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback

import numpy as np
import torch

from kernel_backends import CUDA_DIR, CupyBackend, EmuBackend

REL_TOL = 1e-2
NAN_BF16 = np.uint16(0x7FC0)

# ---------------------------------------------------------------------------------------------
# bf16 helpers: bf16 data travels as uint16 numpy arrays (numpy has no bf16).


def bf16_from(t):
    """A torch tensor -> (uint16 numpy bits, f32 torch tensor of the rounded values)."""
    b = t.to(torch.bfloat16)
    return b.view(torch.int16).numpy().view(np.uint16).copy(), b.float()


def f32_of_bits(a):
    """uint16 numpy bf16 bits -> f32 torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()


def rel_err(got, want):
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    den = torch.linalg.vector_norm(want).item()
    num = torch.linalg.vector_norm(got - want).item()
    return num / den if den > 0 else num


i32, u32, f32, i64 = np.int32, np.uint32, np.float32, np.int64

# ---------------------------------------------------------------------------------------------
# Tests: each records one result per case through Ctx.record.


class Ctx:
    def __init__(self, be, seed=1234):
        self.be = be
        self.g = torch.Generator().manual_seed(seed)
        self.results = []

    def randn(self, *shape, scale=1.0):
        return torch.randn(*shape, generator=self.g) * scale

    def randint(self, lo, hi, shape):
        return torch.randint(lo, hi, shape, generator=self.g)

    def record(self, name, ok, **detail):
        line = "ok  " if ok else "FAIL"
        extras = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in detail.items())
        print(f"{line}  {name:58} {extras}", flush=True)
        self.results.append({"test": name, "ok": bool(ok), **detail})

    def check_close(self, name, got, want, **extra):
        got = torch.as_tensor(got, dtype=torch.float32)
        nan = bool(torch.isnan(got).any().item())
        e = rel_err(got, want)
        self.record(name, (not nan) and e <= REL_TOL, rel_err=e, nan=nan, **extra)

    def check_exact(self, name, got, want, **extra):
        got_t = torch.as_tensor(np.asarray(got))
        want_t = torch.as_tensor(np.asarray(want))
        same = got_t.shape == want_t.shape and bool(torch.equal(got_t, want_t))
        nan = got_t.is_floating_point() and bool(torch.isnan(got_t).any().item())
        mism = int((got_t != want_t).sum().item()) if got_t.shape == want_t.shape else -1
        self.record(name, same and not nan, mismatches=mism, nan=nan, **extra)


def test_embedding(c):
    be = c.be
    vocab = 1000 if be.quick else 32768
    for hidden in (576, 4096, 100):
        bits, _ = bf16_from(c.randn(vocab, hidden))
        for n in (1, 7, 33):
            ids = c.randint(0, vocab, (n,)).numpy().astype(np.uint32)
            ids[0] = vocab - 1
            x = be.to_dev(np.full((n, hidden), np.nan, np.float32))
            gy = 2 if n == 1 else 1
            be.launch("embedding.cu", "embedding_gather", (n, gy), (256,), [be.to_dev(bits), be.to_dev(ids), x, i32(n), i32(hidden)])
            want = f32_of_bits(bits)[torch.from_numpy(ids.astype(np.int64))]
            c.check_exact(f"embedding_gather n={n} hidden={hidden} gy={gy}", torch.from_numpy(be.to_host(x)), want)


def norm_threads(hidden):
    """The engine's blockDim for add_rmsnorm (ops.rs): one 8-wide chunk per thread if it can."""
    return min(1024, max(64, -(-(hidden // 8) // 32) * 32)) if hidden % 8 == 0 else 256


def test_norm(c):
    be = c.be
    # 256 threads: one chunk per thread for 576, the strided loop for 4096; the engine's blockDim:
    # one chunk per thread for 4096 too; 12288 (Mistral Large) loops even at 1024 threads.
    cases = [(h, n, t) for h in (576, 4096, 100) for n in (1, 7, 33) for t in sorted({256, norm_threads(h)})]
    cases.append((12288, 3, norm_threads(12288)))
    for hidden, n, threads in cases:
        for with_delta in (True, False):
            x0 = c.randn(n, hidden, scale=3.0)
            dbits, dval = bf16_from(c.randn(n, hidden))
            wbits, wval = bf16_from(1.0 + 0.1 * c.randn(hidden))
            x = be.to_dev(x0.numpy())
            out = be.to_dev(np.full((n, hidden), NAN_BF16))
            eps = 1e-5
            be.launch("norm.cu", "add_rmsnorm", (n,), (threads,),
                      [x, be.to_dev(dbits) if with_delta else None, be.to_dev(wbits), out, i32(n), i32(hidden), f32(eps)])
            xs = x0 + dval if with_delta else x0
            want = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps) * wval
            tag = f"n={n} hidden={hidden} threads={threads} delta={'y' if with_delta else 'n'}"
            c.check_exact(f"add_rmsnorm residual {tag}", torch.from_numpy(be.to_host(x)), xs)
            c.check_close(f"add_rmsnorm out {tag}", f32_of_bits(be.to_host(out)), want)
    for hidden in (4096, 100, 6):
        n_src, n_out = 33, 7
        src = c.randn(n_src, hidden)
        rows = c.randint(0, n_src, (n_out,)).numpy().astype(np.int32)
        out = be.to_dev(np.full((n_out, hidden), np.nan, np.float32))
        be.launch("norm.cu", "gather_rows", (n_out, 2), (128,), [be.to_dev(src.numpy()), be.to_dev(rows), out, i32(n_out), i32(hidden)])
        c.check_exact(f"gather_rows n_out={n_out} hidden={hidden}", torch.from_numpy(be.to_host(out)), src[torch.from_numpy(rows).long()])


def rope_tables(max_pos, head_dim, theta=1e6):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(freqs).float(), torch.sin(freqs).float()


def test_rope_kv_write(c):
    """Queries rotated in place; keys rotated into the cache and values copied, at each token's
    slot (a negative slot writes nothing); the cache starts as NaN, so a stray or missing write
    shows; the key and value parts of qkv are left as they were."""
    be = c.be
    max_pos = 4096
    for (nq, nkv, hd) in ((32, 8, 128), (9, 3, 64), (5, 1, 36)):
        cos, sin = rope_tables(max_pos, hd)
        kv_dim, q_dim = nkv * hd, nq * hd
        stride = (nq + 2 * nkv) * hd + (8 if hd == 64 else 0)  # a padded row too
        n_slots = 16 * 12
        for n in (1, 7, 33):
            bits, val = bf16_from(c.randn(n, stride))
            pos = c.randint(0, max_pos, (n,)).numpy().astype(np.uint32)
            slots = torch.randperm(n_slots, generator=c.g)[:n].numpy().astype(np.int32)
            if n > 1:
                slots[1] = -1
            d = be.to_dev(bits)
            kd = be.to_dev(np.full((n_slots, kv_dim), NAN_BF16))
            vd = be.to_dev(np.full((n_slots, kv_dim), NAN_BF16))
            be.launch("rope.cu", "rope_kv_write", (n, nq + 2 * nkv), (max(32, (hd // 2 + 31) // 32 * 32),),
                      [d, be.to_dev(pos), be.to_dev(cos.numpy()), be.to_dev(sin.numpy()), kd, vd, be.to_dev(slots),
                       i32(n), i32(nq), i32(nkv), i32(stride), i32(hd)])
            got = f32_of_bits(be.to_host(d))
            rot = val[:, : (nq + nkv) * hd].reshape(n, nq + nkv, hd)
            p = torch.from_numpy(pos.astype(np.int64))
            cc, ss = cos[p][:, None, :], sin[p][:, None, :]
            x1, x2 = rot[..., : hd // 2], rot[..., hd // 2:]
            want = torch.cat([x1 * cc - x2 * ss, x2 * cc + x1 * ss], -1).reshape(n, -1)
            tag = f"n={n} heads={nq}+{nkv} hd={hd}"
            c.check_close(f"rope_kv_write q rotated {tag}", got[:, :q_dim], want[:, :q_dim])
            c.check_exact(f"rope_kv_write rest of qkv untouched {tag}", got[:, q_dim:], val[:, q_dim:])
            got_k, got_v = f32_of_bits(be.to_host(kd)), f32_of_bits(be.to_host(vd))
            live = [r for r in range(n) if slots[r] >= 0]
            written = torch.zeros(n_slots, dtype=torch.bool)
            written[torch.tensor([int(slots[r]) for r in live], dtype=torch.long)] = True
            c.check_exact(f"rope_kv_write only live slots written {tag}",
                          (~torch.isnan(got_k).all(-1)) | (~torch.isnan(got_v).all(-1)), written)
            rows = torch.tensor(live, dtype=torch.long)
            at = torch.tensor([int(slots[r]) for r in live], dtype=torch.long)
            c.check_close(f"rope_kv_write k rotated into the cache {tag}", got_k[at], want[rows, q_dim:q_dim + kv_dim])
            c.check_exact(f"rope_kv_write v copied into the cache {tag}", got_v[at], val[rows, q_dim + kv_dim:q_dim + 2 * kv_dim])


def test_silu(c):
    be = c.be
    for ffn in (5632, 14336, 100):
        for n in (1, 7, 33):
            bits, val = bf16_from(c.randn(n, 2 * ffn, scale=2.0))
            out = be.to_dev(np.full((n, ffn), NAN_BF16))
            gy = 4 if n == 1 else 1
            be.launch("activation.cu", "silu_mul", (n, gy), (256,), [be.to_dev(bits), out, i32(n), i32(ffn)])
            g, u = val[:, :ffn], val[:, ffn:]
            c.check_close(f"silu_mul n={n} ffn={ffn} gy={gy}", f32_of_bits(be.to_host(out)), torch.nn.functional.silu(g) * u)


class PagedCache:
    """A paged KV cache holding random K/V for each sequence's positions [0, length), laid out
    as (num_blocks, block_size, n_kv, hd) with shuffled physical blocks; every other slot is NaN,
    as is physical block 0, which pads the block tables, so a read out of range shows as NaN."""

    def __init__(self, c, lengths, n_kv, hd, block_size):
        self.bs, self.n_kv, self.hd = block_size, n_kv, hd
        need = [math.ceil(L / block_size) for L in lengths]
        self.max_blocks = max(need) + 1
        num_blocks = sum(need) + 5
        perm = (torch.randperm(num_blocks - 1, generator=c.g) + 1).tolist()  # block 0 never used
        self.tables = np.zeros((len(lengths), self.max_blocks), np.int32)
        kbits = np.full((num_blocks, block_size, n_kv, hd), NAN_BF16)
        vbits = np.full_like(kbits, NAN_BF16)
        self.k, self.v = [], []  # per sequence: (L, n_kv, hd) f32 of the rounded values
        for s, L in enumerate(lengths):
            kb, kval = bf16_from(c.randn(L, n_kv, hd))
            vb, vval = bf16_from(c.randn(L, n_kv, hd))
            for b in range(need[s]):
                phys = perm.pop()
                self.tables[s, b] = phys
                lo, hi = b * block_size, min(L, (b + 1) * block_size)
                kbits[phys, : hi - lo] = kb[lo:hi]
                vbits[phys, : hi - lo] = vb[lo:hi]
            self.k.append(kval)
            self.v.append(vval)
        self.kbits, self.vbits = kbits, vbits


def attention_ref(qv, seq_of, ctx, ws, cache, n_heads, scale):
    """qv: (nq, n_heads, hd) f32. Plain softmax attention over [ws, ctx) of each query's sequence."""
    group = n_heads // cache.n_kv
    out = torch.zeros_like(qv)
    for i in range(qv.shape[0]):
        s, lo, hi = int(seq_of[i]), int(max(ws[i], 0)), int(ctx[i])
        if hi <= lo:
            continue
        k = cache.k[s][lo:hi].repeat_interleave(group, dim=1)  # (len, n_heads, hd)
        v = cache.v[s][lo:hi].repeat_interleave(group, dim=1)
        sc = torch.einsum("hd,lhd->hl", qv[i], k) * scale
        out[i] = torch.einsum("hl,lhd->hd", torch.softmax(sc, -1), v)
    return out


SKIP_FLASH = False  # --no-flash: the tensor-core kernel's cases are slow under emulation


def flash_tiles(seq_of, rows=64):
    """(first row, row count) tiles of at most `rows` consecutive query rows of one sequence."""
    tiles, i = [], 0
    while i < len(seq_of):
        j = i
        while j < len(seq_of) and j - i < rows and seq_of[j] == seq_of[i]:
            j += 1
        tiles.append((i, j - i))
        i = j
    return np.asarray(tiles, np.int32).reshape(-1)


def run_attention_case(c, name, n_heads, n_kv, hd, block_size, lengths, seq_of, ctx, ws, n_parts_list, flash=False,
                       row_subset=None):
    """paged_attention for each partition count (twice when split, as a replayed graph runs it:
    the completion counters must be back to zero after each launch), over all rows or
    `row_subset` (rows outside it must stay untouched); then, with `flash`, flash_attention over
    64-row tiles."""
    be = c.be
    cache = PagedCache(c, lengths, n_kv, hd, block_size)
    nq = len(seq_of)
    q_stride = (n_heads + 2 * n_kv) * hd  # q inside a fused qkv row
    qbits, qrow = bf16_from(c.randn(nq, q_stride))
    qv = qrow[:, : n_heads * hd].reshape(nq, n_heads, hd)
    scale = 1.0 / math.sqrt(hd)
    want = attention_ref(qv, seq_of, ctx, ws, cache, n_heads, scale).reshape(nq, -1)
    d_q, d_k, d_v = be.to_dev(qbits), be.to_dev(cache.kbits), be.to_dev(cache.vbits)
    d_tab = be.to_dev(cache.tables)
    d_seq = be.to_dev(np.asarray(seq_of, np.int32))
    d_ctx = be.to_dev(np.asarray(ctx, np.int32))
    d_ws = be.to_dev(np.asarray(ws, np.int32))
    span = max(int(cx) - max(int(w), 0) for cx, w in zip(ctx, ws))
    rows = None if row_subset is None else be.to_dev(np.asarray(row_subset, np.int32))
    n_rows = nq if row_subset is None else len(row_subset)
    for n_parts in n_parts_list:
        psize = max(1, math.ceil(span / n_parts))
        out = be.to_dev(np.full((nq, n_heads * hd), NAN_BF16))
        if n_parts > 1:
            pa = be.to_dev(np.full((n_rows, n_heads, n_parts, hd), np.nan, np.float32))
            pm = be.to_dev(np.full((n_rows, n_heads, n_parts), np.nan, np.float32))
            ps = be.to_dev(np.full((n_rows, n_heads, n_parts), np.nan, np.float32))
        else:
            pa = pm = ps = None
        done = be.to_dev(np.zeros((n_rows, n_heads), np.uint32)) if n_parts > 1 else None
        for launch in (1, 2) if n_parts > 1 else (1,):
            t0 = time.time()
            be.launch("attention.cu", "paged_attention", (n_rows, n_heads, n_parts), (32,),
                      [d_q, i32(q_stride), d_k, d_v, d_tab, i32(cache.max_blocks), d_seq, d_ctx, d_ws, rows, out, pa, pm,
                       ps, done, i32(n_rows), i32(n_heads), i32(n_kv), i32(hd), i32(block_size), i32(psize),
                       i32(n_parts), f32(scale)])
            tag = f"{name} parts={n_parts}" + (f" launch={launch}" if n_parts > 1 else "")
            got = f32_of_bits(be.to_host(out))
            if row_subset is None:
                c.check_close(f"attention {tag}", got, want, secs=round(time.time() - t0, 2))
            else:
                others = [i for i in range(nq) if i not in set(row_subset)]
                c.check_close(f"attention {tag} rows={len(row_subset)}/{nq}", got[row_subset], want[row_subset],
                              secs=round(time.time() - t0, 2))
                c.record(f"attention {tag} rows outside the list untouched",
                         bool(torch.isnan(got[others]).all()) if others else True)
            if done is not None:
                c.check_exact(f"attention {tag} completion counters back to zero",
                              be.to_host(done).astype(np.int64), np.zeros((n_rows, n_heads), np.int64))
    if flash and not SKIP_FLASH:
        tiles = flash_tiles(seq_of)
        n_tiles = len(tiles) // 2
        out = be.to_dev(np.full((nq, n_heads * hd), NAN_BF16))
        t0 = time.time()
        be.launch("flash_attention.cu", "flash_attention", (n_tiles, n_heads), (128,),
                  [d_q, i32(q_stride), d_k, d_v, d_tab, i32(cache.max_blocks), d_seq, d_ctx, d_ws, be.to_dev(tiles),
                   out, i32(n_tiles), i32(n_heads), i32(n_kv), i32(hd), i32(block_size), f32(scale)])
        c.check_close(f"flash_attention {name} tiles={n_tiles}", f32_of_bits(be.to_host(out)), want,
                      secs=round(time.time() - t0, 2))


def test_attention(c):
    quick = c.be.quick
    shapes = [(32, 8, 128), (9, 3, 64)] if not quick else [(4, 2, 128), (9, 3, 64)]
    extra = [(4, 1, 96), (2, 1, 256), (12, 1, 32)]  # D = 3 (scalar chunk path), D = 8, G = 12
    dec_lens = [1, 17, 300, 2500] if not quick else [1, 17, 75, 300]
    prefix, rows = (100, 33) if not quick else (40, 9)
    long_prefix, long_rows = (70, 150) if not quick else (20, 70)  # several 64-row tiles
    window = 256 if not quick else 50
    for (nh, nkv, hd) in shapes:
        heads = f"heads={nh}/{nkv} hd={hd}"
        # decode: one query per sequence, at its last position (flash: one-row tiles)
        n = len(dec_lens)
        ctx = dec_lens
        run_attention_case(c, f"decode {heads} ctx={dec_lens}", nh, nkv, hd, 16, dec_lens, list(range(n)), ctx, [0] * n,
                           [1, 4, 17], flash=True)
        run_attention_case(c, f"decode {heads} ctx={dec_lens}", nh, nkv, hd, 16, dec_lens, list(range(n)), ctx, [0] * n,
                           [1, 3], row_subset=[3, 1])
        ws = [max(0, L - window) for L in dec_lens]
        run_attention_case(c, f"decode window={window} {heads}", nh, nkv, hd, 16, dec_lens, list(range(n)), ctx, ws,
                           [1, 4])
        # prefill: `rows` new tokens of sequence 1 after `prefix` cached ones; sequence 0 is a
        # bystander whose blocks must not be read.
        for (pre, nrow) in ((prefix, rows), (long_prefix, long_rows)):
            total = pre + nrow
            pos = list(range(pre, total))
            ctx = [p + 1 for p in pos]
            run_attention_case(c, f"prefill {heads} prefix={pre} rows={nrow}", nh, nkv, hd, 16, [37, total],
                               [1] * nrow, ctx, [0] * nrow, [1, 4], flash=True)
        total = prefix + rows
        pos = list(range(prefix, total))
        ctx = [p + 1 for p in pos]
        ws = [max(0, p - window // 4 + 1) for p in pos]
        run_attention_case(c, f"prefill window={window // 4} {heads}", nh, nkv, hd, 16, [37, total],
                           [1] * rows, ctx, ws, [1, 3], flash=True)
        # a mixed step: two sequences' chunks, then a decode row (tiles never straddle sequences)
        seq_of = [0] * 5 + [1] * rows + [2]
        lens = [12, total, 40]
        ctx = [8 + i for i in range(5)] + [p + 1 for p in pos] + [40]
        run_attention_case(c, f"mixed chunks {heads}", nh, nkv, hd, 16, lens, seq_of, ctx, [0] * len(seq_of), [1],
                           flash=True)
    for (nh, nkv, hd) in extra:
        lens = [5, 130] if quick else [5, 130, 1000]
        n = len(lens)
        run_attention_case(c, f"decode heads={nh}/{nkv} hd={hd} ctx={lens}", nh, nkv, hd, 16, lens, list(range(n)), lens,
                           [0] * n, [1, 2])
    # block sizes off the fast path (not a power of two >= 4), and a large block
    for bs in (6, 2, 32):
        lens = [1, 23, 130]
        run_attention_case(c, f"decode block_size={bs} heads=4/2 hd=64 ctx={lens}", 4, 2, 64, bs, lens, [0, 1, 2], lens,
                           [0, 0, 0], [1, 3], flash=True)


MASS_ONE = 2.0 ** 40  # sample_rows' fixed-point unit of probability mass
F32_BELOW_1 = float(np.float32(1.0 - 2.0 ** -24))


def f32_row(bits):
    """uint16 bf16 bits -> float32 numpy values."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def ref_argmax(x):
    """The host's argmax: larger value, then lower index; NaN and -inf never win (none left: 0)."""
    idx = np.flatnonzero(x > -np.inf)
    return int(idx[np.argmax(x[idx])]) if len(idx) else 0


def ref_scale(f, total, up, lo, hi):
    """floor (ceil when up) of f * total in double, clamped to [lo, hi] (as the kernel)."""
    v = float(f) * float(total)
    if v != v:
        return lo
    v = float(math.ceil(v) if up else math.floor(v))
    if not v >= float(lo):
        return lo
    if v >= float(hi):
        return hi
    return min(max(int(v), lo), hi)


def ref_sample(x, inv_t, top_k, top_p, min_p, u):
    """sample_rows' semantics on one float32 row: (token, draw) where draw is None for a greedy
    answer, else (total mass T(K), cumulative masses T in candidate order, picked position,
    the candidates' indices in order)."""
    inv_t, top_p, min_p, u = (np.float32(v) for v in (inv_t, top_p, min_p, u))
    if not (0 < inv_t < np.inf):
        return ref_argmax(x), None
    idx = np.flatnonzero(np.isfinite(x))
    if len(idx) == 0:
        return ref_argmax(x), None
    xf = x[idx]
    with np.errstate(over="ignore"):  # x - best may overflow to -inf, as in the kernel
        s = (xf - xf.max()) * inv_t  # f32 arithmetic, as the kernel
    p = np.exp(s.astype(np.float64)).astype(np.float32)  # correctly rounded expf (nearly always)
    mass = np.rint(p.astype(np.float64) * MASS_ONE).astype(np.uint64)
    order = np.lexsort((idx, -xf.astype(np.float64)))  # value descending, then index
    cum = np.cumsum(mass[order])
    k = len(idx)
    if top_k > 0:
        k = min(k, int(top_k))
    if min_p > 0:
        k = max(1, min(k, int((p >= min_p).sum())))
    total = int(cum[k - 1])
    if top_p < 1:
        need = ref_scale(top_p, total, True, 1, total)
        if need < total:
            total = int(cum[int(np.searchsorted(cum, np.uint64(need), "left"))])
    target = ref_scale(u, total, False, 0, total - 1)
    pos = int(np.searchsorted(cum, np.uint64(target), "right"))
    return int(idx[order[pos]]), (total, cum, pos, idx[order])


def near_boundary(draw, u):
    """Whether u * T lies within 1e-6 * T of an interior cumulative-mass boundary next to the
    reference's pick (where a one-ulp difference of expf may move the pick); 0 and T are not."""
    total, cum, pos, _ = draw
    last = int(np.searchsorted(cum, np.uint64(total), "left"))  # the last kept position
    x = float(np.float32(u)) * total
    edges = ([float(cum[pos - 1])] if pos > 0 else []) + ([float(cum[pos])] if pos < last else [])
    return any(abs(x - e) <= 1e-6 * total for e in edges)


def sample_params(rows):
    """[(inv_t, top_k, top_p, min_p, u)] -> (rows, 5) uint32 words."""
    prm = np.zeros((len(rows), 5), np.uint32)
    for r, (inv_t, top_k, top_p, min_p, u) in enumerate(rows):
        prm[r] = [np.float32(inv_t).view(np.uint32), np.uint32(top_k), np.float32(top_p).view(np.uint32),
                  np.float32(min_p).view(np.uint32), np.float32(u).view(np.uint32)]
    return prm


def run_sample_rows(be, bits, prm, block):
    n, vocab = bits.shape
    out = be.to_dev(np.full(n, 0xFFFFFFFF, np.uint32))
    be.launch("sampling.cu", "sample_rows", (n,), (block,), [be.to_dev(bits), i32(vocab), be.to_dev(prm), out])
    return be.to_host(out).astype(np.int64)


def check_picks(c, tally, name, got, bits, rows, **extra):
    """Every pick against ref_sample: equal, or a mismatch at a mass boundary (counted in tally)."""
    bad = accepted = 0
    for r, prm in enumerate(rows):
        want, draw = ref_sample(f32_row(bits[r]), *prm)
        if got[r] == want:
            continue
        if draw is not None and near_boundary(draw, prm[4]):
            accepted += 1
        else:
            bad += 1
            if bad <= 3:
                print(f"      row {r} params {prm}: got {got[r]}, want {want}", flush=True)
    tally["picks"] += len(rows)
    tally["accepts"] += accepted
    c.record(name, bad == 0, mismatches=bad, boundary_accepts=accepted, **extra)


def bf16_bits(a):
    """float32 numpy -> bf16 bits (round to nearest even)."""
    return bf16_from(torch.from_numpy(np.ascontiguousarray(a, np.float32)))[0]


def test_sampling(c):
    be = c.be
    blocks = (64, 32) if be.quick else (1024, 256, 96, 64)  # the host launches 1024
    tally = {"picks": 0, "accepts": 0}
    # Greedy (inv_t 0, or not a finite positive number): the host's argmax whatever the other
    # parameters say, vectorised (vocab % 8 == 0) and unaligned rows.
    for vocab in (32768, 100, 50257):
        for n in (1, 7, 33):
            x = c.randn(n, vocab, scale=3.0)
            bits, val = bf16_from(x)
            val = val.numpy().copy()
            # a unique maximum per row, clear of every other value
            arg = c.randint(0, vocab, (n,)).numpy()
            for r in range(n):
                val[r, arg[r]] = np.nanmax(val[r]) + 1.0
            if n >= 7:
                val[1, :] = np.nan  # all NaN: 0
                val[2, (arg[2] + 1) % vocab] = np.nan  # NaN never wins
                m = np.nanmax(val[3]) + 2.0  # a tie: lowest index wins
                val[3, vocab // 2] = m
                val[3, vocab // 3] = m
                val[4:7, :] = -np.inf
                val[4, ::2] = np.nan  # nothing above -inf: 0
                val[5, -1] = np.inf
                val[6, -1] = -3.0
            bits, _ = bf16_from(torch.from_numpy(val))
            want = np.array([ref_argmax(f32_row(bits[r])) for r in range(n)], np.int64)
            rng = np.random.default_rng(n + vocab)
            rows = [(0.0, int(rng.integers(0, 5)), float(rng.uniform(0.1, 1)), float(rng.uniform(0, 0.5)),
                     float(rng.uniform(0, 1))) for _ in range(n)]
            if n >= 7:  # not a finite positive 1/T: greedy too
                rows[4], rows[5], rows[6] = (np.inf,) + rows[4][1:], (np.nan,) + rows[5][1:], (-1.0,) + rows[6][1:]
            for block in blocks[:1] if be.quick else blocks[:2]:
                got = run_sample_rows(be, bits, sample_params(rows), block)
                c.check_exact(f"sample_rows greedy n={n} vocab={vocab} block={block}", got, want)

    # Sampling rows: parameter combinations on random logits, plus special rows.
    for vocab in ((3001, 2048) if be.quick else (50257, 32768)):
        configs = [(1.0, 0, 1.0, 0.0), (2.0, 0, 1.0, 0.0), (0.5, 0, 1.0, 0.0),  # T 1, 0.5, 2
                   (1.0, 1, 1.0, 0.0),            # top_k 1: greedy
                   (0.5, vocab + 100, 1.0, 0.0),  # top_k above vocab: off
                   (1.0, 0, 1e-6, 0.0),           # tiny top_p: greedy
                   (1.0, 0, 1.0, 0.9),            # min_p 0.9
                   (1.0, 50, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (1.0, 0, 1.0, 0.05), (0.7, 40, 0.95, 0.02),
                   (2.0, 7, 0.5, 0.0), (0.5, 1000, 0.8, 0.1), (1.3, 3, 1.0, 0.0), (0.25, 0, 0.99, 0.0),
                   (0.0, 5, 0.9, 0.1)]            # greedy in the same batch
        rng = np.random.default_rng(vocab)
        logit_rows, rows = [], []
        for cfg in configs:
            for u in (0.0, F32_BELOW_1, float(rng.uniform()), float(rng.uniform())):
                scale = float(rng.choice([1.0, 3.0, 8.0]))
                logit_rows.append(c.randn(vocab, scale=scale).numpy())
                rows.append(cfg + (u,))
        # -inf, NaN and +inf entries (never candidates), and rows with no finite logit at all
        for cfg in [(1.0, 0, 1.0, 0.0), (0.5, 5, 1.0, 0.0), (1.0, 0, 0.7, 0.01)]:
            for u in (0.1, 0.5, 0.9):
                x = c.randn(vocab, scale=2.0).numpy()
                x[rng.random(vocab) < 0.1] = -np.inf
                x[rng.random(vocab) < 0.05] = np.nan
                x[int(rng.integers(vocab))] = np.inf
                logit_rows.append(x)
                rows.append(cfg + (u,))
        x = np.full(vocab, -np.inf, np.float32)
        x[:3] = np.nan  # the host's argmax: 0 (-inf never wins)
        logit_rows += [x, np.full(vocab, np.nan, np.float32)]
        rows += [(1.0, 0, 1.0, 0.0, 0.5)] * 2
        # magnitudes over ~110 binades: with a small 1/T every bin carries mass (several chunks of
        # per-key counts); with 1/T = 1 most carry none (top_k landing there)
        x = (rng.choice([-1.0, 1.0], vocab) * 2.0 ** rng.uniform(-100, 10, vocab)).astype(np.float32)
        for cfg in [(0.01, 0, 1.0, 0.0), (0.01, 500, 0.9, 0.0), (0.003, 0, 1.0, 0.001), (1.0, vocab - 5, 1.0, 0.0)]:
            for u in (0.05, 0.5, 0.95):
                logit_rows.append(x)
                rows.append(cfg + (u,))
        # logits near the largest bf16 (the best in the top bin, next to inf and NaN keys); x - best
        # overflows to -inf for the negative ones
        x = rng.choice([3.3e38, 3.0e38, 2.0e38, 1e38, 1.0, -3e38], vocab) * rng.uniform(0.9, 1.0, vocab)
        x = x.astype(np.float32)
        for cfg in [(2e-38, 0, 1.0, 0.0), (5e-38, 20, 0.8, 0.0), (1.0, 0, 1.0, 0.0)]:  # 1/T normal (no FTZ question)
            for u in (0.2, 0.7):
                logit_rows.append(x)
                rows.append(cfg + (u,))
        # all equal, half of them -0.0: one tie, in index order
        x = np.zeros(vocab, np.float32)
        x[rng.random(vocab) < 0.5] = -0.0
        for u in (0.0, 0.3, 0.77, F32_BELOW_1):
            logit_rows.append(x)
            rows.append((1.0, 0, 1.0, 0.0, u))
        # ties: 200 at the top, 100 (or more) in the middle; u chosen to land inside them, also with
        # top_k inside the top tie; the expected pick is the tie's j-th smallest index
        tie_ok = True
        for cfg in [(1.0, 0, 1.0, 0.0), (0.5, 150, 1.0, 0.0), (2.0, 0, 0.95, 0.0)]:
            x = f32_row(bf16_bits(c.randn(vocab, scale=2.0).numpy()))
            top = rng.choice(vocab, 300, replace=False)
            x[top[:200]] = f32_row(bf16_bits(np.float32([x.max() + 1.0])))[0]
            x[top[200:]] = f32_row(bf16_bits(np.float32([x.max() - 1.5])))[0]
            _, (total, cum, _, _) = ref_sample(x, *cfg, 0.0)
            above = int((x > x[top[200]]).sum())  # candidates before the middle tie
            p_top, p_mid = float(cum[0]), float(cum[above] - cum[above - 1])
            ties = [np.sort(np.flatnonzero(x == x[top[0]])), np.sort(np.flatnonzero(x == x[top[200]]))]
            for tie, base, p, j in [(0, 0.0, p_top, 37), (0, 0.0, p_top, 123), (1, float(cum[above - 1]), p_mid, 50)]:
                u = float(np.float32((base + (j + 0.5) * p) / total))
                if u < 1.0:
                    logit_rows.append(x)
                    rows.append(cfg + (u,))
                    tie_ok &= ref_sample(x, *rows[-1])[0] == int(ties[tie][j])
        bits = bf16_bits(np.stack(logit_rows))
        picks = {}
        for block in blocks:
            picks[block] = run_sample_rows(be, bits, sample_params(rows), block)
            check_picks(c, tally, f"sample_rows sampling vocab={vocab} rows={len(rows)} block={block}", picks[block],
                        bits, rows)
        for block in blocks[1:]:
            c.check_exact(f"sample_rows same picks block={blocks[0]} vs {block} vocab={vocab}", picks[block],
                          picks[blocks[0]])
        c.record(f"sample_rows reference picks inside ties by index vocab={vocab}", tie_ok)

    # Random parameters on heavily tied logits (multiples of 0.5, some -inf and NaN).
    for vocab in (300, 512):
        rng = np.random.default_rng(vocab + 1)
        n = 160
        x = np.round(rng.standard_normal((n, vocab)) * rng.choice([1.0, 4.0], (n, 1))) / 2
        x[rng.random((n, vocab)) < 0.03] = -np.inf
        x[rng.random((n, vocab)) < 0.03] = np.nan
        rows = [(float(rng.choice([0.0, 0.3, 1.0, 2.5, 10.0])), int(rng.choice([0, 1, 3, 20, 1000])),
                 float(rng.choice([1.0, 0.5, 0.9, 0.99, 1e-3])), float(rng.choice([0.0, 0.01, 0.2, 0.9])),
                 float(np.float32(rng.uniform()))) for _ in range(n)]
        bits = bf16_bits(x.astype(np.float32))
        for block in blocks[-1:] if be.quick else blocks[::2]:
            check_picks(c, tally, f"sample_rows random params tied logits vocab={vocab} rows={n} block={block}",
                        run_sample_rows(be, bits, sample_params(rows), block), bits, rows)

    # Small vocabularies: 1, 2 and 7 entries.
    for vocab in (1, 2, 7):
        rng = np.random.default_rng(vocab)
        rows = [(1.0, 0, 1.0, 0.0, float(u)) for u in rng.uniform(size=8)] + [(0.5, 2, 0.6, 0.1, 0.99)]
        bits = bf16_bits(c.randn(len(rows), vocab).numpy())
        for block in blocks[-1:] if be.quick else blocks[::2]:
            check_picks(c, tally, f"sample_rows sampling vocab={vocab} rows={len(rows)} block={block}",
                        run_sample_rows(be, bits, sample_params(rows), block), bits, rows)

    # Distribution: one row, T 1, top_k 50, top_p 0.9, u on an even grid: the pick histogram (and
    # every pick) as the reference's.
    vocab, grid = 1000, (512 if be.quick else 4096)
    x = bf16_bits(c.randn(vocab, scale=2.0).numpy())
    rows = [(1.0, 50, 0.9, 0.0, (i + 0.5) / grid) for i in range(grid)]
    bits = np.tile(x, (grid, 1))
    got = run_sample_rows(be, bits, sample_params(rows), blocks[-1] if be.quick else blocks[0])
    want = np.array([ref_sample(f32_row(x), *r)[0] for r in rows], np.int64)
    hist_equal = bool(np.array_equal(np.bincount(got, minlength=vocab), np.bincount(want, minlength=vocab)))
    check_picks(c, tally, f"sample_rows distribution vocab={vocab} grid={grid}", got, bits, rows, hist_equal=hist_equal,
                tokens=len(set(want.tolist())))

    c.record("sample_rows boundary accepts <= 1% of picks", tally["accepts"] <= 0.01 * tally["picks"], **tally)

    for count in (12345, 33 * 32768):
        bits, val = bf16_from(c.randn(count))
        out = be.to_dev(np.full(count, np.nan, np.float32))
        be.launch("sampling.cu", "bf16_rows_to_f32", (min(1024, (count + 255) // 256),), (256,), [be.to_dev(bits), out, i64(count)])
        c.check_exact(f"bf16_rows_to_f32 n={count}", torch.from_numpy(be.to_host(out)), val)


def test_gemv(c):
    be = c.be
    shapes = [(37, 64), (100, 4104), (5, 14336)] if not be.quick else [(37, 64), (9, 1032)]
    for (n, k) in shapes:
        for m in (1, 2, 3, 4):
            xb, xv = bf16_from(c.randn(m, k))
            wb, wv = bf16_from(c.randn(n, k, scale=0.05))
            y = be.to_dev(np.full((m, n), NAN_BF16))
            be.launch("gemv.cu", "gemv_bf16", ((n + 3) // 4,), (128,),
                      [be.to_dev(xb), be.to_dev(wb), y, i32(m), i32(n), i32(k)])
            c.check_close(f"gemv_bf16 m={m} n={n} k={k}", f32_of_bits(be.to_host(y)), xv @ wv.T)


def bench_gemv(be):
    """Timings (not pass/fail) of gemv_bf16 against torch.matmul (cuBLAS) at batch 1 and 4 for
    the 8B shape's projections, as weight-read bandwidth."""
    import torch as th

    cp = be.cp
    rows = []
    for (name, n, k) in (("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096),
                         ("down", 4096, 14336), ("lm_head", 32768, 4096)):
        w = th.randn(n, k, device="cuda", dtype=th.bfloat16)
        for m in (1, 4):
            x = th.randn(m, k, device="cuda", dtype=th.bfloat16)
            y = th.empty(m, n, device="cuda", dtype=th.bfloat16)
            xw, ww, yw = cp.asarray(x.view(th.int16)), cp.asarray(w.view(th.int16)), cp.asarray(y.view(th.int16))

            def ours():
                be.launch("gemv.cu", "gemv_bf16", ((n + 3) // 4,), (128,), [xw, ww, yw, i32(m), i32(n), i32(k)],
                          sync=False)

            def torch_mm():
                th.matmul(x, w.T, out=y)

            # Both on the default stream, so the same events time both.
            t_ours = be.time_ms(ours, reps=50)
            t_torch = be.time_ms(torch_mm, reps=50)
            gb = n * k * 2 / 1e9
            row = {"case": f"{name} m={m}", "n": n, "k": k, "gemv_us": round(t_ours * 1e3, 1),
                   "cublas_us": round(t_torch * 1e3, 1), "gemv_gb_s": round(gb / (t_ours * 1e-3), 1),
                   "cublas_gb_s": round(gb / (t_torch * 1e-3), 1)}
            print(f"bench gemv {row['case']:14} gemv {row['gemv_us']:8.1f} us ({row['gemv_gb_s']:7.1f} GB/s)  "
                  f"cuBLAS {row['cublas_us']:8.1f} us ({row['cublas_gb_s']:7.1f} GB/s)", flush=True)
            rows.append(row)
    return rows


def bench_attention(be):
    """Timings (not pass/fail) at the 8B shape (32/8 heads, head_dim 128, block 16):
    paged_attention for decode at several partition counts, and a 2048-token causal prefill in
    one layer through flash_attention (tensor cores) and, for comparison, paged_attention."""
    cp = be.cp
    nh, nkv, hd, bs = 32, 8, 128, 16
    kv_dim = nkv * hd
    q_stride = (nh + 2 * nkv) * hd
    out_rows = []

    def bf16_bits(n):
        return (cp.random.standard_normal(n, dtype=cp.float32).view(cp.uint32) >> 16).astype(cp.uint16)

    def case(label, ctx_lens, seq_of, n_parts_list, flash=False):
        n_seqs = max(seq_of) + 1
        per_seq = [max(c for c, s in zip(ctx_lens, seq_of) if s == q) for q in range(n_seqs)]
        need = [math.ceil(L / bs) for L in per_seq]
        max_blocks = max(need)
        total = sum(need)
        perm = cp.random.permutation(total).astype(cp.int32)
        tables = cp.zeros((n_seqs, max_blocks), cp.int32)
        o = 0
        for q in range(n_seqs):
            tables[q, : need[q]] = perm[o: o + need[q]]
            o += need[q]
        kc, vc = bf16_bits(total * bs * kv_dim), bf16_bits(total * bs * kv_dim)
        nq = len(ctx_lens)
        qd = bf16_bits(nq * q_stride)
        d_seq = cp.asarray(np.asarray(seq_of, np.int32))
        d_ctx = cp.asarray(np.asarray(ctx_lens, np.int32))
        d_ws = cp.zeros(nq, cp.int32)
        out = cp.empty(nq * nh * hd, cp.uint16)
        kv_bytes = sum(per_seq) * kv_dim * 2 * 2
        # attention FLOPs: 2 (QK and PV) x 2 x visible keys x head_dim per (row, head)
        flops = 4.0 * sum(ctx_lens) * hd * nh
        runs = [("paged", n) for n in n_parts_list] + ([("flash", 1)] if flash else [])
        for kind, n_parts in runs:
            psize = math.ceil(max(ctx_lens) / n_parts)
            pa = cp.empty(nq * nh * n_parts * hd, cp.float32) if n_parts > 1 else None
            pm = cp.empty(nq * nh * n_parts, cp.float32) if n_parts > 1 else None
            ps = cp.empty(nq * nh * n_parts, cp.float32) if n_parts > 1 else None
            done = cp.zeros(nq * nh, cp.uint32) if n_parts > 1 else None
            tiles = cp.asarray(flash_tiles(seq_of))
            n_tiles = len(tiles) // 2

            def run():
                if kind == "flash":
                    be.launch("flash_attention.cu", "flash_attention", (n_tiles, nh), (128,),
                              [qd, i32(q_stride), kc, vc, tables, i32(max_blocks), d_seq, d_ctx, d_ws, tiles, out,
                               i32(n_tiles), i32(nh), i32(nkv), i32(hd), i32(bs), f32(1.0 / math.sqrt(hd))],
                              sync=False)
                    return
                be.launch("attention.cu", "paged_attention", (nq, nh, n_parts), (32,),
                          [qd, i32(q_stride), kc, vc, tables, i32(max_blocks), d_seq, d_ctx, d_ws, None, out, pa, pm,
                           ps, done, i32(nq), i32(nh), i32(nkv), i32(hd), i32(bs), i32(psize), i32(n_parts),
                           f32(1.0 / math.sqrt(hd))], sync=False)

            ms = be.time_ms(run)
            row = {"case": label, "kernel": kind, "n_parts": n_parts, "partition": psize, "us": round(ms * 1e3, 1),
                   "kv_gb_s": round(kv_bytes / (ms * 1e-3) / 1e9, 1), "tflops": round(flops / (ms * 1e-3) / 1e12, 1)}
            print(f"bench attention {label:34} {kind:5} parts={n_parts:<3} partition={psize:<5} {row['us']:9.1f} us  "
                  f"KV read {row['kv_gb_s']:7.1f} GB/s (unique bytes)  {row['tflops']:6.1f} TFLOP/s", flush=True)
            out_rows.append(row)

    case("decode batch 1 ctx 256", [256], [0], [1, 4, 8])
    case("decode batch 1 ctx 2048", [2048], [0], [1, 4, 16, 32])
    case("decode batch 32 ctx 256", [256] * 32, list(range(32)), [1, 2])
    case("decode batch 128 ctx 256", [256] * 128, list(range(128)), [1])
    case("prefill 2048 causal (one layer)", list(range(1, 2049)), [0] * 2048, [1], flash=True)
    return out_rows


TESTS = {
    "embedding": test_embedding,
    "norm": test_norm,
    "rope_kv_write": test_rope_kv_write,
    "silu": test_silu,
    "attention": test_attention,
    "sampling": test_sampling,
    "gemv": test_gemv,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["cupy", "emu"], default="cupy")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--only", action="append", choices=sorted(TESTS), help="run only these groups")
    ap.add_argument("--cuda-dir", default=CUDA_DIR, help="folder of prelude.cuh and the .cu files")
    ap.add_argument("--bench", action="store_true", help="also time paged_attention at 8B shapes (cupy only; "
                    "reported, never pass/fail)")
    ap.add_argument("--no-flash", action="store_true", help="skip flash_attention's cases (slow under emulation)")
    args = ap.parse_args()
    global SKIP_FLASH
    SKIP_FLASH = args.no_flash

    if args.backend == "emu" and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        # The ASan-built kernels need the ASan runtime loaded first: re-run under it.
        asan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
        env = dict(os.environ, LD_PRELOAD=asan, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)

    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    be = CupyBackend(args.cuda_dir) if args.backend == "cupy" else EmuBackend(args.cuda_dir)
    print(f"test_kernels: backend {be.describe()}; tolerance {REL_TOL}", flush=True)
    c = Ctx(be)
    t0 = time.time()
    errors = []
    for name, fn in TESTS.items():
        if args.only and name not in args.only:
            continue
        try:
            fn(c)
        except Exception as e:  # a compile error or launch failure: record it, go on
            traceback.print_exc()
            c.record(f"{name}: exception", False, error=f"{type(e).__name__}: {e}"[:2000])
            errors.append(name)
    bench = None
    if args.bench and be.name == "cupy" and not errors:
        try:
            bench = bench_attention(be)
            bench += [dict(r, kind="gemv") for r in bench_gemv(be)]
        except Exception as e:  # noqa: BLE001 -- timings are informative only
            traceback.print_exc()
            bench = [{"error": f"{type(e).__name__}: {e}"[:1000]}]
    n_ok = sum(r["ok"] for r in c.results)
    n_fail = len(c.results) - n_ok
    secs = time.time() - t0
    print(f"test_kernels: {n_ok} passed, {n_fail} failed, {secs:.1f} s", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"backend": be.describe(), "tolerance": REL_TOL, "passed": n_ok, "failed": n_fail,
                       "seconds": secs, "results": c.results, "bench": bench}, f, indent=1)
    return 0 if n_fail == 0 and n_ok > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
