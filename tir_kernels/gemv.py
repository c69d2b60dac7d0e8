"""Decode linear layers (one token) on CUDA: ``y[N] = x[K] · W[N, K]ᵀ``, each weight byte read once.

A GEMV is bound by reading ``W``; what matters is how many bytes are in flight and how little else
a warp does. One warp per output row (eight a block); ``x`` staged once per block in shared memory
(float16); each lane reads 16 bytes of the row at a time, consecutive lanes consecutive 16-byte
pieces (a warp reads 512 contiguous bytes per load), ``GROUP`` loads issued before the first
multiply; float32 accumulators summed over the warp by shuffles. Epilogues fused so that a layer
launches fewer kernels: the residual add (``o_proj``, ``down_proj``) and, for the fused gate/up
weight, SwiGLU (``silu(x·gate_j) * (x·up_j)``: the MLP's activation, written as the down
projection's input).

Replaces dlight's GEMV rule where ``supported`` (Llama-3-8B's o / QKV / down projections measured
3.3–3.9 TB/s with it on the H200, gate/up 4.3; bench/device/matmul_speed.py).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .common import has_warp_shuffle, i64

WARPS = 8  # rows (warps) a block
GROUP = 8  # 16-byte loads a lane issues before it multiplies
_PIECE = 8  # float16 elements in 16 bytes


def supported(n_out: int, k: int, dtype: str, target: Target) -> bool:
    """True where the kernel runs: CUDA, float16, ``k`` a multiple of a warp's 512-byte read."""
    return target.kind.name == "cuda" and has_warp_shuffle(target) and dtype == "float16" and k % (32 * _PIECE) == 0


def kernel_name(n_out: int, k: int, epilogue: str) -> str:
    """The PrimFunc's name for one weight shape and epilogue (a model holds one per pair)."""
    return f"decode_gemv_{epilogue}_{n_out}x{k}"


def make_decode_gemv(n_out: int, k: int, dtype: str, target: Target, epilogue: str = "none") -> tirx.PrimFunc:
    """Args: x[1, k] float16, w[n_out, k] float16 (a Linear's weight, [out, in]), and for
    ``epilogue="residual"`` r[1, n_out] float16; output y[1, n_out] float16 = ``fp16(x·Wᵀ)``
    (+ r, added in float16 as the unfused graph does). ``epilogue="swiglu"``: ``w`` is the fused
    [gate; up] weight (``n_out`` even) and the output y[1, n_out / 2] float16 =
    ``silu(x·gate_j) * (x·up_j)`` in float32. Accumulation in float32.
    Raises ValueError where ``supported`` is False, for an unknown epilogue or an odd gate/up.
    """
    if not supported(n_out, k, dtype, target):
        raise ValueError(f"decode GEMV needs CUDA, float16 and K % 256 == 0 (got {target.kind.name}, {dtype}, K {k})")
    if epilogue not in ("none", "residual", "swiglu") or (epilogue == "swiglu" and n_out % 2):
        raise ValueError(f"decode GEMV epilogue {epilogue!r} with N {n_out}: use none, residual or swiglu (N even)")
    pairs = 2 if epilogue == "swiglu" else 1  # weight rows a warp reads: gate j and up j
    rows = n_out // pairs  # outputs
    pieces = k // (32 * _PIECE)  # 16-byte pieces a lane reads per weight row
    groups = (pieces + GROUP - 1) // GROUP
    threads = 32 * WARPS
    x_items = (k // _PIECE + threads - 1) // threads
    N, K, R = i64(n_out), i64(k), i64(rows)

    @T.macro
    def body(x, w, r, y):
        for bx in T.thread_binding((R + WARPS - 1) // WARPS, thread="blockIdx.x"):
            for ty in T.thread_binding(i64(WARPS), thread="threadIdx.y"):
                for tx in T.thread_binding(i64(32), thread="threadIdx.x"):
                    with T.sblock("gemv"):
                        T.reads()
                        T.writes()
                        xs = T.sblock_alloc_buffer((K,), "float16", scope="shared")
                        wl = T.sblock_alloc_buffer((pairs * GROUP * _PIECE,), "float16", scope="local")
                        xl = T.sblock_alloc_buffer((_PIECE,), "float16", scope="local")
                        acc = T.sblock_alloc_buffer((pairs,), "float32", scope="local")
                        for it in T.unroll(i64(x_items)):
                            e: T.let[T.int64] = ((it * WARPS + ty) * 32 + tx) * _PIECE
                            if e < K:
                                for v in T.vectorized(_PIECE):
                                    xs[e + v] = x[0, e + v]
                        T.tvm_storage_sync("shared")
                        row: T.let[T.int64] = T.min(bx * WARPS + ty, R - 1)  # past the end: recompute the last
                        for p in T.unroll(pairs):
                            acc[p] = T.float32(0)
                        for g in T.serial(i64(groups)):
                            for p in T.unroll(pairs):  # every load of the group in flight first
                                for c in T.unroll(GROUP):
                                    if g * GROUP + c < pieces:
                                        for v in T.vectorized(_PIECE):
                                            wl[(p * GROUP + c) * _PIECE + v] = w[
                                                row + p * R, ((g * GROUP + c) * 32 + tx) * _PIECE + v]
                            for c in T.unroll(GROUP):
                                if g * GROUP + c < pieces:
                                    for v in T.vectorized(_PIECE):
                                        xl[v] = xs[((g * GROUP + c) * 32 + tx) * _PIECE + v]
                                    for p in T.unroll(pairs):
                                        for v in T.unroll(_PIECE):
                                            acc[p] += T.Cast("float32", wl[(p * GROUP + c) * _PIECE + v]) * T.Cast(
                                                "float32", xl[v])
                        for p in T.unroll(pairs):  # butterfly: every lane ends with the warp's sum
                            for s in T.unroll(5):
                                acc[p] = acc[p] + T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), acc[p],
                                                                     tx ^ (T.int64(16) >> s), 32, 32)
                        if tx == 0 and bx * WARPS + ty < R:
                            if epilogue == "swiglu":
                                y[0, row] = T.Cast("float16", acc[0] / (T.float32(1) + T.exp(-acc[0])) * acc[1])
                            elif epilogue == "residual":
                                y[0, row] = T.Cast("float16", acc[0]) + r[0, row]
                            else:
                                y[0, row] = T.Cast("float16", acc[0])

    if epilogue == "residual":

        @T.prim_func(s_tir=True)
        def gemv_residual(x_h: T.handle, w_h: T.handle, r_h: T.handle, y_h: T.handle):
            T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
            x = T.match_buffer(x_h, (T.int64(1), K), "float16")
            w = T.match_buffer(w_h, (N, K), "float16")
            r = T.match_buffer(r_h, (T.int64(1), R), "float16")
            y = T.match_buffer(y_h, (T.int64(1), R), "float16")
            body(x, w, r, y)

        return gemv_residual.with_attr("global_symbol", kernel_name(n_out, k, epilogue))

    @T.prim_func(s_tir=True)
    def gemv(x_h: T.handle, w_h: T.handle, y_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        x = T.match_buffer(x_h, (T.int64(1), K), "float16")
        w = T.match_buffer(w_h, (N, K), "float16")
        y = T.match_buffer(y_h, (T.int64(1), R), "float16")
        body(x, w, None, y)

    return gemv.with_attr("global_symbol", kernel_name(n_out, k, epilogue))
