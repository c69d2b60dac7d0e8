"""Top-k of the criticalities, sorted by position, written into the selection cache in place.

Selection, not sorting: floats map to order-preserving unsigned 32-bit keys; a radix select
(4 passes of 8 bits, histogram per pass) finds the k-th largest key ``tau`` and how many ties
``== tau`` to take; an order-preserving compaction then writes every key ``> tau`` and the first
ties by position. Ties are thus broken by lower position first, and the output is sorted by
position with no sort at all.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .common import device_count, emits_wgsl, i64, is_gpu
from .tokenselect_scoring import allreduce_sum_i32

TOPK_BLOCKS = 256  # CUDA blocks per pass (per head: at most), each over one contiguous chunk of candidates
_THREADS = 256
_BINS = 256
# int32 workspace: hist[4, 256] | digits of tau [4] | ties still to take before digit p [5]
# | per-block (count > tau, count == tau) [TOPK_BLOCKS, 2]; the per-head form: one such row per head
_DIGITS = 4 * _BINS
_KREM = _DIGITS + 4
_COUNTS = _KREM + 5
WORKSPACE_SIZE = _COUNTS + 2 * TOPK_BLOCKS
_HEAD_GRID = 1024  # per-head GPU top-k: blocks of all heads together at long contexts
_MIN_CHUNK = 512  # ... and candidates per block at the least (2 per thread)


def order_key(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 → int64 in [0, 2^32) with the same order (sign-flip trick)."""
    u = T.reinterpret("uint32", x)
    flipped = T.if_then_else(u >> T.uint32(31) == T.uint32(1), u ^ T.uint32(0xFFFFFFFF),
                             u | T.uint32(0x80000000))
    return T.Cast("int64", flipped)


@T.macro
def block_scan(buf, tmp, tx):
    # inclusive prefix sum of buf[0:256] in shared memory (Hillis-Steele)
    T.tvm_storage_sync("shared")
    for s in T.unroll(T.int64(8)):
        tmp[0] = T.if_then_else(tx >= (T.int64(1) << s), buf[tx - (T.int64(1) << s)], 0)
        T.tvm_storage_sync("shared")
        buf[tx] = buf[tx] + tmp[0]
        T.tvm_storage_sync("shared")


@T.macro
def compact_step(key, tau, krem, run, buf, tmp, tx, out, row, value, rows, rows_off):
    # one block-wide step of the order-preserving compaction (a thread per candidate): ``value``
    # goes to out[row, #taken before it] (and rows[rows_off + #taken before it] unless ``rows``
    # is None) for a key > tau or one of the first ``krem`` ties; ``run`` counts (#gt, #eq) of
    # the earlier steps. (gt, eq) flags packed as gt * 2^16 + eq: one scan for both counts.
    flag: T.let[T.int32] = T.if_then_else(key > tau, 65536, 0) + T.if_then_else(key == tau, 1, 0)
    T.tvm_storage_sync("shared")
    buf[tx] = flag
    block_scan(buf, tmp, tx)
    gt_before: T.let[T.int32] = run[0] + ((buf[tx] - flag) >> 16)
    eq_before: T.let[T.int32] = run[1] + ((buf[tx] - flag) & 65535)
    if key > tau or (key == tau and eq_before < krem):
        slot: T.let[T.int32] = gt_before + T.if_then_else(key > tau, T.min(eq_before, krem), eq_before)
        out[row, slot] = value
        if rows is not None:
            rows[rows_off + slot] = value
    run[0] = run[0] + (buf[_BINS - 1] >> 16)
    run[1] = run[1] + (buf[_BINS - 1] & 65535)


