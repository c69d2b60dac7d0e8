"""Recycled Attention's kernels vs NumPy float64 (tests/recycled_reference.py) on random data:
the mean query, the pooled per-KV-head scores, top-K and store, evict-and-append, the gate that
runs a kernel on one kind of step only, and the refresh check (TokenSelect's selection check with
a stride). Through kernel_harness, so the same tests run on a GPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import recycled_reference as rref
import tidaldecode_reference as tref
import tvm
from attention_reference import attention, rope_table
from kernel_harness import CUDA, MODE, build, cuda_source, tensor

from tsedge.tir_kernels import attention as attn
from tsedge.tir_kernels import decode_attention as dec
from tsedge.tir_kernels.common import is_gpu
from tsedge.tir_kernels.recycle import (PAD_SCORE, SCORE_CHUNKS, gated, make_query_mean, make_recycle_append,
                                        make_recycle_k, make_recycle_scores, make_recycle_store)
from tsedge.tir_kernels.selection_cache import STRIDE_STATE, make_selection_check
from tsedge.tir_kernels.topk import WORKSPACE_SIZE, make_topk

NUM_LAYERS, LAYER = 3, 1
GPU = MODE != "llvm"


def gated_topk(num_layers, k, heads, when, target):
    return gated(make_topk(num_layers, k, 0, target, heads=heads, counted=True), num_layers, STRIDE_STATE, when,
                 inputs=2)


def gated_attention(num_layers, n_heads, n_kv, head_dim, dtype, when, target, **options):
    make = dec.make_decode_attention if is_gpu(target) else attn.make_attention_partial
    return gated(make(num_layers, n_heads, n_kv, head_dim, dtype, target, **options), num_layers, STRIDE_STATE, when)


def gated_merge(n_heads, head_dim, dtype, when, target):
    return gated(attn.make_attention_merge(n_heads, head_dim, dtype, target), NUM_LAYERS, STRIDE_STATE, when, inputs=2)


def gate_state(kind: int) -> np.ndarray:
    """A state whose layer ``LAYER`` is at step kind ``kind`` (0 full, 1 partial), the others not."""
    state = np.random.default_rng(kind).integers(0, 9, (NUM_LAYERS, STRIDE_STATE)).astype(np.int32)
    state[:, 0] = 1 - kind
    state[LAYER, 0] = kind
    return state


@pytest.mark.parametrize("n, n_heads, extra_heads, head_dim, dtype", [
    (1, 9, 6, 64, "float32"), (5, 32, 16, 128, "float16"), (3, 4, 0, 16, "float32")])
def test_query_mean(n, n_heads, extra_heads, head_dim, dtype):
    q = np.random.default_rng(n).standard_normal((n, n_heads + extra_heads, head_dim)).astype(dtype)
    out = tensor(np.full((1, head_dim), np.nan, np.float32))
    build(make_query_mean, n_heads, head_dim, dtype)(tensor(q), out)
    tol = 1e-3 if dtype == "float16" else 1e-6
    np.testing.assert_allclose(out.numpy()[0], rref.query_mean(q[:, :n_heads]), rtol=tol, atol=tol)


@pytest.mark.parametrize("n_heads, n_kv, length, pool", [
    (4, 2, 1, 7), (9, 3, 300, 7), (32, 8, 1000, 7), (16, 2, 7, 3), (6, 6, 257, 1),
    (32, 8, 131072, 7), (8, 2, 64 * 256 + 3, 7)])  # GPU: 64 chunks a head of 2,048 / 259 logits (ragged)
def test_scores_are_pooled_group_max_probabilities(n_heads, n_kv, length, pool):
    logits = np.random.default_rng(length).standard_normal((n_heads, length)) * 3
    crit = tensor(np.full((n_kv, length + 1), np.nan, np.float32))
    stats = tensor(np.full((n_heads, SCORE_CHUNKS + 1, 2), np.nan, np.float32))
    build(make_recycle_scores, n_heads, n_kv, pool)(tensor((logits * math.log2(math.e)).astype(np.float32)), crit,
                                                    stats)
    got = crit.numpy()
    rtol = 1e-5 if length < 10_000 else 5e-4  # float32 sums of up to 128K exponentials (the CPU's serial)
    np.testing.assert_allclose(got[:, :length], rref.scores(logits, n_kv, pool), rtol=rtol, atol=1e-9)
    assert (got[:, length] == PAD_SCORE).all()


def active(k_active: int) -> tvm.runtime.Tensor:
    """The device tensor recycle_k[1] int32 holding the active K."""
    return tensor(np.array([k_active], np.int32))


# n_kv, K_max (slots), K_active, L (context): ragged K_active < K_max, K_active = K_max, K_active = 1
TOPK_CASES = [(1, 1, 1, 1), (3, 17, 17, 300), (3, 17, 5, 300), (8, 300, 300, 1000), (8, 300, 1, 1000),
              (2, 50, 50, 50), (2, 64, 20, 50), (3, 9, 9, 12), (8, 4096, 256, 2049), (8, 256, 256, 30001),
              (8, 2048, 1000, 30001)]  # GPU: 59 blocks per KV head


@pytest.mark.parametrize("n_kv, k_max, k_active, length", TOPK_CASES)
def test_topk_and_store_rebuild_the_active_partial_cache(n_kv, k_max, k_active, length):
    """The top K_active of pooled scores (many ties: lower positions first), sorted, with their
    scores, in the first K_active slots; the pad after them; the other slots untouched."""
    rng = np.random.default_rng(k_max + k_active + length)
    crit = np.concatenate([rref.scores(rng.standard_normal((2 * n_kv, length)) * 4, n_kv, 7),
                           np.full((n_kv, 1), PAD_SCORE)], axis=1).astype(np.float32)
    state = gate_state(0)
    idx, ws = tensor(np.full((n_kv, k_max + 1), -1, np.int32)), tensor(np.zeros((n_kv, WORKSPACE_SIZE), np.int32))
    build(gated_topk, NUM_LAYERS, k_max + 1, n_kv, 0)(tensor(crit), active(k_active), tensor(state), LAYER, idx, ws)
    cache_idx = rng.integers(0, 99, (NUM_LAYERS, n_kv, k_max)).astype(np.int32)
    cache_score = rng.standard_normal((NUM_LAYERS, n_kv, k_max)).astype(np.float32)
    dev_idx, dev_score = tensor(cache_idx), tensor(cache_score)
    build(make_recycle_store, NUM_LAYERS, n_kv, k_max)(idx, tensor(crit), dev_idx, dev_score, active(k_active), LAYER)
    want_idx, want_score = rref.top_rows(crit[:, :length].astype(np.float64), k_active)
    got = idx.numpy()
    np.testing.assert_array_equal(got[:, :k_active], want_idx)
    assert (got[:, k_active] == length).all()  # the pad comes last and is dropped
    assert (got[:, k_active + 1:] == -1).all()  # not written
    cache_idx[LAYER, :, :k_active], cache_score[LAYER, :, :k_active] = want_idx, want_score
    np.testing.assert_array_equal(dev_idx.numpy(), cache_idx)
    np.testing.assert_array_equal(dev_score.numpy(), cache_score)


@pytest.mark.parametrize("n_kv, k_max, k_active, steps", [(1, 1, 1, 3), (3, 17, 17, 5), (3, 17, 6, 5), (8, 300, 300, 4),
                                                           (8, 300, 1, 3), (2, 257, 257, 3), (2, 600, 257, 3)])
def test_append_evicts_the_lowest_active_score(n_kv, k_max, k_active, steps):
    """Among the first K_active slots only; the others and rows' columns past K_active untouched."""
    rng = np.random.default_rng(k_max + k_active)
    length = k_max + 40
    cache_idx = np.stack([np.stack([np.sort(rng.choice(length - 1, k_max, replace=False)) for _ in range(n_kv)])
                          for _ in range(NUM_LAYERS)]).astype(np.int32)
    cache_score = rng.integers(0, 4, (NUM_LAYERS, n_kv, k_max)).astype(np.float32) / 8  # ties: lower row leaves
    cache_score[LAYER, :, k_active:] = -1  # below every active score: would leave first if read
    dev_idx, dev_score = tensor(cache_idx), tensor(cache_score)
    kernel = build(make_recycle_append, NUM_LAYERS, n_kv, k_max)
    for step in range(steps):
        rows = tensor(np.full((n_kv, k_max), -1, np.int32))
        kernel(dev_idx, dev_score, active(k_active), LAYER, length + step, rows)
        want_idx = cache_idx[LAYER, :, :k_active].copy()
        want_score = cache_score[LAYER, :, :k_active].astype(np.float64)
        rref.append(want_idx, want_score, length + step)
        cache_idx[LAYER, :, :k_active], cache_score[LAYER, :, :k_active] = want_idx, want_score
        np.testing.assert_array_equal(dev_idx.numpy(), cache_idx)
        np.testing.assert_array_equal(dev_score.numpy(), cache_score)
        np.testing.assert_array_equal(rows.numpy()[:, :k_active], want_idx)
        assert (rows.numpy()[:, k_active:] == -1).all()


