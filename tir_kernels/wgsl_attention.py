"""``attention_partial`` for GPUs without 32-lane warp shuffles (the Vulkan target's WGSL).

Same contract as ``attention.make_attention_partial`` (per chunk of keys the normalised output and
its log2-sum-exp, RoPE applied on the fly: key ``j`` at position ``j``, query ``i`` of ``n`` at
``M - n + i``, causal) but with chunks of ``WGSL_CHUNK`` keys (``num_chunks``): more workgroups for
one decode query and shorter loops per thread. WGSL has no warp shuffles (TVM's webgpu target: warp
size 1, no subgroups) and the codegen reserves ``blockIdx.z``, so one workgroup of ``WGSL_CHUNK``
threads handles (chunk, query x KV head):

- thread ``t`` reads key ``t`` of the chunk once, rotates it dimension pair by dimension pair and
  scores it against every query head of the KV head (the group's rotated queries in workgroup
  memory);
- the softmax max and sum of all the group's heads are one tree reduction each in workgroup memory;
- the threads then own (head, dim) output elements and sum P·V over the chunk's keys, the rows
  staged in workgroup memory (a key past the chunk's end reads row 0 with weight 0: no branch).

Arithmetic in float32; K/V read in the model dtype.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from .attention import LOG2E, NEG_INF, rope_rotated
from .common import i64

WGSL_CHUNK = 64  # keys (and threads) of a workgroup
_LEVELS = int(math.log2(WGSL_CHUNK))


def num_chunks(num_keys: "tirx.PrimExpr | int") -> "tirx.PrimExpr | int":
    """Number of key chunks (partial outputs) the WGSL kernel writes for ``num_keys`` keys."""
    return (num_keys + WGSL_CHUNK - 1) // WGSL_CHUNK


def make_attention_partial_wgsl(num_layers: int, n_heads: int, n_kv: int, head_dim: int,
                                dtype: str) -> tirx.PrimFunc:
    """Args: q[n, >= H, d] (its first H heads), kv[L, 2, Hkv, cap, d], rope[P, d] f32, rows[M] i32,
    layer (int64). Outputs: o[n, S, H, d] f32, lse[n, S, H] f32 with ``S = num_chunks(M)``
    (``NEG_INF`` for a chunk with no visible key). Raises ValueError for an odd head_dim or a GQA
    group larger than ``WGSL_CHUNK``."""
    if head_dim % 2:
        raise ValueError(f"attention needs an even head_dim (rotate-half RoPE), got {head_dim}")
    group = n_heads // n_kv
    if group > WGSL_CHUNK:
        raise ValueError(f"WGSL attention takes at most {WGSL_CHUNK} query heads per KV head, got {group}")
    half = head_dim // 2
    scale = LOG2E / math.sqrt(head_dim)
    elems = group * head_dim  # output elements of one workgroup
    rounds = (elems + WGSL_CHUNK - 1) // WGSL_CHUNK
    C, G, H, D, HKV, NL = i64(WGSL_CHUNK), i64(group), i64(n_heads), i64(head_dim), i64(n_kv), i64(num_layers)

    @T.macro
    def tree(red, tx, op):  # red[g, 0] = op over red[g, :] for every head g at once
        for r in T.unroll(_LEVELS):
            for g in T.unroll(G):
                if tx < T.Cast("int64", WGSL_CHUNK >> (r + 1)):
                    red[g, tx] = op(red[g, tx], red[g, tx + T.Cast("int64", WGSL_CHUNK >> (r + 1))])
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
        o = T.match_buffer(o_h, (n, (m_keys + C - 1) // C, H, D), "float32")
        lse = T.match_buffer(lse_h, (n, (m_keys + C - 1) // C, H), "float32")
        for bx in T.thread_binding((m_keys + C - 1) // C, thread="blockIdx.x"):
            for by in T.thread_binding(n * HKV, thread="blockIdx.y"):
                for tx in T.thread_binding(C, thread="threadIdx.x"):
                    with T.sblock("attn"):
                        T.reads()
                        T.writes()
                        q_sh = T.sblock_alloc_buffer((group, head_dim), "float32", scope="shared")
                        p_sh = T.sblock_alloc_buffer((group, WGSL_CHUNK), "float32", scope="shared")
                        red = T.sblock_alloc_buffer((group, WGSL_CHUNK), "float32", scope="shared")
                        row_sh = T.sblock_alloc_buffer((WGSL_CHUNK,), "int32", scope="shared")
                        stat = T.sblock_alloc_buffer((group, 2), "float32", scope="shared")  # max, sum
                        acc = T.sblock_alloc_buffer((group,), "float32", scope="local")
                        pair = T.sblock_alloc_buffer((2,), "float32", scope="local")  # a key's dims dd, dd + half
                        rot = T.sblock_alloc_buffer((2,), "float32", scope="local")  # ... rotated
                        qi: T.let[T.int64] = by // HKV
                        kvh: T.let[T.int64] = by % HKV
                        qpos: T.let[T.int64] = m_keys - n + qi
                        j: T.let[T.int64] = bx * C + tx
                        for e in T.serial(T.int64(rounds)):  # the group's queries, rotated to qpos
                            if e * C + tx < elems:
                                g: T.let[T.int64] = (e * C + tx) // D
                                dd: T.let[T.int64] = (e * C + tx) % D
                                q_sh[g, dd] = rope_rotated(q, qi, kvh * G + g, dd, rope, qpos, half) * scale
                        if j < m_keys:
                            row_sh[tx] = rows[j]
                        else:
                            row_sh[tx] = 0
                        T.tvm_storage_sync("shared")
                        for g in T.unroll(G):
                            acc[g] = T.float32(0)
                        if j < m_keys and j <= qpos:  # thread tx scores key j for every head
                            row: T.let[T.int64] = T.Cast("int64", row_sh[tx])
                            for dd in T.serial(T.int64(half)):
                                pair[0] = T.Cast("float32", kv[layer, 0, kvh, row, dd])
                                pair[1] = T.Cast("float32", kv[layer, 0, kvh, row, dd + half])
                                rot[0] = pair[0] * rope[j, dd] - pair[1] * rope[j, half + dd]
                                rot[1] = pair[1] * rope[j, dd] + pair[0] * rope[j, half + dd]
                                for g in T.unroll(G):
                                    acc[g] = acc[g] + q_sh[g, dd] * rot[0] + q_sh[g, dd + half] * rot[1]
                        for g in T.unroll(G):
                            p_sh[g, tx] = T.if_then_else(j < m_keys and j <= qpos, acc[g], T.float32(NEG_INF))
                            red[g, tx] = p_sh[g, tx]
                        T.tvm_storage_sync("shared")
                        tree(red, tx, T.max)
                        if tx < G:
                            stat[tx, 0] = red[tx, 0]
                        T.tvm_storage_sync("shared")
                        for g in T.unroll(G):
                            p_sh[g, tx] = T.if_then_else(j < m_keys and j <= qpos,
                                                         T.exp2(p_sh[g, tx] - stat[g, 0]), T.float32(0))
                            red[g, tx] = p_sh[g, tx]
                        T.tvm_storage_sync("shared")
                        tree(red, tx, lambda a, b: a + b)
                        if tx < G:
                            stat[tx, 1] = red[tx, 0]
                        T.tvm_storage_sync("shared")
                        for e in T.serial(T.int64(rounds)):  # thread -> (head, dim) outputs
                            if e * C + tx < elems:
                                g: T.let[T.int64] = (e * C + tx) // D
                                dd: T.let[T.int64] = (e * C + tx) % D
                                acc[0] = T.float32(0)
                                for t in T.serial(C):  # keys past the end: row 0, weight 0
                                    acc[0] = acc[0] + p_sh[g, t] * T.Cast(
                                        "float32", kv[layer, 1, kvh, T.Cast("int64", row_sh[t]), dd])
                                o[qi, bx, kvh * G + g, dd] = T.if_then_else(
                                    stat[g, 1] > T.float32(0), acc[0] / stat[g, 1], T.float32(0))
                                if dd == 0:
                                    lse[qi, bx, kvh * G + g] = T.if_then_else(
                                        stat[g, 1] > T.float32(0), stat[g, 0] + T.log2(stat[g, 1]), T.float32(NEG_INF))

    return attention_partial
