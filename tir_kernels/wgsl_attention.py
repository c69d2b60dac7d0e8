"""``attention_partial`` for GPUs without 32-lane warp shuffles (the Vulkan target's WGSL).

Same contract as ``attention.make_attention_partial`` (chunks of ``CHUNK`` keys, per chunk the
normalised output and its log2-sum-exp, RoPE applied on the fly: key ``j`` at position ``j``, query
``i`` of ``n`` at ``M - n + i``, causal). WGSL has no warp shuffles (TVM's webgpu target: warp size
1, no subgroups) and the codegen reserves ``blockIdx.z``, so one workgroup of ``CHUNK`` threads
handles (chunk, query x KV head): thread ``t`` scores key ``t`` of the chunk for each query head of
the KV head, the softmax max and sum are tree reductions in workgroup memory, and the threads then
own (head, dim) output elements. Arithmetic in float32; K/V read in the model dtype.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from .attention import CHUNK, LOG2E, NEG_INF, rope_rotated
from .common import i64

_LEVELS = int(math.log2(CHUNK))


def _key_rotated(kv, layer, kvh, row, dim, rope, pos, half):
    """Element ``dim`` of key ``kv[layer, 0, kvh, row]`` rotated to position ``pos``, float32."""
    partner = T.if_then_else(dim < half, -T.Cast("float32", kv[layer, 0, kvh, row, dim + half]),
                             T.Cast("float32", kv[layer, 0, kvh, row, dim - half]))
    return T.Cast("float32", kv[layer, 0, kvh, row, dim]) * rope[pos, dim % half] + partner * rope[pos, half + dim % half]


def make_attention_partial_wgsl(num_layers: int, n_heads: int, n_kv: int, head_dim: int,
                                dtype: str) -> tirx.PrimFunc:
    """Args: q[n, >= H, d] (its first H heads), kv[L, 2, Hkv, cap, d], rope[P, d] f32, rows[M] i32,
    layer (int64). Outputs: o[n, S, H, d] f32, lse[n, S, H] f32 with ``S = ceil(M / CHUNK)``
    (``NEG_INF`` for a chunk with no visible key). Raises ValueError for a head_dim that is odd."""
    if head_dim % 2:
        raise ValueError(f"attention needs an even head_dim (rotate-half RoPE), got {head_dim}")
    group = n_heads // n_kv
    half = head_dim // 2
    scale = LOG2E / math.sqrt(head_dim)
    elems = group * head_dim  # output elements of one workgroup
    rounds = (elems + CHUNK - 1) // CHUNK
    H, D, HKV, NL = i64(n_heads), i64(head_dim), i64(n_kv), i64(num_layers)

    @T.macro
    def tree(red, tx, op):
        for r in T.unroll(_LEVELS):
            if tx < T.Cast("int64", CHUNK >> (r + 1)):
                red[tx] = op(red[tx], red[tx + T.Cast("int64", CHUNK >> (r + 1))])
            T.tvm_storage_sync("shared")

    @T.prim_func(s_tir=True)
    def attention_partial(q_h: T.handle, kv_h: T.handle, rope_h: T.handle, rows_h: T.handle,
                          layer: T.int64, o_h: T.handle, lse_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        n, cap, num_pos, m_keys, heads = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (n, heads, D), dtype)
        kv = T.match_buffer(kv_h, (NL, T.int64(2), HKV, cap, D), dtype)
        rope = T.match_buffer(rope_h, (num_pos, D), "float32")
        rows = T.match_buffer(rows_h, (m_keys,), "int32")
        o = T.match_buffer(o_h, (n, (m_keys + CHUNK - 1) // CHUNK, H, D), "float32")
        lse = T.match_buffer(lse_h, (n, (m_keys + CHUNK - 1) // CHUNK, H), "float32")
        for bx in T.thread_binding((m_keys + CHUNK - 1) // CHUNK, thread="blockIdx.x"):
            for by in T.thread_binding(n * HKV, thread="blockIdx.y"):
                for tx in T.thread_binding(T.int64(CHUNK), thread="threadIdx.x"):
                    with T.sblock("attn"):
                        T.reads()
                        T.writes()
                        q_sh = T.sblock_alloc_buffer((group, head_dim), "float32", scope="shared")
                        p_sh = T.sblock_alloc_buffer((group, CHUNK), "float32", scope="shared")
                        red = T.sblock_alloc_buffer((CHUNK,), "float32", scope="shared")
                        stat = T.sblock_alloc_buffer((group, 2), "float32", scope="shared")  # max, sum
                        acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        qi: T.let[T.int64] = by // HKV
                        kvh: T.let[T.int64] = by % HKV
                        qpos: T.let[T.int64] = m_keys - n + qi
                        for e in T.serial(T.int64(rounds)):  # the group's queries, rotated to qpos
                            if e * CHUNK + tx < elems:
                                g: T.let[T.int64] = (e * CHUNK + tx) // head_dim
                                dd: T.let[T.int64] = (e * CHUNK + tx) % head_dim
                                q_sh[g, dd] = rope_rotated(q, qi, kvh * group + g, dd, rope, qpos, half) * scale
                        T.tvm_storage_sync("shared")
                        j: T.let[T.int64] = bx * CHUNK + tx
                        for g in T.serial(T.int64(group)):  # thread tx scores key j
                            acc[0] = T.float32(NEG_INF)
                            if j < m_keys and j <= qpos:
                                row: T.let[T.int64] = T.Cast("int64", rows[j])
                                acc[0] = T.float32(0)
                                for dd in T.serial(D):
                                    acc[0] = acc[0] + q_sh[g, dd] * _key_rotated(kv, layer, kvh, row, dd, rope, j, half)
                            p_sh[g, tx] = acc[0]
                        for g in T.serial(T.int64(group)):  # softmax statistics per query head
                            red[tx] = p_sh[g, tx]
                            T.tvm_storage_sync("shared")
                            tree(red, tx, T.max)
                            if tx == 0:
                                stat[g, 0] = red[0]
                            T.tvm_storage_sync("shared")
                            p_sh[g, tx] = T.if_then_else(j < m_keys and j <= qpos,
                                                         T.exp2(p_sh[g, tx] - stat[g, 0]), T.float32(0))
                            red[tx] = p_sh[g, tx]
                            T.tvm_storage_sync("shared")
                            tree(red, tx, lambda a, b: a + b)
                            if tx == 0:
                                stat[g, 1] = red[0]
                            T.tvm_storage_sync("shared")
                        for e in T.serial(T.int64(rounds)):  # thread -> (head, dim) outputs
                            if e * CHUNK + tx < elems:
                                g: T.let[T.int64] = (e * CHUNK + tx) // head_dim
                                dd: T.let[T.int64] = (e * CHUNK + tx) % head_dim
                                acc[0] = T.float32(0)
                                for t in T.serial(T.int64(CHUNK)):
                                    if bx * CHUNK + t < m_keys and bx * CHUNK + t <= qpos:
                                        acc[0] = acc[0] + p_sh[g, t] * T.Cast(
                                            "float32", kv[layer, 1, kvh, T.Cast("int64", rows[bx * CHUNK + t]), dd])
                                o[qi, bx, kvh * group + g, dd] = T.if_then_else(
                                    stat[g, 1] > T.float32(0), acc[0] / stat[g, 1], T.float32(0))
                                if dd == 0:
                                    lse[qi, bx, kvh * group + g] = T.if_then_else(
                                        stat[g, 1] > T.float32(0), stat[g, 0] + T.log2(stat[g, 1]), T.float32(NEG_INF))

    return attention_partial
