"""TokenSelect's scoring pass on tensor cores (CUDA sm_80+, float16 caches).

The first of ``tokenselect_scoring.make_scoring``'s passes — per query head ``h`` the scores
``q̄[h] · k`` of every candidate (keys as cached, without RoPE) and each chunk's online-softmax
max and sum — as a GEMM: one warp per (chunk of candidates, KV head); the group's fingerprints are
the rows of an ``mma.m16n8k16`` A tile and 16-key tiles of K, copied by ``cp.async`` into padded
shared memory (conflict-free ``ldmatrix``), are its B operand, so the per-key work is a few tensor
instructions instead of ``head_dim`` multiply-adds and shared-memory reads per query head.

The fingerprint is float32 and the keys float16: row ``r`` of the A tile holds ``hi = fp16(q̄)``
and row ``r + 8`` ``lo = fp16(q̄ - hi)``, so ``S[r] + S[r + 8]`` (both in the same thread of the
accumulator layout) is the float32 score to about 2^-22 relative — the selection matches the
SIMT kernel's and the CPU's, not a float16 rounding of it.
"""

from __future__ import annotations

from tvm.script import tirx as T
from tvm.target import Target

from .common import has_mma_sync, i64, mma_m16n8k16

KEYS = 16  # candidates per shared-memory tile
STAGES = 2
PAD = 8  # float16 elements of padding per key row


