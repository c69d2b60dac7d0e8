"""Recycled Attention in the whole compiled model: tests/tiny_model.py's random Llama (6 layers)
on the CPU, partial caches of 32 rows or of the paper's 1/8 of the prompt, a refresh check every 2
decode steps.

Checks: bit-identical to dense within the budget; beyond it equal to a NumPy float64 model of the
policy (tests/recycled_reference.py) with the similarity check, the fixed stride and a threshold
that never refreshes, step kinds counted alike; with K a fraction, the active K of each prefill
(and of a later turn's) on the device and the same reference with it; the CUDA library builds;
compile, generate and eval from the command line; one-line errors.
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
FRACTION = dict(RECYCLED, recycle_k="1/8", recycle_min_k=1)  # no floor: small prompts exercise small K


class RecycledReference(ReferenceModel):
    """The tiny model in float64 with Recycled Attention's semantics."""

    def __init__(self, source, policy, capacity):
        super().__init__(source, policy, capacity)
        cfg = source.config
        self.caches = rref.PartialCaches(policy, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, POOL_KERNEL,
                                         capacity)

    def attend(self, layer: int, q: np.ndarray, length: int, decode: bool) -> np.ndarray:
        keys, values = self.kv[layer, 0, :, :length], self.kv[layer, 1, :, :length]
        if length <= self.policy.budget:
            return aref.attention(q, keys, values, self.table)
        if layer == 0:
            self.caches.set_k(length, prefill=not decode)
        if self.caches.decide(layer, q, force_full=not decode):
            rows = self.caches.append(layer, length)
            return tref.sparse_attention(q, self.kv[layer, 0], self.kv[layer, 1], rows, self.table)
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


def check_against_reference(engine, source, prompt: list[int], tokens: list[int],
                            ref: RecycledReference | None = None) -> tuple[RecycledReference, list[np.ndarray]]:
    """The engine's logits, step counts, refresh states and active K equal the reference's after
    ``prompt`` then ``tokens`` (forced; with ``ref``, continuing both contexts as a chat's next
    turn); returns the reference and the engine's logits."""
    got = forced_logits(engine, prompt, tokens) if ref is None else turn_logits(engine, prompt, tokens)
    ref = ref or RecycledReference(source, engine.meta.policy, MAX_CONTEXT)
    want = ref.forced_logits(prompt, tokens, CHUNK)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-4)
    state = ref.caches.state
    assert engine.selection_stats() == {"hits": int(state[:, 2].sum()), "lookups": int(state[:, 3].sum())}
    np.testing.assert_array_equal(engine.state("sel_state"), state)
    assert engine.state("recycle_k")[0] == ref.caches.k
    return ref, got


