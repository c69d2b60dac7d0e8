"""``Engine.cache_correction`` (TidalDecode's cache correction): every N decoded tokens their KV
cache rows are dropped and the same ids prefilled again. tests/tiny_model.py's random Llama
(6 layers) on the CPU, float32.

Checks: the corrected rows equal a fresh dense prefill's of the whole sequence (and the sparse
rows they replace do not); corrections run before the expected decode steps and generation stays
deterministic; a selecting policy's state after a correction is that of a fresh prefill of the
same chunks (nothing stale), its counters carried; one-line errors for bad values, from the
Engine and the command line (generate, chat, eval run).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_recycled_model import RECYCLED
from test_tidaldecode_model import CLI_TIDAL, TIDAL, folder, prompt_ids, source  # noqa: F401 (fixtures)
from test_tokenselect_model import MAX_CONTEXT, engines  # noqa: F401 (a fixture)

from tsedge.cli import main
from tsedge.compile.build import compile_library
from tsedge.compile.targets import parse_target
from tsedge.engine import Engine
from tsedge.models.config import PolicyConfig
from tsedge.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
PROMPT = 40  # tokens: beyond TidalDecode's budget of 32, so decode steps are sparse


@pytest.fixture(scope="module")
def tidal_lib(source, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tidal") / "tidal.so"
    compile_library(source.config, PolicyConfig(**TIDAL), parse_target("llvm"), "float32", MAX_CONTEXT, path)
    return path


def rows(engine: Engine, start: int, stop: int) -> np.ndarray:
    """The KV cache rows [start, stop) of every layer, K and V: [layers, 2, kv heads, rows, head_dim]."""
    return engine.cache.tensor.numpy()[:, :, :, start:stop]


def test_corrected_rows_equal_a_dense_prefill(tidal_lib, source, engines):
    """8 sparse decode steps, then the correction (in chunks of 3): the 8 rows equal a dense
    prefill's of prompt + those 8 tokens; without the correction they do not."""
    prompt, n = prompt_ids(source, PROMPT), 8
    corrected = Engine(tidal_lib, source, prefill_chunk=3, cache_correction=n)
    out = corrected.generate(prompt, n + 2, GREEDY, stop_ids=[])  # decode n + 1 runs after the correction
    assert out.corrections == 1 and len(corrected.cache) == PROMPT + n + 1
    sparse = Engine(tidal_lib, source, prefill_chunk=3)
    assert sparse.generate(prompt, n + 1, GREEDY, stop_ids=[]).tokens == out.tokens[:n + 1]
    dense = engines(name="dense")
    dense.prefill(prompt + out.tokens[:n])
    want = rows(dense, PROMPT, PROMPT + n)
    np.testing.assert_allclose(rows(corrected, PROMPT, PROMPT + n), want, rtol=0, atol=1e-5)
    assert np.abs(rows(sparse, PROMPT, PROMPT + n) - want).max() > 1e-3  # what the correction fixed


def test_corrections_run_every_n_decoded_tokens(tidal_lib, source, monkeypatch):
    """N = 5, 17 decode steps: prefills of the prompt, then of rows 40-44, 45-49 and 50-54 (before
    decode steps 6, 11 and 16); two runs give the same tokens, the first 6 as without correction."""
    prompt, n, new_tokens = prompt_ids(source, PROMPT), 5, 18
    engine = Engine(tidal_lib, source, cache_correction=n)
    prefills: list[tuple[int, int]] = []  # (cached rows, tokens) of each prefill
    prefill = engine._prefill

    def spy(ids, on_progress):
        prefills.append((len(engine.cache), len(ids)))
        return prefill(ids, on_progress)

    monkeypatch.setattr(engine, "_prefill", spy)
    first = engine.generate(prompt, new_tokens, GREEDY, stop_ids=[])
    assert prefills == [(0, PROMPT), (40, n), (45, n), (50, n)]
    assert first.corrections == 3 == (new_tokens - 2) // n and engine.corrections == 3
    engine.reset()
    second = engine.generate(prompt, new_tokens, GREEDY, stop_ids=[])
    assert second.tokens == first.tokens and second.corrections == 3 and len(first.tokens) == new_tokens
    plain = Engine(tidal_lib, source).generate(prompt, new_tokens, GREEDY, stop_ids=[])
    assert plain.corrections == 0 and plain.tokens[:n + 1] == first.tokens[:n + 1]


