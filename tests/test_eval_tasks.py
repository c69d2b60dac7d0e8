"""``tsedge eval run``'s tasks: RULER-style samples with the real SmolLM2 tokenizer (deterministic per
seed, within one filler sentence under the length, needles and values inside), the scoring rules,
perplexity bookkeeping, and the command end to end on a tiny model (2 tasks x 2 policies)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_chat import tiny_folder  # noqa: F401 (fixture: a tiny random model folder)

from tsedge.cli import main
from tsedge.eval import niah, ppl, vt
from tsedge.eval.haystack import DEPTHS, FILLER_SENTENCES, draw_depths, insert_at_depths, prose_sentences
from tsedge.eval.runner import TASKS, Grid, check_policies, format_table, merge, parse_lengths
from tsedge.eval.sample import sample_rng, string_match_all
from tsedge.models.config import POLICIES

LENGTHS = [700, 2048]
CASES = [(task, haystack) for task, (haystacks, make) in TASKS.items() if make for haystack in haystacks]


@pytest.fixture(scope="module")
def tok(smol_source):
    return smol_source.tokenizer


@pytest.fixture(scope="module")
def samples(tok):
    """Every string-match task on every haystack at LENGTHS, 2 samples each, seed 0."""
    return Grid([t for t, (_, make) in TASKS.items() if make], ["repeat", "prose"], LENGTHS, 2, 0).inputs(tok)


@pytest.fixture(scope="module")
def longest_sentence(tok) -> dict[str, int]:
    """Tokens of the longest filler sentence of each haystack (a sentence joins after a space)."""
    return {"repeat": max(len(tok.encode(" " + s)) for s in FILLER_SENTENCES),
            "prose": max(len(tok.encode(" " + s)) for s in prose_sentences())}


def test_samples_are_deterministic_per_seed(tok, samples):
    again = Grid(["niah_multikey", "vt"], ["prose", "repeat"], LENGTHS, 2, 0).inputs(tok)
    for key, items in again.items():
        assert items == samples[key], key
    other = Grid(["niah_multikey", "vt"], ["prose", "repeat"], LENGTHS, 2, 1).inputs(tok)
    assert all(other[key][0].prompt != samples[key][0].prompt for key in other)
    assert all(samples[key][0].prompt != samples[key][1].prompt for key in samples)
    rng_docs = [ppl.document(tok, 3000, sample_rng(0, "ppl", "prose", 3000, 0)) for _ in range(2)]
    assert rng_docs[0] == rng_docs[1] and len(rng_docs[0]) == 3000


@pytest.mark.parametrize("task,haystack", CASES)
@pytest.mark.parametrize("length", LENGTHS)
def test_prompt_fits_the_length_within_a_sentence(samples, longest_sentence, task, haystack, length):
    for sample in samples[task, haystack, length]:
        assert length - longest_sentence[haystack] <= len(sample.prompt) <= length


@pytest.mark.parametrize("length", LENGTHS)
def test_needles_and_values_are_inside(tok, samples, length):
    needle = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.")
    for task, (keys, values, queries) in niah.VARIANTS.items():
        for haystack in ("repeat", "prose"):
            for sample in samples[task, haystack, length]:
                text = tok.decode(sample.prompt)
                found = needle.findall(text)
                assert len(found) == keys * values and len({k for k, _ in found}) == keys
                assert len({v for _, v in found}) == len(found)  # distinct: distractors never answer
                question = text.split("\n")[-3:]  # question, end of turn, answer prefix
                asked = [k for k in dict.fromkeys(k for k, _ in found) if re.search(rf"(?<![a-z]){k}\b", question[0])]
                assert len(asked) == queries, question
                assert sorted(sample.references) == sorted(v for k, v in found if k in asked)
                assert len(sample.references) == queries * values
                singular = "number for" if queries * values == 1 else "numbers for"
                assert question[-1].startswith(f"The special magic {singular} ")
                assert sample.max_new_tokens == niah.MAX_NEW_TOKENS


@pytest.mark.parametrize("haystack", ["repeat", "prose"])
def test_vt_chain_is_inside_in_order(tok, samples, haystack):
    for sample in samples["vt", haystack, 2048]:
        text = tok.decode(sample.prompt)
        example, question = text.split("\n\nMemorize and track")
        a, *rest = sample.references
        assert len(sample.references) == vt.HOPS + 1 and all(re.fullmatch("[A-Z]{5}", n) for n in sample.references)
        value = re.search(rf"VAR {a} = (\d{{5}})\.", question).group(1)
        hops = [question.index(f"VAR {b} = VAR {prev}.") for prev, b in zip(sample.references, rest)]
        assert hops == sorted(hops) and question.index(f"VAR {a} = {value}.") < hops[0]
        assert f"assigned the value {value} in the text above" in question
        assert question.endswith(f"{vt.HOPS + 1} variables are assigned the value {value}, they are:")
        assert not any(name in example for name in sample.references)  # the solved example is another chain


def test_passkey_samples_hold_their_key(tok, samples):
    for sample in samples["passkey", "repeat", 700]:
        (key,) = sample.references
        assert tok.decode(sample.prompt).count(f"The pass key is {key}.") == 1


def test_insert_at_depths_follows_ruler():
    sentences = [f"s{i}." for i in range(10)]
    text = insert_at_depths(sentences, ["A", "B", "C"], [0, 50, 100])
    assert text == "A s0. s1. s2. s3. s4. B s5. s6. s7. s8. s9. C"
    depths = draw_depths(sample_rng(3, "x"), 4)
    assert depths == sorted(depths) and len(set(depths)) == 4 and set(depths) <= set(DEPTHS)
    assert len(DEPTHS) == 40 and DEPTHS[0] == 0 and DEPTHS[-1] == 100


def test_string_match_all_on_hand_made_answers():
    refs = ["4812586", "1234567", "AGBUL", "ipnnw"]
    assert string_match_all(" 4812586, 1234567, agbul and IPNNW.", refs) == 1.0
    assert string_match_all("The numbers are 4812586 and 7654321.", refs) == 0.25
    assert string_match_all("I do not know.", refs) == 0.0
    assert string_match_all("481258", ["4812586"]) == 0.0  # a prefix of the value is not the value
    with pytest.raises(ValueError, match="at least one reference"):
        string_match_all("x", [])


def test_ppl_positions_and_loss():
    assert [list(r)[:2] + [r.stop] for r in ppl.scored_positions(1024, 4, 32)] == [
        [224, 225, 256], [480, 481, 512], [736, 737, 768], [992, 993, 1024]]
    with pytest.raises(ValueError, match="more than 32 tokens per bucket"):
        ppl.scored_positions(128, 4, 32)
    logits = np.array([1.0, 2.0, 3.0], np.float32)
    assert ppl.next_token_loss(logits, 2) == pytest.approx(math.log(math.exp(1) + math.exp(2) + math.exp(3)) - 3)


class RecordingEngine:
    """Stands in for an Engine: keeps the fed tokens, returns logits favouring token ``len % 5``."""

    def __init__(self) -> None:
        self.cache: list[int] = []
        self.decoded: list[int] = []

    def reset(self) -> None:
        self.cache = []

    def prefill(self, ids: list[int]) -> np.ndarray:
        assert ids
        self.cache += ids
        return self._logits()

    def decode(self, token: int) -> np.ndarray:
        self.decoded.append(len(self.cache))
        self.cache.append(token)
        return self._logits()

    def _logits(self) -> np.ndarray:
        logits = np.zeros(5)
        logits[len(self.cache) % 5] = 4.0
        return logits


def test_ppl_teacher_forces_the_document_through_decode():
    ids = [7 * i % 5 for i in range(400)]
    engine = RecordingEngine()
    buckets = ppl.bucket_losses(engine, ids, buckets=4, window=8)
    assert engine.cache == ids[:399]  # the document in order, each token once
    assert engine.decoded == [t - 1 for r in ppl.scored_positions(400, 4, 8) for t in r]
    hit, miss = ppl.next_token_loss(np.array([4.0, 0, 0, 0, 0]), 0), ppl.next_token_loss(np.array([4.0, 0, 0, 0, 0]), 1)
    for bucket in buckets:  # position t is predicted after t tokens: the fake favours t % 5
        want = [hit if ids[t] == t % 5 else miss for t in range(bucket["start"], bucket["end"])]
        assert bucket["loss"] == pytest.approx(np.mean(want))
    summary = ppl.summarize([buckets, buckets])
    assert summary["ppl"] == pytest.approx(math.exp(np.mean([b["loss"] for b in buckets])))


def test_names_lengths_and_policies_are_checked():
    assert parse_lengths("2k, 4K,3000") == [2048, 4096, 3000]
    for bad in ("0", "2m", "-1k", ""):
        with pytest.raises(ValueError, match="bad length"):
            parse_lengths(bad)
    available = ", ".join(POLICIES)
    for name in ("tidaldecode", "recycled"):  # issue 10's policies: accepted once compiled
        if name in POLICIES:
            assert check_policies(["dense", name]) == ["dense", name]
        else:
            with pytest.raises(ValueError, match=f"'{name}' is not implemented yet .*available: {available}$"):
                check_policies(["dense", name])
    with pytest.raises(ValueError, match="policy 'flash' is unknown; available: dense"):
        check_policies(["flash"])
    assert check_policies(["tidaldecode@r3", "tidaldecode@rnone"]) == ["tidaldecode@r3", "tidaldecode@rnone"]
    for names in (["dense", "dense"], ["tidaldecode@r3", "tidaldecode@r3"]):
        with pytest.raises(ValueError, match="named twice"):
            check_policies(names)
    with pytest.raises(ValueError, match="policy 'flash' is unknown"):
        check_policies(["flash@r3"])
    with pytest.raises(ValueError, match="task 'niah_single_1' is unknown; available: passkey, niah_single"):
        Grid(["niah_single_1"], ["repeat"], [1024], 1, 0)
    assert Grid(["ppl", "vt"], ["repeat"], [1024], 1, 0).cases() == [("ppl", "prose", 1024), ("vt", "repeat", 1024)]


def test_cli_names_unimplemented_policy_in_one_line():
    name = next((p for p in ("recycled", "tidaldecode") if p not in POLICIES), "flash")
    result = CliRunner().invoke(main, ["eval", "run", "--policies", f"dense,{name}", "--lengths", "1k"])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    state = "is unknown" if name == "flash" else "is not implemented yet"
    assert len(lines) == 1 and f"'{name}' {state}" in lines[0] and "streaming" in lines[0], lines


def test_run_end_to_end_on_a_tiny_model(tiny_folder, tmp_path, monkeypatch):  # noqa: F811
    """niah_single and ppl x dense and streaming at 400 tokens: table, JSON and heatmap."""
    monkeypatch.setenv("TSEDGE_CACHE", str(tmp_path / "cache"))  # compile afresh, away from the user's cache
    out = tmp_path / "results" / "eval_tiny.json"
    result = CliRunner().invoke(main, [
        "eval", "run", "--model", str(tiny_folder), "--target", "llvm", "--dtype", "float32",
        "--tasks", "niah_single,ppl", "--haystacks", "repeat", "--policies", "dense,streaming",
        "--lengths", "400", "--samples", "1", "--n-init", "4", "--n-local", "32", "--chunk-size", "32",
        "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = result.stdout.splitlines()
    assert table[0] == "| task | dense 400 | streaming 400 |"
    assert table[2].startswith("| niah_single (repeat) | ") and table[3].startswith("| ppl (prose), perplexity | ")
    data = json.loads(out.read_text())
    assert data["info"]["target"] == "llvm" and set(data["config"]["policies"]) == {"dense", "streaming"}
    assert data["config"]["policies"]["streaming"]["n_local"] == 32
    cells = {(c["task"], c["policy"]): c for c in data["cells"]}
    assert set(cells) == {(t, p) for t in ("niah_single", "ppl") for p in ("dense", "streaming")}
    for policy in ("dense", "streaming"):
        (sample,) = cells["niah_single", policy]["samples"]
        assert 0 <= cells["niah_single", policy]["score"] == sample["score"] <= 1
        assert sample["prompt_tokens"] <= 400 and len(sample["references"]) == 1
        buckets = cells["ppl", policy]["buckets"]
        assert [b["end"] for b in buckets] == [100, 200, 300, 400]
        assert all(math.isfinite(b["loss"]) and b["ppl"] > 1 for b in buckets)
    # streaming attends to 4 + 32 tokens: at the first bucket's scored positions (68..99) it
    # already leaves some out, so its losses are not dense's
    assert cells["ppl", "dense"]["buckets"][0]["loss"] != cells["ppl", "streaming"]["buckets"][0]["loss"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(main, ["eval", "table", str(out)], catch_exceptions=False)
    assert again.exit_code == 0 and again.stdout.splitlines() == table


def fake_result(length: int, cells: dict[tuple[str, str], float], policy_budget: int = 128) -> dict:
    """A saved `eval run` result of one length with the given (task, policy) scores."""
    return {"info": {"model": "m"}, "config": {"tasks": list(dict.fromkeys(t for t, _ in cells)), "lengths": [length],
                                               "samples": 1, "policies": {"dense": {}, "streaming": {"n_local": policy_budget}}},
            "cells": [{"task": t, "haystack": "prose", "policy": p, "length": length, "score": v}
                      for (t, p), v in cells.items()]}


def test_merged_runs_make_one_table():
    short = fake_result(2048, {("vt", "dense"): 0.5, ("vt", "streaming"): 0.0, ("ppl", "dense"): 11.0,
                               ("ppl", "streaming"): 17.0})
    long = fake_result(4096, {("vt", "dense"): 0.25, ("vt", "streaming"): 0.125})
    assert format_table(merge([short, long])).splitlines() == [
        "| task | dense 2K | dense 4K | streaming 2K | streaming 4K |",
        "|---|---|---|---|---|",
        "| vt (prose) | 50 % | 25 % | 0 % | 12 % |",
        "| ppl (prose), perplexity | 11.00 | - | 17.00 | - |"]
    with pytest.raises(ValueError, match="policy streaming ran with different settings"):
        merge([short, fake_result(4096, {("vt", "dense"): 0.25}, policy_budget=64)])
    dense_only = fake_result(4096, {("vt", "dense"): 0.25})
    dense_only["config"]["policies"] = {"dense": {}}  # another run's policies: merged, not refused
    assert "dense 4K" in format_table(merge([short, dense_only])).splitlines()[0]
    with pytest.raises(ValueError, match="different models"):
        merge([short, {**long, "info": {"model": "other"}}])


def test_table_refuses_files_that_are_not_eval_results(tmp_path):
    (tmp_path / "log.txt").write_text("not json")
    (tmp_path / "bench.json").write_text('{"kind": "decode"}')
    for name, why in (("log.txt", "is not JSON"), ("bench.json", "is not a `tsedge eval run` result")):
        result = CliRunner().invoke(main, ["eval", "table", str(tmp_path / name)])
        assert result.exit_code != 0 and why in result.output and len(result.output.strip().splitlines()) == 1


def test_ppl_document_never_repeats_the_text(tok):
    sentences = prose_sentences()
    assert len(set(sentences)) == len(sentences) > 900
    with pytest.raises(ValueError, match="use shorter --lengths for ppl"):
        ppl.document(tok, 200_000, sample_rng(0, "ppl"))


def test_compile_only_builds_for_another_machine_then_runs_from_the_cache(tiny_folder, tmp_path, monkeypatch):  # noqa: F811
    """--compile-only compiles into TSEDGE_CACHE and stops (a CUDA target needs no GPU here); a
    later run with the same options finds its libraries there and compiles nothing, nor builds a
    TVM Target (a GPU machine with a runtime-only TVM cannot)."""
    monkeypatch.setenv("TSEDGE_CACHE", str(tmp_path / "cache"))
    common = ["eval", "run", "--model", str(tiny_folder), "--dtype", "float32", "--tasks", "ppl",
              "--policies", "dense", "--lengths", "300", "--samples", "1"]
    built = CliRunner().invoke(main, [*common, "--target", "llvm", "--compile-only"], catch_exceptions=False)
    assert built.exit_code == 0, built.output
    (path,) = built.stdout.split()
    assert path.startswith(str(tmp_path / "cache")) and Path(path).exists() and "| task |" not in built.stdout

    # as a runtime-only TVM (a GPU machine: no compiler, no Relax) runs it: no Target, no model builder
    out = tmp_path / "eval.json"
    code = ("import sys, tvm.target\n"
            "sys.modules['tsedge.compile.build'] = sys.modules['tsedge.models.attention'] = None\n"
            "def no_target(*a, **k): raise AssertionError('a Target was built')\n"
            "tvm.target.Target = no_target\n"
            "from tsedge.cli import main\n"
            f"main({[*common, '--target', 'llvm', '-o', str(out)]!r})\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(out.read_text())["cells"][0]["task"] == "ppl"

    targets = []  # a CUDA target on this GPU-less machine: compiled for, not refused
    monkeypatch.setattr("tsedge.library_cache.ensure_library", lambda cfg, policy, target, *a, **k: targets.append(target) or Path(path))
    built = CliRunner().invoke(main, [*common, "--target", "cuda:sm_90", "--compile-only"], catch_exceptions=False)
    assert built.exit_code == 0 and targets == ["cuda:sm_90"], built.output
