"""Attention of a step's queries over a list of cached rows, RoPE applied on the fly.

One kernel serves dense and sparse (TokenSelect, streaming) attention, decode and chunked
prefill: the attended keys are ``kv[layer, 0, :, rows[j]]`` for ``j < M`` and key ``j`` gets RoPE
position ``j`` (dense: ``rows = 0..L-1``, so positions are the true ones; sparse: the gathered list,
so positions are re-assigned ``0..M-1``). Query ``i`` of the step's ``n`` sits at position
``M - n + i`` and sees keys ``j <= M - n + i`` (causal inside the chunk).

The key list is split into chunks of ``chunk`` keys; ``attention_partial`` computes, per chunk, the
normalised partial output and its log2-sum-exp, and ``attention_merge`` combines the chunks
(split-K with a log-sum-exp merge, all softmax arithmetic in float32). On CUDA one block handles
(chunk, KV head, query): the whole GPU works even for one decode token. On CPU one task handles
(chunk, KV head) for all queries, rotating each key once.
"""

from __future__ import annotations

import math
from typing import Callable

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .common import exp2_vectorizable, has_warp_shuffle, i64, is_gpu

NEG_INF = -1e30
LOG2E = math.log2(math.e)
CHUNK = 256
_WARPS = 4
MERGE_GROUPS = 8  # GPU merge: thread groups over the chunks


def num_chunks(num_keys: "tirx.PrimExpr | int") -> "tirx.PrimExpr | int":
    """Number of key chunks (partial outputs) for ``num_keys`` attended keys."""
    return (num_keys + CHUNK - 1) // CHUNK


def partial_chunks(num_keys: "tirx.PrimExpr | int", target: Target) -> "tirx.PrimExpr | int":
    """Chunks (partial outputs) ``make_attention_partial`` writes for ``num_keys`` keys on
    ``target``: ``num_chunks``, or the WGSL kernel's smaller chunks on Vulkan."""
    if is_gpu(target) and not has_warp_shuffle(target):
        from .wgsl_attention import num_chunks as wgsl_chunks

        return wgsl_chunks(num_keys)
    return num_chunks(num_keys)


def make_attention_partial(num_layers: int, n_heads: int, n_kv: int, head_dim: int, dtype: str,
                           target: Target, row_sets: int = 0, logit_sets: int = 0,
                           counted: bool = False, kv_dtype: str | None = None) -> tirx.PrimFunc:
    """Per-chunk attention. Args: q[n, >= H, d] ``dtype`` (its first H heads are the queries, so
    the fused QKV projection's output passes as it is), kv[layers, 2, Hkv, cap, d] ``kv_dtype``
    (default ``dtype``; CPUs may keep a float16 cache beside float32 queries), rope[P, d] float32,
    rows[M] int32, layer (int64).

    Outputs: o[n, S, H, d] float32 (each chunk's normalised output), lse[n, S, H] float32
    (log2-sum-exp of the chunk's scaled scores, ``NEG_INF`` when the chunk has no visible key),
    with ``S = partial_chunks(M, target)``.

    ``row_sets`` (TidalDecode's sparse layers; CPU here, GPU decode in ``decode_attention``): 0 keeps the shared list above; ``H`` or
    ``Hkv`` makes ``rows[row_sets, M]`` one sorted list per query head (query head ``h`` reads set
    ``h``) or per KV head (set ``h // group``), each key at its TRUE position (its row) and query
    ``i`` of ``n`` at ``rows[set, M - 1] - n + 1 + i`` (the set's last row is the step's last token).
    ``logit_sets`` (TidalDecode's selection layers, shared rows; likewise): ``H`` or ``Hkv`` adds
    the output logits[logit_sets, M] float32, the last query's scores ``q.k / sqrt(d) * log2(e)``
    per query head, or per KV head the max over its group (-1e30 for a key it does not see).
    ``counted`` (with ``row_sets``; Recycled Attention's active K): the argument count[1] int32 (a
    device tensor) follows ``rows``, and each set attends to its first ``c = clamp(count[0], 1, M)``
    rows only (the last query at ``rows[set, c - 1]``); chunks past them are written empty.
    Raises ValueError for other set counts, ``counted`` without ``row_sets``, or any of these
    options (or a ``kv_dtype`` other than ``dtype``) on a GPU target.
    """
    kv_dtype = kv_dtype or dtype
    if kv_dtype != dtype and is_gpu(target):
        raise ValueError(f"attention_partial: a {kv_dtype} KV cache beside {dtype} queries is a CPU option")
    if row_sets or logit_sets or counted:
        check_sets(n_heads, n_kv, row_sets, logit_sets)
        if counted and not row_sets:
            raise ValueError("attention_partial: counted is an option of row_sets (per-set row lists)")
        if is_gpu(target):
            raise ValueError("per-head rows and logits are CPU options of attention_partial; "
                             "GPU decode uses decode_attention")
        return _partial_cpu(i64(num_layers), n_heads, n_kv, head_dim, dtype, kv_dtype, row_sets, logit_sets, counted)
    if is_gpu(target) and not has_warp_shuffle(target):  # Vulkan (WGSL)
        from .wgsl_attention import make_attention_partial_wgsl

        return make_attention_partial_wgsl(num_layers, n_heads, n_kv, head_dim, dtype)
    if is_gpu(target):
        return _partial_gpu(i64(num_layers), n_heads, n_kv, head_dim, dtype)
    return _partial_cpu(i64(num_layers), n_heads, n_kv, head_dim, dtype, kv_dtype)


