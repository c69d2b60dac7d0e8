"""``tsedge bench decode|prefill``: depth parsing, the table beside llama.cpp and the PNG plot."""

from __future__ import annotations

import pytest
from test_chat import tiny_folder, tiny_lib  # noqa: F401 (fixtures: a tiny model, 64-token cache)

from tsedge.bench import long_context as lc


def test_parse_depths():
    assert lc.parse_depths("0, 4k,32K,131072") == [0, 4096, 32768, 131072]
    with pytest.raises(ValueError, match="bad depth '4m': use token counts like 0,4k,32k,128k"):
        lc.parse_depths("0,4m")
    with pytest.raises(ValueError, match="unknown policy 'tidal'"):
        lc.variants(["dense", "tidal"], "decode")


def test_variants_take_given_budgets():
    chosen = lc.variants(["tidaldecode", "recycled", "tokenselect"], "decode", tidal_budget=2688, recycle_k=None)
    assert chosen["tidaldecode"].tidal_budget == 2688
    assert chosen["recycled"].recycle_k == lc.variants(["recycled"], "decode")["recycled"].recycle_k  # None: default
    assert chosen["tokenselect"].top_k == 2048


def test_variants_add_reselect_for_decode_only():
    assert list(lc.variants(["dense", "tokenselect"], "decode")) == ["dense", "tokenselect", "tokenselect-reselect"]
    assert list(lc.variants(["tokenselect"], "prefill")) == ["tokenselect"]
    assert lc.variants(["tokenselect"], "decode")["tokenselect-reselect"].selection_threshold > 1
    assert lc.variants(["streaming"], "decode")["streaming"].name == "streaming"  # any compiled policy


def test_variants_score_keys_per_tokenselect_variant():
    """--score-keys exact,int8: every TokenSelect variant twice (int8 suffixed), other policies once."""
    chosen = lc.variants(["dense", "tokenselect"], "decode", ("exact", "int8"))
    assert list(chosen) == ["dense", "tokenselect", "tokenselect-int8", "tokenselect-reselect",
                            "tokenselect-reselect-int8"]
    assert chosen["tokenselect-reselect-int8"].score_keys == "int8"
    assert chosen["tokenselect-reselect-int8"].selection_threshold > 1
    assert chosen["dense"].score_keys == chosen["tokenselect"].score_keys == "exact"


def _result(device: str) -> dict:
    rows = [{"policy": p, "depth": d, "ms_per_token": v} for p, d, v in
            [("dense", 0, 4.5), ("dense", 131072, 9.0), ("tokenselect", 131072, 4.4)]]
    return {"info": {"model": "llama3-8b", "device": device, "target": "cuda:sm_90"}, "kind": "decode", "rows": rows}


def test_table_puts_llamacpp_beside_on_the_same_gpu_only():
    table = lc.table(_result("NVIDIA H200"))
    assert table.splitlines()[0] == "| depth (ms per token) | dense | tokenselect | llama.cpp F16 |"
    assert "| 131072 | 9.00 | 4.40 | 12.21 |" in table and "| 0 | 4.50 | — | 4.85 |" in table
    assert "llama.cpp" not in lc.table(_result("NVIDIA A100"))


def test_quantized_libraries_get_llamacpps_quantized_numbers():
    """q4f16 sits beside llama.cpp's Q4_0 (peers.json ``models_q4_0``), q8f16 beside nothing."""
    q4 = _result("NVIDIA H200")
    q4["info"]["quantization"] = "q4f16"
    table = lc.table(q4)
    assert table.splitlines()[0].endswith("| llama.cpp Q4_0 |") and "| 0 | 4.50 | — | 3.10 |" in table
    assert "| 131072 | 9.00 | 4.40 | — |" in table  # 128K was not measured for Q4_0
    q4["info"]["quantization"] = "q8f16"
    assert "llama.cpp" not in lc.table(q4)


def test_plot_writes_png(tmp_path):
    lc.plot(_result("NVIDIA H200"), tmp_path / "decode.png")
    assert (tmp_path / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_measures_every_variant_and_depth(tiny_lib):
    """On the CPU with a tiny library (random weights): one row per variant and depth, and TTFT."""
    libs = {"dense": tiny_lib, "again": tiny_lib}
    decode = lc.run("decode", libs, [0, 16], steps=4, chunk=8, log=lambda _m: None)
    assert [(r["policy"], r["depth"], r["steps"]) for r in decode["rows"]] == [
        ("dense", 0, 4), ("dense", 16, 4), ("again", 0, 4), ("again", 16, 4)]
    assert all(r["ms_per_token"] > 0 for r in decode["rows"]) and decode["info"]["target"] == "llvm"
    prefill = lc.run("prefill", {"dense": tiny_lib}, [0, 16], chunk=8, log=lambda _m: None, ttft=40)
    assert [(r["depth"], r["tokens"]) for r in prefill["rows"]] == [(0, 8), (16, 8)]
    assert prefill["ttft"][0]["tokens"] == 40 and prefill["ttft"][0]["seconds"] > 0


def test_bench_command_writes_json_png_and_table(tiny_lib, tmp_path):
    import json
    import shutil

    from click.testing import CliRunner

    from tsedge.cli import main

    libs = tmp_path / "libs"
    libs.mkdir()
    for suffix in (".so", ".json"):
        shutil.copy(tiny_lib.with_suffix(suffix), libs / f"dense{suffix}")
    result = CliRunner().invoke(main, ["bench", "prefill", "--policies", "dense", "--lib-dir", str(libs),
                                       "--depths", "0,16", "--chunk", "8", "--ttft", "24", "-o",
                                       str(tmp_path), "--tag", "t"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "| depth (tok/s, 8-token chunk) | dense |"
    assert "TTFT of a 24-token prompt, dense:" in result.stdout
    saved = json.loads((tmp_path / "t.json").read_text())
    assert [r["depth"] for r in saved["rows"]] == [0, 16] and saved["info"]["tvm"]
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    missing = CliRunner().invoke(main, ["bench", "decode", "--lib-dir", str(libs)])
    assert missing.exit_code == 1 and "tokenselect.so" in missing.output  # names the missing library


def test_bench_decode_over_shards(tmp_path):
    """`bench decode --tensor-parallel 1,3` (SmolLM2's shapes: 3 KV heads) on the CPU: both shard
    counts measured with the same random weights, the sharded rows with their all-reduce times,
    the table labelled by shard count and the GPUs plot written."""
    import json

    from click.testing import CliRunner

    from tsedge.cli import main

    args = ["bench", "decode", "--preset", "smollm2-135m", "--policies", "dense", "--target", "llvm",
            "--depths", "0,64", "--steps", "2", "--chunk", "16", "--tensor-parallel", "1,3",
            "--lib-dir", str(tmp_path / "libs")]
    assert CliRunner().invoke(main, args + ["--compile-only"]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "libs").glob("*.so")) == ["dense-tp3.so", "dense.so"]
    result = CliRunner().invoke(main, args + ["-o", str(tmp_path), "--tag", "tp"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "| depth (ms per token) | dense | dense-tp3 |"
    rows = json.loads((tmp_path / "tp.json").read_text())["rows"]
    assert [(r["policy"], r["tensor_parallel"]) for r in rows] == [("dense", 1)] * 2 + [("dense-tp3", 3)] * 2
    assert all(r["allreduce_hidden_us"] > 0 and r["allreduces_per_step"] == 60 for r in rows[2:])
    assert (tmp_path / "tp_gpus.png").read_bytes()[:4] == b"\x89PNG"
