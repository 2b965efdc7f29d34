#!/usr/bin/env python3
"""Tessera's device check: correctness against PyTorch and speed against this GPU's own measured
ceilings, in one run, on random-weight MistralForCausalLM checkpoints. Run by check.sh.

Steps (each one's failure is recorded and the rest still run; a time budget skips what no
longer fits and says so):
  a) ceilings: device-to-device copy bandwidth (4 GiB, best of 10, bytes read + written) and the
     bf16 GEMM peak (torch.matmul 8192^3, mean of 10 after 3 warm-ups);
  -) `tessera check kernels` and `tessera check nccl` (the binary's own device self-checks);
  b) checkpoints: a "1b" shape (correctness) and an "8b" shape (speed), random normal(0, 0.02)
     weights, norms 1 + noise, bf16 safetensors via save_pretrained, plus a byte-level
     tokenizer.json (tessera's loader wants one; the check itself passes token ids);
  c) correctness on 1b: first-step logits and 32 greedy tokens for 4 random prompts, tessera
     (`tessera batch`) vs a PyTorch bf16 (SDPA) loop with a KV cache; agreement must hold up to
     the first step whose PyTorch top-2 logit gap is below 1e-2. An f32 PyTorch run of the same
     weights is reported alongside, for context;
  d) speed on 8b: `tessera bench engine --json` at batch 1/32/128 (prompt 128, 128 new tokens)
     and a 2048-token prefill, against transformers `generate` (SDPA, greedy, KV cache) and a
     2048-token PyTorch forward, and against the ceilings of (a);
  e) one table on stdout, everything as JSON in --out.

    python3 kernels/gpu/check.py --bin .gpu-bin/tessera --out gpu-out [--cuda-lib-dir DIR]...
    python3 kernels/gpu/check.py --dry-run [--bin target/debug/tessera]   # tiny shapes, CPU

Exit status: 0 when every acceptance criterion passed, 1 otherwise (including skipped steps).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

GIB = 1 << 30
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=32768, max_position_embeddings=4096),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=32768, max_position_embeddings=32768),
    # --dry-run stand-ins for both roles
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=2048),
}
TARGETS = {
    "logits_rel_err_max": 2e-2,
    "near_tie_gap": 1e-2,
    "decode_roofline_fraction_min": 0.75,
    "batch128_vs_pytorch_min": 5.0,
    "prefill_gemm_fraction_min": 0.5,
}
PROMPT_LENS = (7, 33, 100, 257)
GREEDY_STEPS = 32


def log(msg):
    print(msg, flush=True)


def fmt(v, spec=".3g", none="-"):
    if v is None:
        return none
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


class Budget:
    """Wall-clock budget for the whole script; steps ask before they start."""

    def __init__(self, seconds):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + seconds

    def elapsed(self):
        return time.monotonic() - self.t0

    def left(self):
        return self.deadline - time.monotonic()


# ---------------------------------------------------------------------------------------------
# Ceilings


def measure_ceilings(torch, dev, copy_bytes, gemm_n):
    """Copy bandwidth (bytes read + written per second, best of 10) and bf16 GEMM FLOP/s (mean of 10)."""
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    out = {}
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=dev)
    src.fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t)
    out["copy_bytes"] = copy_bytes
    out["copy_bandwidth_bytes_per_s"] = 2 * copy_bytes / best
    del src, dst
    a = torch.randn(gemm_n, gemm_n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(gemm_n, gemm_n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        torch.matmul(a, b)
    sync()
    mean = (time.perf_counter() - t) / 10
    out["gemm_n"] = gemm_n
    out["gemm_bf16_flops_per_s"] = 2 * gemm_n ** 3 / mean
    del a, b
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints


INITS = ("stable", "hf")


def build_model(torch, shape, seed, dev, init="stable"):
    """A random-weight bf16 MistralForCausalLM (SDPA attention), created directly on `dev`.

    Every matrix ~ normal(0, 0.02), every norm weight 1 + normal(0, 0.05), seeded. With
    init="hf" that is all (Hugging Face's initializer_range). With init="stable" (default) the
    embeddings are scaled to std 1 and the residual-branch outputs (o_proj, down_proj) to std
    0.002, so the residual stream is not dominated by freshly rounded branch outputs: measured on
    the 1b shape, PyTorch's own bf16 logits are ~2.2% (relative) away from an f32 run of the same
    weights with "hf" and ~1.0% with "stable" -- with "hf" a 2e-2 bound against PyTorch bf16
    would measure PyTorch's rounding more than tessera's."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**SHAPES[shape], rope_theta=1e6, tie_word_embeddings=False, sliding_window=None,
                        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = MistralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device=dev, dtype=torch.bfloat16).eval()
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32))
            else:
                std = 0.02
                if init == "stable" and name.endswith("embed_tokens.weight"):
                    std = 1.0
                elif init == "stable" and name.endswith(("o_proj.weight", "down_proj.weight")):
                    std = 0.002
                p.copy_(torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32).mul_(std))
    model.generation_config.eos_token_id = None  # never stop early
    model.generation_config.pad_token_id = 0
    return model


