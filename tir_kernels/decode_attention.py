"""GPU decode attention (one query token) over any list of cached rows, flash-decoding style.

Same contract as ``attention.make_attention_partial`` (key ``j`` of ``rows`` at RoPE position ``j``,
the query at ``M - 1``, partial outputs merged by ``attention.make_attention_merge``), but laid
out for one query: the ``M`` rows are split into ``decode_splits(M)`` chunks, one block each, so
the whole GPU streams K/V at any length (Dao et al., "Flash-Decoding for long-context
inference", 2023). Inside a block, ``THREADS // (head_dim / VEC)`` slots of ``head_dim / VEC``
threads each own one KV head and walk its keys; a thread loads 16 bytes of a key and of a value
at a time, so one key row is read by a few threads in one coalesced access. The query is rotated
once (to position ``M - 1``); each thread rotates its 16 bytes of a key itself, reading its
rotate-half partner's 16 bytes too (the same sector, so from L1, not DRAM) and the position's
cos/sin, which the block's slots of the other KV heads share through L1; the next rows' indices
are fetched a step ahead. A key's scores for the GQA group's query heads are summed over the
slot's threads by one butterfly of warp shuffles whose chains interleave (every thread ends with
every sum). All softmax arithmetic is float32 (log2 domain).
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .attention import LOG2E, NEG_INF, rope_rotated
from .common import i64, is_gpu

THREADS = 256  # threads per block
MIN_KEYS_PER_SPLIT = 8
MAX_SPLITS = 256  # about two blocks per multiprocessor on a 132-SM H100/H200
UNROLL = 1  # keys a slot loads before it computes: 1 keeps 126 registers, two blocks per SM


def decode_splits(num_keys: "tirx.PrimExpr | int") -> "tirx.PrimExpr | int":
    """Chunks (blocks, partial outputs) for ``num_keys`` rows: ≥ 8 keys each, at most 256 chunks."""
    per_min = (num_keys + MIN_KEYS_PER_SPLIT - 1) // MIN_KEYS_PER_SPLIT
    if isinstance(per_min, int):
        return min(per_min, MAX_SPLITS)
    return tirx.min(per_min, i64(MAX_SPLITS))


def make_decode_attention(num_layers: int, n_heads: int, n_kv: int, head_dim: int, dtype: str,
                          target: Target, unroll: int = UNROLL) -> tirx.PrimFunc:
    """Args: q[1, >= H, d] (the first H heads are the query's), kv[layers, 2, Hkv, cap, d],
    rope[P, d] f32, rows[M] int32, layer (int64).

    Outputs: o[1, S, H, d] float32 (each chunk's normalised output), lse[1, S, H] float32
    (log2-sum-exp of the chunk's scaled scores, ``NEG_INF`` for an empty chunk), with
    ``S = decode_splits(M)``. ``unroll``: keys each slot loads before it computes. Raises ValueError for a CPU target (CPU decode uses
    ``attention_partial``), a ``head_dim`` that is not a multiple of 16 bytes' elements, or merge
    buffers over 48 KB of shared memory.
    """
    if not is_gpu(target):
        raise ValueError(f"decode attention is a GPU kernel; {target.kind.name} uses attention_partial")
    group = n_heads // n_kv
    half = head_dim // 2
    vec = 16 // (2 if dtype == "float16" else 4)  # elements in 16 bytes
    if half % vec:
        raise ValueError(f"GPU decode attention needs head_dim a multiple of {2 * vec}, got {head_dim}")
    td = head_dim // vec  # threads per key row
    per_head = max(1, THREADS // td // n_kv)  # slots walking one KV head's keys
    slots = per_head * n_kv
    if slots * td > 1024 or 4 * slots * group * (head_dim + 2) > 49152:
        raise ValueError(f"GPU decode attention: {n_kv} KV heads x head_dim {head_dim} exceed one block")
    scale = LOG2E / math.sqrt(head_dim)
    REDUCE_STEPS = int(math.log2(td))
    H, D, HKV = i64(n_heads), i64(head_dim), i64(n_kv)
    G, V, U, PH = i64(group), i64(vec), i64(unroll), i64(per_head)

    @T.prim_func(s_tir=True)
    def attention_decode(q_h: T.handle, kv_h: T.handle, rope_h: T.handle, rows_h: T.handle,
                         layer: T.int64, o_h: T.handle, lse_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        n, cap, num_pos, m_keys, heads = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (n, heads, D), dtype)  # queries: the first H heads
        kv = T.match_buffer(kv_h, (num_layers, T.int64(2), HKV, cap, D), dtype)
        rope = T.match_buffer(rope_h, (num_pos, D), "float32")
        rows = T.match_buffer(rows_h, (m_keys,), "int32")
        o = T.match_buffer(o_h, (n, decode_splits(m_keys), H, D), "float32")
        lse = T.match_buffer(lse_h, (n, decode_splits(m_keys), H), "float32")
        for bx in T.thread_binding(decode_splits(m_keys), thread="blockIdx.x"):
            for ty in T.thread_binding(i64(slots), thread="threadIdx.y"):
                for tx in T.thread_binding(i64(td), thread="threadIdx.x"):
                    with T.sblock("attn"):
                        T.reads()
                        T.writes()
                        qa = T.sblock_alloc_buffer((group, vec), "float32", scope="local")
                        acc = T.sblock_alloc_buffer((group, vec), "float32", scope="local")
                        m_run = T.sblock_alloc_buffer((group,), "float32", scope="local")
                        d_run = T.sblock_alloc_buffer((group,), "float32", scope="local")
                        kh = T.sblock_alloc_buffer((unroll, 2, vec), dtype, scope="local")  # own, partner
                        vh = T.sblock_alloc_buffer((unroll, vec), dtype, scope="local")
                        cs = T.sblock_alloc_buffer((unroll, 2, vec), "float32", scope="local")
                        kr = T.sblock_alloc_buffer((vec,), "float32", scope="local")
                        nxt = T.sblock_alloc_buffer((unroll,), "int64", scope="local")  # next rows
                        part = T.sblock_alloc_buffer((group,), "float32", scope="local")
                        merged = T.sblock_alloc_buffer((2,), "float32", scope="local")
                        out = T.sblock_alloc_buffer((vec,), "float32", scope="local")
                        o_sh = T.sblock_alloc_buffer((slots, group, head_dim), "float32", scope="shared")
                        md_sh = T.sblock_alloc_buffer((slots, group, 2), "float32", scope="shared")
                        kvh: T.let[T.int64] = ty // PH
                        lane: T.let[T.int64] = ty % PH
                        d0: T.let[T.int64] = tx * V
                        dp: T.let[T.int64] = (d0 + half) % head_dim  # the partner dims under RoPE
                        sign: T.let[T.float32] = T.if_then_else(d0 < half, T.float32(-1), T.float32(1))
                        # chunk bounds in a local buffer: computed once, not re-derived per use
                        span = T.sblock_alloc_buffer((3,), "int64", scope="local")
                        span[0] = (m_keys + decode_splits(m_keys) - 1) // decode_splits(m_keys)
                        span[1] = bx * span[0]
                        span[2] = T.min(span[1] + span[0], m_keys)
                        chunk: T.let[T.int64] = span[0]
                        j0: T.let[T.int64] = span[1]
                        j1: T.let[T.int64] = span[2]
                        for g in T.unroll(G):  # the query, rotated to its position M - 1
                            m_run[g] = T.float32(NEG_INF)
                            d_run[g] = T.float32(0)
                            for v in T.unroll(V):
                                acc[g, v] = T.float32(0)
                                qa[g, v] = rope_rotated(q, 0, kvh * group + g, d0 + v, rope, m_keys - 1, half) * scale
                        for u in T.unroll(U):
                            nxt[u] = T.Cast("int64", rows[T.min(j0 + u * PH + lane, m_keys - 1)])
                        for it in T.serial((chunk + PH * U - 1) // (PH * U)):
                            for u in T.unroll(U):  # issue every load first
                                # an out-of-chunk slot reads a valid row and drops its score below
                                j: T.let[T.int64] = T.min(j0 + (it * U + u) * PH + lane, m_keys - 1)
                                row: T.let[T.int64] = nxt[u]
                                for v in T.vectorized(V):
                                    kh[u, 0, v] = kv[layer, 0, kvh, row, d0 + v]
                                for v in T.vectorized(V):
                                    kh[u, 1, v] = kv[layer, 0, kvh, row, dp + v]
                                for v in T.vectorized(V):
                                    vh[u, v] = kv[layer, 1, kvh, row, d0 + v]
                                for v in T.vectorized(V):
                                    cs[u, 0, v] = rope[j, d0 % half + v]
                                for v in T.vectorized(V):
                                    cs[u, 1, v] = rope[j, half + d0 % half + v]
                                nxt[u] = T.Cast("int64", rows[T.min(j + PH * U, m_keys - 1)])
                            for u in T.unroll(U):
                                for v in T.unroll(V):  # the key, rotated to its position j
                                    kr[v] = (T.Cast("float32", kh[u, 0, v]) * cs[u, 0, v]
                                             + sign * T.Cast("float32", kh[u, 1, v]) * cs[u, 1, v])
                                for g in T.unroll(G):
                                    part[g] = T.float32(0)
                                    for v in T.unroll(V):
                                        part[g] = part[g] + kr[v] * qa[g, v]
                                for r in T.unroll(i64(REDUCE_STEPS)):  # butterfly: every lane gets each sum
                                    for g in T.unroll(G):  # the heads' shuffles are independent
                                        part[g] = part[g] + T.tvm_warp_shuffle(
                                            T.uint32(0xFFFFFFFF), part[g], tx ^ (i64(td // 2) >> r), td, 32)
                                if j0 + (it * U + u) * PH + lane < j1:
                                    for g in T.unroll(G):
                                        m_new: T.let[T.float32] = T.max(m_run[g], part[g])
                                        decay: T.let[T.float32] = T.exp2(m_run[g] - m_new)
                                        p: T.let[T.float32] = T.exp2(part[g] - m_new)
                                        d_run[g] = d_run[g] * decay + p
                                        m_run[g] = m_new
                                        for v in T.unroll(V):
                                            acc[g, v] = acc[g, v] * decay + p * T.Cast("float32", vh[u, v])
                        for g in T.unroll(G):
                            for v in T.unroll(V):
                                o_sh[ty, g, d0 + v] = acc[g, v]
                            md_sh[ty, g, 0] = m_run[g]
                            md_sh[ty, g, 1] = d_run[g]
                        T.tvm_storage_sync("shared")
                        if lane == 0:  # merge the slots of this KV head
                            for g in T.unroll(G):
                                merged[0] = T.float32(NEG_INF)
                                for w in T.serial(PH):
                                    merged[0] = T.max(merged[0], md_sh[ty + w, g, 0])
                                merged[1] = T.float32(0)
                                for v in T.unroll(V):
                                    out[v] = T.float32(0)
                                for w in T.serial(PH):
                                    merged[1] = merged[1] + md_sh[ty + w, g, 1] * T.exp2(md_sh[ty + w, g, 0] - merged[0])
                                    for v in T.unroll(V):
                                        out[v] = out[v] + o_sh[ty + w, g, d0 + v] * T.exp2(md_sh[ty + w, g, 0] - merged[0])
                                for v in T.unroll(V):
                                    o[0, bx, kvh * group + g, d0 + v] = T.if_then_else(
                                        merged[1] > T.float32(0), out[v] / merged[1], T.float32(0))
                                if tx == 0:
                                    lse[0, bx, kvh * group + g] = T.if_then_else(
                                        merged[1] > T.float32(0), merged[0] + T.log2(merged[1]), T.float32(NEG_INF))

    return attention_decode

