"""TokenSelect's top-k for the Vulkan target (WGSL): ``topk.make_topk``'s contract without atomics
or 64-bit integers.

TVM's webgpu codegen has neither atomics nor int64, so the radix select of ``topk`` (per-block
histograms by atomic adds, int64 keys) cannot lower. Here one workgroup of 256 threads does the
same selection with 32-bit keys: in each of the 4 passes thread ``b`` counts the candidates in bin
``b`` of the current digit (every thread reads every candidate: no atomics), a scan from the top
bin finds the digit of the k-th largest key ``tau`` and the ties still to take; an
order-preserving compaction (a block scan per 256 candidates) then writes every key ``> tau`` and
the first ties by position, so the output is sorted by position. One workgroup is enough for a
correct CI run on the software driver; a GPU wants the multi-block select back (with atomics).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .common import i64
from .topk import WORKSPACE_SIZE, block_scan

_THREADS = 256


def _key32(x):
    """float32 -> uint32 with the same order (sign-flip trick)."""
    u = T.reinterpret("uint32", x)
    return T.if_then_else(u >> T.uint32(31) == T.uint32(1), u ^ T.uint32(0xFFFFFFFF), u | T.uint32(0x80000000))


def make_topk_wgsl(num_layers: int, top_k: int, n_init: int, n_local: int) -> tirx.PrimFunc:
    """Args: crit[S] float32 (the first ``C = length[0] - n_init - n_local`` are the candidates,
    ``top_k <= C <= S``), state[num_layers, 4] int32 (nothing happens when ``state[layer, 0]`` is
    1), cache_idx[num_layers, top_k] int32 (in place), workspace[WORKSPACE_SIZE] int32 (in place;
    kept for ``make_topk``'s signature, unused), layer (int64), length[1] int32. Output:
    rows[n_init + top_k + n_local] int32, as ``make_topk``'s."""
    k = top_k
    M = i64(n_init + top_k + n_local)

    @T.prim_func(s_tir=True)
    def topk(crit_h: T.handle, state_h: T.handle, cache_idx_h: T.handle, ws_h: T.handle, layer: T.int64,
             length_h: T.handle, rows_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        size = T.int64()
        crit = T.match_buffer(crit_h, (size,), "float32")
        length = T.match_buffer(length_h, (T.int64(1),), "int32")
        state = T.match_buffer(state_h, (i64(num_layers), 4), "int32")
        cache_idx = T.match_buffer(cache_idx_h, (i64(num_layers), i64(k)), "int32")
        T.match_buffer(ws_h, (i64(WORKSPACE_SIZE),), "int32")
        rows = T.match_buffer(rows_h, (M,), "int32")
        for tx in T.thread_binding(i64(_THREADS), thread="threadIdx.x"):
            with T.sblock("topk"):
                T.reads()
                T.writes()
                buf = T.sblock_alloc_buffer((_THREADS,), "int32", scope="shared")
                found = T.sblock_alloc_buffer((2,), "int32", scope="shared")  # digit, ties left
                tau = T.sblock_alloc_buffer((1,), "uint32", scope="local")
                krem = T.sblock_alloc_buffer((1,), "int32", scope="local")
                cnt = T.sblock_alloc_buffer((1,), "int32", scope="local")
                tmp = T.sblock_alloc_buffer((1,), "int32", scope="local")
                run = T.sblock_alloc_buffer((2,), "int32", scope="local")  # (#gt, #eq) before
                C: T.let[T.int64] = T.if_then_else(
                    state[layer, 0] == 0, T.min(T.Cast("int64", length[0]) - n_init - n_local, size), T.int64(0))
                tau[0] = T.uint32(0)
                krem[0] = k
                for p in T.serial(4):
                    high: T.let[T.uint32] = T.bitwise_not(T.uint32(0xFFFFFFFF) >> T.Cast("uint32", 8 * p))
                    cnt[0] = 0
                    for t in T.serial(C):  # thread tx counts bin tx of digit p
                        key: T.let[T.uint32] = _key32(crit[t])
                        if (key & high) == (tau[0] & high) and T.Cast(
                                "int64", (key >> T.Cast("uint32", 24 - 8 * p)) & T.uint32(255)) == tx:
                            cnt[0] = cnt[0] + 1
                    buf[_THREADS - 1 - tx] = cnt[0]  # scanned from the top bin down
                    block_scan(buf, tmp, tx)
                    tmp[0] = buf[_THREADS - 1 - tx]
                    if tmp[0] - cnt[0] < krem[0] and krem[0] <= tmp[0]:
                        found[0] = T.Cast("int32", tx)
                        found[1] = krem[0] - (tmp[0] - cnt[0])
                    T.tvm_storage_sync("shared")
                    tau[0] = tau[0] | (T.Cast("uint32", found[0]) << T.Cast("uint32", 24 - 8 * p))
                    krem[0] = found[1]
                    T.tvm_storage_sync("shared")
                run[0] = 0
                run[1] = 0
                for it in T.serial(T.ceildiv(C, _THREADS)):  # order-preserving compaction
                    t: T.let[T.int64] = it * _THREADS + tx
                    key: T.let[T.uint32] = _key32(crit[T.min(t, C - 1)])
                    gt: T.let[T.int32] = T.if_then_else(t < C and key > tau[0], 1, 0)
                    eq: T.let[T.int32] = T.if_then_else(t < C and key == tau[0], 1, 0)
                    buf[tx] = gt * 65536 + eq  # both counts in one scan
                    block_scan(buf, tmp, tx)
                    gt_before: T.let[T.int32] = run[0] + ((buf[tx] - gt * 65536 - eq) >> 16)
                    eq_before: T.let[T.int32] = run[1] + ((buf[tx] - gt * 65536 - eq) & 65535)
                    if gt == 1 or (eq == 1 and eq_before < krem[0]):
                        slot: T.let[T.int32] = gt_before + T.if_then_else(gt == 1, T.min(eq_before, krem[0]), eq_before)
                        cache_idx[layer, slot] = T.Cast("int32", n_init + t)
                        rows[n_init + slot] = T.Cast("int32", n_init + t)
                    run[0] = run[0] + (buf[_THREADS - 1] >> 16)
                    run[1] = run[1] + (buf[_THREADS - 1] & 65535)
                    T.tvm_storage_sync("shared")
                for it in T.serial(T.ceildiv(M, _THREADS)):  # sinks, window; on a hit the cached selection
                    j: T.let[T.int64] = it * _THREADS + tx
                    if j < M:
                        if j < n_init or j >= n_init + k:
                            rows[j] = T.Cast("int32", T.if_then_else(j < n_init, j, T.Cast("int64", length[0]) - M + j))
                        elif state[layer, 0] != 0:
                            rows[j] = cache_idx[layer, j - n_init]

    return topk
