"""Prefill linear layers on Hopper tensor cores: ``y[m, N] = x[m, K] · W[N, K]ᵀ`` with ``wgmma``
(CUDA sm_90a, float16 operands, float32 accumulators).

``mma.sync`` (``matmul.py``) tops out near half of an H100/H200's float16 rate: each warp feeds its
tensor core from registers that ``ldmatrix`` filled. Hopper's ``wgmma.mma_async`` reads both
operands straight from shared memory through 64-bit matrix descriptors, and a warpgroup (4 warps)
multiplies a 64-row tile at once while the issuing threads go on. One block here:

- computes a ``128 x bn`` tile of ``y`` (``bn`` 128 or 256: ``tiles_for``) with two warpgroups of 64
  rows, each issuing ``wgmma.m64n<bn>k16`` (``bn / 2`` float32 accumulators a thread) four times
  per 64-wide k-step;
- keeps ``stages`` k-steps of ``x`` and ``W`` in dynamic shared memory, laid out as wgmma's 128-byte
  swizzle expects (a 64-element row is 128 bytes; 16-byte chunk ``c`` of row ``r`` sits at chunk
  ``c ^ (r % 8)``: ``matmul.swizzled``, the same layout the ``mma.sync`` kernel uses, which also
  keeps the copies free of bank conflicts); the descriptors name 8-row groups 1024 bytes apart;
- copies with ``cp.async`` ``stages - 2`` k-steps ahead of the one multiplied, and lets one
  k-step's wgmmas run while the next is issued (``wgmma.wait_group 1``), so the stage a copy
  overwrites was read by wgmmas already waited for;
- ``cp.async`` writes through the generic proxy and wgmma reads through the async proxy: each
  thread fences (``fence.proxy.async.shared::cta``) its landed copies before the block barrier.

Rows past ``m`` or ``N`` copy the last valid row and are never stored; ``N`` a multiple of 8 and
``K`` of 64. Layout and synchronisation follow the PTX ISA's wgmma sections (9.7.15) and the
structure of CUTLASS's sm90 "multistage" GEMM (cp.async-fed wgmma, no TMA).
"""

from __future__ import annotations

import dataclasses

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .common import i64
from .matmul import tile_copies

