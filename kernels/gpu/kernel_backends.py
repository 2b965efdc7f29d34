"""Where test_kernels.py runs the kernels: on the GPU through CuPy, or on the CPU through the
emulation in emu/emu_cuda.h (g++, fibers, ASan + UBSan). Both take numpy arrays (copied to
"device" buffers), None (a null pointer) and numpy scalars of the kernel's C types (np.int32,
np.uint32, np.int64, np.float32), and compile prelude.cuh + the .cu file as the engine does."""
import atexit
import ctypes
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_DIR = os.path.join(os.path.dirname(HERE), "cuda")
# one kernel per file, looked up right after compiling so that compile errors surface there
KERNEL_OF_FILE = {"embedding.cu": "embedding_gather", "norm.cu": "add_rmsnorm", "rope.cu": "rope_kv_write",
                  "activation.cu": "silu_mul", "attention.cu": "paged_attention",
                  "flash_attention.cu": "flash_attention", "gemv.cu": "gemv_bf16",
                  "sampling.cu": "sample_rows"}


def read_source(fname, cuda_dir=CUDA_DIR):
    with open(os.path.join(cuda_dir, "prelude.cuh")) as f:
        prelude = f.read()
    with open(os.path.join(cuda_dir, fname)) as f:
        return prelude + "\n" + f.read()


class CupyBackend:
    name = "cupy"
    quick = False

    def __init__(self, cuda_dir=CUDA_DIR):
        import cupy

        self.cp = cupy
        self.cuda_dir = cuda_dir
        self.mods = {}

    def describe(self):
        props = self.cp.cuda.runtime.getDeviceProperties(0)
        return f"cupy {self.cp.__version__}, {props['name'].decode()}, cc {props['major']}.{props['minor']}"

    def module(self, fname):
        if fname not in self.mods:
            src = read_source(fname, self.cuda_dir)
            try:
                mod = self.cp.RawModule(code=src, options=("--std=c++17",))
                mod.get_function(KERNEL_OF_FILE[fname])  # compiles now, so errors surface here
            except Exception as first:  # noqa: BLE001 -- retry once with CuPy's default options
                print(f"note: {fname} with --std=c++17 failed ({type(first).__name__}: {first}); retrying with "
                      "CuPy's default options", flush=True)
                mod = self.cp.RawModule(code=src)
                mod.get_function(KERNEL_OF_FILE[fname])
            self.mods[fname] = mod
        return self.mods[fname]

    def to_dev(self, a):
        return self.cp.asarray(a)

    def to_host(self, d):
        return self.cp.asnumpy(d)

    def launch(self, fname, kernel, grid, block, args, sync=True):
        fn = self.module(fname).get_function(kernel)
        conv = []
        for a in args:
            if a is None:
                conv.append(np.uint64(0))
            else:
                conv.append(a)
        fn(tuple(grid), tuple(block), tuple(conv))
        if sync:
            self.cp.cuda.Device().synchronize()

    def time_ms(self, fn, reps=20, warmup=3):
        """Mean milliseconds of fn() (which enqueues GPU work) over reps, after warm-ups."""
        for _ in range(warmup):
            fn()
        start, stop = self.cp.cuda.Event(), self.cp.cuda.Event()
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        return self.cp.cuda.get_elapsed_time(start, stop) / reps


class EmuBackend:
    name = "emu"
    quick = True

    def __init__(self, cuda_dir=CUDA_DIR):
        self.cuda_dir = cuda_dir
        self.dir = tempfile.mkdtemp(prefix="tessera-emu-")
        atexit.register(shutil.rmtree, self.dir, True)
        self.libs = {}
        self.keep = []

    def describe(self):
        return "CPU emulation (g++ + emu/emu_cuda.h, ASan + UBSan)"

    def module(self, fname):
        if fname not in self.libs:
            src = read_source(fname, self.cuda_dir)
            names = re.findall(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(', src)
            src += "\n" + "\n".join(f"EMU_KERNEL({n})" for n in names) + "\n"
            cc = os.path.join(self.dir, fname + ".cc")
            so = os.path.join(self.dir, fname + ".so")
            with open(cc, "w") as f:
                f.write(src)
            cmd = ["g++", "-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-fsanitize=address,undefined",
                   "-fno-sanitize-recover=undefined", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
                   "-Wno-unused-parameter", "-include", os.path.join(HERE, "emu", "emu_cuda.h"), cc, "-o", so]
            subprocess.run(cmd, check=True)
            self.libs[fname] = ctypes.CDLL(so)
        return self.libs[fname]

    def to_dev(self, a):
        return np.ascontiguousarray(a).copy()

    def to_host(self, d):
        return d.copy()

    def launch(self, fname, kernel, grid, block, args):
        fn = getattr(self.module(fname), "emu_launch_" + kernel)
        objs = []
        for a in args:
            if a is None:
                objs.append(ctypes.c_void_p(0))
            elif isinstance(a, np.ndarray):
                objs.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, np.int32):
                objs.append(ctypes.c_int32(int(a)))
            elif isinstance(a, np.uint32):
                objs.append(ctypes.c_uint32(int(a)))
            elif isinstance(a, np.int64):
                objs.append(ctypes.c_int64(int(a)))
            elif isinstance(a, np.float32):
                objs.append(ctypes.c_float(float(a)))
            else:
                raise TypeError(f"unsupported kernel argument {type(a)}")
        ptrs = (ctypes.c_void_p * len(objs))(*[ctypes.cast(ctypes.pointer(o), ctypes.c_void_p) for o in objs])
        g = list(grid) + [1] * (3 - len(grid))
        b = list(block) + [1] * (3 - len(block))
        fn(*[ctypes.c_uint(v) for v in g + b], ptrs)
