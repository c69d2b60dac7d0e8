"""Selecting policies: TokenSelect (DESIGN.md, "TokenSelect, as the kernels must compute it") and
StreamingLLM (attention sinks plus a local window).

Both attend exactly like dense while the context fits the budget (the runtime calls
``prefill``/``decode``) and to ``M = n_init + top_k + n_local`` gathered rows at re-assigned
positions beyond it (``prefill_select``/``decode_select``, ``step.select``).
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.target import Target

from tsedge.tir_kernels.common import i64
from tsedge.tir_kernels.key_codes import make_key_codes
from tsedge.tir_kernels.selection_cache import make_selection_check
from tsedge.tir_kernels.tokenselect_scoring import SCORE_BLOCKS, make_fingerprint, make_scoring
from tsedge.tir_kernels.topk import WORKSPACE_SIZE, make_topk
from tsedge.tir_kernels.window_rows import make_window_rows

from ..config import CAPACITY, ModelConfig, PolicyConfig
from ..collectives import allgather, allreduce
from .dense import DensePolicy


_CODES = slice(4, 6)  # key_codes and key_scales in TokenSelect's state (after the four selection tensors)


def _like(t: nn.Tensor) -> nn.Tensor:
    """The output placeholder of an in-place update of ``t``."""
    return nn.Tensor.placeholder(t.shape, t.dtype)


class TokenSelectPolicy(DensePolicy):
    """Per layer and step beyond the budget: fingerprint → selection-cache check → scoring and
    soft voting → top-k (the last two skipped on the device on a hit) → rows → attention.

    State (runtime-owned, zero-initialised): ``cache_qbar[NL, H, d]`` f32 (fingerprint of the last
    re-selection), ``cache_idx[NL, top_k]`` i32 (its sorted positions), ``sel_state[NL, 4]`` i32
    (``[hit_this_step, valid, hits, lookups]``), ``topk_workspace[WORKSPACE_SIZE]`` i32 (the
    top-k's histograms, shared by the layers, left zeroed by each selection). Prefill chunks always re-select (forced miss, not
    counted); decode steps look the cache up.

    ``policy.score_keys == "int8"``: the scoring reads int8 codes of the cached keys
    (``tir_kernels/key_codes.py``), written after each KV append into two more state tensors sized
    by the cache's capacity, ``key_codes[NL, Hkv, capacity, d]`` i8 and ``key_scales[NL, Hkv,
    capacity]`` f32 (per-token data: a truncation keeps them, as it keeps the KV rows).

    ``shards > 1`` (tensor parallelism, ``cfg`` a shard's): each shard scores its own heads; the
    soft vote is all-reduced before the top-k and the Selection Cache compares the all-gathered
    fingerprint of all heads (``cache_qbar`` holds all), so every shard selects the same rows.
    """

    selects = True

    def __init__(self, cfg: ModelConfig, dtype: str, target: Target, policy: PolicyConfig, shards: int = 1,
                 kv_dtype: str | None = None) -> None:
        super().__init__(cfg, dtype, target, kv_dtype)
        self.policy = policy
        self.shards = shards
        nl, h, hkv, d = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        p = policy
        self.fingerprint = make_fingerprint(h, d, p.n_local, dtype, target)
        self.check = make_selection_check(nl, h * shards, d, p.selection_threshold, target)
        # a decode step's fingerprint and check in one launch
        self.fingerprint_check = make_selection_check(nl, h, d, p.selection_threshold, target,
                                                      fingerprint=(p.n_local, dtype))
        key_bits = 8 if p.score_keys == "int8" else 16
        self.scoring = make_scoring(nl, h, hkv, d, p.n_init, p.n_local, p.pool_kernel, self.kv_dtype, target, key_bits)
        self.key_codes = make_key_codes(nl, hkv, d, self.kv_dtype, target) if key_bits == 8 else None
        self.topk = make_topk(nl, p.top_k, p.n_init, target, n_local=p.n_local)  # also the row list

    def state_specs(self) -> list[tuple[str, list[int], str]]:
        cfg, nl = self.cfg, self.cfg.num_layers
        return [("cache_qbar", [nl, cfg.num_heads * self.shards, cfg.head_dim], "float32"),
                ("cache_idx", [nl, self.policy.top_k], "int32"),
                ("sel_state", [nl, 4], "int32"),
                ("topk_workspace", [WORKSPACE_SIZE], "int32")] + ([
                ("key_codes", [nl, cfg.num_kv_heads, CAPACITY, cfg.head_dim], "int8"),
                ("key_scales", [nl, cfg.num_kv_heads, CAPACITY], "float32")] if self.key_codes is not None else [])

    def append(self, layer_id: int, qkv: nn.Tensor, step) -> None:
        """The KV append, then (``--score-keys int8``) the int8 codes of the step's keys."""
        super().append(layer_id, qkv, step)
        if self.key_codes is not None:
            step.state = self.code_keys(step.kv, step.state, layer_id, step.length, step.n)

    def code_keys(self, kv: nn.Tensor, state: list, layer_id: int, length: nn.Tensor, n) -> list:
        """``state`` (``state_specs`` order) with rows ``[length - n, length)`` of layer
        ``layer_id`` coded into its ``key_codes`` and ``key_scales`` (``n``: an int or an int64
        shape variable)."""
        codes = state[_CODES]
        coded = op.tensor_ir_inplace_op(
            self.key_codes, "key_codes", args=[kv, *codes, i64(layer_id), length, i64(n) if isinstance(n, int) else n],
            inplace_indices=[1, 2], out=[_like(t) for t in codes])
        return [*state[:_CODES.start], *coded, *state[_CODES.stop:]]

    def begin_step(self, step) -> None:
        """Dense rows when the context fits; beyond the budget rows are chosen per layer."""
        if not step.select:
            super().begin_step(step)

    def attend(self, layer_id: int, qkv: nn.Tensor, step) -> nn.Tensor:
        if not step.select:
            return super().attend(layer_id, qkv, step)
        self.append(layer_id, qkv, step)
        return self.attend_rows(layer_id, qkv, step.kv, step.rope, self.select(layer_id, qkv, step))

    def select(self, layer_id: int, q: nn.Tensor, step) -> nn.Tensor:
        """Update the layer's selection (in ``step.state``) and return its attended rows."""
        cache_qbar, cache_idx, sel_state, workspace, *codes = step.state
        layer = i64(layer_id)
        h, d = self.cfg.num_heads, self.cfg.head_dim
        qbar_spec = nn.Tensor.placeholder([h, d], "float32")
        if step.one_query and self.shards == 1:  # decode: fingerprint and cache lookup in one kernel
            cache_qbar, sel_state, qbar = op.tensor_ir_inplace_op(
                self.fingerprint_check, "fingerprint_check", args=[q, step.rope, cache_qbar, sel_state, layer, i64(0)],
                inplace_indices=[2, 3, -1], out=[_like(cache_qbar), _like(sel_state), qbar_spec])
        else:  # a prefill chunk (many queries: always re-selects), or a sharded step's decode
            qbar = op.tensor_ir_op(self.fingerprint, "fingerprint", args=[q, step.rope], out=qbar_spec)
            every_head = allgather(qbar, self.shards) if self.shards > 1 else qbar
            cache_qbar, sel_state = op.tensor_ir_inplace_op(
                self.check, "selection_check", args=[every_head, cache_qbar, sel_state, layer, i64(int(not step.one_query))],
                inplace_indices=[1, 2], out=[_like(cache_qbar), _like(sel_state)])
        candidates = step.kv.shape[3] - self.policy.n_init - self.policy.n_local  # sized for the capacity
        crit, _, _ = op.tensor_ir_op(
            self.scoring, "tokenselect_scoring", args=[qbar, *(codes or [step.kv]), sel_state, layer, step.length],
            out=[nn.Tensor.placeholder([candidates], "float32"),
                 nn.Tensor.placeholder([h, candidates], "float32"),
                 nn.Tensor.placeholder([h, SCORE_BLOCKS + 1, 2], "float32")])
        if self.shards > 1:  # the vote over every shard's heads
            crit = allreduce(crit)
        cache_idx, workspace, rows = op.tensor_ir_inplace_op(
            self.topk, "topk", args=[crit, sel_state, cache_idx, workspace, layer, step.length],
            inplace_indices=[2, 3, -1],
            out=[_like(cache_idx), _like(workspace), nn.Tensor.placeholder([self.policy.budget], "int32")])
        step.state = [cache_qbar, cache_idx, sel_state, workspace, *codes]
        return rows


class StreamingPolicy(DensePolicy):
    """StreamingLLM: beyond the budget every layer attends to the ``n_init`` first tokens and the
    ``n_local`` last ones (``top_k`` is not used); no state."""

    selects = True

    def __init__(self, cfg: ModelConfig, dtype: str, target: Target, policy: PolicyConfig,
                 kv_dtype: str | None = None) -> None:
        super().__init__(cfg, dtype, target, kv_dtype)
        self.size = policy.n_init + policy.n_local
        self.window_rows = make_window_rows(policy.n_init, policy.n_local, target)

    def begin_step(self, step) -> None:
        """The rows shared by all layers: dense within the budget, sinks + window beyond it."""
        if not step.select:
            super().begin_step(step)
            return
        step.rows = op.tensor_ir_op(self.window_rows, "window_rows", args=[step.length],
                                    out=nn.Tensor.placeholder([self.size], "int32"))
