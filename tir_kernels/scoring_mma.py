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

KEYS = 16  # float16 candidates per shared-memory tile (int8 codes: 32, the same bytes)
STAGES = 2  # cp.async stages of float16 tiles (measured: 16-key tiles, 2 stages; scoring_tiles_h200.json)
KEYS_INT8 = 32  # int8 candidates per tile
STAGES_INT8 = 2  # of int8 tiles (measured: 2 of 2, 3, 4 and 6, attention_speed_scoring_int8_h200.json)
PIECE = 16  # bytes of a cp.async copy and of a row's padding in shared memory


def fits(n_heads: int, n_kv: int, head_dim: int, dtype: str, target: Target, key_bits: int = 16) -> bool:
    """True where the pass runs: CUDA sm_80+, at most 8 query heads per KV head (their hi and lo
    rows fill one mma tile) and ``head_dim`` a multiple of the mma's k (16 for float16 keys, which
    need a float16 cache; 32 for int8 codes, which any cache dtype has)."""
    k_depth = 32 if key_bits == 8 else 16
    return (has_mma_sync(target) and (key_bits == 8 or dtype == "float16") and head_dim % k_depth == 0
            and n_heads % n_kv == 0 and n_heads // n_kv <= 8)


def make_score_pass(num_layers: int, n_heads: int, n_kv: int, head_dim: int, n_init: int, offset: int,
                    chunks: int, exp, merge_partial, neg: float, key_bits: int = 16,
                    stages: int | None = None, keys: int | None = None):
    """A TIR macro ``(qbar, keys, scales, state, layer, length, scores, partials, cap)``: for chunk
    ``b`` of ``chunks`` and KV head ``g``, ``scores[h, t] = qbar[h] · k[n_init + t]`` (float32) for
    the chunk's candidates ``t < C = length[0] - offset`` and ``partials[h, b] = (max, sum of
    exp(score - max))`` for each query head ``h`` of the group; nothing when ``state[layer, 0]`` is
    1 (a Selection Cache hit). ``key_bits`` 16: ``keys`` is the float16 KV cache (its K plane),
    ``scales`` unused; 8: ``keys``/``scales`` are ``key_codes.py``'s int8 codes and float32 row
    scales, the score ``scale · (q̄ · code)`` with q̄ as two int8 rows per head (``hi = round(q̄ /
    s)``, ``s = max|q̄| / 127``, and the remainder in steps of ``s / 254``), an ``m16n8k32`` int8
    mma with int32 sums (a tile's scales copied to shared memory with its codes). ``stages``: cp.async
    stages in flight and ``keys`` candidates a tile (16 or 32; defaults ``STAGES``, ``KEYS`` /
    ``STAGES_INT8``, ``KEYS_INT8``). A thread adds a tile's scores to its online softmax at once
    (one rescale by the tile's max). ``exp``: the caller's exponential, ``merge_partial``: its
    macro merging an (m, z) pair into 1-element buffers, ``neg``: its finite minus infinity (an
    empty state's max), so both passes keep one rule.
    """
    int8 = key_bits == 8
    stages = stages or (STAGES_INT8 if int8 else STAGES)
    elem, acc_dtype = ("int8", "int32") if int8 else ("float16", "float32")
    per_piece = PIECE // (1 if int8 else 2)  # elements of a 16-byte piece
    per_reg = 4 if int8 else 2  # elements of a 32-bit fragment register
    keys_per_tile = keys or (KEYS_INT8 if int8 else KEYS)
    k_depth = 32 if int8 else 16
    group = n_heads // n_kv
    stride = head_dim + per_piece  # a padded row: conflict-free ldmatrix
    k_steps = head_dim // k_depth
    n_tiles = keys_per_tile // 8  # mma n-tiles a tile
    pieces = head_dim // per_piece  # 16-byte pieces of a key row
    kv_items = (keys_per_tile * pieces + 31) // 32
    q_items = (16 * head_dim + 31) // 32
    stage_elems = keys_per_tile * stride
    D, HKV, G, NB = i64(head_dim), i64(n_kv), i64(group), i64(chunks)
    plane = 1 if int8 else 2  # the keys' source: codes[l, g, row] or kv[l, 0, g, row]

    @T.macro
    def copy_tile(keys, scales, k_st, s_st, layer, cap, g, t, j0, j1, tx):
        """Copies of tile ``t`` (candidates clamped to the chunk's last) into stage ``t % stages``;
        int8: the tile's scales too (4 bytes a lane)."""
        for it in T.unroll(i64(kv_items)):
            if it * 32 + tx < keys_per_tile * pieces:
                jj: T.let[T.int64] = (it * 32 + tx) // pieces
                c: T.let[T.int64] = (it * 32 + tx) % pieces * per_piece
                row: T.let[T.int64] = n_init + T.min(j0 + t * keys_per_tile + jj, j1 - 1)
                T.evaluate(T.s_tir.cp_async_raw.legacy(
                    k_st.data, t % stages * stage_elems + jj * stride + c, keys.data,
                    (((layer * plane) * HKV + g) * cap + row) * D + c, 16, dtype=elem))
        if int8 and tx < keys_per_tile:
            T.evaluate(T.s_tir.cp_async_raw.legacy(
                s_st.data, t % stages * keys_per_tile + tx, scales.data,
                (layer * HKV + g) * cap + n_init + T.min(j0 + t * keys_per_tile + tx, j1 - 1), 4, dtype="float32"))

    @T.macro
    def stage_query_f16(qbar, q_sh, g, tx):
        """Rows r < G: fp16(q̄) of the group's heads; rows 8 + r: the float16 remainder; others 0."""
        for it in T.unroll(i64(q_items)):
            r: T.let[T.int64] = (it * 32 + tx) // D
            h: T.let[T.int64] = g * G + r % 8
            q_sh[r * stride + (it * 32 + tx) % D] = T.if_then_else(
                r % 8 < G, T.if_then_else(
                    r < 8, T.Cast("float16", qbar[h, (it * 32 + tx) % D]),
                    T.Cast("float16", qbar[h, (it * 32 + tx) % D] - T.Cast(
                        "float32", T.Cast("float16", qbar[h, (it * 32 + tx) % D])))),
                T.float16(0))

    @T.macro
    def stage_query_i8(qbar, q_sh, sq, g, tx):
        """Rows r < G: int8 ``round(q̄ / s)``, rows 8 + r: the remainder in steps of ``s / 254``;
        ``sq[0]``: the hi step of this thread's accumulator row (0 past the group)."""
        sq[1] = T.float32(0)
        for it in T.unroll(i64(q_items)):
            q_sh[(it * 32 + tx) // D * stride + (it * 32 + tx) % D] = T.int8(0)
        for r in T.unroll(i64(group)):
            sq[0] = T.float32(0)
            for j in T.unroll(i64((head_dim + 31) // 32)):
                if j * 32 + tx < D:
                    sq[0] = T.max(sq[0], T.abs(qbar[g * G + r, j * 32 + tx]))
            for bit in T.unroll(5):
                sq[0] = T.max(sq[0], T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), sq[0], tx ^ (T.int64(1) << bit), 32, 32))
            hi_step: T.let[T.float32] = sq[0] / T.float32(127)
            inv: T.let[T.float32] = T.if_then_else(sq[0] > T.float32(0), T.float32(127) / sq[0], T.float32(0))
            for j in T.unroll(i64((head_dim + 31) // 32)):
                if j * 32 + tx < D:
                    x: T.let[T.float32] = qbar[g * G + r, j * 32 + tx]
                    hi: T.let[T.float32] = T.round(x * inv)
                    q_sh[r * stride + j * 32 + tx] = T.Cast("int8", hi)
                    q_sh[(8 + r) * stride + j * 32 + tx] = T.Cast("int8", T.max(T.min(
                        T.round((x - hi * hi_step) * inv * T.float32(254)), T.float32(127)), T.float32(-127)))
            if tx // 4 == r:
                sq[1] = hi_step
        sq[0] = sq[1]

    @T.macro
    def score_pass(qbar, keys, scales, state, layer, length, scores, partials, cap):
        for b in T.thread_binding(NB, thread="blockIdx.x"):
            for g in T.thread_binding(HKV, thread="blockIdx.y"):
                for tx in T.thread_binding(T.int64(32), thread="threadIdx.x"):
                    with T.sblock("score_mma"):
                        T.reads()
                        T.writes()
                        k_st = T.sblock_alloc_buffer((stages * stage_elems,), elem, scope="shared")
                        s_st = T.sblock_alloc_buffer((stages * keys_per_tile if int8 else 1,), "float32", scope="shared")
                        q_sh = T.sblock_alloc_buffer((16 * stride,), elem, scope="shared")
                        qf = T.sblock_alloc_buffer((k_steps * 4 * per_reg,), elem, scope="local")
                        bk = T.sblock_alloc_buffer((n_tiles * 2 * per_reg,), elem, scope="local")
                        sf = T.sblock_alloc_buffer((n_tiles * 4,), acc_dtype, scope="local")
                        sq = T.sblock_alloc_buffer((2,), "float32", scope="local")  # int8: the hi step, a scratch
                        m = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        z = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        sc = T.sblock_alloc_buffer((n_tiles * 2,), "float32", scope="local")  # a thread's scores of a tile
                        tile_max = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        other = T.sblock_alloc_buffer((2,), "float32", scope="local")  # a partner's (m, z)
                        C: T.let[T.int64] = T.Cast("int64", length[0]) - offset
                        j0: T.let[T.int64] = b * T.ceildiv(C, NB)
                        j1: T.let[T.int64] = T.min(j0 + T.ceildiv(C, NB), C)
                        miss: T.let[T.bool] = state[layer, 0] == 0
                        tiles: T.let[T.int64] = T.max(j1 - j0 + keys_per_tile - 1, i64(0)) // keys_per_tile
                        for _ in range(T.Cast("int64", miss)):  # nothing on a hit (no early return: barriers)
                            for t in T.unroll(i64(stages - 1)):
                                if t < tiles:
                                    copy_tile(keys, scales, k_st, s_st, layer, cap, g, t, j0, j1, tx)
                                T.evaluate(T.ptx.cp.async_.commit_group())
                            if int8:
                                stage_query_i8(qbar, q_sh, sq, g, tx)
                            else:
                                stage_query_f16(qbar, q_sh, g, tx)
                            T.tvm_storage_sync("shared")
                            for ks in T.unroll(k_steps):
                                T.evaluate(T.ptx_legacy.ldmatrix(
                                    False, 4, ".b16", qf.data, ks * 4 * per_reg, q_sh.access_ptr("r"),
                                    ((tx // 8) % 2 * 8 + tx % 8) * stride + ks * k_depth + tx // 16 * per_piece,
                                    dtype=elem))
                            m[0] = T.float32(neg)
                            z[0] = T.float32(0)
                            for t in T.serial(tiles):
                                T.tvm_storage_sync("shared")  # the warp is done with tile t - 1: its stage is free
                                if t + stages - 1 < tiles:
                                    copy_tile(keys, scales, k_st, s_st, layer, cap, g, t + stages - 1, j0, j1, tx)
                                T.evaluate(T.ptx.cp.async_.commit_group())
                                T.evaluate(T.ptx.cp.async_.wait_group(stages - 1))
                                T.tvm_storage_sync("shared")
                                for e in T.unroll(n_tiles * 4):
                                    sf[e] = T.Cast(acc_dtype, 0)
                                for ks in T.unroll(k_steps):  # 16 keys x k_depth a fragment load, two mma
                                    for kp in T.unroll(n_tiles // 2):
                                        T.evaluate(T.ptx_legacy.ldmatrix(
                                            False, 4, ".b16", bk.data, kp * 4 * per_reg, k_st.access_ptr("r"),
                                            t % stages * stage_elems + (kp * 16 + tx // 16 * 8 + tx % 8) * stride
                                            + ks * k_depth + (tx // 8) % 2 * per_piece, dtype=elem))
                                    for nb in T.unroll(n_tiles):
                                        if int8:
                                            T.evaluate(T.ptx_legacy.mma(
                                                "m16n8k32", "row", "col", "int8", "int8", "int32", qf.data,
                                                ks * 4 * per_reg, bk.data, nb * 2 * per_reg, sf.data, nb * 4, False,
                                                dtype="int32"))
                                        else:
                                            mma_m16n8k16(qf, ks * 4 * per_reg, bk, nb * 2 * per_reg, sf, nb * 4)
                                for nb in T.unroll(n_tiles):  # row tx / 4 (hi) + row tx / 4 + 8 (lo): the score
                                    for c in T.unroll(2):
                                        j: T.let[T.int64] = j0 + t * keys_per_tile + nb * 8 + tx % 4 * 2 + c
                                        if int8:
                                            sc[nb * 2 + c] = s_st[t % stages * keys_per_tile + nb * 8 + tx % 4 * 2 + c] * sq[0] * (
                                                T.Cast("float32", sf[nb * 4 + c])
                                                + T.Cast("float32", sf[nb * 4 + 2 + c]) * T.float32(1 / 254))
                                        else:
                                            sc[nb * 2 + c] = sf[nb * 4 + c] + sf[nb * 4 + 2 + c]
                                        if j < j1 and tx // 4 < G:
                                            scores[g * G + tx // 4, j] = sc[nb * 2 + c]
                                        sc[nb * 2 + c] = T.if_then_else(j < j1, sc[nb * 2 + c], T.float32(neg))
                                # the tile's scores into the online softmax at once (no branch per score)
                                tile_max[0] = m[0]
                                for e in T.unroll(n_tiles * 2):
                                    tile_max[0] = T.max(tile_max[0], sc[e])
                                z[0] = z[0] * exp(m[0] - tile_max[0])
                                for e in T.unroll(n_tiles * 2):
                                    z[0] = z[0] + exp(sc[e] - tile_max[0])
                                m[0] = tile_max[0]
                            for r in T.unroll(2):  # the row's four threads
                                other[0] = T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), m[0], tx ^ (T.int64(1) << r), 32, 32)
                                other[1] = T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), z[0], tx ^ (T.int64(1) << r), 32, 32)
                                merge_partial(m, z, 0, other[0], other[1])
                            if tx % 4 == 0 and tx // 4 < G:
                                partials[g * G + tx // 4, b, 0] = m[0]
                                partials[g * G + tx // 4, b, 1] = z[0]

    return score_pass
