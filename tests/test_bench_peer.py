"""``tsedge bench speed --peer llama.cpp``: the missing-peer line, the ratio table, the JSON and PNG
(llama-cpp-python is not needed: the peer's measurement is replaced by given numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from test_chat import tiny_folder, tiny_lib  # noqa: F401 (fixtures: a tiny model, 64-token cache)

from tsedge.bench import llamacpp_peer as lp
from tsedge.bench.speed import cpu_info, ids_digest
from tsedge.cli_bench import run_speed, speed_setup


@pytest.fixture
def no_llama_cpp(monkeypatch):
    real = lp.importlib.util.find_spec
    monkeypatch.setattr(lp.importlib.util, "find_spec", lambda name: None if name == "llama_cpp" else real(name))


def test_missing_peer_is_one_line_naming_the_install_command(no_llama_cpp, tiny_folder):  # noqa: F811
    message = lp.missing_message()
    assert message.startswith("--peer llama.cpp needs llama-cpp-python") and "\n" not in message
    assert 'pip install -e ".[bench]"' in message
    with pytest.raises(click.ClickException, match=r'pip install -e "\.\[bench\]"'):
        speed_setup("llama.cpp", 2, "no-such-model.gguf")  # checked before the model is looked for
    threads, source = speed_setup(None, 2, str(tiny_folder))  # without --peer nothing is checked
    assert threads == 2 and source.path == tiny_folder


def test_cli_missing_peer_fails_before_compiling(no_llama_cpp, tmp_path):
    from tsedge.cli import main

    result = CliRunner().invoke(main, ["bench", "speed", "--peer", "llama.cpp", "--model", str(tmp_path / "x.gguf")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and 'pip install -e ".[bench]"' in lines[0] and "Traceback" not in result.output


def test_peer_needs_a_gguf_file(monkeypatch, tiny_folder):  # noqa: F811
    monkeypatch.setattr(lp, "missing_message", lambda: None)
    with pytest.raises(click.ClickException, match="reads GGUF files only, and .*tiny-chat-model is not one"):
        speed_setup("llama.cpp", 2, str(tiny_folder))


def test_threads_default_to_usable_cores_and_reach_tvm(monkeypatch, tiny_folder):  # noqa: F811
    import os

    monkeypatch.setenv("TVM_NUM_THREADS", "")  # restored after the test
    assert speed_setup(None, None, str(tiny_folder))[0] == len(os.sched_getaffinity(0))
    assert os.environ["TVM_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))
    speed_setup(None, 3, str(tiny_folder))
    assert os.environ["TVM_NUM_THREADS"] == "3"


def _result() -> dict:
    def run(flash: bool, prefill: list[float], decode: list[float]) -> dict:
        return {"flash_attention": flash,
                "prefill": [{"tokens": n, "tok_per_s": v} for n, v in zip([2048, 7168], prefill)],
                "decode": [{"context": n, "tok_per_s": v} for n, v in zip([128, 2048], decode)]}

    return {"info": {"model": "smollm2-135m", "threads": 2, "quantization": "q4f16", "cpu_model": "Test CPU"},
            "prefill": [{"tokens": 2048, "tok_per_s": 150.0}, {"tokens": 7168, "tok_per_s": 90.0}],
            "decode": [{"context": 128, "tok_per_s": 60.0}, {"context": 2048, "tok_per_s": 33.0}],
            "peer": {"model_type": "Q4_1", "runs": [run(True, [400.0, 300.0], [100.0, 22.0]),
                                                    run(False, [380.0, 250.0], [90.0, 55.0])]}}


def test_ratios_and_table_on_given_numbers():
    """The ratio is taken against the faster llama.cpp setting of each row."""
    result = _result()
    result["ratios"] = lp.ratios(result)
    assert [(r["kind"], r.get("tokens", r.get("context")), r["ratio"]) for r in result["ratios"]] == [
        ("prefill", 2048, 0.375), ("prefill", 7168, 0.3), ("decode", 128, 0.6), ("decode", 2048, 0.6)]
    assert result["ratios"][3]["llama.cpp"] == {"FA on": 22.0, "FA off": 55.0}
    assert lp.table(result).splitlines() == [
        "| smollm2-135m, 2 threads | tsedge q4f16 | llama.cpp Q4_1 FA on | llama.cpp Q4_1 FA off "
        "| tsedge / faster llama.cpp |",
        "|---|---|---|---|---|",
        "| prefill 2048 tokens | 150.0 tok/s | 400.0 tok/s | 380.0 tok/s | 0.38× |",
        "| prefill 7168 tokens | 90.0 tok/s | 300.0 tok/s | 250.0 tok/s | 0.30× |",
        "| decode after 128 | 60.0 tok/s | 100.0 tok/s | 90.0 tok/s | 0.60× |",
        "| decode after 2048 | 33.0 tok/s | 22.0 tok/s | 55.0 tok/s | 0.60× |"]


def test_greedy_agreement_counts_equal_leading_picks():
    result = _result()
    result["decode"][0]["tokens"] = [5, 6, 7, 8]
    result["decode"][1]["tokens"] = [1, 2, 3]
    result["peer"]["runs"][0]["decode"][0]["tokens"] = [5, 6, 9, 8]  # FA on parts at the third pick
    result["peer"]["runs"][1]["decode"][0]["tokens"] = [5, 6, 7, 8]
    result["peer"]["runs"][0]["decode"][1]["tokens"] = [1, 2, 3]
    result["peer"]["runs"][1]["decode"] = result["peer"]["runs"][1]["decode"][:1]  # 2048 not run with FA off
    result["greedy"] = lp.greedy_agreement(result)
    assert result["greedy"] == [{"context": 128, "picks": 4, "equal_prefix": {"FA on": 2, "FA off": 4}},
                                {"context": 2048, "picks": 3, "equal_prefix": {"FA on": 3}}]
    result["greedy"][0]["margin"] = 0.0123
    result["ratios"] = lp.ratios(result)
    assert lp.table(result).splitlines()[-2:] == [
        "greedy picks after 128: the first 2 (FA on), 4 (FA off) of 4 equal; at the first difference tsedge's "
        "logit of its pick leads llama.cpp's pick by 0.0123",
        "greedy picks after 2048: the first 3 (FA on) of 3 equal"]


def test_ratios_skip_what_the_peer_did_not_measure():
    result = _result()
    for run in result["peer"]["runs"]:
        run["decode"] = run["decode"][:1]
    assert [r.get("context") for r in lp.ratios(result) if r["kind"] == "decode"] == [128]
    result["peer"]["runs"][1]["prefill"] = []  # one setting missing a row: "—" in its column
    assert "| prefill 2048 tokens | 150.0 tok/s | 400.0 tok/s | — | 0.38× |" in lp.table(
        {**result, "ratios": lp.ratios(result)})


def test_cpu_info_reads_model_id_and_flags():
    text = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 207\n"
            "model name\t: Intel(R) Xeon(R) Processor\nstepping\t: 2\nflags\t\t: fpu avx2 fma avx512f avx512_vnni\n\n"
            "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\n\n")
    assert cpu_info(text) == {"cpu_model": "Intel(R) Xeon(R) Processor", "cpu_id": "cpu family 6 model 207 stepping 2",
                              "cpu_logical": 2, "cpu_flags": ["avx2", "fma", "avx512f", "avx512_vnni"]}


def test_run_speed_writes_the_json_schema_and_png(tiny_folder, tiny_lib, tmp_path, monkeypatch):  # noqa: F811
    """The whole body on the tiny CPU library; the peer answers with fixed numbers, and must be
    given exactly the ids tsedge ran."""
    from tsedge.engine import Engine
    from tsedge.weights import load_source

    asked = {}

    def fake_measure(gguf, prefill, decode, steps, threads):
        asked.update(gguf=gguf, prefill=prefill, decode=decode, steps=steps, threads=threads)
        return {"name": "llama.cpp", "model_type": "Q4_1", "runs": [
            {"flash_attention": flash, "settings": {"n_threads": threads},
             "prefill": [{"tokens": n, "tok_per_s": 100.0, "ids": ids_digest(v)} for n, v in prefill.items()],
             "decode": [{"context": n, "tok_per_s": 50.0, "ids": ids_digest(v), "tokens": [7, 8, 9, 10, 11]}
                        for n, v in decode.items()]}
            for flash in (True, False)]}

    monkeypatch.setattr(lp, "measure", fake_measure)
    engine = Engine(tiny_lib, load_source(str(tiny_folder)))
    out = tmp_path / "r" / "cmp.json"
    run_speed(engine, Path("m.gguf"), [16, 32], [8], 3, str(out), "llama.cpp", 2)
    saved = json.loads(out.read_text())
    assert set(saved) == {"info", "prefill", "decode", "peer", "ratios", "greedy"}
    assert {"cpu_model", "cpu_flags", "threads", "tvm_threads", "tvm", "tsedge", "quantization",
            "model_file", "date"} <= set(saved["info"])
    assert saved["info"]["threads"] == 2 and asked["threads"] == 2 and asked["steps"] == 3
    assert [len(v) for v in asked["prefill"].values()] == [16, 32] and asked["decode"][8] == asked["prefill"][16][:8]
    # both engines were fed the same ids (the digests agree row for row)
    for run in saved["peer"]["runs"]:
        assert [r["ids"] for r in saved["prefill"]] == [r["ids"] for r in run["prefill"]]
        assert [r["ids"] for r in saved["decode"]] == [r["ids"] for r in run["decode"]]
    assert saved["decode"][0]["steps"] == 3 and len(saved["decode"][0]["tokens"]) == 3 + 2
    assert [r["kind"] for r in saved["ratios"]] == ["prefill", "prefill", "decode"]
    assert all(r["ratio"] == round(r["tsedge"] / max(r["llama.cpp"].values()), 3) for r in saved["ratios"])
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rounds_tok_per_s" not in saved["prefill"][0]
    ours, (greedy,) = saved["decode"][0]["tokens"], saved["greedy"]
    first = next((i for i, (a, b) in enumerate(zip(ours, [7, 8, 9, 10, 11])) if a != b), 5)
    assert greedy["equal_prefix"] == {"FA on": first, "FA off": first} and greedy["picks"] == 5
    if first < 5:  # tsedge's logits where the picks part: its own pick leads (argmax, fed the common prefix)
        assert greedy["first_difference"] == first and greedy["tsedge_pick"] == ours[first]
        assert greedy["margin"] >= -1e-4 and greedy["scale"] > 0


def test_rounds_keep_the_best_of_each_row():
    """``--rounds``: per row the round with the most tok/s, every round's tok/s beside it; the
    peer's runs likewise, their other fields kept."""
    rounds = [{"prefill": [{"tokens": 16, "tok_per_s": 10.0, "seconds": 1.6}, {"tokens": 32, "tok_per_s": 9.0}],
               "decode": [{"context": 8, "tok_per_s": 5.0, "tokens": [1, 2]}]},
              {"prefill": [{"tokens": 16, "tok_per_s": 12.0, "seconds": 1.3}, {"tokens": 32, "tok_per_s": 8.0}],
               "decode": [{"context": 8, "tok_per_s": 4.0, "tokens": [1, 2]}]}]
    best = lp.best_of_rounds(rounds)
    assert best["prefill"] == [{"tokens": 16, "tok_per_s": 12.0, "seconds": 1.3, "rounds_tok_per_s": [10.0, 12.0]},
                               {"tokens": 32, "tok_per_s": 9.0, "rounds_tok_per_s": [9.0, 8.0]}]
    assert best["decode"][0]["tok_per_s"] == 5.0 and best["decode"][0]["rounds_tok_per_s"] == [5.0, 4.0]
    assert lp.best_of_rounds(rounds[:1]) == rounds[0]
    peer = [{"name": "llama.cpp", "runs": [{"flash_attention": True, **r}]} for r in rounds]
    merged = lp.best_peer_of_rounds(peer)
    assert merged["name"] == "llama.cpp" and merged["runs"][0]["flash_attention"] is True
    assert merged["runs"][0]["prefill"] == best["prefill"]


