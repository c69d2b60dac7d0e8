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

On Hopper (``sm_90a``) both products run on ``wgmma`` instead (``matmul_wgmma``; FlashAttention-3's
use of it, Shah et al. 2024, without its warp specialisation): two warpgroups of 64 rows; queries,
rotated keys and values live in shared memory in wgmma's 128-byte-swizzled layout (64 elements a
row, ``matmul.swizzled``, atoms of ``head_dim / 64`` column blocks) so ``S = Q Kᵀ`` reads both
operands through descriptors, and ``O += P V`` takes ``P`` from registers (the accumulator layout of
``S`` is wgmma's register layout of A) and ``V`` MN-major (``trans_b``); generic-proxy writes
(the staged queries, rotated keys, ``cp.async`` copies) are fenced for the async proxy before the
block barrier that precedes their wgmma.
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


def chunk_splits(num_keys: "tirx.PrimExpr | int") -> "tirx.PrimExpr | int":
    """Partial outputs per query for ``num_keys`` attended rows: one per ``SPLIT`` keys."""
    return (num_keys + SPLIT - 1) // SPLIT


def _shared_bytes(head_dim: int, warps: int, keys: int, stages: int, m_tiles: int, hopper: bool = False) -> int:
    """Shared memory of one block: staged queries, the rotated key tile, and per stage the raw
    keys, values (float16; rows padded but with ``hopper``) and RoPE rows (float32)."""
    stride = head_dim if hopper else head_dim + PAD
    return (16 * warps * m_tiles + keys) * stride * 2 + stages * keys * ((head_dim + stride) * 2 + head_dim * 4)


def uses_wgmma(head_dim: int, target: Target) -> bool:
    """The Hopper path: CUDA sm_90a and ``head_dim`` a multiple of 64 (whole 128-byte swizzle rows)."""
    return target.kind.name == "cuda" and str(target.attrs.get("arch", "")) == "sm_90a" and head_dim % 64 == 0


def _swizzled_at(row: "tirx.PrimExpr", col: "tirx.PrimExpr", rows: int) -> "tirx.PrimExpr":
    """Element offset of (``row``, ``col``) in a ``rows``-row float16 tile stored as wgmma's 128-byte
    swizzle atoms: column block ``col // 64`` after column block, 64 elements a row."""
    return col // 64 * rows * 64 + swizzled(row, col % 64 // 8, 64) + col % 8


def supported(dtype: str, head_dim: int, target: Target) -> bool:
    """True where the kernel runs: CUDA sm_80 or newer, float16, ``head_dim`` a multiple of 16, and
    a block of one mma tile per warp within the target's shared memory."""
    return (has_mma_sync(target) and dtype == "float16" and head_dim % 16 == 0
            and _shared_bytes(head_dim, WARPS, KEYS, STAGES, 1) <= max_shared_memory(target))


def make_chunk_attention(num_layers: int, n_heads: int, n_kv: int, head_dim: int, dtype: str,
                         target: Target, warps: int | None = None, keys: int = KEYS, stages: int = STAGES,
                         m_tiles: int | None = None) -> tirx.PrimFunc:
    """Args: q[n, >= H, d] float16 (its first H heads are the queries), kv[layers, 2, Hkv, cap, d]
    float16, rope[P, d] float32, rows[M] int32, layer (int64).

    Outputs: o[n, S, H, d] float32 (each split's normalised output), lse[n, S, H] float32
    (log2-sum-exp of the split's scaled scores, ``NEG_INF`` where the split has no visible key),
    with ``S = chunk_splits(M)``. ``warps`` (``16 m_tiles`` rows each; default ``WARPS``) and ``keys``
    (a multiple of 16 dividing ``SPLIT``) shape the block and its key tile; ``stages`` (≥ 2) tiles are in
    shared memory; ``m_tiles`` defaults to ``M_TILES`` where that block fits the target's shared memory
    (sm_90, sm_80), else 1 (sm_86/89: 99 KB). Where ``uses_wgmma`` holds the block is 8 warps (two
    warpgroups) of one 16-row tile each, ``keys`` at most 256. Raises ValueError where ``supported`` is
    False or the block exceeds the target's shared memory.
    """
    if not supported(dtype, head_dim, target):
        raise ValueError("tensor-core chunk attention needs CUDA sm_80+, float16 and head_dim a multiple "
                         f"of 16 (got {target.kind.name}, {dtype}, head_dim {head_dim}); use attention_partial")
    limit = max_shared_memory(target)
    hopper = uses_wgmma(head_dim, target)
    if hopper:
        if warps not in (None, 8) or m_tiles not in (None, 1) or keys > 256:
            raise ValueError(f"wgmma chunk attention: 8 warps of one 16-row tile and at most 256 keys a tile "
                             f"(got warps {warps}, m_tiles {m_tiles}, keys {keys})")
        warps, m_tiles = 8, 1
    warps = warps or WARPS
    if m_tiles is None:
        m_tiles = M_TILES if _shared_bytes(head_dim, warps, keys, stages, M_TILES) <= limit else 1
    group = n_heads // n_kv
    half = head_dim // 2
    stride = head_dim if hopper else head_dim + PAD
    threads, rows_per_block = 32 * warps, 16 * warps * m_tiles
    MT = i64(m_tiles)
    stage_elems = keys * (head_dim + stride)  # float16: raw keys, values (padded rows but on Hopper)
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

    def k_at(j, c):  # the rotated key tile
        return _swizzled_at(j, c, keys) if hopper else j * stride + c

    def v_at(j, c):  # a stage's values, after its raw keys
        return keys * head_dim + (_swizzled_at(j, c, keys) if hopper else j * stride + c)

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
                    kv_st.data, base + v_at(jj, c), kv.data,
                    (((layer * 2 + 1) * HKV + by) * cap + row) * D + c, 16, dtype="float16"))
        for it in T.unroll(i64(rope_items)):
            if it * threads + tid < keys * (head_dim // 4):
                jj: T.let[T.int64] = (it * threads + tid) // (head_dim // 4)
                c: T.let[T.int64] = (it * threads + tid) % (head_dim // 4) * 4
                T.evaluate(T.s_tir.cp_async_raw.legacy(
                    r_st.data, (t % stages * keys + jj) * head_dim + c, rope.data,
                    T.min(key_start + t * keys + jj, key_lim - 1) * D + c, 16, dtype="float32"))

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
                                # (on Hopper dynamic too: wgmma's swizzled tiles need 1024-byte alignment, which
                                # a static buffer before the dynamic ones would break)
                                k_sh = T.sblock_alloc_buffer((keys * stride,), "float16",
                                                             scope="shared.dyn" if hopper else "shared")
                                kv_st = T.sblock_alloc_buffer((stages * stage_elems,), "float16", scope="shared.dyn")
                                r_st = T.sblock_alloc_buffer((stages * keys * head_dim,), "float32", scope="shared.dyn")
                                q_sh = T.sblock_alloc_buffer((rows_per_block * stride,), "float16", scope="shared.dyn")
                                qf = T.sblock_alloc_buffer((m_tiles * 8,), "float16", scope="local")  # A fragments of Q
                                sf = T.sblock_alloc_buffer((m_tiles * key_blocks * 4,), "float32", scope="local")
                                pf = T.sblock_alloc_buffer((m_tiles * pv_steps * 8,), "float16", scope="local")
                                pa = T.sblock_alloc_buffer((pv_steps * 4,), "uint32", scope="local")  # P, wgmma's A
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
                                for mt in T.unroll(MT):  # rows row0 + 16 mt + 8 rr: query positions
                                    for rr in T.unroll(2):
                                        qp[mt * 2 + rr] = T.if_then_else(
                                            row0 + 16 * mt + 8 * rr < n * G, m_keys - n + (row0 + 16 * mt + 8 * rr) // G, T.int64(-1))
                                        m_run[mt * 2 + rr] = T.float32(NEG_INF)
                                        l_run[mt * 2 + rr] = T.float32(0)
                                for it in T.serial(q_items):  # the block's queries, rotated and scaled
                                    f: T.let[T.int64] = bz * rows_per_block + (it * threads + tid) // head_dim
                                    dq: T.let[T.int64] = (it * threads + tid) % head_dim
                                    if it * threads + tid < rows_per_block * head_dim:
                                        q_sh[q_at(f - bz * rows_per_block, dq)] = T.if_then_else(
                                            f < n * G, T.Cast("float16", scale * rope_rotated(
                                                q, f // G, by * G + f % G, dq, rope, m_keys - n + f // G, half)),
                                            T.float16(0))
                                if hopper:
                                    T.evaluate(T.ptx.fence.proxy.async_.shared__cta())
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
                                    if hopper:
                                        T.evaluate(T.ptx.fence.proxy.async_.shared__cta())
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
                                        for e in T.unroll(8):
                                            kr[e] = T.Cast("float16", T.Cast("float32", kx[e]) * cs[e]
                                                           - T.Cast("float32", kx[8 + e]) * cs[8 + e])
                                            kr[8 + e] = T.Cast("float16", T.Cast("float32", kx[8 + e]) * cs[e]
                                                               + T.Cast("float32", kx[e]) * cs[8 + e])
                                        for e in T.vectorized(8):
                                            k_sh[k_at(jj, d0) + e] = kr[e]
                                        for e in T.vectorized(8):
                                            k_sh[k_at(jj, half + d0) + e] = kr[8 + e]
                                    if hopper:
                                        T.evaluate(T.ptx.fence.proxy.async_.shared__cta())
                                    T.tvm_storage_sync("shared")
                                    for e in T.unroll(m_tiles * key_blocks * 4):
                                        sf[e] = T.float32(0)
                                    if hopper:  # S = Q Kᵀ: the warpgroup's 64 rows x the tile's keys
                                        T.evaluate(T.ptx.wgmma.fence.sync.aligned())
                                        for ks in T.unroll(k_steps):
                                            T.evaluate(wgmma(keys, sf, keys // 2, smem_descriptor(T.cuda.cvta_generic_to_shared(
                                                q_sh.access_ptr("r", offset=ks // 4 * rows_per_block * 64 + ty // 4 * 64 * 64
                                                                + ks % 4 * 16))),
                                                smem_descriptor(T.cuda.cvta_generic_to_shared(
                                                    k_sh.access_ptr("r", offset=ks // 4 * keys * 64 + ks % 4 * 16)))))
                                        T.evaluate(T.ptx.wgmma.commit_group.sync.aligned())
                                        T.evaluate(T.ptx.wgmma.wait_group.sync.aligned(0))
                                    for ks in T.unroll(0 if hopper else k_steps):  # S = Q Kᵀ: independent mma back to back
                                        for mt in T.unroll(MT):
                                            T.evaluate(T.ptx_legacy.ldmatrix(
                                                False, 4, ".b16", qf.data, mt * 8, q_sh.access_ptr("r"),
                                                q_at((ty * MT + mt) * 16 + (tx // 8) % 2 * 8 + tx % 8, ks * 16 + tx // 16 * 8),
                                                dtype="float16"))
                                        for nb in T.unroll(key_blocks // 2):  # two key blocks per ldmatrix
                                            T.evaluate(T.ptx_legacy.ldmatrix(
                                                False, 4, ".b16", bk.data, nb * 8, k_sh.access_ptr("r"),
                                                k_at((2 * nb + tx // 16) * 8 + tx % 8, ks * 16 + (tx // 8) % 2 * 8),
                                                dtype="float16"))
                                        for mt in T.unroll(MT):
                                            for nb in T.unroll(key_blocks):
                                                mma_m16n8k16(qf, mt * 8, bk, nb * 4, sf, (mt * key_blocks + nb) * 4)
                                    for mt in T.unroll(MT):  # mask, online softmax of rows row0 + 16 mt + 8 rr
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
                                                        of[(mt * d_blocks + nd) * 4 + rr * 2 + c] = (
                                                            of[(mt * d_blocks + nd) * 4 + rr * 2 + c] * red[0])
                                            for nb in T.unroll(key_blocks):
                                                for c in T.unroll(2):
                                                    sf[(mt * key_blocks + nb) * 4 + rr * 2 + c] = T.if_then_else(
                                                        sf[(mt * key_blocks + nb) * 4 + rr * 2 + c] > T.float32(NEG_INF / 2),
                                                        T.exp2(sf[(mt * key_blocks + nb) * 4 + rr * 2 + c] - red[1]), T.float32(0))
                                                    l_run[mt * 2 + rr] = l_run[mt * 2 + rr] + sf[(mt * key_blocks + nb) * 4 + rr * 2 + c]
                                    for e in T.unroll(m_tiles * key_blocks * 4):  # P as A fragments (same layout)
                                        pf[e] = T.Cast("float16", sf[e])
                                    if hopper:  # O += P V: P from registers, V MN-major
                                        for e in T.unroll(pv_steps * 4):
                                            pa[e] = T.Cast("uint32", T.reinterpret("uint16", pf[2 * e])) | (
                                                T.Cast("uint32", T.reinterpret("uint16", pf[2 * e + 1])) << T.uint32(16))
                                        T.evaluate(T.ptx.wgmma.fence.sync.aligned())
                                        for kk in T.unroll(pv_steps):
                                            T.evaluate(wgmma(head_dim, of, head_dim // 2, (pa, kk * 4),
                                                             smem_descriptor(T.cuda.cvta_generic_to_shared(kv_st.access_ptr(
                                                                 "r", offset=stage + v_at(kk * 16, 0))), lbo=keys * 128),
                                                             trans_b=1))
                                        T.evaluate(T.ptx.wgmma.commit_group.sync.aligned())
                                        T.evaluate(T.ptx.wgmma.wait_group.sync.aligned(0))
                                    for kk in T.unroll(0 if hopper else pv_steps):  # O += P V: V_GROUP fragments, then their mma
                                        for vg in T.unroll(d_blocks // 2 // v_group):
                                            for nd in T.unroll(v_group):
                                                T.evaluate(T.ptx_legacy.ldmatrix(
                                                    True, 4, ".b16", bv.data, nd * 8, kv_st.access_ptr("r"),
                                                    stage + v_at(kk * 16 + (tx // 8) % 2 * 8 + tx % 8,
                                                                 (2 * (vg * v_group + nd) + tx // 16) * 8), dtype="float16"))
                                            for mt in T.unroll(MT):
                                                for nd in T.unroll(2 * v_group):
                                                    mma_m16n8k16(pf, (mt * pv_steps + kk) * 8, bv, nd * 4, of,
                                                        (mt * d_blocks + vg * 2 * v_group + nd) * 4)
                                for mt in T.unroll(MT):  # normalise, write the split's output
                                    for rr in T.unroll(2):
                                        red[0] = l_run[mt * 2 + rr]
                                        for r in T.unroll(2):
                                            red[0] = red[0] + T.tvm_warp_shuffle(
                                                T.uint32(0xFFFFFFFF), red[0], tx ^ (T.int64(1) << r), 32, 32)
                                        row: T.let[T.int64] = row0 + 16 * mt + 8 * rr
                                        if row < n * G:
                                            for nd in T.unroll(d_blocks):
                                                for c in T.unroll(2):
                                                    o[row // G, bx, by * G + row % G, nd * 8 + (tx % 4) * 2 + c] = T.if_then_else(
                                                        red[0] > T.float32(0), of[(mt * d_blocks + nd) * 4 + rr * 2 + c] / red[0],
                                                        T.float32(0))
                                            if tx % 4 == 0:
                                                lse[row // G, bx, by * G + row % G] = T.if_then_else(
                                                    red[0] > T.float32(0), m_run[mt * 2 + rr] + T.log2(red[0]), T.float32(NEG_INF))

    return chunk_attention
