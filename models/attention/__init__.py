"""Attention policies: interchangeable implementations of one layer's attention."""

from __future__ import annotations

from tvm.target import Target

from ..config import ModelConfig, PolicyConfig
from ..tensor_parallel import shard_config
from tsedge.tir_kernels.tokenselect_scoring import check_score_keys, check_shapes

from .dense import DensePolicy
from .recycled import RecycledPolicy
from .tidaldecode import TidalDecodePolicy, check_tidaldecode
from .tokenselect import StreamingPolicy, TokenSelectPolicy


def check_policy(policy: PolicyConfig, cfg: ModelConfig, shards: int = 1, target: Target | None = None) -> None:
    """Raises ValueError (one line) where ``policy`` cannot be compiled for ``cfg``'s heads and
    layers split into ``shards`` tensor-parallel shards (``shard_config``'s errors included), or
    (``target`` given) for that target; call it before announcing a compile."""
    cfg = shard_config(cfg, shards)
    if policy.name == "tokenselect":
        check_shapes(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        if target is not None:
            check_score_keys(policy.score_keys, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, target)
        if shards > 1 and policy.pool_kernel > 1:
            raise ValueError(f"--pool-kernel {policy.pool_kernel} with --tensor-parallel {shards}: the pooled vote is "
                             "not sharded yet; use --pool-kernel 0 (the default) or --tensor-parallel 1")
    if policy.name == "tidaldecode":
        check_tidaldecode(policy, cfg)


def make_policy(policy: PolicyConfig, cfg: ModelConfig, dtype: str, target: Target, max_context: int = 0,
                shards: int = 1, kv_dtype: str | None = None):
    """The policy object the model calls once per layer. ``max_context``: the library's KV cache
    in tokens (Recycled Attention sizes its partial caches by it; raises ValueError when a
    fraction ``recycle_k`` meets no ``max_context``). ``shards``: tensor-parallel shards (``cfg``
    is then one shard's); TokenSelect and Recycled Attention reduce over them. ``kv_dtype``: the
    KV cache's element type (default ``dtype``; ``compile.targets.kv_cache_dtype``)."""
    if policy.name == "dense":
        return DensePolicy(cfg, dtype, target, kv_dtype)
    if policy.name == "tokenselect":
        return TokenSelectPolicy(cfg, dtype, target, policy, shards, kv_dtype)
    if policy.name == "streaming":
        return StreamingPolicy(cfg, dtype, target, policy, kv_dtype)
    if policy.name == "tidaldecode":
        return TidalDecodePolicy(cfg, dtype, target, policy, kv_dtype)
    if policy.name == "recycled":
        return RecycledPolicy(cfg, dtype, target, policy, max_context, shards, kv_dtype)
    raise NotImplementedError(f"policy {policy.name!r} is not compiled yet "
                              "(available: dense, tokenselect, streaming, tidaldecode, recycled)")
