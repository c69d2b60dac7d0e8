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
gate and an up row) was slower than dlight's gate/up (58.3 vs 55.0 µs); gate/up runs this GEMV with
the post-attention RMSNorm as its prologue instead (``models/llama.py`` ``GATE_UP_NORM_GEMV``).
The RMSNorm prologue replaces a 2.1 µs norm kernel a layer (``profile_decode_h200.json``); a
warp's first group of weight loads is issued before the norm, which then runs while they are in
flight. Launched back to back from Python on the H200 (QKV 6144×4096, eight weight copies in
turn), the fused GEMV took 15.7 µs a call, as the plain GEMV, against 18.9 µs for TVM's rms_norm
and the plain GEMV (16.5 µs before the early loads). With both norms in GEMV prologues, Llama-3-8B
dense decode took 4.31 / 4.54 ms at depth 0 / 4K against 4.39 / 4.66 with the post-attention norm
a kernel and gate/up on dlight's GEMV (three alternating runs, ``gate_up_gemv_ab_h200.json``).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .common import has_warp_shuffle, i64

WARPS = 8  # rows (warps) a block
GROUP = 8  # 16-byte loads a lane issues before it multiplies
_PIECE = 8  # float16 elements in 16 bytes
Q_GROUP = 32  # quantized weights a scale (models/quantization.py): q4 one 16-byte load, q8 two


def supported(n_out: int, k: int, dtype: str, target: Target, bits: int = 16, offset: int = 7,
              has_min: bool = False) -> bool:
    """True where the kernel runs: CUDA, float16, and ``k`` a multiple of a warp's 512-byte read
    (float16 weights, ``bits`` 16) or of the 32-weight quantization group (``bits`` 4 or 8; a min
    with 4 bits only)."""
    step = 32 * _PIECE if bits == 16 else Q_GROUP
    return (target.kind.name == "cuda" and has_warp_shuffle(target) and dtype == "float16" and bits in (4, 8, 16)
            and k % step == 0 and (bits == 4 or not has_min))


def kernel_name(n_out: int, k: int, fused: str, bits: int = 16, offset: int = 7, has_min: bool = False) -> str:
    """The PrimFunc's name for one weight shape, format and what it fuses (a model holds one per
    triple): ``q4_`` (offset 7: q4f16), ``q4o8_`` (q4_0), ``q4o0m_`` (q4_1), ``q8_``, or none for float16."""
    fmt = "" if bits == 16 else f"q{bits}" + (f"o{offset}" if bits == 4 and offset != 7 else "") + ("m" if has_min else "") + "_"
    return f"decode_gemv_{fmt}{fused}_{n_out}x{k}"


