"""TokenSelect query fingerprint, per-head scoring and soft voting (DESIGN.md, steps 3).

What the reference (public pzs19/TokenSelect, ``patcher/token_retrieval.py``) computes, and what
these kernels match:
- no ``1/sqrt(d)`` scaling: ``scores = q̄ · k`` (its Triton ``paged_matmul_kernel``), then
  ``torch.softmax(scores, -1).sum(0)``; it stores the scores in bfloat16, we keep float32;
- pooling ``F.max_pool1d(crit, kernel_size=p, padding=(p - 1) // 2, stride=1)`` (implicit -inf
  padding) when ``p > 0``; for even ``p`` that output is one element shorter (``C - 1``): the last
  candidate can never be chosen. Here ``crit`` keeps length ``C`` and that last entry is ``-inf``
  (so top-k takes it only when ``k == C``, where the reference would fail);
- keys in the cache are stored without RoPE; the fingerprint is rotated, the keys are not;
- it maps query head ``h`` to KV head ``h % n_kv``; we use the correct GQA map ``h // group``;
- it rotates query ``i`` of the step at position ``n_local + i`` and then averages, and so do we
  (DESIGN.md words it as the mean rotated once at ``n_local``: identical for decode, ``n = 1``;
  for prefill chunks the reference's form retrieves better, see README "Passkey").

Pipeline per layer and step: ``make_fingerprint`` → selection-cache check (selection_cache.py) →
``make_scoring`` (skipped on the device on a cache hit) → top-k (topk.py).
"""

from __future__ import annotations

from typing import Any, Callable

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from . import scoring_mma
from .common import emits_wgsl, has_warp_shuffle, i64, is_gpu

SCORE_BLOCKS = 256  # token chunks of the scoring pass; partials[H, SCORE_BLOCKS + 1, 2]
_THREADS = 256
FP_GROUPS = 8  # GPU fingerprint: thread rows splitting the queries of a head
_NEG = -1.0e30  # finite "minus infinity" for online-softmax states (exp of differences stays 0)


def thread_allreduce(combine: Callable[[Any, Any], Any], identity: Any) -> Any:
    """A TIR macro ``(value, out, thread)``: ``out[0]`` = reduction of ``value[0]`` (1-element
    local buffers) over the thread axis ``thread`` (warp shuffles, shared memory across warps),
    visible to every thread. Use distinct ``out`` buffers for back-to-back reductions."""

    @T.macro
    def reduce(value, out, thread):
        with T.sblock("allreduce"):
            T.reads(value[0])
            T.writes(out[0])
            T.attr(T.comm_reducer(combine, [identity]), "reduce_scope",
                   T.reinterpret("handle", T.uint64(0)))
            T.tvm_thread_allreduce(T.uint32(1), value[0], True, out[0], thread, dtype="void")

    return reduce


allreduce_sum_f32 = thread_allreduce(lambda a, b: a + b, T.float32(0))
allreduce_max_f32 = thread_allreduce(lambda a, b: T.max(a, b), T.float32(_NEG))
allreduce_sum_i32 = thread_allreduce(lambda a, b: a + b, T.int32(0))


@T.macro
def rotated_term(q, rope, h, i, r, acc, n_local, half):
    """``acc[0] += rope(q[r, h], n_local + r)[i]`` (rotate-half: the partner element, signed;
    ``half`` = head_dim / 2)."""
    acc[0] += (T.Cast("float32", q[r, h, i]) * rope[n_local + r, i % half]
               + T.if_then_else(i < half, T.float32(-1), T.float32(1))
               * T.Cast("float32", q[r, h, T.if_then_else(i < half, i + half, i - half)])
               * rope[n_local + r, half + i % half])