def byte_tokenizer_json(vocab_size):
    """The same byte-fallback BPE tokenizer tessera builds for dummy models (text_assets.rs)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = 3 + b
    for i in range(259, vocab_size):
        vocab[f"<extra_{i}>"] = i

    def special(i, content):
        return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def save_checkpoint(model, path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    model.save_pretrained(path)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(byte_tokenizer_json(model.config.vocab_size), f)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def matmul_params(model):
    """Parameters of the decoder layers' matrices: the per-token matmul work is 2 FLOPs each
    (embeddings, lm_head (applied once per sequence in a prefill) and norms excluded)."""
    return sum(p.numel() for n, p in model.model.layers.named_parameters() if p.ndim == 2)


# ---------------------------------------------------------------------------------------------
# PyTorch reference and baselines


def reference_greedy(torch, model, prompts, steps):
    """Per prompt: first-step logits (f32, CPU), greedy tokens and each step's top-2 logit gap."""
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=dev)
            res = model(input_ids=ids, use_cache=True)
            logits = res.logits[0, -1].float()
            first = logits.cpu()
            past = res.past_key_values
            tokens, gaps = [], []
            for step in range(steps):
                top = torch.topk(logits, 2)
                gaps.append(float(top.values[0] - top.values[1]))
                tok = int(torch.argmax(logits))  # first maximum, like tessera's argmax
                tokens.append(tok)
                if step + 1 == steps:
                    break
                res = model(input_ids=torch.tensor([[tok]], device=dev), past_key_values=past, use_cache=True)
                past = res.past_key_values
                logits = res.logits[0, -1].float()
            out.append({"first_logits": first, "tokens": tokens, "gaps": gaps})
    return out


def pytorch_baselines(torch, model, batches, prompt_len, gen_len, prefill_len, seed, budget, reserve_s, log_fn):
    """transformers generate throughput per batch size, and a prefill forward."""
    dev = next(model.parameters()).device
    vocab = model.config.vocab_size
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(seed)
    res = {"generate": [], "prefill": None, "skipped": []}

    def gen(ids, n):
        sync()
        t = time.perf_counter()
        o = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           use_cache=True, eos_token_id=None, pad_token_id=0)
        sync()
        return time.perf_counter() - t, o.shape[1] - ids.shape[1]

    with torch.no_grad():
        # prefill first: it is cheap and is the figure for the prefill ratio
        if budget.left() > reserve_s + 20:
            ids = torch.randint(3, vocab, (1, prefill_len), generator=g).to(dev)
            times = []
            for _ in range(3):
                sync()
                t = time.perf_counter()
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                sync()
                times.append(time.perf_counter() - t)
            best = min(times[1:])
            res["prefill"] = {"prompt_len": prefill_len, "seconds": best, "tok_s": prefill_len / best}
            log_fn(f"pytorch prefill {prefill_len}: {prefill_len / best:.0f} tok/s")
        else:
            res["skipped"].append("prefill: time budget")
        for b in batches:
            # rough cost: a warm-up, then 1 and gen_len new tokens; skip when it may not fit
            if budget.left() < reserve_s + 25 + 0.2 * b:
                res["skipped"].append(f"generate batch {b}: time budget")
                log_fn(f"pytorch generate batch {b}: skipped (time budget, {budget.left():.0f} s left)")
                continue
            ids = torch.randint(3, vocab, (b, prompt_len), generator=g).to(dev)
            gen(ids, 2)  # warm-up
            t1, _ = gen(ids, 1)
            tn, n_new = gen(ids, gen_len)
            row = {"batch": b, "prompt_len": prompt_len, "gen_len": n_new, "seconds": tn,
                   "seconds_1_token": t1,
                   "e2e_tok_s": b * n_new / tn,
                   "decode_tok_s": b * (n_new - 1) / (tn - t1) if tn > t1 and n_new > 1 else None}
            res["generate"].append(row)
            log_fn(f"pytorch generate batch {b}: {row['e2e_tok_s']:.0f} tok/s end to end, "
                   f"{fmt(row['decode_tok_s'], '.0f')} tok/s decode")
            del ids
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------
# Tessera