@T.macro
def _select_cpu(crit, ws, out, row, C, kk, off, cb, wb, active):
    # out[row, :kk] = off + the kk largest of crit[cb : cb + C] (ties: lower index), sorted
    prefix = T.sblock_alloc_buffer((1,), "int64")
    krem = T.sblock_alloc_buffer((1,), "int32")
    found = T.sblock_alloc_buffer((1,), "int32")
    taken = T.sblock_alloc_buffer((2,), "int32")  # outputs written, ties taken
    if active:
        prefix[0] = T.int64(0)
        krem[0] = kk
        for p in range(4):
            for i in range(i64(_BINS)):
                ws[wb + i] = 0
            for t in range(C):
                key: T.let[T.int64] = order_key(crit[cb + t])
                if key >> T.int64(32 - 8 * p) == prefix[0] >> T.int64(32 - 8 * p):
                    ws[wb + ((key >> T.int64(24 - 8 * p)) & T.int64(255))] += 1
            found[0] = 0
            for i in range(i64(_BINS)):
                if found[0] == 0:
                    if krem[0] <= ws[wb + _BINS - 1 - i]:
                        found[0] = 1
                        prefix[0] = prefix[0] | ((_BINS - 1 - i) << T.int64(24 - 8 * p))
                    else:
                        krem[0] = krem[0] - ws[wb + _BINS - 1 - i]
        taken[0] = 0
        taken[1] = 0
        for t in range(C):
            key: T.let[T.int64] = order_key(crit[cb + t])
            if key > prefix[0] or (key == prefix[0] and taken[1] < krem[0]):
                out[row, taken[0]] = T.Cast("int32", off + t)
                taken[0] = taken[0] + 1
            if key == prefix[0]:
                taken[1] = taken[1] + 1


def _runs(active) -> tirx.PrimExpr:
    """1, or 0 where ``active`` (a device-side test, or Python ``True``) fails: the trip count of
    a loop around work with barriers, skipped by every thread of a block alike."""
    return T.int64(1) if active is True else T.Cast("int64", active)


def _chunk(active, C, nb):
    """Candidates per block: ``ceildiv(C, nb)``, 0 where ``active`` (a device-side test, or
    Python ``True``) fails. An expression: blocks evaluate it on the device."""
    return T.ceildiv(C, nb) if active is True else T.if_then_else(active, T.ceildiv(C, nb), T.int64(0))


@T.macro
def _key_prefix(ws, hh, n_digits, out):
    # the key bits of digits 0..n_digits-1 of row hh's tau
    out[0] = T.int64(0)
    for q in range(n_digits):
        out[0] = out[0] | (T.Cast("int64", ws[hh, _DIGITS + q]) << T.int64(24 - 8 * q))


def _krem_before(ws, hh, p: int, sel) -> tirx.PrimExpr:
    """How many of row hh's selection are still to take at digit p: the workspace slot, or for
    digit 0 of a kept-clean workspace (``sel``, TokenSelect) the constant k."""
    return T.int32(sel[3]) if p == 0 and sel is not None else ws[hh, _KREM + p]


@T.macro
def _resolve_digit(ws, hh, p, buf, tmp, res, tx, b, krem_in):
    # digit p of row hh's tau: the bin where the running count from the top reaches krem_in
    buf[tx] = ws[hh, p * _BINS + _BINS - 1 - tx]
    block_scan(buf, tmp, tx)
    tmp[0] = buf[tx]  # (shared loads cannot sit in branch conditions)
    above: T.let[T.int32] = tmp[0] - ws[hh, p * _BINS + _BINS - 1 - tx]
    if above < krem_in and krem_in <= tmp[0]:
        res[0] = T.Cast("int32", _BINS - 1 - tx)
        if b == 0:
            ws[hh, _DIGITS + p] = T.Cast("int32", _BINS - 1 - tx)
            ws[hh, _KREM + p + 1] = krem_in - above
    T.tvm_storage_sync("shared")


