"""Schedule rules for ``llvm`` targets (TVM's default CPU build neither fuses nor schedules).

The fused PrimFuncs get:
- matmul (weights stored [in, out]): register tiles of 6 rows x 64 columns over rows padded to a
  multiple of 6, the column tile vectorised, tiles spread over cores, the accumulators in registers;
- GEMV (decode, one row): the reduction split over the cores (``rfactor``) when the output has at
  most ``_SPLIT_K_MAX_COLS`` columns, else 64-column tiles spread over cores;
- a fused dequantize-matmul (``models/linear.py``): the GEMV keeps the dequantization inlined,
  splits the reduction over the cores at any width and unrolls 8 reduction steps (one packed word:
  constant shifts, the partial sums stay in registers across them); the matmul dequantizes a [K, 64] weight panel once per column tile and
  runs every row tile of the chunk over it;
- everything else (norms, element-wise, embedding): outer spatial loop parallel.
Hand-written kernels (``tirx.is_scheduled``) are left alone.
"""

from __future__ import annotations

import os

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target import Target

_ROWS = 6
_COLS = 64
_SPLIT_K = min(os.cpu_count() or 1, 16)  # one share of a GEMV's reduction per core of this host
_SPLIT_K_MAX_COLS = 4096
# a dequantizing GEMV is bound by unpacking, not by the partial-sum rows: split-K pays up to
# lm_head's size (SmolLM2 q4f16 lm_head, 49152 columns: 3.3 -> 1.8 ms a token)
_SPLIT_K_MAX_COLS_DEQUANTIZED = 1 << 18
_WORD = 8  # 4-bit weights in one packed uint32 (models/quantization.py)


def _static(extent) -> int | None:
    return int(extent) if isinstance(extent, (int, tirx.IntImm)) else None


def _normalized(func, target: Target):
    """(schedule, block infos) of a PrimFunc for an llvm target, or None."""
    if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    return None if infos is None else (sch, infos)


