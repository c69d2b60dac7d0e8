"""Prefill chunk attention on tensor cores over any list of cached rows (CUDA, float16).

Same contract as ``attention.make_attention_partial`` (key ``j`` of ``rows`` at RoPE position ``j``,
query ``i`` of the ``n`` at ``M - n + i`` seeing keys ``j <= M - n + i``; partial outputs merged by
``attention.make_attention_merge``), laid out as FlashAttention-2 (Dao, "FlashAttention-2: Faster
Attention with Better Parallelism and Work Partitioning", 2023):

- the chunk's (query, head of the GQA group) pairs are flattened, ``f = i * group + g``, so every
  query head of a KV head shares each key tile; one block of ``WARPS`` warps owns 16 of them per
  warp (the M of ``mma.m16n8k16``) for one KV head and one split of ``SPLIT`` keys;
- the block's queries are rotated to their positions, scaled by log2(e)/sqrt(d) and staged as
  float16 in shared memory once; their fragments are re-read per key tile (``ldmatrix``), which
  keeps registers low enough for several blocks per multiprocessor;
- the block walks its split ``KEYS`` keys at a time; the tiles' key and value rows (gathered
  through ``rows``) and their RoPE table rows are copied into shared memory by ``cp.async``
  ``stages - 1`` tiles ahead of the one computed (no registers held, many copies in flight, as
  CUTLASS's multistage pipelines do); a tile's keys are then rotated (RoPE at their list position)
  from there into a float16 key tile (rows padded by 16 bytes, as the value rows are, so fragment
  loads are free of bank conflicts);
- ``S = Q Kᵀ`` and ``O += P V`` run on tensor cores (float16 operands, float32 accumulators);
  ``P`` stays in registers (the accumulator layout of ``S`` is the operand layout of ``P``), query,
  key and value fragments come through ``ldmatrix`` (``.trans`` for values);
  a k-step's fragments are loaded first and its independent ``mma`` issued back to back (inline
  PTX is never reordered by the compiler, so the order written is the order issued);
- online softmax in float32 in the log2 domain (the output rescaled only when a row's max grows),
  causal mask per row, keys past the causal limit of the block's last row never loaded.

Splitting the keys keeps the GPU full when a short chunk meets a long context; ``S`` partial
outputs per query (``chunk_splits``) are merged like the other attention kernels' chunks.

On Hopper (``sm_90a``, ``uses_wgmma``) both products run on ``wgmma`` (``matmul_wgmma``; the use
FlashAttention-3 makes of it, Shah et al. 2024, without its warp specialisation) and the keys are
rotated once per chunk, not once per block: ``make_rotated_keys`` writes the attended rows' keys
with RoPE at their list positions (float16, ``krot[Hkv, M, d]``), which the kernel then copies like
the values. Two warpgroups of 64 (query, head) rows a block; queries, key and value tiles live in
shared memory in wgmma's 128-byte-swizzled layout (64 elements a row, ``matmul.swizzled``,
column blocks of 64 one after another), so ``S = Q Kᵀ`` reads both operands through descriptors
and ``O += P V`` takes ``P`` from registers (the accumulator layout of ``S`` is wgmma's register
layout of A) and ``V`` MN-major (``trans_b``). Generic-proxy writes (staged queries, ``cp.async``
copies) are fenced for the async proxy before the block barrier that precedes their wgmma.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .attention import LOG2E, NEG_INF, rope_rotated
from .common import has_mma_sync, i64, max_shared_memory, mma_m16n8k16
from .matmul import swizzled
from .matmul_wgmma import smem_descriptor, wgmma

WARPS = 4  # per block
M_TILES = 2  # 16-row mma tiles of (query, head) rows per warp: each K/V fragment feeds this many mma
KEYS = 32  # keys per shared-memory tile (more blocks per SM beat longer tiles: bench/results/attention_speed_h200.json)
SPLIT = 8192  # keys per split (partial output)
PAD = 8  # float16 elements of padding per shared-memory row
V_GROUP = 4  # at most this many ldmatrix.x4 of V fragments loaded before their mma
STAGES = 2  # key/value tiles in shared memory: one computed, the others in flight
WGMMA_KEYS, WGMMA_STAGES = 64, 2  # the Hopper kernel's key tile and stages (measured: attention_speed.py)


def chunk_splits(num_keys: "tirx.PrimExpr | int") -> "tirx.PrimExpr | int":
    """Partial outputs per query for ``num_keys`` attended rows: one per ``SPLIT`` keys."""
    return (num_keys + SPLIT - 1) // SPLIT


def _shared_bytes(head_dim: int, warps: int, keys: int, stages: int, m_tiles: int, hopper: bool = False) -> int:
    """Shared memory of one block: staged queries, and the rotated key tile and per stage the raw
    keys, padded values (float16) and RoPE rows (float32); on Hopper per stage the rotated keys and
    values only."""
    if hopper:
        return (16 * warps * m_tiles + stages * 2 * keys) * head_dim * 2
    stride = head_dim + PAD
    return (16 * warps * m_tiles + keys) * stride * 2 + stages * keys * ((head_dim + stride) * 2 + head_dim * 4)


def uses_wgmma(head_dim: int, target: Target) -> bool:
    """The Hopper path: CUDA sm_90a and ``head_dim`` a multiple of 64 (whole 128-byte swizzle rows)."""
    return target.kind.name == "cuda" and str(target.attrs.get("arch", "")) == "sm_90a" and head_dim % 64 == 0


def _swizzled_at(row: "tirx.PrimExpr", col: "tirx.PrimExpr", rows: int) -> "tirx.PrimExpr":
    """Element offset of (``row``, ``col``) in a ``rows``-row float16 tile stored as wgmma's 128-byte
    swizzle atoms: column block ``col // 64`` after column block, 64 elements a row."""
    return col // 64 * rows * 64 + swizzled(row, col % 64 // 8, 64) + col % 8


