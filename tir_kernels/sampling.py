"""Next-token sampling on the device: penalties, then greedy or temperature + top-k + top-p and a
draw at a uniform number from the host, exactly as ``tsedge/sampling.py`` defines them.

One kernel, one thread block (a single thread on CPUs), several passes over the vocabulary:
1. penalties (repetition over the window, presence, frequency), division by the temperature,
   ``z`` stored in the workspace; max and first argmax (greedy ends here, numpy's tie rule);
2. top-k: the k-th largest ``z`` by a radix select (4 passes of 8-bit digits over
   order-preserving keys, integer histograms) — the tokens ``>=`` it stay (ties with the k-th too);
3. softmax mass ``e = exp(z - max)`` of the kept tokens, summed;
4. top-p: a radix select weighted by probability mass (fixed point, 2^30 for the kept mass, integer
   atomics: deterministic) finds the key of the token where the mass sorted by probability (ties:
   lower id first) reaches ``p``, and how many of its ties to keep;
5. the draw: the first kept token, in id order, whose cumulative mass exceeds ``u`` times the
   kept mass (numpy ``Generator.choice``'s inverse CDF), summed in float64 (a float32 sum over
   128K tokens drifts by several tokens' mass); per-thread contiguous chunks and a block scan
   keep the sums in a fixed order, so a draw repeats bit for bit.
Finally the token is written to ``token[0]`` and the penalty state is updated in place.

Floating point differs from the host's float64 only by rounding: a token can differ where ``u``
or ``p`` falls within float32 rounding of a boundary.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from tsedge.models.sampling_layout import (FREQUENCY, PARAMS, PRESENCE, REPETITION, TEMPERATURE, TOP_K, TOP_P,
                                          UNIFORM, WINDOW)

from .common import i64, is_gpu, max_threads_per_block
from .tokenselect_scoring import thread_allreduce
from .topk import order_key
_BINS = 256
_MASS_ONE = float(1 << 30)  # fixed-point total of the kept probability mass (fits int32 sums)


def make_sample(vocab: int, target: Target) -> tirx.PrimFunc:
    """The next token from one row of logits, written to ``token[0]``; penalty state updated.

    Args (in order):
    - logits[1, vocab] float32 (what ``decode``/``prefill`` return);
    - params[PARAMS] float32 (``models/sampling_layout.py``): temperature (0: greedy), top_p,
      top_k, repetition_penalty, presence_penalty, frequency_penalty, the uniform number of this
      draw (unused when greedy), window (1: the repetition window is the ring in ``recent``;
      0: every token ever counted stays in it, ``repeat_last_n = 0``);
    - counts[2, vocab] int32, in place: row 0 = occurrences in the repetition window (prompt and
      output), row 1 = occurrences in the output; the picked token is added to both;
    - recent[R + 1] int32, in place: recent[0] the ring slot of the oldest window token (next to
      be replaced), recent[1:] the last R tokens (-1: empty). With window 1 the picked token
      replaces the oldest, whose row-0 count drops;
    - token[1] int32, in place: the picked token id;
    - workspace[vocab] float32, in place (scratch: the penalized, tempered logits).
    Relax: ``call_tir_inplace`` with inplace_indices ``[2, 3, 4, 5]``.
    Raises ValueError for ``vocab < 1`` or a GPU target with fewer than 256 threads per block.
    """
    if vocab < 1:
        raise ValueError(f"vocab must be >= 1, got {vocab}")
    gpu = is_gpu(target)
    nt = min(1024, max_threads_per_block(target)) if gpu else 1
    if gpu and nt < _BINS:
        raise ValueError(f"device sampling needs {_BINS} threads per block; {target.kind.name} gives {nt}")
    NT, V, bins = i64(nt), i64(vocab), i64(_BINS)
    iters = i64(-(-vocab // nt))  # strided passes: token it * NT + tx
    chunk = iters  # draw passes: thread tx owns tokens [tx * chunk, (tx + 1) * chunk)
    log2_nt = nt.bit_length() - 1
    scope = "shared" if gpu else "global"
    threads = (lambda n: T.thread_binding(n, thread="threadIdx.x")) if gpu else T.serial

    def reducer(combine, identity):
        on_gpu = thread_allreduce(combine, identity)

        @T.macro
        def reduce(value, out, tx):
            if gpu:
                on_gpu(value, out, tx)
            else:
                out[0] = value[0]

        return reduce

    max_f32 = reducer(lambda a, b: T.max(a, b), T.min_value("float32"))
    sum_f32 = reducer(lambda a, b: a + b, T.float32(0))
    sum_i32 = reducer(lambda a, b: a + b, T.int32(0))
    min_i32 = reducer(lambda a, b: T.min(a, b), T.max_value("int32"))
    max_i32 = reducer(lambda a, b: T.max(a, b), T.int32(-1))

    @T.macro
    def sync():
        if gpu:
            T.tvm_storage_sync("shared")
        else:
            T.evaluate(0)

    @T.macro
    def add(buf, i, value):
        if gpu:
            T.cuda.atomic_add(T.address_of(buf[i]), value)
        else:
            buf[i] = buf[i] + value

    @T.macro
    def scan(buf, tmp, tx):
        # inclusive prefix sum of buf[0:NT] (Hillis-Steele), visible to all threads afterwards
        if gpu:
            for s in T.unroll(log2_nt):
                sync()
                tmp[0] = T.if_then_else(tx >= (T.int64(1) << s), buf[T.max(tx - (T.int64(1) << s), T.int64(0))],
                                        T.Cast(buf.dtype, 0))
                sync()
                buf[tx] = buf[tx] + tmp[0]
        sync()

    @T.macro
    def find_bin(hist, need, res, sbuf, own, incl, tx):
        # the bin, counted from the top, where the running total of hist reaches need:
        # res[0] = bin, res[1] = what is still needed inside it (1..hist[bin])
        if gpu:
            own[0] = T.if_then_else(tx < bins, hist[T.max(bins - 1 - tx, T.int64(0))], 0)
            sbuf[tx] = own[0]
            scan(sbuf, incl, tx)
            incl[0] = sbuf[tx]
            if tx < bins and incl[0] - own[0] < need and need <= incl[0]:
                res[0] = T.Cast("int32", bins - 1 - tx)
                res[1] = need - (incl[0] - own[0])
            sync()
        else:
            incl[0] = 0
            res[0] = -1
            for b in range(bins):
                if res[0] < 0:
                    own[0] = hist[bins - 1 - b]
                    if need <= incl[0] + own[0]:
                        res[0] = T.Cast("int32", bins - 1 - b)
                        res[1] = need - incl[0]
                    incl[0] = incl[0] + own[0]

    def digit(key, p):
        return (key >> T.int64(24 - 8 * p)) & T.int64(255)

    def matches(key, prefix, p):
        return key >> T.int64(32 - 8 * p) == prefix >> T.int64(32 - 8 * p)

    @T.macro
    def zero(buf, tx):
        sync()
        for j in range(T.ceildiv(bins, NT)):
            if j * NT + tx < bins:
                buf[j * NT + tx] = 0
        sync()

    @T.macro
    def count_pass(ws, hist, prefix, need, res, sbuf, own, incl, tx, p):
        # digit p of the need-th largest key (radix select by count)
        zero(hist, tx)
        for it in range(iters):
            if it * NT + tx < V:
                key: T.let[T.int64] = order_key(ws[it * NT + tx])
                if matches(key, prefix[0], p):
                    add(hist, digit(key, p), 1)
        sync()
        find_bin(hist, need[0], res, sbuf, own, incl, tx)
        prefix[0] = prefix[0] | (T.Cast("int64", res[0]) << T.int64(24 - 8 * p))
        need[0] = res[1]

    @T.macro
    def mass_pass(ws, hist, hmass, floor_key, m, scale, top_p, prefix, need, res, sbuf, own, incl, qacc, qsum,
                  tx, p):
        # digit p of the key where the probability mass from the top reaches need (in units of
        # 2^-30 of the kept mass); on pass 0 need is set from the total first
        zero(hist, tx)
        zero(hmass, tx)
        qacc[0] = 0
        for it in range(iters):
            if it * NT + tx < V:
                z: T.let[T.float32] = ws[it * NT + tx]
                key: T.let[T.int64] = order_key(z)
                if key >= floor_key and matches(key, prefix[0], p):
                    q: T.let[T.int32] = T.Cast("int32", T.exp(z - m) * scale)
                    add(hist, digit(key, p), 1)
                    add(hmass, digit(key, p), q)
                    qacc[0] = qacc[0] + q
        sync()
        if p == 0:
            sum_i32(qacc, qsum, tx)
            need[0] = T.max(T.Cast("int32", T.ceil(T.Cast("float64", top_p) * T.Cast("float64", qsum[0]))), 1)
        find_bin(hmass, need[0], res, sbuf, own, incl, tx)
        prefix[0] = prefix[0] | (T.Cast("int64", res[0]) << T.int64(24 - 8 * p))
        need[0] = res[1]

    def kept(key, i, tau, id_cut):
        return T.Or(key > tau, T.And(key == tau, i <= id_cut))

    @T.prim_func(s_tir=True)
    def sample_token(logits_h: T.handle, params_h: T.handle, counts_h: T.handle, recent_h: T.handle,
               token_h: T.handle, ws_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        R = T.int64()
        logits = T.match_buffer(logits_h, (T.int64(1), V), "float32")
        params = T.match_buffer(params_h, (i64(PARAMS),), "float32")
        counts = T.match_buffer(counts_h, (T.int64(2), V), "int32")
        recent = T.match_buffer(recent_h, (R,), "int32")
        token = T.match_buffer(token_h, (T.int64(1),), "int32")
        ws = T.match_buffer(ws_h, (V,), "float32")
        for tx in threads(NT):
            with T.sblock("sample"):
                hist = T.sblock_alloc_buffer((bins,), "int32", scope=scope)
                hmass = T.sblock_alloc_buffer((bins,), "int32", scope=scope)
                sbuf = T.sblock_alloc_buffer((NT,), "int32", scope=scope)
                fbuf = T.sblock_alloc_buffer((NT,), "float64", scope=scope)
                res = T.sblock_alloc_buffer((2,), "int32", scope=scope)
                pick = T.sblock_alloc_buffer((1,), "int32", scope=scope)
                # per-thread values (every reduction has an output buffer of its own)
                fv = T.sblock_alloc_buffer((1,), "float32", scope="local")
                fo = T.sblock_alloc_buffer((1,), "float32", scope="local")
                fo2 = T.sblock_alloc_buffer((1,), "float32", scope="local")
                dv = T.sblock_alloc_buffer((1,), "float64", scope="local")
                dtmp = T.sblock_alloc_buffer((1,), "float64", scope="local")
                iv = T.sblock_alloc_buffer((1,), "int32", scope="local")
                io = T.sblock_alloc_buffer((1,), "int32", scope="local")
                io2 = T.sblock_alloc_buffer((1,), "int32", scope="local")
                io3 = T.sblock_alloc_buffer((1,), "int32", scope="local")
                io4 = T.sblock_alloc_buffer((1,), "int32", scope="local")
                io5 = T.sblock_alloc_buffer((1,), "int32", scope="local")
                own = T.sblock_alloc_buffer((1,), "int32", scope="local")
                incl = T.sblock_alloc_buffer((1,), "int32", scope="local")
                need = T.sblock_alloc_buffer((1,), "int32", scope="local")
                tau = T.sblock_alloc_buffer((1,), "int64", scope="local")
                tau_k = T.sblock_alloc_buffer((1,), "int64", scope="local")
                id_cut = T.sblock_alloc_buffer((1,), "int64", scope="local")
                cum = T.sblock_alloc_buffer((1,), "float64", scope="local")
                # the parameters in registers: a condition on a global load could be hoisted
                # out of the kernel into host code, which cannot read device memory
                pv = T.sblock_alloc_buffer((i64(PARAMS),), "float32", scope="local")
                for j in range(i64(PARAMS)):
                    pv[j] = params[j]
                temperature: T.let[T.float32] = pv[TEMPERATURE]
                rep: T.let[T.float32] = pv[REPETITION]
                # 1. penalties and temperature -> ws; max and its first index
                fv[0] = T.min_value("float32")
                iv[0] = T.Cast("int32", V)
                for it in range(iters):
                    if it * NT + tx < V:
                        i: T.let[T.int64] = it * NT + tx
                        x: T.let[T.float32] = logits[0, i]
                        x1: T.let[T.float32] = T.if_then_else(counts[0, i] > 0, T.if_then_else(x > 0, x / rep, x * rep), x)
                        x2: T.let[T.float32] = ((x1 - T.if_then_else(counts[1, i] > 0, pv[PRESENCE], T.float32(0)))
                                                - pv[FREQUENCY] * T.Cast("float32", counts[1, i]))
                        z: T.let[T.float32] = T.if_then_else(temperature > 0, x2 / temperature, x2)
                        ws[i] = z
                        if z > fv[0]:
                            fv[0] = z
                            iv[0] = T.Cast("int32", i)
                max_f32(fv, fo, tx)
                io[0] = T.if_then_else(fv[0] == fo[0], iv[0], T.Cast("int32", V))
                min_i32(io, io2, tx)
                if tx == 0:
                    pick[0] = io2[0]
                if pv[TEMPERATURE] > 0:
                    # 2. top-k floor: the k-th largest key (0 keeps everything)
                    tau_k[0] = T.int64(0)
                    need[0] = T.Cast("int32", pv[TOP_K])
                    if need[0] > 0 and T.Cast("int64", need[0]) < V:
                        count_pass(ws, hist, tau_k, need, res, sbuf, own, incl, tx, 0)
                        count_pass(ws, hist, tau_k, need, res, sbuf, own, incl, tx, 1)
                        count_pass(ws, hist, tau_k, need, res, sbuf, own, incl, tx, 2)
                        count_pass(ws, hist, tau_k, need, res, sbuf, own, incl, tx, 3)
                    # 3. softmax mass of the kept tokens
                    fv[0] = T.float32(0)
                    for it in range(iters):
                        if it * NT + tx < V:
                            if order_key(ws[it * NT + tx]) >= tau_k[0]:
                                fv[0] = fv[0] + T.exp(ws[it * NT + tx] - fo[0])
                    sum_f32(fv, fo2, tx)
                    # 4. top-p: the key where the mass reaches p, and the id of the last tie kept
                    tau[0] = tau_k[0]
                    id_cut[0] = V
                    if pv[TOP_P] < 1:
                        tau[0] = T.int64(0)
                        mass_pass(ws, hist, hmass, tau_k[0], fo[0], T.float32(_MASS_ONE) / fo2[0], pv[TOP_P],
                                  tau, need, res, sbuf, own, incl, iv, io3, tx, 0)
                        mass_pass(ws, hist, hmass, tau_k[0], fo[0], T.float32(_MASS_ONE) / fo2[0], pv[TOP_P],
                                  tau, need, res, sbuf, own, incl, iv, io3, tx, 1)
                        mass_pass(ws, hist, hmass, tau_k[0], fo[0], T.float32(_MASS_ONE) / fo2[0], pv[TOP_P],
                                  tau, need, res, sbuf, own, incl, iv, io3, tx, 2)
                        mass_pass(ws, hist, hmass, tau_k[0], fo[0], T.float32(_MASS_ONE) / fo2[0], pv[TOP_P],
                                  tau, need, res, sbuf, own, incl, iv, io3, tx, 3)
                        # ties at tau: each carries hmass / hist; keep the first ceil(need / q) by id
                        own[0] = hmass[T.Cast("int64", res[0])] // hist[T.Cast("int64", res[0])]
                        need[0] = T.min((need[0] + own[0] - 1) // own[0], hist[T.Cast("int64", res[0])])
                        iv[0] = 0
                        for j in range(chunk):
                            if tx * chunk + j < V:
                                iv[0] = iv[0] + T.Cast("int32", order_key(ws[tx * chunk + j]) == tau[0])
                        own[0] = iv[0]
                        sbuf[tx] = iv[0]
                        scan(sbuf, incl, tx)
                        incl[0] = sbuf[tx]
                        if incl[0] - own[0] < need[0] and need[0] <= incl[0]:
                            iv[0] = incl[0] - own[0]
                            for j in range(chunk):
                                if tx * chunk + j < V:
                                    if order_key(ws[tx * chunk + j]) == tau[0]:
                                        iv[0] = iv[0] + 1
                                        if iv[0] == need[0]:
                                            res[1] = T.Cast("int32", tx * chunk + j)
                        sync()
                        id_cut[0] = T.Cast("int64", res[1])
                    # 5. the draw: kept mass per contiguous chunk, scanned; the chunk where u * total
                    # falls walks its tokens
                    dv[0] = T.float64(0)
                    for j in range(chunk):
                        if tx * chunk + j < V:
                            if kept(order_key(ws[tx * chunk + j]), tx * chunk + j, tau[0], id_cut[0]):
                                dv[0] = dv[0] + T.Cast("float64", T.exp(ws[tx * chunk + j] - fo[0]))
                    fbuf[tx] = dv[0]
                    scan(fbuf, dtmp, tx)
                    cum[0] = fbuf[tx]
                    dtmp[0] = fbuf[NT - 1] * T.Cast("float64", pv[UNIFORM])  # the target
                    io[0] = T.if_then_else(cum[0] > dtmp[0] and dv[0] > 0, T.Cast("int32", tx), T.Cast("int32", NT))
                    min_i32(io, io4, tx)
                    iv[0] = T.if_then_else(dv[0] > 0, T.Cast("int32", tx), -1)
                    max_i32(iv, io5, tx)
                    if T.Cast("int32", tx) == T.if_then_else(io4[0] < T.Cast("int32", NT), io4[0], io5[0]):
                        cum[0] = T.if_then_else(tx > 0, fbuf[T.max(tx, T.int64(1)) - 1], T.float64(0))
                        iv[0] = -1  # first crossing
                        own[0] = -1  # last kept token of the chunk
                        for j in range(chunk):
                            if tx * chunk + j < V:
                                if kept(order_key(ws[tx * chunk + j]), tx * chunk + j, tau[0], id_cut[0]):
                                    cum[0] = cum[0] + T.Cast("float64", T.exp(ws[tx * chunk + j] - fo[0]))
                                    own[0] = T.Cast("int32", tx * chunk + j)
                                    if iv[0] < 0 and cum[0] > dtmp[0]:
                                        iv[0] = own[0]
                        pick[0] = T.if_then_else(iv[0] >= 0, iv[0], own[0])
                sync()
                if tx == 0:
                    # the token, and the penalty state after it
                    io[0] = pick[0]
                    token[0] = io[0]
                    counts[0, T.Cast("int64", io[0])] = counts[0, T.Cast("int64", io[0])] + 1
                    counts[1, T.Cast("int64", io[0])] = counts[1, T.Cast("int64", io[0])] + 1
                    if pv[WINDOW] > 0:
                        slot: T.let[T.int64] = 1 + T.Cast("int64", recent[0])
                        iv[0] = recent[slot]
                        if iv[0] >= 0:
                            counts[0, T.Cast("int64", iv[0])] = counts[0, T.Cast("int64", iv[0])] - 1
                        recent[slot] = io[0]
                        recent[0] = T.Cast("int32", T.truncmod(slot, R - 1))

    return sample_token
