"""Decode linear layers (one token) on CUDA: ``y[N] = x[K] · W[N, K]ᵀ``, each weight byte read once.

A GEMV is bound by reading ``W``; what matters is how many bytes are in flight and how little else
a warp does. One warp per output row (eight a block); ``x`` staged once per block in shared memory
(float16); each lane reads 16 bytes of the row at a time, consecutive lanes consecutive 16-byte
pieces (a warp reads 512 contiguous bytes per load), ``GROUP`` loads issued before the first
multiply; float32 accumulators summed over the warp by shuffles. What it fuses, so that a layer
launches fewer kernels: SwiGLU as the prologue of the down projection (``x = silu(gate) * up``
computed from the gate/up GEMV's output while ``x`` is staged), RMSNorm as the prologue of the
QKV projection (each block sums the squares of the residual stream while it stages it — warp
shuffles, then shared memory across the warps — and stages the normalised input, computed as
TVM's ``rms_norm`` computes it; ``make_decode_gemv``) and the residual add as the epilogue of
``o_proj`` and ``down_proj``.

On the H200 (Llama-3-8B, ``profile.py``) it reads the weights as fast as dlight's GEMV rule did
(o 10.1 µs, QKV 14.1, down 30.0 a layer); a SwiGLU epilogue on the gate/up GEMV (a warp reading a
gate and an up row) was slower than dlight's gate/up (58.3 vs 55.0 µs), so gate/up stays dlight's.
The RMSNorm prologue replaces a 2.1 µs norm kernel a layer (``profile_decode_h200.json``); a
warp's first group of weight loads is issued before the norm, which then runs while they are in
flight. Launched back to back from Python on the H200 (QKV 6144×4096, eight weight copies in
turn), the fused GEMV took 15.7 µs a call, as the plain GEMV, against 18.9 µs for TVM's rms_norm
and the plain GEMV (16.5 µs before the early loads). Its effect on a decode step is not measured
yet, nor is gate/up through this GEMV with the post-attention norm fused (``models/llama.py``
``GATE_UP_NORM_GEMV``, off).
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


def kernel_name(n_out: int, k: int, fused: str) -> str:
    """The PrimFunc's name for one weight shape and what it fuses (a model holds one per pair)."""
    return f"decode_gemv_{fused}_{n_out}x{k}"


