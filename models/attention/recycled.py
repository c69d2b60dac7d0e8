"""Recycled Attention / RefreshKV (Xu, Goyal and Choi, arXiv 2411.05787): decode steps alternate
between full attention and attention over a per-layer, per-KV-head partial cache of K rows.

- Prefill is dense. Each prefill chunk beyond the budget (``prefill_select``) also scores its
  last token over the whole cache and rebuilds every layer's partial cache from those scores:
  per KV head the K rows of largest softmax probability (max over the group's query heads),
  max-pooled over positions with kernel 7 (``tir_kernels/recycle.py``). The last chunk's rebuild
  is what the first decode step uses: the last prompt token's attention, as the paper.
- A decode step beyond the budget (``decode_select``) is, per layer, a partial step: the row of
  lowest score leaves the partial cache, the step's token joins it (above every selected row), and
  the layer attends to those K rows at their true positions; or a full step: dense attention, and
  the partial cache rebuilt from its scores. Every ``recycle_stride``-th step after a layer's
  last full step compares the mean query over heads with that full step's by cosine
  (``selection_cache.make_selection_check`` with a stride, TokenSelect's Selection Cache check);
  below ``recycle_threshold`` the step is full. ``recycle_fixed_stride``: every
  ``recycle_stride``-th step is full, no comparison. A layer never refreshed (the prompt fit the
  budget) runs a full step first.
- The decision stays on the device: both attention passes and the rebuild are launched every
  step and ``tir_kernels.recycle.gated`` makes the unchosen ones return at once.
- K (``recycle_k``): a token count, or a fraction of the prompt (the paper's 1/8, the default).
  The partial caches have K_max slots (``PolicyConfig.recycle_capacity(max_context)``: the count,
  or ``ceil(fraction * max_context)``); the active K lives on the device in the state
  ``recycle_k[1]``: every prefill chunk beyond the budget sets it from the context it ends at
  (``PolicyConfig.recycle_active_k``; a count: K_max), a decode step only where it is unset (0:
  the state was zeroed and no prefill ran beyond the budget), and every partial-cache kernel
  reads it (``counted``), so the decode step takes no host value for it.
- Within the budget (``prefill``/``decode``) every function runs dense code; a fraction's budget
  is 0 (every context has its partial cache).
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.target import Target

from tsedge.tir_kernels import cache_ops
from tsedge.tir_kernels.common import i64
from tsedge.tir_kernels.recycle import (POOL_KERNEL, SCORE_CHUNKS, gated, make_query_mean, make_recycle_append,
                                        make_recycle_k, make_recycle_scores, make_recycle_store)
from tsedge.tir_kernels.selection_cache import STRIDE_STATE, make_selection_check
from tsedge.tir_kernels.topk import WORKSPACE_SIZE, make_topk

from ..config import ModelConfig, PolicyConfig
from ..collectives import allreduce
from .dense import DensePolicy

FULL, PARTIAL = 0, 1  # sel_state[layer, 0] after the refresh check


def _like(t: nn.Tensor) -> nn.Tensor:
    return nn.Tensor.placeholder(t.shape, t.dtype)


class RecycledPolicy(DensePolicy):
    """State (runtime-owned, zero-initialised): ``cache_qbar[NL, 1, d]`` f32 (the mean query of
    each layer's last full step), ``cache_idx[NL, Hkv, K_max]`` i32 and ``cache_score[NL, Hkv,
    K_max]`` f32 (the partial caches: their first K slots, the active K), ``sel_state[NL, 5]`` i32
    (``[partial_this_step, valid, partial_steps, decode_checks, steps_since_full]``:
    ``Engine.selection_stats`` reports partial steps as hits), ``recycle_k[1]`` i32 (the active K;
    0: unset). ``max_context``: the library's KV cache, which sizes K_max for a fraction (raises
    ValueError as ``PolicyConfig.recycle_capacity``). ``shards > 1`` (tensor parallelism, ``cfg``
    a shard's): the mean query is all-reduced, so the refresh decision covers every head and is
    the same on every shard; the partial caches are per KV head, each shard's own."""

    selects = True

    def __init__(self, cfg: ModelConfig, dtype: str, target: Target, policy: PolicyConfig, max_context: int,
                 shards: int = 1, kv_dtype: str | None = None) -> None:
        super().__init__(cfg, dtype, target, kv_dtype)
        self.policy = policy
        self.shards = shards
        self.k_max = k = policy.recycle_capacity(max_context)
        nl, h, hkv, d = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        fraction = policy.recycle_fraction
        self.set_k = make_recycle_k(None if fraction is None else (fraction.numerator, fraction.denominator), k,
                                    target, policy.recycle_min_k if fraction is not None else 1)
        threshold = None if policy.recycle_fixed_stride else policy.recycle_threshold
        self.check = make_selection_check(nl, 1, d, threshold, target, stride=policy.recycle_stride)
        self.query_mean = make_query_mean(h, d, dtype, target)
        self.last_query = cache_ops.make_last_row((h + 2 * hkv) * d, dtype, target).with_attr(
            "global_symbol", "last_query")
        make, self.chunks = self.decode_kernels()

        def on(when: int, func, inputs: int | None = None):
            return gated(func, nl, STRIDE_STATE, when, inputs)

        self.scored = on(FULL, make(nl, h, hkv, d, dtype, target, logit_sets=h))
        self.sparse = on(PARTIAL, make(nl, h, hkv, d, dtype, target, row_sets=hkv, counted=True))
        self.merge_full = on(FULL, self.merge, inputs=2)
        self.merge_partial = on(PARTIAL, self.merge, inputs=2)
        self.scores = on(FULL, make_recycle_scores(h, hkv, POOL_KERNEL, target), inputs=1)
        self.topk = on(FULL, make_topk(nl, k + 1, 0, target, heads=hkv, counted=True), inputs=2)
        self.store = on(FULL, make_recycle_store(nl, hkv, k, target))
        self.append_row = on(PARTIAL, make_recycle_append(nl, hkv, k, target))

    def state_specs(self) -> list[tuple[str, list[int], str]]:
        cfg, nl, k = self.cfg, self.cfg.num_layers, self.k_max
        return [("cache_qbar", [nl, 1, cfg.head_dim], "float32"),
                ("cache_idx", [nl, cfg.num_kv_heads, k], "int32"),
                ("cache_score", [nl, cfg.num_kv_heads, k], "float32"),
                ("sel_state", [nl, STRIDE_STATE], "int32"),
                ("recycle_k", [1], "int32")]

    def begin_step(self, step) -> None:
        """Dense rows (beyond the budget the full passes read them too); beyond the budget, the
        active K: set by a prefill chunk, by a decode step only where unset."""
        super().begin_step(step)
        if not step.select:
            return
        if step.rows is None:
            step.rows = self.dense_rows(step)
        *rest, active_k = step.state
        active_k = op.tensor_ir_inplace_op(self.set_k, "recycle_k",
                                           args=[step.length, active_k, i64(int(not step.one_query))],
                                           inplace_indices=[1], out=_like(active_k))
        step.state = [*rest, active_k]

    def attend(self, layer_id: int, qkv: nn.Tensor, step) -> nn.Tensor:
        if not step.select:
            return super().attend(layer_id, qkv, step)
        if not step.one_query:  # a prefill chunk: dense, then rebuild
            out = super().attend(layer_id, qkv, step)
            n, width = qkv.shape[0], qkv.shape[1] * qkv.shape[2]
            last = op.tensor_ir_op(self.last_query, "last_query", args=[op.reshape(qkv, [n, width])],
                                   out=nn.Tensor.placeholder([1, width], qkv.dtype))
            last = op.reshape(last, [1, qkv.shape[1], qkv.shape[2]])
            self._check(layer_id, last, step, force_full=True)
            _, _, logits = self._full(layer_id, last, step)
            self._rebuild(layer_id, logits, step)
            return out
        self.append(layer_id, qkv, step)
        self._check(layer_id, qkv, step, force_full=False)
        cache_qbar, cache_idx, cache_score, sel_state, active_k = step.state
        layer = i64(layer_id)
        cache_idx, cache_score, rows = op.tensor_ir_inplace_op(
            self.append_row, "recycle_append",
            args=[cache_idx, cache_score, active_k, layer, sel_state, step.past + step.n], inplace_indices=[0, 1, -1],
            out=[_like(cache_idx), _like(cache_score),
                 nn.Tensor.placeholder([self.cfg.num_kv_heads, self.k_max], "int32")])
        step.state = [cache_qbar, cache_idx, cache_score, sel_state, active_k]
        o_full, lse_full, logits = self._full(layer_id, qkv, step)
        o_part, lse_part = self._attention(self.sparse, "attention_recycled", layer_id, qkv, step, rows, active_k)
        self._rebuild(layer_id, logits, step)
        out = op.tensor_ir_op(self.merge_partial, "merge_recycled", args=[o_part, lse_part, sel_state, layer],
                              out=nn.Tensor.placeholder([1, self.cfg.num_heads, self.cfg.head_dim], self.dtype))
        return op.tensor_ir_inplace_op(self.merge_full, "merge_full", args=[o_full, lse_full, sel_state, layer, out],
                                       inplace_indices=[4], out=_like(out))

    def _check(self, layer_id: int, q: nn.Tensor, step, force_full: bool) -> None:
        """The refresh check of ``q``'s last query (a forced full step, uncounted, for prefill)."""
        cache_qbar, cache_idx, cache_score, sel_state, active_k = step.state
        qmean = op.tensor_ir_op(self.query_mean, "query_mean", args=[q],
                                out=nn.Tensor.placeholder([1, self.cfg.head_dim], "float32"))
        if self.shards > 1:  # the mean over every shard's (equally many) heads
            qmean = allreduce(qmean) * (1.0 / self.shards)
        cache_qbar, sel_state = op.tensor_ir_inplace_op(
            self.check, "refresh_check", args=[qmean, cache_qbar, sel_state, i64(layer_id), i64(int(force_full))],
            inplace_indices=[1, 2], out=[_like(cache_qbar), _like(sel_state)])
        step.state = [cache_qbar, cache_idx, cache_score, sel_state, active_k]

    def _attention(self, kernel, name: str, layer_id: int, q: nn.Tensor, step, rows: nn.Tensor,
                   count: nn.Tensor | None = None, logits: bool = False):
        """One query's gated attention partials over ``rows`` (the first ``count[0]`` of each
        set's, a ``counted`` kernel) (+ its logits [H, M] f32)."""
        h, d = self.cfg.num_heads, self.cfg.head_dim
        m = rows.shape[-1]
        outs = [nn.Tensor.placeholder([1, self.chunks(m), h, d], "float32"),
                nn.Tensor.placeholder([1, self.chunks(m), h], "float32")]
        if logits:
            outs.append(nn.Tensor.placeholder([h, m], "float32"))
        counts = [] if count is None else [count]
        return op.tensor_ir_op(kernel, name, args=[q, step.kv, step.rope, rows, *counts, i64(layer_id), step.state[3]],
                               out=outs)

    def _full(self, layer_id: int, q: nn.Tensor, step):
        """The full pass (on a full step): partials and the last query's logits over every row."""
        return self._attention(self.scored, "attention_recycled_full", layer_id, q, step, step.rows, logits=True)

    def _rebuild(self, layer_id: int, logits: nn.Tensor, step) -> None:
        """On a full step: scores, top-K per KV head (K the active one), stored into the layer's
        partial cache."""
        cache_qbar, cache_idx, cache_score, sel_state, active_k = step.state
        layer, hkv, k = i64(layer_id), self.cfg.num_kv_heads, self.k_max
        crit, _ = op.tensor_ir_op(self.scores, "recycle_scores", args=[logits, sel_state, layer],
                                  out=[nn.Tensor.placeholder([hkv, logits.shape[1] + 1], "float32"),
                                       nn.Tensor.placeholder([self.cfg.num_heads, SCORE_CHUNKS + 1, 2], "float32")])
        idx, _ = op.tensor_ir_op(self.topk, "recycle_topk", args=[crit, active_k, sel_state, layer],
                                 out=[nn.Tensor.placeholder([hkv, k + 1], "int32"),
                                      nn.Tensor.placeholder([hkv, WORKSPACE_SIZE], "int32")])
        cache_idx, cache_score = op.tensor_ir_inplace_op(
            self.store, "recycle_store", args=[idx, crit, cache_idx, cache_score, active_k, layer, sel_state],
            inplace_indices=[2, 3], out=[_like(cache_idx), _like(cache_score)])
        step.state = [cache_qbar, cache_idx, cache_score, sel_state, active_k]
