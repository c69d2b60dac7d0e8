"""Time the fused dequantize-GEMVs (decode, one row) of SmolLM2-135M's linear shapes on this CPU.

``python bench/quant_gemv_speed.py [-o bench/results/quant_gemv_cpu_smollm2.json]``: for q4f16 and
q8f16, each linear of a decode step compiled alone by the model's pipeline (llvm float32, weights
[in, out] as the CPU build stores them) and timed over repeated calls; GB/s counts the packed
weight and scale bytes. Prints one line per kernel and the sum over a step's linears.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tvm
from tvm.relax.frontend import nn

from tsedge.compile.pipeline import relax_pipeline
from tsedge.compile.targets import parse_target
from tsedge.models.config import PRESETS
from tsedge.models.linear import QuantLinear
from tsedge.models.quantization import SCHEMES, library_arrays, quantize


class _Linear(nn.Module):
    def __init__(self, qs, k: int, n: int):
        self.lin = QuantLinear(qs, k, n, False, "float32", True, None)

    def forward(self, x):
        return self.lin(x)


def time_gemv(quantization: str, k: int, n: int, target, seconds: float = 0.5) -> dict:
    """Seconds per call of the fused GEMV ``x[1, k] @ W[k, n]`` with ``W`` quantized."""
    qs = SCHEMES[quantization]
    spec = {"forward": {"x": nn.spec.Tensor([1, k], "float32"), "$": {"param_mode": "packed", "effect_mode": "none"}}}
    mod, _ = _Linear(qs, k, n).export_tvm(spec=spec)
    vm = tvm.runtime.vm.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)),
                                       tvm.cpu())
    qt = quantize(np.random.default_rng(0).standard_normal((n, k)).astype(np.float32), qs)
    params = [tvm.runtime.tensor(a) for a in library_arrays(qt, True).values()]
    x = tvm.runtime.tensor(np.ones((1, k), np.float32))
    for _ in range(3):
        vm["forward"](x, params)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        vm["forward"](x, params)
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    nbytes = sum(p.numpy().nbytes for p in params)
    return {"quantization": quantization, "k": k, "n": n, "ms": round(per_call * 1e3, 4),
            "gb_per_s": round(nbytes / per_call / 1e9, 2), "gflop_per_s": round(2 * n * k / per_call / 1e9, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    cfg, target = PRESETS["smollm2-135m"], parse_target("llvm")
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"qkv": (h, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, cfg.num_layers),
              "o": (cfg.num_heads * d, h, cfg.num_layers), "gate_up": (h, 2 * f, cfg.num_layers),
              "down": (f, h, cfg.num_layers), "lm_head": (h, cfg.vocab_size, 1)}
    rows = []
    for quantization in ("q4f16", "q8f16"):
        step = 0.0
        for name, (k, n, count) in shapes.items():
            rows.append({"linear": name, **time_gemv(quantization, k, n, target)})
            step += rows[-1]["ms"] * count
            print(f"{quantization} {name:8s} {rows[-1]['ms']:.3f} ms  {rows[-1]['gb_per_s']:5.1f} GB/s  "
                  f"{rows[-1]['gflop_per_s']:5.1f} GFLOP/s")
        print(f"{quantization} all linears of a decode step: {step:.1f} ms")
    if args.output:
        Path(args.output).write_text(json.dumps({"model": cfg.name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
