"""TokenSelect kernels (fingerprint, scoring, top-k, selection cache) vs the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import tokenselect_reference as ref
import tvm

from kernel_harness import CUDA, MODE, build, cuda_source, tensor

from tsedge.tir_kernels.key_codes import make_key_codes
from tsedge.tir_kernels.selection_cache import make_selection_check
from tsedge.tir_kernels.tokenselect_scoring import SCORE_BLOCKS, make_fingerprint, make_scoring
from tsedge.tir_kernels.topk import WORKSPACE_SIZE, make_topk
from tsedge.tir_kernels.window_rows import make_window_rows

NUM_LAYERS = 3
LAYER = 1


def poisoned(shape, dtype="float32") -> tvm.runtime.Tensor:
    fill = np.nan if dtype == "float32" else -7
    return tensor(np.full(shape, fill, dtype))


def random_kv(rng, n_kv, capacity, head_dim, dtype):
    return rng.standard_normal((NUM_LAYERS, 2, n_kv, capacity, head_dim)).astype(dtype)


def length_tensor(length: int) -> tvm.runtime.Tensor:
    return tensor(np.array([length], np.int32))


def run_scoring(qbar, kv, state, length, n_heads, n_init, n_local, pool, dtype, key_bits=16):
    """crit of the ``length - n_init - n_local`` candidates; the outputs are sized for the
    cache's capacity and the entries past the candidates must stay untouched. ``key_bits`` 8:
    the kernel scores the keys' int8 codes (made by the NumPy reference)."""
    n_kv, capacity, head_dim = kv.shape[2], kv.shape[3], kv.shape[4]
    f = build(make_scoring, NUM_LAYERS, n_heads, n_kv, head_dim, n_init, n_local, pool, dtype, key_bits=key_bits)
    c, size = length - n_init - n_local, capacity - n_init - n_local
    crit = poisoned((size,))
    keys = [tensor(kv)] if key_bits == 16 else [tensor(a) for a in ref.key_codes(kv[:, 0])]
    f(tensor(qbar), *keys, tensor(state), LAYER, length_tensor(length), crit, poisoned((n_heads, size)),
      poisoned((n_heads, SCORE_BLOCKS + 1, 2)))
    if MODE != "cuda-build":
        assert np.isnan(crit.numpy()[c:]).all()
    return crit.numpy()[:c]


TOPK_N_LOCAL = 5


def run_topk(crit, k, n_init, state, cache_idx, workspace=None):
    """Top-k of ``crit`` given in a longer buffer whose tail (past the length's candidates) holds
    larger values that must not be taken. The row list the kernel also writes must be sinks,
    the layer's (new or kept) selection and the window; its workspace (a zeroed state) must be
    left zeroed for the next call."""
    f = build(make_topk, NUM_LAYERS, k, n_init, n_local=TOPK_N_LOCAL)
    idx = tensor(cache_idx)
    padded = np.concatenate([crit, np.full(7, 1e30)]).astype(np.float32)
    length = len(crit) + n_init + TOPK_N_LOCAL
    ws = tensor(np.zeros(WORKSPACE_SIZE, np.int32)) if workspace is None else workspace
    rows = poisoned((n_init + k + TOPK_N_LOCAL,), "int32")
    f(tensor(padded), tensor(state), idx, ws, LAYER, length_tensor(length), rows)
    got = idx.numpy()
    if MODE != "cuda-build":
        want_rows = np.concatenate([np.arange(n_init), got[LAYER], np.arange(length - TOPK_N_LOCAL, length)])
        np.testing.assert_array_equal(rows.numpy(), want_rows)
        if MODE != "llvm":  # the GPU kernel's histograms (the CPU one zeroes its own each pass)
            assert not ws.numpy()[:4 * 256].any()
    return got


@pytest.mark.parametrize("n, n_heads, head_dim, dtype", [
    (1, 8, 64, "float16"), (7, 6, 128, "float32"), (33, 4, 128, "float16"), (300, 9, 64, "float16")])
def test_fingerprint(n, n_heads, head_dim, dtype):
    rng = np.random.default_rng(n)
    q = rng.standard_normal((n, n_heads, head_dim)).astype(dtype)
    n_local = 37
    rope = ref.rope_table(n_local + n + 3, head_dim)  # query i at n_local + i
    qbar = poisoned((n_heads, head_dim))
    build(make_fingerprint, n_heads, head_dim, n_local, dtype)(tensor(q), tensor(rope), qbar)
    np.testing.assert_allclose(qbar.numpy(), ref.fingerprint(q, rope, n_local), rtol=1e-5, atol=1e-5)