def check_sets(n_heads: int, n_kv: int, row_sets: int, logit_sets: int) -> None:
    """Raises ValueError (one line) unless each of ``row_sets``/``logit_sets`` is 0, ``n_heads``
    or ``n_kv`` and at most one is set (TidalDecode's per-head options of the attention kernels)."""
    for name, sets in (("row_sets", row_sets), ("logit_sets", logit_sets)):
        if sets not in (0, n_heads, n_kv):
            raise ValueError(f"{name}={sets}: use 0, n_heads={n_heads} or n_kv={n_kv}")
    if row_sets and logit_sets:
        raise ValueError("row_sets and logit_sets are exclusive: logits come from the dense pass")


def _partial_gpu(num_layers, n_heads, n_kv, head_dim, dtype):
    if head_dim % 32:
        raise ValueError(f"CUDA attention needs head_dim divisible by 32 (one warp per key), got {head_dim}")
    group = n_heads // n_kv
    half = head_dim // 2
    vec = head_dim // 32
    scale = LOG2E / math.sqrt(head_dim)
    keys_per_warp = CHUNK // _WARPS
    out_rounds = (group + _WARPS - 1) // _WARPS
    H, D, HKV = i64(n_heads), i64(head_dim), i64(n_kv)

    @T.prim_func(s_tir=True)
    def attention_partial(q_h: T.handle, kv_h: T.handle, rope_h: T.handle, rows_h: T.handle,
                          layer: T.int64, o_h: T.handle, lse_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        n, cap, num_pos, m_keys, heads = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (n, heads, D), dtype)  # queries: the first H heads
        kv = T.match_buffer(kv_h, (num_layers, T.int64(2), HKV, cap, D), dtype)
        rope = T.match_buffer(rope_h, (num_pos, D), "float32")
        rows = T.match_buffer(rows_h, (m_keys,), "int32")
        o = T.match_buffer(o_h, (n, (m_keys + CHUNK - 1) // CHUNK, H, D), "float32")
        lse = T.match_buffer(lse_h, (n, (m_keys + CHUNK - 1) // CHUNK, H), "float32")
        for bx in T.thread_binding((m_keys + CHUNK - 1) // CHUNK, thread="blockIdx.x"):
            for by in T.thread_binding(HKV, thread="blockIdx.y"):
                for bz in T.thread_binding(n, thread="blockIdx.z"):
                    for ty in T.thread_binding(T.int64(_WARPS), thread="threadIdx.y"):
                        for tx in T.thread_binding(T.int64(32), thread="threadIdx.x"):
                            with T.sblock("attn"):
                                T.reads()
                                T.writes()
                                qa = T.sblock_alloc_buffer((group, vec), "float32", scope="local")
                                qb = T.sblock_alloc_buffer((group, vec), "float32", scope="local")
                                acc = T.sblock_alloc_buffer((group, vec), "float32", scope="local")
                                m_run = T.sblock_alloc_buffer((group,), "float32", scope="local")
                                d_run = T.sblock_alloc_buffer((group,), "float32", scope="local")
                                score = T.sblock_alloc_buffer((group,), "float32", scope="local")
                                kf = T.sblock_alloc_buffer((vec,), "float32", scope="local")
                                merged = T.sblock_alloc_buffer((2,), "float32", scope="local")  # max, sum
                                o_sh = T.sblock_alloc_buffer((_WARPS, group, head_dim), "float32", scope="shared")
                                md_sh = T.sblock_alloc_buffer((_WARPS, group, 2), "float32", scope="shared")
                                qpos: T.let[T.int64] = m_keys - n + bz
                                # q' = R(qpos) q, then per key score = k . R(-j) q'
                                for g in T.serial(T.int64(group)):
                                    m_run[g] = T.float32(NEG_INF)
                                    d_run[g] = T.float32(0)
                                    for v in T.serial(T.int64(vec)):
                                        acc[g, v] = T.float32(0)
                                        qa[g, v] = rope_rotated(q, bz, by * group + g, tx * vec + v, rope, qpos, half) * scale
                                        qb[g, v] = T.if_then_else(tx * vec + v < half, T.float32(1), T.float32(-1)) * scale * rope_rotated(
                                            q, bz, by * group + g, (tx * vec + v + half) % head_dim, rope, qpos, half)
                                for it in T.serial(T.int64(keys_per_warp)):
                                    j: T.let[T.int64] = bx * CHUNK + it * _WARPS + ty
                                    if j < m_keys and j <= qpos:
                                        row: T.let[T.int64] = T.Cast("int64", rows[j])
                                        for v in T.serial(T.int64(vec)):
                                            kf[v] = T.Cast("float32", kv[layer, 0, by, row, tx * vec + v])
                                        for g in T.unroll(T.int64(group)):
                                            score[g] = T.float32(0)
                                            for v in T.unroll(T.int64(vec)):
                                                score[g] = score[g] + kf[v] * (
                                                    qa[g, v] * rope[j, (tx * vec + v) % half]
                                                    + qb[g, v] * rope[j, half + (tx * vec + v) % half])
                                        for r in T.unroll(5):  # warp butterfly, the heads' chains interleaved
                                            for g in T.unroll(T.int64(group)):
                                                score[g] = score[g] + T.tvm_warp_shuffle(
                                                    T.uint32(0xFFFFFFFF), score[g], tx ^ (T.int64(16) >> r), 32, 32)
                                        for g in T.serial(T.int64(group)):
                                            m_new: T.let[T.float32] = T.max(m_run[g], score[g])
                                            decay: T.let[T.float32] = T.exp2(m_run[g] - m_new)
                                            p: T.let[T.float32] = T.exp2(score[g] - m_new)
                                            d_run[g] = d_run[g] * decay + p
                                            m_run[g] = m_new
                                            for v in T.serial(T.int64(vec)):
                                                acc[g, v] = acc[g, v] * decay + p * T.Cast(
                                                    "float32", kv[layer, 1, by, row, tx * vec + v])
                                for g in T.serial(T.int64(group)):
                                    for v in T.serial(T.int64(vec)):
                                        o_sh[ty, g, tx * vec + v] = acc[g, v]
                                    md_sh[ty, g, 0] = m_run[g]
                                    md_sh[ty, g, 1] = d_run[g]
                                T.tvm_storage_sync("shared")
                                for r in T.serial(T.int64(out_rounds)):  # merge the warps' states
                                    g: T.let[T.int64] = r * _WARPS + ty
                                    if g < group:
                                        merged[0] = T.float32(NEG_INF)
                                        for w in T.serial(T.int64(_WARPS)):
                                            merged[0] = T.max(merged[0], md_sh[w, g, 0])
                                        merged[1] = T.float32(0)
                                        for v in T.serial(T.int64(vec)):
                                            kf[v] = T.float32(0)
                                        for w in T.serial(T.int64(_WARPS)):
                                            merged[1] = merged[1] + md_sh[w, g, 1] * T.exp2(md_sh[w, g, 0] - merged[0])
                                            for v in T.serial(T.int64(vec)):
                                                kf[v] = kf[v] + o_sh[w, g, tx * vec + v] * T.exp2(md_sh[w, g, 0] - merged[0])
                                        for v in T.serial(T.int64(vec)):
                                            o[bz, bx, by * group + g, tx * vec + v] = T.if_then_else(
                                                merged[1] > T.float32(0), kf[v] / merged[1], T.float32(0))
                                        if tx == 0:
                                            lse[bz, bx, by * group + g] = T.if_then_else(
                                                merged[1] > T.float32(0), merged[0] + T.log2(merged[1]), T.float32(NEG_INF))

    return attention_partial


def rope_rotated(x, i, h, dim, rope, pos, half):
    """Element ``dim`` of ``R(pos) x[i, h]`` (rotate-half RoPE), float32."""
    c = rope[pos, dim % half]
    s = rope[pos, half + dim % half]
    partner = T.if_then_else(dim < half, -T.Cast("float32", x[i, h, dim + half]),
                             T.Cast("float32", x[i, h, dim - half]))
    return T.Cast("float32", x[i, h, dim]) * c + partner * s


def _partial_cpu(num_layers, n_heads, n_kv, head_dim, dtype, kv_dtype, row_sets=0, logit_sets=0, counted=False):
    group = n_heads // n_kv
    half = head_dim // 2
    scale = LOG2E / math.sqrt(head_dim)
    part_lanes = max(w for w in (4, 8, 16) if half % w == 0)  # decode's partial dot products (head_dim % 8 == 0)
    per_set = row_sets > 0  # static: per-head row lists at true positions
    sets = row_sets or n_kv  # one task per (chunk, row set); shared rows: per (chunk, KV head)
    lgroup = n_heads // max(logit_sets, 1)  # query heads per logit row
    lanes = 16  # one AVX-512 float32 vector (two AVX2 ones)
    hps = n_heads // sets  # query heads of a task
    # score vectors in flight per head: hps * UNROLL accumulators (<= 12 of AVX-512's 32 registers)
    UNROLL = max(u for u in (1, 2, 4, 8) if u == 1 or hps * u <= 12)
    KEYS_TILE = lanes * UNROLL
    H, D, SETS = i64(n_heads), i64(head_dim), i64(sets)

    def rows_shape(m_keys):
        return (SETS, m_keys) if per_set else (m_keys,)

    def row_at(rows, s, j):
        return rows[s, j] if per_set else rows[j]

    def position(rows, s, j, m_keys, n, i):
        """(key j's RoPE position, query i's position)."""
        if per_set:
            return T.Cast("int64", rows[s, j]), T.Cast("int64", rows[s, m_keys - 1]) - n + 1 + i
        return j, m_keys - n + i

    def rotated(kv, rope, layer, kvh, row, kp, dd, upper):
        """Element ``dd`` (< half) of the lower or ``upper`` half of R(kp) kv[layer, 0, kvh, row], float32."""
        lo = T.Cast("float32", kv[layer, 0, kvh, row, dd])
        hi = T.Cast("float32", kv[layer, 0, kvh, row, dd + half])
        if upper:
            return hi * rope[kp, dd] + lo * rope[kp, half + dd]
        return lo * rope[kp, dd] - hi * rope[kp, half + dd]

    @T.macro
    def body(q, kv, rope, rows, layer, o, lse, logits, n, m_keys, m_rows):
        # m_keys: the rows' (and the outputs') size; m_rows <= m_keys: the rows attended
        for task in T.parallel(((m_keys + CHUNK - 1) // CHUNK) * SETS):
            with T.sblock("attn"):
                T.reads()
                T.writes()
                kr = T.sblock_alloc_buffer((CHUNK, head_dim), "float32")  # keys, rotated
                kt = T.sblock_alloc_buffer((head_dim, CHUNK), "float32")  # kr transposed (prefill)
                vt = T.sblock_alloc_buffer((CHUNK, head_dim), "float32")
                sc = T.sblock_alloc_buffer((hps, CHUNK), "float32")
                part = T.sblock_alloc_buffer((hps, part_lanes), "float32")
                qr = T.sblock_alloc_buffer((hps, head_dim), "float32")
                acc = T.sblock_alloc_buffer((2, head_dim), "float32")
                stat = T.sblock_alloc_buffer((hps, 2), "float32")  # per head: max, sum
                lane_stat = T.sblock_alloc_buffer((2, lanes), "float32")  # per-lane max, sum
                dots = T.sblock_alloc_buffer((hps, KEYS_TILE), "float32")
                vis = T.sblock_alloc_buffer((1,), "int64")
                c: T.let[T.int64] = task // SETS
                s: T.let[T.int64] = task % SETS
                kvh: T.let[T.int64] = s * hps // group
                j0: T.let[T.int64] = c * CHUNK
                cnt: T.let[T.int64] = T.min(T.int64(CHUNK), m_rows - j0)
                for jj in T.serial(cnt):
                    row: T.let[T.int64] = T.Cast("int64", row_at(rows, s, j0 + jj))
                    kp: T.let[T.int64] = position(rows, s, j0 + jj, m_rows, n, 0)[0]
                    if n > 1:  # decode rotates each key where it scores it (kr would leave L1)
                        for dd in T.vectorized(T.int64(half)):
                            kr[jj, dd] = rotated(kv, rope, layer, kvh, row, kp, dd, False)
                            kr[jj, dd + half] = rotated(kv, rope, layer, kvh, row, kp, dd, True)
                    for dd in T.vectorized(T.int64(head_dim)):
                        vt[jj, dd] = T.Cast("float32", kv[layer, 1, kvh, row, dd])
                if 0 < cnt and cnt < CHUNK:  # P.V's pairs may read the row after the last (weight 0)
                    for dd in T.vectorized(T.int64(head_dim)):
                        vt[cnt, dd] = T.float32(0)
                if n > 1:  # several queries reuse the chunk: keys transposed for the scoring
                    for dd in T.serial(T.int64(head_dim)):
                        for jj in T.serial(T.int64(CHUNK)):
                            kt[dd, jj] = T.if_then_else(jj < cnt, kr[jj, dd], T.float32(0))
                for i in T.serial(n):
                    qpos: T.let[T.int64] = position(rows, s, 0, m_rows, n, i)[1]
                    # number of keys of this chunk that query i sees (may be <= 0); rows sorted
                    vis[0] = qpos - j0 + 1
                    if per_set:
                        vis[0] = T.int64(0)
                        for jj in T.serial(cnt):
                            if T.Cast("int64", rows[s, j0 + jj]) <= qpos:
                                vis[0] = vis[0] + 1
                    lim: T.let[T.int64] = T.min(cnt, vis[0])
                    if lim > 0:  # the task's hps query heads together: each K/V load serves them all
                        for g in T.serial(T.int64(hps)):
                            for dd in T.serial(T.int64(head_dim)):
                                qr[g, dd] = rope_rotated(q, i, s * hps + g, dd, rope, qpos, half) * scale
                        if n > 1:  # UNROLL key vectors per head at a time, the dot products in registers
                            for jo in T.serial((lim + KEYS_TILE - 1) // KEYS_TILE):
                                for g in T.unroll(T.int64(hps)):
                                    for ju in T.unroll(UNROLL):
                                        for ji in T.vectorized(lanes):
                                            dots[g, ju * lanes + ji] = T.float32(0)
                                for dd in T.serial(T.int64(head_dim)):
                                    for g in T.unroll(T.int64(hps)):
                                        for ju in T.unroll(UNROLL):
                                            for ji in T.vectorized(lanes):
                                                dots[g, ju * lanes + ji] = dots[g, ju * lanes + ji] + qr[g, dd] * kt[
                                                    dd, jo * KEYS_TILE + ju * lanes + ji]
                                for g in T.unroll(T.int64(hps)):
                                    for ju in T.unroll(UNROLL):
                                        for ji in T.vectorized(lanes):
                                            sc[g, jo * KEYS_TILE + ju * lanes + ji] = dots[g, ju * lanes + ji]
                        else:  # decode: each key rotated here, scored for the task's heads at once
                            for jj in T.serial(lim):  # (lane-wise partial products, summed as a tree)
                                row: T.let[T.int64] = T.Cast("int64", row_at(rows, s, j0 + jj))
                                kp: T.let[T.int64] = position(rows, s, j0 + jj, m_rows, n, 0)[0]
                                for g in T.unroll(T.int64(hps)):
                                    for ll in T.vectorized(T.int64(part_lanes)):
                                        part[g, ll] = T.float32(0)
                                    for do in T.unroll(T.int64(half // part_lanes)):
                                        for ll in T.vectorized(T.int64(part_lanes)):
                                            part[g, ll] = (part[g, ll] + qr[g, do * part_lanes + ll] * rotated(
                                                kv, rope, layer, kvh, row, kp, do * part_lanes + ll, False)
                                                + qr[g, half + do * part_lanes + ll] * rotated(
                                                    kv, rope, layer, kvh, row, kp, do * part_lanes + ll, True))
                                    if part_lanes == 16:
                                        for ll in T.vectorized(T.int64(8)):
                                            part[g, ll] = part[g, ll] + part[g, ll + 8]
                                    if part_lanes >= 8:
                                        for ll in T.vectorized(T.int64(4)):
                                            part[g, ll] = part[g, ll] + part[g, ll + 4]
                                    for ll in T.vectorized(T.int64(2)):
                                        part[g, ll] = part[g, ll] + part[g, ll + 2]
                                    sc[g, jj] = part[g, 0] + part[g, 1]
                        for g in T.serial(T.int64(hps)):
                            if logit_sets > 0:  # static: the last query's scores (it sees every key)
                                if i == n - 1:
                                    for jj in T.serial(lim):
                                        lr: T.let[T.int64] = (s * hps + g) // lgroup
                                        logits[lr, j0 + jj] = T.if_then_else(
                                            (s * hps + g) % lgroup == 0, sc[g, jj], T.max(logits[lr, j0 + jj], sc[g, jj]))
                            # softmax over the lim visible scores, lanes at a time (2^x as a
                            # polynomial); the scores past lim up to the next vector become 0
                            for ji in T.vectorized(lanes):
                                lane_stat[0, ji] = T.float32(NEG_INF)
                                lane_stat[1, ji] = T.float32(0)
                            for jo in T.serial((lim + lanes - 1) // lanes):
                                for ji in T.vectorized(lanes):
                                    lane_stat[0, ji] = T.max(lane_stat[0, ji], T.if_then_else(
                                        jo * lanes + ji < lim, sc[g, jo * lanes + ji], T.float32(NEG_INF)))
                            stat[g, 0] = T.float32(NEG_INF)
                            for ji in T.serial(lanes):
                                stat[g, 0] = T.max(stat[g, 0], lane_stat[0, ji])
                            for jo in T.serial((lim + lanes - 1) // lanes):
                                for ji in T.vectorized(lanes):
                                    sc[g, jo * lanes + ji] = T.if_then_else(
                                        jo * lanes + ji < lim, exp2_vectorizable(sc[g, jo * lanes + ji] - stat[g, 0]),
                                        T.float32(0))
                                    lane_stat[1, ji] = lane_stat[1, ji] + sc[g, jo * lanes + ji]
                            stat[g, 1] = T.float32(0)
                            for ji in T.serial(lanes):
                                stat[g, 1] = stat[g, 1] + lane_stat[1, ji]
                        # P.V per head, two keys at a time into two accumulators (8 FMA chains of
                        # head_dim 64; the accumulators of all hps heads at once were not kept in
                        # registers by LLVM)
                        for g in T.serial(T.int64(hps)):
                            for u in T.unroll(2):
                                for dd in T.vectorized(T.int64(head_dim)):
                                    acc[u, dd] = T.float32(0)
                            for jp in T.serial((lim + 1) // 2):
                                for u in T.unroll(2):
                                    for dd in T.vectorized(T.int64(head_dim)):
                                        acc[u, dd] = acc[u, dd] + sc[g, jp * 2 + u] * vt[jp * 2 + u, dd]
                            for dd in T.vectorized(T.int64(head_dim)):
                                o[i, c, s * hps + g, dd] = (acc[0, dd] + acc[1, dd]) / stat[g, 1]
                            lse[i, c, s * hps + g] = stat[g, 0] + T.log2(stat[g, 1])
                    else:
                        for g in T.serial(T.int64(hps)):
                            for dd in T.serial(T.int64(head_dim)):
                                o[i, c, s * hps + g, dd] = T.float32(0)
                            lse[i, c, s * hps + g] = T.float32(NEG_INF)

    if logit_sets:

        @T.prim_func(s_tir=True)
        def attention_partial_logits(q_h: T.handle, kv_h: T.handle, rope_h: T.handle, rows_h: T.handle,
                                     layer: T.int64, o_h: T.handle, lse_h: T.handle, logits_h: T.handle):
            T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
            n, cap, num_pos, m_keys, heads = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            q = T.match_buffer(q_h, (n, heads, D), dtype)
            kv = T.match_buffer(kv_h, (num_layers, T.int64(2), i64(n_kv), cap, D), kv_dtype)
            rope = T.match_buffer(rope_h, (num_pos, D), "float32")
            rows = T.match_buffer(rows_h, (m_keys,), "int32")
            o = T.match_buffer(o_h, (n, (m_keys + CHUNK - 1) // CHUNK, H, D), "float32")
            lse = T.match_buffer(lse_h, (n, (m_keys + CHUNK - 1) // CHUNK, H), "float32")
            logits = T.match_buffer(logits_h, (i64(logit_sets), m_keys), "float32")
            body(q, kv, rope, rows, layer, o, lse, logits, n, m_keys, m_keys)

        return attention_partial_logits

    @T.macro
    def rows_body(q_h, kv_h, rope_h, rows_h, layer, o_h, lse_h, m_keys, m_rows):
        n, cap, num_pos, heads = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (n, heads, D), dtype)  # queries: the first H heads
        kv = T.match_buffer(kv_h, (num_layers, T.int64(2), i64(n_kv), cap, D), kv_dtype)
        rope = T.match_buffer(rope_h, (num_pos, D), "float32")
        rows = T.match_buffer(rows_h, rows_shape(m_keys), "int32")
        o = T.match_buffer(o_h, (n, (m_keys + CHUNK - 1) // CHUNK, H, D), "float32")
        lse = T.match_buffer(lse_h, (n, (m_keys + CHUNK - 1) // CHUNK, H), "float32")
        body(q, kv, rope, rows, layer, o, lse, None, n, m_keys, m_rows)

    return rows_kernel(rows_body, counted, "attention_partial" + ("_sets" if per_set else "")
                       + ("_counted" if counted else ""))


def rows_kernel(rows_body, counted: bool, symbol: str) -> tirx.PrimFunc:
    """An attention kernel over a row list: args q, kv, rope, rows, (``counted``: count[1] int32,
    a device tensor,) layer (int64), then its outputs o, lse. ``rows_body(q_h, kv_h, rope_h,
    rows_h, layer, o_h, lse_h, m_keys, m_rows)`` (a macro) matches the buffers and computes, with
    ``m_keys`` the rows' size and ``m_rows`` those attended: ``m_keys``, or ``clamp(count[0], 1,
    m_keys)``. The PrimFunc is named ``symbol``."""
    if counted:

        @T.prim_func(s_tir=True)
        def attention_counted(q_h: T.handle, kv_h: T.handle, rope_h: T.handle, rows_h: T.handle,
                              count_h: T.handle, layer: T.int64, o_h: T.handle, lse_h: T.handle):
            T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
            m_keys = T.int64()
            count = T.match_buffer(count_h, (T.int64(1),), "int32")
            rows_body(q_h, kv_h, rope_h, rows_h, layer, o_h, lse_h, m_keys,  # at least 1: no chunk split by 0
                      T.min(T.max(T.Cast("int64", count[0]), T.int64(1)), m_keys))

        return attention_counted.with_attr("global_symbol", symbol)

    @T.prim_func(s_tir=True)
    def attention(q_h: T.handle, kv_h: T.handle, rope_h: T.handle, rows_h: T.handle,
                  layer: T.int64, o_h: T.handle, lse_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        m_keys = T.int64()
        rows_body(q_h, kv_h, rope_h, rows_h, layer, o_h, lse_h, m_keys, m_keys)

    return attention.with_attr("global_symbol", symbol)


def make_attention_merge(n_heads: int, head_dim: int, dtype: str, target: Target,
                         valid_chunks: Callable[[tirx.PrimExpr], tirx.PrimExpr] | None = None,
                         few_chunks: bool = False) -> tirx.PrimFunc:
    """Combine chunk partials. Args: o[n, S, H, d] f32, lse[n, S, H] f32; output out[n, H, d].

    A chunk with ``lse = NEG_INF`` (no visible key) has no weight; at least one must have keys.
    ``valid_chunks``: the merge takes length[1] int32 (a device tensor) after ``lse`` and combines
    only the first ``valid_chunks(length[0])`` chunks (``decode_attention`` built ``dense``).
    On GPUs one block per (query, head): ``MERGE_GROUPS`` groups of ``head_dim / 4`` threads walk
    every ``MERGE_GROUPS``-th chunk with a running max (16-byte loads), then combine the groups;
    ``few_chunks`` (a prefill chunk's handful of key splits: many queries, few chunks) gives each
    thread 4 output elements of one (query, head) and all its chunks instead.
    """
    if is_gpu(target) and head_dim % 4:
        raise ValueError(f"GPU attention merge needs head_dim divisible by 4, got {head_dim}")
    H, D = i64(n_heads), i64(head_dim)
    gpu = is_gpu(target)
    quads = head_dim // 4

    @T.macro
    def merge_threads(o, lse, out, n, s):  # a thread per 4 output elements, every chunk
        for b in T.thread_binding((n * H * quads + 255) // 256, thread="blockIdx.x"):
            for tx in T.thread_binding(T.int64(256), thread="threadIdx.x"):
                with T.sblock("merge"):
                    st = T.sblock_alloc_buffer((2,), "float32", scope="local")  # max, sum
                    acc = T.sblock_alloc_buffer((4,), "float32", scope="local")
                    ov = T.sblock_alloc_buffer((4,), "float32", scope="local")
                    item: T.let[T.int64] = b * 256 + tx
                    i: T.let[T.int64] = item // (H * quads)
                    h: T.let[T.int64] = item // quads % H
                    v0: T.let[T.int64] = item % quads * 4
                    if item < n * H * quads:
                        st[0] = T.float32(NEG_INF)
                        for c in T.serial(s):
                            st[0] = T.max(st[0], lse[i, c, h])
                        st[1] = T.float32(0)
                        for v in T.unroll(4):
                            acc[v] = T.float32(0)
                        for c in T.serial(s):
                            w: T.let[T.float32] = T.if_then_else(lse[i, c, h] > T.float32(NEG_INF / 2),
                                                                 T.exp2(lse[i, c, h] - st[0]), T.float32(0))
                            for v in T.vectorized(4):
                                ov[v] = o[i, c, h, v0 + v]
                            for v in T.unroll(4):
                                acc[v] = acc[v] + w * ov[v]
                            st[1] = st[1] + w
                        for v in T.unroll(4):
                            out[i, h, v0 + v] = T.Cast(dtype, acc[v] / st[1])

    @T.macro
    def merge(o, lse, out, n, s, size):  # merges chunks [0, s) of the size chunks
        if gpu:  # MERGE_GROUPS groups of threads walk the chunks (online), then combine
            for bx in T.thread_binding(n * H, thread="blockIdx.x"):
                for ty in T.thread_binding(i64(MERGE_GROUPS), thread="threadIdx.y"):
                    for tx in T.thread_binding(D // 4, thread="threadIdx.x"):
                        with T.sblock("merge"):
                            T.reads()
                            T.writes()
                            st = T.sblock_alloc_buffer((2,), "float32", scope="local")  # max, sum
                            acc = T.sblock_alloc_buffer((4,), "float32", scope="local")
                            ov = T.sblock_alloc_buffer((4,), "float32", scope="local")
                            acc_sh = T.sblock_alloc_buffer((MERGE_GROUPS, head_dim), "float32", scope="shared")
                            st_sh = T.sblock_alloc_buffer((MERGE_GROUPS, 2), "float32", scope="shared")
                            i: T.let[T.int64] = bx // H
                            h: T.let[T.int64] = bx % H
                            st[0] = T.float32(NEG_INF)
                            st[1] = T.float32(0)
                            for v in T.unroll(4):
                                acc[v] = T.float32(0)
                            for c in T.serial((s + MERGE_GROUPS - 1 - ty) // MERGE_GROUPS):
                                lv: T.let[T.float32] = lse[i, c * MERGE_GROUPS + ty, h]
                                m_new: T.let[T.float32] = T.max(st[0], lv)
                                decay: T.let[T.float32] = T.exp2(st[0] - m_new)
                                w: T.let[T.float32] = T.if_then_else(lv > T.float32(NEG_INF / 2),
                                                                     T.exp2(lv - m_new), T.float32(0))
                                for v in T.vectorized(4):
                                    ov[v] = o[i, c * MERGE_GROUPS + ty, h, tx * 4 + v]
                                for v in T.unroll(4):
                                    acc[v] = acc[v] * decay + w * ov[v]
                                st[1] = st[1] * decay + w
                                st[0] = m_new
                            for v in T.unroll(4):
                                acc_sh[ty, tx * 4 + v] = acc[v]
                            st_sh[ty, 0] = st[0]
                            st_sh[ty, 1] = st[1]
                            T.tvm_storage_sync("shared")
                            if ty == 0:
                                st[0] = T.float32(NEG_INF)
                                for g in T.serial(MERGE_GROUPS):
                                    st[0] = T.max(st[0], st_sh[g, 0])
                                st[1] = T.float32(0)
                                for v in T.unroll(4):
                                    acc[v] = T.float32(0)
                                for g in T.serial(MERGE_GROUPS):
                                    w: T.let[T.float32] = T.exp2(st_sh[g, 0] - st[0])
                                    st[1] = st[1] + st_sh[g, 1] * w
                                    for v in T.unroll(4):
                                        acc[v] = acc[v] + acc_sh[g, tx * 4 + v] * w
                                for v in T.unroll(4):
                                    out[i, h, tx * 4 + v] = T.Cast(dtype, acc[v] / st[1])
        else:
            for bx in T.parallel(n * H):
                with T.sblock("merge"):
                    T.reads()
                    T.writes()
                    w = T.sblock_alloc_buffer((size,), "float32")
                    acc = T.sblock_alloc_buffer((D,), "float32")
                    stat = T.sblock_alloc_buffer((2,), "float32")
                    _merge_stats(lse, bx // H, bx % H, s, stat)
                    for c in T.serial(s):
                        w[c] = T.exp2(lse[bx // H, c, bx % H] - stat[0])
                    for dd in T.vectorized(D):
                        acc[dd] = T.float32(0)
                    for c in T.serial(s):
                        for dd in T.vectorized(D):
                            acc[dd] = acc[dd] + w[c] * o[bx // H, c, bx % H, dd]
                    for dd in T.vectorized(D):
                        out[bx // H, bx % H, dd] = T.Cast(dtype, acc[dd] / stat[1])

    if valid_chunks is not None:

        @T.prim_func(s_tir=True)
        def attention_merge_length(o_h: T.handle, lse_h: T.handle, length_h: T.handle, out_h: T.handle):
            T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
            n, s = T.int64(), T.int64()
            o = T.match_buffer(o_h, (n, s, H, D), "float32")
            lse = T.match_buffer(lse_h, (n, s, H), "float32")
            length = T.match_buffer(length_h, (T.int64(1),), "int32")
            out = T.match_buffer(out_h, (n, H, D), dtype)
            merge(o, lse, out, n, T.min(valid_chunks(T.Cast("int64", length[0])), s), s)

        return attention_merge_length

    @T.prim_func(s_tir=True)
    def attention_merge(o_h: T.handle, lse_h: T.handle, out_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        n, s = T.int64(), T.int64()
        o = T.match_buffer(o_h, (n, s, H, D), "float32")
        lse = T.match_buffer(lse_h, (n, s, H), "float32")
        out = T.match_buffer(out_h, (n, H, D), dtype)
        if gpu and few_chunks:
            merge_threads(o, lse, out, n, s)
        else:
            merge(o, lse, out, n, s, s)

    if gpu and few_chunks:  # a model holds both merges: symbols must differ
        return attention_merge.with_attr("global_symbol", "attention_merge_chunks")
    return attention_merge


@T.macro
def _merge_stats(lse, i, h, s, stat):
    """``stat[0] = max_c lse``, ``stat[1] = sum_c 2^(lse_c - stat[0])``."""
    stat[0] = T.float32(NEG_INF)
    for c in T.serial(s):
        stat[0] = T.max(stat[0], lse[i, c, h])
    stat[1] = T.float32(0)
    for c in T.serial(s):
        stat[1] = stat[1] + T.exp2(lse[i, c, h] - stat[0])
