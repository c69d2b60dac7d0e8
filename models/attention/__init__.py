"""Attention policies: interchangeable implementations of one layer's attention."""

from __future__ import annotations

from tvm.target import Target

from ..config import ModelConfig, PolicyConfig
from tsedge.tir_kernels.tokenselect_scoring import check_shapes

from .dense import DensePolicy
from .recycled import RecycledPolicy
from .tidaldecode import TidalDecodePolicy, check_tidaldecode
from .tokenselect import StreamingPolicy, TokenSelectPolicy


def check_policy(policy: PolicyConfig, cfg: ModelConfig) -> None:
    """Raises ValueError (one line) where ``policy`` cannot be compiled for ``cfg``'s heads and
    layers; call it before announcing a compile."""
    if policy.name == "tokenselect":
        check_shapes(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    if policy.name == "tidaldecode":
        check_tidaldecode(policy, cfg)


def make_policy(policy: PolicyConfig, cfg: ModelConfig, dtype: str, target: Target, max_context: int = 0):
    """The policy object the model calls once per layer. ``max_context``: the library's KV cache
    in tokens (Recycled Attention sizes its partial caches by it; raises ValueError when a
    fraction ``recycle_k`` meets no ``max_context``)."""
    if policy.name == "dense":
        return DensePolicy(cfg, dtype, target)
    if policy.name == "tokenselect":
        return TokenSelectPolicy(cfg, dtype, target, policy)
    if policy.name == "streaming":
        return StreamingPolicy(cfg, dtype, target, policy)
    if policy.name == "tidaldecode":
        return TidalDecodePolicy(cfg, dtype, target, policy)
    if policy.name == "recycled":
        return RecycledPolicy(cfg, dtype, target, policy, max_context)
    raise NotImplementedError(f"policy {policy.name!r} is not compiled yet "
                              "(available: dense, tokenselect, streaming, tidaldecode, recycled)")
