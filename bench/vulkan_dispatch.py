"""Dispatch cost of the vulkan target: SmolLM2-135M dense decode through tsedge.vulkan.

Usage: python bench/vulkan_dispatch.py [--steps 16] [--context 128] [--out FILE.json]

Runs twice in subprocesses: plain (decode ms/step and dispatches per step) and with
TSEDGE_VULKAN_PROFILE=1 (each dispatch submitted and waited for alone: per-kernel ms, which
includes one submit + wait each). Also times the backend's host-side recording of a dispatch
(a tiny kernel recorded 2000 times without waiting).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _run(lib: str, steps: int, context: int) -> dict:
    import numpy as np

    from tsedge import vulkan
    from tsedge.engine import Engine

    engine = Engine(lib, "smollm2-135m")
    prompt = list(np.random.default_rng(0).integers(1000, 20000, context))
    engine.prefill(prompt)
    before = vulkan.dispatch_counts()
    start = time.perf_counter()
    for _ in range(steps):
        engine.decode(int(prompt[-1]))
    elapsed = time.perf_counter() - start
    after = vulkan.dispatch_counts()
    kernels = {k: (after[k][0] - before.get(k, (0, 0))[0], after[k][1] - before.get(k, (0, 0))[1]) for k in after}
    return {"adapter": vulkan.describe(), "ms_per_step": 1e3 * elapsed / steps,
            "dispatches_per_step": sum(c for c, _ in kernels.values()) / steps,
            "kernels": {k: {"per_step": c / steps, "ms_per_dispatch": 1e3 * s / c if c else 0.0}
                        for k, (c, s) in sorted(kernels.items(), key=lambda kv: -kv[1][1]) if c}}


def _record_cost() -> float:
    """Microseconds the backend spends recording one dispatch (no waiting)."""
    import numpy as np
    import tvm
    from tvm.script import tirx as T

    from tsedge import vulkan
    from tsedge.compile.targets import parse_target

    @T.prim_func
    def tiny(a: T.handle):
        T.func_attr({"global_symbol": "tiny", "tirx.noalias": True})
        A = T.match_buffer(a, (64,), "float32")
        for i in T.thread_binding(64, thread="threadIdx.x"):
            A[i] = A[i] + T.float32(1)

    dev = vulkan.device()
    with tempfile.TemporaryDirectory() as tmp:
        tvm.compile(tvm.IRModule({"tiny": tiny}), target=parse_target("vulkan")).export_library(f"{tmp}/t.so")
        f = tvm.runtime.load_module(f"{tmp}/t.so")["tiny"]
    a = tvm.runtime.tensor(np.zeros(64, np.float32), dev)
    f(a)
    dev.sync()
    start = time.perf_counter()
    for _ in range(2000):
        f(a)
    host = time.perf_counter() - start
    dev.sync()
    return 1e6 * host / 2000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_run(args.child, args.steps, args.context)))
        return
    from tsedge.compile.build import compile_library
    from tsedge.compile.targets import parse_target
    from tsedge.models.config import PRESETS, PolicyConfig

    with tempfile.TemporaryDirectory() as tmp:
        lib = f"{tmp}/smol-dense-vulkan.so"
        compile_library(PRESETS["smollm2-135m"], PolicyConfig(), parse_target("vulkan"), "float16", 1024,
                        __import__("pathlib").Path(lib))
        runs = {}
        for name, env in (("plain", {}), ("profiled", {"TSEDGE_VULKAN_PROFILE": "1"})):
            out = subprocess.run([sys.executable, __file__, "--child", lib, "--steps", str(args.steps),
                                  "--context", str(args.context)], env={**os.environ, **env},
                                 capture_output=True, text=True, check=True).stdout
            runs[name] = json.loads(out.strip().splitlines()[-1])
    result = {"model": "smollm2-135m", "policy": "dense", "dtype": "float16", "context": args.context,
              "decode_ms_per_step": round(runs["plain"]["ms_per_step"], 2),
              "dispatches_per_step": runs["plain"]["dispatches_per_step"],
              "host_record_us_per_dispatch": round(_record_cost(), 2),
              "adapter": runs["plain"]["adapter"],
              "profiled_ms_per_step": round(runs["profiled"]["ms_per_step"], 2),
              "kernels": runs["profiled"]["kernels"]}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