@T.macro
def _finish_selection(ws, out, row0, nb, b, tx, active, rows, n_init, n_local, k, L):
    # TokenSelect's compaction pass, besides the compaction: block b zeroes its share of the
    # histograms (the workspace is left clean for the next selection) and writes its share of
    # the row list: sinks, window and, on a Selection Cache hit, the cached positions
    share: T.let[T.int64] = T.ceildiv(i64(max(_DIGITS, n_init + n_local + k)), nb)
    if tx < share:
        j: T.let[T.int64] = b * share + tx
        if j < _DIGITS:
            ws[0, j] = 0
        if j < n_init:
            rows[j] = T.Cast("int32", j)
        elif j < n_init + n_local:
            rows[k + j] = T.Cast("int32", L - n_init - n_local + j)
        if not active and j < k:
            rows[n_init + j] = out[row0, j]


@T.macro
def _radix_pass(crit, ws, rows, nb, C, active, p, out, row0, off, sel):
    # one kernel of the GPU radix select, grid rows (blockIdx.y) x nb blocks (blockIdx.x), each
    # block over one contiguous chunk of its row's candidates crit[hh, :C]. p < 4: histogram of
    # digit p over the keys matching digits 0..p-1 of tau; p == 4: per-block counts of keys > tau
    # and == tau; p == 5: the compaction, output slot = (#gt before) + min(#ties before, krem).
    # ``sel`` (TokenSelect's single selection, else None): see ``_radix_select``.
    for hh in T.thread_binding(rows, thread="blockIdx.y"):
        for b in T.thread_binding(nb, thread="blockIdx.x"):
            for tx in T.thread_binding(i64(_THREADS), thread="threadIdx.x"):
                with T.sblock("radix"):
                    T.reads()  # regions would name the block's lets
                    T.writes()
                    c: T.let[T.int64] = C
                    chunk: T.let[T.int64] = _chunk(active, c, nb)
                    buf = T.sblock_alloc_buffer((i64(_BINS),), "int32", scope="shared")
                    res = T.sblock_alloc_buffer((1,), "int32", scope="shared")
                    tmp = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    prefix = T.sblock_alloc_buffer((1,), "int64", scope="local")  # of tau's key
                    n_gt = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    n_eq = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    sum_gt = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    sum_eq = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    run = T.sblock_alloc_buffer((2,), "int32", scope="local")  # (#gt, #eq) before
                    _key_prefix(ws, hh, min(max(p - 1, 0), 4), prefix)
                    if p == 5:
                        if sel is not None:
                            _finish_selection(ws, out, row0, nb, b, tx, active, sel[0], sel[1], sel[2], sel[3], sel[4])
                        for _ in range(_runs(active)):  # nothing on a selection-cache hit (no early return: barriers)
                            krem: T.let[T.int32] = ws[hh, _KREM + 4]
                            n_gt[0] = T.if_then_else(tx < b, ws[hh, _COUNTS + 2 * tx], 0)
                            allreduce_sum_i32(n_gt, sum_gt, tx)
                            n_eq[0] = T.if_then_else(tx < b, ws[hh, _COUNTS + 2 * tx + 1], 0)
                            allreduce_sum_i32(n_eq, sum_eq, tx)
                            # allreduce results are read-only: count on in a buffer of our own
                            run[0] = sum_gt[0]
                            run[1] = sum_eq[0]
                            for it in range(T.ceildiv(chunk, _THREADS)):
                                t: T.let[T.int64] = b * chunk + it * _THREADS + tx
                                inside: T.let[T.bool] = it * _THREADS + tx < chunk and t < c
                                key: T.let[T.int64] = T.if_then_else(inside, order_key(crit[hh, T.min(t, c - 1)]), T.int64(-1))
                                compact_step(key, prefix[0], krem, run, buf, tmp, tx, out, row0 + hh,
                                             T.Cast("int32", off + t), None if sel is None else sel[0], off)
                    else:
                        for _ in range(_runs(active)):
                            if p > 0:
                                _resolve_digit(ws, hh, p - 1, buf, tmp, res, tx, b, _krem_before(ws, hh, p - 1, sel))
                                prefix[0] = prefix[0] | (T.Cast("int64", res[0]) << T.int64(32 - 8 * p))
                            n_gt[0] = 0
                            n_eq[0] = 0
                            buf[tx] = 0
                            T.tvm_storage_sync("shared")
                            for it in range(T.ceildiv(chunk, _THREADS)):
                                t: T.let[T.int64] = b * chunk + it * _THREADS + tx
                                if it * _THREADS + tx < chunk and t < c:
                                    key: T.let[T.int64] = order_key(crit[hh, t])
                                    if p < 4:
                                        if key >> T.int64(32 - 8 * p) == prefix[0] >> T.int64(32 - 8 * p):
                                            T.cuda.atomic_add(T.address_of(buf[(key >> T.int64(24 - 8 * p)) & T.int64(255)]), 1)
                                    else:
                                        n_gt[0] = n_gt[0] + T.Cast("int32", key > prefix[0])
                                        n_eq[0] = n_eq[0] + T.Cast("int32", key == prefix[0])
                            T.tvm_storage_sync("shared")
                            if p < 4:
                                tmp[0] = buf[tx]
                                if tmp[0] > 0:
                                    T.cuda.atomic_add(T.address_of(ws[hh, p * _BINS + tx]), tmp[0])
                            else:
                                allreduce_sum_i32(n_gt, sum_gt, tx)
                                allreduce_sum_i32(n_eq, sum_eq, tx)
                                if tx == 0:
                                    ws[hh, _COUNTS + 2 * b] = sum_gt[0]
                                    ws[hh, _COUNTS + 2 * b + 1] = sum_eq[0]