SCORING_CASES = [
    # n_heads, n_kv, head_dim, dtype, n_init, n_local, length, pool
    (4, 4, 64, "float32", 3, 5, 937, 0),     # group 1, ragged L
    (9, 3, 64, "float16", 4, 16, 1000, 3),   # group 3 (SmolLM2 heads), odd pool
    (8, 2, 128, "float16", 2, 8, 2057, 6),   # group 4, even pool (last entry -inf)
    (16, 2, 128, "float32", 1, 3, 300, 5),   # group 8
    (8, 1, 64, "float16", 5, 7, 13, 4),      # group 8, C = 1 < pool
    (8, 4, 128, "float16", 16, 64, 5001, 0),  # C not a multiple of any tile, many chunks
    (9, 3, 64, "float16", 128, 512, 20011, 6),  # SmolLM2 heads at 20K: several rows per CUDA lane
    (8, 2, 128, "float16", 128, 512, 70000, 0),  # Llama-3 heads at 70K tokens
    (9, 3, 64, "float16", 128, 512, 63488, 0),  # SmolLM2 heads at 62K (passkey cliff, see README)
]


@pytest.mark.parametrize("n_heads, n_kv, head_dim, dtype, n_init, n_local, length, pool", SCORING_CASES)
def test_scoring(n_heads, n_kv, head_dim, dtype, n_init, n_local, length, pool):
    rng = np.random.default_rng(length)
    kv = random_kv(rng, n_kv, length + 9, head_dim, dtype)
    qbar = (rng.standard_normal((n_heads, head_dim)) * 0.4).astype(np.float32)
    state = np.zeros((NUM_LAYERS, 4), np.int32)
    got = run_scoring(qbar, kv, state, length, n_heads, n_init, n_local, pool, dtype)
    want = ref.criticality(qbar.astype(np.float64), kv, LAYER, length, n_init, n_local, pool)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("n_heads, n_kv, head_dim, dtype, n_init, n_local, length, pool",
                         [SCORING_CASES[i] for i in (0, 1, 2, 4, 5, 7)])
def test_scoring_on_int8_key_codes(n_heads, n_kv, head_dim, dtype, n_init, n_local, length, pool):
    """--score-keys int8: the criticality of the codes' keys (``code · scale``); on the GPU the
    fingerprint is itself two int8 rows per head (within ~1e-4 of its value)."""
    rng = np.random.default_rng(length + 1)
    kv = random_kv(rng, n_kv, length + 9, head_dim, dtype)
    kv[:, 0] *= rng.uniform(0.05, 8, kv.shape[2:4])[..., None].astype(dtype)  # rows of unequal scale
    qbar = (rng.standard_normal((n_heads, head_dim)) * 0.4).astype(np.float32)
    got = run_scoring(qbar, kv, np.zeros((NUM_LAYERS, 4), np.int32), length, n_heads, n_init, n_local, pool,
                      dtype, key_bits=8)
    want = ref.criticality(qbar.astype(np.float64), ref.decoded_keys(kv), LAYER, length, n_init, n_local, pool)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-4 if MODE == "llvm" else 3e-3, atol=1e-7)


@pytest.mark.parametrize("n_kv, head_dim, dtype, length, n", [
    (3, 64, "float16", 37, 5), (8, 128, "float16", 1000, 1), (2, 128, "float32", 700, 513), (1, 64, "float32", 9, 9)])
def test_key_codes(n_kv, head_dim, dtype, length, n):
    """Rows ``[length - n, length)`` of the layer get the reference's codes and scales (a zero row:
    0 and 0); every other row and layer stays as it was."""
    rng = np.random.default_rng(n)
    capacity = length + 6
    kv = random_kv(rng, n_kv, capacity, head_dim, dtype)
    kv[:, 0] *= rng.uniform(0.01, 30, (NUM_LAYERS, n_kv, capacity))[..., None].astype(dtype)
    kv[LAYER, 0, 0, length - 1] = 0
    codes = tensor(np.full((NUM_LAYERS, n_kv, capacity, head_dim), 99, np.int8))
    scales = poisoned((NUM_LAYERS, n_kv, capacity))
    build(make_key_codes, NUM_LAYERS, n_kv, head_dim, dtype)(tensor(kv), codes, scales, LAYER,
                                                             length_tensor(length), n)
    if MODE == "cuda-build":
        return
    want_codes, want_scales = ref.key_codes(kv[LAYER, 0, :, length - n:length])
    got_codes, got_scales = codes.numpy(), scales.numpy()
    diff = np.abs(got_codes[LAYER, :, length - n:length].astype(int) - want_codes)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # a GPU's division may round the other way at .5
    np.testing.assert_allclose(got_scales[LAYER, :, length - n:length], want_scales, rtol=1e-6)
    assert got_scales[LAYER, 0, length - 1] == 0 and not got_codes[LAYER, 0, length - 1].any()
    untouched = np.ones(got_scales.shape, bool)
    untouched[LAYER, :, length - n:length] = False
    assert np.isnan(got_scales[untouched]).all() and (got_codes[untouched] == 99).all()


