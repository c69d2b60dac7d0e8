"""Tensor parallelism (Megatron-LM, Shoeybi et al., arXiv 1909.08053), as MLC-LLM shards a model.

Each of N shards holds ``num_heads / N`` query heads with their ``num_kv_heads / N`` whole KV heads
(and the KV cache of those), ``intermediate_size / N`` MLP columns, ``vocab_size / N`` rows of the
lm_head (``VOCAB_PARALLEL_HEAD``; the shards' logits all-gathered), and a replicated embedding and
norms. Column-parallel weights (q, k, v, gate, up; the qkv bias; the lm_head) are split along their
output rows, row-parallel ones (o, down) along their input columns; the partial outputs of o_proj
and down_proj are summed over the shards (an all-reduce) before the residual add.

Every shard runs the same library; the collectives (``models/collectives.py``) are three packed
functions the runtime registers in each process (``tsedge/tensor_parallel.py``): ``ALLREDUCE(x,
out)`` (``out`` = the sum of ``x`` over the shards), ``ALLREDUCE_ADD(x, residual, out)`` (the same
plus ``residual``: the residual add of o_proj and down_proj in the collective) and ``ALLGATHER(x,
out)`` (``out`` = the shards' ``x`` stacked along axis 0 in rank order). Selecting policies reduce
what spans all heads: TokenSelect's soft vote and its Selection Cache's cosine (over the
all-gathered fingerprint), Recycled Attention's mean query. Plain NumPy here (no TVM).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .config import ModelConfig
from .quantization import QuantizedTensor

ALLREDUCE = "tsedge.tp.allreduce_sum"
ALLREDUCE_ADD = "tsedge.tp.allreduce_add"  # (x, residual, out): out = residual + the sum of x over the shards
ALLGATHER = "tsedge.tp.allgather"

# The lm_head split by vocabulary rows over the shards (each reads 1/N of it; its logits all-gathered)
# rather than replicated (each reads all of it), where the vocabulary divides.
VOCAB_PARALLEL_HEAD = True

# library parameter (module) -> the axis of its Hugging Face sources split over the shards
# (0: output rows, 1: input columns); parameters not named here are replicated
_SPLIT = {"qkv_proj": 0, "gate_up_proj": 0, "o_proj": 1, "down_proj": 1}
# the same for the Hugging Face linears those are made of
_LINEARS = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1}


def shard_config(cfg: ModelConfig, shards: int) -> ModelConfig:
    """The shapes one of ``shards`` shards computes with (heads, KV heads and MLP width divided).
    Raises ValueError (one line naming the fix) where a size does not divide."""
    if shards < 1:
        raise ValueError(f"--tensor-parallel {shards}: give a number of GPUs >= 1")
    if shards == 1:
        return cfg
    sizes = {"num_kv_heads": cfg.num_kv_heads, "num_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size}
    bad = [f"{k}={v}" for k, v in sizes.items() if v % shards]
    if bad:
        raise ValueError(f"{cfg.name}: {', '.join(bad)} not divisible by --tensor-parallel {shards} (each shard "
                         "holds whole KV heads); choose a tensor-parallel size that divides them")
    return dataclasses.replace(cfg, head_dim=cfg.head_dim, **{k: v // shards for k, v in sizes.items()})


def vocab_parallel(cfg: ModelConfig, shards: int) -> bool:
    """Whether the lm_head of ``cfg`` (the whole model's) is split over ``shards`` shards."""
    return shards > 1 and VOCAB_PARALLEL_HEAD and cfg.vocab_size % shards == 0


def param_split(name: str, vocab_split: bool) -> int | None:
    """The axis of library parameter ``name``'s Hugging Face sources ([out, in] or [out]) that
    tensor parallelism splits, or None (replicated); ``vocab_split``: the lm_head is split."""
    module = name.split(".")[-2]
    if module == "lm_head":
        return 0 if vocab_split else None
    return _SPLIT.get(module)


def linear_split(hf_name: str) -> int | None:
    """The axis of Hugging Face tensor ``hf_name`` split over the shards when it is one of the
    attention or MLP linears (weight or bias; what a ``tsedge convert --tensor-parallel`` shard
    folder stores split), else None."""
    parts = hf_name.split(".")
    return _LINEARS.get(parts[-2]) if len(parts) > 1 else None


def shard_shapes(shapes: dict[str, tuple[int, ...]], shards: int) -> dict[str, tuple[int, ...]]:
    """``shapes`` (Hugging Face names) as one shard's folder holds them (``linear_split``)."""
    def cut(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        axis = linear_split(name)
        return shape if axis is None else tuple(n // shards if i == axis else n for i, n in enumerate(shape))

    return {name: cut(name, shape) for name, shape in shapes.items()}


def shard_tensor(array: np.ndarray | QuantizedTensor, axis: int | None, rank: int, shards: int,
                 name: str = "tensor") -> np.ndarray | QuantizedTensor:
    """Shard ``rank``'s part of ``array`` (a Hugging Face layout tensor: [out, in] or [out]):
    ``shards`` equal slices along ``axis``; the whole array for ``axis`` None. A quantized weight
    is sliced in its packed layout. Raises ValueError (one line) where the axis does not split
    evenly (for a quantized weight's columns: into whole groups)."""
    if axis is None or shards == 1:
        return array
    if isinstance(array, QuantizedTensor):
        if axis == 1 and (array.shape[1] // shards) % array.scheme.group:
            raise ValueError(f"{name}: {array.shape[1]} inputs do not split into {shards} shards of whole "
                             f"{array.scheme.name} groups; use a smaller --tensor-parallel")
        return array.map(lambda part: shard_tensor(part, axis, rank, shards, name))
    if array.shape[axis] % shards:
        raise ValueError(f"{name}: size {array.shape[axis]} along axis {axis} does not split into {shards} shards")
    size = array.shape[axis] // shards
    return np.ascontiguousarray(np.take(array, np.arange(rank * size, (rank + 1) * size), axis=axis))