class CpuMatmul(dl.ScheduleRule):
    """``C[i, j] = sum_k A[i, k] * B[k, j]`` (+ element-wise epilogue)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        normalized = _normalized(func, target)
        if normalized is None:
            return None
        sch, infos = normalized
        reductions = [b for b in infos if b.is_reduction()]
        if len(reductions) != 1 or [it.kind for it in reductions[0].iters] not in (["S", "S", "R"], ["S", "R"]):
            return None
        main = reductions[0]
        block = main.block_rv
        producers = [info.block_rv for info in infos[: infos.index(main)]]
        dequantize = [b for b in producers if sch.get(b).name_hint.startswith("dequantize")]
        panel = len(dequantize) == 1 and len(sch.get_loops(block)) == 3
        for producer in producers:
            if not (panel and producer in dequantize):
                sch.compute_inline(producer)
        epilogues = [b.block_rv for b in infos[infos.index(main) + 1:]]
        loops = sch.get_loops(block)
        if len(loops) == 3:
            return _tiled_matmul(sch, block, dequantize[0] if panel else None, epilogues)
        cols = _static(sch.get(loops[-2]).extent) or 0
        if cols % _COLS == 0 and 0 < cols <= (_SPLIT_K_MAX_COLS_DEQUANTIZED if dequantize else _SPLIT_K_MAX_COLS):
            return _split_k_gemv(sch, block, unroll_k=_WORD if dequantize else 1)
        return _tiled_gemv(sch, block, bool(dequantize), epilogues)


def _tiled_gemv(sch: s_tir.Schedule, block, dequantized: bool, epilogues) -> s_tir.Schedule:
    """A GEMV (one row) with many columns: 64-column tiles spread over the cores, the reduction
    kept in a local accumulator (8 steps unrolled for a packed 4-bit weight, as _split_k_gemv)."""
    j, k = sch.get_loops(block)
    jo, ji = sch.split(j, [None, _COLS])
    depth = _static(sch.get(k).extent) or 0
    if dequantized and depth % _WORD == 0:
        k, kw = sch.split(k, [None, _WORD])
        sch.reorder(jo, k, kw, ji)
        sch.unroll(kw)
    else:
        sch.reorder(jo, k, ji)
    sch.parallel(jo)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, jo)
    for epi in epilogues:
        sch.reverse_compute_at(epi, jo)
    for blk in [acc, *epilogues]:
        _vectorize_tail(sch, sch.get_loops(blk)[-1])
    sch.vectorize(ji)
    sch.decompose_reduction(block, k)
    return sch


def _tiled_matmul(sch: s_tir.Schedule, block, dequantize, epilogues) -> s_tir.Schedule:
    """A matmul in register tiles of 6 rows x 64 columns, the accumulators held in registers
    across the whole reduction.

    The rows (the chunk's tokens, a symbolic count) are padded to a multiple of 6 first
    (``pad_einsum``: the input copied once into a padded buffer, the padded rows' results never
    written back), so no row of a tile is predicated inside the reduction loop — with the
    predicate LLVM kept the accumulators in memory (a load and a store per multiply-add: 28
    GFLOP/s of 2 cores against 120-140 without, SmolLM2's q4_1 shapes at 512 rows).

    With ``dequantize`` (a fused dequantize-matmul) the tiles run per 64-column panel spread over
    the cores: the [K, 64] float panel is dequantized once into a per-core buffer, then every row
    tile of the chunk runs over it (the dequantization costs 1/rows of the multiply-adds instead
    of one per row). Without it, the (row tile, column tile) pairs are spread over the cores."""
    sch.pad_einsum(block, [_ROWS, 1, 1])
    panel = None if dequantize is None else sch.get(dequantize)
    for pad in sch.get_producers(block):  # the padded copy of the input (and the panel's dequantize)
        if panel is None or not sch.get(pad).same_as(panel):
            pad_loops = sch.get_loops(pad)
            sch.parallel(sch.fuse(*pad_loops[:-1]))
            _vectorize_tail(sch, pad_loops[-1])
    (copy_out,) = sch.get_consumers(block)
    sch.set_scope(block, 0, "local")
    i, j, k = sch.get_loops(block)
    jo, ji = sch.split(j, [None, _COLS])
    io, ii = sch.split(i, [None, _ROWS])
    if dequantize is None:
        sch.reorder(io, jo, k, ii, ji)
        tile = sch.fuse(io, jo)
        sch.parallel(tile)
    else:
        sch.reorder(jo, io, k, ii, ji)
        sch.parallel(jo)
        sch.compute_at(dequantize, jo)
        _vectorize_tail(sch, sch.get_loops(dequantize)[-1])
        tile = io
    sch.unroll(ii)
    if epilogues:  # they read the accumulators directly
        sch.compute_inline(copy_out)
    for blk in epilogues or [copy_out]:
        sch.reverse_compute_at(blk, tile)
        _vectorize_tail(sch, sch.get_loops(blk)[-1])
    sch.vectorize(ji)
    sch.decompose_reduction(block, k)
    return sch


def _split_k_gemv(sch: s_tir.Schedule, block, unroll_k: int = 1) -> s_tir.Schedule:
    """A GEMV with few columns: each core streams whole weight rows of its share of the reduction
    (contiguous in memory) into a row of partial sums; the partial rows are added afterwards (with
    any element-wise epilogue, both left serial: a few thousand values). ``unroll_k`` > 1 (when it
    divides a core's share): that many reduction steps unrolled inside each column tile."""
    j, k = sch.get_loops(block)
    ko, ki = sch.split(k, [_SPLIT_K, None])
    partial = sch.rfactor(ko, 0)
    j, ko, ki = sch.get_loops(partial)
    jo, ji = sch.split(j, [None, _COLS])
    share = _static(sch.get(ki).extent) or 0
    if unroll_k > 1 and share % unroll_k == 0:
        ki, kii = sch.split(ki, [None, unroll_k])
        sch.reorder(ko, ki, jo, kii, ji)
        sch.unroll(kii)
    else:
        sch.reorder(ko, ki, jo, ji)
    sch.parallel(ko)
    acc = sch.cache_write(partial, 0, "local")
    sch.reverse_compute_at(acc, ko)
    _, acc_inner = sch.split(sch.get_loops(acc)[-1], [None, _COLS])
    sch.vectorize(acc_inner)
    sch.vectorize(ji)
    sch.decompose_reduction(partial, ki)
    return sch


def _vectorize_tail(sch: s_tir.Schedule, loop) -> None:
    extent = _static(sch.get(loop).extent)
    if extent and extent % 8 == 0:
        sch.vectorize(loop)


class CpuParallel(dl.ScheduleRule):
    """Parallel outer spatial loop of every block, vectorised inner loop when it is static."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        normalized = _normalized(func, target)
        if normalized is None:
            return None
        sch, infos = normalized
        for info in infos:
            loops = sch.get_loops(info.block_rv)
            if loops and info.iters and info.iters[0].kind == "S":
                sch.parallel(loops[0])
            if len(loops) > 1 and info.iters[-1].kind == "S":
                _vectorize_tail(sch, loops[-1])
        return sch