BM, BK = 128, 64  # rows of a block tile (a warpgroup's 64 each), k-step (a 128-byte swizzled row)
_THREADS = 128 * (BM // 64)
_SBO = 1024  # bytes between 8-row groups of a 128-byte-swizzled tile


@dataclasses.dataclass(frozen=True)
class WgmmaTiles:
    """``bn`` columns of a block tile (the wgmma's N: 64 to 256) and ``stages`` k-steps in shared memory."""

    bn: int = 128
    stages: int = 4


def tiles_for(n_out: int) -> WgmmaTiles:
    """Measured on the H200 (Llama-3-8B linears, 512 rows, ``bench/device/matmul_speed.py``): 256-wide
    tiles (4 stages) for N >= 6144 — fused QKV 429 vs 351 TFLOP/s, gate/up 498 vs 477 — and 128-wide
    (5 stages) below, where 256 leaves too few blocks for 132 SMs (o 456 vs 315, down 548 vs 392)."""
    return WgmmaTiles(bn=256, stages=4) if n_out >= 6144 else WgmmaTiles(bn=128, stages=5)


def supported(n_out: int, k: int, dtype: str, target: Target) -> bool:
    """True where the kernel runs: CUDA sm_90a (wgmma), float16, ``n_out % 8 == 0``, ``k % 64 == 0``."""
    return (target.kind.name == "cuda" and str(target.attrs.get("arch", "")) == "sm_90a" and dtype == "float16"
            and n_out % 8 == 0 and k % BK == 0)


def smem_descriptor(addr: tirx.PrimExpr, lbo: int = 16, sbo: int = _SBO) -> tirx.PrimExpr:
    """wgmma matrix descriptor (PTX ISA 9.7.15.5.1) of a 128-byte-swizzled tile at shared address
    ``addr`` (uint32, 1024-byte aligned): start address, leading and stride byte offsets in
    16-byte units, layout type 1 (128-byte swizzle) in bits 62-63. A tile is rows of 64 float16
    (128 bytes) in 8-row atoms ``sbo`` bytes apart; ``lbo`` (ignored for K-major operands) is the
    distance between 64-wide atoms along M/N of an MN-major operand. Advancing the start address
    by 32 bytes steps 16 elements along a K-major row."""
    start = T.Cast("uint64", (addr & T.uint32(0x3FFFF)) >> T.uint32(4))
    return (start | (T.uint64(lbo >> 4) << T.uint64(16)) | (T.uint64(sbo >> 4) << T.uint64(32))
            | (T.uint64(1) << T.uint64(62)))


def wgmma(n: int, acc, count: int, a, b_desc: tirx.PrimExpr, trans_b: int = 0) -> tirx.PrimExpr:
    """One ``wgmma.mma_async.m64n<n>k16`` (float16 in, float32 accumulators ``acc[0:count]``
    updated in place): A from shared memory (``a`` a descriptor) or registers (``a = (regs,
    offset)``: ``regs[offset:offset + 4]`` uint32 of packed float16 pairs, the accumulator
    layout's); B by ``b_desc``, K-major or, with ``trans_b``, MN-major."""
    shape = getattr(T.ptx.wgmma.mma_async.sync.aligned, f"m64n{n}k16").f32.f16.f16
    accs = [acc[i] for i in range(count)]
    if isinstance(a, tuple):
        regs, offset = a
        return shape(*accs, *[regs[offset + i] for i in range(4)], b_desc, T.ptx.pred(True), 1, 1, trans_b)
    return shape(*accs, a, b_desc, T.ptx.pred(True), 1, 1, 0, trans_b)


def make_prefill_matmul_wgmma(n_out: int, k: int, dtype: str, target: Target,
                              tiles: WgmmaTiles | None = None) -> tirx.PrimFunc:
    """Args: x[m, k] float16, w[n_out, k] float16 (a Linear's weight, [out, in]); output
    y[m, n_out] float16, accumulated in float32. ``tiles``: ``tiles_for(n_out)`` by default.
    Raises ValueError where ``supported`` is False or ``tiles.bn`` is not 64-256 in steps of 64."""
    if not supported(n_out, k, dtype, target):
        raise ValueError(f"wgmma matmul needs CUDA sm_90a, float16, N % 8 == 0 and K % {BK} == 0 "
                         f"(got {target.kind.name} {target.attrs.get('arch', '')}, {dtype}, N {n_out}, K {k})")
    tiles = tiles or tiles_for(n_out)
    if tiles.bn not in (64, 128, 192, 256) or tiles.stages < 3:
        raise ValueError(f"wgmma tiles {tiles}: bn must be 64, 128, 192 or 256 and stages >= 3")
    BN, STAGES = tiles.bn, tiles.stages
    acc_regs = BN // 2  # float32 accumulators a thread: 64 x BN over 128 threads
    steps, ahead = k // BK, STAGES - 2
    N, K = i64(n_out), i64(k)

    copy_step = tile_copies(BM, BN, BK, STAGES, _THREADS, n_out, k)

    @T.prim_func(s_tir=True)
    def prefill_matmul(x_h: T.handle, w_h: T.handle, y_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, K), "float16")
        w = T.match_buffer(w_h, (N, K), "float16")
        y = T.match_buffer(y_h, (m, N), "float16")
        for bx in T.thread_binding((m + BM - 1) // BM, thread="blockIdx.x"):
            for by in T.thread_binding((N + BN - 1) // BN, thread="blockIdx.y"):
                for tid in T.thread_binding(T.int64(_THREADS), thread="threadIdx.x"):
                    with T.sblock("gemm"):
                        T.reads()
                        T.writes()
                        a_sh = T.sblock_alloc_buffer((STAGES * BM * BK,), "float16", scope="shared.dyn")
                        b_sh = T.sblock_alloc_buffer((STAGES * BN * BK,), "float16", scope="shared.dyn")
                        acc = T.sblock_alloc_buffer((acc_regs,), "float32", scope="local")
                        a_base = T.sblock_alloc_buffer((1,), "uint64", scope="local")
                        b_base = T.sblock_alloc_buffer((1,), "uint64", scope="local")
                        wg: T.let[T.int64] = tid // 128
                        a_base[0] = smem_descriptor(T.cuda.cvta_generic_to_shared(a_sh.access_ptr("r", offset=wg * 64 * BK)))
                        b_base[0] = smem_descriptor(T.cuda.cvta_generic_to_shared(b_sh.access_ptr("r")))
                        for e in T.unroll(acc_regs):
                            acc[e] = T.float32(0)
                        for t in T.unroll(ahead):
                            if t < steps:
                                copy_step(x, w, a_sh, b_sh, m, bx * BM, by * BN, t, tid)
                            T.evaluate(T.ptx.cp.async_.commit_group())
                        for t in T.serial(steps):
                            T.evaluate(T.ptx.cp.async_.wait_group(ahead - 1))  # step t landed (own copies)
                            T.evaluate(T.ptx.fence.proxy.async_.shared__cta())
                            T.tvm_storage_sync("shared")  # everyone's; step t - 2's wgmmas were waited for
                            if t + ahead < steps:
                                copy_step(x, w, a_sh, b_sh, m, bx * BM, by * BN, t + ahead, tid)
                            T.evaluate(T.ptx.cp.async_.commit_group())
                            T.evaluate(T.ptx.wgmma.fence.sync.aligned())
                            for ks in T.unroll(BK // 16):  # 32 bytes of each row per 16-wide k-slice
                                T.evaluate(wgmma(BN, acc, acc_regs, a_base[0] + T.Cast("uint64", (t % STAGES * BM * BK * 2 + ks * 32) >> 4),
                                                 b_base[0] + T.Cast("uint64", (t % STAGES * BN * BK * 2 + ks * 32) >> 4)))
                            T.evaluate(T.ptx.wgmma.commit_group.sync.aligned())
                            T.evaluate(T.ptx.wgmma.wait_group.sync.aligned(1))
                        T.evaluate(T.ptx.wgmma.wait_group.sync.aligned(0))
                        for j in T.unroll(BN // 8):
                            for hh in T.unroll(2):
                                row: T.let[T.int64] = bx * BM + wg * 64 + tid % 128 // 32 * 16 + tid % 32 // 4 + 8 * hh
                                col: T.let[T.int64] = by * BN + j * 8 + tid % 4 * 2
                                if row < m and col < N:
                                    for c in T.unroll(2):
                                        y[row, col + c] = T.Cast("float16", acc[j * 4 + hh * 2 + c])

    return prefill_matmul.with_attr("global_symbol", f"prefill_matmul_wgmma_{n_out}x{k}")
