"""The attended-row list of a selecting policy: sinks, selected tokens, local window.

``rows = [0, n_init) ++ cache_idx[layer] ++ [L - n_local, L)``, ``M = n_init + top_k + n_local``
rows in all, sorted and distinct when ``cache_idx[layer]`` holds sorted positions in
``[n_init, L - n_local)`` (what topk.py writes). The attention kernel then gives row ``j`` the
RoPE position ``j`` (re-assigned positions) and the step's queries the last positions.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .common import i64, is_gpu

_THREADS = 256


def make_select_rows(num_layers: int, n_init: int, top_k: int, n_local: int,
                     target: Target) -> tirx.PrimFunc:
    """The row list of one layer and step (``L`` = context length after the step's append).

    ``top_k > 0`` (TokenSelect): args cache_idx[num_layers, top_k] int32, layer (int64),
    length[1] int32 (a device tensor holding ``L``).
    ``top_k == 0`` (StreamingLLM: sinks and window only): args length[1] int32.
    Output: rows[M] int32.
    """
    gpu = is_gpu(target)
    size = i64(n_init + top_k + n_local)

    @T.macro
    def fill(rows, j, cache_idx, layer, L):
        if j < n_init or j >= n_init + top_k:
            rows[j] = T.Cast("int32", T.if_then_else(j < n_init, j, L - size + j))
        elif top_k > 0:  # static: the window-only kernel has no cache_idx
            rows[j] = cache_idx[layer, j - n_init]

    @T.macro
    def build(rows, cache_idx, layer, L):
        if gpu:
            for bx in T.thread_binding(T.ceildiv(size, _THREADS), thread="blockIdx.x"):
                for tx in T.thread_binding(_THREADS, thread="threadIdx.x"):
                    with T.sblock("rows"):
                        if bx * _THREADS + tx < size:
                            fill(rows, bx * _THREADS + tx, cache_idx, layer, L)
        else:
            for j in T.parallel(size):
                with T.sblock("rows"):
                    fill(rows, j, cache_idx, layer, L)

    if top_k == 0:

        @T.prim_func(s_tir=True)
        def window_rows(length_h: T.handle, rows_h: T.handle):
            T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
            length = T.match_buffer(length_h, (T.int64(1),), "int32")
            rows = T.match_buffer(rows_h, (size,), "int32")
            build(rows, None, None, T.Cast("int64", length[0]))

        return window_rows

    @T.prim_func(s_tir=True)
    def select_rows(cache_idx_h: T.handle, layer: T.int64, length_h: T.handle, rows_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        cache_idx = T.match_buffer(cache_idx_h, (i64(num_layers), i64(top_k)), "int32")
        length = T.match_buffer(length_h, (T.int64(1),), "int32")
        rows = T.match_buffer(rows_h, (size,), "int32")
        build(rows, cache_idx, layer, T.Cast("int64", length[0]))

    return select_rows