def turn_logits(engine, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """``forced_logits`` continuing the cached context (a chat's next turn)."""
    return [engine.prefill(prompt)] + [engine.decode(t) for t in tokens]


@pytest.mark.parametrize("variant", [dict(recycle_threshold=0.85), dict(recycle_fixed_stride=True),
                                     dict(recycle_threshold=-1.0)])
def test_beyond_budget_matches_numpy_reference(engines, source, variant):
    """Dense prefill rebuilding the partial caches, then decode steps that are partial or full
    per layer as the reference decides; both kinds of step happen."""
    engine = engines(**RECYCLED, **variant)
    ids = prompt_ids(source, 162)
    prompt, tokens = ids[:150], ids[150:]
    _, got = check_against_reference(engine, source, prompt, tokens)
    stats = engine.selection_stats()
    assert stats["lookups"] == len(tokens) * source.config.num_layers
    assert 0 < stats["hits"] < stats["lookups"] or variant.get("recycle_threshold") == -1.0
    assert engine.state("recycle_k")[0] == RECYCLED["recycle_k"]  # a count: K_max
    dense = forced_logits(engines(name="dense"), prompt, tokens)
    np.testing.assert_array_equal(got[0], dense[0])  # prefill stays dense
    assert max(np.abs(g - d).max() for g, d in zip(got[1:], dense[1:])) > 1e-3  # decode is not


@pytest.mark.parametrize("prompt_len", [150, 12, 3])
def test_fraction_matches_numpy_reference_with_the_prompts_k(engines, source, prompt_len):
    """K = 1/8 of the prompt (150 -> 19, 12 -> 2 (1.5 rounds up), 3 -> 1: at least one row) in
    caches of K_max = 1024 / 8 slots; a next turn's prefill sets the K of the longer context."""
    engine = engines(**FRACTION)
    assert [s for n, s, _ in engine.meta.state if n == "cache_idx"][0][-1] == MAX_CONTEXT // 8
    assert engine.meta.policy.budget == 1  # the floor (recycle_min_k 1): every longer context has its partial cache
    ids = prompt_ids(source, prompt_len + 12 + 40 + 6)
    prompt, tokens = ids[:prompt_len], ids[prompt_len:prompt_len + 12]
    ref, _ = check_against_reference(engine, source, prompt, tokens)
    assert ref.caches.k == {150: 19, 12: 2, 3: 1}[prompt_len]
    turn = ids[prompt_len + 12:]  # 40 more tokens: K of the whole context, 202 / 64 / 55 tokens
    check_against_reference(engine, source, turn[:40], turn[40:], ref)
    assert ref.caches.k == {150: 25, 12: 8, 3: 7}[prompt_len]


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
    for bad, match in [(dict(recycle_k=0), "--recycle-k to a count >= 1"), (dict(recycle_k="3/2"), "--recycle-k"),
                       (dict(recycle_k="1/0"), "--recycle-k"), (dict(recycle_k="eighth"), "--recycle-k"),
                       (dict(recycle_stride=0), "--recycle-stride >= 1"),
                       (dict(recycle_threshold=float("nan")), "--recycle-threshold")]:
        with pytest.raises(ValueError, match=match) as err:
            PolicyConfig("recycled", **bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="--max-context >= 1") as err:
        PolicyConfig("recycled").recycle_capacity(0)
    assert "\n" not in str(err.value)
    assert PolicyConfig("recycled", recycle_k=300).budget == 300
    PolicyConfig("recycled", chunk_size=4096, n_local=8)  # no local window: no chunk limit


def test_recycle_k_is_a_count_or_a_fraction_of_the_prompt():
    """The paper's 1/8 by default; fractions kept in lowest terms; K_max from the KV cache."""
    assert PolicyConfig("recycled").recycle_k == "1/8"
    for given, kept in [("1/8", "1/8"), ("0.125", "1/8"), ("2/16", "1/8"), (" 1/1 ", "1/1"), ("256", 256), (7, 7)]:
        assert PolicyConfig("recycled", recycle_k=given).recycle_k == kept
    policy = PolicyConfig("recycled")
    assert policy.recycle_capacity(32768) == 4096 and policy.recycle_capacity(100) == 256  # the floor
    assert [policy.recycle_active_k(n, 32768) for n in (1, 12, 2048, 2056, 32768)] == [256, 256, 256, 257, 4096]
    assert policy.budget == 256  # contexts up to the floor run dense
    floorless = PolicyConfig("recycled", recycle_min_k=1)
    assert floorless.recycle_capacity(100) == 13 and floorless.budget == 1
    assert [floorless.recycle_active_k(n, 32768) for n in (1, 4, 11, 12, 2048)] == [1, 1, 1, 2, 256]
    with pytest.raises(ValueError, match="--recycle-min-k"):
        PolicyConfig("recycled", recycle_min_k=0)
    assert PolicyConfig("recycled", recycle_k=256).recycle_active_k(5000, 32768) == 256
    assert PolicyConfig(**json.loads(json.dumps(policy.to_dict()))) == policy  # library metadata


CLI_RECYCLED = ["--policy", "recycled", "--recycle-k", "32", "--recycle-stride", "2", "--recycle-fixed-stride"]


def test_recycle_k_on_the_command_line(folder, tmp_path):
    """A fraction compiles (K_max = ceil(fraction x max_context) slots, at least --recycle-min-k); a
    bad value is one line."""
    common = ["compile", "--model", str(folder), "--target", "llvm", "--policy", "recycled", "--max-context", "100"]
    result = CliRunner().invoke(main, [*common, "--recycle-k", "1/3", "--recycle-min-k", "1", "-o", str(tmp_path / "x.so")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "x.json").read_text())
    assert meta["policy"]["recycle_k"] == "1/3"
    assert {name: shape for name, shape, _ in meta["state"]}["cache_idx"][-1] == 34
    result = CliRunner().invoke(main, [*common, "--recycle-k", "3/2", "-o", str(tmp_path / "y.so")])
    assert result.exit_code != 0 and "in (0, 1]" in result.output and not (tmp_path / "y.so").exists()
    assert "--recycle-k" in CliRunner().invoke(main, ["compile", "--help"]).output
    assert "--recycle-min-k" in CliRunner().invoke(main, ["compile", "--help"]).output
    assert "1/8" in CliRunner().invoke(main, ["compile", "--help"]).output


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
