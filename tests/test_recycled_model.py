"""Recycled Attention in the whole compiled model: tests/tiny_model.py's random Llama (6 layers)
on the CPU, partial caches of 32 rows, a refresh check every 2 decode steps.

Checks: bit-identical to dense within the budget; beyond it equal to a NumPy float64 model of the
policy (tests/recycled_reference.py) with the similarity check, the fixed stride and a threshold
that never refreshes, step kinds counted alike; the CUDA library builds; compile, generate and
eval from the command line; one-line errors.
"""

from __future__ import annotations

import json

import attention_reference as aref
import numpy as np
import pytest
import recycled_reference as rref
import tidaldecode_reference as tref
from click.testing import CliRunner
from test_tidaldecode_model import CHUNK, folder, prompt_ids, source  # noqa: F401 (fixtures: the tiny model)
from test_tokenselect_model import MAX_CONTEXT, ReferenceModel, engines  # noqa: F401 (a fixture)

from tsedge.cli import main
from tsedge.compile.build import compile_library
from tsedge.compile.targets import parse_target
from tsedge.eval.agreement import forced_logits, greedy
from tsedge.models.config import ModelConfig, PolicyConfig
from tsedge.tir_kernels.recycle import POOL_KERNEL

RECYCLED = dict(name="recycled", recycle_k=32, recycle_stride=2)


class RecycledReference(ReferenceModel):
    """The tiny model in float64 with Recycled Attention's semantics."""

    def __init__(self, source, policy, capacity):
        super().__init__(source, policy, capacity)
        cfg = source.config
        self.caches = rref.PartialCaches(policy, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, POOL_KERNEL)

    def attend(self, layer: int, q: np.ndarray, length: int, decode: bool) -> np.ndarray:
        keys, values = self.kv[layer, 0, :, :length], self.kv[layer, 1, :, :length]
        if length <= self.policy.budget:
            return aref.attention(q, keys, values, self.table)
        if self.caches.decide(layer, q, force_full=not decode):
            rref.append(self.caches.idx[layer], self.caches.score[layer], length)
            return tref.sparse_attention(q, self.kv[layer, 0], self.kv[layer, 1], self.caches.idx[layer], self.table)
        self.caches.rebuild(layer, q, keys, self.table)
        return aref.attention(q, keys, values, self.table)


def test_within_budget_equals_dense(engines, source):
    """Up to exactly K tokens the library runs dense code: same bits, same tokens."""
    engine = engines(**RECYCLED)
    steps = 8
    prompt = prompt_ids(source, RECYCLED["recycle_k"] - steps + 1)  # the last step ends at K
    tokens, logits = greedy(engine, prompt, steps)
    assert len(engine.cache) == RECYCLED["recycle_k"]
    want_tokens, want_logits = greedy(engines(name="dense"), prompt, steps)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        np.testing.assert_array_equal(got, want)
    assert engine.selection_stats() == {"hits": 0, "lookups": 0}


@pytest.mark.parametrize("variant", [dict(recycle_threshold=0.85), dict(recycle_fixed_stride=True),
                                     dict(recycle_threshold=-1.0)])
def test_beyond_budget_matches_numpy_reference(engines, source, variant):
    """Dense prefill rebuilding the partial caches, then decode steps that are partial or full
    per layer as the reference decides; both kinds of step happen."""
    engine = engines(**RECYCLED, **variant)
    ids = prompt_ids(source, 162)
    prompt, tokens = ids[:150], ids[150:]
    got = forced_logits(engine, prompt, tokens)
    ref = RecycledReference(source, engine.meta.policy, MAX_CONTEXT)
    want = ref.forced_logits(prompt, tokens, CHUNK)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-4)
    state = ref.caches.state
    stats = engine.selection_stats()
    assert stats == {"hits": int(state[:, 2].sum()), "lookups": len(tokens) * source.config.num_layers}
    assert 0 < stats["hits"] < stats["lookups"] or variant.get("recycle_threshold") == -1.0
    np.testing.assert_array_equal(engine.state("sel_state"), state)
    dense = forced_logits(engines(name="dense"), prompt, tokens)
    np.testing.assert_array_equal(got[0], dense[0])  # prefill stays dense
    assert max(np.abs(g - d).max() for g, d in zip(got[1:], dense[1:])) > 1e-3  # decode is not


