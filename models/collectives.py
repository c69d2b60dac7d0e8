"""The tensor-parallel collectives as Relax calls (``models/tensor_parallel.py``): destination-passing
calls of the packed functions the runtime registers (``tsedge/tensor_parallel.py``)."""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from .tensor_parallel import ALLGATHER, ALLREDUCE, ALLREDUCE_ADD


def _collective(func: str, inputs: list[nn.Tensor], shape: list) -> nn.Tensor:
    call = relax.call_dps_packed(relax.ExternFunc(func), [t._expr for t in inputs],
                                 relax.TensorType(shape, inputs[0].dtype))
    return op.wrap_nested(call, name=func.rpartition(".")[2])


def allreduce(x: nn.Tensor) -> nn.Tensor:
    """``x`` summed over the shards (same shape and dtype)."""
    return _collective(ALLREDUCE, [x], list(x.shape))


def allreduce_add(x: nn.Tensor, residual: nn.Tensor) -> nn.Tensor:
    """``residual + x`` summed over the shards: a row-parallel linear's partial outputs and the
    residual stream, in one collective (on GPUs one kernel for a decode step's row)."""
    return _collective(ALLREDUCE_ADD, [x, residual], list(x.shape))


def allgather(x: nn.Tensor, shards: int) -> nn.Tensor:
    """The shards' ``x`` [a, ...] stacked in rank order -> [shards * a, ...]."""
    return _collective(ALLGATHER, [x], [x.shape[0] * shards, *x.shape[1:]])
