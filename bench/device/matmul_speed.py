"""Prefill matmul speed on the GPU: our compiled schedules vs torch.matmul (run on the device).

For each library ``LIB_DIR/<schedule>-<N>x<K>.so`` (``build_matmul.py``): checks
``y[n, N] = x[n, K] @ W[N, K]^T`` (float16 in and out) against a float32 torch reference at
n = 1, 17, 333, 512, then times n = 512 with CUDA events (5 warm-up calls, mean of 30) next to
torch.matmul on the same float16 tensors. Prints a table (TFLOP/s = 2 n N K / time) last and
writes OUT_DIR/matmul_speed.json.
Usage (after ``source bench/device/setup.sh``): python3 bench/device/matmul_speed.py LIB_DIR OUT_DIR
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

import torch
import tvm
import tvm_ffi

SHAPES = {"qkv fused": (6144, 4096), "o": (4096, 4096), "gate_up fused": (28672, 4096),
          "down": (4096, 14336)}  # the Llama-3-8B prefill linears (keep build_matmul.py and matmul_speed.py in step)
N_TOKENS = 512
CHECK_TOKENS = (1, 17, 333, 512)
WARMUP, REPEAT = 5, 30


def time_ms(fn) -> float:
    """Mean milliseconds per call of ``fn`` over REPEAT calls after WARMUP, by CUDA events."""
    for _ in range(WARMUP):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPEAT):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / REPEAT


def check(func, w: torch.Tensor) -> float:
    """Largest |y - ref| / max|ref| over CHECK_TOKENS row counts (random x, float32 reference)."""
    worst = 0.0
    for n in CHECK_TOKENS:
        x = torch.randn(n, w.shape[1], device="cuda", dtype=torch.float16)
        y = torch.full((n, w.shape[0]), float("nan"), device="cuda", dtype=torch.float16)
        func(tvm_ffi.from_dlpack(x), tvm_ffi.from_dlpack(w), tvm_ffi.from_dlpack(y))
        ref = x.float() @ w.float().T
        worst = max(worst, ((y.float() - ref).abs().max() / ref.abs().max()).item())
    return worst


def main(lib_dir: Path, out: Path) -> None:
    ctypes.CDLL(str(Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"), ctypes.RTLD_GLOBAL)
    torch.manual_seed(0)
    rows = []
    for name, (n_out, n_in) in SHAPES.items():
        w = torch.randn(n_out, n_in, device="cuda", dtype=torch.float16) / n_in ** 0.5
        x = torch.randn(N_TOKENS, n_in, device="cuda", dtype=torch.float16)
        y = torch.empty(N_TOKENS, n_out, device="cuda", dtype=torch.float16)
        flop = 2 * N_TOKENS * n_out * n_in
        row = {"shape": name, "N": n_out, "K": n_in, "n": N_TOKENS,
               "torch_ms": time_ms(lambda: torch.matmul(x, w.T, out=y))}
        for lib in sorted(lib_dir.glob(f"*-{n_out}x{n_in}.so")):
            schedule = lib.name.split("-")[0]
            func = tvm.runtime.load_module(str(lib))["main"]
            row[f"{schedule}_max_rel_err"] = check(func, w)
            args = [tvm_ffi.from_dlpack(t) for t in (x, w, y)]
            row[f"{schedule}_ms"] = time_ms(lambda: func(*args))
        for key in [k for k in row if k.endswith("_ms")]:
            row[key.replace("_ms", "_tflops")] = flop / row[key] / 1e9
        rows.append(row)
        print(json.dumps(row), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "rows": rows}
    (out / "matmul_speed.json").write_text(json.dumps(result, indent=1))
    schedules = sorted({k[:-3] for r in rows for k in r if k.endswith("_ms")})
    print(f"{'shape':10}{'N x K':>14}" + "".join(f"{s + ' TF/s':>13}{'err':>9}" for s in schedules))
    for r in rows:
        cells = "".join(f"{r.get(s + '_tflops', float('nan')):13.1f}{r.get(s + '_max_rel_err', 0):9.1e}"
                        for s in schedules)
        print(f"{r['shape']:10}{r['N']:>8}x{r['K']:<5}" + cells)


if __name__ == "__main__":
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
