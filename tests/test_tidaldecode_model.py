"""TidalDecode in the whole compiled model: tests/tiny_model.py's random Llama (6 layers) on the CPU.

Budget 32 tokens, selection at layer 1 and re-selection at layer 3 (so the step has dense,
selecting, sparse and re-selecting layers). Checks: bit-identical to dense within the budget;
beyond it equal to a NumPy float64 model of TidalDecode's semantics (per query head and per KV
head) and different from dense; one-line errors for settings the model or target cannot take.
"""

from __future__ import annotations

import json
from pathlib import Path

import attention_reference as aref
import numpy as np
import pytest
import tidaldecode_reference as tref
from click.testing import CliRunner
from test_tokenselect_model import MAX_CONTEXT, ReferenceModel, engines  # noqa: F401 (a fixture)
from tiny_model import make_tiny_hf_model

from tsedge.cli import main
from tsedge.compile.build import compile_library
from tsedge.compile.targets import parse_target
from tsedge.engine import Engine
from tsedge.eval.agreement import forced_logits, greedy
from tsedge.models.attention import check_policy, make_policy
from tsedge.models.config import ModelConfig, PolicyConfig
from tsedge.weights import ModelSource, load_source

TIDAL = dict(name="tidaldecode", tidal_budget=32, tidal_select_layer=1, tidal_reselect_layers=(3,))
CHUNK = 64  # test_tokenselect_model's engines prefill in chunks of 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny6"), num_layers=6, seed=3)


@pytest.fixture(scope="module")
def source(folder) -> ModelSource:
    return load_source(str(folder))


def prompt_ids(source: ModelSource, count: int) -> list[int]:
    return np.random.default_rng(count).integers(3, source.config.vocab_size, count).tolist()


class TidalReference(ReferenceModel):
    """The tiny model in float64 with TidalDecode's semantics (tidaldecode_reference.py)."""

    def attend(self, layer: int, q: np.ndarray, length: int, decode: bool) -> np.ndarray:
        p, keys, values = self.policy, self.kv[layer, 0], self.kv[layer, 1]
        if not decode or length <= p.budget or layer < p.tidal_select_layer:
            return aref.attention(q, keys[:, :length], values[:, :length], self.table)
        if layer in (p.tidal_select_layer, *p.tidal_reselect_layers):
            sets = self.cfg.num_kv_heads if p.tidal_per_kv_head else self.cfg.num_heads
            scores = tref.logits(q, keys[:, :length], self.table)
            self.selected = tref.select(tref.set_logits(scores, sets), p.budget)
            return aref.attention(q, keys[:, :length], values[:, :length], self.table)
        return tref.sparse_attention(q, keys, values, self.selected, self.table)


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_within_budget_equals_dense(engines, source, per_kv_head):
    """Up to exactly the budget the library runs dense code: same bits, same tokens."""
    engine = engines(**TIDAL, tidal_per_kv_head=per_kv_head)
    steps = 8
    prompt = prompt_ids(source, TIDAL["tidal_budget"] - steps + 1)  # the last step ends at the budget
    tokens, logits = greedy(engine, prompt, steps)
    assert len(engine.cache) == TIDAL["tidal_budget"]
    want_tokens, want_logits = greedy(engines(name="dense"), prompt, steps)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_beyond_budget_matches_numpy_reference(engines, source, per_kv_head):
    """Dense prefill, then decode steps whose sparse layers read each head's selection."""
    engine = engines(**TIDAL, tidal_per_kv_head=per_kv_head)
    ids = prompt_ids(source, 160)
    prompt, tokens = ids[:150], ids[150:]
    got = forced_logits(engine, prompt, tokens)
    ref = TidalReference(source, engine.meta.policy, MAX_CONTEXT)
    want = ref.forced_logits(prompt, tokens, CHUNK)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-4)
    dense = forced_logits(engines(name="dense"), prompt, tokens)
    np.testing.assert_array_equal(got[0], dense[0])  # prefill stays dense
    assert all(np.abs(g - d).max() > 1e-3 for g, d in zip(got[1:], dense[1:]))  # decode is sparse


