"""The Relax pass pipeline per target: fuse, schedule every PrimFunc, lower."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cuda import pipeline as cuda_passes
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .cpu_schedule import CpuMatmul, CpuParallel


@tvm.transform.module_pass(opt_level=0, name="NoTensorCoreMatmul")
def _no_tensorize(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
    """Keep dlight off its tensor-core matmul path (TVM 0.27 segfaults in Tensorize on our
    float16 prefill matmuls); the SIMT matmul schedule is used instead."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc):
            mod[gv] = func.with_attr("dlight.do_not_tensorize", True)
    return mod


def schedule_passes(target: Target) -> list:
    if target.kind.name == "llvm":
        return [dl.ApplyDefaultSchedule(CpuMatmul(), CpuParallel())]
    return [_no_tensorize, dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                                   dl.gpu.GeneralReduction(), dl.gpu.Fallback())]


def relax_pipeline(target: Target):
    """``relax_pipeline`` for ``tvm.compile``: TVM's CUDA pass list with our schedule step."""

    @tvm.transform.module_pass(opt_level=0, name="TsedgePipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        # x @ W^T as one matmul kernel (else W^T is materialised on every call)
        fuse = [relax.transform.FuseTransposeMatmul()] + cuda_passes.legalize_passes(target)[:-1]
        finalize = cuda_passes.finalize_passes(target)
        if target.kind.name == "llvm":
            finalize = [p for p in finalize if p.info.name != "RewriteCUDAGraph"]
        with target:
            seq = tvm.transform.Sequential(
                cuda_passes.library_dispatch_passes(target) + fuse + schedule_passes(target)
                + cuda_passes.dataflow_lower_passes(target) + finalize)
            return seq(mod)

    return _pipeline
