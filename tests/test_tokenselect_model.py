"""TokenSelect and StreamingLLM in the whole compiled model: SmolLM2-135M on the CPU.

Small budgets (16 sinks, 128 selected, 64 local, chunks of 64) so that a few hundred tokens go
through ``prefill_select``/``decode_select``. Checks: exactly dense within the budget; beyond it,
equal to a NumPy float64 model running the reference semantics (tests/tokenselect_reference.py)
and close to dense; selection-cache counters; the row-list kernel.
"""

from __future__ import annotations

import attention_reference as aref
import numpy as np
import pydoc_data.topics
import pytest
import tokenselect_reference as tref
from kernel_harness import CUDA, cuda_source

from tsedge.compile.build import compile_library
from tsedge.compile.targets import parse_target
from tsedge.engine import Engine
from tsedge.eval.agreement import agreement, forced_logits, greedy
from tsedge.models.config import PolicyConfig
from tsedge.tir_kernels.window_rows import make_window_rows
from tsedge.weights import ModelSource

BUDGETS = dict(n_init=16, n_local=64, top_k=128, chunk_size=64)
MAX_CONTEXT = 1024
TEXT = pydoc_data.topics.topics["execmodel"]  # natural English prose, ships with CPython


@pytest.fixture(scope="module")
def source(smol_source) -> ModelSource:
    return smol_source


@pytest.fixture(scope="module")
def text_ids(source) -> list[int]:
    return source.tokenizer.encode(TEXT)


@pytest.fixture(scope="module")
def engines(source, tmp_path_factory):
    """``engines(**policy)``: an Engine (reset) on a library compiled once per policy."""
    built: dict[tuple, Engine] = {}

    def get(**policy) -> Engine:
        key = tuple(sorted(policy.items()))
        if key not in built:
            path = tmp_path_factory.mktemp("lib") / "model.so"
            compile_library(source.config, PolicyConfig(**policy), parse_target("llvm"), "float32",
                            MAX_CONTEXT, path)
            built[key] = Engine(path, source, prefill_chunk=BUDGETS["chunk_size"])
        built[key].reset()
        return built[key]

    return get


def dense(engines) -> Engine:
    return engines(name="dense")


def tokenselect(engines, **overrides) -> Engine:
    return engines(**{"name": "tokenselect", **BUDGETS, **overrides})


def tokenselect_int8(engines) -> Engine:
    return tokenselect(engines, score_keys="int8")


def streaming(engines) -> Engine:
    return engines(**{"name": "streaming", **BUDGETS, "top_k": 0})


class ReferenceModel:
    """SmolLM2 in NumPy float64 with the policy's semantics (prefill in chunks, then decode)."""

    def __init__(self, source: ModelSource, policy: PolicyConfig, capacity: int) -> None:
        cfg = self.cfg = source.config
        self.policy = policy
        self.w = {name: a.astype(np.float64) for name, a in source.tensors(blocks=False)}
        self.table = aref.rope_table(cfg.inv_freq(), capacity)
        self.kv = np.zeros((cfg.num_layers, 2, cfg.num_kv_heads, capacity, cfg.head_dim))
        self.cache_qbar = np.zeros((cfg.num_layers, cfg.num_heads, cfg.head_dim), np.float32)
        self.cache_idx = np.zeros((cfg.num_layers, policy.top_k), np.int32)
        self.state = np.zeros((cfg.num_layers, 4), np.int32)
        self.past = 0

    def rows(self, layer: int, q: np.ndarray, length: int, decode: bool) -> np.ndarray:
        p = self.policy
        if length <= p.budget:
            return np.arange(length)
        if p.name == "tokenselect":
            qbar = tref.fingerprint(q, self.table.astype(np.float32), p.n_local).astype(np.float32)
            if not tref.cache_check(qbar, self.cache_qbar, self.state, layer,
                                    p.selection_threshold, force_miss=not decode):
                kv = tref.decoded_keys(self.kv[layer:layer + 1]) if p.score_keys == "int8" else self.kv[layer:layer + 1]
                crit = tref.criticality(qbar.astype(np.float64), kv, 0, length, p.n_init, p.n_local, p.pool_kernel)
                self.cache_idx[layer] = tref.topk_positions(crit, p.top_k, p.n_init)
        return np.concatenate([np.arange(p.n_init), self.cache_idx[layer],
                               np.arange(length - p.n_local, length)])

    def step(self, ids: list[int], decode: bool) -> np.ndarray:
        cfg, w = self.cfg, self.w
        n, length = len(ids), self.past + len(ids)
        x = w["model.embed_tokens.weight"][ids]
        for layer in range(cfg.num_layers):
            def p(name: str) -> np.ndarray:
                return w[f"model.layers.{layer}.{name}.weight"]

            h = self.norm(x, p("input_layernorm"))
            q, k, v = (h @ p(f"self_attn.{m}_proj").T for m in "qkv")
            q = q.reshape(n, cfg.num_heads, cfg.head_dim)
            self.kv[layer, 0, :, self.past:length] = k.reshape(n, cfg.num_kv_heads, -1).transpose(1, 0, 2)
            self.kv[layer, 1, :, self.past:length] = v.reshape(n, cfg.num_kv_heads, -1).transpose(1, 0, 2)
            o = self.attend(layer, q, length, decode)
            x = x + o.reshape(n, -1) @ p("self_attn.o_proj").T
            h = self.norm(x, p("post_attention_layernorm"))
            gate = h @ p("mlp.gate_proj").T
            x = x + (gate / (1 + np.exp(-gate)) * (h @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
        self.past = length
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])  # tied: the embedding
        return self.norm(x[-1], w["model.norm.weight"]) @ head.T

    def attend(self, layer: int, q: np.ndarray, length: int, decode: bool) -> np.ndarray:
        """The layer's attention ``[n, H, d]`` over the rows the policy picks (after the append)."""
        rows = self.rows(layer, q, length, decode)
        return aref.attention(q, self.kv[layer, 0][:, rows], self.kv[layer, 1][:, rows], self.table)

    def norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.cfg.rms_norm_eps) * weight

    def forced_logits(self, prompt: list[int], tokens: list[int], chunk: int) -> list[np.ndarray]:
        for start in range(0, len(prompt), chunk):
            logits = self.step(prompt[start:start + chunk], decode=False)
        return [logits] + [self.step([t], decode=True) for t in tokens]


