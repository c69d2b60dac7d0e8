"""GPU decode attention on tensor cores (CUDA sm_80+, float16), flash-decoding over any row list.

Same contract as ``decode_attention.make_decode_attention`` (key ``j`` of ``rows`` at RoPE position
``j``, the query at ``M - 1``; ``mma_splits(M)`` chunks merged by ``attention.make_attention_merge``;
``dense``: rows ``0 .. length[0] - 1`` from a device length and a fixed grid), but with the work per
byte cut so K/V stream at bandwidth:

- one warp per KV head, ``heads_per_block`` of them a block, one block per chunk of rows; the
  warp's GQA group of query heads (rotated to ``M - 1``, scaled by log2(e)/sqrt(d), float16) are the
  rows of an ``mma.m16n8k16`` A tile (rows past the group are zero), so ``S = Q Kᵀ`` and
  ``O += P V`` run on tensor cores with float32 accumulators, with no per-key reduction across
  threads (the SIMT kernel spends most of its instructions on warp shuffles);
- the block's tiles of ``keys`` rows (K and V of its KV heads, and their float32 RoPE rows) are
  copied into shared memory by ``cp.async`` ``stages - 1`` tiles ahead of the one computed (issued
  before waiting for that one, so ``stages - 1`` tiles stay in flight while a block waits); rows
  are padded by 16 bytes (RoPE rows by 32), so ``ldmatrix`` and the RoPE loads are free of bank
  conflicts;
- RoPE is applied to the key fragments in registers: the fragment of dims ``d .. d + 15`` and the
  one of ``d + half ..`` sit in the same thread at the same places (the mma layout depends only on
  the index inside a tile), so a key is rotated (float32, then float16) without leaving the thread;
- online softmax in float32 in the log2 domain (FlashAttention-2: Dao, 2023), the output rescaled
  only when a row's max grows.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .attention import LOG2E, NEG_INF, rope_rotated
from .common import has_mma_sync, i64, max_shared_memory, mma_m16n8k16
from .decode_attention import decode_splits

# KV heads (warps) per block and rows at least per split. Measured on the H200 (kernel + merge a
# layer in a CUDA graph, Llama-3-8B shapes; bench/results/attention_speed_decode_variants_h200.json):
# 4 heads and 32 rows take a Selection Cache hit's 2,688 gathered rows in 11.8 µs (8 heads and 64
# rows: 15.0) and the list 0..M-1 in 6.4 / 13.1 / 51.5 / 174 µs at M = 128 / 4K / 32K / 128K
# (12.9 / 15.4 / 51.2 / 172)
HEADS_PER_BLOCK = 4
MAX_SPLITS = 132  # one wave of one block per SM on a 132-SM H100/H200
MIN_KEYS = 32
KEYS = 16  # rows per shared-memory tile
STAGES = 2
PAD = 8  # float16 elements of padding per K/V row (float32 elements per RoPE row: 32 bytes)
V_GROUP = 4  # ldmatrix.x4 of V fragments loaded before their mma


def fits(n_heads: int, n_kv: int, head_dim: int, dtype: str) -> bool:
    """True for shapes the kernel takes: float16, ``head_dim`` a multiple of 32 (RoPE halves of
    whole 16-dim k-steps) and a GQA group of at most 16 query heads (one mma tile)."""
    return dtype == "float16" and head_dim % 32 == 0 and n_heads % n_kv == 0 and n_heads // n_kv <= 16


def supported(n_heads: int, n_kv: int, head_dim: int, dtype: str, target: Target) -> bool:
    """True where the kernel runs: ``fits`` on CUDA sm_80+."""
    return has_mma_sync(target) and fits(n_heads, n_kv, head_dim, dtype)


def mma_splits(num_keys: "tirx.PrimExpr | int") -> "tirx.PrimExpr | int":
    """Chunks (blocks along x, partial outputs) for ``num_keys`` rows with the default options."""
    return decode_splits(num_keys, MAX_SPLITS, MIN_KEYS)


def _shared_bytes(head_dim: int, warps: int, keys: int, stages: int) -> int:
    stride = head_dim + PAD
    return 2 * warps * 16 * stride + stages * (2 * warps * keys * stride * 2 + keys * (head_dim + PAD) * 4)


def make_decode_attention_mma(num_layers: int, n_heads: int, n_kv: int, head_dim: int, dtype: str,
                              target: Target, dense: bool = False, heads_per_block: int = HEADS_PER_BLOCK,
                              keys: int = KEYS, stages: int = STAGES, max_splits: int = MAX_SPLITS,
                              min_keys: int = MIN_KEYS) -> tirx.PrimFunc:
    """Args: q[1, >= H, d] float16 (the first H heads are the query's), kv[layers, 2, Hkv, cap, d]
    float16, rope[P, d] float32, rows[M] int32 (``dense``: length[1] int32, a device tensor), layer
    (int64).

    Outputs: o[1, S, H, d] float32 (each chunk's normalised output), lse[1, S, H] float32
    (log2-sum-exp of the chunk's scaled scores, ``NEG_INF`` for an empty chunk), ``S =
    decode_splits(M, max_splits, min_keys)`` (``mma_splits`` with the defaults; ``dense``: ``S =
    max_splits``, and the blocks of chunks past ``decode_splits(length, ...)`` load and write
    nothing). ``heads_per_block``: KV heads (warps) per block (the largest divisor of Hkv up to it
    whose block fits the target's shared memory); ``keys``: rows per tile (a multiple of 16);
    ``stages`` (≥ 2): tiles in shared memory. Raises ValueError where ``supported`` is False or no
    block fits the target's shared memory.
    """
    if not supported(n_heads, n_kv, head_dim, dtype, target):
        raise ValueError("tensor-core decode attention needs CUDA sm_80+, float16, head_dim a multiple of 32 "
                         f"and at most 16 query heads per KV head (got {target.kind.name}, {dtype}, head_dim "
                         f"{head_dim}, {n_heads}/{n_kv} heads); use decode_attention.make_decode_attention")
    fitting = [w for w in range(1, heads_per_block + 1)
               if n_kv % w == 0 and _shared_bytes(head_dim, w, keys, stages) <= max_shared_memory(target)]
    if keys % 16 or stages < 2 or not fitting:
        raise ValueError(f"tensor-core decode attention: tiles of {keys} keys x {stages} stages do not fit one "
                         "block's shared memory (keys must be a multiple of 16, stages at least 2)")
    warps = max(fitting)
    group, half = n_heads // n_kv, head_dim // 2
    stride, rstride = head_dim + PAD, head_dim + PAD
    threads = 32 * warps
    k_steps, half_steps = head_dim // 16, half // 16  # k-steps of Q Kᵀ; those of a RoPE half
    d_blocks, key_blocks, pv_steps = head_dim // 8, keys // 8, keys // 16
    row_halves = 2 if group > 8 else 1  # the mma rows r and r + 8 a thread holds that are query heads
    v_group = next(g for g in range(min(V_GROUP, d_blocks // 2), 0, -1) if d_blocks // 2 % g == 0)
    chunks16 = head_dim // 8  # 16-byte pieces of a K or V row
    kv_items = (warps * keys * chunks16 + threads - 1) // threads
    rope_items = (keys * (head_dim // 4) + threads - 1) // threads
    q_items = (warps * group * head_dim + threads - 1) // threads
    zero_items = (warps * (16 - group) * head_dim + threads - 1) // threads
    stage_elems = 2 * warps * keys * stride  # float16: K then V of every warp's head
    scale = LOG2E / math.sqrt(head_dim)
    H, D, HKV, G, W = i64(n_heads), i64(head_dim), i64(n_kv), i64(group), i64(warps)

    def splits_of(m):
        return decode_splits(m, max_splits, min_keys)

    def row_of(rows, j):
        return j if dense else T.Cast("int64", rows[j])

    @T.macro
    def copy_tile(kv, rope, rows, kv_st, r_st, layer, cap, by, t, j0, j1, tid):
        """Issue the copies of tile ``t`` (rows clamped to the chunk's last) into stage ``t % stages``."""
        for it in T.unroll(i64(kv_items)):
            if it * threads + tid < warps * keys * chunks16:
                w: T.let[T.int64] = (it * threads + tid) // (keys * chunks16)
                jj: T.let[T.int64] = (it * threads + tid) // chunks16 % keys
                c: T.let[T.int64] = (it * threads + tid) % chunks16 * 8
                row: T.let[T.int64] = row_of(rows, T.min(j0 + t * keys + jj, j1 - 1))
                dst: T.let[T.int64] = t % stages * stage_elems + (w * 2 * keys + jj) * stride + c
                src: T.let[T.int64] = (((layer * 2) * HKV + by * W + w) * cap + row) * D + c
                T.evaluate(T.s_tir.cp_async_raw.legacy(kv_st.data, dst, kv.data, src, 16, dtype="float16"))
                T.evaluate(T.s_tir.cp_async_raw.legacy(kv_st.data, dst + keys * stride, kv.data, src + HKV * cap * D,
                                                       16, dtype="float16"))
        for it in T.unroll(i64(rope_items)):
            if it * threads + tid < keys * (head_dim // 4):
                jj: T.let[T.int64] = (it * threads + tid) // (head_dim // 4)
                c: T.let[T.int64] = (it * threads + tid) % (head_dim // 4) * 4
                T.evaluate(T.s_tir.cp_async_raw.legacy(
                    r_st.data, (t % stages * keys + jj) * rstride + c, rope.data,
                    T.min(j0 + t * keys + jj, j1 - 1) * D + c, 16, dtype="float32"))

    @T.macro
    def body(q, kv, rope, rows, layer, o, lse, m_keys, cap, grid):
        """Grid ``grid x Hkv / W`` of ``W`` warps."""
        for bx in T.thread_binding(grid, thread="blockIdx.x"):
            for by in T.thread_binding(HKV // W, thread="blockIdx.y"):
                for ty in T.thread_binding(W, thread="threadIdx.y"):
                    for tx in T.thread_binding(T.int64(32), thread="threadIdx.x"):
                        with T.sblock("attn"):
                            T.reads()
                            T.writes()
                            kv_st = T.sblock_alloc_buffer((stages * stage_elems,), "float16", scope="shared.dyn")
                            r_st = T.sblock_alloc_buffer((stages * keys * rstride,), "float32", scope="shared.dyn")
                            q_sh = T.sblock_alloc_buffer((warps * 16 * stride,), "float16", scope="shared.dyn")
                            qf = T.sblock_alloc_buffer((k_steps * 8,), "float16", scope="local")  # A fragments of Q
                            bk = T.sblock_alloc_buffer((k_steps * 8,), "float16", scope="local")  # 16 keys' B fragments
                            cs = T.sblock_alloc_buffer((16,), "float32", scope="local")  # cos | sin of 8 of them
                            sf = T.sblock_alloc_buffer((key_blocks * 4,), "float32", scope="local")
                            pf = T.sblock_alloc_buffer((key_blocks * 4,), "float16", scope="local")
                            bv = T.sblock_alloc_buffer((v_group * 8,), "float16", scope="local")
                            of = T.sblock_alloc_buffer((d_blocks * 4,), "float32", scope="local")
                            m_run = T.sblock_alloc_buffer((2,), "float32", scope="local")  # rows tx/4, tx/4 + 8
                            l_run = T.sblock_alloc_buffer((2,), "float32", scope="local")
                            red = T.sblock_alloc_buffer((2,), "float32", scope="local")
                            tid: T.let[T.int64] = ty * 32 + tx
                            kvh: T.let[T.int64] = by * W + ty
                            chunk: T.let[T.int64] = (m_keys + splits_of(m_keys) - 1) // splits_of(m_keys)
                            j0: T.let[T.int64] = bx * chunk
                            j1: T.let[T.int64] = T.min(j0 + chunk, m_keys)
                            # blocks past the used chunks (dense's fixed grid) load and write nothing
                            tiles: T.let[T.int64] = T.if_then_else(bx < splits_of(m_keys),
                                                                   T.max(j1 - j0 + keys - 1, i64(0)) // keys, i64(0))
                            k_base: T.let[T.int64] = ty * 2 * keys * stride
                            for t in T.unroll(i64(stages - 1)):  # the first tiles' copies
                                if t < tiles:
                                    copy_tile(kv, rope, rows, kv_st, r_st, layer, cap, by, t, j0, j1, tid)
                                T.evaluate(T.ptx.cp.async_.commit_group())
                            for it in T.unroll(i64(q_items)):  # the warps' queries: rotated, scaled, float16
                                w: T.let[T.int64] = (it * threads + tid) // (G * D)
                                g: T.let[T.int64] = (it * threads + tid) // D % G
                                if it * threads + tid < warps * group * head_dim and bx < splits_of(m_keys):
                                    q_sh[(w * 16 + g) * stride + (it * threads + tid) % D] = T.Cast(
                                        "float16", scale * rope_rotated(q, 0, (by * W + w) * G + g,
                                                                        (it * threads + tid) % D, rope, m_keys - 1, half))
                            if group < 16:  # static: the mma rows past the group are zero
                                for it in T.unroll(i64(zero_items)):
                                    if it * threads + tid < warps * (16 - group) * head_dim:
                                        q_sh[((it * threads + tid) // ((16 - group) * D) * 16 + group
                                              + (it * threads + tid) // D % (16 - group)) * stride
                                             + (it * threads + tid) % D] = T.float16(0)
                            for rr in T.unroll(2):
                                m_run[rr] = T.float32(NEG_INF)
                                l_run[rr] = T.float32(0)
                            for e in T.unroll(d_blocks * 4):
                                of[e] = T.float32(0)
                            T.tvm_storage_sync("shared")
                            for ks in T.unroll(k_steps):
                                T.evaluate(T.ptx_legacy.ldmatrix(
                                    False, 4, ".b16", qf.data, ks * 8, q_sh.access_ptr("r"),
                                    (ty * 16 + (tx // 8) % 2 * 8 + tx % 8) * stride + ks * 16 + tx // 16 * 8,
                                    dtype="float16"))
                            for t in T.serial(tiles):
                                stage: T.let[T.int64] = t % stages * stage_elems
                                lim: T.let[T.int64] = j1 - (j0 + t * keys)  # valid rows of the tile
                                T.tvm_storage_sync("shared")  # every warp is done with tile t - 1: its stage is free
                                if t + stages - 1 < tiles:
                                    copy_tile(kv, rope, rows, kv_st, r_st, layer, cap, by, t + stages - 1, j0, j1, tid)
                                T.evaluate(T.ptx.cp.async_.commit_group())
                                T.evaluate(T.ptx.cp.async_.wait_group(stages - 1))  # tile t landed (own copies),
                                T.tvm_storage_sync("shared")  # everyone's; the next stages - 1 tiles stay in flight
                                for e in T.unroll(key_blocks * 4):
                                    sf[e] = T.float32(0)
                                for p in T.unroll(i64(keys // 16)):  # 16 keys: fragments, RoPE, S = Q Kᵀ
                                    for ks in T.unroll(k_steps):
                                        T.evaluate(T.ptx_legacy.ldmatrix(
                                            False, 4, ".b16", bk.data, ks * 8, kv_st.access_ptr("r"),
                                            stage + k_base + (p * 16 + tx // 16 * 8 + tx % 8) * stride
                                            + ks * 16 + (tx // 8) % 2 * 8, dtype="float16"))
                                    for ks in T.unroll(half_steps):  # element e: key p*16 + e//4*8 + tx/4,
                                        for e2 in T.unroll(4):     # dim ks*16 + e//2%2*8 + tx%4*2 + e%2
                                            for v in T.vectorized(2):
                                                cs[e2 * 2 + v] = r_st[
                                                    (t % stages * keys + p * 16 + e2 // 2 * 8 + tx // 4) * rstride
                                                    + ks * 16 + e2 % 2 * 8 + tx % 4 * 2 + v]
                                            for v in T.vectorized(2):
                                                cs[8 + e2 * 2 + v] = r_st[
                                                    (t % stages * keys + p * 16 + e2 // 2 * 8 + tx // 4) * rstride
                                                    + half + ks * 16 + e2 % 2 * 8 + tx % 4 * 2 + v]
                                        for e in T.unroll(8):
                                            red[0] = T.Cast("float32", bk[ks * 8 + e])
                                            red[1] = T.Cast("float32", bk[(ks + half_steps) * 8 + e])
                                            bk[ks * 8 + e] = T.Cast("float16", red[0] * cs[e] - red[1] * cs[8 + e])
                                            bk[(ks + half_steps) * 8 + e] = T.Cast("float16",
                                                                                    red[1] * cs[e] + red[0] * cs[8 + e])
                                    for ks in T.unroll(k_steps):
                                        for nb in T.unroll(2):
                                            mma_m16n8k16(qf, ks * 8, bk, ks * 8 + nb * 4, sf, (p * 2 + nb) * 4)
                                for rr in T.unroll(row_halves):  # mask, online softmax of row tx/4 + 8 rr
                                    red[0] = T.float32(NEG_INF)
                                    for nb in T.unroll(key_blocks):
                                        for c in T.unroll(2):
                                            sf[nb * 4 + rr * 2 + c] = T.if_then_else(
                                                nb * 8 + tx % 4 * 2 + c < lim, sf[nb * 4 + rr * 2 + c], T.float32(NEG_INF))
                                            red[0] = T.max(red[0], sf[nb * 4 + rr * 2 + c])
                                    for r in T.unroll(2):  # over the 4 threads holding the row
                                        red[0] = T.max(red[0], T.tvm_warp_shuffle(
                                            T.uint32(0xFFFFFFFF), red[0], tx ^ (T.int64(1) << r), 32, 32))
                                    red[1] = T.max(m_run[rr], red[0])  # new running max
                                    red[0] = T.exp2(m_run[rr] - red[1])  # decay of the old state
                                    m_run[rr] = red[1]
                                    l_run[rr] = l_run[rr] * red[0]
                                    if red[0] < T.float32(1):  # the row max grew: rescale
                                        for nd in T.unroll(d_blocks):
                                            for c in T.unroll(2):
                                                of[nd * 4 + rr * 2 + c] = of[nd * 4 + rr * 2 + c] * red[0]
                                    for nb in T.unroll(key_blocks):
                                        for c in T.unroll(2):
                                            sf[nb * 4 + rr * 2 + c] = T.if_then_else(
                                                sf[nb * 4 + rr * 2 + c] > T.float32(NEG_INF / 2),
                                                T.exp2(sf[nb * 4 + rr * 2 + c] - red[1]), T.float32(0))
                                            l_run[rr] = l_run[rr] + sf[nb * 4 + rr * 2 + c]
                                for nb in T.unroll(key_blocks):  # P as A fragments (the layout of S)
                                    for e in T.unroll(4):
                                        pf[nb * 4 + e] = T.if_then_else(e // 2 < row_halves, T.Cast("float16", sf[nb * 4 + e]),
                                                                        T.float16(0))
                                for kk in T.unroll(pv_steps):  # O += P V
                                    for vg in T.unroll(d_blocks // 2 // v_group):
                                        for nd in T.unroll(v_group):
                                            T.evaluate(T.ptx_legacy.ldmatrix(
                                                True, 4, ".b16", bv.data, nd * 8, kv_st.access_ptr("r"),
                                                stage + k_base + keys * stride + (kk * 16 + (tx // 8) % 2 * 8 + tx % 8) * stride
                                                + (2 * (vg * v_group + nd) + tx // 16) * 8, dtype="float16"))
                                        for nd in T.unroll(2 * v_group):
                                            mma_m16n8k16(pf, kk * 8, bv, nd * 4, of, (vg * 2 * v_group + nd) * 4)
                            for rr in T.unroll(row_halves):  # normalise, write the chunk's output
                                red[0] = l_run[rr]
                                for r in T.unroll(2):
                                    red[0] = red[0] + T.tvm_warp_shuffle(
                                        T.uint32(0xFFFFFFFF), red[0], tx ^ (T.int64(1) << r), 32, 32)
                                if tx // 4 + 8 * rr < G and bx < splits_of(m_keys):
                                    for nd in T.unroll(d_blocks):
                                        for c in T.unroll(2):
                                            o[0, bx, kvh * G + tx // 4 + 8 * rr, nd * 8 + tx % 4 * 2 + c] = T.if_then_else(
                                                red[0] > T.float32(0), of[nd * 4 + rr * 2 + c] / red[0], T.float32(0))
                                    if tx % 4 == 0:
                                        lse[0, bx, kvh * G + tx // 4 + 8 * rr] = T.if_then_else(
                                            red[0] > T.float32(0), m_run[rr] + T.log2(red[0]), T.float32(NEG_INF))

    if dense:

        @T.prim_func(s_tir=True)
        def attention_decode_dense(q_h: T.handle, kv_h: T.handle, rope_h: T.handle, length_h: T.handle,
                                   layer: T.int64, o_h: T.handle, lse_h: T.handle):
            T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
            n, cap, num_pos, heads = T.int64(), T.int64(), T.int64(), T.int64()
            q = T.match_buffer(q_h, (n, heads, D), "float16")
            kv = T.match_buffer(kv_h, (num_layers, T.int64(2), HKV, cap, D), "float16")
            rope = T.match_buffer(rope_h, (num_pos, D), "float32")
            length = T.match_buffer(length_h, (T.int64(1),), "int32")
            o = T.match_buffer(o_h, (n, i64(max_splits), H, D), "float32")
            lse = T.match_buffer(lse_h, (n, i64(max_splits), H), "float32")
            body(q, kv, rope, None, layer, o, lse, T.Cast("int64", length[0]), cap, i64(max_splits))

        return attention_decode_dense

    @T.prim_func(s_tir=True)
    def attention_decode(q_h: T.handle, kv_h: T.handle, rope_h: T.handle, rows_h: T.handle,
                         layer: T.int64, o_h: T.handle, lse_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        n, cap, num_pos, m_keys, heads = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (n, heads, D), "float16")
        kv = T.match_buffer(kv_h, (num_layers, T.int64(2), HKV, cap, D), "float16")
        rope = T.match_buffer(rope_h, (num_pos, D), "float32")
        rows = T.match_buffer(rows_h, (m_keys,), "int32")
        o = T.match_buffer(o_h, (n, splits_of(m_keys), H, D), "float32")
        lse = T.match_buffer(lse_h, (n, splits_of(m_keys), H), "float32")
        body(q, kv, rope, rows, layer, o, lse, m_keys, cap, splits_of(m_keys))

    return attention_decode