@T.macro
def _radix_select(crit, ws, rows, nb, C, active, k, out, row0, off, last, sel):
    # GPU: for each row hh < rows where ``active``: out[row0 + hh, :k] = off + the positions of
    # the k largest of crit[hh, :C] (ties: lower position), sorted; out[row0 + hh, k] = last
    # unless ``last`` is None. crit[rows, >= C] float32, ws[rows, WORKSPACE_SIZE] int32; every
    # pass runs nb blocks of 256 threads per row. Inactive rows: every loop runs zero times (no
    # early return around barriers); each kernel evaluates ``active`` and ``C`` itself (the
    # host cannot read device memory).
    # ``sel = (rows_out, n_init, n_local, k, L)`` (TokenSelect, one row): the workspace is a
    # state kept clean between selections (no zeroing kernel; the last pass re-zeroes it) and the
    # last pass also writes rows_out[n_init + k + n_local]: sinks, the selection, the window.
    if sel is None:
        for hh in T.thread_binding(rows, thread="blockIdx.x"):
            for tx in T.thread_binding(i64(_DIGITS), thread="threadIdx.x"):
                with T.sblock("zero"):
                    if active:
                        ws[hh, tx] = 0
                        if tx == 0:
                            ws[hh, _KREM] = k
                    if last is not None:
                        if tx == 0:
                            out[row0 + hh, k] = last
    _radix_pass(crit, ws, rows, nb, C, active, 0, out, row0, off, sel)
    _radix_pass(crit, ws, rows, nb, C, active, 1, out, row0, off, sel)
    _radix_pass(crit, ws, rows, nb, C, active, 2, out, row0, off, sel)
    _radix_pass(crit, ws, rows, nb, C, active, 3, out, row0, off, sel)
    _radix_pass(crit, ws, rows, nb, C, active, 4, out, row0, off, sel)
    _radix_pass(crit, ws, rows, nb, C, active, 5, out, row0, off, sel)


