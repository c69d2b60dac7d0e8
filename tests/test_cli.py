"""The ``tsedge`` CLI end to end on the CPU, and its errors for bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_model import make_tiny_hf_model

from tsedge.cli import main
from tsedge.engine import Engine


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def test_models_lists_presets():
    result = run("models")
    assert result.exit_code == 0
    for name in ("smollm2-135m", "llama3-8b", "llama3.1-8b", "llama3.2-1b", "llama3.2-3b", "qwen2-7b"):
        assert name in result.output


def test_generate_json(smol_lib):
    result = run("generate", "--lib", str(smol_lib), "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "16", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert "Paris" in out["text"]
    assert out["prompt_tokens"] > 10 and 1 <= out["generated_tokens"] <= 16
    assert out["ttft_s"] > 0 and out["decode_tok_per_s"] > 0 and out["policy"] == "dense"


def test_chat_reset_and_exit(smol_lib):
    result = run("chat", "--lib", str(smol_lib), "--max-new-tokens", "8",
                 input="Say hi.\n/reset\n/exit\n")
    assert result.exit_code == 0
    assert "[conversation cleared]" in result.output


def test_convert_folder_runs_like_the_gguf(smol_lib, smol_source, tmp_path):
    assert run("convert", "--model", "smollm2-135m", "-o", str(tmp_path / "w")).exit_code == 0
    ids = smol_source.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    converted = Engine(smol_lib, str(tmp_path / "w")).prefill(ids)
    original = Engine(smol_lib, smol_source).prefill(ids)
    assert converted.argmax() == original.argmax()
    assert np.abs(converted - original).max() < 0.1  # float16 weights vs float32


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/model.gguf", "--prompt", "x"], "no such file"),
    (["generate", "--model", "gpt-17", "--prompt", "x"], "unknown model name"),
    (["compile", "--model", "smollm2-135m", "--target", "tpu"], "unknown target"),
    (["compile", "--model", "smollm2-135m", "--target", "cuda:volta"], "bad CUDA arch"),
    (["compile", "--policy", "tokenselect", "--chunk-size", "1024", "--n-local", "512"], "chunk_size"),
])
def test_bad_inputs_are_clear_errors(args, message):
    result = run(*args)
    assert result.exit_code != 0
    assert message in result.output


def test_context_longer_than_cache(smol_lib, tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("All work and no play makes Jack a dull boy. " * 200)  # > 1024 tokens
    result = run("generate", "--lib", str(smol_lib), "--prompt-file", str(prompt))
    assert result.exit_code != 0
    assert "exceeds the KV cache of 1024 tokens" in result.output


def test_corrupt_weights(smol_lib, smol_source, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(smol_source.path.read_bytes()[: 5 * 2**20])  # truncated download
    result = run("generate", "--lib", str(smol_lib), "--model", str(bad), "--prompt", "x")
    assert result.exit_code != 0
    assert "broken.gguf" in result.output


def test_wrong_library_for_weights(smol_lib, tmp_path):
    tiny = make_tiny_hf_model(tmp_path / "tiny")
    result = run("generate", "--lib", str(smol_lib), "--model", str(tiny), "--prompt", "x")
    assert result.exit_code != 0
    assert "do not match library" in result.output


def test_missing_library(tmp_path):
    result = run("generate", "--lib", str(tmp_path / "nothing.so"), "--prompt", "x")
    assert result.exit_code != 0
    assert "tsedge compile" in result.output
