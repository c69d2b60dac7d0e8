"""TidalDecode's kernels vs NumPy float64 (tests/tidaldecode_reference.py): attention over per-head
row lists at true positions, the dense pass's logits output, and the batched top-k with the
current token kept. Through kernel_harness, so the same tests run on a GPU where a kernel has one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tidaldecode_reference as tref
from attention_reference import rope_table
from kernel_harness import CUDA, DEV, MODE, build, cuda_source, tensor

from tsedge.models.config import PolicyConfig
from tsedge.tir_kernels import attention as attn
from tsedge.tir_kernels import decode_attention as dec
from tsedge.tir_kernels.topk import TOPK_BLOCKS, WORKSPACE_SIZE, _head_blocks, make_topk

NUM_LAYERS, LAYER = 3, 1
GPU = MODE != "llvm"  # cuda-build / cuda-run: one query per step runs decode_attention


def kernel(n_heads, n_kv, head_dim, dtype, n, **options):
    """The attention kernel a step of ``n`` queries runs with ``options`` and its chunk count."""
    if GPU:
        if n > 1:
            pytest.skip("GPU: TidalDecode's sparse steps are decode steps (one query)")
        return build(dec.make_decode_attention, NUM_LAYERS, n_heads, n_kv, head_dim, dtype, **options), dec.decode_splits
    return build(attn.make_attention_partial, NUM_LAYERS, n_heads, n_kv, head_dim, dtype, **options), attn.num_chunks


def inv_freq(head_dim: int) -> np.ndarray:
    return (1.0 / 5e5 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)


def random_case(seed, n_heads, n_kv, head_dim, dtype, n, capacity):
    rng = np.random.default_rng(seed)
    kv = rng.standard_normal((NUM_LAYERS, 2, n_kv, capacity, head_dim)).astype(dtype)
    qkv = rng.standard_normal((n, n_heads + 2 * n_kv, head_dim)).astype(dtype)
    return rng, kv, qkv


def run_partial(kernel_and_chunks, qkv, kv, table, rows, n, n_heads, head_dim, dtype, extra=()):
    kernel, num_chunks = kernel_and_chunks
    chunks = num_chunks(rows.shape[-1])
    o = tensor(np.full((n, chunks, n_heads, head_dim), np.nan, np.float32))
    lse = tensor(np.full((n, chunks, n_heads), np.nan, np.float32))
    out = tensor(np.full((n, n_heads, head_dim), np.nan, dtype))
    kernel(tensor(qkv), tensor(kv), tensor(table.astype(np.float32)), tensor(rows), LAYER, o, lse, *extra)
    build(attn.make_attention_merge, n_heads, head_dim, dtype)(o, lse, out)
    return out.numpy().astype(np.float64)


SPARSE_CASES = [
    # n_heads, n_kv, head_dim, dtype, per_kv_head, n (queries), M (rows per set), L (context)
    (4, 2, 64, "float32", False, 1, 1, 1),        # only the current token
    (9, 3, 64, "float32", False, 1, 77, 300),     # SmolLM2 heads, one ragged chunk
    (9, 3, 64, "float32", True, 1, 257, 1000),    # per KV head, a chunk plus one row
    (32, 8, 128, "float16", False, 1, 256, 4099), # Llama-3-8B heads, the default budget
    (16, 2, 128, "float32", True, 5, 300, 700),   # several queries: causal by true position
]


@pytest.mark.parametrize("n_heads, n_kv, head_dim, dtype, per_kv, n, m, length", SPARSE_CASES)
def test_attention_over_per_head_rows(n_heads, n_kv, head_dim, dtype, per_kv, n, m, length):
    rng, kv, qkv = random_case(m + length, n_heads, n_kv, head_dim, dtype, n, length + 5)
    sets = n_kv if per_kv else n_heads
    # each set: m - 1 distinct earlier rows (sorted) and the step's last row L - 1
    rows = np.stack([np.append(np.sort(rng.choice(length - 1, m - 1, replace=False)), length - 1)
                     for _ in range(sets)]).astype(np.int32)
    table = rope_table(inv_freq(head_dim), length + 5)
    got = run_partial(kernel(n_heads, n_kv, head_dim, dtype, n, row_sets=sets), qkv, kv, table, rows, n, n_heads, head_dim, dtype)
    want = tref.sparse_attention(qkv[:, :n_heads], kv[LAYER, 0], kv[LAYER, 1], rows, table)
    tol = 2e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_dense_rows_as_sets_equal_dense_attention():
    """Every set holding rows 0..L-1 is dense attention: the true positions are the row indices."""
    n_heads, n_kv, d, length = 8, 2, 64, 600
    _, kv, qkv = random_case(7, n_heads, n_kv, d, "float32", 1, length)
    table = rope_table(inv_freq(d), length)
    dense_rows = np.arange(length, dtype=np.int32)
    dense = run_partial(kernel(n_heads, n_kv, d, "float32", 1), qkv, kv, table, dense_rows, 1, n_heads, d, "float32")
    sets = run_partial(kernel(n_heads, n_kv, d, "float32", 1, row_sets=n_heads), qkv, kv, table, np.tile(dense_rows, (n_heads, 1)), 1, n_heads, d, "float32")
    np.testing.assert_allclose(sets, dense, rtol=1e-6, atol=1e-6)


LOGIT_CASES = [
    # n_heads, n_kv, head_dim, dtype, per_kv_head, n (queries), L
    (4, 2, 64, "float32", False, 1, 1),
    (9, 3, 64, "float32", False, 1, 513),
    (9, 3, 64, "float32", True, 1, 300),
    (32, 8, 128, "float16", True, 1, 1000),
    (8, 2, 64, "float32", False, 3, 259),         # a prefill chunk: the last query's logits
]


@pytest.mark.parametrize("n_heads, n_kv, head_dim, dtype, per_kv, n, length", LOGIT_CASES)
def test_dense_attention_writes_logits(n_heads, n_kv, head_dim, dtype, per_kv, n, length):
    _, kv, qkv = random_case(length * 3 + n, n_heads, n_kv, head_dim, dtype, n, length + 3)
    sets = n_kv if per_kv else n_heads
    table = rope_table(inv_freq(head_dim), length + 3)
    rows = np.arange(length, dtype=np.int32)
    logits = tensor(np.full((sets, length), np.nan, np.float32))
    got = run_partial(kernel(n_heads, n_kv, head_dim, dtype, n, logit_sets=sets), qkv, kv, table, rows, n, n_heads, head_dim, dtype, (logits,))
    keys = kv[LAYER, 0, :, :length]
    tol = 2e-3 if dtype == "float16" else 1e-5
    from attention_reference import attention

    np.testing.assert_allclose(got, attention(qkv[:, :n_heads], keys, kv[LAYER, 1, :, :length], table),
                               rtol=tol, atol=tol)
    want = tref.set_logits(tref.logits(qkv[:, :n_heads], keys, table), sets)
    np.testing.assert_allclose(logits.numpy() / math.log2(math.e), want, rtol=tol, atol=tol * 10)


TOPK_CASES = [
    # sets, budget, L
    (1, 1, 1),        # the current token only
    (2, 1, 300),      # a budget of one: the current token, nothing selected
    (4, 5, 5),        # the whole context
    (32, 256, 4099),  # GPU: 9 blocks per head
    (3, 100, 257),    # one block per head
    (8, 257, 131072), # Recycled Attention on Llama-3-8B at 128K: 128 blocks per head
    (32, 256, 70001), # TidalDecode per query head: 32 blocks per head, a ragged last one
    (3, 2048, 9001),  # 18 blocks per head, a budget of several blocks' worth
    (2, 4097, 4097),  # the whole context over 8 blocks
    (5, 600, 1026),   # 3 blocks per head, the last one shorter
]


def topk_scores(sets: int, length: int, seed: int) -> np.ndarray:
    """``[sets, length]`` float32, no zeros: random normal rows, and ties across blocks: row 0 of
    few distinct values (the k-th largest tied many times), row 1 one value throughout (the first
    positions win), row 2 (where there is one) normal but for a tied first half; the current
    token's logit lowest (it is kept whatever its logit)."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((sets, length)).astype(np.float32)
    scores[0] = (rng.integers(-4, 4, length) + 0.5) / 4
    if sets > 1:
        scores[1] = 0.75
    if sets > 2:
        scores[2, : length // 2] = 0.5
    scores[:, -1] = -1e30
    return scores


@pytest.mark.parametrize("sets, budget, length", TOPK_CASES)
def test_topk_per_head_keeps_current_token(sets, budget, length):
    scores = topk_scores(sets, length, length + budget)
    idx = tensor(np.full((sets, budget), -1, np.int32))
    ws = tensor(np.random.default_rng(sets).integers(-9, 9, (sets, WORKSPACE_SIZE)).astype(np.int32))
    build(make_topk, NUM_LAYERS, budget, 0, heads=sets)(tensor(scores), idx, ws)
    np.testing.assert_array_equal(idx.numpy(), tref.select(scores.astype(np.float64), budget))


@pytest.mark.skipif(MODE != "llvm", reason="codegen check runs where the compiler is")
@pytest.mark.parametrize("sets, budget", [(8, 257), (32, 256), (3, 1)])
def test_topk_per_head_compiles_for_sm90(sets, budget):
    """The per-head top-k builds for sm_90 with nvcc: a clear, 4 histogram passes, a count pass and
    the compaction, every head's scan over blocks of its own (head = blockIdx.y); a budget of one
    only writes the current token."""
    source = cuda_source(make_topk(NUM_LAYERS, budget, 0, CUDA, heads=sets))
    kernels = source.count("__global__") // 2  # declared, then defined
    if budget == 1:
        assert kernels == 1 and "crit_ptr" not in source
        return
    assert kernels == 7
    assert source.count("(((int64_t)blockIdx.y) * L)") >= 5  # the passes read their head's row
    assert "atomic_add" in source


@pytest.mark.skipif(MODE != "llvm", reason="compiler-side check (simplifier)")
@pytest.mark.parametrize("sets, candidates, blocks", [
    (8, 131071, 128), (32, 131071, 32), (1, 10**6, TOPK_BLOCKS), (8, 4098, 9), (8, 512, 1), (3, 1, 1)])
def test_topk_per_head_grid(sets, candidates, blocks):
    """Blocks per head: about 1024 for all heads together, at most TOPK_BLOCKS (the workspace's
    per-block counts), at least 512 candidates each but one block at the least."""
    from tvm import tirx
    from tvm.sym import Analyzer

    got = Analyzer().simplify(_head_blocks(sets, tirx.IntImm("int64", candidates)))
    assert int(got) == blocks


def test_policy_settings_checked_in_one_line():
    assert PolicyConfig("tidaldecode").budget == 256
    assert PolicyConfig("tidaldecode", tidal_reselect_layers=[8, 13]).tidal_reselect_layers == (8, 13)
    for bad, match in [(dict(tidal_budget=0), "tidal_budget=0"),
                       (dict(tidal_select_layer=5, tidal_reselect_layers=(3,)), "increasing"),
                       (dict(tidal_reselect_layers=(8, 8)), "increasing")]:
        with pytest.raises(ValueError, match=match) as err:
            PolicyConfig("tidaldecode", **bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="layer 13 does not exist in a 2-layer model"):
        PolicyConfig("tidaldecode").check_layers(2)
    PolicyConfig("tidaldecode", chunk_size=4096, n_local=8)  # no local window: no chunk limit


@pytest.mark.skipif(MODE != "llvm", reason="codegen check runs where the compiler is")
@pytest.mark.parametrize("options", [dict(row_sets=32), dict(row_sets=8), dict(logit_sets=32), dict(logit_sets=8)])
def test_decode_attention_options_compile_for_sm90(options):
    """Llama-3-8B heads: the per-set and logits variants of the CUDA decode kernel build (the
    dense variant's CUDA source is the same as before the options: checked when they were added)."""
    source = cuda_source(dec.make_decode_attention(2, 32, 8, 128, "float16", CUDA, **options))
    assert "cp.async.cg.shared.global" in source


def test_set_counts_checked_in_one_line():
    with pytest.raises(ValueError, match="row_sets=3: use 0, n_heads=8 or n_kv=2"):
        attn.check_sets(8, 2, 3, 0)
    with pytest.raises(ValueError, match="exclusive"):
        attn.check_sets(8, 2, 8, 2)
