"""Selection Cache check: reuse the layer's cached top-k when the fingerprint barely moved.

State, per layer: ``cache_qbar[num_layers, H, d]`` float32, ``cache_idx[num_layers, top_k]``
int32 (written by topk.py), ``state[num_layers, 4]`` int32 =
``[hit_this_step, valid, hits, lookups]``. The runtime resets everything by zeroing ``state``.

Per layer and step the model calls: fingerprint → **check** → scoring → top-k → attention over
``cache_idx[layer]``. Scoring and top-k read ``state[layer, 0]`` and do nothing on a hit, so the
decision never leaves the device. Like the reference (``torch.cosine_similarity`` against the
fingerprint stored at the last re-selection), a hit does not update the stored fingerprint.

Recycled Attention (Xu et al., arXiv 2411.05787, "RefreshKV") decides the same way whether a
decode step may reuse its partial cache, with a stride: the same kernel with ``stride > 0``
(see ``make_selection_check``).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .common import i64, is_gpu
from .tokenselect_scoring import rotated_term

_THREADS = 1024
STRIDE_STATE = 5  # state columns with a stride: the four above, then steps since the last miss


def make_selection_check(num_layers: int, n_heads: int, head_dim: int, threshold: float | None,
                         target: Target, stride: int = 0,
                         fingerprint: tuple[int, str] | None = None) -> tirx.PrimFunc:
    """Decide hit/miss for ``layer`` and update the cache state in place.

    Args (in order): qbar[H, d] float32, cache_qbar[num_layers, H, d] float32 (in place),
    state[num_layers, 4] int32 (in place), layer (int64), force_miss (int64; 1 for prefill
    chunks, which always re-select and are not counted as lookups). No fresh output.
    Relax: ``call_tir_inplace`` with inplace_indices ``[1, 2]``.

    hit = not force_miss and valid and cos(qbar, cache_qbar[layer]) >= threshold, the cosine
    over the flattened H·d vector (``dot / max(|a| |b|, 1e-8)``). On a miss qbar is stored and
    the layer marked valid; ``hits`` and ``lookups`` count the non-forced checks.

    ``stride > 0`` (Recycled Attention's refresh check): ``state[num_layers, STRIDE_STATE]``,
    column 4 counting the steps since the layer's last miss; a step ``s`` steps after it compares
    only when ``s % stride == 0`` and hits otherwise (a valid layer); ``threshold=None`` (the
    fixed-stride variant) never hits on those steps. A miss resets the count to 0.
    ``fingerprint=(n_local, dtype)`` (a decode step: one launch instead of two): the kernel also
    computes the fingerprint of the step's one query (tokenselect_scoring.make_fingerprint's
    ``qbar`` for n = 1). Args: q[1, >= H, d] ``dtype``, rope[P, d] float32 (P > n_local),
    cache_qbar, state, layer, force_miss as above; fresh output qbar[H, d] float32. Relax:
    inplace_indices ``[2, 3, -1]``.
    Raises ValueError for ``stride < 0`` or ``threshold=None`` without a stride.
    """
    if stride < 0 or (threshold is None and stride == 0):
        raise ValueError(f"selection check: stride={stride}, threshold={threshold}; a fixed "
                         "refresh (threshold None) needs stride >= 1")
    gpu = is_gpu(target)
    H, d = i64(n_heads), i64(head_dim)
    size = n_heads * head_dim
    width = STRIDE_STATE if stride else 4
    similar_needed = threshold is not None

    def compared_hit(dot, na, nb):
        """The cosine test (the fixed stride's refresh never passes it)."""
        if not similar_needed:
            return False
        return dot >= T.float32(threshold) * T.max(T.sqrt(na * nb), T.float32(1e-8))

    @T.macro
    def update(qbar, cache_qbar, state, layer, force_miss, dot, na, nb, valid, since, i0, step, first):
        # since: steps since the last miss, this one included (stride checks only)
        hit: T.let[T.bool] = (force_miss == 0 and valid == 1
                              and ((stride > 0 and since % T.max(stride, 1) != 0) or compared_hit(dot, na, nb)))
        if not hit:
            for i in range(T.ceildiv(size - i0, step)):
                cache_qbar[layer, (i0 + i * step) // d, (i0 + i * step) % d] = qbar[(i0 + i * step) // d, (i0 + i * step) % d]
        if first:
            state[layer, 0] = T.Cast("int32", hit)
            state[layer, 1] = 1
            state[layer, 2] = state[layer, 2] + T.Cast("int32", hit)
            state[layer, 3] = state[layer, 3] + T.Cast("int32", force_miss == 0)
            if stride > 0:  # static
                state[layer, width - 1] = T.if_then_else(hit, since, 0)

    @T.macro
    def element(qbar, q, rope, e, av):
        # av[0] = the fingerprint's flat element e: read from qbar, or (fused) computed from the
        # queries and stored into qbar
        if q is None:
            av[0] = qbar[e // d, e % d]
        else:
            av[0] = T.float32(0)
            rotated_term(q, rope, e // d, e % d, 0, av, fingerprint[0], head_dim // 2)
            qbar[e // d, e % d] = av[0]

    @T.macro
    def check(qbar, q, rope, cache_qbar, state, layer, force_miss):
        if gpu:
            for tx in T.thread_binding(i64(_THREADS), thread="threadIdx.x"):
                with T.sblock("check"):
                    # per-thread partial sums of a·b, a·a, b·b, then their block-wide sums
                    p_ab = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    p_aa = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    p_bb = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    ab = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    aa = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    bb = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    av = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    valid: T.let[T.int32] = state[layer, 1]  # read before any thread writes
                    since: T.let[T.int32] = state[layer, width - 1] + 1
                    p_ab[0] = T.float32(0)
                    p_aa[0] = T.float32(0)
                    p_bb[0] = T.float32(0)
                    for i in T.unroll((size + _THREADS - 1) // _THREADS):
                        if tx + i * _THREADS < size:
                            element(qbar, q, rope, tx + i * _THREADS, av)
                            b: T.let[T.float32] = cache_qbar[layer, (tx + i * _THREADS) // d, (tx + i * _THREADS) % d]
                            p_ab[0] = p_ab[0] + av[0] * b
                            p_aa[0] = p_aa[0] + av[0] * av[0]
                            p_bb[0] = p_bb[0] + b * b
                    with T.sblock("sums"):  # the three block-wide sums in one reduction
                        T.reads(p_ab[0], p_aa[0], p_bb[0])
                        T.writes(ab[0], aa[0], bb[0])
                        T.attr(T.comm_reducer(lambda a0, a1, a2, b0, b1, b2: (a0 + b0, a1 + b1, a2 + b2),
                                              [T.float32(0), T.float32(0), T.float32(0)]),
                               "reduce_scope", T.reinterpret("handle", T.uint64(0)))
                        T.tvm_thread_allreduce(T.uint32(3), p_ab[0], p_aa[0], p_bb[0], True, ab[0], aa[0], bb[0],
                                               tx, dtype="void")
                    update(qbar, cache_qbar, state, layer, force_miss, ab[0], aa[0], bb[0],
                           valid, since, tx, _THREADS, tx == 0)
        else:
            with T.sblock("check"):
                part = T.sblock_alloc_buffer((3,), "float32")
                av = T.sblock_alloc_buffer((1,), "float32")
                for j in range(3):
                    part[j] = T.float32(0)
                for e in range(size):
                    element(qbar, q, rope, e, av)
                    part[0] = part[0] + av[0] * cache_qbar[layer, e // d, e % d]
                    part[1] = part[1] + av[0] * av[0]
                    part[2] = part[2] + cache_qbar[layer, e // d, e % d] * cache_qbar[layer, e // d, e % d]
                update(qbar, cache_qbar, state, layer, force_miss, part[0], part[1], part[2],
                       state[layer, 1], state[layer, width - 1] + 1, 0, 1, True)

    if fingerprint is not None:

        @T.prim_func(s_tir=True)
        def fingerprint_check(q_h: T.handle, rope_h: T.handle, cache_qbar_h: T.handle, state_h: T.handle,
                              layer: T.int64, force_miss: T.int64, qbar_h: T.handle):
            T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
            P, heads = T.int64(), T.int64()
            q = T.match_buffer(q_h, (T.int64(1), heads, d), fingerprint[1])  # the query: the first H heads
            rope = T.match_buffer(rope_h, (P, d), "float32")
            qbar = T.match_buffer(qbar_h, (H, d), "float32")
            cache_qbar = T.match_buffer(cache_qbar_h, (i64(num_layers), H, d), "float32")
            state = T.match_buffer(state_h, (i64(num_layers), width), "int32")
            check(qbar, q, rope, cache_qbar, state, layer, force_miss)

        return fingerprint_check

    @T.prim_func(s_tir=True)
    def selection_check(qbar_h: T.handle, cache_qbar_h: T.handle, state_h: T.handle,
                        layer: T.int64, force_miss: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        qbar = T.match_buffer(qbar_h, (H, d), "float32")
        cache_qbar = T.match_buffer(cache_qbar_h, (i64(num_layers), H, d), "float32")
        state = T.match_buffer(state_h, (i64(num_layers), width), "int32")
        check(qbar, None, None, cache_qbar, state, layer, force_miss)

    return selection_check
