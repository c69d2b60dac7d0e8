"""GPU decode attention (one query token) over any list of cached rows, flash-decoding style.

Same contract as ``attention.make_attention_partial`` (key ``j`` of ``rows`` at RoPE position ``j``,
the query at ``M - 1``, partial outputs merged by ``attention.make_attention_merge``), but laid
out for one query: the ``M`` rows are split into ``decode_splits(M)`` chunks, one block each, so
the whole GPU streams K/V at any length (Dao et al., "Flash-Decoding for long-context
inference", 2023).

A block walks its chunk in tiles of ``tile_keys`` rows of every KV head: the tiles' K and V rows
and their RoPE table rows are copied into shared memory ``stages - 1`` tiles ahead of the one being
computed (``cp.async`` on sm_80+, so the copies need no registers and many are in flight, as
FlashInfer's decode kernels and CUTLASS's multistage pipelines do; plain 16-byte copies
elsewhere). Inside a block, ``THREADS // (head_dim / VEC)`` slots of ``head_dim / VEC`` threads
each own one KV head and take every ``per_head``-th row of a tile; a thread reads 16 bytes of a
key, of its rotate-half partner and of a value, and the row's cos/sin, from shared memory, and
rotates its part of the key itself. The query is rotated once (to position ``M - 1``). A key's
scores for the GQA group's query heads are summed over the slot's threads by one butterfly of
warp shuffles whose chains interleave (every thread ends with every sum). All softmax arithmetic
is float32 (log2 domain).
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .attention import LOG2E, NEG_INF, rope_rotated
from .attention import check_sets, rows_kernel
from .common import has_mma_sync, i64, is_gpu, max_shared_memory

THREADS = 256  # threads per block
MIN_KEYS_PER_SPLIT = 8
MAX_SPLITS = 256  # about two blocks per multiprocessor on a 132-SM H100/H200
TILE_BYTES = 32768  # K and V bytes of one tile (all KV heads): the default tile_keys
STAGES = 2  # tiles in shared memory: one computed, the others in flight


def decode_splits(num_keys: "tirx.PrimExpr | int", max_splits: int = MAX_SPLITS,
                  min_keys: int = MIN_KEYS_PER_SPLIT) -> "tirx.PrimExpr | int":
    """Chunks (blocks, partial outputs) for ``num_keys`` rows: ≥ ``min_keys`` (8) keys each, at
    most ``max_splits`` (256) chunks."""
    per_min = (num_keys + min_keys - 1) // min_keys
    if isinstance(per_min, int):
        return min(per_min, max_splits)
    return tirx.min(per_min, i64(max_splits))


def make_decode_attention(num_layers: int, n_heads: int, n_kv: int, head_dim: int, dtype: str,
                          target: Target, tile_keys: int | None = None, stages: int = STAGES,
                          row_sets: int = 0, logit_sets: int = 0, dense: bool = False,
                          max_splits: int = MAX_SPLITS, min_keys: int = MIN_KEYS_PER_SPLIT,
                          counted: bool = False) -> tirx.PrimFunc:
    """Args: q[1, >= H, d] (the first H heads are the query's), kv[layers, 2, Hkv, cap, d],
    rope[P, d] f32, rows[M] int32, layer (int64).

    Outputs: o[1, S, H, d] float32 (each chunk's normalised output), lse[1, S, H] float32
    (log2-sum-exp of the chunk's scaled scores, ``NEG_INF`` for an empty chunk), with
    ``S = decode_splits(M)``. ``tile_keys``: rows per shared-memory tile (default: about
    ``TILE_BYTES`` of K and V, a multiple of the slots per KV head); ``stages``: tiles in shared
    memory (≥ 2). Raises ValueError for a CPU target (CPU decode uses ``attention_partial``), a
    ``head_dim`` that is not a multiple of 16 bytes' elements, or a block over the shared memory.

    ``row_sets`` and ``logit_sets`` (TidalDecode) are ``attention_partial``'s options: per-set row
    lists ``rows[row_sets, M]`` at true positions (the slots then own row sets, each set's keys
    and RoPE rows gathered into the tiles), or the extra output logits[logit_sets, M] float32
    (``q.k / sqrt(d) * log2(e)``, per KV head the group's max). Both 0: the kernel is unchanged.
    ``counted`` (with ``row_sets``; Recycled Attention's active K): the argument count[1] int32 (a
    device tensor) follows ``rows``, and each set attends to its first ``c = clamp(count[0], 1, M)``
    rows only (the query at ``rows[set, c - 1]``); the ``S = decode_splits(M)`` chunks split those
    ``c`` rows as ``decode_splits(c)`` chunks would, the others written empty. Raises ValueError
    for ``counted`` without ``row_sets``.

    ``dense``: the rows are ``0 .. length[0] - 1`` at their true positions, and the argument after
    ``rope`` is length[1] int32 (a device tensor) instead of ``rows``; the grid and the outputs
    then have ``S = max_splits`` chunks whatever the length (``min_keys``: rows at least per chunk) (the chunks past
    ``decode_splits(length, max_splits)`` write nothing; ``attention_merge`` built with ``dense`` skips
    them), so a decode step's kernels keep their arguments and grids from step to step and the
    step replays as one CUDA graph.
    """
    if not is_gpu(target):
        raise ValueError(f"decode attention is a GPU kernel; {target.kind.name} uses attention_partial")
    check_sets(n_heads, n_kv, row_sets, logit_sets)
    if counted and not row_sets:
        raise ValueError("decode attention: counted is an option of row_sets (per-set row lists)")
    per_set = row_sets > 0  # static: per-set row lists at true positions
    n_kv_phys, n_kv = n_kv, row_sets or n_kv  # below, n_kv counts the slots' row sets
    group = n_heads // n_kv
    half = head_dim // 2
    esize = 2 if dtype == "float16" else 4
    vec = 16 // esize  # elements in 16 bytes
    if half % vec:
        raise ValueError(f"GPU decode attention needs head_dim a multiple of {2 * vec}, got {head_dim}")
    td = head_dim // vec  # threads per key row
    per_head = max(1, THREADS // td // n_kv)  # slots walking one KV head's keys
    slots = per_head * n_kv
    threads = slots * td
    row_bytes = 2 * n_kv * head_dim * esize  # K and V of one row, every KV head
    scratch = n_kv * (per_head - 1) * group * (head_dim + 2)  # float32: the other slots' states

    rope_sets = n_kv if per_set else 1  # RoPE rows per key of a tile

    def smem(keys: int) -> int:  # bytes: K/V tiles and float32 RoPE rows, the RoPE rows' buffer doubling as scratch
        return stages * keys * row_bytes + 4 * max(stages * keys * head_dim * rope_sets, scratch)

    limit = max_shared_memory(target)
    if tile_keys is None:  # about TILE_BYTES, a multiple of per_head, within the limit
        tile_keys = max(per_head, TILE_BYTES // row_bytes // per_head * per_head)
        while tile_keys > per_head and smem(tile_keys) > limit:
            tile_keys -= per_head
    if threads > 1024 or stages < 2 or tile_keys % per_head or smem(tile_keys) > limit:
        raise ValueError(f"GPU decode attention: {n_kv} KV heads x head_dim {head_dim} in tiles of "
                         f"{tile_keys} rows x {stages} stages do not fit one block")
    r_size = smem(tile_keys) // 4 - stages * tile_keys * row_bytes // 4
    async_copy = has_mma_sync(target)  # cp.async: sm_80+
    scale = LOG2E / math.sqrt(head_dim)
    REDUCE_STEPS = int(math.log2(td))
    H, D, HKV, PHYS = i64(n_heads), i64(head_dim), i64(n_kv), i64(n_kv_phys)
    G, V, PH, TK, KS = i64(group), i64(vec), i64(per_head), i64(tile_keys), i64(tile_keys // per_head)
    row_chunks = n_kv * td  # 16-byte pieces of one row of every KV head
    kv_items = (tile_keys * row_chunks + threads - 1) // threads
    rope_chunks = head_dim // 4  # 16-byte pieces of a float32 RoPE row
    rope_items = (tile_keys * rope_sets * rope_chunks + threads - 1) // threads
    kv_group = n_heads // n_kv_phys

    def phys(h):  # the KV head a row set reads
        return h * group // kv_group if per_set else h

    def row_of(rows, h, j):
        if dense:
            return j
        return rows[h, j] if per_set else rows[j]

    def rope_of(rows, h, j):  # the RoPE row of list entry j: its true position, or j
        return T.Cast("int64", rows[h, j]) if per_set else j

    def rope_off(key, h):  # a tile row's RoPE row in r_sh
        return (key * HKV + h) * D if per_set else key * D

    @T.macro
    def copy16(dst, dst_off, src, src_off, src_flat, lanes, elem):
        if async_copy:
            T.evaluate(T.s_tir.cp_async_raw.legacy(dst.data, dst_off, src.data, src_off, 16, dtype=elem))
        else:
            for v in T.vectorized(lanes):
                dst[dst_off + v] = src_flat[src_off + v]

    @T.macro
    def copy_tile(kv, kv_flat, rope, rope_flat, rows, k_sh, v_sh, r_sh, layer, cap, t, j0, j1, tid):
        """Issue the copies of tile ``t`` (rows ``j0 + t TK ...``, clamped to the chunk's last row)
        into stage ``t % stages``."""
        for it in T.unroll(i64(kv_items)):
            if it * threads + tid < tile_keys * row_chunks:
                key: T.let[T.int64] = (it * threads + tid) // row_chunks
                h: T.let[T.int64] = (it * threads + tid) // td % HKV
                c: T.let[T.int64] = (it * threads + tid) % td
                row: T.let[T.int64] = T.Cast("int64", row_of(rows, h, T.min(j0 + t * TK + key, j1 - 1)))
                dst: T.let[T.int64] = ((t % stages * TK + key) * HKV + h) * D + c * V
                copy16(k_sh, dst, kv, (((layer * 2) * PHYS + phys(h)) * cap + row) * D + c * V, kv_flat, V, dtype)
                copy16(v_sh, dst, kv, (((layer * 2 + 1) * PHYS + phys(h)) * cap + row) * D + c * V, kv_flat, V, dtype)
        for it in T.unroll(i64(rope_items)):
            if it * threads + tid < tile_keys * rope_sets * rope_chunks:
                key: T.let[T.int64] = (it * threads + tid) // (rope_sets * rope_chunks)
                c: T.let[T.int64] = (it * threads + tid) % rope_chunks
                copy16(r_sh, rope_off(t % stages * TK + key, (it * threads + tid) // rope_chunks % rope_sets) + c * 4,
                       rope, rope_of(rows, (it * threads + tid) // rope_chunks % rope_sets,
                                     T.min(j0 + t * TK + key, j1 - 1)) * D + c * 4, rope_flat, 4, "float32")

    @T.macro
    def write_logits(logits, part, mx, jt, j1, kvh, lane, tx):
        """Logits of this slot's rows of the tile (one thread per slot writes)."""
        if tx == 0:
            for kk in T.unroll(KS):
                if jt + kk * PH + lane < j1:
                    if logit_sets == n_heads:
                        for g in T.unroll(G):
                            logits[kvh * group + g, jt + kk * PH + lane] = part[kk, g]
                    else:
                        mx[0] = part[kk, 0]
                        for g in T.unroll(G):
                            mx[0] = T.max(mx[0], part[kk, g])
                        logits[kvh, jt + kk * PH + lane] = mx[0]

    def splits_of(m):
        return decode_splits(m, max_splits, min_keys)

    @T.macro
    def body(q, kv, rope, rows, layer, o, lse, logits, kv_flat, rope_flat, m_keys, cap, grid, m_rows):
        # m_keys: the rows' (and the outputs') size; m_rows <= m_keys: the rows attended
        for bx in T.thread_binding(grid, thread="blockIdx.x"):
            for ty in T.thread_binding(i64(slots), thread="threadIdx.y"):
                for tx in T.thread_binding(i64(td), thread="threadIdx.x"):
                    with T.sblock("attn"):
                        T.reads()
                        T.writes()
                        k_sh = T.sblock_alloc_buffer((stages * tile_keys * n_kv * head_dim,), dtype, scope="shared.dyn")
                        v_sh = T.sblock_alloc_buffer((stages * tile_keys * n_kv * head_dim,), dtype, scope="shared.dyn")
                        r_sh = T.sblock_alloc_buffer((r_size,), "float32", scope="shared.dyn")  # RoPE rows; scratch
                        qa = T.sblock_alloc_buffer((group, vec), "float32", scope="local")
                        acc = T.sblock_alloc_buffer((group, vec), "float32", scope="local")
                        m_run = T.sblock_alloc_buffer((group,), "float32", scope="local")
                        d_run = T.sblock_alloc_buffer((group,), "float32", scope="local")
                        kh = T.sblock_alloc_buffer((2, vec), dtype, scope="local")  # own, partner
                        vh = T.sblock_alloc_buffer((vec,), dtype, scope="local")
                        cs = T.sblock_alloc_buffer((2, vec), "float32", scope="local")
                        kr = T.sblock_alloc_buffer((vec,), "float32", scope="local")
                        part = T.sblock_alloc_buffer((tile_keys // per_head, group), "float32", scope="local")
                        m_new = T.sblock_alloc_buffer((group,), "float32", scope="local")
                        merged = T.sblock_alloc_buffer((2,), "float32", scope="local")
                        out = T.sblock_alloc_buffer((vec,), "float32", scope="local")
                        tid: T.let[T.int64] = ty * i64(td) + tx
                        kvh: T.let[T.int64] = ty // PH
                        lane: T.let[T.int64] = ty % PH
                        d0: T.let[T.int64] = tx * V
                        dp: T.let[T.int64] = (d0 + half) % head_dim  # the partner dims under RoPE
                        sign: T.let[T.float32] = T.if_then_else(d0 < half, T.float32(-1), T.float32(1))
                        chunk: T.let[T.int64] = (m_rows + splits_of(m_rows) - 1) // splits_of(m_rows)
                        j0: T.let[T.int64] = bx * chunk
                        j1: T.let[T.int64] = T.min(j0 + chunk, m_rows)
                        tiles: T.let[T.int64] = T.max(j1 - j0 + TK - 1, i64(0)) // TK
                        for t in T.unroll(i64(stages - 1)):  # the first tiles' copies
                            if t < tiles:
                                copy_tile(kv, kv_flat, rope, rope_flat, rows, k_sh, v_sh, r_sh, layer, cap, t, j0, j1, tid)
                            if async_copy:
                                T.evaluate(T.ptx.cp.async_.commit_group())
                        for g in T.unroll(G):  # the query, rotated to its position M - 1
                            m_run[g] = T.float32(NEG_INF)
                            d_run[g] = T.float32(0)
                            for v in T.unroll(V):
                                acc[g, v] = T.float32(0)
                                qa[g, v] = rope_rotated(q, 0, kvh * group + g, d0 + v, rope,
                                                        rope_of(rows, kvh, m_rows - 1), half) * scale
                        for t in T.serial(tiles):
                            if async_copy:
                                T.evaluate(T.ptx.cp.async_.wait_group(stages - 2))  # tile t landed (own copies)
                            T.tvm_storage_sync("shared")  # everyone's; and stage (t - 1) % stages is free
                            if t + stages - 1 < tiles:
                                copy_tile(kv, kv_flat, rope, rope_flat, rows, k_sh, v_sh, r_sh, layer, cap,
                                          t + stages - 1, j0, j1, tid)
                            if async_copy:
                                T.evaluate(T.ptx.cp.async_.commit_group())
                            for kk in T.unroll(KS):  # this slot's rows of the tile: scores
                                key: T.let[T.int64] = t % stages * TK + kk * PH + lane  # row of the stage
                                for v in T.vectorized(V):
                                    kh[0, v] = k_sh[(key * HKV + kvh) * D + d0 + v]
                                for v in T.vectorized(V):
                                    kh[1, v] = k_sh[(key * HKV + kvh) * D + dp + v]
                                for v in T.vectorized(V):
                                    cs[0, v] = r_sh[rope_off(key, kvh) + d0 % half + v]
                                for v in T.vectorized(V):
                                    cs[1, v] = r_sh[rope_off(key, kvh) + half + d0 % half + v]
                                for v in T.unroll(V):  # the key, rotated to its position
                                    kr[v] = (T.Cast("float32", kh[0, v]) * cs[0, v]
                                             + sign * T.Cast("float32", kh[1, v]) * cs[1, v])
                                for g in T.unroll(G):
                                    part[kk, g] = T.float32(0)
                                    for v in T.unroll(V):
                                        part[kk, g] = part[kk, g] + kr[v] * qa[g, v]
                            for r in T.unroll(i64(REDUCE_STEPS)):  # butterfly: every lane gets each sum
                                for kk in T.unroll(KS):  # the rows' and heads' shuffles are independent
                                    for g in T.unroll(G):
                                        part[kk, g] = part[kk, g] + T.tvm_warp_shuffle(
                                            T.uint32(0xFFFFFFFF), part[kk, g], tx ^ (i64(td // 2) >> r), td, 32)
                            if logit_sets > 0:  # static: the scores are the selection's logits
                                write_logits(logits, part, merged, j0 + t * TK, j1, kvh, lane, tx)
                            for g in T.unroll(G):  # one online-softmax step per tile
                                m_new[g] = m_run[g]
                                for kk in T.unroll(KS):
                                    if j0 + t * TK + kk * PH + lane < j1:
                                        m_new[g] = T.max(m_new[g], part[kk, g])
                                decay: T.let[T.float32] = T.exp2(m_run[g] - m_new[g])
                                m_run[g] = m_new[g]
                                d_run[g] = d_run[g] * decay
                                for v in T.unroll(V):
                                    acc[g, v] = acc[g, v] * decay
                                for kk in T.unroll(KS):
                                    part[kk, g] = T.if_then_else(j0 + t * TK + kk * PH + lane < j1,
                                                                 T.exp2(part[kk, g] - m_new[g]), T.float32(0))
                                    d_run[g] = d_run[g] + part[kk, g]
                            for kk in T.unroll(KS):  # the values
                                for v in T.vectorized(V):
                                    vh[v] = v_sh[((t % stages * TK + kk * PH + lane) * HKV + kvh) * D + d0 + v]
                                for g in T.unroll(G):
                                    for v in T.unroll(V):
                                        acc[g, v] = acc[g, v] + part[kk, g] * T.Cast("float32", vh[v])
                        T.tvm_storage_sync("shared")  # the tiles are done: their RoPE rows become scratch
                        if lane > 0:  # the other slots of a KV head hand their state to its first slot
                            for g in T.unroll(G):
                                for v in T.unroll(V):
                                    r_sh[((kvh * (PH - 1) + lane - 1) * G + g) * (D + 2) + d0 + v] = acc[g, v]
                                if tx == 0:
                                    r_sh[((kvh * (PH - 1) + lane - 1) * G + g) * (D + 2) + D] = m_run[g]
                                    r_sh[((kvh * (PH - 1) + lane - 1) * G + g) * (D + 2) + D + 1] = d_run[g]
                        T.tvm_storage_sync("shared")
                        if lane == 0 and bx < splits_of(m_keys):  # merge the slots of this KV head
                            for g in T.unroll(G):
                                merged[0] = m_run[g]
                                for w in T.serial(PH - 1):
                                    merged[0] = T.max(merged[0], r_sh[((kvh * (PH - 1) + w) * G + g) * (D + 2) + D])
                                merged[1] = d_run[g] * T.exp2(m_run[g] - merged[0])
                                for v in T.unroll(V):
                                    out[v] = acc[g, v] * T.exp2(m_run[g] - merged[0])
                                for w in T.serial(PH - 1):
                                    other: T.let[T.int64] = ((kvh * (PH - 1) + w) * G + g) * (D + 2)
                                    merged[1] = merged[1] + r_sh[other + D + 1] * T.exp2(r_sh[other + D] - merged[0])
                                    for v in T.unroll(V):
                                        out[v] = out[v] + r_sh[other + d0 + v] * T.exp2(r_sh[other + D] - merged[0])
                                for v in T.unroll(V):
                                    o[0, bx, kvh * group + g, d0 + v] = T.if_then_else(
                                        merged[1] > T.float32(0), out[v] / merged[1], T.float32(0))
                                if tx == 0:
                                    lse[0, bx, kvh * group + g] = T.if_then_else(
                                        merged[1] > T.float32(0), merged[0] + T.log2(merged[1]), T.float32(NEG_INF))


    if logit_sets:

        @T.prim_func(s_tir=True)
        def attention_decode_logits(q_h: T.handle, kv_h: T.handle, rope_h: T.handle, rows_h: T.handle,
                                    layer: T.int64, o_h: T.handle, lse_h: T.handle, logits_h: T.handle):
            T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
            n, cap, num_pos, m_keys, heads = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            q = T.match_buffer(q_h, (n, heads, D), dtype)
            kv = T.match_buffer(kv_h, (num_layers, T.int64(2), PHYS, cap, D), dtype)
            rope = T.match_buffer(rope_h, (num_pos, D), "float32")
            rows = T.match_buffer(rows_h, (m_keys,), "int32")
            o = T.match_buffer(o_h, (n, splits_of(m_keys), H, D), "float32")
            lse = T.match_buffer(lse_h, (n, splits_of(m_keys), H), "float32")
            logits = T.match_buffer(logits_h, (i64(max(logit_sets, 1)), m_keys), "float32")
            kv_flat = T.decl_buffer((num_layers * 2 * PHYS * cap * D,), dtype, data=kv.data)
            rope_flat = T.decl_buffer((num_pos * D,), "float32", data=rope.data)
            body(q, kv, rope, rows, layer, o, lse, logits, kv_flat, rope_flat, m_keys, cap, splits_of(m_keys),
                 m_keys)

        return attention_decode_logits

    if dense:

        @T.prim_func(s_tir=True)
        def attention_decode_dense(q_h: T.handle, kv_h: T.handle, rope_h: T.handle, length_h: T.handle,
                                   layer: T.int64, o_h: T.handle, lse_h: T.handle):
            T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
            n, cap, num_pos, heads = T.int64(), T.int64(), T.int64(), T.int64()
            q = T.match_buffer(q_h, (n, heads, D), dtype)
            kv = T.match_buffer(kv_h, (num_layers, T.int64(2), PHYS, cap, D), dtype)
            rope = T.match_buffer(rope_h, (num_pos, D), "float32")
            length = T.match_buffer(length_h, (T.int64(1),), "int32")
            o = T.match_buffer(o_h, (n, i64(max_splits), H, D), "float32")
            lse = T.match_buffer(lse_h, (n, i64(max_splits), H), "float32")
            kv_flat = T.decl_buffer((num_layers * 2 * PHYS * cap * D,), dtype, data=kv.data)
            rope_flat = T.decl_buffer((num_pos * D,), "float32", data=rope.data)
            body(q, kv, rope, None, layer, o, lse, None, kv_flat, rope_flat, T.Cast("int64", length[0]), cap,
                 i64(max_splits), T.Cast("int64", length[0]))

        return attention_decode_dense

    @T.macro
    def sparse(q_h, kv_h, rope_h, rows_h, layer, o_h, lse_h, m_keys, m_rows):
        n, cap, num_pos, heads = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (n, heads, D), dtype)  # queries: the first H heads
        kv = T.match_buffer(kv_h, (num_layers, T.int64(2), PHYS, cap, D), dtype)
        rope = T.match_buffer(rope_h, (num_pos, D), "float32")
        rows = T.match_buffer(rows_h, (HKV, m_keys) if per_set else (m_keys,), "int32")
        o = T.match_buffer(o_h, (n, splits_of(m_keys), H, D), "float32")
        lse = T.match_buffer(lse_h, (n, splits_of(m_keys), H), "float32")
        kv_flat = T.decl_buffer((num_layers * 2 * PHYS * cap * D,), dtype, data=kv.data)
        rope_flat = T.decl_buffer((num_pos * D,), "float32", data=rope.data)
        body(q, kv, rope, rows, layer, o, lse, None, kv_flat, rope_flat, m_keys, cap, splits_of(m_keys), m_rows)

    return rows_kernel(sparse, counted, "attention_decode" + ("_sets" if per_set else "")
                       + ("_counted" if counted else ""))