def make_topk(num_layers: int, top_k: int, n_init: int, target: Target, heads: int = 0,
              n_local: int = 0, counted: bool = False) -> tirx.PrimFunc:
    """``cache_idx[layer] = sorted(n_init + top-k positions of crit)`` unless the cache hit, and
    the layer's attended rows.

    Args (in order): crit[S] float32 (its first ``C = length[0] - n_init - n_local`` entries are
    the candidates, ``top_k <= C <= S``), state[num_layers, 4] int32 (no selection when
    ``state[layer, 0]`` is 1), cache_idx[num_layers, top_k] int32 (updated in place),
    workspace[WORKSPACE_SIZE] int32 (in place: a runtime-held state, zero when allocated; the
    GPU kernel needs its histograms zero and leaves them so), layer (int64), length[1] int32 (a device tensor: the context
    length ``L`` after the step's KV append).
    Output (fresh): rows[n_init + top_k + n_local] int32 = ``[0, n_init) ++ cache_idx[layer] ++
    [L - n_local, L)`` (the attended rows, written here to save a launch a layer).
    Relax: ``call_tir_inplace`` with inplace_indices ``[2, 3, -1]``.

    ``heads > 0`` (TidalDecode, Recycled Attention): a batch of independent selections,
    ``num_layers``, ``n_init`` and ``n_local`` unused; on a GPU every head's scan is spread over
    several blocks (up to ``TOPK_BLOCKS``; about 1024 blocks for all heads together at long
    contexts). Args: crit[heads, L] float32 (``L >= top_k``: the logits of every cached token).
    Outputs (fresh): idx[heads, top_k] int32, per head the ``top_k - 1`` largest of
    ``crit[h, :L - 1]`` (ties: lower position first) sorted, then ``L - 1`` (the current token is
    always kept, as TidalDecode's selection); workspace[heads, WORKSPACE_SIZE] int32.
    ``counted`` (with ``heads``; Recycled Attention's active K): the argument count[1] int32 (a
    device tensor) follows ``crit``, and per head only ``c = min(count[0], top_k - 1)`` are
    selected: ``idx[h, :c]`` sorted, ``idx[h, c] = L - 1``, the columns after it not written.
    Raises ValueError for ``top_k < 1`` or ``counted`` without ``heads``.
    """
    if heads:
        return _topk_heads(heads, top_k, target, counted)
    if counted:
        raise ValueError("make_topk: counted is an option of the per-head top-k (heads > 0)")
    if emits_wgsl(target):  # Vulkan: no atomics, no int64
        from .wgsl_topk import make_topk_wgsl

        return make_topk_wgsl(num_layers, top_k, n_init, n_local)
    gpu = is_gpu(target)
    k, NB, M = top_k, i64(TOPK_BLOCKS), i64(n_init + top_k + n_local)

    def candidates(length, size):  # C, read where it is used: device code must load it, not the host
        return T.min(T.Cast("int64", length[0]) - n_init - n_local, size)

    @T.prim_func(s_tir=True)
    def topk(crit_h: T.handle, state_h: T.handle, cache_idx_h: T.handle, ws_h: T.handle, layer: T.int64,
             length_h: T.handle, rows_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        size = T.int64()
        crit = T.match_buffer(crit_h, (size,), "float32")
        length = T.match_buffer(length_h, (T.int64(1),), "int32")
        state = T.match_buffer(state_h, (i64(num_layers), 4), "int32")
        cache_idx = T.match_buffer(cache_idx_h, (i64(num_layers), i64(k)), "int32")
        ws = T.match_buffer(ws_h, (i64(WORKSPACE_SIZE),), "int32")
        rows = T.match_buffer(rows_h, (M,), "int32")
        if gpu:  # one selection (a row of one) over NB blocks, nothing on a selection-cache hit
            crit_rows = T.decl_buffer((T.int64(1), size), "float32", data=crit.data)
            ws_rows = T.decl_buffer((T.int64(1), i64(WORKSPACE_SIZE)), "int32", data=ws.data)
            _radix_select(crit_rows, ws_rows, T.int64(1), NB, candidates(length, size),
                          state[layer, 0] == 0, k, cache_idx, layer, n_init, None,
                          (rows, n_init, n_local, k, T.Cast("int64", length[0])))
        else:
            with T.sblock("topk"):
                _select_cpu(crit, ws, cache_idx, layer, candidates(length, size), k, n_init, 0, 0,
                            state[layer, 0] == 0)
                L: T.let[T.int64] = T.Cast("int64", length[0])
                for j in range(M):
                    rows[j] = T.Cast("int32", T.if_then_else(j < n_init, j, L - M + j))
                    if n_init <= j and j < n_init + k:
                        rows[j] = cache_idx[layer, j - n_init]

    return topk


def _head_blocks(heads: int, C: tirx.PrimExpr) -> tirx.PrimExpr:
    """Blocks per head of the GPU per-head top-k over ``C`` candidates: about ``_HEAD_GRID``
    blocks for all heads together (at most ``TOPK_BLOCKS`` per head: the workspace's per-block
    counts), fewer while a block would get under ``_MIN_CHUNK`` candidates; at least 1."""
    most = i64(max(1, min(TOPK_BLOCKS, _HEAD_GRID // heads)))
    return T.max(T.min(T.ceildiv(C, i64(_MIN_CHUNK)), most), i64(1))


def _topk_heads(heads: int, top_k: int, target: Target, counted: bool = False) -> tirx.PrimFunc:
    """``make_topk``'s batched form (``heads`` selections of ``top_k`` with the last token kept;
    ``counted``: of ``min(count[0], top_k - 1)`` and the last token, count[1] int32 the argument
    after ``crit``).

    CPU: one task per head runs ``_select_cpu`` in its workspace row. GPU: the single selection's
    radix select, every head at once (grid heads x ``_head_blocks`` blocks of 256 threads per
    pass), each head's histograms, digits and per-block counts in its workspace row.
    """
    if top_k < 1:
        raise ValueError(f"top_k={top_k}: a selection keeps at least the current token")
    HS, K, WS = i64(heads), i64(top_k), i64(WORKSPACE_SIZE)

    def selected(count):  # besides the current token: static, or read from the device
        return top_k - 1 if count is None else T.Cast("int32", device_count(count, top_k - 1))

    only_last = not counted and top_k == 1  # static: a budget of 1 keeps only the current token

    @T.macro
    def select_gpu(crit, idx, ws, L, count):
        if only_last:
            for hh in T.thread_binding(HS, thread="threadIdx.x"):
                with T.sblock("last"):
                    idx[hh, 0] = T.Cast("int32", L - 1)
        else:  # the current token goes after the selected ones
            _radix_select(crit, ws, HS, _head_blocks(heads, L - 1), L - 1, selected(count) > 0, selected(count), idx,
                          T.int64(0), 0, T.Cast("int32", L - 1), None)

    @T.macro
    def select_cpu(crit, idx, ws, L, count):
        crit_flat = T.decl_buffer((HS * L,), "float32", data=crit.data)
        ws_flat = T.decl_buffer((HS * WS,), "int32", data=ws.data)
        for hh in T.parallel(HS):
            with T.sblock("topk"):
                _select_cpu(crit_flat, ws_flat, idx, hh, L - 1, selected(count), 0, hh * L, hh * WS,
                            selected(count) > 0)
                idx[hh, selected(count)] = T.Cast("int32", L - 1)

    gpu = is_gpu(target)
    select = select_gpu if gpu else select_cpu

    @T.prim_func(s_tir=True)
    def topk_heads(crit_h: T.handle, idx_h: T.handle, ws_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        L = T.int64()
        crit = T.match_buffer(crit_h, (HS, L), "float32")
        idx = T.match_buffer(idx_h, (HS, K), "int32")
        ws = T.match_buffer(ws_h, (HS, WS), "int32")
        select(crit, idx, ws, L, None)

    @T.prim_func(s_tir=True)
    def topk_heads_counted(crit_h: T.handle, count_h: T.handle, idx_h: T.handle, ws_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        L = T.int64()
        crit = T.match_buffer(crit_h, (HS, L), "float32")
        count = T.match_buffer(count_h, (T.int64(1),), "int32")
        idx = T.match_buffer(idx_h, (HS, K), "int32")
        ws = T.match_buffer(ws_h, (HS, WS), "int32")
        select(crit, idx, ws, L, count)

    func = topk_heads_counted if counted else topk_heads
    return func.with_attr("global_symbol", f"{func.attrs['global_symbol']}_gpu") if gpu else func
