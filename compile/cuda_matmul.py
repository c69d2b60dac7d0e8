"""Tensor-core schedule for prefill matmuls on CUDA (sm_80 and later).

Handles the fused PrimFuncs that linears become after ``FuseTransposeMatmul`` and legalization
with float32 accumulation (``fp32_accumulate`` below):

    acc[n, N] (float32) = sum_k float32(x[n, k]) * float32(W[N, k])     x, W: float16
    y[n, N] = epilogue(acc)                                              (cast, residual add ...)

``n`` (tokens of a prefill chunk) is dynamic; it is padded to the block tile and the padding
is never stored. N and K are static. The kernel:
- block tile ``rows x cols`` of the output, ``warps_m x warps_n`` warps each owning a
  ``rows/warps_m x cols/warps_n`` register tile of m16n8k16 accumulators (float32);
- the reduction in steps of ``k_step`` elements: x and W tiles go global -> shared (16-byte
  vector loads, rows padded by 16 bytes against bank conflicts) -> registers (``ldmatrix``) ->
  ``mma.sync``; a two-stage software pipeline overlaps the next step's global loads with this
  step's math;
- the accumulators go through shared memory to a coalesced epilogue (float32 -> float16 and
  whatever element-wise work was fused after the matmul).

Status (H200, bench/results/matmul_speed_h200.txt): correct, but ~2 TFLOP/s and not used by the
pipeline. TVM 0.27's LowerWarpMemory lowers only the first "warp" buffer of a kernel (the
accumulator); the x/W fragments stay whole-warp arrays in local memory. Needs tvm-ffi
0.1.14.post0 (``sch.tensorize`` segfaults with 0.1.15.post2).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.matmul import (
    auto_inline_consumer_chain,
    auto_inline_producers,
    get_index_map,
    get_reduction_blocks,
)
from tvm.s_tir import TensorIntrin
from tvm.s_tir.tensor_intrin.cuda import get_mma_intrin_group, shared_16x16_to_ldmatrix_32x8_layout
from tvm.script import tirx as T
from tvm.target import Target

_MMA = 16  # m16n8k16 instructions are issued in pairs: 16x16 output tiles, k steps of 16
_WARP = 32
_VECTOR = 8  # float16 elements per 16-byte global/shared access
_LOCAL = _MMA * _MMA // _WARP  # float16 elements of one 16x16 fragment per lane


def _ldmatrix_impl(operand: str):
    """``ldmatrix.x4`` of a 16x16 float16 tile from shared.dyn into a warp fragment (the layout of
    ``shared_16x16_to_ldmatrix_32x8_layout``). ``operand`` ``"a"``: the tile is [rows, k];
    ``"b"``: the tile is [cols, k] (W's layout), read so that the fragment is the mma's col-major
    B. The fragment is zero-filled first: ``mma_fill`` is how LowerWarpMemory learns the per-lane
    size of a warp buffer (it cannot read it off int64 ldmatrix offsets); the fill is dead code
    for nvcc."""
    if operand == "a":
        def row(tx, stride):
            return stride * (tx % 16) + 8 * (tx // 16)
    else:
        def row(tx, stride):
            return stride * 8 * (tx // 16) + stride * (tx % 8) + 8 * ((tx % 16) // 8)

    @T.prim_func(s_tir=True)
    def impl(warp_handle: T.handle, shared_handle: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        shared = T.match_buffer(shared_handle, (_MMA, _MMA), "float16", align=64,
                                offset_factor=_MMA, scope="shared.dyn", strides=[s0, s1])
        warp = T.match_buffer(warp_handle, (_WARP, _LOCAL), "float16", align=64,
                              offset_factor=_MMA, scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:_MMA, 0:_MMA])
            T.writes(warp[0:_WARP, 0:_LOCAL])
            for tx in T.thread_binding(0, _WARP, "threadIdx.x"):
                T.evaluate(T.cuda.mma_fill_legacy(_LOCAL, warp.data, warp.elem_offset, dtype="float16"))
                T.evaluate(T.ptx_legacy.ldmatrix(False, 4, ".b16", warp.data,
                                                 warp.elem_offset + _LOCAL * tx,
                                                 shared.access_ptr("r"), row(tx, s0), dtype="float16"))

    return impl


def _register_loads() -> dict[str, str]:
    """Our fragment loads under their own names: TVM's ldmatrix descriptions, ``_ldmatrix_impl``."""
    names = {}
    for operand, stock in (("a", "mma_ldmatrix_f16_a_dyn"), ("b", "mma_ldmatrix_f16_b_trans_dyn")):
        name = f"tsedge_ldmatrix_f16_{operand}_dyn"
        TensorIntrin.register(name, TensorIntrin.get(stock).desc, _ldmatrix_impl(operand),
                              override=True)
        names[f"load_{operand}"] = name
    return names


_LOADS = _register_loads()


@dataclass(frozen=True)
class TileConfig:
    """Block tile ``rows x cols`` of the output, its warp grid and the reduction step (elements)."""

    rows: int = 128
    cols: int = 128
    warps_m: int = 2
    warps_n: int = 2
    k_step: int = 32

    @property
    def threads(self) -> int:
        return self.warps_m * self.warps_n * _WARP


def choose_config(n_cols: int, expected_rows: int = 512, num_sms: int = 132) -> TileConfig:
    """Largest block tile that still gives every multiprocessor a block for ``expected_rows``
    tokens (a 512-token prefill chunk on an H100/H200's 132 SMs by default)."""
    for cfg in (TileConfig(128, 256, 2, 4), TileConfig(128, 128, 2, 2), TileConfig(64, 128, 2, 2)):
        if -(-expected_rows // cfg.rows) * -(-n_cols // cfg.cols) >= num_sms:
            return cfg
    return TileConfig(64, 64, 2, 2)


def _static(extent) -> int | None:
    return int(extent) if isinstance(extent, (int, tirx.IntImm)) else None


class TensorCoreMatmul(dl.ScheduleRule):
    """float16 x float16 -> float32 matmul (+ element-wise epilogue) on ``mma.sync`` tensor cores.

    Applies to CUDA targets of sm_80 or later when the reduction block is ``C[i, j] +=
    f32(A[i, k]) * f32(B[j, k])``-like (any operand layout; dlight's index analysis normalizes
    it), K and N are static multiples of 16 and the token extent is dynamic or at least 64
    (smaller static extents are GEMVs and stay with ``dl.gpu.GEMV``).
    """

    def __init__(self, config: TileConfig | None = None) -> None:
        self.config = config

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda":
            return None
        if int(str(target.attrs.get("arch", "sm_50"))[3:5]) < 80 or func.attrs and (
                "dlight.do_not_tensorize" in func.attrs):
            return None
        sch = s_tir.Schedule(func)
        reductions = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
        if reductions is None:
            return None
        main = reductions[0]
        stmt = sch.get(main)
        if not _is_f16_f32_matmul(stmt):
            return None
        index_maps = get_index_map(stmt)
        if index_maps is None:
            return None
        extents = _matmul_extents(stmt, index_maps[0])
        if extents is None:
            return None
        n_cols, k_len = extents
        return _schedule(sch, main, index_maps, self.config or choose_config(n_cols))


def _is_f16_f32_matmul(block: s_tir.SBlock) -> bool:
    return (len(block.reads) == 2 and {r.source.dtype for r in block.reads} == {"float16"}
            and len(block.writes) == 1 and block.writes[0].source.dtype == "float32")


def _matmul_extents(block: s_tir.SBlock, matmul_map: tirx.IndexMap) -> tuple[int, int] | None:
    """(N, K) of a normalized ``[batch, i, j, k]`` matmul block, or None when the shape does not
    suit the kernel (dynamic N or K, not multiples of 16, a batch, a small static token count)."""
    doms = [iv.dom.extent for iv in block.iter_vars]
    batch, rows, cols, red = matmul_map.map_shape(doms)
    rows, cols, red, batch = (_static(rows), _static(cols), _static(red), _static(batch))
    if batch != 1 or cols is None or red is None or cols % _MMA or red % (2 * _MMA):
        return None
    if rows is not None and rows < 64:
        return None
    return cols, red


def _schedule(sch: s_tir.Schedule, main, index_maps, cfg: TileConfig) -> s_tir.Schedule:
    matmul_map, a_map, b_map, c_map = index_maps
    # C[0, i, j] += A[0, i, k] * B[0, j, k]
    sch.transform_layout(sch.reindex(main, ("read", 0)), ("write", 0), a_map)
    sch.transform_layout(sch.reindex(main, ("read", 1)), ("write", 0), b_map)
    sch.transform_layout(sch.reindex(main, ("write", 0)), ("read", 0), c_map)
    sch.transform_block_layout(main, matmul_map)
    sch.pad_einsum(main, [1, cfg.rows, cfg.cols, cfg.k_step])

    batch, i, j, k = sch.get_loops(main)
    i, i_mma = sch.split(i, [None, _MMA])
    j, j_mma = sch.split(j, [None, _MMA])
    k, k_mma = sch.split(k, [None, _MMA])
    sch.reorder(i, j, k, i_mma, j_mma, k_mma)
    inner = main
    outer = sch.blockize(i_mma)

    warp_rows, warp_cols = cfg.rows // cfg.warps_m // _MMA, cfg.cols // cfg.warps_n // _MMA
    i0, i1, i2 = sch.split(i, [None, cfg.warps_m, warp_rows])
    j0, j1, j2 = sch.split(j, [None, cfg.warps_n, warp_cols])
    k0, k1 = sch.split(k, [None, cfg.k_step // _MMA])
    sch.reorder(j0, i0, i1, j1, k0, k1, i2, j2)
    block_x = sch.fuse(batch, j0, i0)  # token tiles fastest: blocks that share a W tile run together
    warp = sch.fuse(i1, j1)
    sch.bind(block_x, "blockIdx.x")
    sch.bind(warp, "threadIdx.y")

    warps = cfg.warps_m * cfg.warps_n

    def to_shared(index: int):
        copy = sch.cache_read(outer, index, "shared.dyn")
        sch.compute_at(copy, k0)
        _, ty, tx, vec = sch.split(sch.fuse(*sch.get_loops(copy)[-2:]), [None, warps, _WARP, _VECTOR])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vec)
        sch.storage_align(copy, 0, axis=-2, factor=32, offset=_VECTOR)
        # global -> registers -> shared: the pipeline issues the next step's loads before the
        # current step's math and stores them to shared after it
        sch.annotate(copy, "tirx.manifest_shared_memory_local_stage", 1)
        sch.annotate(copy, "double_buffer_scope", 0)
        return copy

    a_shared, b_shared = to_shared(0), to_shared(1)
    auto_inline_producers(sch, a_shared)
    auto_inline_producers(sch, b_shared)

    a_warp = sch.cache_read(outer, 0, "warp")
    b_warp = sch.cache_read(outer, 1, "warp")
    sch.compute_at(a_warp, k1)
    sch.compute_at(b_warp, k1)

    c_shared = sch.cache_write(outer, 0, "shared.dyn")
    c_warp = sch.cache_write(outer, 0, "warp")
    sch.reverse_compute_at(c_warp, warp)
    sch.reverse_compute_at(c_shared, block_x)
    sch.storage_align(c_shared, 0, axis=-2, factor=32, offset=4)
    ci, cj = sch.get_loops(c_warp)[-2:]
    ci0, ci1 = sch.split(ci, [None, _MMA])
    cj0, cj1 = sch.split(cj, [None, _MMA])
    sch.reorder(ci0, cj0, ci1, cj1)

    init = sch.decompose_reduction(outer, k0)

    def fragment_tile(block):
        fi, fj = sch.get_loops(block)[-2:]
        fi0, fi1 = sch.split(fi, [None, _MMA])
        fj0, fj1 = sch.split(fj, [None, _MMA])
        sch.reorder(fi0, fj0, fi1, fj1)
        return fi1

    loop_a, loop_b = fragment_tile(a_warp), fragment_tile(b_warp)

    def fragment_layout(b_, i_, j_):
        thread, local = shared_16x16_to_ldmatrix_32x8_layout(i_ % _MMA, j_ % _MMA)
        return b_, i_ // _MMA, j_ // _MMA, thread, local

    sch.transform_layout(a_warp, ("write", 0), fragment_layout)
    sch.transform_layout(b_warp, ("write", 0), fragment_layout)
    sch.transform_layout(c_warp, ("read", 0), fragment_layout)

    intrins = get_mma_intrin_group("shared.dyn", "shared.dyn", "float16", "float32",
                                   trans_a=False, trans_b=True) | _LOADS
    sch.tensorize(loop_a, intrins["load_a"])
    sch.tensorize(loop_b, intrins["load_b"])
    sch.tensorize(sch.get_loops(inner)[-3], intrins["compute"])
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], intrins["init"])
    sch.tensorize(sch.get_loops(c_warp)[-2], intrins["store"])

    # epilogue: shared float32 tile -> element-wise consumers -> global, coalesced
    auto_inline_consumer_chain(sch, c_shared)
    _, ty, tx, vec = sch.split(sch.fuse(*sch.get_loops(c_shared)[-2:]), [None, warps, _WARP, 4])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)

    # two stages over k1 (ldmatrix of the next 16-wide slice during the current mma) and over k0;
    # k0's body by then: x global->regs, regs->shared, W the same, k1's prologue, body, epilogue;
    # order: next step's global loads, this step's math, then the stores to shared
    sch.annotate(k0, "software_pipeline_stage", [0, 0, 0, 0, 1])
    sch.annotate(k0, "software_pipeline_order", [0, 2, 1, 3, 4])
    return sch


_MATMUL = tvm.ir.Op.get("relax.matmul")


@relax.expr_functor.mutator
class _AccumulateF32(relax.PyExprMutator):
    """``matmul(a, b)`` of float16 operands with a float16 result -> ``astype(matmul(a, b,
    out_dtype=float32), float16)``: the reduction then runs in float32 (tensor cores take the
    same time), and the cast fuses into the matmul kernel's epilogue."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op.same_as(_MATMUL) and all(
                isinstance(arg.ty, relax.TensorType) and arg.ty.dtype == "float16"
                for arg in call.args) and call.ty.dtype == "float16":
            acc = self.builder_.normalize(relax.op.matmul(*call.args, out_dtype="float32"))
            return relax.op.astype(acc, "float16")
        return call


@tvm.transform.module_pass(opt_level=0, name="AccumulateMatmulF32")
def fp32_accumulate(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
    """Relax pass: every float16 ``matmul`` accumulates in float32 (see ``_AccumulateF32``)."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = _AccumulateF32().visit_expr(func)
    return mod
