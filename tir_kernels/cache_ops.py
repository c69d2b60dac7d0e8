"""Small kernels around the KV cache: append, RoPE table, and the attended-row list."""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .common import i64, is_gpu

_THREADS = 256


def make_kv_append(num_layers: int, n_kv: int, head_dim: int, dtype: str, target: Target,
                   kv_dtype: str | None = None) -> tirx.PrimFunc:
    """``kv[layer, 0|1, :, pos + i, :] = k|v[i]`` for the step's ``n`` new tokens, in place
    (converted to ``kv_dtype``, default ``dtype``: a CPU's float16 cache beside float32 compute).

    Args (in order): kv ``kv_dtype``, new[n, heads, d] ``dtype`` whose last ``2 n_kv`` heads are k then v (the fused QKV
    projection's output as it is, or k and v alone), layer (int64), length[1] int32 (tokens
    cached after this step, so ``pos = length[0] - n``: a device tensor, which keeps a decode
    step's kernel arguments the same from step to step, as a CUDA graph needs).
    """
    gpu = is_gpu(target)
    kv_dtype = kv_dtype or dtype
    num_layers, n_kv, head_dim = i64(num_layers), i64(n_kv), i64(head_dim)

    @T.prim_func(s_tir=True)
    def kv_append(kv_h: T.handle, new_h: T.handle, layer: T.int64, length_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        cap, n, heads = T.int64(), T.int64(), T.int64()
        kv = T.match_buffer(kv_h, (num_layers, T.int64(2), n_kv, cap, head_dim), kv_dtype)
        new = T.match_buffer(new_h, (n, heads, head_dim), dtype)
        length = T.match_buffer(length_h, (T.int64(1),), "int32")
        k0: T.let[T.int64] = heads - 2 * n_kv  # first key head
        if gpu:
            total: T.let[T.int64] = n * n_kv * head_dim
            for bx in T.thread_binding(T.ceildiv(total, _THREADS), thread="blockIdx.x"):
                for tx in T.thread_binding(_THREADS, thread="threadIdx.x"):
                    with T.sblock("append"):
                        f: T.let[T.int64] = bx * _THREADS + tx
                        pos: T.let[T.int64] = T.Cast("int64", length[0]) - n  # read on the device
                        if f < total:
                            i: T.let[T.int64] = f // (n_kv * head_dim)
                            h: T.let[T.int64] = f // head_dim % n_kv
                            d: T.let[T.int64] = f % head_dim
                            kv[layer, 0, h, pos + i, d] = T.Cast(kv_dtype, new[i, k0 + h, d])
                            kv[layer, 1, h, pos + i, d] = T.Cast(kv_dtype, new[i, k0 + n_kv + h, d])
        else:
            for i in T.parallel(n):
                for h in T.serial(n_kv):
                    for d in T.vectorized(head_dim):
                        with T.sblock("append"):
                            pos: T.let[T.int64] = T.Cast("int64", length[0]) - n
                            kv[layer, 0, h, pos + i, d] = T.Cast(kv_dtype, new[i, k0 + h, d])
                            kv[layer, 1, h, pos + i, d] = T.Cast(kv_dtype, new[i, k0 + n_kv + h, d])

    return kv_append


def make_rope_table(head_dim: int, target: Target) -> tirx.PrimFunc:
    """``rope[p] = [cos(p * inv_freq), sin(p * inv_freq)]`` for ``p < P`` (see common.py).

    Args: inv_freq[head_dim // 2] float32, P (int64); output rope[P, head_dim] float32.
    """
    half, head_dim = i64(head_dim // 2), i64(head_dim)
    gpu = is_gpu(target)

    @T.prim_func(s_tir=True)
    def compute_rope_table(inv_h: T.handle, num_pos: T.int64, rope_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        inv_freq = T.match_buffer(inv_h, (half,), "float32")
        rope = T.match_buffer(rope_h, (num_pos, head_dim), "float32")
        if gpu:
            for bx in T.thread_binding(T.ceildiv(num_pos * half, _THREADS), thread="blockIdx.x"):
                for tx in T.thread_binding(_THREADS, thread="threadIdx.x"):
                    with T.sblock("rope"):
                        f: T.let[T.int64] = bx * _THREADS + tx
                        if f < num_pos * half:
                            p: T.let[T.int64] = f // half
                            i: T.let[T.int64] = f % half
                            rope[p, i] = T.cos(T.Cast("float32", p) * inv_freq[i])
                            rope[p, half + i] = T.sin(T.Cast("float32", p) * inv_freq[i])
        else:
            for p in T.parallel(num_pos):
                for i in T.serial(half):
                    with T.sblock("rope"):
                        rope[p, i] = T.cos(T.Cast("float32", p) * inv_freq[i])
                        rope[p, half + i] = T.sin(T.Cast("float32", p) * inv_freq[i])

    return compute_rope_table


def make_iota(target: Target) -> tirx.PrimFunc:
    """``rows[j] = j`` for ``j < M``: the attended-row list of dense attention. Args: M (int64)."""
    gpu = is_gpu(target)

    @T.prim_func(s_tir=True)
    def iota(num: T.int64, rows_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.match_buffer(rows_h, (num,), "int32")
        if gpu:
            for bx in T.thread_binding(T.ceildiv(num, _THREADS), thread="blockIdx.x"):
                for tx in T.thread_binding(_THREADS, thread="threadIdx.x"):
                    with T.sblock("iota"):
                        if bx * _THREADS + tx < num:
                            rows[bx * _THREADS + tx] = T.Cast("int32", bx * _THREADS + tx)
        else:
            for j in T.parallel(num):
                with T.sblock("iota"):
                    rows[j] = T.Cast("int32", j)

    return iota


def make_last_row(width: int, dtype: str, target: Target) -> tirx.PrimFunc:
    """``out[0] = x[n - 1]``: the last token's hidden state. Args: x[n, width]."""
    gpu = is_gpu(target)
    width = i64(width)

    @T.prim_func(s_tir=True)
    def last_row(x_h: T.handle, out_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        x = T.match_buffer(x_h, (n, width), dtype)
        out = T.match_buffer(out_h, (T.int64(1), width), dtype)
        if gpu:
            for bx in T.thread_binding(T.ceildiv(width, _THREADS), thread="blockIdx.x"):
                for tx in T.thread_binding(_THREADS, thread="threadIdx.x"):
                    with T.sblock("copy"):
                        if bx * _THREADS + tx < width:
                            out[0, bx * _THREADS + tx] = x[n - 1, bx * _THREADS + tx]
        else:
            for j in T.vectorized(width):
                with T.sblock("copy"):
                    out[0, j] = x[n - 1, j]

    return last_row
