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
from attention_reference import attention, rope_table
from kernel_harness import CUDA, MODE, build, cuda_source, tensor

from tsedge.tir_kernels import attention as attn
from tsedge.tir_kernels import decode_attention as dec
from tsedge.tir_kernels.common import is_gpu
from tsedge.tir_kernels.recycle import (PAD_SCORE, SCORE_CHUNKS, gated, make_query_mean, make_recycle_append,
                                        make_recycle_scores, make_recycle_store)
from tsedge.tir_kernels.selection_cache import STRIDE_STATE, make_selection_check
from tsedge.tir_kernels.topk import WORKSPACE_SIZE, make_topk

NUM_LAYERS, LAYER = 3, 1
GPU = MODE != "llvm"


def gated_topk(num_layers, k, heads, when, target):
    return gated(make_topk(num_layers, k, 0, target, heads=heads), num_layers, STRIDE_STATE, when, inputs=1)


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


@pytest.mark.parametrize("n_kv, k, length", [(1, 1, 1), (3, 17, 300), (8, 300, 1000), (2, 50, 50), (3, 9, 12),
                                             (8, 256, 30001)])  # GPU: 59 blocks per KV head
def test_topk_and_store_rebuild_the_partial_cache(n_kv, k, length):
    """The top K of pooled scores (many ties: lower positions first), sorted, with their scores."""
    rng = np.random.default_rng(k + length)
    crit = np.concatenate([rref.scores(rng.standard_normal((2 * n_kv, length)) * 4, n_kv, 7),
                           np.full((n_kv, 1), PAD_SCORE)], axis=1).astype(np.float32)
    state = gate_state(0)
    idx, ws = tensor(np.full((n_kv, k + 1), -1, np.int32)), tensor(np.zeros((n_kv, WORKSPACE_SIZE), np.int32))
    build(gated_topk, NUM_LAYERS, k + 1, n_kv, 0)(tensor(crit), tensor(state), LAYER, idx, ws)
    cache_idx = rng.integers(0, 99, (NUM_LAYERS, n_kv, k)).astype(np.int32)
    cache_score = rng.standard_normal((NUM_LAYERS, n_kv, k)).astype(np.float32)
    dev_idx, dev_score = tensor(cache_idx), tensor(cache_score)
    build(make_recycle_store, NUM_LAYERS, n_kv, k)(idx, tensor(crit), dev_idx, dev_score, LAYER)
    want_idx, want_score = rref.top_rows(crit[:, :length].astype(np.float64), k)
    assert (idx.numpy()[:, k] == length).all()  # the pad comes last and is dropped
    cache_idx[LAYER], cache_score[LAYER] = want_idx, want_score
    np.testing.assert_array_equal(dev_idx.numpy(), cache_idx)
    np.testing.assert_array_equal(dev_score.numpy(), cache_score)


@pytest.mark.parametrize("n_kv, k, steps", [(1, 1, 3), (3, 17, 5), (8, 300, 4), (2, 257, 3)])
def test_append_evicts_the_lowest_score(n_kv, k, steps):
    rng = np.random.default_rng(k)
    length = k + 40
    cache_idx = np.stack([np.stack([np.sort(rng.choice(length - 1, k, replace=False)) for _ in range(n_kv)])
                          for _ in range(NUM_LAYERS)]).astype(np.int32)
    cache_score = rng.integers(0, 4, (NUM_LAYERS, n_kv, k)).astype(np.float32) / 8  # ties: lower row leaves
    dev_idx, dev_score = tensor(cache_idx), tensor(cache_score)
    kernel = build(make_recycle_append, NUM_LAYERS, n_kv, k)
    for step in range(steps):
        rows = tensor(np.full((n_kv, k), -1, np.int32))
        kernel(dev_idx, dev_score, LAYER, length + step, rows)
        want_idx, want_score = cache_idx[LAYER].copy(), cache_score[LAYER].astype(np.float64)
        rref.append(want_idx, want_score, length + step)
        cache_idx[LAYER], cache_score[LAYER] = want_idx, want_score
        np.testing.assert_array_equal(dev_idx.numpy(), cache_idx)
        np.testing.assert_array_equal(dev_score.numpy(), cache_score)
        np.testing.assert_array_equal(rows.numpy(), want_idx)


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


@pytest.mark.skipif(MODE != "llvm", reason="codegen check runs where the compiler is")
def test_cuda_codegen():
    """Llama-3-8B heads: every recycled kernel builds for sm_90, the gated decode attention too."""
    funcs = [make_query_mean(32, 128, "float16", CUDA), make_recycle_scores(32, 8, 7, CUDA),
             make_recycle_store(4, 8, 1024, CUDA), make_recycle_append(4, 8, 1024, CUDA),
             gated_topk(4, 1025, 8, 0, CUDA), gated_attention(4, 32, 8, 128, "float16", 0, CUDA, logit_sets=32),
             gated_attention(4, 32, 8, 128, "float16", 1, CUDA, row_sets=8), gated_merge(32, 128, "float16", 1, CUDA),
             make_selection_check(4, 1, 128, 0.85, CUDA, stride=5)]
    for func in funcs:
        assert "__global__" in cuda_source(func)
