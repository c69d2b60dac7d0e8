"""Decode linears (one token) on x86 CPUs with AVX-512 VNNI: 4-bit weights times int8 inputs.

``y[1, N] = x[1, K] · Wᵀ`` for ``W`` in a 4-bit scheme (q4f16, q4_0, q4_1; ``models/quantization.py``)
as the CPU build stores it (``in_out``): qweight[K/8, N] uint32 (word ``(i, n)``: weights ``8i ..
8i + 7`` of output ``n``, weight ``8i + j`` in nibble ``j``), scale (and q4_1's min) [K/32, N].

As llama.cpp's CPU dot product of Q4 blocks with Q8 activations (ggml's ``ggml_vec_dot_q4_1_q8_1``),
the input is quantized once per call to int8 per group of 32 (``xq = round(x · 127 / max|x|)``,
its scale ``s_x = max|x| / 127`` and ``Σ xq`` kept), so a group's multiply-adds are integer: 16
outputs at a time (one 512-bit vector, lane ``n`` a word of output ``n``), each of the group's four
words gives two ``vpdpbusd`` — its low nibbles (``w & 0x0F0F0F0F``: weights 0, 2, 4, 6 as unsigned
bytes) against those four inputs broadcast, its high nibbles against the odd ones — into int32 sums;
then, in float32, ``y += s_w s_x (Σ nibble · xq − offset Σ xq) (+ m_w s_x Σ xq)``. The float path
it replaces (``compile/cpu_schedule.py``) spends ~5 vector instructions on unpacking, converting and
scaling 8 weights for one FMA; here 32 weights of 16 outputs take 8 ``vpdpbusd`` and 8 logic ops.
Outputs are split over the cores in blocks of 16.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target, codegen

LANES = 16  # int32 lanes of a 512-bit vector: outputs a vector computes
GROUP = 32  # weights a scale (models/quantization.py)
_VNNI = "llvm.x86.avx512.vpdpbusd.512"


def supported(n_out: int, k: int, dtype: str, target: Target | None, bits: int) -> bool:
    """True where the kernel runs: an llvm target with AVX-512 VNNI, float32, 4-bit weights, ``k``
    a multiple of 32 and ``n_out`` of 16."""
    return (target is not None and target.kind.name == "llvm" and dtype == "float32" and bits == 4
            and k % GROUP == 0 and n_out % LANES == 0 and bool(codegen.target_has_features("avx512vnni", target)))


def kernel_name(n_out: int, k: int, offset: int, has_min: bool) -> str:
    """The PrimFunc's name for one weight shape and 4-bit format."""
    return f"decode_gemv_vnni_q4o{offset}{'m' if has_min else ''}_{n_out}x{k}"


