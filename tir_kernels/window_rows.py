"""StreamingLLM's attended-row list: the attention sinks and the local window.

``rows = [0, n_init) ++ [L - n_local, L)`` (``L`` the context length after the step's KV append);
the attention kernel gives row ``j`` the RoPE position ``j`` (re-assigned positions). TokenSelect's
list (sinks, its selection, the window) is written by its top-k kernel (topk.py).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .common import i64, is_gpu

_THREADS = 256


def make_window_rows(n_init: int, n_local: int, target: Target) -> tirx.PrimFunc:
    """Args: length[1] int32 (a device tensor holding ``L >= n_init + n_local``).
    Output: rows[n_init + n_local] int32."""
    size = i64(n_init + n_local)

    @T.macro
    def fill(rows, j, L):
        rows[j] = T.Cast("int32", T.if_then_else(j < n_init, j, L - size + j))

    @T.prim_func(s_tir=True)
    def window_rows(length_h: T.handle, rows_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        length = T.match_buffer(length_h, (T.int64(1),), "int32")
        rows = T.match_buffer(rows_h, (size,), "int32")
        if is_gpu(target):
            for bx in T.thread_binding(T.ceildiv(size, _THREADS), thread="blockIdx.x"):
                for tx in T.thread_binding(_THREADS, thread="threadIdx.x"):
                    with T.sblock("rows"):
                        if bx * _THREADS + tx < size:
                            fill(rows, bx * _THREADS + tx, T.Cast("int64", length[0]))
        else:
            for j in T.parallel(size):
                with T.sblock("rows"):
                    fill(rows, j, T.Cast("int64", length[0]))

    return window_rows