def fits(n_heads: int, n_kv: int, head_dim: int, dtype: str, target: Target) -> bool:
    """True where the pass runs: CUDA sm_80+, float16, ``head_dim`` a multiple of 16 and at most 8
    query heads per KV head (their hi and lo rows fill one mma tile)."""
    return (has_mma_sync(target) and dtype == "float16" and head_dim % 16 == 0
            and n_heads % n_kv == 0 and n_heads // n_kv <= 8)


def make_score_pass(num_layers: int, n_heads: int, n_kv: int, head_dim: int, n_init: int, offset: int,
                    chunks: int, online_update, merge_partial, neg: float):
    """A TIR macro ``(qbar, kv, state, layer, length, scores, partials)``: for chunk ``b`` of
    ``chunks`` and KV head ``g``, ``scores[h, t] = qbar[h] · kv[layer, 0, g, n_init + t]`` (float32)
    for the chunk's candidates ``t < C = length[0] - offset`` and ``partials[h, b] = (max, sum of
    exp(score - max))`` for each query head ``h`` of the group; nothing when ``state[layer, 0]`` is
    1 (a Selection Cache hit). ``online_update`` / ``merge_partial``: the caller's online-softmax
    macros on 1-element (m, z) buffers, and ``neg`` its finite minus infinity (an empty state's
    max), so both passes keep one rule.
    """
    group = n_heads // n_kv
    stride = head_dim + PAD
    k_steps = head_dim // 16
    chunks16 = head_dim // 8  # 16-byte pieces of a key row
    kv_items = (KEYS * chunks16 + 31) // 32
    q_items = (16 * head_dim + 31) // 32
    stage_elems = KEYS * stride
    D, HKV, G, NB = i64(head_dim), i64(n_kv), i64(group), i64(chunks)

    @T.macro
    def copy_tile(kv, k_st, layer, cap, g, t, j0, j1, tx):
        """Copies of tile ``t`` (candidates clamped to the chunk's last) into stage ``t % STAGES``."""
        for it in T.unroll(i64(kv_items)):
            if it * 32 + tx < KEYS * chunks16:
                jj: T.let[T.int64] = (it * 32 + tx) // chunks16
                c: T.let[T.int64] = (it * 32 + tx) % chunks16 * 8
                row: T.let[T.int64] = n_init + T.min(j0 + t * KEYS + jj, j1 - 1)
                T.evaluate(T.s_tir.cp_async_raw.legacy(
                    k_st.data, t % STAGES * stage_elems + jj * stride + c, kv.data,
                    (((layer * 2) * HKV + g) * cap + row) * D + c, 16, dtype="float16"))

    @T.macro
    def score_pass(qbar, kv, state, layer, length, scores, partials, cap):
        for b in T.thread_binding(NB, thread="blockIdx.x"):
            for g in T.thread_binding(HKV, thread="blockIdx.y"):
                for tx in T.thread_binding(T.int64(32), thread="threadIdx.x"):
                    with T.sblock("score_mma"):
                        T.reads()
                        T.writes()
                        k_st = T.sblock_alloc_buffer((STAGES * stage_elems,), "float16", scope="shared")
                        q_sh = T.sblock_alloc_buffer((16 * stride,), "float16", scope="shared")
                        qf = T.sblock_alloc_buffer((k_steps * 8,), "float16", scope="local")
                        bk = T.sblock_alloc_buffer((8,), "float16", scope="local")
                        sf = T.sblock_alloc_buffer((8,), "float32", scope="local")
                        m = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        z = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        sc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        other = T.sblock_alloc_buffer((2,), "float32", scope="local")  # a partner's (m, z)
                        C: T.let[T.int64] = T.Cast("int64", length[0]) - offset
                        j0: T.let[T.int64] = b * T.ceildiv(C, NB)
                        j1: T.let[T.int64] = T.min(j0 + T.ceildiv(C, NB), C)
                        miss: T.let[T.bool] = state[layer, 0] == 0
                        tiles: T.let[T.int64] = T.max(j1 - j0 + KEYS - 1, i64(0)) // KEYS
                        for _ in range(T.Cast("int64", miss)):  # nothing on a hit (no early return: barriers)
                            for t in T.unroll(i64(STAGES - 1)):
                                if t < tiles:
                                    copy_tile(kv, k_st, layer, cap, g, t, j0, j1, tx)
                                T.evaluate(T.ptx.cp.async_.commit_group())
                            for it in T.unroll(i64(q_items)):  # rows r < G: fp16(q̄), rows 8 + r: the remainder
                                r: T.let[T.int64] = (it * 32 + tx) // D
                                h: T.let[T.int64] = g * G + r % 8
                                q_sh[r * stride + (it * 32 + tx) % D] = T.if_then_else(
                                    r % 8 < G, T.if_then_else(
                                        r < 8, T.Cast("float16", qbar[h, (it * 32 + tx) % D]),
                                        T.Cast("float16", qbar[h, (it * 32 + tx) % D] - T.Cast(
                                            "float32", T.Cast("float16", qbar[h, (it * 32 + tx) % D])))),
                                    T.float16(0))
                            T.tvm_storage_sync("shared")
                            for ks in T.unroll(k_steps):
                                T.evaluate(T.ptx_legacy.ldmatrix(
                                    False, 4, ".b16", qf.data, ks * 8, q_sh.access_ptr("r"),
                                    ((tx // 8) % 2 * 8 + tx % 8) * stride + ks * 16 + tx // 16 * 8, dtype="float16"))
                            m[0] = T.float32(neg)
                            z[0] = T.float32(0)
                            for t in T.serial(tiles):
                                T.tvm_storage_sync("shared")  # the warp is done with tile t - 1: its stage is free
                                if t + STAGES - 1 < tiles:
                                    copy_tile(kv, k_st, layer, cap, g, t + STAGES - 1, j0, j1, tx)
                                T.evaluate(T.ptx.cp.async_.commit_group())
                                T.evaluate(T.ptx.cp.async_.wait_group(STAGES - 1))
                                T.tvm_storage_sync("shared")
                                for e in T.unroll(8):
                                    sf[e] = T.float32(0)
                                for ks in T.unroll(k_steps):  # 16 keys x 16 dims a fragment load, two mma
                                    T.evaluate(T.ptx_legacy.ldmatrix(
                                        False, 4, ".b16", bk.data, 0, k_st.access_ptr("r"),
                                        t % STAGES * stage_elems + (tx // 16 * 8 + tx % 8) * stride + ks * 16
                                        + (tx // 8) % 2 * 8, dtype="float16"))
                                    for nb in T.unroll(2):
                                        mma_m16n8k16(qf, ks * 8, bk, nb * 4, sf, nb * 4)
                                for nb in T.unroll(2):  # row tx / 4 (hi) + row tx / 4 + 8 (lo): the score
                                    for c in T.unroll(2):
                                        sc[0] = sf[nb * 4 + c] + sf[nb * 4 + 2 + c]
                                        if j0 + t * KEYS + nb * 8 + tx % 4 * 2 + c < j1 and tx // 4 < G:
                                            scores[g * G + tx // 4, j0 + t * KEYS + nb * 8 + tx % 4 * 2 + c] = sc[0]
                                            online_update(m, z, 0, sc[0])
                            for r in T.unroll(2):  # the row's four threads
                                other[0] = T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), m[0], tx ^ (T.int64(1) << r), 32, 32)
                                other[1] = T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), z[0], tx ^ (T.int64(1) << r), 32, 32)
                                merge_partial(m, z, 0, other[0], other[1])
                            if tx % 4 == 0 and tx // 4 < G:
                                partials[g * G + tx // 4, b, 0] = m[0]
                                partials[g * G + tx // 4, b, 1] = z[0]

    return score_pass