class Tessera:
    def __init__(self, binary, device, lib_dirs, cache_dir, budget):
        self.binary, self.device, self.lib_dirs, self.cache_dir, self.budget = binary, device, lib_dirs, cache_dir, budget

    def run(self, args, limit_s, label):
        """Runs `tessera ARGS --device D [--cuda-lib-dir ...]`; returns a record (never raises)."""
        cmd = [self.binary] + args + ["--device", self.device, "--cache-dir", self.cache_dir]
        for d in self.lib_dirs:
            cmd += ["--cuda-lib-dir", d]
        limit = max(5.0, min(limit_s, self.budget.left() - 5))
        rec = {"label": label, "cmd": " ".join(cmd), "limit_s": round(limit, 1)}
        log(f"$ {rec['cmd']}   (limit {limit:.0f} s)")
        t = time.monotonic()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            rec.update(rc=p.returncode, stdout=p.stdout, stderr_tail=p.stderr[-4000:])
            if p.returncode != 0:
                rec["error"] = f"exit {p.returncode}: {p.stderr.strip()[-1500:]}"
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            rec.update(rc=None, stdout=out, stderr_tail=err[-4000:], error=f"timed out after {limit:.0f} s")
        except OSError as e:
            rec.update(rc=None, stdout="", stderr_tail="", error=f"could not start: {e}")
        rec["seconds"] = round(time.monotonic() - t, 1)
        if rec.get("error"):
            log(f"  -> {label} failed: {rec['error'][:800]}")
        else:
            log(f"  -> {label} ok in {rec['seconds']} s")
        return rec


def json_lines(text):
    out = []
    for line in (text or "").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


# ---------------------------------------------------------------------------------------------
# Comparison


def compare_correctness(torch, ref, ref32, tess_outputs, prompts):
    rows = []
    for i, prompt in enumerate(prompts):
        r = ref[i]
        row = {"prompt_len": len(prompt), "ref_tokens": r["tokens"], "ref_gaps": r["gaps"]}
        near = [k for k, gap in enumerate(r["gaps"]) if gap < TARGETS["near_tie_gap"]]
        row["first_near_tie_step"] = near[0] if near else None
        row["min_gap"] = min(r["gaps"]) if r["gaps"] else None
        if ref32 is not None:
            row["pt_bf16_vs_f32_logits_rel_err"] = rel(torch, r["first_logits"], ref32[i]["first_logits"])
            row["pt_bf16_vs_f32_agree"] = leading_agreement(r["tokens"], ref32[i]["tokens"])
        t = tess_outputs[i] if tess_outputs is not None and i < len(tess_outputs) else None
        if t is None:
            row["error"] = "no tessera output"
            row["pass"] = False
            rows.append(row)
            continue
        toks = list(t.get("tokens", []))
        if len(toks) == len(prompt) + len(r["tokens"]) and toks[: len(prompt)] == list(prompt):
            toks = toks[len(prompt):]  # tolerate outputs that echo the prompt
        row["tessera_tokens"] = toks
        fl = t.get("first_logits")
        if fl is not None and len(fl) == r["first_logits"].numel():
            tl = torch.tensor(fl, dtype=torch.float32)
            row["logits_rel_err"] = rel(torch, tl, r["first_logits"])
            row["logits_nan"] = bool(torch.isnan(tl).any())
            if ref32 is not None:
                row["logits_rel_err_vs_f32"] = rel(torch, tl, ref32[i]["first_logits"])
        else:
            row["logits_rel_err"] = None
            row["error"] = f"first_logits missing or of length {len(fl) if fl is not None else None}"
        agree = leading_agreement(toks, r["tokens"])
        row["agree"] = agree
        needed = row["first_near_tie_step"] if row["first_near_tie_step"] is not None else len(r["tokens"])
        row["agree_needed"] = needed
        if ref32 is not None:
            row["agree_vs_f32"] = leading_agreement(toks, ref32[i]["tokens"])
        if agree < len(r["tokens"]) and agree < len(r["gaps"]):
            row["gap_at_first_disagreement"] = r["gaps"][agree]
        row["greedy_pass"] = agree >= needed
        row["logits_pass"] = (row["logits_rel_err"] is not None and not row.get("logits_nan")
                              and row["logits_rel_err"] <= TARGETS["logits_rel_err_max"])
        row["pass"] = row["greedy_pass"] and row["logits_pass"]
        rows.append(row)
    return rows


