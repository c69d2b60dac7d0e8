"""Recycled Attention / RefreshKV (Xu, Goyal and Choi, arXiv 2411.05787): the partial cache.

Per layer and KV head the partial cache holds ``K`` cached rows and a score for each, in the first
``K`` of the ``K_max`` slots of ``cache_idx[num_layers, n_kv, K_max]`` int32 and
``cache_score[num_layers, n_kv, K_max]`` float32. ``K``, the active K, is a device value
(``active_k[1]`` int32, set by ``make_recycle_k`` from the context length: a count, or a fraction of
the prompt) that every kernel below reads, so one library serves every prompt length:
- a **full step** (the last prompt token, or a decode step whose refresh check missed) attends to
  every row and writes the logits of its query (``attention_partial``/``decode_attention`` with
  ``logit_sets = n_heads``); ``make_recycle_scores`` turns them into per-head softmax
  probabilities, takes the max over each KV head's query heads (GQA) and max-pools them over
  positions (kernel ``POOL_KERNEL``); the radix top-k (``topk.make_topk`` with ``heads`` and
  ``counted``) keeps the K largest; ``make_recycle_store`` writes those rows and their pooled
  scores into the cache;
- a **partial step** (``make_recycle_append``) evicts the lowest-scoring row (ties: the lowest
  position), appends the step's token with ``NEW_TOKEN_SCORE`` and attends to the K rows at their
  true positions (``row_sets = n_kv``, ``counted``).

Which step a layer runs is decided on the device by the Selection Cache check
(``selection_cache.make_selection_check`` with a stride) in ``state[layer, 0]`` (1: partial);
``gated`` makes any kernel of this family run only on one of the two, so the other's work is
skipped without a host round trip.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import stmt as sstmt
from tvm.script import tirx as T
from tvm.target import Target

from .common import device_count, i64, is_gpu
from .tokenselect_scoring import allreduce_max_f32, allreduce_sum_f32, thread_allreduce

POOL_KERNEL = 7  # the paper's max-pooling of the scores (odd: "same" padding keeps the length)
NEW_TOKEN_SCORE = 2.0  # above every probability (<= 1): appended tokens outrank the selected rows
PAD_SCORE = -1.0  # below every probability: the padding column of the scores
_THREADS = 256
_BIG = 3.0e38

_allreduce_min_f32 = thread_allreduce(lambda a, b: T.min(a, b), T.float32(_BIG))
_allreduce_min_i32 = thread_allreduce(lambda a, b: T.min(a, b), T.int32(2147483647))


# ---- gating -----------------------------------------------------------------------------------
def gated(func: tirx.PrimFunc, num_layers: int, width: int, when: int, inputs: int | None = None) -> tirx.PrimFunc:
    """``func`` doing its work only where ``gate[layer, 0] == when`` (a device-side decision).

    Adds the argument ``gate[num_layers, width]`` int32 right after ``func``'s int64 argument
    named ``layer``; a function without one gets ``gate`` and then ``layer`` (int64) inserted
    before its argument number ``inputs`` (its first output). Each block directly under the
    root (one CUDA thread's or one CPU task's whole work) is wrapped in the test, so a gated-off
    call launches its grid and returns at once, its outputs left unwritten.
    The result's symbol is ``func``'s with ``_when<when>`` appended (one module may hold both).
    Raises ValueError when ``func`` has no ``layer`` argument and ``inputs`` is None.
    """
    symbol = str(func.attrs["global_symbol"]) if "global_symbol" in func.attrs else "kernel"
    params = list(func.params)
    names = [p.name for p in params]
    gate = tirx.decl_buffer((i64(num_layers), i64(width)), "int32", name="gate")
    if "layer" in names:
        layer = params[names.index("layer")]
        params.insert(names.index("layer") + 1, gate)
    elif inputs is None:
        raise ValueError(f"gated({symbol}): no `layer` argument; say where the inputs end (inputs=)")
    else:
        layer = tirx.Var("layer", "int64")
        params[inputs:inputs] = [gate, layer]
    cond = tirx.EQ(tirx.BufferLoad(gate, [layer, i64(0)]), tirx.IntImm("int32", when))
    wrapped = tirx.PrimFunc(params, _wrap_blocks(func.body, cond, True), func.ret_type, func.attrs)
    return wrapped.with_attr("global_symbol", f"{symbol}_when{when}")


def _wrap_blocks(stmt, cond, root: bool):
    """``stmt`` with the body of every outermost non-root block under ``if cond``."""
    if isinstance(stmt, sstmt.SBlockRealize):
        block = stmt.block
        body = _wrap_blocks(block.body, cond, False) if root else tirx.IfThenElse(cond, block.body, None)
        new = sstmt.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, body, block.init,
                           block.alloc_buffers, block.match_buffers, block.annotations)
        return sstmt.SBlockRealize(stmt.iter_values, stmt.predicate, new)
    if isinstance(stmt, tirx.SeqStmt):
        return tirx.SeqStmt([_wrap_blocks(s, cond, root) for s in stmt.seq])
    if isinstance(stmt, tirx.For):
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, _wrap_blocks(stmt.body, cond, root),
                        stmt.thread_binding, stmt.annotations, stmt.step)
    if isinstance(stmt, tirx.AttrStmt):
        return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, _wrap_blocks(stmt.body, cond, root))
    if isinstance(stmt, tirx.IfThenElse):
        other = None if stmt.else_case is None else _wrap_blocks(stmt.else_case, cond, root)
        return tirx.IfThenElse(stmt.condition, _wrap_blocks(stmt.then_case, cond, root), other)
    return stmt  # leaves: declarations, bindings, stores (no block inside)


# ---- kernels ----------------------------------------------------------------------------------
def make_query_mean(n_heads: int, head_dim: int, dtype: str, target: Target) -> tirx.PrimFunc:
    """The refresh check's query: ``qmean[0] = mean_h q[n - 1, h]`` over the first ``n_heads``
    heads of the step's last query, before RoPE (so the cosine of two steps' means does not move
    with their positions). Args: q[n, >= H, d] ``dtype``. Output: qmean[1, d] float32."""
    gpu = is_gpu(target)
    H, D = i64(n_heads), i64(head_dim)

    @T.macro
    def mean(q, qmean, n, i):
        qmean[0, i] = T.float32(0)
        for h in T.serial(H):
            qmean[0, i] = qmean[0, i] + T.Cast("float32", q[n - 1, h, i])
        qmean[0, i] = qmean[0, i] / T.float32(n_heads)

    @T.prim_func(s_tir=True)
    def query_mean(q_h: T.handle, qmean_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        n, heads = T.int64(), T.int64()
        q = T.match_buffer(q_h, (n, heads, D), dtype)
        qmean = T.match_buffer(qmean_h, (T.int64(1), D), "float32")
        if gpu:
            for tx in T.thread_binding(D, thread="threadIdx.x"):
                with T.sblock("mean"):
                    mean(q, qmean, n, tx)
        else:
            for i in T.serial(D):
                with T.sblock("mean"):
                    mean(q, qmean, n, i)

    return query_mean


SCORE_CHUNKS = 64  # GPU: blocks per query head of the log-sum-exp pass


def make_recycle_scores(n_heads: int, n_kv: int, pool: int, target: Target) -> tirx.PrimFunc:
    """A full step's token scores per KV head, max-pooled.

    Args: logits[H, L] float32, the step's last query's scores in log2 units (``q.k / sqrt(d)
    * log2(e)``, the attention kernels' ``logit_sets = H`` output). Outputs: crit[Hkv, L + 1]
    float32 with ``crit[g, t] = max_{|u - t| <= pool // 2, 0 <= u < L} max_{h of group g}
    p[h, u]``, ``p[h] = softmax(logits[h])`` (the attention probabilities), and the padding
    column ``crit[g, L] = PAD_SCORE`` (so ``make_topk(heads=Hkv)`` with ``K + 1`` keeps the top K
    of the L real scores and returns the pad last); workspace stats[H, SCORE_CHUNKS + 1, 2]
    float32 (per chunk of each head's logits: max and sum of exp2 below it; then in slot
    SCORE_CHUNKS the head's log2-sum-exp). Raises ValueError for an even ``pool``.
    GPU: three passes over the whole GPU — chunk statistics (H x SCORE_CHUNKS blocks), their
    merge per head, the pooled scores (one thread a token); CPU: one task per KV head.
    """
    if pool < 1 or pool % 2 == 0:
        raise ValueError(f"pool={pool}: the max-pooling kernel must be odd (the paper's is 7)")
    gpu = is_gpu(target)
    group, radius = n_heads // n_kv, pool // 2
    H, HKV, G, NC = i64(n_heads), i64(n_kv), i64(n_heads // n_kv), i64(SCORE_CHUNKS)

    @T.macro
    def pooled(logits, crit, lse, g, t, L, best):
        best[0] = T.float32(PAD_SCORE)
        for w in T.serial(T.int64(pool)):
            u: T.let[T.int64] = t + w - radius
            if u >= 0 and u < L:
                for h in T.serial(G):
                    best[0] = T.max(best[0], T.exp2(logits[g * group + h, u] - lse[h]))
        crit[g, t] = best[0]

    @T.prim_func(s_tir=True)
    def recycle_scores(logits_h: T.handle, crit_h: T.handle, stats_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        L = T.int64()
        logits = T.match_buffer(logits_h, (H, L), "float32")
        crit = T.match_buffer(crit_h, (HKV, L + 1), "float32")
        stats = T.match_buffer(stats_h, (H, NC + 1, 2), "float32")
        if gpu:
            for b in T.thread_binding(NC, thread="blockIdx.x"):  # chunk b of head h: max, sum below it
                for h in T.thread_binding(H, thread="blockIdx.y"):
                    for tx in T.thread_binding(i64(_THREADS), thread="threadIdx.x"):
                        with T.sblock("chunk_stats"):
                            T.reads()
                            T.writes()
                            part = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            top = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            total = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            j0: T.let[T.int64] = b * T.ceildiv(L, NC)
                            j1: T.let[T.int64] = T.min(j0 + T.ceildiv(L, NC), L)
                            part[0] = T.float32(-_BIG)
                            for it in T.serial(T.ceildiv(T.max(j1 - j0 - tx, i64(0)), _THREADS)):
                                part[0] = T.max(part[0], logits[h, j0 + it * _THREADS + tx])
                            allreduce_max_f32(part, top, tx)
                            part[0] = T.float32(0)
                            for it in T.serial(T.ceildiv(T.max(j1 - j0 - tx, i64(0)), _THREADS)):
                                part[0] = part[0] + T.exp2(logits[h, j0 + it * _THREADS + tx] - top[0])
                            allreduce_sum_f32(part, total, tx)
                            if tx == 0:
                                stats[h, b, 0] = top[0]
                                stats[h, b, 1] = total[0]
            for h in T.thread_binding(H, thread="blockIdx.x"):  # per head: log2-sum-exp of the chunks
                for tx in T.thread_binding(NC, thread="threadIdx.x"):
                    with T.sblock("merge"):
                        part = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        top = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        total = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        part[0] = stats[h, tx, 0]
                        allreduce_max_f32(part, top, tx)
                        part[0] = stats[h, tx, 1] * T.exp2(stats[h, tx, 0] - top[0])
                        allreduce_sum_f32(part, total, tx)
                        if tx == 0:
                            stats[h, NC, 0] = top[0] + T.log2(total[0])
            for b in T.thread_binding(T.ceildiv(L + 1, _THREADS), thread="blockIdx.x"):  # one thread a token
                for g in T.thread_binding(HKV, thread="blockIdx.y"):
                    for tx in T.thread_binding(i64(_THREADS), thread="threadIdx.x"):
                        with T.sblock("scores"):
                            lse = T.sblock_alloc_buffer((group,), "float32", scope="local")
                            best = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            if b * _THREADS + tx < L:
                                for h in T.serial(G):
                                    lse[h] = stats[g * group + h, NC, 0]
                                pooled(logits, crit, lse, g, b * _THREADS + tx, L, best)
                            if b * _THREADS + tx == L:
                                crit[g, L] = T.float32(PAD_SCORE)
        else:
            for g in T.parallel(HKV):
                with T.sblock("scores"):
                    lse = T.sblock_alloc_buffer((group,), "float32")
                    stat = T.sblock_alloc_buffer((2,), "float32")
                    best = T.sblock_alloc_buffer((1,), "float32")
                    for h in T.serial(G):
                        stat[0] = T.float32(-_BIG)
                        for t in T.serial(L):
                            stat[0] = T.max(stat[0], logits[g * group + h, t])
                        stat[1] = T.float32(0)
                        for t in T.serial(L):
                            stat[1] = stat[1] + T.exp2(logits[g * group + h, t] - stat[0])
                        lse[h] = stat[0] + T.log2(stat[1])
                        stats[g * group + h, NC, 0] = lse[h]
                    for t in T.serial(L):
                        pooled(logits, crit, lse, g, t, L, best)
                    crit[g, L] = T.float32(PAD_SCORE)

    return recycle_scores


def make_recycle_k(fraction: tuple[int, int] | None, k_max: int, target: Target, k_min: int = 1) -> tirx.PrimFunc:
    """Set the active K of the partial caches (one value for every layer and KV head).

    Args: length[1] int32 (the context after the step's KV append), active_k[1] int32 (in place),
    force (int64: 1 in a prefill, 0 in a decode step). Where ``force`` is 1 or ``active_k[0]``
    is 0 (the state was just zeroed: no prefill set it), ``active_k[0]`` becomes ``k_max`` (a
    token count: ``fraction`` None) or ``clamp(round(p / q * length[0]), k_min, k_max)`` for
    ``fraction = (p, q)``, rounding halves up: ``(2 p L + q) // (2 q)`` in int64.
    Relax: ``call_tir_inplace`` with inplace_indices ``[1]``. One thread.
    Raises ValueError unless ``1 <= k_min <= k_max`` and a fraction is in (0, 1].
    """
    if not 1 <= k_min <= k_max or (fraction is not None and not 0 < fraction[0] <= fraction[1]):
        raise ValueError(f"recycle K: k_min={k_min}, k_max={k_max}, fraction={fraction}: need 1 <= k_min <= k_max "
                         "and 0 < p <= q")
    gpu = is_gpu(target)

    def value(length):
        if fraction is None:
            return T.int32(k_max)
        p, q = i64(fraction[0]), i64(fraction[1])
        rounded = (2 * p * T.Cast("int64", length[0]) + q) // (2 * q)
        return T.Cast("int32", T.min(T.max(rounded, i64(k_min)), i64(k_max)))

    @T.macro
    def update(length, active_k, force):
        if force == 1 or active_k[0] == 0:
            active_k[0] = value(length)

    @T.prim_func(s_tir=True)
    def recycle_k(length_h: T.handle, active_k_h: T.handle, force: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        length = T.match_buffer(length_h, (T.int64(1),), "int32")
        active_k = T.match_buffer(active_k_h, (T.int64(1),), "int32")
        if gpu:
            for tx in T.thread_binding(T.int64(1), thread="threadIdx.x"):
                with T.sblock("recycle_k"):
                    update(length, active_k, force)
        else:
            with T.sblock("recycle_k"):
                update(length, active_k, force)

    return recycle_k


def make_recycle_store(num_layers: int, n_kv: int, k: int, target: Target) -> tirx.PrimFunc:
    """Rebuild a layer's partial cache from a full step's selection, ``K_a`` active slots of ``k``.

    Args: idx[Hkv, k + 1] int32 (``make_topk(heads=Hkv, counted=True)``'s rows over ``crit``
    with count ``K_a``: the top ``K_a`` sorted, then the pad), crit[Hkv, L + 1] float32
    (``make_recycle_scores``), cache_idx[num_layers, Hkv, k] int32 and cache_score[num_layers,
    Hkv, k] float32 (both updated in place), active_k[1] int32 (``K_a = min(active_k[0], k)``),
    layer (int64). ``cache_idx[layer, g, j] = idx[g, j]`` and ``cache_score[layer, g, j] =
    crit[g, idx[g, j]]`` for ``j < K_a``; slots from ``K_a`` on are left as they are.
    Relax: ``call_tir_inplace`` with inplace_indices ``[2, 3]``.
    """
    gpu = is_gpu(target)
    NL, HKV, K = i64(num_layers), i64(n_kv), i64(k)

    @T.macro
    def store(idx, crit, cache_idx, cache_score, layer, g, j):
        cache_idx[layer, g, j] = idx[g, j]
        cache_score[layer, g, j] = crit[g, T.Cast("int64", idx[g, j])]

    @T.prim_func(s_tir=True)
    def recycle_store(idx_h: T.handle, crit_h: T.handle, cache_idx_h: T.handle, cache_score_h: T.handle,
                      active_k_h: T.handle, layer: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        L1 = T.int64()
        idx = T.match_buffer(idx_h, (HKV, K + 1), "int32")
        crit = T.match_buffer(crit_h, (HKV, L1), "float32")
        cache_idx = T.match_buffer(cache_idx_h, (NL, HKV, K), "int32")
        cache_score = T.match_buffer(cache_score_h, (NL, HKV, K), "float32")
        active_k = T.match_buffer(active_k_h, (T.int64(1),), "int32")
        if gpu:
            for b in T.thread_binding(T.ceildiv(HKV * K, _THREADS), thread="blockIdx.x"):
                for tx in T.thread_binding(i64(_THREADS), thread="threadIdx.x"):
                    with T.sblock("store"):
                        if b * _THREADS + tx < HKV * K:
                            if (b * _THREADS + tx) % K < device_count(active_k, k):
                                store(idx, crit, cache_idx, cache_score, layer, (b * _THREADS + tx) // K,
                                      (b * _THREADS + tx) % K)
        else:
            for g in T.parallel(HKV):
                with T.sblock("store"):
                    for j in T.serial(device_count(active_k, k)):
                        store(idx, crit, cache_idx, cache_score, layer, g, j)

    return recycle_store


def make_recycle_append(num_layers: int, n_kv: int, k: int, target: Target) -> tirx.PrimFunc:
    """A partial step's cache update among the ``K_a`` active slots of ``k``: per KV head, the
    row of lowest score (ties: the lowest position) leaves; its slot takes slot ``K_a - 1``'s row
    and slot ``K_a - 1`` the step's token.

    Args: cache_idx[num_layers, Hkv, k] int32 and cache_score[num_layers, Hkv, k] float32
    (updated in place), active_k[1] int32 (``K_a = min(active_k[0], k)``, at least 1), layer
    (int64), length (int64: the context after the step's KV append, so the step's token is row
    ``length - 1``). Output: rows[Hkv, k] int32, whose first ``K_a`` columns are the layer's cache
    after the update: the rows ``attention_partial``/``decode_attention`` (``row_sets = Hkv``,
    ``counted``) read (the step's token last, as they need; the others in no particular order);
    columns from ``K_a`` on are not written. Relax: ``call_tir_inplace`` with inplace_indices
    ``[0, 1, -1]``. GPU: one block per KV head (two block-wide minima find the slot); CPU: one
    task per KV head.
    """
    gpu = is_gpu(target)
    NL, HKV, K = i64(num_layers), i64(n_kv), i64(k)

    @T.macro
    def replace(cache_idx, cache_score, layer, g, slot, length, last):
        cache_idx[layer, g, slot] = cache_idx[layer, g, last]
        cache_score[layer, g, slot] = cache_score[layer, g, last]
        cache_idx[layer, g, last] = T.Cast("int32", length - 1)
        cache_score[layer, g, last] = T.float32(NEW_TOKEN_SCORE)

    @T.prim_func(s_tir=True)
    def recycle_append(cache_idx_h: T.handle, cache_score_h: T.handle, active_k_h: T.handle, layer: T.int64,
                       length: T.int64, rows_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        cache_idx = T.match_buffer(cache_idx_h, (NL, HKV, K), "int32")
        cache_score = T.match_buffer(cache_score_h, (NL, HKV, K), "float32")
        active_k = T.match_buffer(active_k_h, (T.int64(1),), "int32")
        rows = T.match_buffer(rows_h, (HKV, K), "int32")
        if gpu:
            for g in T.thread_binding(HKV, thread="blockIdx.x"):
                for tx in T.thread_binding(i64(_THREADS), thread="threadIdx.x"):
                    with T.sblock("append"):
                        T.reads()  # regions would name the block's lets
                        T.writes()
                        low = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        low_all = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        pos = T.sblock_alloc_buffer((1,), "int32", scope="local")
                        pos_all = T.sblock_alloc_buffer((1,), "int32", scope="local")
                        slot = T.sblock_alloc_buffer((1,), "int64", scope="shared")
                        ka: T.let[T.int64] = device_count(active_k, k)
                        low[0] = T.float32(_BIG)
                        for it in T.serial(T.ceildiv(ka - tx, _THREADS)):
                            low[0] = T.min(low[0], cache_score[layer, g, it * _THREADS + tx])
                        _allreduce_min_f32(low, low_all, tx)
                        pos[0] = T.int32(2147483647)
                        for it in T.serial(T.ceildiv(ka - tx, _THREADS)):
                            if cache_score[layer, g, it * _THREADS + tx] == low_all[0]:
                                pos[0] = T.min(pos[0], cache_idx[layer, g, it * _THREADS + tx])
                        _allreduce_min_i32(pos, pos_all, tx)
                        for it in T.serial(T.ceildiv(ka - tx, _THREADS)):  # rows are distinct: one slot
                            if cache_score[layer, g, it * _THREADS + tx] == low_all[0]:
                                if cache_idx[layer, g, it * _THREADS + tx] == pos_all[0]:
                                    slot[0] = it * _THREADS + tx
                        T.tvm_storage_sync("shared")
                        if tx == 0:
                            replace(cache_idx, cache_score, layer, g, slot[0], length, ka - 1)
                        T.tvm_storage_sync("shared")
                        for it in T.serial(T.ceildiv(ka - tx, _THREADS)):
                            rows[g, it * _THREADS + tx] = cache_idx[layer, g, it * _THREADS + tx]
        else:
            for g in T.parallel(HKV):
                with T.sblock("append"):
                    T.reads()
                    T.writes()
                    slot = T.sblock_alloc_buffer((1,), "int64")
                    ka: T.let[T.int64] = device_count(active_k, k)
                    slot[0] = T.int64(0)
                    for j in T.serial(ka):
                        if cache_score[layer, g, j] < cache_score[layer, g, slot[0]] or (
                                cache_score[layer, g, j] == cache_score[layer, g, slot[0]]
                                and cache_idx[layer, g, j] < cache_idx[layer, g, slot[0]]):
                            slot[0] = j
                    replace(cache_idx, cache_score, layer, g, slot[0], length, ka - 1)
                    for j in T.serial(ka):
                        rows[g, j] = cache_idx[layer, g, j]

    return recycle_append
