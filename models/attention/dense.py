"""Dense attention policy: every step attends to the whole cache at true positions."""

from __future__ import annotations

import functools

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.target import Target

from tsedge.tir_kernels import attention, cache_ops, chunk_attention, decode_attention, decode_attention_mma
from tsedge.tir_kernels.common import has_warp_shuffle, i64, is_gpu

from ..config import ModelConfig


class DensePolicy:
    """Builds one layer's attention from the KV-append and attention kernels. ``kv_dtype``: the
    KV cache's element type (default ``dtype``; a float16 cache beside float32 compute on CPUs).

    The model calls ``begin_step`` once per forward and ``attend`` once per layer; other policies
    implement the same two methods.
    """

    def __init__(self, cfg: ModelConfig, dtype: str, target: Target, kv_dtype: str | None = None) -> None:
        self.cfg = cfg
        self.dtype = dtype
        self.kv_dtype = kv_dtype = kv_dtype or dtype  # the KV cache's (CPUs: float16 beside float32)
        self.target = target
        n_layers, h, hkv, d = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.kv_append = cache_ops.make_kv_append(n_layers, hkv, d, dtype, target, kv_dtype)
        self.iota = cache_ops.make_iota(target)
        self.partial = attention.make_attention_partial(n_layers, h, hkv, d, dtype, target, kv_dtype=kv_dtype)
        self.merge = attention.make_attention_merge(h, d, dtype, target)
        gpu = has_warp_shuffle(target)  # CUDA; Vulkan (WGSL) decodes with attention_partial
        if decode_attention_mma.supported(h, hkv, d, dtype, target):  # tensor cores: sm_80+, float16
            make_decode, self.decode_splits = decode_attention_mma.make_decode_attention_mma, decode_attention_mma.mma_splits
            self.max_splits = decode_attention_mma.MAX_SPLITS
        else:
            make_decode, self.decode_splits = decode_attention.make_decode_attention, decode_attention.decode_splits
            self.max_splits = decode_attention.MAX_SPLITS
        self.decode = make_decode(n_layers, h, hkv, d, dtype, target) if gpu else None
        # GPU decode over rows 0 .. length - 1 read from the device (static grid: one CUDA graph)
        self.decode_dense = make_decode(n_layers, h, hkv, d, dtype, target, dense=True) if gpu else None
        self.merge_dense = attention.make_attention_merge(h, d, dtype, target, self.decode_splits) if gpu else None
        self.chunk = (chunk_attention.make_chunk_attention(n_layers, h, hkv, d, dtype, target)
                      if chunk_attention.supported(dtype, d, target) else None)
        self.merge_chunks = (attention.make_attention_merge(h, d, dtype, target, few_chunks=True)
                             if self.chunk is not None else None)  # a prefill chunk's few key splits
        # Hopper's chunk kernel reads the attended keys rotated once per chunk by a pre-pass
        self.rotated_keys = (chunk_attention.make_rotated_keys(n_layers, hkv, d, dtype, target)
                             if self.chunk is not None and chunk_attention.uses_wgmma(d, target) else None)

    selects = False  # exports no *_select functions

    def decode_kernels(self):
        """(maker, chunks) of the per-head row-set and logit variants of one query's attention
        (TidalDecode, Recycled Attention): ``decode_attention``'s flash-decoding splits on GPUs,
        else ``attention_partial`` over this cache's ``kv_dtype``."""
        if is_gpu(self.target):
            return decode_attention.make_decode_attention, decode_attention.decode_splits
        return functools.partial(attention.make_attention_partial, kv_dtype=self.kv_dtype), attention.num_chunks

    def state_specs(self) -> list[tuple[str, list[int], str]]:
        """Extra state tensors (name, shape, dtype) the runtime allocates zeroed: none."""
        return []

    def begin_step(self, step) -> None:
        """Per-forward work shared by all layers: the attended rows ``0 .. past + n - 1`` (none
        for a GPU decode step: its kernel takes them from the device length)."""
        step.rows = None if step.one_query and self.decode_dense is not None else self.dense_rows(step)

    def dense_rows(self, step) -> nn.Tensor:
        """The rows ``0 .. past + n - 1`` (int32)."""
        total = step.past + step.n
        return op.tensor_ir_op(self.iota, "iota", args=[total], out=nn.Tensor.placeholder([total], "int32"))

    def append(self, layer_id: int, qkv: nn.Tensor, step) -> None:
        """Write the step's K (no RoPE) and V (the last 2 Hkv heads of ``qkv``) into the cache."""
        step.kv = op.tensor_ir_inplace_op(
            self.kv_append, "kv_append", args=[step.kv, qkv, i64(layer_id), step.length],
            inplace_indices=[0], out=nn.Tensor.placeholder(step.kv.shape, step.kv.dtype))

    def attend_rows(self, layer_id: int, q: nn.Tensor, kv: nn.Tensor, rope: nn.Tensor, rows: nn.Tensor):
        """Attention of ``q`` (the first H heads of ``q[n, >= H, d]``) over ``kv[layer_id]`` rows
        ``rows`` (positions re-assigned 0..M-1) -> [n, H, d]."""
        n, h, d = q.shape[0], self.cfg.num_heads, self.cfg.head_dim
        m = rows.shape[0]
        args, merge = [q, kv, rope, rows, i64(layer_id)], self.merge
        if n == 1 and self.decode is not None:  # one query: split the rows over the whole GPU
            kernel, name, chunks = self.decode, "attention_decode", self.decode_splits(m)
        elif self.chunk is not None:  # a prefill chunk on tensor cores
            kernel, name, chunks = self.chunk, "chunk_attention", chunk_attention.chunk_splits(m)
            merge = self.merge_chunks
            if self.rotated_keys is not None:
                krot = op.tensor_ir_op(self.rotated_keys, "rotated_keys", args=args[1:],
                                       out=nn.Tensor.placeholder([self.cfg.num_kv_heads, m, d], self.dtype))
                args.insert(2, krot)
        else:
            kernel, name, chunks = self.partial, "attention_partial", attention.partial_chunks(m, self.target)
        o, lse = op.tensor_ir_op(
            kernel, name, args=args,
            out=[nn.Tensor.placeholder([n, chunks, h, d], "float32"),
                 nn.Tensor.placeholder([n, chunks, h], "float32")])
        return op.tensor_ir_op(merge, "attention_merge", args=[o, lse],
                               out=nn.Tensor.placeholder([n, h, d], self.dtype))

    def attend(self, layer_id: int, qkv: nn.Tensor, step) -> nn.Tensor:
        """``qkv[n, H + 2 Hkv, d]``: the step's query, key and value heads -> attention [n, H, d]."""
        self.append(layer_id, qkv, step)
        if step.rows is None:
            return self.attend_decode_dense(layer_id, qkv, step)
        return self.attend_rows(layer_id, qkv, step.kv, step.rope, step.rows)

    def attend_decode_dense(self, layer_id: int, q: nn.Tensor, step) -> nn.Tensor:
        """A GPU decode step's attention over every cached row (true positions), with fixed
        grids and shapes: ``max_splits`` chunks, of which the merge reads the used ones."""
        h, d, s = self.cfg.num_heads, self.cfg.head_dim, self.max_splits
        o, lse = op.tensor_ir_op(
            self.decode_dense, "attention_decode_dense", args=[q, step.kv, step.rope, step.length, i64(layer_id)],
            out=[nn.Tensor.placeholder([1, s, h, d], "float32"), nn.Tensor.placeholder([1, s, h], "float32")])
        return op.tensor_ir_op(self.merge_dense, "attention_merge_length", args=[o, lse, step.length],
                               out=nn.Tensor.placeholder([1, h, d], self.dtype))
