"""The ``tsedge`` CLI end to end on the CPU, and its errors for bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_chat import tiny_folder, tiny_lib  # noqa: F401 (fixtures: a tiny model, 64-token cache)
from tiny_model import make_tiny_hf_model

import tsedge.cli_options
from tsedge.cli import main
from tsedge.cli_options import PrefillDisplay, sampling_params
from tsedge.compile.targets import has_cuda_gpu
from tsedge.engine import Engine
from tsedge.sampling import SamplingParams, generation_config_defaults
from tsedge.weights import load_source


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def test_models_lists_presets():
    result = run("models")
    assert result.exit_code == 0
    for name in ("smollm2-135m", "llama3-8b", "llama3.1-8b", "llama3.2-1b", "llama3.2-3b", "qwen2-7b"):
        assert name in result.output


def test_generate_json(smol_lib):
    result = run("generate", "--lib", str(smol_lib), "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "16", "--temperature", "0", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # stdout holds one JSON object and nothing else
    assert "Paris" in out["text"]
    assert out["prompt_tokens"] > 10 and 1 <= out["generated_tokens"] <= 16
    assert out["ttft_s"] > 0 and out["prefill_tok_per_s"] > 0 and out["decode_tok_per_s"] > 0
    assert out["policy"] == "dense"


def tiny_generate(folder, lib, *args: str) -> dict:
    result = run("generate", "--model", str(folder), "--lib", str(lib), "--prompt", "Hi there.",
                 "--temperature", "0", "--json", *args)
    assert result.exit_code == 0, result.output
    return {"json": json.loads(result.stdout), "stderr": result.stderr}


def test_generate_stops_cleanly_at_a_full_cache(tiny_folder, tiny_lib):
    tokenizer = load_source(str(tiny_folder)).tokenizer
    prompt = len(tokenizer.encode_chat([{"role": "user", "content": "Hi there."}]))
    out = tiny_generate(tiny_folder, tiny_lib, "--max-new-tokens", "100")
    assert out["json"]["stopped"] == "context_full"
    assert out["json"]["generated_tokens"] == 64 - prompt + 1  # the last one never enters the cache
    assert out["stderr"] == ("[stopped: the KV cache of 64 tokens is full; use a library compiled "
                             "with a larger --max-context for longer replies]\n")


def test_max_new_tokens_one(tiny_folder, tiny_lib):
    assert tiny_generate(tiny_folder, tiny_lib, "--max-new-tokens", "1")["json"]["generated_tokens"] == 1


def test_sampling_defaults_come_from_the_generation_config(tmp_path):
    kw = {"temperature": None, "top_p": 0.5, "top_k": None, "repetition_penalty": None,
          "presence_penalty": 0.0, "frequency_penalty": 0.0, "repeat_last_n": 64, "seed": None}
    assert sampling_params(tmp_path, kw) == SamplingParams(0.7, 0.5, 0, 1.1, 0.0)
    assert sampling_params(tmp_path, {**kw, "frequency_penalty": 0.5}).frequency_penalty == 0.5
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.3, "top_k": 20, "repetition_penalty": 1.05}))
    assert sampling_params(tmp_path, kw) == SamplingParams(0.3, 0.5, 20, 1.05, 0.0)
    assert sampling_params(tmp_path, {**kw, "temperature": 0.0}).temperature == 0.0  # greedy
    embedded = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"  # the embedded model: greedy
    assert sampling_params(embedded, {**kw, "top_p": None}) == SamplingParams(0.0, 0.9, 0, 1.1, 0.0)
    assert sampling_params(embedded, {**kw, "temperature": 0.8}).temperature == 0.8


def test_prefill_display_only_for_long_prefills_on_a_terminal(monkeypatch):
    bars = []

    class Bar:
        def __init__(self, _description, total):
            self.total, self.done, self.open = total, [], True
            bars.append(self)

        def __enter__(self):
            return self.done.append

        def __exit__(self, *exc_info):
            self.open = False

    monkeypatch.setattr(tsedge.cli_options, "token_progress", Bar)
    for tty in (False, True):
        monkeypatch.setattr(tsedge.cli_options, "interactive", lambda tty=tty: tty)
        with PrefillDisplay(chunk=512) as display:
            for done, total in [(0, 300), (300, 300), (0, 1000), (512, 1000), (1000, 1000)]:
                display(done, total)
    assert [(bar.total, bar.done, bar.open) for bar in bars] == [(1000, [0, 512, 1000], False)]


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
    # it samples as the embedded model does (greedy), not at the peers' temperature 0.7
    assert generation_config_defaults(tmp_path / "w") == {"temperature": 0.0}


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


def test_vulkan_without_wgpu_is_refused_before_compiling(monkeypatch):
    """No wgpu: one line naming the install, and no library compiled first."""
    import builtins

    import tsedge.library_cache

    real_import = builtins.__import__

    def no_wgpu(name, *args, **kwargs):
        if name == "wgpu":
            raise ImportError("no wgpu")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wgpu)
    monkeypatch.setattr(tsedge.library_cache, "ensure_library",
                        lambda *a, **k: pytest.fail("compiled before checking wgpu"))
    result = run("generate", "--target", "vulkan", "--prompt", "hi")
    assert result.exit_code != 0
    assert "pip install 'tsedge[vulkan]'" in result.output and "Traceback" not in result.output


NOT_UTF8 = ("not UTF-8 text (byte 0xe9 at offset 3); re-encode it as UTF-8, e.g. with iconv -f "
            "latin1 -t utf-8")


def test_non_utf8_prompt_and_prompt_file(tmp_path):
    prompt_file = tmp_path / "latin1.txt"
    prompt_file.write_bytes(b"Caf\xe9")
    argv = "Caf\udce9"  # what click gets for the argument $'Caf\xe9' (PEP 383)
    assert run("generate", "--prompt", argv).stderr.splitlines()[-1] == (
        f"Error: Invalid value for '--prompt': {NOT_UTF8}")
    assert run("chat", "--system", argv).stderr.splitlines()[-1] == (
        f"Error: Invalid value for '--system': {NOT_UTF8}")
    result = run("generate", "--prompt-file", str(prompt_file))
    assert result.exit_code == 1 and result.stderr == f"Error: {prompt_file}: {NOT_UTF8}\n"


def test_empty_prompt_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    result = run("generate", "--prompt-file", str(empty))
    assert result.exit_code == 1 and result.stderr == f"Error: the prompt file {empty} is empty; give the text to answer\n"
    assert run("generate", "--prompt", "").stderr == "Error: the prompt is empty; give the text to answer\n"


def _range(option: str, value: str, rule: str) -> str:
    return f"Error: Invalid value for '{option}': {value} is not in the range {rule}."


def _not_finite(option: str, value: str) -> str:
    return f"Error: Invalid value for '{option}': '{value}' is not a finite number."


@pytest.mark.parametrize("args, error", [
    (["generate", "--max-new-tokens", "0"], _range("--max-new-tokens", "0", "x>=1")),
    (["generate", "--max-new-tokens", "-5"], _range("--max-new-tokens", "-5", "x>=1")),
    (["chat", "--max-new-tokens", "0"], _range("--max-new-tokens", "0", "x>=1")),
    (["generate", "--temperature", "-0.5"], _range("--temperature", "-0.5", "x>=0")),
    (["generate", "--temperature", "nan"], _not_finite("--temperature", "nan")),
    (["chat", "--temperature", "inf"], _not_finite("--temperature", "inf")),
    (["generate", "--top-p", "0"], _range("--top-p", "0.0", "0<x<=1")),
    (["chat", "--top-p", "1.5"], _range("--top-p", "1.5", "0<x<=1")),
    (["generate", "--top-k", "-1"], _range("--top-k", "-1", "x>=0")),
    (["chat", "--repetition-penalty", "0"], _range("--repetition-penalty", "0.0", "x>0")),
    (["generate", "--presence-penalty", "2.5"], _range("--presence-penalty", "2.5", "-2<=x<=2")),
    (["generate", "--frequency-penalty", "-3"], _range("--frequency-penalty", "-3.0", "-2<=x<=2")),
    (["generate", "--seed", "-1"], _range("--seed", "-1", "x>=0")),
    (["compile", "--n-init", "-1"], _range("--n-init", "-1", "x>=0")),
    (["compile", "--n-local", "0"], _range("--n-local", "0", "x>=1")),
    (["compile", "--select-top-k", "0"], _range("--select-top-k", "0", "x>=1")),
    (["compile", "--chunk-size", "0"], _range("--chunk-size", "0", "x>=1")),
    (["compile", "--selection-threshold", "nan"], _not_finite("--selection-threshold", "nan")),
    (["compile", "--selection-threshold", "-2"], _range("--selection-threshold", "-2.0", "x>=-1")),
    (["compile", "--pool-kernel", "-1"], _range("--pool-kernel", "-1", "x>=0")),
    (["compile", "--max-context", "0"], _range("--max-context", "0", "x>=1")),
    (["bench", "speed", "--steps", "0"], _range("--steps", "0", "x>=1")),
    (["bench", "speed", "--prefill", "2048,0"], _range("--prefill", "0", "x>=1")),
    (["bench", "speed", "--decode-context", "1k"],
     "Error: Invalid value for '--decode-context': '1k' is not a valid integer range."),
    (["eval", "passkey", "--lengths", "-4096"], _range("--lengths", "-4096", "x>=1")),
    (["eval", "passkey", "--depths", "0,1.5"], _range("--depths", "1.5", "0<=x<=1")),
    (["eval", "passkey", "--keys", "0"], _range("--keys", "0", "x>=1")),
    (["eval", "passkey", "--seed", "-1"], _range("--seed", "-1", "x>=0")),
    (["eval", "agreement", "--steps", "0"], _range("--steps", "0", "x>=1")),
    (["eval", "agreement", "--lengths", "0"], _range("--lengths", "0", "x>=1")),
])
def test_numeric_options_out_of_range(args, error):
    result = run(*args)
    assert result.exit_code == 2 and result.stderr.splitlines()[-1] == error


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


def test_usage_errors_are_one_line():
    result = run("generate", "--max-new-tokens", "0", "--prompt", "x")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [_range("--max-new-tokens", "0", "x>=1")]
    assert run("nonsense").output.strip() == "Error: No such command 'nonsense'."


def test_bad_target_fails_before_the_model_loads(monkeypatch):
    import tsedge.weights

    def never(*_args):
        raise AssertionError("the model was loaded before the target was checked")

    monkeypatch.setattr(tsedge.weights, "load_source", never)
    result = run("generate", "--target", "cuda:sm_61", "--prompt", "x")
    assert result.exit_code == 1 and result.output.startswith("Error: bad CUDA arch 'sm_61'")
    if not has_cuda_gpu():  # no GPU here: a CUDA target fails before anything is compiled
        result = run("chat", "--target", "cuda")
        assert result.exit_code == 1 and result.output.count("\n") == 1
        assert "none is visible; use --target llvm" in result.output


def test_score_keys_refused_before_the_model_loads(monkeypatch):
    """--score-keys int8 with another policy, or on Vulkan: one line, before any model work (and
    before asking for wgpu-native)."""
    import tsedge.weights

    monkeypatch.setattr(tsedge.weights, "load_source", lambda *_: pytest.fail("the model was loaded"))
    for args, want in ((["--policy", "dense"], "use it with --policy tokenselect"),
                       (["--policy", "tokenselect", "--target", "vulkan"], "Vulkan's WGSL has no 8-bit storage")):
        for command in (["generate", "--prompt", "x"], ["chat"]):
            result = run(*command, "--score-keys", "int8", *args)
            assert result.exit_code == 1 and result.output.count("\n") == 1 and want in result.output


def test_lib_given_its_metadata_file(tmp_path):
    meta = tmp_path / "model.json"
    meta.write_text("{}")
    result = run("generate", "--lib", str(meta), "--prompt", "x")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "give the library itself, model.so" in result.output


def _library_like(tiny_lib, folder, target: str):
    """An empty .so with ``tiny_lib``'s metadata for ``target``."""
    meta = json.loads(tiny_lib.with_suffix(".json").read_text())
    meta["target"] = target
    lib = folder / f"{target.replace(':', '-')}.so"
    lib.write_bytes(b"")
    lib.with_suffix(".json").write_text(json.dumps(meta))
    return lib


def test_cuda_library_without_a_cuda_driver(tiny_lib, tmp_path, monkeypatch):
    import ctypes

    def no_driver(*_args, **_kwargs):
        raise OSError("libcuda.so.1: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(ctypes, "CDLL", no_driver)  # as on a machine without NVIDIA's driver
    result = run("generate", "--lib", str(_library_like(tiny_lib, tmp_path, "cuda:sm_90")), "--prompt", "x")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "no CUDA driver" in result.output and "--target llvm" in result.output


def test_unloadable_library_file(tiny_lib, tmp_path):
    result = run("generate", "--lib", str(_library_like(tiny_lib, tmp_path, "llvm")), "--prompt", "x")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "cannot be loaded" in result.output and "tsedge compile" in result.output
