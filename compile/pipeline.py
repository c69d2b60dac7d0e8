"""The Relax pass pipeline per target: fuse, schedule every PrimFunc, lower."""

from __future__ import annotations

import tvm
from tvm import relax, te
from tvm.relax.backend.cuda import pipeline as cuda_passes
from tvm.relax.dpl.pattern import GlobalVarPattern, is_op, wildcard
from tvm.s_tir import dlight as dl
from tvm.target import Target

from tsedge.tir_kernels.attention import LOG2E
from tsedge.tir_kernels.common import exp2_vectorizable

from .cpu_schedule import CpuMatmul, CpuParallel


_MATMUL = tvm.ir.Op.get("relax.matmul")


@relax.expr_functor.mutator
class _AccumulateF32(relax.PyExprMutator):
    """``matmul(a, b)`` of float16 operands with a float16 result -> ``astype(matmul(a, b,
    out_dtype=float32), float16)``: the reduction runs in float32 (on tensor cores at the same
    speed) and the cast fuses into the matmul kernel's epilogue."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op.same_as(_MATMUL) and call.ty.dtype == "float16" and all(
                isinstance(arg.ty, relax.TensorType) and arg.ty.dtype == "float16" for arg in call.args):
            return relax.op.astype(self.builder_.normalize(relax.op.matmul(*call.args, out_dtype="float32")),
                                   "float16")
        return call


@tvm.transform.module_pass(opt_level=0, name="AccumulateMatmulF32")
def fp32_accumulate(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
    """Every float16 ``matmul`` accumulates in float32 (see ``_AccumulateF32``)."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = _AccumulateF32().visit_expr(func)
    return mod


def _dequantize_matmul_patterns() -> list[tuple]:
    """``matmul(x, W)``, ``matmul(x, permute_dims(W))`` and either ``+ bias`` where ``W`` is a
    ``call_tir`` of a PrimFunc called ``dequantize*`` (``models/linear.py``: packed weight, scale
    and, for q4_1, min)."""
    weight = is_op("relax.call_tir")(GlobalVarPattern(), wildcard())
    patterns = []
    for name, w in (("nt", is_op("relax.permute_dims")(weight)), ("nn", weight)):
        matmul = is_op("relax.matmul")(wildcard(), w)
        patterns += [(f"tsedge.dequantize_matmul_{name}_bias", is_op("relax.add")(matmul, wildcard()), {}, _is_dequantize),
                     (f"tsedge.dequantize_matmul_{name}", matmul, {}, _is_dequantize)]
    return patterns


def _is_dequantize(context: relax.transform.PatternCheckContext) -> bool:
    return any(isinstance(call, relax.Call) and isinstance(call.args[0], relax.GlobalVar)
               and call.args[0].name_hint.startswith("dequantize")
               for call in context.matched_bindings.values())


def fuse_dequantize_matmul() -> tvm.transform.Pass:
    """Group each dequantize (a ``call_tir``) with the matmul that consumes it (and a bias add)
    into one primitive function, which FuseTIR makes one PrimFunc: the technique of MLC-LLM's
    FuseDequantizeMatmulEwise. FuseOps alone leaves the dequantize a kernel of its own."""
    return relax.transform.FuseOpsByPattern(_dequantize_matmul_patterns(), bind_constants=False)


_SILU = tvm.ir.Op.get("relax.nn.silu")


