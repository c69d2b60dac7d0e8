"""TidalDecode (Yang et al., arXiv 2410.05076; DerrickYLJ/TidalDecode): position-persistent
sparse attention at decode.

Prefill is dense. Beyond the budget (``decode_select``, one token), layers before the selection
layer attend densely; the selection layer (and each re-selection layer) attends densely AND keeps,
per query head (or per KV head: the max of its group's logits), the ``tidal_budget - 1`` tokens
of largest logit ``q.k / sqrt(d)`` (RoPE at true positions) plus the current token; the layers
after it attend only to that set, keys at their true positions. The set lives only inside the
step (no state across steps). Within the budget every function runs dense code.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.target import Target

from tsedge.tir_kernels.common import i64
from tsedge.tir_kernels.topk import WORKSPACE_SIZE, make_topk

from ..config import ModelConfig, PolicyConfig
from .dense import DensePolicy


def check_tidaldecode(policy: PolicyConfig, cfg: ModelConfig) -> None:
    """Raises ValueError (one line) where ``policy``'s layers are not ``cfg``'s."""
    policy.check_layers(cfg.num_layers)


class TidalDecodePolicy(DensePolicy):
    """Dense until the budget; beyond it the selection layers choose per-head token sets (in
    ``step.selected``: int32 [sets, tidal_budget], sorted, the last entry the current token) that
    the sparse layers attend to at their true positions."""

    selects = True

    def __init__(self, cfg: ModelConfig, dtype: str, target: Target, policy: PolicyConfig,
                 kv_dtype: str | None = None) -> None:
        check_tidaldecode(policy, cfg)
        super().__init__(cfg, dtype, target, kv_dtype)
        self.policy = policy
        nl, h, hkv, d = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sets = hkv if policy.tidal_per_kv_head else h
        self.selecting = {policy.tidal_select_layer, *policy.tidal_reselect_layers}
        make, self.chunks = self.decode_kernels()
        self.scored = make(nl, h, hkv, d, dtype, target, logit_sets=self.sets)
        self.sparse = make(nl, h, hkv, d, dtype, target, row_sets=self.sets)
        self.topk = make_topk(nl, policy.tidal_budget, 0, target, heads=self.sets)

    def begin_step(self, step) -> None:
        """Beyond the budget, the dense rows, which the selection layers' logits kernel reads."""
        if step.select:
            step.rows = self.dense_rows(step)
        else:
            super().begin_step(step)

    def attend(self, layer_id: int, qkv: nn.Tensor, step) -> nn.Tensor:
        sparse_step = step.select and isinstance(step.n, int) and step.n == 1  # prefill: dense
        if not sparse_step or layer_id < self.policy.tidal_select_layer:
            return super().attend(layer_id, qkv, step)
        self.append(layer_id, qkv, step)
        if layer_id in self.selecting:
            out, (logits,) = self._attention(self.scored, "attention_scored", layer_id, qkv, step, step.rows)
            step.selected, _ = op.tensor_ir_op(
                self.topk, "topk_heads", args=[logits],
                out=[nn.Tensor.placeholder([self.sets, self.policy.tidal_budget], "int32"),
                     nn.Tensor.placeholder([self.sets, WORKSPACE_SIZE], "int32")])
            return out
        return self._attention(self.sparse, "attention_sparse", layer_id, qkv, step, step.selected)[0]

    def _attention(self, kernel, name: str, layer_id: int, q: nn.Tensor, step, rows: nn.Tensor):
        """One query's attention by ``kernel`` (an ``attention_partial`` variant) over ``rows``,
        merged -> (out [1, H, d], the kernel's extra outputs: the logits [sets, M] f32 if any)."""
        h, d = self.cfg.num_heads, self.cfg.head_dim
        m = rows.shape[-1]
        chunks = self.chunks(m)
        outs = [nn.Tensor.placeholder([1, chunks, h, d], "float32"),
                nn.Tensor.placeholder([1, chunks, h], "float32")]
        if kernel is self.scored:
            outs.append(nn.Tensor.placeholder([self.sets, m], "float32"))
        o, lse, *extra = op.tensor_ir_op(kernel, name, args=[q, step.kv, step.rope, rows, i64(layer_id)],
                                         out=outs)
        out = op.tensor_ir_op(self.merge, "attention_merge", args=[o, lse],
                              out=nn.Tensor.placeholder([1, h, d], self.dtype))
        return out, extra
