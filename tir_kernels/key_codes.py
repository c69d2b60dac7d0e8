"""int8 codes of the cached keys, for TokenSelect's scoring on a compressed copy (``--score-keys
int8``; issue 9's option beyond the paper).

Each cached key row ``k[layer, g, t, :]`` (as cached: without RoPE) gets one float32 scale and
``head_dim`` int8 codes, symmetric per token and KV head::

    scale[layer, g, t] = max_i |k_i| / 127,     code[layer, g, t, i] = round(k_i * 127 / max_i |k_i|)

(round half away from zero; a zero row gets scale 0 and codes 0). The scoring pass then reads
``head_dim + 4`` bytes a candidate instead of ``2 head_dim`` (float16) and computes
``q̄ · k ≈ scale · (q̄ · code)``; attention itself still reads the exact keys and values. A
per-token scale (not per channel) lets each appended row be coded on its own, once.

Layouts: ``codes[num_layers, n_kv, capacity, head_dim]`` int8, ``scales[num_layers, n_kv,
capacity]`` float32, rows at the KV cache's positions.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .common import i64, is_gpu
from .tokenselect_scoring import allreduce_max_f32

CODE_MAX = 127


def make_key_codes(num_layers: int, n_kv: int, head_dim: int, dtype: str, target: Target) -> tirx.PrimFunc:
    """Code the ``n`` key rows ``[length[0] - n, length[0])`` of layer ``layer``, in place.

    Args (in order): kv[num_layers, 2, n_kv, capacity, head_dim] ``dtype``, codes, scales (the
    module's layouts, updated in place), layer (int64), length[1] int32 (a device tensor, as the
    KV append reads it), n (int64). GPU: one warp per (row, KV head), the row's max by shuffles.
    """
    gpu = is_gpu(target)
    NL, HKV, D = i64(num_layers), i64(n_kv), i64(head_dim)
    per_lane = (head_dim + 31) // 32

    @T.macro
    def code(kv, codes, layer, g, row, i, m):
        inv: T.let[T.float32] = T.if_then_else(m > T.float32(0), T.float32(CODE_MAX) / m, T.float32(0))
        codes[layer, g, row, i] = T.Cast("int8", T.max(T.min(T.round(T.Cast("float32", kv[layer, 0, g, row, i]) * inv),
                                                              T.float32(CODE_MAX)), T.float32(-CODE_MAX)))

    @T.prim_func(s_tir=True)
    def key_codes(kv_h: T.handle, codes_h: T.handle, scales_h: T.handle, layer: T.int64, length_h: T.handle,
                  n: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        cap = T.int64()
        kv = T.match_buffer(kv_h, (NL, T.int64(2), HKV, cap, D), dtype)
        codes = T.match_buffer(codes_h, (NL, HKV, cap, D), "int8")
        scales = T.match_buffer(scales_h, (NL, HKV, cap), "float32")
        length = T.match_buffer(length_h, (T.int64(1),), "int32")
        if gpu:
            for b in T.thread_binding(n * HKV, thread="blockIdx.x"):
                for tx in T.thread_binding(T.int64(32), thread="threadIdx.x"):
                    with T.sblock("key_codes"):
                        T.reads()
                        T.writes()
                        val = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        mx = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        row: T.let[T.int64] = T.Cast("int64", length[0]) - n + b // HKV
                        g: T.let[T.int64] = b % HKV
                        val[0] = T.float32(0)
                        for j in T.unroll(per_lane):
                            if j * 32 + tx < D:
                                val[0] = T.max(val[0], T.abs(T.Cast("float32", kv[layer, 0, g, row, j * 32 + tx])))
                        allreduce_max_f32(val, mx, tx)
                        for j in T.unroll(per_lane):
                            if j * 32 + tx < D:
                                code(kv, codes, layer, g, row, j * 32 + tx, mx[0])
                        if tx == 0:
                            scales[layer, g, row] = mx[0] / T.float32(CODE_MAX)
        else:
            for r in T.parallel(n):
                for g in T.serial(HKV):
                    with T.sblock("key_codes"):
                        T.reads()
                        T.writes()
                        mx = T.sblock_alloc_buffer((1,), "float32")
                        row: T.let[T.int64] = T.Cast("int64", length[0]) - n + r
                        mx[0] = T.float32(0)
                        for i in T.serial(D):
                            mx[0] = T.max(mx[0], T.abs(T.Cast("float32", kv[layer, 0, g, row, i])))
                        for i in T.serial(D):
                            code(kv, codes, layer, g, row, i, mx[0])
                        scales[layer, g, row] = mx[0] / T.float32(CODE_MAX)

    return key_codes
