"""Dense attention policy: every step attends to the whole cache at true positions."""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.target import Target

from tsedge.tir_kernels import attention, cache_ops
from tsedge.tir_kernels.common import i64

from ..config import ModelConfig


class DensePolicy:
    """Builds one layer's attention from the KV-append and attention kernels.

    The model calls ``begin_step`` once per forward and ``attend`` once per layer; other policies
    implement the same two methods.
    """

    def __init__(self, cfg: ModelConfig, dtype: str, target: Target) -> None:
        self.cfg = cfg
        self.dtype = dtype
        self.target = target
        n_layers, h, hkv, d = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.kv_append = cache_ops.make_kv_append(n_layers, hkv, d, dtype, target)
        self.iota = cache_ops.make_iota(target)
        self.partial = attention.make_attention_partial(n_layers, h, hkv, d, dtype, target)
        self.merge = attention.make_attention_merge(h, d, dtype, target)

    def begin_step(self, past, n):
        """Per-forward state shared by all layers: the attended rows ``0 .. past + n - 1``."""
        total = past + n
        return op.tensor_ir_op(self.iota, "iota", args=[total],
                               out=nn.Tensor.placeholder([total], "int32"))

    def append(self, layer_id: int, k: nn.Tensor, v: nn.Tensor, kv: nn.Tensor, past) -> nn.Tensor:
        return op.tensor_ir_inplace_op(self.kv_append, "kv_append", args=[kv, k, v, i64(layer_id), past],
                                       inplace_indices=[0], out=nn.Tensor.placeholder(kv.shape, kv.dtype))

    def attend_rows(self, layer_id: int, q: nn.Tensor, kv: nn.Tensor, rope: nn.Tensor, rows: nn.Tensor):
        """Attention of ``q`` over ``kv[layer_id]`` rows ``rows`` (positions re-assigned 0..M-1)."""
        n, h, d = q.shape
        m = rows.shape[0]
        chunks = attention.num_chunks(m)
        o, lse = op.tensor_ir_op(
            self.partial, "attention_partial", args=[q, kv, rope, rows, i64(layer_id)],
            out=[nn.Tensor.placeholder([n, chunks, h, d], "float32"),
                 nn.Tensor.placeholder([n, chunks, h], "float32")])
        return op.tensor_ir_op(self.merge, "attention_merge", args=[o, lse],
                               out=nn.Tensor.placeholder([n, h, d], self.dtype))

    def attend(self, layer_id: int, q, k, v, kv, rope, past, step):
        kv = self.append(layer_id, k, v, kv, past)
        return self.attend_rows(layer_id, q, kv, rope, step), kv