def test_round_ratios_pair_the_engines_round_by_round():
    """With rounds, each round's ratio is tsedge's tok/s of that round over the faster llama.cpp
    setting of the same round, beside the ratio of the bests; the table prints them and their median."""
    ours = [{"prefill": [{"tokens": 16, "tok_per_s": t}], "decode": []} for t in (10.0, 6.0, 8.0)]
    theirs = [{"prefill": [{"tokens": 16, "tok_per_s": t}], "decode": []} for t in (9.0, 4.0, 4.0)]
    slow = [{"prefill": [{"tokens": 16, "tok_per_s": t}], "decode": []} for t in (5.0, 5.0, 2.0)]
    peer = [{"name": "llama.cpp", "model_type": "Q4_1",
             "runs": [{"flash_attention": True, **a}, {"flash_attention": False, **b}]} for a, b in zip(theirs, slow)]
    result = {"info": {"model": "m", "threads": 2, "quantization": "q4_1"}, **lp.best_of_rounds(ours),
              "peer": lp.best_peer_of_rounds(peer)}
    (row,) = lp.ratios(result)
    assert row["ratio"] == round(10.0 / 9.0, 3)
    assert row["round_ratios"] == [round(10 / 9, 3), 1.2, 2.0] and row["median_round_ratio"] == 1.2
    result["ratios"] = [row]
    assert "1.11 / 1.20 / 2.00× (1.20×)" in lp.table(result)