def test_settings_the_model_or_target_cannot_take_are_one_line_errors(source):
    with pytest.raises(ValueError, match="layer 13 does not exist in a 6-layer model") as err:
        check_policy(PolicyConfig("tidaldecode"), source.config)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="layer 6 does not exist in a 6-layer model"):
        make_policy(PolicyConfig(**{**TIDAL, "tidal_reselect_layers": (6,)}), source.config, "float32",
                    parse_target("llvm"))


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_compiles_for_cuda(tmp_path, per_kv_head):
    """The CUDA library (decode attention over per-set rows and with logits, GPU top-k) builds."""
    cfg = ModelConfig("tiny-gqa3", 576, 256, 4, 9, 3, 512)  # SmolLM2's heads (head_dim 64), 4 layers
    policy = PolicyConfig(**TIDAL, tidal_per_kv_head=per_kv_head)
    meta = compile_library(cfg, policy, parse_target("cuda:sm_90"), "float16", MAX_CONTEXT, tmp_path / "tidal-cuda.so")
    assert "decode_select" in meta.functions and meta.policy == policy


CLI_TIDAL = ["--policy", "tidaldecode", "--tidal-budget", "32", "--tidal-select-layer", "1",
             "--tidal-reselect-layers", "3", "--tidal-per-kv-head"]


def test_compile_and_generate_from_the_command_line(folder, tmp_path):
    lib = tmp_path / "tidal.so"
    common = ["--model", str(folder), "--target", "llvm", "--dtype", "float32"]
    result = CliRunner().invoke(main, ["compile", *common, *CLI_TIDAL[:-3], "-o", str(lib)])
    assert result.exit_code != 0 and result.output.count("\n") == 1, result.output  # default re-selection: 13
    assert "layer 13 does not exist in a 6-layer model" in result.output
    result = CliRunner().invoke(main, ["compile", *common, *CLI_TIDAL, "--max-context", "256", "-o", str(lib)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    policy = json.loads(lib.with_suffix(".json").read_text())["policy"]
    assert policy["tidal_reselect_layers"] == [3] and policy["tidal_per_kv_head"] is True
    result = CliRunner().invoke(main, ["generate", "--model", str(folder), "--lib", str(lib), "--temperature", "0",
                                       "--prompt", "The quick brown fox jumps over the lazy dog. " * 6,
                                       "--max-new-tokens", "40", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["policy"] == "tidaldecode" and out["prompt_tokens"] > 32 and out["generated_tokens"] >= 1


def test_eval_run_accepts_tidaldecode(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TSEDGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, [
        "eval", "run", "--model", str(folder), "--target", "llvm", "--dtype", "float32",
        "--tasks", "niah_single", "--haystacks", "repeat", "--policies", "tidaldecode",
        "--lengths", "400", "--samples", "1", *CLI_TIDAL[2:], "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["config"]["policies"]["tidaldecode"]["tidal_budget"] == 32
    (cell,) = data["cells"]
    assert cell["policy"] == "tidaldecode" and 0 <= cell["score"] <= 1


def test_eval_run_sweeps_the_reselection_layer(folder, tmp_path, monkeypatch):
    """--tidal-reselect-sweep: one TidalDecode library and column per re-selection layer."""
    monkeypatch.setenv("TSEDGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "eval.json"
    common = ["eval", "run", "--model", str(folder), "--target", "llvm", "--dtype", "float32", "--tasks", "ppl",
              "--lengths", "400", "--samples", "1", *CLI_TIDAL[2:]]
    result = CliRunner().invoke(main, [*common, "--policies", "dense,tidaldecode", "--tidal-reselect-sweep", "3,none",
                                       "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "| task | dense 400 | tidaldecode@r3 400 | tidaldecode@rnone 400 |"
    policies = json.loads(out.read_text())["config"]["policies"]
    assert policies["tidaldecode@r3"]["tidal_reselect_layers"] == [3]
    assert policies["tidaldecode@rnone"]["tidal_reselect_layers"] == []
    for args, message in [(["--policies", "dense", "--tidal-reselect-sweep", "3"], "add tidaldecode to --policies"),
                          (["--policies", "tidaldecode", "--tidal-reselect-sweep", "3,x"], "use layer numbers or none")]:
        bad = CliRunner().invoke(main, [*common, *args])
        assert bad.exit_code != 0 and bad.output.count("\n") == 1 and message in bad.output, bad.output