def make_decode_gemv(n_out: int, k: int, dtype: str, target: Target, epilogue: str = "none",
                     prologue: str = "none", eps: float = 1e-5) -> tirx.PrimFunc:
    """Args: x[1, k] float16 (``prologue="swiglu"``: x[1, 2k], the gate/up output, and the GEMV's
    input is ``silu(x[:k]) * x[k:]``, computed in float32 and rounded to float16; ``"rmsnorm"``:
    x is the residual stream and a second argument g[k] float16 the norm's weight, and the input
    is ``fp16(rsqrt(Σ f32(x)² / k + eps) * f32(x) * f32(g))`` — TVM's ``topi.nn.rms_norm``, which
    ``relax.op.nn.rms_norm`` legalizes to: cast to float32, square, sum, divide and multiply in
    float32, round to float16 once at the end), w[n_out, k] float16 (a Linear's weight, [out, in]),
    and for ``epilogue="residual"`` r[1, n_out] float16; output y[1, n_out] float16 =
    ``fp16(x·Wᵀ)`` (+ r, added in float16 as the unfused graph does). Accumulation in float32.
    Raises ValueError where ``supported`` is False, for an unknown prologue or epilogue, or for
    the rmsnorm prologue with the residual epilogue (no layer needs both).
    """
    if not supported(n_out, k, dtype, target):
        raise ValueError(f"decode GEMV needs CUDA, float16 and K % 256 == 0 (got {target.kind.name}, {dtype}, K {k})")
    if epilogue not in ("none", "residual") or prologue not in ("none", "swiglu", "rmsnorm") or (
            prologue, epilogue) == ("rmsnorm", "residual"):
        raise ValueError(f"decode GEMV prologue {prologue!r} / epilogue {epilogue!r}: use none, swiglu or rmsnorm / "
                         "none or residual (rmsnorm with none)")
    pieces = k // (32 * _PIECE)  # 16-byte pieces a lane reads per weight row
    groups = (pieces + GROUP - 1) // GROUP
    threads = 32 * WARPS
    x_items = (k // _PIECE + threads - 1) // threads
    N, K = i64(n_out), i64(k)
    X = i64(2 * k if prologue == "swiglu" else k)

    @T.macro
    def stage(xs, x, gu, xr, ss, it, e):
        # xs[e : e + 8] = the GEMV's input there (16-byte loads; gu: 16 elements of registers);
        # rmsnorm: left to ``normalise``, which needs the sum of squares of all of x first
        if prologue == "swiglu":
            for half in T.unroll(2):
                for v in T.vectorized(_PIECE):
                    gu[half * _PIECE + v] = x[0, half * K + e + v]
            for v in T.unroll(_PIECE):
                xs[e + v] = T.Cast("float16", T.Cast("float32", gu[v]) / (T.float32(1) + T.exp(
                    -T.Cast("float32", gu[v]))) * T.Cast("float32", gu[_PIECE + v]))
        elif prologue == "rmsnorm":  # x into registers (xr) only, its squares summed
            for v in T.vectorized(_PIECE):
                xr[it * _PIECE + v] = x[0, e + v]
            for v in T.unroll(_PIECE):
                ss[0] += T.Cast("float32", xr[it * _PIECE + v]) * T.Cast("float32", xr[it * _PIECE + v])
        else:
            for v in T.vectorized(_PIECE):
                xs[e + v] = x[0, e + v]

    @T.macro
    def normalise(xs, gamma, gu, xr, ss, red, ty, tx):
        # every thread: the block's sum of squares (warp butterfly, then the warps' sums in shared
        # memory, added in warp order), then its pieces of x (xr) normalised into xs
        for s in T.unroll(5):
            ss[0] = ss[0] + T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), ss[0], tx ^ (T.int64(16) >> s), 32, 32)
        if tx == 0:
            red[ty] = ss[0]
        T.tvm_storage_sync("shared")
        ss[0] = T.float32(0)
        for i in T.unroll(WARPS):
            ss[0] += red[i]
        ss[0] = T.rsqrt(ss[0] / T.float32(k) + T.float32(eps))
        for it in T.unroll(i64(x_items)):
            e: T.let[T.int64] = ((it * WARPS + ty) * 32 + tx) * _PIECE
            if e < K:
                for v in T.vectorized(_PIECE):
                    gu[v] = gamma[e + v]
                for v in T.unroll(_PIECE):
                    gu[_PIECE + v] = T.Cast("float16", ss[0] * T.Cast("float32", xr[it * _PIECE + v])
                                            * T.Cast("float32", gu[v]))
                for v in T.vectorized(_PIECE):
                    xs[e + v] = gu[_PIECE + v]

    @T.macro
    def load_group(wl, w, row, tx, g):
        for c in T.unroll(GROUP):  # every load of the group in flight first
            if g * GROUP + c < pieces:
                for v in T.vectorized(_PIECE):
                    wl[c * _PIECE + v] = w[row, ((g * GROUP + c) * 32 + tx) * _PIECE + v]

    @T.macro
    def body(x, gamma, w, r, y):
        for bx in T.thread_binding((N + WARPS - 1) // WARPS, thread="blockIdx.x"):
            for ty in T.thread_binding(i64(WARPS), thread="threadIdx.y"):
                for tx in T.thread_binding(i64(32), thread="threadIdx.x"):
                    with T.sblock("gemv"):
                        T.reads()
                        T.writes()
                        xs = T.sblock_alloc_buffer((K,), "float16", scope="shared")
                        red = T.sblock_alloc_buffer((WARPS,), "float32", scope="shared")
                        wl = T.sblock_alloc_buffer((GROUP * _PIECE,), "float16", scope="local")
                        xl = T.sblock_alloc_buffer((_PIECE,), "float16", scope="local")
                        acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        ss = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        gu = T.sblock_alloc_buffer((2 * _PIECE,), "float16", scope="local")
                        xr = T.sblock_alloc_buffer((x_items * _PIECE,), "float16", scope="local")
                        if prologue == "rmsnorm":  # the first weight loads overlap the norm
                            load_group(wl, w, T.min(bx * WARPS + ty, N - 1), tx, T.int64(0))
                            ss[0] = T.float32(0)
                        for it in T.unroll(i64(x_items)):
                            e: T.let[T.int64] = ((it * WARPS + ty) * 32 + tx) * _PIECE
                            if e < K:
                                stage(xs, x, gu, xr, ss, it, e)
                        if prologue == "rmsnorm":
                            normalise(xs, gamma, gu, xr, ss, red, ty, tx)
                        T.tvm_storage_sync("shared")
                        row: T.let[T.int64] = T.min(bx * WARPS + ty, N - 1)  # past the end: recompute the last
                        acc[0] = T.float32(0)
                        for g in T.serial(i64(groups)):
                            if prologue == "rmsnorm":
                                if g > 0:  # group 0 is in flight since before the norm
                                    load_group(wl, w, row, tx, g)
                            else:
                                load_group(wl, w, row, tx, g)
                            for c in T.unroll(GROUP):
                                if g * GROUP + c < pieces:
                                    for v in T.vectorized(_PIECE):
                                        xl[v] = xs[((g * GROUP + c) * 32 + tx) * _PIECE + v]
                                    for v in T.unroll(_PIECE):
                                        acc[0] += T.Cast("float32", wl[c * _PIECE + v]) * T.Cast("float32", xl[v])
                        for s in T.unroll(5):  # butterfly: every lane ends with the warp's sum
                            acc[0] = acc[0] + T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), acc[0], tx ^ (T.int64(16) >> s), 32, 32)
                        if tx == 0 and bx * WARPS + ty < N:
                            if epilogue == "residual":
                                y[0, row] = T.Cast("float16", acc[0]) + r[0, row]
                            else:
                                y[0, row] = T.Cast("float16", acc[0])

    name = kernel_name(n_out, k, f"{prologue}_{epilogue}")
    if epilogue == "residual":

        @T.prim_func(s_tir=True)
        def gemv_residual(x_h: T.handle, w_h: T.handle, r_h: T.handle, y_h: T.handle):
            T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
            x = T.match_buffer(x_h, (T.int64(1), X), "float16")
            w = T.match_buffer(w_h, (N, K), "float16")
            r = T.match_buffer(r_h, (T.int64(1), N), "float16")
            y = T.match_buffer(y_h, (T.int64(1), N), "float16")
            body(x, None, w, r, y)

        return gemv_residual.with_attr("global_symbol", name)
    if prologue == "rmsnorm":

        @T.prim_func(s_tir=True)
        def gemv_rmsnorm(x_h: T.handle, g_h: T.handle, w_h: T.handle, y_h: T.handle):
            T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
            x = T.match_buffer(x_h, (T.int64(1), X), "float16")
            gamma = T.match_buffer(g_h, (K,), "float16")
            w = T.match_buffer(w_h, (N, K), "float16")
            y = T.match_buffer(y_h, (T.int64(1), N), "float16")
            body(x, gamma, w, None, y)

        return gemv_rmsnorm.with_attr("global_symbol", name)

    @T.prim_func(s_tir=True)
    def gemv(x_h: T.handle, w_h: T.handle, y_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        x = T.match_buffer(x_h, (T.int64(1), X), "float16")
        w = T.match_buffer(w_h, (N, K), "float16")
        y = T.match_buffer(y_h, (T.int64(1), N), "float16")
        body(x, None, w, None, y)

    return gemv.with_attr("global_symbol", name)
