#!/usr/bin/env python3
"""Tessera's device check: correctness against PyTorch and speed against this GPU's own measured
ceilings, in one run, on random-weight MistralForCausalLM checkpoints. Run by check.sh.

Steps (each one's failure is recorded and the rest still run; a time budget skips what no
longer fits and says so):
  a) ceilings: device-to-device copy bandwidth (4 GiB, best of 10, bytes read + written) and the
     bf16 GEMM peak (torch.matmul 8192^3, mean of 10 after 3 warm-ups);
  -) `tessera check kernels` and `tessera check nccl` (the binary's own device self-checks);
  b) checkpoints: a "1b" shape (correctness) and an "8b" shape (speed), random weights (see
     build_model: --init stable, the default, or hf = normal(0, 0.02) throughout), norms
     1 + noise, bf16 safetensors via save_pretrained, plus a byte-level tokenizer.json
     (tessera's loader wants one; the check itself passes token ids);
  c) correctness on 1b: first-step logits and 32 greedy tokens for 4 random prompts, tessera
     (`tessera batch`) vs a PyTorch bf16 (SDPA) loop with a KV cache; agreement must hold up to
     the first step whose PyTorch top-2 logit gap is below 1e-2. An f32 PyTorch run of the same
     weights is reported alongside, for context;
  d) speed on 8b: `tessera bench engine --json --runs 5` (medians) at batch 1/32/128 (prompt
     128, 128 new tokens) and a 2048-token prefill, against transformers `generate` (SDPA,
     greedy, KV cache) and a 2048-token PyTorch forward, and against the ceilings of (a);
  e) one table on stdout, everything as JSON in --out.

    python3 kernels/gpu/check.py --bin .gpu-bin/tessera --out gpu-out [--cuda-lib-dir DIR]...
    python3 kernels/gpu/check.py --dry-run [--bin target/debug/tessera]   # tiny shapes, CPU

Exit status: 0 when every acceptance criterion passed and no step failed, 1 otherwise (a
skipped step leaves its criterion MISSING, which counts as not passed). On SIGTERM (the outer
`timeout`) it kills tessera, prints the table of what it has and writes check.json.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from check_models import (INITS, build_model, matmul_params, measure_ceilings, pytorch_baselines,
                          reference_greedy, save_checkpoint)
from check_report import (GIB, PROMPT_LENS, TARGETS, acceptance, compare_correctness, fmt, render,
                          selftest_render, speed_summary)

CHILDREN = []  # tessera processes running now (killed if this script is terminated)
GREEDY_STEPS = 32


def log(msg):
    print(msg, flush=True)


class Budget:
    """Wall-clock budget for the whole script; steps ask before they start."""

    def __init__(self, seconds):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + seconds

    def elapsed(self):
        return time.monotonic() - self.t0

    def left(self):
        return self.deadline - time.monotonic()


class Tessera:
    def __init__(self, binary, device, lib_dirs, cache_dir, budget):
        self.binary, self.device, self.lib_dirs, self.cache_dir, self.budget = binary, device, lib_dirs, cache_dir, budget

    def run(self, args, limit_s, label, reserve_s=0.0):
        """Runs `tessera ARGS --device D [--cuda-lib-dir ...]` for at most limit_s, leaving
        reserve_s of the budget to later steps where it can; returns a record (never raises)."""
        cmd = [self.binary] + args + ["--device", self.device, "--cache-dir", self.cache_dir]
        for d in self.lib_dirs:
            cmd += ["--cuda-lib-dir", d]
        left = self.budget.left() - 5
        limit = max(min(30.0, left), min(limit_s, left - reserve_s), 5.0)
        rec = {"label": label, "cmd": " ".join(cmd), "limit_s": round(limit, 1)}
        log(f"$ {rec['cmd']}   (limit {limit:.0f} s)")
        t = time.monotonic()
        try:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        except OSError as e:
            rec.update(rc=None, stdout="", stderr_tail="", error=f"could not start: {e}")
            p = None
        if p is not None:
            CHILDREN.append(p)
            try:
                out, err = p.communicate(timeout=limit)
                rec.update(rc=p.returncode, stdout=out, stderr_tail=err[-4000:])
                if p.returncode != 0:
                    rec["error"] = f"exit {p.returncode}: {err.strip()[-1500:]}"
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                rec.update(rc=None, stdout=out, stderr_tail=err[-4000:], error=f"timed out after {limit:.0f} s")
            finally:
                CHILDREN.remove(p)
        rec["seconds"] = round(time.monotonic() - t, 1)
        if rec.get("error"):
            log(f"  -> {label} failed: {rec['error'][:800]}")
        else:
            log(f"  -> {label} ok in {rec['seconds']} s")
        return rec


SAMPLING = {"temperature": 0.8, "top_k": 20, "top_p": 0.9}


def check_device_sampling(tess, work, path, prompts, greedy_outputs):
    """Sampling on the device, end to end (`tessera batch` with a sampling block: no row needs its
    logits on the host, so the engine picks every token through the GPU's sample_rows): the same
    seed twice gives the same tokens, each first token is among the top_k of the prompt's logits,
    and the samples are not simply the greedy tokens."""
    runs = []
    for name, seed in (("a", 5), ("b", 5)):
        inp, outp = os.path.join(work, f"sample-{name}-in.json"), os.path.join(work, f"sample-{name}-out.json")
        with open(inp, "w") as f:
            json.dump({"prompts": prompts, "max_new_tokens": GREEDY_STEPS, "sampling": dict(SAMPLING, seed=seed)}, f)
        rec = tess.run(["batch", "--model", path, "--input", inp, "--output", outp], 120, f"batch (sampling {name})")
        if rec.get("error"):
            return {"ok": False, "summary": f"batch failed: {rec['error']}"[:120]}
        with open(outp) as f:
            runs.append(json.load(f).get("outputs") or [])
    a, b = ([o.get("tokens") for o in run] for run in runs)
    same_seed = a == b
    in_top_k = all(
        toks and toks[0] in sorted(range(len(o["first_logits"])), key=lambda j: -o["first_logits"][j])[: SAMPLING["top_k"]]
        for toks, o in zip(a, runs[0]))
    greedy = [o.get("tokens") for o in (greedy_outputs or [])]
    not_greedy = a != greedy
    ok = same_seed and in_top_k and not_greedy
    summary = (f"same seed, same tokens: {same_seed}; first tokens in top-{SAMPLING['top_k']}: {in_top_k}; "
               f"not the greedy tokens: {not_greedy}")
    return {"ok": ok, "summary": summary, "sampling": SAMPLING, "tokens": a}


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

    def on_sigterm(signum, frame):  # the outer `timeout`: report what there is, then go
        for child in list(CHILDREN):
            child.kill()
        res["errors"].append("terminated (SIGTERM from the outer timeout) before finishing")
        try:
            finalize(res, args.out, budget)
        finally:
            os._exit(1)

    signal.signal(signal.SIGTERM, on_sigterm)
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
            res["attention_bench"] = tk.get("bench")
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
            name, driver, mem = [s.strip() for s in q.stdout.strip().splitlines()[-1].split(",")]
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

    # b + c) correctness on the small shape. cuBLAS may reduce bf16 GEMM partial sums in bf16
    # by PyTorch's default; the reference should not, so that is off for this part only.
    t = time.monotonic()
    model = None
    reduced = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    res["reference_settings"] = {"allow_bf16_reduced_precision_reduction": False, "attn": "sdpa",
                                 "f32_matmul_precision": torch.get_float32_matmul_precision()}
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
        t = time.monotonic()
        res["device_sampling"] = check_device_sampling(tess, work, path, prompts, outputs)
        log(f"device sampling: {res['device_sampling']['summary']}")
        step_time("tessera batch (device sampling)", t)
    except Exception as e:  # noqa: BLE001
        error("correctness", e)
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced
        if model is not None:
            del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # b + d) speed on the big shape
    t = time.monotonic()
    res["prefill_len"] = prefill_len
    model = None
    need_big = 60 if not dry else 5
    if budget.left() < need_big + 60:
        res["skipped"].append(f"8b speed: only {budget.left():.0f} s left")
    else:
        try:
            model = build_model(torch, shape_big, args.seed + 2, dev, args.init)
            n_matmul = matmul_params(model)
            res["n_matmul"] = n_matmul
            path = os.path.join(work, f"mistral-{shape_big}")
            size = save_checkpoint(model, path)
            res["big_checkpoint_bytes"] = size
            log(f"checkpoint {path}: {size / 1e9:.2f} GB, {n_matmul / 1e9:.3f} G layer matmul params")
            step_time("checkpoint big", t)
            if dev.type == "cuda":
                torch.cuda.empty_cache()  # the model stays for the baselines; its temporaries go
            t = time.monotonic()
            bench = ["bench", "engine", "--model", path, "--runs", "5", "--json"]
            rec = tess.run(bench + ["--batch", ",".join(map(str, bench_batches)), "--prompt-len", str(bench_prompt),
                                    "--gen-len", str(bench_gen)], 200, "bench decode", reserve_s=100)
            rows = [j for j in json_lines(rec.get("stdout")) if "batch" in j]
            for j in rows:  # in the log too, so a later failure cannot lose them
                log(f"  bench row: {json.dumps(j)}")
            res["tessera_bench"] = {"rows": rows, "error": rec.get("error"), "stderr_tail": rec.get("stderr_tail")}
            if rec.get("error"):
                error("tessera bench (decode)", rec["error"])
            rec = tess.run(bench + ["--batch", "1", "--prompt-len", str(prefill_len), "--gen-len", "1"], 120,
                           "bench prefill", reserve_s=70)
            rows = [j for j in json_lines(rec.get("stdout")) if "batch" in j]
            for j in rows:
                log(f"  bench row: {json.dumps(j)}")
            prefill_row = rows[0] if rows else None
            res["tessera_bench_prefill"] = {"row": prefill_row, "error": rec.get("error"),
                                            "stderr_tail": rec.get("stderr_tail")}
            if rec.get("error"):
                error("tessera bench (prefill)", rec["error"])
            step_time("tessera bench", t)
            t = time.monotonic()
            res["pytorch"] = {"generate": [], "prefill": None, "skipped": []}
            pytorch_baselines(torch, model, bench_batches, bench_prompt, bench_gen, prefill_len, args.seed + 3,
                              budget, 15, log, res["pytorch"])
            res["skipped"] += [f"PyTorch {s}" for s in res["pytorch"]["skipped"]]
            step_time("pytorch baselines", t)
        except Exception as e:  # noqa: BLE001
            error("speed", e)
        finally:
            if model is not None:
                del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ok = finalize(res, args.out, budget)
    if dry:
        selftest_render()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def finalize(res, out_dir, budget):
    """Speed summary, acceptance, table on stdout, check.json; returns whether all passed."""
    rows = (res.get("tessera_bench") or {}).get("rows") or []
    prow = (res.get("tessera_bench_prefill") or {}).get("row")
    if prow is not None:
        prow = dict(prow, prompt_len=prow.get("prompt_len", res.get("prefill_len")))
    res["speed"], res["prefill"] = speed_summary(rows, prow, res.get("pytorch"), res.get("ceilings"),
                                                 res.get("n_matmul"), None)
    res["acceptance"] = acceptance(res)
    res["seconds"] = budget.elapsed()
    res["ok"] = all(a["status"] == "PASS" for a in res["acceptance"]) and not res["errors"]
    log(render(res))
    path = os.path.join(out_dir, "check.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)
    log(f"wrote {path}")
    return res["ok"]


if __name__ == "__main__":
    sys.exit(main())
