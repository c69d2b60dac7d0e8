"""Prefill linear layers on tensor cores: ``y[m, N] = x[m, K] · W[N, K]ᵀ`` (CUDA sm_80+, float16).

One block computes a ``bm x bn`` tile of ``y`` with ``mma.sync.m16n8k16`` (float16 operands,
float32 accumulators), its warps in a ``warps_m x warps_n`` grid, walking ``K`` ``bk`` at a time:

- both operands are K-contiguous, so ``x`` is the row-major A and ``W`` the column-major B of the
  instruction, and ``ldmatrix`` (no transpose) loads both from shared memory; a row's 16-byte
  chunks are stored XOR-swizzled by the row (``swizzled``), so neither the copies nor ``ldmatrix``
  meet bank conflicts;
- a warp's fragments of the next 16-wide k-slice load (``ldmatrix``) while the tensor cores work on
  the current one (inline PTX is issued in the order written);
- ``stages`` k-steps are in flight: ``cp.async`` copies step ``t + stages - 1`` from global to
  (dynamic) shared memory while the tensor cores work on step ``t``: one barrier a step, no
  registers for staging;
- the grid runs the ``m`` tiles of one weight tile side by side (``blockIdx.x``), so each weight
  byte comes from DRAM about once per prefill chunk; ``m`` is any size (rows past ``m`` or ``N``
  copy the last valid row and are never stored), ``N`` a multiple of 8, ``K`` of ``bk``.

The layout follows NVIDIA's CUTLASS multistage GEMM (Ampere ``mma.sync`` + ``cp.async``); decode
(``m = 1``) keeps the GEMV schedule. On Hopper (target arch ``sm_90a``) ``make_prefill_matmul``
returns ``matmul_wgmma``'s warpgroup-MMA kernel instead (1.3-1.6x this one on the H200).
"""

from __future__ import annotations

import dataclasses

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .common import has_mma_sync, i64


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Block tile ``bm x bn`` of the output, ``bk`` of K per stage, the warp grid, the stages."""

    bm: int = 128
    bn: int = 128
    bk: int = 64
    warps_m: int = 2
    warps_n: int = 4
    stages: int = 3


TILES = Tiles()


def swizzled(row: "tirx.PrimExpr", chunk: "tirx.PrimExpr", bk: int) -> "tirx.PrimExpr":
    """Element offset of 16-byte ``chunk`` of ``row`` in a ``bk``-wide (32 or 64) shared tile: the
    chunk index XOR'd with the row's place in a 128-byte period, so the 8 rows one ``ldmatrix``
    phase reads hit 8 different 16-byte bank groups."""
    chunks = bk // 8
    return row * bk + ((chunk ^ (row // (8 // chunks) % chunks)) * 8)


def tile_copies(bm: int, bn: int, bk: int, stages: int, threads: int, n_out: int, k: int):
    """The macro ``copy_step(x, w, a_sh, b_sh, m, m0, n0, t, tid)`` that issues the ``cp.async``
    copies of k-step ``t``'s ``bm x bk`` x tile (rows from ``m0``, clamped to ``m - 1``) and ``bn x bk``
    W tile (rows from ``n0``, clamped to ``n_out - 1``) into stage ``t % stages`` of ``a_sh``/``b_sh``,
    ``swizzled``; thread ``tid`` of ``threads`` copies every ``threads``-th 16-byte chunk."""
    vecs = bk // 8
    a_items, b_items = bm * vecs // threads, bn * vecs // threads
    N, K = i64(n_out), i64(k)

    @T.macro
    def copy_step(x, w, a_sh, b_sh, m, m0, n0, t, tid):
        for it in T.unroll(a_items):
            T.evaluate(T.s_tir.cp_async_raw.legacy(
                a_sh.data, t % stages * bm * bk + swizzled((it * threads + tid) // vecs, (it * threads + tid) % vecs, bk),
                x.data, T.min(m0 + (it * threads + tid) // vecs, m - 1) * K + t * bk + (it * threads + tid) % vecs * 8,
                16, dtype="float16"))
        for it in T.unroll(b_items):
            T.evaluate(T.s_tir.cp_async_raw.legacy(
                b_sh.data, t % stages * bn * bk + swizzled((it * threads + tid) // vecs, (it * threads + tid) % vecs, bk),
                w.data, T.min(n0 + (it * threads + tid) // vecs, N - 1) * K + t * bk + (it * threads + tid) % vecs * 8,
                16, dtype="float16"))

    return copy_step


def supported(n_out: int, k: int, dtype: str, target: Target, tiles: Tiles = TILES) -> bool:
    """True where the kernel runs: CUDA sm_80+, float16, ``n_out % 8 == 0`` and ``k % bk == 0``."""
    return has_mma_sync(target) and dtype == "float16" and n_out % 8 == 0 and k % tiles.bk == 0


def kernel_name(n_out: int, k: int) -> str:
    """The PrimFunc's name for one weight shape (a model holds one kernel per shape)."""
    return f"prefill_matmul_{n_out}x{k}"