def test_selecting_policy_state_after_a_correction_is_a_fresh_prefills(engines, source):
    """Recycled Attention (partial caches, stride counters): after 4 decode steps, a correction
    and one more step, the cache and every state tensor equal those of prefilling the prompt and
    the 4 tokens and decoding the 5th on a reset engine; the counters include the steps before the
    correction."""
    engine = engines(**RECYCLED)
    prompt, n = prompt_ids(source, PROMPT), 4
    engine.cache_correction = n
    try:
        out = engine.generate(prompt, n + 2, GREEDY, stop_ids=[])
    finally:
        engine.cache_correction = 0
    assert out.corrections == 1
    length, layers = len(engine.cache), source.config.num_layers
    got = [rows(engine, 0, length)] + [s.numpy() for s in engine.cache.state]
    assert engine.selection_stats()["lookups"] == (n + 1) * layers  # every decode step, each layer
    engine.reset()
    engine.prefill(prompt)
    engine.prefill(out.tokens[:n])
    engine.decode(out.tokens[n])
    want = [rows(engine, 0, length)] + [s.numpy() for s in engine.cache.state]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert engine.selection_stats()["lookups"] == layers  # the fresh path: one decode step


def test_bad_values_are_one_line_errors(tidal_lib, source):
    for value, message in [(-1, "give a token count >= 0"), (MAX_CONTEXT, "can never run")]:
        with pytest.raises(ValueError, match=message) as err:
            Engine(tidal_lib, source, cache_correction=value)
        assert "\n" not in str(err.value)
    engine = Engine(tidal_lib, source)
    with pytest.raises(ValueError, match=f"below {MAX_CONTEXT}"):
        engine.cache_correction = MAX_CONTEXT + 1
    assert engine.cache_correction == 0


def test_command_line(folder, tidal_lib, tmp_path, monkeypatch):
    """generate reports its corrections; generate, chat and eval run refuse bad values in one
    line; eval run passes the option to its engines and records it."""
    generate = ["generate", "--model", str(folder), "--lib", str(tidal_lib), "--temperature", "0",
                "--prompt", "The quick brown fox jumps over the lazy dog. " * 6, "--max-new-tokens", "20", "--json"]
    result = CliRunner().invoke(main, [*generate, "--cache-correction", "4"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["prompt_tokens"] > 32 and out["cache_corrections"] == max(out["generated_tokens"] - 2, 0) // 4
    for args, message in [([*generate, "--cache-correction", "-1"], "-1 is not in the range x>=0"),
                          ([*generate, "--cache-correction", str(MAX_CONTEXT)], "can never run"),
                          (["chat", "--lib", str(tidal_lib), "--cache-correction", "-1"], "x>=0"),
                          (["eval", "run", "--cache-correction", "-1"], "x>=0")]:
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0 and result.output.count("\n") == 1 and message in result.output, result.output
    assert "TidalDecode's public code uses 128" in CliRunner().invoke(main, ["chat", "--help"]).output
    monkeypatch.setattr("tsedge.library_cache.ensure_library", lambda *args, **kw: tidal_lib)
    path = tmp_path / "eval.json"
    result = CliRunner().invoke(main, [
        "eval", "run", "--model", str(folder), "--target", "llvm", "--dtype", "float32", "--tasks", "niah_single",
        "--haystacks", "repeat", "--policies", "tidaldecode", "--lengths", "400", "--samples", "1",
        *CLI_TIDAL[2:-1], "--cache-correction", "2", "-o", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    assert data["config"]["cache_correction"] == 2 and data["cells"][0]["policy"] == "tidaldecode"