@relax.expr_functor.mutator
class _VectorizableSilu(relax.PyExprMutator):
    """float32 ``silu(x)`` -> a TE compute ``x / (1 + 2^(-x log2 e))`` (``exp2_vectorizable``)."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op.same_as(_SILU) and call.ty.dtype == "float32":
            return self.builder_.call_te(
                lambda x: te.compute(x.shape, lambda *i: x(*i) / (1 + exp2_vectorizable(-x(*i) * LOG2E)),
                                     name="silu"), call.args[0], primfunc_name_hint="silu")
        return call


@tvm.transform.module_pass(opt_level=0, name="VectorizableSilu")
def vectorizable_silu(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
    """CPU: float32 ``silu(x)`` as ``x / (1 + 2^(-x log2 e))`` with ``exp2_vectorizable``. TVM's
    silu becomes a sigmoid that LLVM computes with a C library ``expf`` call per element: SmolLM2's
    SwiGLU took 4.9 ms a layer for a 512-token chunk, 1.6 ms vectorised (2 cores)."""
    mutator = _VectorizableSilu(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def schedule_passes(target: Target) -> list:
    """dlight on GPUs: decode GEMVs, reductions, and matmuls the model does not give to
    ``tir_kernels.matmul`` (on tensor cores through dlight's wmma rule, float32 accumulation);
    our own schedules on CPUs. (dlight's tensor-core rule needs apache-tvm-ffi 0.1.14.post0, the
    ABI apache-tvm 0.27.0.post1 was built for: with 0.1.15 Tensorize segfaults.)"""
    if target.kind.name == "llvm":
        return [dl.ApplyDefaultSchedule(CpuMatmul(), CpuParallel())]
    return [dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                    dl.gpu.GeneralReduction(), dl.gpu.Fallback())]


DECODE_FUNCTIONS = ("decode", "decode_select")


def graph_decode(max_context: int) -> tvm.transform.Pass:
    """Mark the decode functions for whole-step CUDA graphs.

    RewriteCUDAGraph captures the kernels whose arguments live at fixed addresses with fixed
    shapes: by default the weights and the buffers the function allocates itself. A decode step
    gets every other input (token id, KV cache, RoPE table, device length, policy state) from
    the runtime, which keeps them at fixed addresses (``tsedge/engine.py``), so ``num_input = 0``
    declares them fixed too; the GPU decode kernels read the length from the device, so no
    kernel argument changes from step to step. ``tir_var_upper_bound`` sizes the buffers that
    scale with the cache's capacity for ``max_context`` tokens, which makes them static.
    A decode function whose body still uses ``past`` (a policy with per-step shapes) is left to
    TVM's default capture: fixing ``past`` would capture a new graph at every step.
    """

    @tvm.transform.module_pass(opt_level=0, name="GraphDecode")
    def _mark(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        for gv, func in list(mod.functions.items()):
            if (isinstance(func, relax.Function) and gv.name_hint in DECODE_FUNCTIONS
                    and not _uses_past(func)):
                mod[gv] = func.with_attr("num_input", 0).with_attr("tir_var_upper_bound", {"capacity": max_context})
        return mod

    return _mark


def _uses_past(func: relax.Function) -> bool:
    """Whether ``func``'s body uses the symbolic ``past`` its ``past`` parameter defines."""
    others = [p for p in func.params if p.name != "past"]
    body_only = relax.Function(others, func.body, func.ret_ty, func.is_pure)
    return any(v.name == "past" for v in relax.analysis.free_symbolic_vars(body_only))


def relax_pipeline(target: Target, max_context: int | None = None):
    """``relax_pipeline`` for ``tvm.compile``: TVM's CUDA pass list with our schedule step;
    on CUDA with ``max_context``, decode steps replay as whole CUDA graphs (``graph_decode``)."""

    @tvm.transform.module_pass(opt_level=0, name="TsedgePipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        # x @ W^T as one matmul kernel (else W^T is materialised on every call)
        accumulate = [fp32_accumulate] if target.kind.name in ("cuda", "webgpu") else []  # webgpu: --target vulkan
        graph = [graph_decode(max_context)] if target.kind.name == "cuda" and max_context is not None else []
        fuse = ([fuse_dequantize_matmul()] + graph + accumulate + [relax.transform.FuseTransposeMatmul()]
                + cuda_passes.legalize_passes(target)[:-1])
        finalize = cuda_passes.finalize_passes(target)
        if target.kind.name == "llvm":
            finalize = [p for p in finalize if p.info.name != "RewriteCUDAGraph"]
            fuse = [vectorizable_silu] + fuse
        with target:
            seq = tvm.transform.Sequential(
                cuda_passes.library_dispatch_passes(target) + fuse + schedule_passes(target)
                + cuda_passes.dataflow_lower_passes(target) + finalize)
            return seq(mod)

    return _pipeline
