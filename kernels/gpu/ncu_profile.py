#!/usr/bin/env python3
"""Per-kernel GPU time of tessera's decode steps, measured with Nsight Compute (ncu) on a GPU
machine: runs `tessera bench engine` at batch 1 under ncu (clocks left alone, one metric:
gpu__time_duration), skips the warm-up and prefill launches, and prints each kernel's share of
the profiled launches. Informative only (never pass/fail); ncu serialises kernels, so the sum
is the GPU busy time without the launch gaps, which show up as the difference to the step time
that `bench engine` reports.

    python3 kernels/gpu/ncu_profile.py --bin .gpu-bin/tessera --model DIR [--batch 1] [tessera options...]
"""
import argparse
import collections
import csv
import glob
import io
import os
import shutil
import subprocess
import sys


def find_ncu():
    for c in [shutil.which("ncu")] + sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True) + \
            sorted(glob.glob("/usr/local/cuda*/bin/ncu"), reverse=True):
        if c and os.access(c, os.X_OK):
            return c
    return None


def short_name(name):
    return name.split("(")[0].split("<")[0].strip() or name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--skip", type=int, default=3000, help="launches to skip (warm-up, prefill)")
    ap.add_argument("--count", type=int, default=800, help="launches to profile (about two decode steps)")
    ap.add_argument("--log", default=None, help="where ncu's raw CSV goes")
    args, rest = ap.parse_known_args()
    ncu = find_ncu()
    if not ncu:
        print("profile: ncu not found")
        return 1
    raw = args.log or "/tmp/ncu-raw.csv"
    cmd = [ncu, "--clock-control", "none", "--graph-profiling", "node", "--launch-skip", str(args.skip),
           "--launch-count", str(args.count), "--metrics", "gpu__time_duration.sum", "--csv", "--log-file", raw,
           args.bin, "bench", "engine", "--model", args.model, "--batch", str(args.batch), "--prompt-len",
           str(args.prompt_len), "--gen-len", "64", "--runs", "1"] + rest
    print("$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    print(p.stdout[-3000:], p.stderr[-3000:], sep="\n", flush=True)
    try:
        with open(raw) as f:
            text = f.read()
    except OSError as e:
        print(f"profile: no ncu output ({e})")
        return 1
    start = text.find('"ID"')
    rows = list(csv.DictReader(io.StringIO(text[start:]))) if start >= 0 else []
    per = collections.defaultdict(lambda: [0, 0.0])
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = r.get("Metric Unit", "")
        v = float(str(r.get("Metric Value", "0")).replace(",", ""))
        us = v / 1e3 if unit == "nsecond" else v * 1e3 if unit == "msecond" else v if unit == "usecond" else v / 1e3
        k = short_name(r.get("Kernel Name", "?"))
        per[k][0] += 1
        per[k][1] += us
    total = sum(v[1] for v in per.values())
    n = sum(v[0] for v in per.values())
    print(f"profile: {n} launches, {total:.1f} us of GPU time (batch {args.batch})")
    print(f"{'kernel':60} {'launches':>8} {'total us':>10} {'mean us':>9} {'share':>6}")
    for k, (c, us) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print(f"{k[:60]:60} {c:8d} {us:10.1f} {us / c:9.2f} {us / total if total else 0:6.1%}")
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
