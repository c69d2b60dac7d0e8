"""Build the prefill-matmul CUDA libraries that ``matmul_speed.py`` times (run here, not on the GPU).

For each Llama-3-8B linear (N x K) and each schedule, ``y[n, N] = x[n, K] @ W[N, K]^T`` (float16,
float32 accumulation, dynamic n) goes through the model's own steps (``fp32_accumulate``,
``FuseTransposeMatmul``, legalization) and one schedule rule, then into
``OUT/<schedule>-<N>x<K>.so`` with an embedded sm_90 fatbin.
Schedules: ``mma`` (``tir_kernels/matmul.py``: ``mma.sync``, sm_80+), ``wgmma*``
(``tir_kernels/matmul_wgmma.py``: Hopper's warpgroup MMA, an sm_90a fatbin), ``wmma``
(dlight's tensor-core rule: what the pipeline used before both).
Usage: python3 bench/device/build_matmul.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import tvm
from tvm import relax
from tvm.relax.backend.cuda import pipeline as cuda_passes
from tvm.s_tir import dlight as dl

from tsedge.compile.cuda_fatbin import fatbin_build_context
from tsedge.compile.pipeline import fp32_accumulate
from tsedge.compile.targets import cuda_target
from tsedge.tir_kernels.matmul import Tiles, make_mma_matmul
from tsedge.tir_kernels.matmul_wgmma import WgmmaTiles, make_prefill_matmul_wgmma

SHAPES = {"qkv fused": (6144, 4096), "o": (4096, 4096), "gate_up fused": (28672, 4096),
          "down": (4096, 14336)}  # the Llama-3-8B prefill linears (keep build_matmul.py and matmul_speed.py in step)
RULES = {"wmma": dl.gpu.Matmul()}
MMA_VARIANTS = {"mma": Tiles()}  # ours: tile shapes (4 stages, 64x64 warp tiles, 32-wide k-steps measured no better)
WGMMA_VARIANTS = {"wgmma": WgmmaTiles(), "wgmma5st": WgmmaTiles(stages=5), "wgmman256": WgmmaTiles(bn=256),
                  "wgmman256st3": WgmmaTiles(bn=256, stages=3)}


def linear_module(n_out: int, n_in: int) -> tvm.IRModule:
    """Relax ``main(x[n, n_in], w[n_out, n_in]) -> x @ w^T`` in float16, n dynamic."""
    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, n_in], "float16"))
    w = relax.Var("w", relax.TensorType([n_out, n_in], "float16"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(x, relax.op.permute_dims(w))))
        bb.emit_func_output(out)
    return bb.get()


def matmul_primfunc(n_out: int, n_in: int, target) -> tvm.tirx.PrimFunc:
    """The fused, legalized matmul PrimFunc the model pipeline would schedule."""
    with target:
        mod = tvm.transform.Sequential([fp32_accumulate, relax.transform.FuseTransposeMatmul()]
                                       + cuda_passes.legalize_passes(target)[:-1])(linear_module(n_out, n_in))
    return next(f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc))


def main(out: Path) -> None:
    target, hopper = cuda_target("sm_90"), cuda_target("sm_90a")
    out.mkdir(parents=True, exist_ok=True)
    for name, (n_out, n_in) in SHAPES.items():
        func = matmul_primfunc(n_out, n_in, target)
        modules = {name: (tvm.IRModule({"main": make_mma_matmul(n_out, n_in, "float16", target, tiles)}), target)
                   for name, tiles in MMA_VARIANTS.items()}
        modules.update({name: (tvm.IRModule({"main": make_prefill_matmul_wgmma(n_out, n_in, "float16", hopper, tiles)}),
                               hopper) for name, tiles in WGMMA_VARIANTS.items()})
        for rule_name, rule in RULES.items():
            with target:
                modules[rule_name] = (dl.ApplyDefaultSchedule(rule)(
                    tvm.IRModule({"main": func.with_attr("global_symbol", "main")})), target)
        for rule_name, (scheduled, build_target) in modules.items():
            try:
                with fatbin_build_context(build_target):
                    lib = tvm.compile(scheduled, target=build_target)
            except Exception as err:  # noqa: BLE001  (a schedule that does not build is reported)
                print(name, rule_name, "FAILED:", str(err).splitlines()[0], flush=True)
                continue
            lib.export_library(str(out / f"{rule_name}-{n_out}x{n_in}.so"))
            print(name, rule_name, "built", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