def test_scoring_skipped_on_hit():
    rng = np.random.default_rng(0)
    kv = random_kv(rng, 2, 600, 64, "float16")
    state = np.zeros((NUM_LAYERS, 4), np.int32)
    state[LAYER, 0] = 1
    crit = run_scoring(rng.standard_normal((4, 64)).astype(np.float32), kv, state, 600, 4, 4, 16, 3,
                       "float16")
    assert np.isnan(crit).all()


@pytest.mark.parametrize("c, k", [(300, 300), (301, 300), (5003, 64), (62_848, 2048), (100_000, 2048),
                                  (1_048_576, 2048)])
def test_topk_ties_and_order(c, k):
    rng = np.random.default_rng(c)
    crit = rng.integers(0, 40, c).astype(np.float32) / 7  # many exact ties
    crit[rng.integers(0, c, 3)] = -np.inf  # like the pooled tail
    state = np.zeros((NUM_LAYERS, 4), np.int32)
    cache_idx = np.full((NUM_LAYERS, k), -5, np.int32)
    got = run_topk(crit, k, 11, state, cache_idx)
    np.testing.assert_array_equal(got[LAYER], ref.topk_positions(crit, k, 11))
    assert (got[[0, 2]] == -5).all()


def test_topk_distinct_and_negative_values():
    rng = np.random.default_rng(3)
    crit = rng.standard_normal(4099).astype(np.float32)  # mixed signs: key order across zero
    state = np.zeros((NUM_LAYERS, 4), np.int32)
    got = run_topk(crit, 1000, 0, state, np.zeros((NUM_LAYERS, 1000), np.int32))
    np.testing.assert_array_equal(got[LAYER], ref.topk_positions(crit, 1000, 0))


def test_topk_workspace_reused_across_selections():
    """One workspace state for several selections in a row (as the layers of a step share it)."""
    rng = np.random.default_rng(11)
    state = np.zeros((NUM_LAYERS, 4), np.int32)
    ws = tensor(np.zeros(WORKSPACE_SIZE, np.int32))
    for c, k in [(5003, 64), (700, 300), (20_000, 2048)]:
        crit = rng.standard_normal(c).astype(np.float32)
        got = run_topk(crit, k, 3, state, np.zeros((NUM_LAYERS, k), np.int32), ws)
        if MODE != "cuda-build":  # (there the kernels are only built)
            np.testing.assert_array_equal(got[LAYER], ref.topk_positions(crit, k, 3))


def test_topk_keeps_cache_on_hit():
    state = np.zeros((NUM_LAYERS, 4), np.int32)
    state[LAYER, 0] = 1
    cache_idx = np.arange(NUM_LAYERS * 16, dtype=np.int32).reshape(NUM_LAYERS, 16)
    got = run_topk(np.random.default_rng(0).random(100), 16, 0, state, cache_idx)
    np.testing.assert_array_equal(got, cache_idx)


class CachedSelection:
    """check → score → top-k on the CPU kernels, with the state tensors kept on the device."""

    def __init__(self, n_heads, n_kv, head_dim, n_init, n_local, k, pool, theta, dtype):
        self.args = (n_heads, n_kv, head_dim, n_init, n_local, k, pool, dtype)
        self.fingerprint = build(make_fingerprint, n_heads, head_dim, n_local, dtype)
        self.check = build(make_selection_check, NUM_LAYERS, n_heads, head_dim, theta)
        self.cache_qbar = poisoned((NUM_LAYERS, n_heads, head_dim))
        self.cache_idx = tensor(np.full((NUM_LAYERS, k), -5, np.int32))
        self.state = tensor(np.zeros((NUM_LAYERS, 4), np.int32))

    def step(self, q, kv, rope, length, force_miss=False):
        n_heads, n_kv, head_dim, n_init, n_local, k, pool, dtype = self.args
        qbar = poisoned((n_heads, head_dim))
        self.fingerprint(tensor(q), tensor(rope), qbar)
        self.check(qbar, self.cache_qbar, self.state, LAYER, int(force_miss))
        state = self.state.numpy()
        crit = run_scoring(qbar.numpy(), kv, state, length, n_heads, n_init, n_local, pool, dtype)
        self.cache_idx = tensor(run_topk(crit, k, n_init, state, self.cache_idx.numpy()))
        return qbar.numpy(), crit, self.cache_idx.numpy()[LAYER], state[LAYER]