@T.macro
def rotate_pieces(kx, cs, kr):
    """Rotate-half RoPE of 8 elements of a key's first half and their 8 partners in the second
    (``kx[0:8]``, ``kx[8:16]``) by their cos and sin (``cs[0:8]``, ``cs[8:16]``), in float32, rounded
    once into ``kr`` (float16, same layout)."""
    for e in T.unroll(8):
        kr[e] = T.Cast("float16", T.Cast("float32", kx[e]) * cs[e] - T.Cast("float32", kx[8 + e]) * cs[8 + e])
        kr[8 + e] = T.Cast("float16", T.Cast("float32", kx[8 + e]) * cs[e] + T.Cast("float32", kx[e]) * cs[8 + e])


def make_rotated_keys(num_layers: int, n_kv: int, head_dim: int, dtype: str, target: Target) -> tirx.PrimFunc:
    """The attended keys with RoPE at their list positions, for the Hopper chunk kernel.

    Args: kv[layers, 2, Hkv, cap, d] float16, rope[P, d] float32, rows[M] int32, layer (int64).
    Output: krot[Hkv, M, d] float16 = rotate-half RoPE(position j) of ``kv[layer, 0, g, rows[j]]``,
    computed in float32 and rounded once (as the in-kernel rotation of ``make_chunk_attention``).
    One thread per 8 + 8 elements (a 16-byte piece of each half). Raises ValueError where
    ``uses_wgmma`` is False or for another dtype than float16.
    """
    if not uses_wgmma(head_dim, target) or dtype != "float16":
        raise ValueError(f"rotated keys are the Hopper chunk kernel's (sm_90a, float16, head_dim % 64 == 0); "
                         f"got {target.kind.name}, {dtype}, head_dim {head_dim}")
    half, pieces, threads = head_dim // 2, head_dim // 16, 256
    HKV, D = i64(n_kv), i64(head_dim)

    @T.prim_func(s_tir=True)
    def rotated_keys(kv_h: T.handle, rope_h: T.handle, rows_h: T.handle, layer: T.int64, krot_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        cap, num_pos, m_keys = T.int64(), T.int64(), T.int64()
        kv = T.match_buffer(kv_h, (num_layers, T.int64(2), HKV, cap, D), "float16")
        rope = T.match_buffer(rope_h, (num_pos, D), "float32")
        rows = T.match_buffer(rows_h, (m_keys,), "int32")
        krot = T.match_buffer(krot_h, (HKV, m_keys, D), "float16")
        for b in T.thread_binding((m_keys * HKV * pieces + threads - 1) // threads, thread="blockIdx.x"):
            for tx in T.thread_binding(T.int64(threads), thread="threadIdx.x"):
                with T.sblock("rotate"):
                    kx = T.sblock_alloc_buffer((16,), "float16", scope="local")
                    cs = T.sblock_alloc_buffer((16,), "float32", scope="local")  # cos | sin
                    kr = T.sblock_alloc_buffer((16,), "float16", scope="local")
                    item: T.let[T.int64] = b * threads + tx
                    j: T.let[T.int64] = item // (HKV * pieces)
                    g: T.let[T.int64] = item // pieces % HKV
                    d0: T.let[T.int64] = item % pieces * 8
                    if j < m_keys:
                        row: T.let[T.int64] = T.Cast("int64", rows[j])
                        for e in T.vectorized(8):
                            kx[e] = kv[layer, 0, g, row, d0 + e]
                        for e in T.vectorized(8):
                            kx[8 + e] = kv[layer, 0, g, row, half + d0 + e]
                        for e in T.vectorized(8):
                            cs[e] = rope[j, d0 + e]
                        for e in T.vectorized(8):
                            cs[8 + e] = rope[j, half + d0 + e]
                        rotate_pieces(kx, cs, kr)
                        for e in T.vectorized(8):
                            krot[g, j, d0 + e] = kr[e]
                        for e in T.vectorized(8):
                            krot[g, j, half + d0 + e] = kr[8 + e]

    return rotated_keys


def supported(dtype: str, head_dim: int, target: Target) -> bool:
    """True where the kernel runs: CUDA sm_80 or newer, float16, ``head_dim`` a multiple of 16, and
    a block of one mma tile per warp within the target's shared memory."""
    return (has_mma_sync(target) and dtype == "float16" and head_dim % 16 == 0
            and _shared_bytes(head_dim, WARPS, KEYS, STAGES, 1) <= max_shared_memory(target))


def make_chunk_attention(num_layers: int, n_heads: int, n_kv: int, head_dim: int, dtype: str,
                         target: Target, warps: int | None = None, keys: int | None = None,
                         stages: int | None = None, m_tiles: int | None = None) -> tirx.PrimFunc:
    """Args: q[n, >= H, d] float16 (its first H heads are the queries), kv[layers, 2, Hkv, cap, d]
    float16, rope[P, d] float32, rows[M] int32, layer (int64).

    Outputs: o[n, S, H, d] float32 (each split's normalised output), lse[n, S, H] float32
    (log2-sum-exp of the split's scaled scores, ``NEG_INF`` where the split has no visible key),
    with ``S = chunk_splits(M)``. ``warps`` (``16 m_tiles`` rows each) and ``keys`` (a multiple of
    16 dividing ``SPLIT``) shape the block and its key tile; ``stages`` (≥ 2) tiles are in shared memory;
    ``m_tiles`` defaults to ``M_TILES`` where that block fits the target's shared memory (sm_90, sm_80),
    else 1 (sm_86/89: 99 KB); ``warps``, ``keys`` and ``stages`` default to ``WARPS``, ``KEYS``, ``STAGES``.
    Where ``uses_wgmma`` holds the kernel is the Hopper one: an extra argument after ``kv``,
    krot[Hkv, M, d] float16 (``make_rotated_keys``), 8 warps of one 16-row tile, ``keys`` (at most
    256) and ``stages`` defaulting to ``WGMMA_KEYS`` and ``WGMMA_STAGES``. Raises ValueError where
    ``supported`` is False or the block exceeds the target's shared memory.
    """
    if not supported(dtype, head_dim, target):
        raise ValueError("tensor-core chunk attention needs CUDA sm_80+, float16 and head_dim a multiple "
                         f"of 16 (got {target.kind.name}, {dtype}, head_dim {head_dim}); use attention_partial")
    limit = max_shared_memory(target)
    hopper = uses_wgmma(head_dim, target)
    if hopper:
        if warps not in (None, 8) or m_tiles not in (None, 1) or (keys or 0) > 256:
            raise ValueError(f"wgmma chunk attention: 8 warps of one 16-row tile and at most 256 keys a tile "
                             f"(got warps {warps}, m_tiles {m_tiles}, keys {keys})")
        warps, m_tiles, keys, stages = 8, 1, keys or WGMMA_KEYS, stages or WGMMA_STAGES
    warps, keys, stages = warps or WARPS, keys or KEYS, stages or STAGES
    if m_tiles is None:
        m_tiles = M_TILES if _shared_bytes(head_dim, warps, keys, stages, M_TILES) <= limit else 1
    group = n_heads // n_kv
    half = head_dim // 2
    stride = head_dim + PAD
    threads, rows_per_block = 32 * warps, 16 * warps * m_tiles
    MT = i64(m_tiles)
    stage_elems = keys * (head_dim + stride)  # float16: raw keys, padded values
    if _shared_bytes(head_dim, warps, keys, stages, m_tiles, hopper) > limit or keys % 16 or SPLIT % keys or stages < 2:
        raise ValueError(f"chunk attention: {warps} warps x {keys} keys per tile x {stages} stages exceed the "
                         f"target's shared memory or do not tile the {SPLIT}-key split in multiples of 16")
    k_steps = head_dim // 16  # k-steps of Q Kᵀ
    d_blocks = head_dim // 8  # n-blocks of P V (output dims)
    key_blocks = keys // 8  # n-blocks of Q Kᵀ (keys)
    pv_steps = keys // 16  # k-steps of P V
    k_vecs = half // 8  # 16-byte vectors of a key's first half
    v_group = next(g for g in range(min(V_GROUP // m_tiles, d_blocks // 2), 0, -1) if d_blocks // 2 % g == 0)
    q_items = (rows_per_block * head_dim + threads - 1) // threads
    k_items = (keys * k_vecs + threads - 1) // threads  # rotation: 8 + 8 elements an item
    row_items = (keys * (head_dim // 8) + threads - 1) // threads  # copies: 16 bytes of a K or V row
    rope_items = (keys * (head_dim // 4) + threads - 1) // threads  # copies: 16 bytes of a RoPE row
    scale = LOG2E / math.sqrt(head_dim)
    H, D, HKV, G = i64(n_heads), i64(head_dim), i64(n_kv), i64(group)

    def q_at(r, c):  # the staged queries: padded rows, or wgmma's swizzled atoms
        return _swizzled_at(r, c, rows_per_block) if hopper else r * stride + c

    @T.macro
    def copy_tile(kv, rope, rows, kv_st, r_st, layer, cap, by, t, key_start, key_lim, tid):
        """Issue the copies of tile ``t`` (its rows clamped to the split's last) into stage ``t % stages``."""
        for it in T.unroll(i64(row_items)):
            if it * threads + tid < keys * (head_dim // 8):
                jj: T.let[T.int64] = (it * threads + tid) // (head_dim // 8)
                c: T.let[T.int64] = (it * threads + tid) % (head_dim // 8) * 8
                row: T.let[T.int64] = T.Cast("int64", rows[T.min(key_start + t * keys + jj, key_lim - 1)])
                base: T.let[T.int64] = t % stages * stage_elems
                T.evaluate(T.s_tir.cp_async_raw.legacy(
                    kv_st.data, base + jj * head_dim + c, kv.data,
                    (((layer * 2) * HKV + by) * cap + row) * D + c, 16, dtype="float16"))
                T.evaluate(T.s_tir.cp_async_raw.legacy(
                    kv_st.data, base + keys * head_dim + jj * stride + c, kv.data,
                    (((layer * 2 + 1) * HKV + by) * cap + row) * D + c, 16, dtype="float16"))
        for it in T.unroll(i64(rope_items)):
            if it * threads + tid < keys * (head_dim // 4):
                jj: T.let[T.int64] = (it * threads + tid) // (head_dim // 4)
                c: T.let[T.int64] = (it * threads + tid) % (head_dim // 4) * 4
                T.evaluate(T.s_tir.cp_async_raw.legacy(
                    r_st.data, (t % stages * keys + jj) * head_dim + c, rope.data,
                    T.min(key_start + t * keys + jj, key_lim - 1) * D + c, 16, dtype="float32"))

    @T.macro
    def start_rows(qp, m_run, l_run, row0, m_keys, n):
        """Per row the thread holds (mt, rr) — row0 + 16 mt + 8 rr — its query position and empty state."""
        for mt in T.unroll(MT):
            for rr in T.unroll(2):
                qp[mt * 2 + rr] = T.if_then_else(
                    row0 + 16 * mt + 8 * rr < n * G, m_keys - n + (row0 + 16 * mt + 8 * rr) // G, T.int64(-1))
                m_run[mt * 2 + rr] = T.float32(NEG_INF)
                l_run[mt * 2 + rr] = T.float32(0)

    @T.macro
    def stage_queries(q, rope, q_sh, m_keys, n, bz, by, tid):
        """The block's queries, rotated to their positions, scaled, float16 in shared memory."""
        for it in T.serial(q_items):
            f: T.let[T.int64] = bz * rows_per_block + (it * threads + tid) // head_dim
            dq: T.let[T.int64] = (it * threads + tid) % head_dim
            if it * threads + tid < rows_per_block * head_dim:
                q_sh[q_at(f - bz * rows_per_block, dq)] = T.if_then_else(
                    f < n * G, T.Cast("float16", scale * rope_rotated(
                        q, f // G, by * G + f % G, dq, rope, m_keys - n + f // G, half)),
                    T.float16(0))

    @T.macro
    def online_softmax(sf, of, m_run, l_run, red, lim, tx):
        """Mask the tile's scores ``sf`` by ``lim`` (visible keys per row), fold them into the running
        max and sum (``of`` rescaled where a row's max grew) and leave their exp2 in ``sf``."""
        for mt in T.unroll(MT):
            for rr in T.unroll(2):
                red[0] = T.float32(NEG_INF)
                for nb in T.unroll(key_blocks):
                    for c in T.unroll(2):
                        sf[(mt * key_blocks + nb) * 4 + rr * 2 + c] = T.if_then_else(
                            T.int32(nb * 8 + c) + T.Cast("int32", tx % 4) * 2 < lim[mt * 2 + rr],
                            sf[(mt * key_blocks + nb) * 4 + rr * 2 + c], T.float32(NEG_INF))
                        red[0] = T.max(red[0], sf[(mt * key_blocks + nb) * 4 + rr * 2 + c])
                for r in T.unroll(2):  # over the 4 threads holding the row
                    red[0] = T.max(red[0], T.tvm_warp_shuffle(
                        T.uint32(0xFFFFFFFF), red[0], tx ^ (T.int64(1) << r), 32, 32))
                red[1] = T.max(m_run[mt * 2 + rr], red[0])  # new running max
                red[0] = T.exp2(m_run[mt * 2 + rr] - red[1])  # decay of the old state
                m_run[mt * 2 + rr] = red[1]
                l_run[mt * 2 + rr] = l_run[mt * 2 + rr] * red[0]
                if red[0] < T.float32(1):  # the row max grew: rescale (rare after the first tiles)
                    for nd in T.unroll(d_blocks):
                        for c in T.unroll(2):
                            of[(mt * d_blocks + nd) * 4 + rr * 2 + c] = of[(mt * d_blocks + nd) * 4 + rr * 2 + c] * red[0]
                for nb in T.unroll(key_blocks):
                    for c in T.unroll(2):
                        sf[(mt * key_blocks + nb) * 4 + rr * 2 + c] = T.if_then_else(
                            sf[(mt * key_blocks + nb) * 4 + rr * 2 + c] > T.float32(NEG_INF / 2),
                            T.exp2(sf[(mt * key_blocks + nb) * 4 + rr * 2 + c] - red[1]), T.float32(0))
                        l_run[mt * 2 + rr] = l_run[mt * 2 + rr] + sf[(mt * key_blocks + nb) * 4 + rr * 2 + c]

    @T.macro
    def write_output(o, lse, of, m_run, l_run, red, row0, bx, by, tx, n):
        """Normalise the rows and write the split's output and log2-sum-exp."""
        for mt in T.unroll(MT):
            for rr in T.unroll(2):
                red[0] = l_run[mt * 2 + rr]
                for r in T.unroll(2):
                    red[0] = red[0] + T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), red[0], tx ^ (T.int64(1) << r), 32, 32)
                row: T.let[T.int64] = row0 + 16 * mt + 8 * rr
                if row < n * G:
                    for nd in T.unroll(d_blocks):
                        for c in T.unroll(2):
                            o[row // G, bx, by * G + row % G, nd * 8 + (tx % 4) * 2 + c] = T.if_then_else(
                                red[0] > T.float32(0), of[(mt * d_blocks + nd) * 4 + rr * 2 + c] / red[0], T.float32(0))
                    if tx % 4 == 0:
                        lse[row // G, bx, by * G + row % G] = T.if_then_else(
                            red[0] > T.float32(0), m_run[mt * 2 + rr] + T.log2(red[0]), T.float32(NEG_INF))

    if hopper:  # rotated keys (krot) and values by cp.async into swizzled tiles; both products on wgmma
        tile_elems = keys * head_dim

        @T.macro
        def copy_rows(kv, krot, rows, k_st, v_st, layer, cap, m_keys, by, t, key_start, key_lim, tid):
            """Issue the copies of tile ``t``'s keys and values (rows clamped to the split's last) into
            stage ``t % stages``."""
            for it in T.unroll(i64(row_items)):
                if it * threads + tid < keys * (head_dim // 8):
                    jj: T.let[T.int64] = (it * threads + tid) // (head_dim // 8)
                    c: T.let[T.int64] = (it * threads + tid) % (head_dim // 8) * 8
                    j: T.let[T.int64] = T.min(key_start + t * keys + jj, key_lim - 1)
                    at: T.let[T.int64] = t % stages * tile_elems + _swizzled_at(jj, c, keys)
                    T.evaluate(T.s_tir.cp_async_raw.legacy(k_st.data, at, krot.data, (by * m_keys + j) * D + c,
                                                           16, dtype="float16"))
                    T.evaluate(T.s_tir.cp_async_raw.legacy(
                        v_st.data, at, kv.data, (((layer * 2 + 1) * HKV + by) * cap + T.Cast("int64", rows[j])) * D + c,
                        16, dtype="float16"))

        @T.prim_func(s_tir=True)
        def chunk_attention_wgmma(q_h: T.handle, kv_h: T.handle, krot_h: T.handle, rope_h: T.handle,
                                  rows_h: T.handle, layer: T.int64, o_h: T.handle, lse_h: T.handle):
            T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
            n, cap, num_pos, m_keys, heads = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            q = T.match_buffer(q_h, (n, heads, D), "float16")
            kv = T.match_buffer(kv_h, (num_layers, T.int64(2), HKV, cap, D), "float16")
            krot = T.match_buffer(krot_h, (HKV, m_keys, D), "float16")
            rope = T.match_buffer(rope_h, (num_pos, D), "float32")
            rows = T.match_buffer(rows_h, (m_keys,), "int32")
            o = T.match_buffer(o_h, (n, (m_keys + SPLIT - 1) // SPLIT, H, D), "float32")
            lse = T.match_buffer(lse_h, (n, (m_keys + SPLIT - 1) // SPLIT, H), "float32")
            for bx in T.thread_binding((m_keys + SPLIT - 1) // SPLIT, thread="blockIdx.x"):
                for by in T.thread_binding(HKV, thread="blockIdx.y"):
                    for bz in T.thread_binding((n * G + rows_per_block - 1) // rows_per_block, thread="blockIdx.z"):
                        for ty in T.thread_binding(T.int64(warps), thread="threadIdx.y"):
                            for tx in T.thread_binding(T.int64(32), thread="threadIdx.x"):
                                with T.sblock("attn"):
                                    T.reads()
                                    T.writes()
                                    # one dynamic buffer (1024-byte aligned tiles: every size a multiple of 1 KB)
                                    q_sh = T.sblock_alloc_buffer((rows_per_block * head_dim,), "float16", scope="shared.dyn")
                                    k_st = T.sblock_alloc_buffer((stages * tile_elems,), "float16", scope="shared.dyn")
                                    v_st = T.sblock_alloc_buffer((stages * tile_elems,), "float16", scope="shared.dyn")
                                    sf = T.sblock_alloc_buffer((key_blocks * 4,), "float32", scope="local")
                                    pa = T.sblock_alloc_buffer((pv_steps * 4,), "uint32", scope="local")  # P, wgmma's A
                                    of = T.sblock_alloc_buffer((d_blocks * 4,), "float32", scope="local")
                                    m_run = T.sblock_alloc_buffer((2,), "float32", scope="local")
                                    l_run = T.sblock_alloc_buffer((2,), "float32", scope="local")
                                    red = T.sblock_alloc_buffer((2,), "float32", scope="local")
                                    qp = T.sblock_alloc_buffer((2,), "int64", scope="local")
                                    lim = T.sblock_alloc_buffer((2,), "int32", scope="local")
                                    tid: T.let[T.int64] = ty * 32 + tx
                                    row0: T.let[T.int64] = bz * rows_per_block + ty * 16 + tx // 4
                                    key_start: T.let[T.int64] = bx * SPLIT
                                    key_lim: T.let[T.int64] = T.min(key_start + SPLIT, m_keys)
                                    last_q: T.let[T.int64] = T.min(n * G - 1, bz * rows_per_block + rows_per_block - 1) // G
                                    key_end: T.let[T.int64] = T.min(key_lim, m_keys - n + last_q + 1)
                                    start_rows(qp, m_run, l_run, row0, m_keys, n)
                                    stage_queries(q, rope, q_sh, m_keys, n, bz, by, tid)
                                    T.evaluate(T.ptx.fence.proxy.async_.shared__cta())
                                    for e in T.unroll(d_blocks * 4):
                                        of[e] = T.float32(0)
                                    tiles: T.let[T.int64] = T.max(key_end - key_start + keys - 1, T.int64(0)) // keys
                                    for t in T.unroll(i64(stages - 1)):  # the first tiles' copies
                                        if t < tiles:
                                            copy_rows(kv, krot, rows, k_st, v_st, layer, cap, m_keys, by, t, key_start, key_lim, tid)
                                        T.evaluate(T.ptx.cp.async_.commit_group())
                                    for t in T.serial(tiles):
                                        for rr in T.unroll(2):
                                            lim[rr] = T.Cast("int32", T.max(T.min(key_lim, qp[rr] + 1) - key_start - t * keys,
                                                                            T.int64(-1)))
                                        T.evaluate(T.ptx.cp.async_.wait_group(stages - 2))  # tile t landed (own copies)
                                        T.evaluate(T.ptx.fence.proxy.async_.shared__cta())
                                        T.tvm_storage_sync("shared")  # everyone's; tile t - 1's stage is free
                                        if t + stages - 1 < tiles:
                                            copy_rows(kv, krot, rows, k_st, v_st, layer, cap, m_keys, by, t + stages - 1,
                                                      key_start, key_lim, tid)
                                        T.evaluate(T.ptx.cp.async_.commit_group())
                                        for e in T.unroll(key_blocks * 4):
                                            sf[e] = T.float32(0)
                                        T.evaluate(T.ptx.wgmma.fence.sync.aligned())
                                        for ks in T.unroll(k_steps):  # S = Q Kᵀ: the warpgroup's 64 rows x the tile
                                            T.evaluate(wgmma(keys, sf, keys // 2, smem_descriptor(T.cuda.cvta_generic_to_shared(
                                                q_sh.access_ptr("r", offset=ks // 4 * rows_per_block * 64 + ty // 4 * 64 * 64
                                                                + ks % 4 * 16))),
                                                smem_descriptor(T.cuda.cvta_generic_to_shared(k_st.access_ptr(
                                                    "r", offset=t % stages * tile_elems + ks // 4 * keys * 64 + ks % 4 * 16)))))
                                        T.evaluate(T.ptx.wgmma.commit_group.sync.aligned())
                                        T.evaluate(T.ptx.wgmma.wait_group.sync.aligned(0))
                                        online_softmax(sf, of, m_run, l_run, red, lim, tx)
                                        for e in T.unroll(pv_steps * 4):  # P as wgmma's A (float16 pairs)
                                            pa[e] = T.Cast("uint32", T.reinterpret("uint16", T.Cast("float16", sf[2 * e]))) | (
                                                T.Cast("uint32", T.reinterpret("uint16", T.Cast("float16", sf[2 * e + 1])))
                                                << T.uint32(16))
                                        T.evaluate(T.ptx.wgmma.fence.sync.aligned())
                                        for kk in T.unroll(pv_steps):  # O += P V: V MN-major, 16 keys a step
                                            T.evaluate(wgmma(head_dim, of, head_dim // 2, (pa, kk * 4), smem_descriptor(
                                                T.cuda.cvta_generic_to_shared(v_st.access_ptr(
                                                    "r", offset=t % stages * tile_elems + kk * 16 * 64)), lbo=keys * 128),
                                                trans_b=1))
                                        T.evaluate(T.ptx.wgmma.commit_group.sync.aligned())
                                        T.evaluate(T.ptx.wgmma.wait_group.sync.aligned(0))
                                    write_output(o, lse, of, m_run, l_run, red, row0, bx, by, tx, n)

        return chunk_attention_wgmma

    @T.prim_func(s_tir=True)
    def chunk_attention(q_h: T.handle, kv_h: T.handle, rope_h: T.handle, rows_h: T.handle,
                        layer: T.int64, o_h: T.handle, lse_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        n, cap, num_pos, m_keys, heads = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (n, heads, D), "float16")
        kv = T.match_buffer(kv_h, (num_layers, T.int64(2), HKV, cap, D), "float16")
        rope = T.match_buffer(rope_h, (num_pos, D), "float32")
        rows = T.match_buffer(rows_h, (m_keys,), "int32")
        o = T.match_buffer(o_h, (n, (m_keys + SPLIT - 1) // SPLIT, H, D), "float32")
        lse = T.match_buffer(lse_h, (n, (m_keys + SPLIT - 1) // SPLIT, H), "float32")
        for bx in T.thread_binding((m_keys + SPLIT - 1) // SPLIT, thread="blockIdx.x"):
            for by in T.thread_binding(HKV, thread="blockIdx.y"):
                for bz in T.thread_binding((n * G + rows_per_block - 1) // rows_per_block, thread="blockIdx.z"):
                    for ty in T.thread_binding(T.int64(warps), thread="threadIdx.y"):
                        for tx in T.thread_binding(T.int64(32), thread="threadIdx.x"):
                            with T.sblock("attn"):
                                T.reads()
                                T.writes()
                                # dynamic shared memory (flat: padding kept); ldmatrix takes it through access_ptr,
                                # which the pass merging dynamic allocations rewrites
                                # rotated keys in static shared memory: a buffer apart from the merged dynamic one,
                                # so TVM's barrier insertion sees no hazard between reading a stage and writing these
                                k_sh = T.sblock_alloc_buffer((keys * stride,), "float16", scope="shared")
                                kv_st = T.sblock_alloc_buffer((stages * stage_elems,), "float16", scope="shared.dyn")
                                r_st = T.sblock_alloc_buffer((stages * keys * head_dim,), "float32", scope="shared.dyn")
                                q_sh = T.sblock_alloc_buffer((rows_per_block * stride,), "float16", scope="shared.dyn")
                                qf = T.sblock_alloc_buffer((m_tiles * 8,), "float16", scope="local")  # A fragments of Q
                                sf = T.sblock_alloc_buffer((m_tiles * key_blocks * 4,), "float32", scope="local")
                                pf = T.sblock_alloc_buffer((m_tiles * pv_steps * 8,), "float16", scope="local")
                                of = T.sblock_alloc_buffer((m_tiles * d_blocks * 4,), "float32", scope="local")
                                bk = T.sblock_alloc_buffer((key_blocks * 4,), "float16", scope="local")  # B frags of K
                                bv = T.sblock_alloc_buffer((v_group * 8,), "float16", scope="local")  # B frags of V
                                kx = T.sblock_alloc_buffer((16,), "float16", scope="local")  # a key's d0.., d0+half..
                                cs = T.sblock_alloc_buffer((16,), "float32", scope="local")  # their cos | sin
                                kr = T.sblock_alloc_buffer((16,), "float16", scope="local")  # rotated
                                # per row the thread holds (mt, rr): row0 + 16 mt + 8 rr
                                m_run = T.sblock_alloc_buffer((2 * m_tiles,), "float32", scope="local")
                                l_run = T.sblock_alloc_buffer((2 * m_tiles,), "float32", scope="local")
                                red = T.sblock_alloc_buffer((2,), "float32", scope="local")
                                qp = T.sblock_alloc_buffer((2 * m_tiles,), "int64", scope="local")
                                lim = T.sblock_alloc_buffer((2 * m_tiles,), "int32", scope="local")  # visible keys of the tile
                                tid: T.let[T.int64] = ty * 32 + tx
                                row0: T.let[T.int64] = bz * rows_per_block + ty * 16 * MT + tx // 4  # flat row of c0, c1
                                key_start: T.let[T.int64] = bx * SPLIT
                                key_lim: T.let[T.int64] = T.min(key_start + SPLIT, m_keys)
                                last_q: T.let[T.int64] = T.min(n * G - 1, bz * rows_per_block + rows_per_block - 1) // G
                                key_end: T.let[T.int64] = T.min(key_lim, m_keys - n + last_q + 1)
                                start_rows(qp, m_run, l_run, row0, m_keys, n)
                                stage_queries(q, rope, q_sh, m_keys, n, bz, by, tid)
                                for e in T.unroll(m_tiles * d_blocks * 4):
                                    of[e] = T.float32(0)
                                tiles: T.let[T.int64] = T.max(key_end - key_start + keys - 1, T.int64(0)) // keys
                                for t in T.unroll(i64(stages - 1)):  # the first tiles' copies
                                    if t < tiles:
                                        copy_tile(kv, rope, rows, kv_st, r_st, layer, cap, by, t, key_start, key_lim, tid)
                                    T.evaluate(T.ptx.cp.async_.commit_group())
                                for t in T.serial(tiles):
                                    j0: T.let[T.int64] = key_start + t * keys
                                    stage: T.let[T.int64] = t % stages * stage_elems
                                    for r2 in T.unroll(2 * MT):
                                        lim[r2] = T.Cast("int32", T.max(T.min(key_lim, qp[r2] + 1) - j0, T.int64(-1)))
                                    T.evaluate(T.ptx.cp.async_.wait_group(stages - 2))  # tile t landed (own copies)
                                    T.tvm_storage_sync("shared")  # everyone's; the previous tile's buffers are free
                                    if t + stages - 1 < tiles:
                                        copy_tile(kv, rope, rows, kv_st, r_st, layer, cap, by, t + stages - 1,
                                                  key_start, key_lim, tid)
                                    T.evaluate(T.ptx.cp.async_.commit_group())
                                    for it in T.unroll(k_items):  # keys: rotate, store float16
                                        # a thread past the tile redoes its last row (the same values): no branch,
                                        # so the barrier TVM adds before these shared-memory reads stays unconditional
                                        jj: T.let[T.int64] = T.min((it * threads + tid) // k_vecs, keys - 1)
                                        d0: T.let[T.int64] = (it * threads + tid) % k_vecs * 8
                                        for e in T.vectorized(8):
                                            kx[e] = kv_st[stage + jj * head_dim + d0 + e]
                                        for e in T.vectorized(8):
                                            kx[8 + e] = kv_st[stage + jj * head_dim + half + d0 + e]
                                        for e in T.vectorized(8):
                                            cs[e] = r_st[(t % stages * keys + jj) * head_dim + d0 + e]
                                        for e in T.vectorized(8):
                                            cs[8 + e] = r_st[(t % stages * keys + jj) * head_dim + half + d0 + e]
                                        rotate_pieces(kx, cs, kr)
                                        for e in T.vectorized(8):
                                            k_sh[jj * stride + d0 + e] = kr[e]
                                        for e in T.vectorized(8):
                                            k_sh[jj * stride + half + d0 + e] = kr[8 + e]
                                    T.tvm_storage_sync("shared")
                                    for e in T.unroll(m_tiles * key_blocks * 4):
                                        sf[e] = T.float32(0)
                                    for ks in T.unroll(k_steps):  # S = Q Kᵀ: independent mma back to back
                                        for mt in T.unroll(MT):
                                            T.evaluate(T.ptx_legacy.ldmatrix(
                                                False, 4, ".b16", qf.data, mt * 8, q_sh.access_ptr("r"),
                                                ((ty * MT + mt) * 16 + (tx // 8) % 2 * 8 + tx % 8) * stride + ks * 16 + tx // 16 * 8,
                                                dtype="float16"))
                                        for nb in T.unroll(key_blocks // 2):  # two key blocks per ldmatrix
                                            T.evaluate(T.ptx_legacy.ldmatrix(
                                                False, 4, ".b16", bk.data, nb * 8, k_sh.access_ptr("r"),
                                                ((2 * nb + tx // 16) * 8 + tx % 8) * stride + ks * 16 + (tx // 8) % 2 * 8,
                                                dtype="float16"))
                                        for mt in T.unroll(MT):
                                            for nb in T.unroll(key_blocks):
                                                mma_m16n8k16(qf, mt * 8, bk, nb * 4, sf, (mt * key_blocks + nb) * 4)
                                    online_softmax(sf, of, m_run, l_run, red, lim, tx)
                                    for e in T.unroll(m_tiles * key_blocks * 4):  # P as A fragments (same layout)
                                        pf[e] = T.Cast("float16", sf[e])
                                    for kk in T.unroll(pv_steps):  # O += P V: V_GROUP fragments, then their mma
                                        for vg in T.unroll(d_blocks // 2 // v_group):
                                            for nd in T.unroll(v_group):
                                                T.evaluate(T.ptx_legacy.ldmatrix(
                                                    True, 4, ".b16", bv.data, nd * 8, kv_st.access_ptr("r"),
                                                    stage + keys * head_dim + (kk * 16 + (tx // 8) % 2 * 8 + tx % 8) * stride
                                                    + (2 * (vg * v_group + nd) + tx // 16) * 8, dtype="float16"))
                                            for mt in T.unroll(MT):
                                                for nd in T.unroll(2 * v_group):
                                                    mma_m16n8k16(pf, (mt * pv_steps + kk) * 8, bv, nd * 4, of,
                                                        (mt * d_blocks + vg * 2 * v_group + nd) * 4)
                                write_output(o, lse, of, m_run, l_run, red, row0, bx, by, tx, n)

    return chunk_attention