def make_fingerprint(n_heads: int, head_dim: int, n_local: int, dtype: str,
                     target: Target) -> tirx.PrimFunc:
    """Query fingerprint ``qbar[h] = mean_i rope(q[i, h], position n_local + i)``.

    Query ``i`` of the step is rotated as if it sat ``n_local + i`` tokens after a candidate (as
    the reference does, ``QUERY_ROTATE``); a decode step's single query sits at ``n_local``.
    Args (in order): q[n, >= H, d] ``dtype`` (before RoPE; its first H heads are the queries),
    rope[P, d] float32 (P >= n_local + n).
    Output: qbar[H, d] float32.
    """
    gpu = is_gpu(target)
    H, d = i64(n_heads), i64(head_dim)

    @T.prim_func(s_tir=True)
    def fingerprint(q_h: T.handle, rope_h: T.handle, qbar_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        n, P, heads = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (n, heads, d), dtype)  # queries: the first H heads
        rope = T.match_buffer(rope_h, (P, d), "float32")
        qbar = T.match_buffer(qbar_h, (H, d), "float32")
        if gpu:  # per head: FP_GROUPS thread rows split the queries, then their sums are added
            for h in T.thread_binding(H, thread="blockIdx.x"):
                for ty in T.thread_binding(i64(FP_GROUPS), thread="threadIdx.y"):
                    for i in T.thread_binding(d, thread="threadIdx.x"):
                        with T.sblock("mean"):
                            acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            part = T.sblock_alloc_buffer((FP_GROUPS, head_dim), "float32", scope="shared")
                            acc[0] = T.float32(0)
                            for rr in T.serial((n + FP_GROUPS - 1 - ty) // FP_GROUPS):
                                rotated_term(q, rope, h, i, rr * FP_GROUPS + ty, acc, n_local, head_dim // 2)
                            part[ty, i] = acc[0]
                            T.tvm_storage_sync("shared")
                            if ty == 0:
                                acc[0] = T.float32(0)
                                for g in T.serial(FP_GROUPS):
                                    acc[0] += part[g, i]
                                qbar[h, i] = acc[0] / T.Cast("float32", n)
        else:
            for h in T.parallel(H):
                for i in T.serial(d):
                    with T.sblock("mean"):
                        acc = T.sblock_alloc_buffer((1,), "float32")
                        acc[0] = T.float32(0)
                        for r in T.serial(n):
                            rotated_term(q, rope, h, i, r, acc, n_local, head_dim // 2)
                        qbar[h, i] = acc[0] / T.Cast("float32", n)

    return fingerprint


def check_shapes(n_heads: int, n_kv_heads: int, head_dim: int) -> None:
    """Raises ValueError (one line naming the fix) for head shapes the scoring kernel does not
    support: head_dim other than 64 or 128, or query heads not a whole number of GQA groups."""
    if n_heads % n_kv_heads or head_dim not in (64, 128):
        raise ValueError(f"TokenSelect scoring supports head_dim 64 or 128 and whole GQA groups (this model: "
                         f"head_dim {head_dim}, {n_heads} heads, {n_kv_heads} KV heads); use --policy dense or streaming")


def check_score_keys(score_keys: str, n_heads: int, n_kv_heads: int, head_dim: int, target: Target) -> None:
    """Raises ValueError (one line naming the fix) where ``--score-keys`` int8 cannot run: it needs
    the CPU (llvm) or a CUDA GPU of sm_80+ with at most 8 query heads per KV head (int8 tensor
    cores, ``scoring_mma.py``); not Vulkan (no 8-bit storage in WGSL)."""
    if score_keys == "exact" or not is_gpu(target):  # CPUs score codes x scale
        return
    if emits_wgsl(target) or not scoring_mma.fits(n_heads, n_kv_heads, head_dim, "float16", target, 8):
        where = "vulkan" if emits_wgsl(target) else f"{target.attrs.get('arch', target.kind.name)}, " \
            f"{n_heads // n_kv_heads} query heads per KV head"
        raise ValueError(f"--score-keys {score_keys} needs a CPU (llvm) target or a CUDA GPU of sm_80 or newer with at "
                         f"most 8 query heads per KV head (here: {where}); use --score-keys exact")


def make_scoring(num_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, n_init: int,
                 n_local: int, pool_kernel: int, dtype: str, target: Target, key_bits: int = 16,
                 mma_stages: int | None = None, mma_keys: int | None = None) -> tirx.PrimFunc:
    """Per-head scores, soft voting and optional max-pool → criticality of every candidate.

    Args (in order): qbar[H, d] float32, kv[num_layers, 2, n_kv, capacity, d] ``dtype``,
    state[num_layers, 4] int32 (selection cache; nothing is computed when ``state[layer, 0]`` is 1,
    a hit), layer (int64), length[1] int32 (a device tensor: ``L``, the context length after
    this step's KV append). Outputs (fresh), sized for the cache's capacity (``S = capacity -
    n_init - n_local``) so that a decode step's shapes do not change with ``L``: crit[S] float32
    whose first ``C = L - n_init - n_local >= 1`` entries are the candidates, candidates
    ``t`` ↔ positions ``n_init + t``; workspaces scores[H, S] float32 and
    partials[H, SCORE_BLOCKS + 1, 2] float32 (per-chunk softmax max/sum, then the merged max and
    1/sum in slot SCORE_BLOCKS).

    ``crit[t] = maxpool_p(sum_h softmax_t(qbar[h] · k[layer, h // group, n_init + t]))``.
    Three passes: (1) SCORE_BLOCKS chunks of tokens: scores and per-chunk online max/sum per head
    (K is read once); (2) merge the chunk partials per head; (3) tiles of tokens: normalise, sum
    over heads and max-pool from a shared-memory tile with a halo of ``p - 1``.

    ``key_bits`` 8 (``--score-keys int8``): the scores come from the keys' int8 codes
    (``key_codes.py``), ``scores[h, t] = scale[t] · (qbar[h] · code[t])``, and the second and third
    args are codes[num_layers, n_kv, capacity, d] int8 and scales[num_layers, n_kv, capacity]
    float32 instead of kv. CUDA sm_80+ (tensor cores, ``scoring_mma.py``) and CPUs; else
    ValueError (one line). ``mma_stages``, ``mma_keys``: the tensor-core pass's cp.async stages and
    candidates a tile (tuning; defaults: the measured best).
    """
    check_shapes(n_heads, n_kv_heads, head_dim)
    codes = key_bits == 8
    if codes:
        check_score_keys("int8", n_heads, n_kv_heads, head_dim, target)
    gpu = is_gpu(target)
    group = n_heads // n_kv_heads
    NB, H, d = i64(SCORE_BLOCKS), i64(n_heads), i64(head_dim)
    offset = n_init + n_local
    p = max(pool_kernel, 1)
    pad = (p - 1) // 2
    tile = i64(_THREADS)
    width = tile + p - 1  # pooled tile plus its halo
    vec = 16 // (2 if dtype in ("float16", "bfloat16") else 4)  # 16-byte loads of key rows
    vec = min(vec, 4) if emits_wgsl(target) else vec  # WGSL vectors: at most 4 lanes

    def exp(x):  # CUDA: the fast exponential (arguments <= 0 here: within ~1e-5 relative)
        return T.call_pure_extern("float32", "__expf", x) if has_warp_shuffle(target) else T.exp(x)

    @T.macro
    def online_update(m, z, j, s):
        if s > m[j]:
            z[j] = z[j] * exp(m[j] - s) + T.float32(1)
            m[j] = s
        else:
            z[j] = z[j] + exp(s - m[j])

    @T.macro
    def merge_partial(m, z, j, m2, z2):
        m_new: T.let[T.float32] = T.max(m[j], m2)
        z[j] = z[j] * exp(m[j] - m_new) + z2 * exp(m2 - m_new)
        m[j] = m_new

    @T.macro
    def vote(scores, partials, t, C, out):
        # out[0] = sum_h softmax_h(t), or -inf outside [0, C)
        out[0] = T.float32("-inf")
        if 0 <= t and t < C:
            out[0] = T.float32(0)
            for h in range(H):
                out[0] += exp(scores[h, t] - partials[h, NB, 0]) * partials[h, NB, 1]

    @T.macro
    def pool_store(raw, crit, t, w0, C):
        # crit[t] = max(raw[w0 : w0 + p]); -inf where the reference's pooled output ends
        if t < C:
            with T.sblock("pool"):
                best = T.sblock_alloc_buffer((1,), "float32", scope="local")
                best[0] = raw[w0]
                for j in range(1, p):
                    best[0] = T.max(best[0], raw[w0 + j])
                crit[t] = T.if_then_else(t < C + 2 * pad - p + 1, best[0], T.float32("-inf"))

    def n_candidates(length):  # C, loaded where it is used: kernels read it on the device, never the host
        return T.Cast("int64", length[0]) - offset

    use_mma = scoring_mma.fits(n_heads, n_kv_heads, head_dim, dtype, target, key_bits)  # pass 1 on tensor cores
    score_pass_mma = (scoring_mma.make_score_pass(num_layers, n_heads, n_kv_heads, head_dim, n_init, offset, SCORE_BLOCKS,
                                                  exp, merge_partial, _NEG, key_bits, mma_stages, mma_keys)
                      if use_mma else None)

    @T.macro
    def simt_pass(qbar, kv, state, layer, length, scores, partials):
        # pass 1: block (b, g) scores tokens [b*chunk, (b+1)*chunk) of KV head g for the query
        # heads of its group: one token row per thread (its 16-byte loads all issued before the
        # first multiply, so a row is in flight at once; no shuffles per token),
        # then a block reduction of the per-thread online-softmax states
        for b in T.thread_binding(NB, thread="blockIdx.x"):
            for g in T.thread_binding(i64(n_kv_heads), thread="blockIdx.y"):
                for tx in T.thread_binding(tile, thread="threadIdx.x"):
                    with T.sblock("score"):
                        T.reads()
                        T.writes()
                        qs = T.sblock_alloc_buffer((group, d), "float32", scope="shared")
                        kl = T.sblock_alloc_buffer((d,), dtype, scope="local")
                        q4 = T.sblock_alloc_buffer((4,), "float32", scope="local")
                        acc = T.sblock_alloc_buffer((group,), "float32", scope="local")
                        m = T.sblock_alloc_buffer((group,), "float32", scope="local")
                        z = T.sblock_alloc_buffer((group,), "float32", scope="local")
                        val = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        mx = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        total = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        C: T.let[T.int64] = n_candidates(length)
                        chunk: T.let[T.int64] = T.ceildiv(C, NB)
                        if state[layer, 0] == 0:
                            for it in range(T.ceildiv(group * d, tile)):
                                e: T.let[T.int64] = it * tile + tx
                                if e < group * d:
                                    qs[e // d, e % d] = qbar[g * group + e // d, e % d]
                            T.tvm_storage_sync("shared")
                            for j in range(group):
                                m[j] = T.float32(_NEG)
                                z[j] = T.float32(0)
                            for it in range(T.ceildiv(chunk, tile)):
                                # a barrier keeps the compiler from hoisting all of qs into registers
                                T.tvm_storage_sync("shared")
                                t: T.let[T.int64] = b * chunk + it * tile + tx
                                if it * tile + tx < chunk and t < C:
                                    for j in T.unroll(group):
                                        acc[j] = T.float32(0)
                                    for c in T.unroll(d // vec):  # the whole row in flight at once
                                        for v in T.vectorized(vec):
                                            kl[c * vec + v] = kv[layer, 0, g, n_init + t, c * vec + v]
                                    for c in T.unroll(d // 4):  # 16-byte (broadcast) reads of the queries
                                        for j in T.unroll(group):
                                            for v in T.vectorized(4):
                                                q4[v] = qs[j, c * 4 + v]
                                            for v in T.unroll(4):
                                                acc[j] += q4[v] * T.Cast("float32", kl[c * 4 + v])
                                    for j in T.unroll(group):
                                        online_update(m, z, j, acc[j])
                                        scores[g * group + j, t] = acc[j]
                            for j in range(group):
                                val[0] = m[j]
                                allreduce_max_f32(val, mx, tx)
                                val[0] = z[j] * T.exp(m[j] - mx[0])
                                allreduce_sum_f32(val, total, tx)
                                if tx == 0:
                                    partials[g * group + j, b, 0] = mx[0]
                                    partials[g * group + j, b, 1] = total[0]

    @T.macro
    def cpu_pass(qbar, keys, scales, state, layer, length, scores, partials):
        for b in T.parallel(NB):
            with T.sblock("score"):
                T.reads()
                T.writes()
                qv = T.sblock_alloc_buffer((vec,), "float32", scope="local")
                m = T.sblock_alloc_buffer((1,), "float32", scope="local")
                z = T.sblock_alloc_buffer((1,), "float32", scope="local")
                C: T.let[T.int64] = n_candidates(length)
                chunk: T.let[T.int64] = T.ceildiv(C, NB)
                if state[layer, 0] == 0:
                    for h in range(H):
                        m[0] = T.float32(_NEG)
                        z[0] = T.float32(0)
                        for t in range(b * chunk, T.min((b + 1) * chunk, C)):
                            for v in T.vectorized(vec):
                                qv[v] = T.float32(0)
                            for c in range(d // vec):
                                for v in T.vectorized(vec):
                                    if codes:
                                        qv[v] += qbar[h, c * vec + v] * T.Cast(
                                            "float32", keys[layer, h // group, n_init + t, c * vec + v])
                                    else:
                                        qv[v] += qbar[h, c * vec + v] * T.Cast(
                                            "float32", keys[layer, 0, h // group, n_init + t, c * vec + v])
                            scores[h, t] = T.float32(0)
                            for v in range(vec):
                                scores[h, t] += qv[v]
                            if codes:
                                scores[h, t] = scores[h, t] * scales[layer, h // group, n_init + t]
                            online_update(m, z, 0, scores[h, t])
                        partials[h, b, 0] = m[0]
                        partials[h, b, 1] = z[0]

    @T.macro
    def merge_and_vote(state, layer, length, crit, scores, partials, cap):
        if gpu:
            # pass 2: one block per head merges the chunk partials
            for h in T.thread_binding(H, thread="blockIdx.x"):
                for tx in T.thread_binding(NB, thread="threadIdx.x"):
                    with T.sblock("merge"):
                        val = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        mx = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        total = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        if state[layer, 0] == 0:
                            val[0] = partials[h, tx, 0]
                            allreduce_max_f32(val, mx, tx)
                            val[0] = partials[h, tx, 1] * T.exp(partials[h, tx, 0] - mx[0])
                            allreduce_sum_f32(val, total, tx)
                            if tx == 0:
                                partials[h, NB, 0] = mx[0]
                                partials[h, NB, 1] = T.float32(1) / total[0]
            # pass 3: one block per tile of tokens; the tile and its halo are voted into smem
            for b in T.thread_binding(T.ceildiv(cap - offset, tile), thread="blockIdx.x"):
                for tx in T.thread_binding(tile, thread="threadIdx.x"):
                    with T.sblock("vote"):
                        T.reads()
                        T.writes()
                        raw = T.sblock_alloc_buffer((width,), "float32", scope="shared")
                        acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        C: T.let[T.int64] = n_candidates(length)
                        if state[layer, 0] == 0 and b * tile < C:
                            for it in range(T.ceildiv(width, tile)):
                                w: T.let[T.int64] = it * tile + tx
                                if w < width:
                                    vote(scores, partials, b * tile + w - pad, C, acc)
                                    raw[w] = acc[0]
                            T.tvm_storage_sync("shared")
                            pool_store(raw, crit, b * tile + tx, tx, C)
        else:
            for h in T.serial(H):
                with T.sblock("merge"):
                    m = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    z = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    if state[layer, 0] == 0:
                        m[0] = T.float32(_NEG)
                        z[0] = T.float32(0)
                        for b in range(NB):
                            merge_partial(m, z, 0, partials[h, b, 0], partials[h, b, 1])
                        partials[h, NB, 0] = m[0]
                        partials[h, NB, 1] = T.float32(1) / z[0]
            for b in T.parallel(T.ceildiv(n_candidates(length), tile)):
                with T.sblock("vote"):
                    T.reads()
                    T.writes()
                    raw = T.sblock_alloc_buffer((width,), "float32")
                    acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    C: T.let[T.int64] = n_candidates(length)
                    if state[layer, 0] == 0:
                        for w in range(width):
                            vote(scores, partials, b * tile + w - pad, C, acc)
                            raw[w] = acc[0]
                        for i in range(tile):
                            pool_store(raw, crit, b * tile + i, i, C)

    if codes:
        @T.prim_func(s_tir=True)
        def scoring_codes(qbar_h: T.handle, codes_h: T.handle, scales_h: T.handle, state_h: T.handle, layer: T.int64,
                          length_h: T.handle, crit_h: T.handle, scores_h: T.handle, partials_h: T.handle):
            T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
            cap = T.int64()
            qbar = T.match_buffer(qbar_h, (H, d), "float32")
            key_codes = T.match_buffer(codes_h, (i64(num_layers), i64(n_kv_heads), cap, d), "int8")
            scales = T.match_buffer(scales_h, (i64(num_layers), i64(n_kv_heads), cap), "float32")
            state = T.match_buffer(state_h, (i64(num_layers), 4), "int32")
            crit = T.match_buffer(crit_h, (cap - offset,), "float32")
            scores = T.match_buffer(scores_h, (H, cap - offset), "float32")
            partials = T.match_buffer(partials_h, (H, NB + 1, 2), "float32")
            length = T.match_buffer(length_h, (T.int64(1),), "int32")
            if gpu:
                score_pass_mma(qbar, key_codes, scales, state, layer, length, scores, partials, cap)
            else:
                cpu_pass(qbar, key_codes, scales, state, layer, length, scores, partials)
            merge_and_vote(state, layer, length, crit, scores, partials, cap)

        return scoring_codes

    @T.prim_func(s_tir=True)
    def scoring(qbar_h: T.handle, kv_h: T.handle, state_h: T.handle, layer: T.int64, length_h: T.handle,
                crit_h: T.handle, scores_h: T.handle, partials_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        cap = T.int64()
        qbar = T.match_buffer(qbar_h, (H, d), "float32")
        kv = T.match_buffer(kv_h, (i64(num_layers), 2, i64(n_kv_heads), cap, d), dtype)
        state = T.match_buffer(state_h, (i64(num_layers), 4), "int32")
        crit = T.match_buffer(crit_h, (cap - offset,), "float32")
        scores = T.match_buffer(scores_h, (H, cap - offset), "float32")
        partials = T.match_buffer(partials_h, (H, NB + 1, 2), "float32")
        length = T.match_buffer(length_h, (T.int64(1),), "int32")
        if not gpu:
            cpu_pass(qbar, kv, None, state, layer, length, scores, partials)
        elif use_mma:  # static: tensor cores (scoring_mma.py)
            score_pass_mma(qbar, kv, None, state, layer, length, scores, partials, cap)
        else:
            simt_pass(qbar, kv, state, layer, length, scores, partials)
        merge_and_vote(state, layer, length, crit, scores, partials, cap)

    return scoring
