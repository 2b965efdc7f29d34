"""Comparison and reporting of the device check: correctness rows, speed rows against the
ceilings and PyTorch, the acceptance list, the table. Pure Python (torch only for norms), so
`check.py --dry-run` exercises all of it without a GPU."""
import math

GIB = 1 << 30
TARGETS = {
    "logits_rel_err_max": 2e-2,
    "near_tie_gap": 1e-2,
    "decode_roofline_fraction_min": 0.75,
    "batch128_vs_pytorch_min": 5.0,
    "prefill_gemm_fraction_min": 0.5,
}
PROMPT_LENS = (7, 33, 100, 257)


def fmt(v, spec=".3g", none="-"):
    if v is None:
        return none
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


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
            # serde_json writes a non-finite float as null
            tl = torch.tensor([float("nan") if v is None else v for v in fl], dtype=torch.float32)
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


def median_of(v):
    """`tessera bench --json` reports a rate as {"median", "min", "max"} over its runs; the median."""
    return v.get("median") if isinstance(v, dict) else v


def speed_summary(tess_rows, prefill_row, pt, ceilings, n_matmul, weight_bytes_hint):
    """Speed rows: tessera vs PyTorch and vs the ceilings."""
    bw = (ceilings or {}).get("copy_bandwidth_bytes_per_s")
    peak = (ceilings or {}).get("gemm_bf16_flops_per_s")
    pt_gen = {r["batch"]: r for r in (pt or {}).get("generate", [])}
    rows = []
    for r in tess_rows:
        b = r.get("batch")
        row = {"batch": b, "tessera_decode_tok_s": median_of(r.get("decode_tok_s")),
               "tessera_decode_spread": r.get("decode_tok_s"), "tessera_prefill_tok_s": median_of(r.get("prefill_tok_s")),
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
           "tessera_prefill_tok_s": median_of((prefill_row or {}).get("prefill_tok_s")),
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
    sampling = res.get("device_sampling") or {}
    add("1b sampling on the device (top-k/top-p)", sampling.get("summary"), "all true", sampling.get("ok"))
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
    bench = [b for b in (res.get("attention_bench") or []) if "us" in b]
    if bench:
        L.append("  attention kernels alone (test_kernels.py --bench; 8b heads 32/8, head_dim 128, block 16):")
        for b in bench:
            L.append(f"    {b['case']:34} {b.get('kernel', 'paged'):5} parts {b['n_parts']:>3} "
                     f"(partition {b['partition']:>4}): {b['us']:9.1f} us, KV {b['kv_gb_s']:7.1f} GB/s, "
                     f"{fmt(b.get('tflops'), '.1f'):>6} TFLOP/s")
    gemv = [b for b in (res.get("attention_bench") or []) if "gemv_us" in b]
    if gemv:
        L.append("  gemv_bf16 vs cuBLAS (torch.matmul), weight-read bandwidth:")
        for b in gemv:
            L.append(f"    {b['case']:16} gemv {b['gemv_us']:8.1f} us ({b['gemv_gb_s']:7.1f} GB/s)   "
                     f"cuBLAS {b['cublas_us']:8.1f} us ({b['cublas_gb_s']:7.1f} GB/s)")
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


def selftest_render():
    """--dry-run also renders a results dict with every part missing or failed, so the reporting
    code is known not to crash on partial results."""
    bad = {"errors": ["x: boom"], "skipped": ["y"], "correctness": [{"prompt_len": 7, "error": "no tessera output",
                                                                     "pass": False}],
           "speed": [{"batch": 1}, {"batch": 128, "ratio_decode": 2.0}], "prefill": {}, "ceilings": None}
    bad["acceptance"] = acceptance(bad)
    text = render(bad)
    assert "FAIL" in text and "MISSING" in text, text
    # rates as `tessera bench engine --json` prints them: {"median", "min", "max"} over the runs
    spread = lambda v: {"median": v, "min": v * 0.9, "max": v * 1.1}  # noqa: E731
    rows, pre = speed_summary([{"batch": 1, "decode_tok_s": spread(100.0), "weight_bytes_per_step": 1e9,
                                "kv_bytes_per_step_mean": 1e8}], {"prefill_tok_s": spread(1000.0), "prompt_len": 2048},
                              {"generate": [{"batch": 1, "decode_tok_s": 50.0, "e2e_tok_s": 40.0}],
                               "prefill": {"tok_s": 500.0}},
                              {"copy_bandwidth_bytes_per_s": 2.2e11, "gemm_bf16_flops_per_s": 1e12}, 1e8, None)
    assert abs(rows[0]["roofline_fraction"] - 0.5) < 1e-9, rows
    assert abs(rows[0]["ratio_decode"] - 2.0) < 1e-9 and abs(pre["tessera_gemm_fraction"] - 0.2) < 1e-9, pre
    assert abs(pre["ratio"] - 2.0) < 1e-9
    print("dry-run: reporting self-test ok", flush=True)
