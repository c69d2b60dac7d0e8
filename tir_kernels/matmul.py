"""Prefill linear layers on tensor cores: ``y[m, N] = x[m, K] · W[N, K]ᵀ`` (CUDA sm_80+, float16).

One block of 8 warps computes a ``BM x BN`` tile of ``y`` (each warp 64 x 32) with
``mma.sync.m16n8k16`` (float16 operands, float32 accumulators), walking ``K`` in steps of ``BK``:

- both operands are K-contiguous, so ``x`` is the row-major A and ``W`` the column-major B of the
  instruction, and ``ldmatrix`` (no transpose) loads both from shared memory; a row's four 16-byte
  chunks are stored XOR-swizzled by the row (``swizzled``), so neither the copies nor ``ldmatrix``
  meet bank conflicts and three k-steps fit the 48 KB of static shared memory;
- ``STAGES`` k-steps are in flight: ``cp.async`` copies step ``t + STAGES - 1`` from global to
  shared memory while the tensor cores work on step ``t``: one barrier a step, no registers for
  staging;
- the grid runs the ``m`` tiles of one weight tile side by side (``blockIdx.x``), so each weight
  byte comes from DRAM about once per prefill chunk; ``m`` is any size (rows past ``m`` or ``N``
  copy the last valid row and are never stored), ``N`` a multiple of 8, ``K`` of ``BK``.

Decode (``m = 1``) keeps the GEMV schedule; this kernel serves prefill chunks.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .common import i64

BM, BN, BK = 128, 128, 32
WARPS_M, WARPS_N = 2, 4  # warp grid of a block: each warp owns (BM / 2) x (BN / 4)
STAGES = 3  # k-steps in flight


def swizzled(row: "tirx.PrimExpr", chunk: "tirx.PrimExpr") -> "tirx.PrimExpr":
    """Element offset of 16-byte ``chunk`` (0..3) of ``row`` in a ``BK``-wide shared tile: the chunk
    index XOR ``(row >> 1) & 3``, so the 8 rows an ``ldmatrix`` phase reads hit 8 different 16-byte
    bank groups."""
    return row * BK + ((chunk ^ ((row >> 1) & 3)) * 8)


def supported(n_out: int, k: int, dtype: str, target: Target) -> bool:
    """True where the kernel runs: CUDA sm_80+, float16, ``n_out % 8 == 0`` and ``k % BK == 0``."""
    if target.kind.name != "cuda" or dtype != "float16" or n_out % 8 or k % BK:
        return False
    arch = str(target.attrs.get("arch", "sm_0"))
    return int("".join(ch for ch in arch if ch.isdigit()) or 0) >= 80


def make_prefill_matmul(n_out: int, k: int, dtype: str, target: Target, warps_n: int = WARPS_N,
                        stages: int = STAGES) -> tirx.PrimFunc:
    """Args: x[m, k] float16, w[n_out, k] float16 (a Linear's weight, [out, in]); output
    y[m, n_out] float16, accumulated in float32. ``warps_n`` (warps along N; ``WARPS_M`` along M)
    and ``stages`` shape the block. Raises ValueError where ``supported`` is False."""
    if not supported(n_out, k, dtype, target):
        raise ValueError(f"tensor-core matmul needs CUDA sm_80+, float16, N % 8 == 0 and K % {BK} == 0 "
                         f"(got {target.kind.name}, {dtype}, N {n_out}, K {k})")
    threads = 32 * WARPS_M * warps_n
    warp_m, warp_n = BM // WARPS_M, BN // warps_n
    m_tiles, n_tiles = warp_m // 16, warp_n // 8  # mma tiles per warp
    vecs = BK // 8  # 16-byte vectors per row of a k-step
    a_items, b_items = BM * vecs // threads, BN * vecs // threads
    steps = k // BK
    N, K = i64(n_out), i64(k)

    @T.macro
    def copy_step(x, w, a_sh, b_sh, m, m0, n0, t, tid):
        """Issue the cp.async copies of k-step ``t``'s x and W tiles into stage ``t % stages``."""
        for it in T.unroll(a_items):
            T.evaluate(T.s_tir.cp_async_raw.legacy(
                a_sh.data, t % stages * BM * BK + swizzled((it * threads + tid) // vecs, (it * threads + tid) % vecs),
                x.data,
                T.min(m0 + (it * threads + tid) // vecs, m - 1) * K + t * BK + (it * threads + tid) % vecs * 8,
                16, dtype="float16"))
        for it in T.unroll(b_items):
            T.evaluate(T.s_tir.cp_async_raw.legacy(
                b_sh.data, t % stages * BN * BK + swizzled((it * threads + tid) // vecs, (it * threads + tid) % vecs),
                w.data,
                T.min(n0 + (it * threads + tid) // vecs, N - 1) * K + t * BK + (it * threads + tid) % vecs * 8,
                16, dtype="float16"))

    @T.prim_func(s_tir=True)
    def prefill_matmul(x_h: T.handle, w_h: T.handle, y_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, K), "float16")
        w = T.match_buffer(w_h, (N, K), "float16")
        y = T.match_buffer(y_h, (m, N), "float16")
        for bx in T.thread_binding((m + BM - 1) // BM, thread="blockIdx.x"):
            for by in T.thread_binding((N + BN - 1) // BN, thread="blockIdx.y"):
                for ty in T.thread_binding(T.int64(WARPS_M * warps_n), thread="threadIdx.y"):
                    for tx in T.thread_binding(T.int64(32), thread="threadIdx.x"):
                        with T.sblock("gemm"):
                            T.reads()
                            T.writes()
                            a_sh = T.sblock_alloc_buffer((stages * BM * BK,), "float16", scope="shared")
                            b_sh = T.sblock_alloc_buffer((stages * BN * BK,), "float16", scope="shared")
                            af = T.sblock_alloc_buffer((m_tiles * 8,), "float16", scope="local")
                            bf = T.sblock_alloc_buffer((n_tiles * 4,), "float16", scope="local")
                            acc = T.sblock_alloc_buffer((m_tiles * n_tiles * 4,), "float32", scope="local")
                            tid: T.let[T.int64] = ty * 32 + tx
                            a_row: T.let[T.int64] = ty // warps_n * warp_m  # the warp's first row and column
                            b_row: T.let[T.int64] = ty % warps_n * warp_n
                            for e in T.unroll(m_tiles * n_tiles * 4):
                                acc[e] = T.float32(0)
                            for t in T.unroll(stages - 1):
                                if t < steps:
                                    copy_step(x, w, a_sh, b_sh, m, bx * BM, by * BN, t, tid)
                                T.evaluate(T.ptx.cp.async_.commit_group())
                            for t in T.serial(steps):
                                T.evaluate(T.ptx.cp.async_.wait_group(stages - 2))  # step t landed (own copies)
                                T.tvm_storage_sync("shared")  # everyone's; and stage (t - 1) % stages is free
                                if t + stages - 1 < steps:
                                    copy_step(x, w, a_sh, b_sh, m, bx * BM, by * BN, t + stages - 1, tid)
                                T.evaluate(T.ptx.cp.async_.commit_group())
                                for ks in T.unroll(BK // 16):
                                    for mt in T.unroll(m_tiles):
                                        T.evaluate(T.ptx_legacy.ldmatrix(
                                            False, 4, ".b16", af.data, mt * 8, a_sh.data,
                                            t % stages * BM * BK + swizzled(a_row + mt * 16 + (tx // 8) % 2 * 8 + tx % 8,
                                                                            ks * 2 + tx // 16), dtype="float16"))
                                    for nb in T.unroll(n_tiles // 2):
                                        T.evaluate(T.ptx_legacy.ldmatrix(
                                            False, 4, ".b16", bf.data, nb * 8, b_sh.data,
                                            t % stages * BN * BK + swizzled(b_row + (2 * nb + tx // 16) * 8 + tx % 8,
                                                                            ks * 2 + (tx // 8) % 2), dtype="float16"))
                                    for mt in T.unroll(m_tiles):
                                        for nt in T.unroll(n_tiles):
                                            T.evaluate(T.ptx_legacy.mma(
                                                "m16n8k16", "row", "col", "fp16", "fp16", "fp32", af.data, mt * 8,
                                                bf.data, nt * 4, acc.data, (mt * n_tiles + nt) * 4, False,
                                                dtype="float32"))
                            for mt in T.unroll(m_tiles):
                                for nt in T.unroll(n_tiles):
                                    for hh in T.unroll(2):
                                        row: T.let[T.int64] = bx * BM + a_row + mt * 16 + tx // 4 + 8 * hh
                                        col: T.let[T.int64] = by * BN + b_row + nt * 8 + tx % 4 * 2
                                        if row < m and col < N:
                                            for c in T.unroll(2):
                                                y[row, col + c] = T.Cast("float16", acc[(mt * n_tiles + nt) * 4 + hh * 2 + c])

    return prefill_matmul.with_attr("global_symbol", kernel_name(n_out, k))


def kernel_name(n_out: int, k: int) -> str:
    """The PrimFunc's name for one weight shape (a model holds one kernel per shape)."""
    return f"prefill_matmul_{n_out}x{k}"