def make_prefill_matmul(n_out: int, k: int, dtype: str, target: Target) -> tirx.PrimFunc:
    """The prefill linear kernel for ``target``: ``matmul_wgmma``'s on sm_90a, else ``make_mma_matmul``'s
    (same arguments and results). Raises ValueError where ``supported`` is False."""
    from .matmul_wgmma import make_prefill_matmul_wgmma, supported as wgmma_supported  # imports this module

    if wgmma_supported(n_out, k, dtype, target):
        return make_prefill_matmul_wgmma(n_out, k, dtype, target).with_attr("global_symbol", kernel_name(n_out, k))
    return make_mma_matmul(n_out, k, dtype, target)


def make_mma_matmul(n_out: int, k: int, dtype: str, target: Target, tiles: Tiles = TILES) -> tirx.PrimFunc:
    """Args: x[m, k] float16, w[n_out, k] float16 (a Linear's weight, [out, in]); output
    y[m, n_out] float16, accumulated in float32. Raises ValueError where ``supported`` is False
    or ``tiles`` do not divide into 16x8 warp tiles, 16-byte copies and 32- or 64-wide k-steps."""
    if not supported(n_out, k, dtype, target, tiles):
        raise ValueError(f"tensor-core matmul needs CUDA sm_80+, float16, N % 8 == 0 and K % {tiles.bk} == 0 "
                         f"(got {target.kind.name}, {dtype}, N {n_out}, K {k})")
    bm, bn, bk, stages = tiles.bm, tiles.bn, tiles.bk, tiles.stages
    threads = 32 * tiles.warps_m * tiles.warps_n
    warp_m, warp_n = bm // tiles.warps_m, bn // tiles.warps_n
    m_tiles, n_tiles = warp_m // 16, warp_n // 8  # mma tiles per warp
    vecs = bk // 8  # 16-byte vectors per row of a k-step
    if bk not in (32, 64) or warp_m % 16 or warp_n % 16 or (bm * vecs) % threads or (bn * vecs) % threads:
        raise ValueError(f"matmul tiles {tiles} do not divide into warps, 16-byte copies and k-steps of 32/64")
    steps = k // bk
    N, K = i64(n_out), i64(k)

    copy_step = tile_copies(bm, bn, bk, stages, threads, n_out, k)

    @T.macro
    def fragments(af, bf, a_sh, b_sh, stage, ks, a_row, b_row, tx):
        """ldmatrix of the warp's A and B fragments of k-step ``ks`` (16 wide) into half ``ks % 2``."""
        for mt in T.unroll(m_tiles):
            T.evaluate(T.ptx_legacy.ldmatrix(
                False, 4, ".b16", af.data, (ks % 2 * m_tiles + mt) * 8, a_sh.access_ptr("r"),
                stage * bm * bk + swizzled(a_row + mt * 16 + (tx // 8) % 2 * 8 + tx % 8, ks * 2 + tx // 16, bk),
                dtype="float16"))
        for nb in T.unroll(n_tiles // 2):
            T.evaluate(T.ptx_legacy.ldmatrix(
                False, 4, ".b16", bf.data, (ks % 2 * n_tiles + 2 * nb) * 4, b_sh.access_ptr("r"),
                stage * bn * bk + swizzled(b_row + (2 * nb + tx // 16) * 8 + tx % 8, ks * 2 + (tx // 8) % 2, bk),
                dtype="float16"))

    @T.prim_func(s_tir=True)
    def prefill_matmul(x_h: T.handle, w_h: T.handle, y_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, K), "float16")
        w = T.match_buffer(w_h, (N, K), "float16")
        y = T.match_buffer(y_h, (m, N), "float16")
        for bx in T.thread_binding((m + bm - 1) // bm, thread="blockIdx.x"):
            for by in T.thread_binding((N + bn - 1) // bn, thread="blockIdx.y"):
                for ty in T.thread_binding(T.int64(tiles.warps_m * tiles.warps_n), thread="threadIdx.y"):
                    for tx in T.thread_binding(T.int64(32), thread="threadIdx.x"):
                        with T.sblock("gemm"):
                            T.reads()
                            T.writes()
                            # dynamic shared memory: ldmatrix takes it through access_ptr, which the
                            # pass merging dynamic allocations rewrites (a bare buffer var it would not)
                            a_sh = T.sblock_alloc_buffer((stages * bm * bk,), "float16", scope="shared.dyn")
                            b_sh = T.sblock_alloc_buffer((stages * bn * bk,), "float16", scope="shared.dyn")
                            af = T.sblock_alloc_buffer((2 * m_tiles * 8,), "float16", scope="local")  # 2 k-steps
                            bf = T.sblock_alloc_buffer((2 * n_tiles * 4,), "float16", scope="local")
                            acc = T.sblock_alloc_buffer((m_tiles * n_tiles * 4,), "float32", scope="local")
                            tid: T.let[T.int64] = ty * 32 + tx
                            a_row: T.let[T.int64] = ty // tiles.warps_n * warp_m  # the warp's first row, column
                            b_row: T.let[T.int64] = ty % tiles.warps_n * warp_n
                            for e in T.unroll(m_tiles * n_tiles * 4):
                                acc[e] = T.float32(0)
                            for t in T.unroll(stages - 1):
                                if t < steps:
                                    copy_step(x, w, a_sh, b_sh, m, bx * bm, by * bn, t, tid)
                                T.evaluate(T.ptx.cp.async_.commit_group())
                            for t in T.serial(steps):
                                T.evaluate(T.ptx.cp.async_.wait_group(stages - 2))  # step t landed (own copies)
                                T.tvm_storage_sync("shared")  # everyone's; and stage (t - 1) % stages is free
                                if t + stages - 1 < steps:
                                    copy_step(x, w, a_sh, b_sh, m, bx * bm, by * bn, t + stages - 1, tid)
                                T.evaluate(T.ptx.cp.async_.commit_group())
                                fragments(af, bf, a_sh, b_sh, t % stages, 0, a_row, b_row, tx)
                                for ks in T.unroll(bk // 16):  # the next k-step's fragments load under this one's mma
                                    if ks + 1 < bk // 16:
                                        fragments(af, bf, a_sh, b_sh, t % stages, ks + 1, a_row, b_row, tx)
                                    for mt in T.unroll(m_tiles):
                                        for nt in T.unroll(n_tiles):
                                            T.evaluate(T.ptx_legacy.mma(
                                                "m16n8k16", "row", "col", "fp16", "fp16", "fp32", af.data,
                                                (ks % 2 * m_tiles + mt) * 8, bf.data, (ks % 2 * n_tiles + nt) * 4, acc.data,
                                                (mt * n_tiles + nt) * 4, False, dtype="float32"))
                            for mt in T.unroll(m_tiles):
                                for nt in T.unroll(n_tiles):
                                    for hh in T.unroll(2):
                                        row: T.let[T.int64] = bx * bm + a_row + mt * 16 + tx // 4 + 8 * hh
                                        col: T.let[T.int64] = by * bn + b_row + nt * 8 + tx % 4 * 2
                                        if row < m and col < N:
                                            for c in T.unroll(2):
                                                y[row, col + c] = T.Cast("float16", acc[(mt * n_tiles + nt) * 4 + hh * 2 + c])

    return prefill_matmul.with_attr("global_symbol", kernel_name(n_out, k))
