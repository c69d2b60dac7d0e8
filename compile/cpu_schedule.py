"""Schedule rules for ``llvm`` targets (TVM's default CPU build neither fuses nor schedules).

The fused PrimFuncs get:
- matmul (weights stored [in, out]): register tiles of 6 rows x 64 columns, the column tile
  vectorised, tiles spread over cores, reduction kept in a local accumulator;
- GEMV (decode, one row): the reduction split over the cores (``rfactor``) when the output has at
  most ``_SPLIT_K_MAX_COLS`` columns, else 64-column tiles spread over cores;
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
        for info in infos[: infos.index(main)]:
            sch.compute_inline(info.block_rv)
        epilogues = [b.block_rv for b in infos[infos.index(main) + 1:]]
        loops = sch.get_loops(block)
        cols = _static(sch.get(loops[-2]).extent) or 0
        if len(loops) == 2 and cols % _COLS == 0 and 0 < cols <= _SPLIT_K_MAX_COLS:
            return _split_k_gemv(sch, block)
        if len(loops) == 2:  # GEMV: one row
            j, k = loops
            jo, ji = sch.split(j, [None, _COLS])
            sch.reorder(jo, k, ji)
            outer = jo
            inner = [ji]
        else:
            i, j, k = loops
            jo, ji = sch.split(j, [None, _COLS])
            io, ii = sch.split(i, [None, _ROWS])
            sch.reorder(io, jo, k, ii, ji)
            outer = sch.fuse(io, jo)
            sch.unroll(ii)
            inner = [ii, ji]
        sch.parallel(outer)
        acc = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(acc, outer)
        for epi in epilogues:
            sch.reverse_compute_at(epi, outer)
        for blk in [acc, *epilogues]:
            loops = sch.get_loops(blk)
            if len(loops) > 1:
                _vectorize_tail(sch, loops[-1])
        sch.vectorize(inner[-1])
        sch.decompose_reduction(block, k)
        return sch


def _split_k_gemv(sch: s_tir.Schedule, block) -> s_tir.Schedule:
    """A GEMV with few columns: each core streams whole weight rows of its share of the reduction
    (contiguous in memory) into a row of partial sums; the partial rows are added afterwards (with
    any element-wise epilogue, both left serial: a few thousand values)."""
    j, k = sch.get_loops(block)
    ko, ki = sch.split(k, [_SPLIT_K, None])
    partial = sch.rfactor(ko, 0)
    j, ko, ki = sch.get_loops(partial)
    jo, ji = sch.split(j, [None, _COLS])
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