# ---- the row-list kernel ---------------------------------------------------------------------------
def test_window_rows_cuda_codegen():
    assert "__global__" in cuda_source(make_window_rows(16, 64, CUDA))


@pytest.mark.parametrize("name", ["tokenselect", "streaming"])
def test_chunk_larger_than_local_window_rejected(name):
    with pytest.raises(ValueError, match="chunk_size=128 > n_local=64"):
        PolicyConfig(name=name, n_init=16, n_local=64, top_k=128, chunk_size=128)


# ---- whole model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [tokenselect, tokenselect_int8, streaming])
def test_within_budget_equals_dense(engines, text_ids, policy):
    """Up to exactly the budget the selecting library runs dense code: same bits, same tokens."""
    engine = policy(engines)
    steps = 16
    prompt = text_ids[:engine.meta.policy.budget - steps + 1]  # the last step ends at the budget
    tokens, logits = greedy(engine, prompt, steps)
    assert len(engine.cache) == engine.meta.policy.budget
    want_tokens, want_logits = greedy(dense(engines), prompt, steps)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        np.testing.assert_array_equal(got, want)
    assert engine.selection_stats() in (None, {"hits": 0, "lookups": 0})


@pytest.mark.parametrize("policy", [tokenselect, tokenselect_int8, streaming])
def test_beyond_budget_matches_numpy_reference(engines, source, text_ids, policy):
    """Selection, cache decisions, row lists and re-assigned positions equal the reference."""
    engine = policy(engines)
    prompt, tokens = text_ids[:300], text_ids[300:306]
    got = forced_logits(engine, prompt, tokens)
    ref = ReferenceModel(source, engine.meta.policy, MAX_CONTEXT)
    want = ref.forced_logits(prompt, tokens, BUDGETS["chunk_size"])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-3)
    if engine.meta.policy.name == "tokenselect":
        lookups = len(tokens) * source.config.num_layers
        assert engine.selection_stats() == {"hits": int(ref.state[:, 2].sum()), "lookups": lookups}


def test_beyond_budget_close_to_dense(engines, text_ids):
    """~600 tokens with a 208-token budget: next-token distributions stay near dense."""
    result = agreement(dense(engines), tokenselect(engines), text_ids[:600], steps=16)
    print(f"tokenselect vs dense: {result}")
    assert result["finite"]
    assert result["top1_agreement"] >= 0.75
    assert result["mean_kl"] <= 0.25


def test_int8_key_codes_select_like_exact_keys(engines, text_ids):
    """--score-keys int8 beside exact scoring on ~600 tokens of prose (208-token budget): the same
    next-token distributions within a small margin, and the codes kept for the cached rows equal
    the reference's codes of the cached keys (also after ``truncate`` and ``fill_random``)."""
    exact, coded = tokenselect(engines), tokenselect_int8(engines)
    result = agreement(exact, coded, text_ids[:600], steps=16)
    print(f"tokenselect int8 vs exact: {result}")
    assert result["finite"] and result["top1_agreement"] >= 0.9 and result["mean_kl"] <= 0.05
    for length in (len(coded.cache), 250):
        coded.truncate(length)
        codes, scales = tref.key_codes(coded.cache.tensor.numpy()[:, 0, :, :length])
        diff = np.abs(coded.state("key_codes")[:, :, :length].astype(int) - codes)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-4
        np.testing.assert_allclose(coded.state("key_scales")[:, :, :length], scales, rtol=1e-6)
    coded.fill_random(700, seed=3)
    codes, _ = tref.key_codes(coded.cache.tensor.numpy()[:, 0, :, :700])
    assert np.abs(coded.state("key_codes")[:, :, :700].astype(int) - codes).max() <= 1


@pytest.mark.parametrize("threshold, all_hit", [(-1.0, True), (1.5, False)])
def test_selection_cache_counters(engines, source, text_ids, threshold, all_hit):
    """cos >= -1 always holds (every decode lookup hits), cos >= 1.5 never does; prefill chunks
    are forced misses and not counted; ``reset`` clears the counters."""
    engine = tokenselect(engines, selection_threshold=threshold)
    steps = 5
    logits = forced_logits(engine, text_ids[:300], text_ids[300:300 + steps])
    assert all(np.isfinite(g).all() for g in logits)
    lookups = steps * source.config.num_layers
    assert engine.selection_stats() == {"hits": lookups if all_hit else 0, "lookups": lookups}
    engine.reset()
    assert engine.selection_stats() == {"hits": 0, "lookups": 0}
