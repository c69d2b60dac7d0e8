"""The tensor-parallel collectives as Relax calls (``models/tensor_parallel.py``): destination-passing
calls of the packed functions the runtime registers (``tsedge/tensor_parallel.py``)."""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from .tensor_parallel import ALLGATHER, ALLREDUCE


def _collective(func: str, x: nn.Tensor, shape: list) -> nn.Tensor:
    call = relax.call_dps_packed(relax.ExternFunc(func), [x._expr], relax.TensorType(shape, x.dtype))
    return op.wrap_nested(call, name=func.rpartition(".")[2])


def allreduce(x: nn.Tensor) -> nn.Tensor:
    """``x`` summed over the shards (same shape and dtype)."""
    return _collective(ALLREDUCE, x, list(x.shape))


def allgather(x: nn.Tensor, shards: int) -> nn.Tensor:
    """The shards' ``x`` [a, ...] stacked in rank order -> [shards * a, ...]."""
    return _collective(ALLGATHER, x, [x.shape[0] * shards, *x.shape[1:]])