def rel(torch, a, b):
    a = a.double()
    b = b.double()
    d = float(torch.linalg.vector_norm(b))
    return float(torch.linalg.vector_norm(a - b)) / d if d > 0 else float(torch.linalg.vector_norm(a))


def leading_agreement(a, b):
    n = 0
    for x, y in zip(a, b):
        if int(x) != int(y):
            break
        n += 1
    return n


def speed_summary(tess_rows, prefill_row, pt, ceilings, n_matmul, weight_bytes_hint):
    """Speed rows: tessera vs PyTorch and vs the ceilings."""
    bw = (ceilings or {}).get("copy_bandwidth_bytes_per_s")
    peak = (ceilings or {}).get("gemm_bf16_flops_per_s")
    pt_gen = {r["batch"]: r for r in (pt or {}).get("generate", [])}
    rows = []
    for r in tess_rows:
        b = r.get("batch")
        row = {"batch": b, "tessera_decode_tok_s": r.get("decode_tok_s"), "tessera_prefill_tok_s": r.get("prefill_tok_s"),
               "weight_bytes_per_step": r.get("weight_bytes_per_step"), "kv_bytes_per_step_mean": r.get("kv_bytes_per_step_mean")}
        p = pt_gen.get(b)
        row["pytorch_decode_tok_s"] = p.get("decode_tok_s") if p else None
        row["pytorch_e2e_tok_s"] = p.get("e2e_tok_s") if p else None
        row["ratio_decode"] = ratio(row["tessera_decode_tok_s"], row["pytorch_decode_tok_s"])
        row["ratio_vs_e2e"] = ratio(row["tessera_decode_tok_s"], row["pytorch_e2e_tok_s"])
        if b == 1 and bw and row["tessera_decode_tok_s"] is not None:
            step_bytes = (row["weight_bytes_per_step"] or weight_bytes_hint or 0) + (row["kv_bytes_per_step_mean"] or 0)
            row["bytes_per_step"] = step_bytes
            row["roofline_tok_s"] = bw / step_bytes if step_bytes else None
            row["roofline_fraction"] = row["tessera_decode_tok_s"] * step_bytes / bw if step_bytes else None
        rows.append(row)
    pre = {"prompt_len": (prefill_row or {}).get("prompt_len"),
           "tessera_prefill_tok_s": (prefill_row or {}).get("prefill_tok_s"),
           "pytorch_prefill_tok_s": ((pt or {}).get("prefill") or {}).get("tok_s"),
           "matmul_params": n_matmul}
    pre["ratio"] = ratio(pre["tessera_prefill_tok_s"], pre["pytorch_prefill_tok_s"])
    for who in ("tessera", "pytorch"):
        v = pre[f"{who}_prefill_tok_s"]
        pre[f"{who}_gemm_fraction"] = v * 2 * n_matmul / peak if (v and peak and n_matmul) else None
    return rows, pre


def ratio(a, b):
    return a / b if (a is not None and b) else None


def acceptance(res):
    """(criterion, measured, target, PASS/FAIL/MISSING)."""
    out = []

    def add(name, value, target, ok):
        out.append({"criterion": name, "value": value, "target": target,
                    "status": "MISSING" if ok is None else ("PASS" if ok else "FAIL")})

    rows = res.get("correctness") or []
    worst = [r.get("logits_rel_err") for r in rows]
    add("kernel unit tests (test_kernels.py)", res.get("test_kernels_summary"), "all pass, no NaN",
        None if res.get("test_kernels_ok") is None else res["test_kernels_ok"])
    kern = res.get("tessera_kernels") or {}
    add("tessera check kernels", kern.get("summary"), "all ok", kern.get("ok"))
    nccl = res.get("nccl") or {}
    add("NCCL 1-rank all-reduce", nccl.get("summary"), "ok", nccl.get("ok"))
    if rows and all(w is not None for w in worst) and len(rows) == len(PROMPT_LENS):
        add("1b logits rel err (max over prompts)", max(worst), f"<= {TARGETS['logits_rel_err_max']}",
            all(r.get("logits_pass") for r in rows))
        add("1b greedy agreement until first near-tie", [f"{r.get('agree')}/{r.get('agree_needed')}" for r in rows],
            "all prompts", all(r.get("greedy_pass") for r in rows))
    else:
        add("1b logits rel err (max over prompts)", None, f"<= {TARGETS['logits_rel_err_max']}", None)
        add("1b greedy agreement until first near-tie", None, "all prompts", None)
    speed = {r["batch"]: r for r in res.get("speed") or []}
    frac = (speed.get(1) or {}).get("roofline_fraction")
    add("8b batch-1 decode / roofline", frac, f">= {TARGETS['decode_roofline_fraction_min']}",
        None if frac is None else frac >= TARGETS["decode_roofline_fraction_min"])
    r128 = (speed.get(128) or {}).get("ratio_decode")
    add("8b batch-128 decode vs PyTorch generate", r128, f">= {TARGETS['batch128_vs_pytorch_min']}x",
        None if r128 is None else r128 >= TARGETS["batch128_vs_pytorch_min"])
    pf = (res.get("prefill") or {}).get("tessera_gemm_fraction")
    add("8b prefill 2048 / GEMM peak", pf, f">= {TARGETS['prefill_gemm_fraction_min']}",
        None if pf is None else pf >= TARGETS["prefill_gemm_fraction_min"])
    return out