@pytest.mark.parametrize("n_heads, n_kv, head_dim, dtype, pool", [
    (12, 4, 64, "float16", 0), (8, 2, 128, "float32", 6)])
def test_whole_selection_and_cache(n_heads, n_kv, head_dim, dtype, pool):
    n_init, n_local, k, length = 4, 32, 64, 2000
    rng = np.random.default_rng(head_dim)
    kv = random_kv(rng, n_kv, length + 64, head_dim, dtype)
    rope = ref.rope_table(128, head_dim)
    sel = CachedSelection(n_heads, n_kv, head_dim, n_init, n_local, k, pool, 0.9, dtype)
    q = rng.standard_normal((5, n_heads, head_dim)).astype(dtype)

    # prefill chunk: forced miss, not counted
    qbar, crit, idx, state = sel.step(q, kv, rope, length, force_miss=True)
    want_qbar, want_crit, _ = ref.select(q, kv, rope, LAYER, length, n_init, n_local, k, pool)
    np.testing.assert_allclose(qbar, want_qbar, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(crit[np.isfinite(want_crit)], want_crit[np.isfinite(want_crit)],
                               rtol=2e-4, atol=1e-7)
    np.testing.assert_array_equal(idx, ref.topk_positions(crit, k, n_init))
    np.testing.assert_array_equal(state, [0, 1, 0, 0])

    # same queries, one more token: hit, the cached list is kept although the context grew
    kept = idx.copy()
    _, _, idx, state = sel.step(q, kv, rope, length + 1)
    np.testing.assert_array_equal(idx, kept)
    np.testing.assert_array_equal(state, [1, 1, 1, 1])

    # dissimilar queries: miss, re-selected over the new context
    q2 = rng.standard_normal((1, n_heads, head_dim)).astype(dtype)
    _, crit, idx, state = sel.step(q2, kv, rope, length + 2)
    _, _, want_idx = ref.select(q2, kv, rope, LAYER, length + 2, n_init, n_local, k, pool)
    np.testing.assert_array_equal(idx, ref.topk_positions(crit, k, n_init))
    assert len(np.intersect1d(idx, want_idx)) >= k - 2  # f32 vs f64 near-ties only
    np.testing.assert_array_equal(state, [0, 1, 1, 2])


def test_selection_check_matches_reference():
    rng = np.random.default_rng(7)
    n_heads, head_dim, theta = 6, 64, 0.95
    check = build(make_selection_check, NUM_LAYERS, n_heads, head_dim, theta)
    cache_qbar = rng.standard_normal((NUM_LAYERS, n_heads, head_dim)).astype(np.float32)
    state = np.zeros((NUM_LAYERS, 4), np.int32)
    dev_cache, dev_state = tensor(cache_qbar), tensor(state)
    base = rng.standard_normal((n_heads, head_dim)).astype(np.float32)
    for scale, noise, force in [(1, 0, 0), (1, 0, 0), (2, 0.1, 0), (1, 1.0, 0), (1, 0, 1), (1, 0, 0)]:
        qbar = (scale * base + noise * rng.standard_normal(base.shape)).astype(np.float32)
        check(tensor(qbar), dev_cache, dev_state, LAYER, force)
        ref.cache_check(qbar, cache_qbar, state, LAYER, theta, bool(force))
        np.testing.assert_array_equal(dev_state.numpy(), state)
        np.testing.assert_array_equal(dev_cache.numpy(), cache_qbar)


@pytest.mark.parametrize("n_heads, head_dim, dtype", [(32, 128, "float16"), (9, 64, "float32"), (6, 64, "float16")])
def test_fused_fingerprint_check(n_heads, head_dim, dtype):
    """The decode step's one-kernel fingerprint + check equals the two kernels it replaces."""
    rng = np.random.default_rng(n_heads)
    n_local, theta = 21, 0.9
    rope = ref.rope_table(n_local + 3, head_dim)
    fused = build(make_selection_check, NUM_LAYERS, n_heads, head_dim, theta, fingerprint=(n_local, dtype))
    cache_qbar = rng.standard_normal((NUM_LAYERS, n_heads, head_dim)).astype(np.float32)
    state = np.zeros((NUM_LAYERS, 4), np.int32)
    dev_cache, dev_state = tensor(cache_qbar), tensor(state)
    q = rng.standard_normal((1, n_heads + 3, head_dim)).astype(dtype)  # the K/V heads follow
    for noise, force in [(0, 0), (0, 0), (0.05, 0), (2.0, 0), (0, 1)]:
        q = (q + noise * rng.standard_normal(q.shape)).astype(dtype)
        qbar = poisoned((n_heads, head_dim))
        fused(tensor(q), tensor(rope), dev_cache, dev_state, LAYER, force, qbar)
        want = ref.fingerprint(q[:, :n_heads], rope, n_local)
        np.testing.assert_allclose(qbar.numpy(), want, rtol=1e-5, atol=1e-5)
        ref.cache_check(qbar.numpy(), cache_qbar, state, LAYER, theta, bool(force))
        np.testing.assert_array_equal(dev_state.numpy(), state)
        np.testing.assert_array_equal(dev_cache.numpy(), cache_qbar)
    assert state[LAYER, 2] >= 1 and state[LAYER, 3] - state[LAYER, 2] >= 1  # hits and misses both seen


@pytest.mark.skipif(MODE != "llvm", reason="codegen check runs where the compiler is")
@pytest.mark.parametrize("dtype, head_dim", [("float16", 128), ("float32", 64)])
def test_cuda_codegen(dtype, head_dim):
    funcs = [
        make_fingerprint(32, head_dim, 512, dtype, CUDA),
        make_scoring(4, 32, 8, head_dim, 128, 512, 6, dtype, CUDA),
        make_scoring(4, 24, 8, head_dim, 128, 512, 0, dtype, CUDA),
        make_topk(4, 2048, 128, CUDA),
        make_selection_check(4, 32, head_dim, 0.9, CUDA),
    ]
    for func, must_contain in zip(funcs, ["__global__", "__shfl", "__shfl", "atomicAdd", "__shfl"]):
        assert must_contain in cuda_source(func)
    # float16 caches with groups of at most 8 heads score on tensor cores (scoring_mma.py); int8 codes
    # on int8 tensor cores whatever the cache's dtype
    assert ("mma.sync.aligned.m16n8k16" in cuda_source(funcs[1])) == (dtype == "float16")
    assert "m16n8k32.row.col.s32.s8.s8.s32" in cuda_source(make_scoring(4, 32, 8, head_dim, 128, 512, 0, dtype, CUDA, 8))


@pytest.mark.parametrize("n_init, n_local, length", [(4, 6, 60), (16, 64, 209), (0, 5, 1000), (3, 300, 303)])
def test_window_rows_matches_numpy(n_init, n_local, length):
    rows = tensor(np.full(n_init + n_local, -7, np.int32))
    build(make_window_rows, n_init, n_local)(length_tensor(length), rows)
    np.testing.assert_array_equal(rows.numpy(), np.concatenate([np.arange(n_init), np.arange(length - n_local, length)]))


@pytest.mark.skipif(MODE != "llvm", reason="target checks run where the compiler is")
def test_scoring_refuses_unsupported_head_dims_in_one_line():
    import tvm

    with pytest.raises(ValueError, match="head_dim 64 or 128 .*use --policy dense or streaming"):
        make_scoring(NUM_LAYERS, 4, 2, 16, 4, 8, 0, "float32", tvm.target.Target("llvm"))


@pytest.mark.skipif(MODE != "llvm", reason="target checks run where the compiler is")
def test_int8_key_codes_refused_where_unsupported_in_one_line():
    """--score-keys int8 needs int8 tensor cores (CUDA sm_80+) or a CPU; other policies refuse it."""
    from tsedge.compile.targets import cuda_target, parse_target
    from tsedge.models.config import PolicyConfig

    for target in (parse_target("vulkan"), cuda_target("sm_75")):
        with pytest.raises(ValueError, match=r"needs a CPU \(llvm\) target or a CUDA GPU of sm_80 or newer.*use --score-keys exact"):
            make_scoring(NUM_LAYERS, 8, 2, 64, 4, 8, 0, "float16", target, key_bits=8)
    with pytest.raises(ValueError, match="use it with --policy tokenselect"):
        PolicyConfig("dense", score_keys="int8")