@pytest.mark.parametrize("recycle_k, max_context, k_min", [("1/8", 32768, 1), ("1/8", 100, 1), ("3/7", 50, 1),
                                                           ("1/1", 9, 1), (256, 4096, 1), ("1/8", 32768, 256),
                                                           ("1/8", 100, 20)])
def test_recycle_k_sets_the_active_k(recycle_k, max_context, k_min):
    """A prefill sets K = clamp(round(fraction * L), k_min, K_max) (halves up), or the count; a
    decode step only where it is 0 (unset)."""
    fraction = None if isinstance(recycle_k, int) else tuple(map(int, recycle_k.split("/")))
    k_max = rref.capacity(recycle_k, max_context, k_min)
    kernel = build(make_recycle_k, fraction, k_max, k_min=k_min)
    lengths = sorted({1, 2, 3, 4, 5, 12, 20, 21, max_context // 2, max_context - 1, max_context} - {0})
    for length in lengths:
        want = rref.active_k(recycle_k, length, max_context, k_min)
        for before, force in [(0, 0), (0, 1), (7, 1), (7, 0)]:
            count = active(before)
            kernel(tensor(np.array([length], np.int32)), count, force)
            assert count.numpy()[0] == (before if before and not force else want), (length, before, force)
    if fraction is not None:  # a full cache's K fits K_max: never clamped
        assert math.floor(fraction[0] * max_context / fraction[1] + 0.5) <= k_max


# n_heads, n_kv, head_dim, dtype, K_max (slots), K_active, L (context)
COUNTED_CASES = [(4, 2, 64, "float32", 8, 1, 20), (9, 3, 64, "float32", 300, 77, 400),
                 (9, 3, 64, "float32", 257, 257, 1000), (32, 8, 128, "float16", 4096, 300, 5000),
                 (32, 8, 128, "float16", 512, 511, 2000)]


@pytest.mark.parametrize("n_heads, n_kv, head_dim, dtype, k_max, k_active, length", COUNTED_CASES)
def test_partial_attention_reads_the_active_rows(n_heads, n_kv, head_dim, dtype, k_max, k_active, length):
    """Per KV head the first K_active rows of rows[Hkv, K_max] (any order, the step's token last)
    at their true positions; the slots after them hold other valid rows, which must not count."""
    rng = np.random.default_rng(k_max + k_active)
    kv = rng.standard_normal((NUM_LAYERS, 2, n_kv, length, head_dim)).astype(dtype)
    qkv = rng.standard_normal((1, n_heads + 2 * n_kv, head_dim)).astype(dtype)
    table = rope_table((1.0 / 5e5 ** (np.arange(0, head_dim, 2) / head_dim)), length)
    rows = rng.integers(0, length - 1, (n_kv, k_max)).astype(np.int32)
    for g in range(n_kv):
        rows[g, :k_active - 1] = rng.permutation(rng.choice(length - 1, k_active - 1, replace=False))
        rows[g, k_active - 1] = length - 1
    make = dec.make_decode_attention if GPU else attn.make_attention_partial
    chunks = (dec.decode_splits if GPU else attn.num_chunks)(k_max)
    o = tensor(np.full((1, chunks, n_heads, head_dim), np.nan, np.float32))
    lse = tensor(np.full((1, chunks, n_heads), np.nan, np.float32))
    out = tensor(np.full((1, n_heads, head_dim), np.nan, dtype))
    build(make, NUM_LAYERS, n_heads, n_kv, head_dim, dtype, row_sets=n_kv, counted=True)(
        tensor(qkv), tensor(kv), tensor(table.astype(np.float32)), tensor(rows), active(k_active), LAYER, o, lse)
    build(attn.make_attention_merge, n_heads, head_dim, dtype)(o, lse, out)
    want = tref.sparse_attention(qkv[:, :n_heads], kv[LAYER, 0], kv[LAYER, 1], rows[:, :k_active], table)
    tol = 2e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(out.numpy().astype(np.float64), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("n_heads, n_kv, head_dim, dtype, length", [(9, 3, 64, "float32", 300),
                                                                    (32, 8, 128, "float16", 1000)])
def test_gate_runs_a_kernel_on_one_kind_of_step(n_heads, n_kv, head_dim, dtype, length):
    """Open: the kernel's results (attention, logits); closed: its outputs untouched."""
    rng = np.random.default_rng(length)
    kv = rng.standard_normal((NUM_LAYERS, 2, n_kv, length, head_dim)).astype(dtype)
    qkv = rng.standard_normal((1, n_heads + 2 * n_kv, head_dim)).astype(dtype)
    table = rope_table((1.0 / 1e4 ** (np.arange(0, head_dim, 2) / head_dim)), length)
    chunks = (dec.decode_splits if GPU else attn.num_chunks)(length)
    kernel = build(gated_attention, NUM_LAYERS, n_heads, n_kv, head_dim, dtype, 0, logit_sets=n_heads)
    merge = build(gated_merge, n_heads, head_dim, dtype, 0)
    for kind in (0, 1):
        o = tensor(np.full((1, chunks, n_heads, head_dim), np.nan, np.float32))
        lse = tensor(np.full((1, chunks, n_heads), np.nan, np.float32))
        logits = tensor(np.full((n_heads, length), np.nan, np.float32))
        out = tensor(np.full((1, n_heads, head_dim), np.nan, dtype))
        state = tensor(gate_state(kind))
        kernel(tensor(qkv), tensor(kv), tensor(table.astype(np.float32)), tensor(np.arange(length, dtype=np.int32)),
               LAYER, state, o, lse, logits)
        merge(o, lse, state, LAYER, out)
        if kind == 1:
            assert np.isnan(o.numpy()).all() and np.isnan(logits.numpy()).all() and np.isnan(out.numpy()).all()
            continue
        tol = 2e-3 if dtype == "float16" else 1e-5
        want = attention(qkv[:, :n_heads], kv[LAYER, 0], kv[LAYER, 1], table)
        np.testing.assert_allclose(out.numpy().astype(np.float64), want, rtol=tol, atol=tol)
        np.testing.assert_allclose(logits.numpy() / math.log2(math.e), tref.logits(qkv[:, :n_heads], kv[LAYER, 0], table),
                                   rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("threshold, stride", [(0.9, 3), (None, 2), (-1.0, 1)])
def test_refresh_check_matches_reference(threshold, stride):
    rng = np.random.default_rng(stride)
    head_dim = 64
    check = build(make_selection_check, NUM_LAYERS, 1, head_dim, threshold, stride=stride)
    cache_qbar = rng.standard_normal((NUM_LAYERS, 1, head_dim)).astype(np.float32)
    state = np.zeros((NUM_LAYERS, STRIDE_STATE), np.int32)
    dev_cache, dev_state = tensor(cache_qbar), tensor(state)
    base = rng.standard_normal(head_dim)
    steps = [(0, 1)] + [(noise, 0) for noise in (0, 0.1, 1.5, 0, 0.2, 3, 0, 0)] + [(0, 1), (0.05, 0), (2, 0)]
    for noise, force in steps:
        qmean = (base + noise * rng.standard_normal(head_dim)).astype(np.float32)
        check(tensor(qmean[None]), dev_cache, dev_state, LAYER, force)
        rref.refresh_check(qmean, cache_qbar[LAYER, 0], state[LAYER], threshold, stride, bool(force))
        np.testing.assert_array_equal(dev_state.numpy(), state)
        np.testing.assert_array_equal(dev_cache.numpy(), cache_qbar)
    assert 0 < state[LAYER, 2] < state[LAYER, 3] or threshold == -1.0  # partial and full steps both ran


@pytest.mark.skipif(MODE != "llvm", reason="target checks run where the compiler is")
def test_settings_checked_in_one_line():
    with pytest.raises(ValueError, match="must be odd") as err:
        make_recycle_scores(8, 2, 6, CUDA)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="needs stride >= 1"):
        make_selection_check(2, 1, 64, None, CUDA)
    with pytest.raises(ValueError, match="no `layer` argument"):
        gated(make_recycle_scores(8, 2, 7, CUDA), 2, STRIDE_STATE, 0)
    for make in (lambda: make_topk(2, 9, 0, CUDA, counted=True),
                 lambda: dec.make_decode_attention(2, 8, 2, 64, "float16", CUDA, counted=True),
                 lambda: attn.make_attention_partial(2, 8, 2, 64, "float32", tvm.target.Target("llvm"), counted=True)):
        with pytest.raises(ValueError, match="counted is an option of") as err:
            make()
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="need 1 <= k_min <= k_max"):
        make_recycle_k((1, 8), 0, CUDA)
    with pytest.raises(ValueError, match="need 1 <= k_min <= k_max"):
        make_recycle_k((1, 8), 100, CUDA, k_min=256)


@pytest.mark.skipif(MODE != "llvm", reason="codegen check runs where the compiler is")
def test_cuda_codegen():
    """Llama-3-8B heads: every recycled kernel builds for sm_90, the gated decode attention too."""
    funcs = [make_query_mean(32, 128, "float16", CUDA), make_recycle_scores(32, 8, 7, CUDA),
             make_recycle_store(4, 8, 1024, CUDA), make_recycle_append(4, 8, 1024, CUDA),
             gated_topk(4, 1025, 8, 0, CUDA), gated_attention(4, 32, 8, 128, "float16", 0, CUDA, logit_sets=32),
             gated_attention(4, 32, 8, 128, "float16", 1, CUDA, row_sets=8, counted=True),
             gated_merge(32, 128, "float16", 1, CUDA), make_selection_check(4, 1, 128, 0.85, CUDA, stride=5),
             make_recycle_k((1, 8), 4096, CUDA), make_recycle_k(None, 256, CUDA)]
    for func in funcs:
        assert "__global__" in cuda_source(func)
