#!/usr/bin/env python3
"""Compiles every kernels/cuda/*.cu file (with prelude.cuh prepended, as the engine does) with
NVRTC through ctypes, for a given virtual architecture. Needs no GPU: only libnvrtc.

Checks, per file: the compile succeeds, the log has no warning (unless --allow-warnings), and
the PTX holds each expected `extern "C"` entry point with the parameter list the Rust launcher
passes (KERNELS below: pointer = .u64, int/unsigned = .u32, float = .f32, long long = .u64).

    python3 kernels/gpu/compile_check.py [--arch compute_90] [--nvrtc /path/libnvrtc.so.13]
    exit 0: all clean; 1: a compile failed or a signature drifted.
"""
import argparse
import ctypes
import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_DIR = os.path.join(os.path.dirname(HERE), "cuda")

P, I, F, L = "ptr", "int", "float", "i64"  # parameter kinds
# kernel -> (file, parameter kinds). Keep in step with the Rust launcher.
KERNELS = {
    "embedding_gather": ("embedding.cu", [P, P, P, I, I]),
    "add_rmsnorm": ("norm.cu", [P, P, P, P, I, I, F]),
    "gather_rows": ("norm.cu", [P, P, P, I, I]),
    "rope_kv_write": ("rope.cu", [P, P, P, P, P, P, P, I, I, I, I, I]),
    "silu_mul": ("activation.cu", [P, P, I, I]),
    "paged_attention": ("attention.cu", [P, I, P, P, P, I, P, P, P, P, P, P, P, P, P, I, I, I, I, I, I, I, F]),
    "flash_attention": ("flash_attention.cu", [P, I, P, P, P, I, P, P, P, P, P, I, I, I, I, I, F]),
    "gemv_bf16": ("gemv.cu", [P, P, P, I, I, I]),
    "sample_rows": ("sampling.cu", [P, I, P, P]),
    "bf16_rows_to_f32": ("sampling.cu", [P, P, L]),
}
PTX_TYPE = {P: ".u64", I: ".u32", F: ".f32", L: ".u64"}


def find_nvrtc(explicit):
    """Path of libnvrtc: --nvrtc, $NVRTC_LIB, pip nvidia wheels of this interpreter, then the system."""
    cands = [explicit, os.environ.get("NVRTC_LIB")]
    try:
        import nvidia  # namespace package of the pip CUDA wheels

        for root in list(nvidia.__path__):
            cands += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")), reverse=True)
    except ImportError:
        pass
    cands += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"), reverse=True)
    cands += ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    for c in cands:
        if not c or "builtins" in os.path.basename(c):
            continue
        try:
            return ctypes.CDLL(c), c
        except OSError:
            continue
    sys.exit("compile_check: libnvrtc not found (pass --nvrtc PATH)")


class Nvrtc:
    def __init__(self, lib):
        self.lib = lib
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what}: {self.lib.nvrtcGetErrorString(rc).decode()}")

    def version(self):
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return f"{major.value}.{minor.value}"

    def compile(self, source, name, options):
        """Returns (ok, log, ptx)."""
        prog = ctypes.c_void_p()
        self.check(
            self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
            "nvrtcCreateProgram",
        )
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            rc = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self.check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
            buf = ctypes.create_string_buffer(size.value)
            self.check(self.lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
            log = buf.value.decode(errors="replace").strip()
            if rc != 0:
                return False, log, ""
            self.check(self.lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
            buf = ctypes.create_string_buffer(size.value)
            self.check(self.lib.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
            return True, log, buf.value.decode()
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def ptx_entries(ptx):
    """{entry name: [ptx param types]} from `.visible .entry name( .param .u64 x, ... )`."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\(([^)]*)\)", ptx):
        out[m.group(1)] = re.findall(r"\.param\s+(\.\w+)", m.group(2))
    return out


def source_of(path):
    with open(os.path.join(CUDA_DIR, "prelude.cuh")) as f:
        prelude = f.read()
    with open(path) as f:
        return prelude + "\n" + f.read()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="compute_90")
    ap.add_argument("--nvrtc", default=None)
    ap.add_argument("--allow-warnings", action="store_true")
    ap.add_argument("--ptx-dir", default=None, help="also write each file's PTX here")
    args = ap.parse_args()

    lib, path = find_nvrtc(args.nvrtc)
    nv = Nvrtc(lib)
    print(f"nvrtc {nv.version()} ({path}), arch {args.arch}")
    options = [f"--gpu-architecture={args.arch}", "--std=c++17", "-lineinfo"]
    failed = False
    seen = {}
    for cu in sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu"))):
        name = os.path.basename(cu)
        ok, log, ptx = nv.compile(source_of(cu), name, options)
        warn = bool(re.search(r"warning", log, re.I))
        status = "ok" if ok and not warn else ("WARN" if ok else "FAIL")
        print(f"{status:4}  {name}  ({len(ptx)} bytes of PTX)")
        if log:
            print("      " + log.replace("\n", "\n      "))
        if not ok or (warn and not args.allow_warnings):
            failed = True
        if ok and args.ptx_dir:
            os.makedirs(args.ptx_dir, exist_ok=True)
            with open(os.path.join(args.ptx_dir, name.replace(".cu", ".ptx")), "w") as f:
                f.write(ptx)
        for entry, params in ptx_entries(ptx).items():
            seen[entry] = (name, params)

    for kernel, (fname, kinds) in KERNELS.items():
        want = [PTX_TYPE[k] for k in kinds]
        got = seen.get(kernel)
        if got is None:
            print(f"FAIL  {kernel}: no entry point (expected in {fname})")
            failed = True
        elif got[0] != fname or got[1] != want:
            print(f"FAIL  {kernel}: in {got[0]} with params {got[1]}, expected {fname} {want}")
            failed = True
        else:
            print(f"ok    {kernel}({len(want)} params)")
    extra = sorted(set(seen) - set(KERNELS))
    if extra:
        print(f"note  entry points not in the signature table: {extra}")
    print("compile_check:", "FAILED" if failed else "all clean")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