def test_never_refreshing_keeps_partial_steps(engines, source):
    """cos >= -1 always holds: after the prompt every decode step of every layer is partial."""
    engine = engines(**RECYCLED, recycle_threshold=-1.0)
    steps = 6
    forced_logits(engine, prompt_ids(source, 100), prompt_ids(source, steps))
    lookups = steps * source.config.num_layers
    assert engine.selection_stats() == {"hits": lookups, "lookups": lookups}
    idx = engine.state("cache_idx")
    assert (idx[:, :, -1] == 100 + steps - 1).all()  # the last step's token sits in the last slot
    engine.reset()
    assert engine.selection_stats() == {"hits": 0, "lookups": 0}


def test_compiles_for_cuda(tmp_path):
    """The CUDA library (gated decode attention with logits and over per-KV-head rows, the
    partial-cache kernels, the batched top-k) builds."""
    cfg = ModelConfig("tiny-gqa3", 576, 256, 4, 9, 3, 512)  # SmolLM2's heads (head_dim 64), 4 layers
    policy = PolicyConfig(**RECYCLED)
    meta = compile_library(cfg, policy, parse_target("cuda:sm_90"), "float16", MAX_CONTEXT, tmp_path / "rc-cuda.so")
    assert "decode_select" in meta.functions and meta.policy == policy


def test_settings_checked_in_one_line():
    for bad, match in [(dict(recycle_k=0), "--recycle-k >= 1"), (dict(recycle_stride=0), "--recycle-stride >= 1"),
                       (dict(recycle_threshold=float("nan")), "--recycle-threshold")]:
        with pytest.raises(ValueError, match=match) as err:
            PolicyConfig("recycled", **bad)
        assert "\n" not in str(err.value)
    assert PolicyConfig("recycled", recycle_k=300).budget == 300
    PolicyConfig("recycled", chunk_size=4096, n_local=8)  # no local window: no chunk limit


CLI_RECYCLED = ["--policy", "recycled", "--recycle-k", "32", "--recycle-stride", "2", "--recycle-fixed-stride"]


def test_recycle_k_is_a_token_count_fixed_at_compile_time(folder, tmp_path):
    result = CliRunner().invoke(main, ["compile", "--model", str(folder), "--target", "llvm",
                                       "--policy", "recycled", "--recycle-k", "1/8", "-o", str(tmp_path / "x.so")])
    assert result.exit_code != 0
    assert "fixed when the library is compiled" in result.output and "256 for a 2K prompt" in result.output


def test_compile_generate_and_eval_from_the_command_line(folder, tmp_path, monkeypatch):
    lib = tmp_path / "recycled.so"
    common = ["--model", str(folder), "--target", "llvm", "--dtype", "float32"]
    result = CliRunner().invoke(main, ["compile", *common, *CLI_RECYCLED, "--max-context", "256", "-o", str(lib)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    policy = json.loads(lib.with_suffix(".json").read_text())["policy"]
    assert policy["recycle_k"] == 32 and policy["recycle_fixed_stride"] is True
    result = CliRunner().invoke(main, ["generate", "--model", str(folder), "--lib", str(lib), "--temperature", "0",
                                       "--prompt", "The quick brown fox jumps over the lazy dog. " * 6,
                                       "--max-new-tokens", "20", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["policy"] == "recycled" and out["prompt_tokens"] > 32 and out["generated_tokens"] >= 1
    monkeypatch.setenv("TSEDGE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "eval.json"
    result = CliRunner().invoke(main, [
        "eval", "run", *common, "--tasks", "niah_single", "--haystacks", "repeat", "--policies", "recycled",
        "--lengths", "400", "--samples", "1", *CLI_RECYCLED[2:], "-o", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    assert data["config"]["policies"]["recycled"]["recycle_k"] == 32
    (cell,) = data["cells"]
    assert cell["policy"] == "recycled" and 0 <= cell["score"] <= 1