def make_decode_gemv(n_out: int, k: int, dtype: str, target: Target, epilogue: str = "none",
                     prologue: str = "none", eps: float = 1e-5, bits: int = 16, offset: int = 7,
                     has_min: bool = False) -> tirx.PrimFunc:
    """Args: x[1, k] float16 (``prologue="swiglu"``: x[1, 2k], the gate/up output, and the GEMV's
    input is ``silu(x[:k]) * x[k:]``, computed in float32 and rounded to float16; ``"rmsnorm"``:
    x is the residual stream and a second argument g[k] float16 the norm's weight, and the input
    is ``fp16(rsqrt(Σ f32(x)² / k + eps) * f32(x) * f32(g))`` — TVM's ``topi.nn.rms_norm``, which
    ``relax.op.nn.rms_norm`` legalizes to: cast to float32, square, sum, divide and multiply in
    float32, round to float16 once at the end), w[n_out, k] float16 (a Linear's weight, [out, in]),
    and for ``epilogue="residual"`` r[1, n_out] float16; output y[1, n_out] float16 =
    ``fp16(x·Wᵀ)`` (+ r, added in float16 as the unfused graph does). Accumulation in float32.

    ``bits=4``: ``w`` is q4f16 (``models/quantization.py``): qweight[n_out, k/8] uint32 (weight
    ``8i + j`` of a row in nibble ``j`` of word ``i``, stored as code + 7) and scale[n_out, k/32]
    float16 take its place. As llama.cpp's CUDA GEMV does (``mmvq``), the block quantizes its
    input to int8 once, per group of 32 (``xq = round(x · 127 / max|x|)``, its scale and the sum
    of the group's ``xq`` kept in shared memory), and a lane's 16-byte load (one group of 32
    weights) is 8 ``__dp4a`` of nibbles against ``xq``: ``y += s_w · (s_x · Σ nibble·xq − offset s_x Σ xq)``
    (the nibble stores the code + ``offset``: 7 for q4f16, 8 for GGML's Q4_0, 0 for Q4_1). ``has_min``
    (Q4_1, ``w = nibble · s_w + m_w``): min[n_out, k/32] float16 follows the scale and ``y += m_w s_x Σ xq``.
    ``bits=8`` (q8f16): qweight[n_out, k] int8 and the same scales; a 16-byte load is half a group,
    4 ``__dp4a`` of the codes against ``xq``: ``y += s_w · s_x · Σ code·xq``.
    Raises ValueError where ``supported`` is False, for an unknown prologue or epilogue, or for
    the rmsnorm prologue with the residual epilogue (no layer needs both).
    """
    if not supported(n_out, k, dtype, target, bits, offset, has_min):
        raise ValueError(f"decode GEMV needs CUDA, float16 and K % {256 if bits == 16 else Q_GROUP} == 0 (got "
                         f"{target.kind.name}, {dtype}, {bits}-bit weights, K {k})")
    if epilogue not in ("none", "residual") or prologue not in ("none", "swiglu", "rmsnorm") or (
            prologue, epilogue) == ("rmsnorm", "residual"):
        raise ValueError(f"decode GEMV prologue {prologue!r} / epilogue {epilogue!r}: use none, swiglu or rmsnorm / "
                         "none or residual (rmsnorm with none)")
    quant, q4 = bits < 16, bits == 4
    # 16-byte pieces of a weight row (q4: a quantization group, q8: half one), a lane's every 32nd;
    # a lane's registers for GROUP of them
    pieces = k * bits // 128
    groups = ((pieces + 31) // 32 + GROUP - 1) // GROUP  # of GROUP loads a lane
    w_local = {4: ("uint32", 4), 8: ("int8", 16), 16: ("float16", _PIECE)}[bits]
    per_group = Q_GROUP * bits // 128  # pieces a quantization group
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
    def load_group(wl, sl, ml, w, ws, wm, row, tx, g):
        for c in T.unroll(GROUP):  # every load of the group in flight first
            pc: T.let[T.int64] = (g * GROUP + c) * 32 + tx
            if pc < pieces:
                for v in T.vectorized(w_local[1]):
                    wl[c * w_local[1] + v] = w[row, pc * w_local[1] + v]
                if quant:
                    sl[c] = ws[row, pc // per_group]
                if has_min:
                    ml[c] = wm[row, pc // per_group]

    def xq_slot(chunk):
        """Where the int8 input of 8-weight chunk ``chunk`` starts in ``xq`` (two int32 words). q8:
        in order. q4: even weights, then odd, chunk j of group p at word 8p + 2 (j ^ (p / 4 % 4)), so
        the 8-byte reads of a warp's lanes (consecutive groups) fall in distinct banks."""
        if not q4:
            return chunk * 2
        return chunk // 4 * 8 + (chunk % 4 ^ (chunk // 16 % 4)) * 2

    def pack(half: int, byte: int) -> int:
        """Which of a chunk's 8 inputs is byte ``byte`` of its word ``half`` in ``xq``."""
        return half + 2 * byte if q4 else 4 * half + byte

    @T.macro
    def quantize_input(xs, xq, xsc, xcor, xl, qv, red, ty, tx):
        # xq, xsc, xcor from xs: each lane 8 inputs, 4 lanes a group of 32 (max and sum by shuffles)
        for it in T.unroll(i64(x_items)):
            e: T.let[T.int64] = T.min(((it * WARPS + ty) * 32 + tx) * _PIECE, K - _PIECE)  # all lanes shuffle
            for v in T.vectorized(_PIECE):
                xl[v] = xs[e + v]
            red[0] = T.float32(0)
            for v in T.unroll(_PIECE):
                red[0] = T.max(red[0], T.abs(T.Cast("float32", xl[v])))
            for sh in T.unroll(2):
                red[0] = T.max(red[0], T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), red[0], tx ^ (T.int64(1) << sh), 32, 32))
            red[1] = T.if_then_else(red[0] > T.float32(0), T.float32(127) / red[0], T.float32(0))
            red[2] = T.float32(0)
            for v in T.unroll(_PIECE):
                qv[v] = T.Cast("int32", T.round(T.Cast("float32", xl[v]) * red[1]))
                red[2] = red[2] + T.Cast("float32", qv[v])
            for sh in T.unroll(2):
                red[2] = red[2] + T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), red[2], tx ^ (T.int64(1) << sh), 32, 32)
            if ((it * WARPS + ty) * 32 + tx) * _PIECE < K:
                for half in T.unroll(2):  # q4: (0, 2, 4, 6), (1, 3, 5, 7); q8: (0, 1, 2, 3), (4, 5, 6, 7)
                    xq[xq_slot(e // _PIECE) + half] = (
                        (T.Cast("uint32", qv[pack(half, 0)]) & T.uint32(255))
                        | (T.Cast("uint32", qv[pack(half, 1)]) & T.uint32(255)) << T.uint32(8)
                        | (T.Cast("uint32", qv[pack(half, 2)]) & T.uint32(255)) << T.uint32(16)
                        | T.Cast("uint32", qv[pack(half, 3)]) << T.uint32(24))
                if tx % 4 == 0:
                    xsc[e // Q_GROUP] = red[0] / T.float32(127)
                    if q4:  # the group's input sum (times the codes' offset, or the min)
                        xcor[e // Q_GROUP] = red[0] / T.float32(127) * red[2]

    @T.macro
    def dot_piece(acc, wl, sl, ml, xs, xl, xw, xq, xsc, xcor, dots, c, pc):
        # acc[0] += piece pc of the row (in registers at c) times the input
        if bits == 8:
            for v in T.vectorized(4):  # the piece's 16 inputs: one 16-byte read
                xw[v] = xq[pc * 4 + v]
            dots[0] = 0
            for j in T.unroll(4):
                dots[0] = T.call_pure_extern("int32", "__dp4a", T.reinterpret("int32", wl.vload([c * 16 + 4 * j], "int8x4")),
                                             T.reinterpret("int32", xw[j]), dots[0])
            acc[0] += T.Cast("float32", sl[c]) * xsc[pc // per_group] * T.Cast("float32", dots[0])
        elif q4:
            dots[0] = 0
            for j in T.unroll(4):
                for half in T.unroll(2):
                    dots[0] = T.call_pure_extern(
                        "int32", "__dp4a", T.reinterpret("int32", wl[c * 4 + j] >> T.uint32(4 * half) & T.uint32(0x0F0F0F0F)),
                        T.reinterpret("int32", xq[xq_slot(pc * 4 + j) + half]), dots[0])
            if offset != 0:
                acc[0] += T.Cast("float32", sl[c]) * (xsc[pc] * T.Cast("float32", dots[0]) - T.float32(offset) * xcor[pc])
            else:
                acc[0] += T.Cast("float32", sl[c]) * xsc[pc] * T.Cast("float32", dots[0])
            if has_min:
                acc[0] += T.Cast("float32", ml[c]) * xcor[pc]
        else:
            for v in T.vectorized(_PIECE):
                xl[v] = xs[pc * _PIECE + v]
            for v in T.unroll(_PIECE):
                acc[0] += T.Cast("float32", wl[c * _PIECE + v]) * T.Cast("float32", xl[v])

    @T.macro
    def body(x, gamma, w, ws, wm, r, y):
        for bx in T.thread_binding((N + WARPS - 1) // WARPS, thread="blockIdx.x"):
            for ty in T.thread_binding(i64(WARPS), thread="threadIdx.y"):
                for tx in T.thread_binding(i64(32), thread="threadIdx.x"):
                    with T.sblock("gemv"):
                        T.reads()
                        T.writes()
                        xs = T.sblock_alloc_buffer((K,), "float16", scope="shared")
                        xq = T.sblock_alloc_buffer((K // 4 if quant else 1,), "uint32", scope="shared")
                        xsc = T.sblock_alloc_buffer((K // Q_GROUP if quant else 1,), "float32", scope="shared")
                        xcor = T.sblock_alloc_buffer((K // Q_GROUP if q4 else 1,), "float32", scope="shared")
                        red = T.sblock_alloc_buffer((WARPS,), "float32", scope="shared")
                        wl = T.sblock_alloc_buffer((GROUP * w_local[1],), w_local[0], scope="local")
                        xw = T.sblock_alloc_buffer((4,), "uint32", scope="local")
                        sl = T.sblock_alloc_buffer((GROUP,), "float16", scope="local")
                        ml = T.sblock_alloc_buffer((GROUP,), "float16", scope="local")
                        xl = T.sblock_alloc_buffer((_PIECE,), "float16", scope="local")
                        qv = T.sblock_alloc_buffer((_PIECE,), "int32", scope="local")
                        lred = T.sblock_alloc_buffer((3,), "float32", scope="local")
                        dots = T.sblock_alloc_buffer((1,), "int32", scope="local")
                        acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        ss = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        gu = T.sblock_alloc_buffer((2 * _PIECE,), "float16", scope="local")
                        xr = T.sblock_alloc_buffer((x_items * _PIECE,), "float16", scope="local")
                        if prologue == "rmsnorm":  # the first weight loads overlap the norm
                            load_group(wl, sl, ml, w, ws, wm, T.min(bx * WARPS + ty, N - 1), tx, T.int64(0))
                            ss[0] = T.float32(0)
                        for it in T.unroll(i64(x_items)):
                            e: T.let[T.int64] = ((it * WARPS + ty) * 32 + tx) * _PIECE
                            if e < K:
                                stage(xs, x, gu, xr, ss, it, e)
                        if prologue == "rmsnorm":
                            normalise(xs, gamma, gu, xr, ss, red, ty, tx)
                        T.tvm_storage_sync("shared")
                        if quant:
                            quantize_input(xs, xq, xsc, xcor, xl, qv, lred, ty, tx)
                            T.tvm_storage_sync("shared")
                        row: T.let[T.int64] = T.min(bx * WARPS + ty, N - 1)  # past the end: recompute the last
                        acc[0] = T.float32(0)
                        for g in T.serial(i64(groups)):
                            if prologue == "rmsnorm":
                                if g > 0:  # group 0 is in flight since before the norm
                                    load_group(wl, sl, ml, w, ws, wm, row, tx, g)
                            else:
                                load_group(wl, sl, ml, w, ws, wm, row, tx, g)
                            for c in T.unroll(GROUP):
                                if (g * GROUP + c) * 32 + tx < pieces:
                                    dot_piece(acc, wl, sl, ml, xs, xl, xw, xq, xsc, xcor, dots, c, (g * GROUP + c) * 32 + tx)
                        for s in T.unroll(5):  # butterfly: every lane ends with the warp's sum
                            acc[0] = acc[0] + T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), acc[0], tx ^ (T.int64(16) >> s), 32, 32)
                        if tx == 0 and bx * WARPS + ty < N:
                            if epilogue == "residual":
                                y[0, row] = T.Cast("float16", acc[0]) + r[0, row]
                            else:
                                y[0, row] = T.Cast("float16", acc[0])

    w_shape, w_dtype = {4: ((N, i64(k // 8)), "uint32"), 8: ((N, K), "int8"), 16: ((N, K), "float16")}[bits]

    @T.prim_func(s_tir=True)
    def gemv(x_h: T.handle, g_h: T.handle, w_h: T.handle, ws_h: T.handle, wm_h: T.handle, r_h: T.handle,
             y_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        x = T.match_buffer(x_h, (T.int64(1), X), "float16")
        gamma = T.match_buffer(g_h, (K,), "float16")
        w = T.match_buffer(w_h, w_shape, w_dtype)
        ws = T.match_buffer(ws_h, (N, i64(k // Q_GROUP)), "float16")
        wm = T.match_buffer(wm_h, (N, i64(k // Q_GROUP)), "float16")
        r = T.match_buffer(r_h, (T.int64(1), N), "float16")
        y = T.match_buffer(y_h, (T.int64(1), N), "float16")
        body(x, gamma, w, ws, wm, r, y)

    # the arguments this variant reads, in order: x, [g], w, [scale], [min], [r], y (the body
    # never touches the others, so they leave the signature)
    used = [True, prologue == "rmsnorm", True, quant, has_min, epilogue == "residual", True]
    params = [param for param, keep in zip(gemv.params, used) if keep]
    func = tirx.PrimFunc(params, gemv.body, gemv.ret_type, gemv.attrs)
    return func.with_attr("global_symbol", kernel_name(n_out, k, f"{prologue}_{epilogue}", bits, offset, has_min))