def make_decode_gemv_vnni(n_out: int, k: int, target: Target, offset: int, has_min: bool) -> tirx.PrimFunc:
    """Args: x[1, k] float32, qweight[k/8, n_out] uint32, scale[k/32, n_out] float32, for
    ``has_min`` min[k/32, n_out] float32; output y[1, n_out] float32 (``offset``: what a nibble
    stores beyond its code, 7 q4f16, 8 q4_0, 0 q4_1). Raises ValueError where ``supported`` is False."""
    if not supported(n_out, k, "float32", target, 4):
        raise ValueError(f"VNNI GEMV needs an llvm target with AVX-512 VNNI, K % {GROUP} == 0 and N % {LANES} == 0 "
                         f"(got {target.kind.name}, K {k}, N {n_out})")
    groups, words = k // GROUP, k // 8
    vec = T.ramp(0, 1, LANES)

    def vnni(acc, words, inputs):
        """acc (int32x16) + per lane the 4 bytes of ``words`` (unsigned) times those of ``inputs``
        (signed, one int32 for every lane)."""
        return T.call_llvm_pure_intrin("int32x16", T.llvm_lookup_intrinsic_id(_VNNI), acc,
                                       T.reinterpret("int8x64", words),
                                       T.reinterpret("int8x64", T.broadcast(inputs, LANES)))

    @T.prim_func(s_tir=True)
    def gemv(x_h: T.handle, w_h: T.handle, ws_h: T.handle, wm_h: T.handle, y_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        x = T.match_buffer(x_h, (1, k), "float32")
        w = T.match_buffer(w_h, (words, n_out), "uint32")
        ws = T.match_buffer(ws_h, (groups, n_out), "float32")
        wm = T.match_buffer(wm_h, (groups, n_out), "float32")
        y = T.match_buffer(y_h, (1, n_out), "float32")
        xq = T.alloc_buffer((2 * words,), "int32")  # per word: its even inputs' 4 int8, then the odd ones'
        sx = T.alloc_buffer((groups,), "float32")
        xsum = T.alloc_buffer((groups,), "float32")  # s_x Σ xq
        amax = T.alloc_buffer((1,), "float32")
        codes = T.alloc_buffer((GROUP,), "int32")
        for g in T.serial(groups):  # the input's int8 codes, group by group
            amax[0] = T.float32(0)
            for i in T.serial(GROUP):
                amax[0] = T.max(amax[0], T.abs(x[0, g * GROUP + i]))
            sx[g] = amax[0] / T.float32(127)
            xsum[g] = T.float32(0)
            for i in T.serial(GROUP):
                codes[i] = T.Cast("int32", T.round(x[0, g * GROUP + i] * T.if_then_else(
                    amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))))
                xsum[g] = xsum[g] + T.Cast("float32", codes[i])
            xsum[g] = xsum[g] * sx[g]
            for word in T.serial(4):
                for half in T.serial(2):  # even inputs, then odd: bytes 0..3 of the packed word
                    xq[(g * 4 + word) * 2 + half] = (
                        (codes[word * 8 + half] & 255) | (codes[word * 8 + half + 2] & 255) << 8
                        | (codes[word * 8 + half + 4] & 255) << 16 | codes[word * 8 + half + 6] << 24)
        for jo in T.parallel(n_out // LANES):
            acc = T.alloc_buffer((LANES,), "float32", scope="local")
            dots = T.alloc_buffer((LANES,), "int32", scope="local")
            acc[vec] = T.broadcast(T.float32(0), LANES)
            for g in T.serial(groups):
                dots[vec] = T.broadcast(T.int32(0), LANES)
                for word in T.unroll(4):
                    dots[vec] = vnni(dots[vec], w[g * 4 + word, T.ramp(jo * LANES, 1, LANES)]
                                     & T.broadcast(T.uint32(0x0F0F0F0F), LANES), xq[(g * 4 + word) * 2])
                    dots[vec] = vnni(dots[vec], w[g * 4 + word, T.ramp(jo * LANES, 1, LANES)] >> T.broadcast(
                        T.uint32(4), LANES) & T.broadcast(T.uint32(0x0F0F0F0F), LANES), xq[(g * 4 + word) * 2 + 1])
                if offset != 0:
                    acc[vec] = acc[vec] + ws[g, T.ramp(jo * LANES, 1, LANES)] * (
                        T.Cast("float32x16", dots[vec]) * T.broadcast(sx[g], LANES)
                        - T.broadcast(T.float32(offset) * xsum[g], LANES))
                else:
                    acc[vec] = acc[vec] + ws[g, T.ramp(jo * LANES, 1, LANES)] * (
                        T.Cast("float32x16", dots[vec]) * T.broadcast(sx[g], LANES))
                if has_min:
                    acc[vec] = acc[vec] + wm[g, T.ramp(jo * LANES, 1, LANES)] * T.broadcast(xsum[g], LANES)
            y[0, T.ramp(jo * LANES, 1, LANES)] = acc[vec]

    params = [p for i, p in enumerate(gemv.params) if has_min or i != 3]  # the body never reads an unused min
    func = tirx.PrimFunc(params, gemv.body, gemv.ret_type, gemv.attrs)
    return func.with_attr("global_symbol", kernel_name(n_out, k, offset, has_min))