def render(res):
    L = []
    env = res.get("env") or {}
    L.append("=" * 100)
    L.append(f"Tessera device check   {env.get('gpu', '?')}  driver {env.get('driver', '?')}  "
             f"torch {env.get('torch', '?')}  transformers {env.get('transformers', '?')}  "
             f"{'DRY RUN (CPU, tiny shapes)' if res.get('dry_run') else ''}")
    c = res.get("ceilings") or {}
    L.append(f"Ceilings (this run): copy bandwidth {fmt(c.get('copy_bandwidth_bytes_per_s', 0) / 1e12 if c else None, '.3f')} TB/s "
             f"(read + write, {fmt(c.get('copy_bytes', 0) / GIB if c else None, '.2g')} GiB copy, best of 10); "
             f"bf16 GEMM {fmt(c.get('gemm_bf16_flops_per_s', 0) / 1e12 if c else None, '.1f')} TFLOP/s "
             f"({c.get('gemm_n', '?')}^3, mean of 10)")
    L.append("")
    L.append("Correctness (1b shape, random weights): tessera vs PyTorch bf16 (SDPA); near-tie = top-2 gap < "
             f"{TARGETS['near_tie_gap']}")
    L.append(f"  {'prompt':>6} {'logits rel err':>15} {'(vs f32)':>9} {'PT bf16 vs f32':>15} {'agree':>7} "
             f"{'needed':>7} {'first tie':>9} {'gap@diverge':>11} {'agree f32':>9}  result")
    for r in res.get("correctness") or []:
        L.append(f"  {r.get('prompt_len'):>6} {fmt(r.get('logits_rel_err'), '.2e'):>15} "
                 f"{fmt(r.get('logits_rel_err_vs_f32'), '.2e'):>9} {fmt(r.get('pt_bf16_vs_f32_logits_rel_err'), '.2e'):>15} "
                 f"{fmt(r.get('agree'), 'd'):>7} {fmt(r.get('agree_needed'), 'd'):>7} "
                 f"{fmt(r.get('first_near_tie_step'), 'd', 'none'):>9} {fmt(r.get('gap_at_first_disagreement'), '.3g'):>11} "
                 f"{fmt(r.get('agree_vs_f32'), 'd'):>9}  {'PASS' if r.get('pass') else 'FAIL'}"
                 + (f"  ({r['error']})" if r.get("error") else ""))
    L.append("")
    L.append("Speed (8b shape): decode tok/s = output tokens per second over all sequences "
             "(PyTorch decode = (t(gen N) - t(gen 1)) excluded prefill)")
    L.append(f"  {'batch':>5} {'tessera':>10} {'PyTorch':>10} {'ratio':>7} {'PT e2e':>10} {'ratio':>7} "
             f"{'bytes/step':>11} {'roofline':>10} {'fraction':>8}")
    for r in res.get("speed") or []:
        L.append(f"  {r.get('batch'):>5} {fmt(r.get('tessera_decode_tok_s'), '.1f'):>10} "
                 f"{fmt(r.get('pytorch_decode_tok_s'), '.1f'):>10} {fmt(r.get('ratio_decode'), '.2f'):>7} "
                 f"{fmt(r.get('pytorch_e2e_tok_s'), '.1f'):>10} {fmt(r.get('ratio_vs_e2e'), '.2f'):>7} "
                 f"{fmt(r.get('bytes_per_step'), '.3g'):>11} {fmt(r.get('roofline_tok_s'), '.1f'):>10} "
                 f"{fmt(r.get('roofline_fraction'), '.3f'):>8}")
    p = res.get("prefill") or {}
    L.append(f"  prefill {fmt(p.get('prompt_len'), 'd')} tokens: tessera {fmt(p.get('tessera_prefill_tok_s'), '.0f')} tok/s "
             f"(GEMM fraction {fmt(p.get('tessera_gemm_fraction'), '.3f')}), PyTorch {fmt(p.get('pytorch_prefill_tok_s'), '.0f')} "
             f"tok/s (GEMM fraction {fmt(p.get('pytorch_gemm_fraction'), '.3f')}), ratio {fmt(p.get('ratio'), '.2f')}; "
             f"FLOPs/token = 2 x {fmt(p.get('matmul_params'), '.4g')} layer matmul params")
    L.append("")
    L.append("Acceptance")
    for a in res.get("acceptance") or []:
        v = a["value"]
        vs = fmt(v, ".3g") if isinstance(v, float) else (str(v) if v is not None else "-")
        L.append(f"  {a['status']:8} {a['criterion']:45} {vs:>30}   target {a['target']}")
    if res.get("skipped"):
        L.append("Skipped: " + "; ".join(res["skipped"]))
    if res.get("errors"):
        L.append("Errors:")
        for e in res["errors"]:
            L.append(f"  - {e[:400]}")
    L.append(f"Total {fmt(res.get('seconds'), '.0f')} s")
    L.append("=" * 100)
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=".gpu-bin/tessera", help="the tessera binary")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-out", help="folder for check.json")
    ap.add_argument("--cuda-lib-dir", action="append", default=[], help="passed on to tessera (repeatable)")
    ap.add_argument("--work", default=None, help="where checkpoints go [default: a fresh folder in /tmp]")
    ap.add_argument("--budget-s", type=float, default=400.0, help="wall-clock budget of this script")
    ap.add_argument("--test-kernels-json", default=None, help="results of test_kernels.py, folded into the table")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, small sizes: checks the plumbing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", choices=INITS, default="stable", help="random-weight recipe (see build_model)")
    args = ap.parse_args()

    budget = Budget(args.budget_s)
    res = {"dry_run": args.dry_run, "init": args.init, "targets": TARGETS, "errors": [], "skipped": [], "steps": {}}
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="tessera-check-", dir="/tmp")
    os.makedirs(work, exist_ok=True)
    res["work"] = work

    def step_time(name, t):
        res["steps"][name] = round(time.monotonic() - t, 1)
        log(f"[{budget.elapsed():6.1f} s] {name} done in {res['steps'][name]} s")

    def error(where, e):
        msg = f"{where}: {type(e).__name__}: {e}" if isinstance(e, BaseException) else f"{where}: {e}"
        res["errors"].append(msg)
        log(f"ERROR {msg}")
        if isinstance(e, BaseException):
            traceback.print_exc()

    if args.test_kernels_json and os.path.isfile(args.test_kernels_json):
        try:
            with open(args.test_kernels_json) as f:
                tk = json.load(f)
            res["test_kernels_ok"] = tk.get("failed") == 0 and tk.get("passed", 0) > 0
            res["test_kernels_summary"] = f"{tk.get('passed')} passed, {tk.get('failed')} failed"
        except (OSError, ValueError) as e:
            error("reading test_kernels json", e)
    elif args.test_kernels_json:
        res["test_kernels_ok"] = False
        res["test_kernels_summary"] = "no results file"

    import torch

    dry = args.dry_run
    dev = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    if dev.type != "cuda" and not dry:
        error("setup", "no CUDA device visible to PyTorch")
    import transformers

    res["env"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                  "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if q.returncode == 0 and q.stdout.strip():
            name, driver, mem = [s.strip() for s in q.stdout.strip().splitlines()[0].split(",")]
            res["env"].update(gpu=name, driver=driver, memory=mem)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
    log(f"env: {res['env']}")

    shape_small = "tiny" if dry else "1b"
    shape_big = "tiny" if dry else "8b"
    bench_batches = [1, 4] if dry else [1, 32, 128]
    bench_prompt, bench_gen = (16, 8) if dry else (128, 128)
    prefill_len = 64 if dry else 2048
    tess = Tessera(args.bin, "cpu" if dry else "cuda", args.cuda_lib_dir, os.path.join(work, "cache"), budget)

    # a) ceilings
    t = time.monotonic()
    try:
        res["ceilings"] = measure_ceilings(torch, dev, (64 << 20) if dry else 4 * GIB, 256 if dry else 8192)
        c = res["ceilings"]
        log(f"ceilings: copy {c['copy_bandwidth_bytes_per_s'] / 1e12:.3f} TB/s, "
            f"GEMM {c['gemm_bf16_flops_per_s'] / 1e12:.1f} TFLOP/s")
    except Exception as e:  # noqa: BLE001 -- record and go on
        error("ceilings", e)
    step_time("ceilings", t)

    # the binary's own checks: cheap, and useful even when later steps fail
    t = time.monotonic()
    rec = tess.run(["check", "kernels"], 120, "check kernels")
    lines = [j for j in json_lines(rec.get("stdout")) if "kernel" in j]
    res["tessera_kernels"] = {"lines": lines, "error": rec.get("error"), "stderr_tail": rec.get("stderr_tail")}
    if lines:
        n_ok = sum(bool(j.get("ok")) for j in lines)
        worst = max((j.get("rel_err") or 0.0) for j in lines)
        res["tessera_kernels"].update(ok=(n_ok == len(lines) and not rec.get("error")),
                                      summary=f"{n_ok}/{len(lines)} ok, max rel err {worst:.2e}")
        for j in lines:
            log(f"  kernel {j.get('kernel')}: rel_err {fmt(j.get('rel_err'), '.2e')} {'ok' if j.get('ok') else 'FAIL'}")
    else:
        res["tessera_kernels"].update(ok=False, summary="no output")
    if rec.get("error"):
        error("tessera check kernels", rec["error"])
    rec = tess.run(["check", "nccl"], 60, "check nccl")
    lines = json_lines(rec.get("stdout"))
    res["nccl"] = {"json": lines[-1] if lines else None, "error": rec.get("error")}
    res["nccl"]["ok"] = bool(lines and lines[-1].get("ok")) and not rec.get("error")
    res["nccl"]["summary"] = "ok" if res["nccl"]["ok"] else (rec.get("error") or "no output")[:80]
    if rec.get("error"):
        error("tessera check nccl", rec["error"])
    step_time("tessera checks", t)

    # b + c) correctness on the small shape
    t = time.monotonic()
    model = None
    try:
        model = build_model(torch, shape_small, args.seed + 1, dev, args.init)
        path = os.path.join(work, f"mistral-{shape_small}")
        size = save_checkpoint(model, path)
        log(f"checkpoint {path}: {size / 1e9:.2f} GB")
        step_time("checkpoint small", t)
        t = time.monotonic()
        import numpy as np

        rs = np.random.RandomState(args.seed + 11)
        vocab = model.config.vocab_size
        prompts = [rs.randint(3, vocab, size=n).tolist() for n in PROMPT_LENS]
        ref = reference_greedy(torch, model, prompts, GREEDY_STEPS)
        step_time("pytorch reference bf16", t)
        t = time.monotonic()
        ref32 = None
        try:
            model = model.float()
            ref32 = reference_greedy(torch, model, prompts, GREEDY_STEPS)
        except Exception as e:  # noqa: BLE001 -- a diagnostic only
            error("pytorch f32 reference", e)
        del model
        model = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        step_time("pytorch reference f32", t)
        t = time.monotonic()
        inp, outp = os.path.join(work, "batch-in.json"), os.path.join(work, "batch-out.json")
        with open(inp, "w") as f:
            json.dump({"prompts": prompts, "max_new_tokens": GREEDY_STEPS}, f)
        rec = tess.run(["batch", "--model", path, "--input", inp, "--output", outp], 150, "batch (correctness)")
        outputs = None
        if rec.get("error"):
            error("tessera batch", rec["error"])
        else:
            try:
                with open(outp) as f:
                    outputs = json.load(f).get("outputs")
            except (OSError, ValueError) as e:
                error("reading tessera batch output", e)
        res["correctness"] = compare_correctness(torch, ref, ref32, outputs, prompts)
        step_time("tessera batch", t)
    except Exception as e:  # noqa: BLE001
        error("correctness", e)
    finally:
        if model is not None:
            del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # b + d) speed on the big shape
    t = time.monotonic()
    tess_rows, prefill_row, pt, n_matmul = [], None, None, None
    model = None
    need_big = 60 if not dry else 5
    if budget.left() < need_big + 60:
        res["skipped"].append(f"8b speed: only {budget.left():.0f} s left")
    else:
        try:
            model = build_model(torch, shape_big, args.seed + 2, dev, args.init)
            n_matmul = matmul_params(model)
            path = os.path.join(work, f"mistral-{shape_big}")
            size = save_checkpoint(model, path)
            res["big_checkpoint_bytes"] = size
            log(f"checkpoint {path}: {size / 1e9:.2f} GB, {n_matmul / 1e9:.3f} G layer matmul params")
            step_time("checkpoint big", t)
            t = time.monotonic()
            bench = ["bench", "engine", "--model", path, "--runs", "2", "--json"]
            rec = tess.run(bench + ["--batch", ",".join(map(str, bench_batches)), "--prompt-len", str(bench_prompt),
                                    "--gen-len", str(bench_gen)], 200, "bench decode")
            tess_rows = [j for j in json_lines(rec.get("stdout")) if "batch" in j]
            res["tessera_bench"] = {"rows": tess_rows, "error": rec.get("error"), "stderr_tail": rec.get("stderr_tail")}
            if rec.get("error"):
                error("tessera bench (decode)", rec["error"])
            rec = tess.run(bench + ["--batch", "1", "--prompt-len", str(prefill_len), "--gen-len", "1"], 120,
                           "bench prefill")
            rows = [j for j in json_lines(rec.get("stdout")) if "batch" in j]
            prefill_row = rows[0] if rows else None
            res["tessera_bench_prefill"] = {"row": prefill_row, "error": rec.get("error"),
                                            "stderr_tail": rec.get("stderr_tail")}
            if rec.get("error"):
                error("tessera bench (prefill)", rec["error"])
            step_time("tessera bench", t)
            t = time.monotonic()
            pt = pytorch_baselines(torch, model, bench_batches, bench_prompt, bench_gen, prefill_len, args.seed + 3,
                                   budget, 15, log)
            res["pytorch"] = pt
            res["skipped"] += [f"PyTorch {s}" for s in pt["skipped"]]
            step_time("pytorch baselines", t)
        except Exception as e:  # noqa: BLE001
            error("speed", e)
        finally:
            if model is not None:
                del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if prefill_row is not None:
        prefill_row = dict(prefill_row, prompt_len=prefill_row.get("prompt_len", prefill_len))
    res["speed"], res["prefill"] = speed_summary(tess_rows, prefill_row, pt, res.get("ceilings"), n_matmul, None)

    res["acceptance"] = acceptance(res)
    res["seconds"] = budget.elapsed()
    ok = all(a["status"] == "PASS" for a in res["acceptance"]) and not res["errors"]
    res["ok"] = ok
    table = render(res)
    log(table)
    with open(os.path.join(args.out, "check.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    log(f"wrote {os.path.join(args.out, 'check.json')}")
    if dry:
        selftest_render()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def selftest_render():
    """--dry-run also renders a results dict with every part missing or failed, so the reporting
    code is known not to crash on partial results."""
    bad = {"errors": ["x: boom"], "skipped": ["y"], "correctness": [{"prompt_len": 7, "error": "no tessera output",
                                                                     "pass": False}],
           "speed": [{"batch": 1}, {"batch": 128, "ratio_decode": 2.0}], "prefill": {}, "ceilings": None}
    bad["acceptance"] = acceptance(bad)
    text = render(bad)
    assert "FAIL" in text and "MISSING" in text, text
    rows, pre = speed_summary([{"batch": 1, "decode_tok_s": 100.0, "weight_bytes_per_step": 1e9,
                                "kv_bytes_per_step_mean": 1e8}], {"prefill_tok_s": 1000.0, "prompt_len": 2048},
                              {"generate": [{"batch": 1, "decode_tok_s": 50.0, "e2e_tok_s": 40.0}],
                               "prefill": {"tok_s": 500.0}},
                              {"copy_bandwidth_bytes_per_s": 2.2e11, "gemm_bf16_flops_per_s": 1e12}, 1e8, None)
    assert abs(rows[0]["roofline_fraction"] - 0.5) < 1e-9, rows
    assert abs(rows[0]["ratio_decode"] - 2.0) < 1e-9 and abs(pre["tessera_gemm_fraction"] - 0.2) < 1e-9, pre
    assert abs(pre["ratio"] - 2.0) < 1e-9
    log("dry-run: reporting self-test ok")


if __name__ == "__main__":
    sys.exit(main())
