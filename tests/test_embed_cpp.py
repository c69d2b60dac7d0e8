"""examples/cpp: built with CMake against the TVM runtime of the installed wheels, it generates the
Python engine's greedy ids from a library and a `tsedge convert` folder, and refuses bad files in
one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from test_chat import tiny_folder, tiny_lib  # noqa: F401 (fixtures: a tiny model, 64-token cache)

from tsedge.cli import main
from tsedge.engine import Engine
from tsedge.models.config import ModelConfig
from tsedge.weights import expected_shapes, load_source, save_weights_folder

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cpp"
COMPILER = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or COMPILER is None,
                                reason="the C++ example needs cmake and a C++ compiler (apt install cmake g++)")


@pytest.fixture(scope="module")
def tsedge_run(tmp_path_factory) -> Path:
    """The example's executable, configured and built in a temporary folder."""
    build = tmp_path_factory.mktemp("cpp-build")
    for cmd in (["cmake", "-S", str(EXAMPLE), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}"],
                ["cmake", "--build", str(build), "-j2"]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    return build / "tsedge_run"


@pytest.fixture(scope="module")
def tiny_weights(tiny_folder, tmp_path_factory) -> Path:  # noqa: F811
    """The tiny model as `tsedge convert` writes it."""
    out = tmp_path_factory.mktemp("tiny-converted") / "weights"
    result = CliRunner().invoke(main, ["convert", "--model", str(tiny_folder), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def run(exe: Path, lib: Path, weights: Path, ids: list[int], *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), str(lib), str(weights), *options, *map(str, ids)],
                          capture_output=True, text=True, timeout=300)


def cpp_ids(exe: Path, lib: Path, weights: Path, ids: list[int], *options: str) -> list[int]:
    result = run(exe, lib, weights, ids, *options)
    assert result.returncode == 0, result.stderr
    return [int(t) for t in result.stdout.split()]


def engine_ids(lib: Path, weights: Path, ids: list[int], max_new_tokens: int, **engine) -> list[int]:
    """The Python engine's greedy ids (no stop id, as the example without --stop)."""
    return Engine(lib, str(weights), **engine).generate(ids, max_new_tokens, stop_ids=[]).tokens


def compile_lib(model: Path, out: Path, *options: str) -> Path:
    result = CliRunner().invoke(main, ["compile", "--model", str(model), "--target", "llvm", "--dtype", "float32",
                                       "-o", str(out), *options])
    assert result.exit_code == 0, result.output
    return out


def test_links_the_runtime_only(tsedge_run):
    libs = subprocess.run(["ldd", str(tsedge_run)], capture_output=True, text=True, check=True).stdout
    assert "libtvm_runtime.so" in libs and "libtvm_ffi.so" in libs
    assert "libtvm_compiler" not in libs and "libtvm.so" not in libs


def test_dense_ids_equal_the_engine(tsedge_run, tiny_lib, tiny_weights):  # noqa: F811
    tokenizer = load_source(str(tiny_weights)).tokenizer
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Hi there."}])
    # 8-token chunks; 60 new tokens run into the 64-token KV cache (stopped "context_full")
    expected = engine_ids(tiny_lib, tiny_weights, prompt, 60, prefill_chunk=8)
    assert len(prompt) + len(expected) - 1 == 64
    chunked = cpp_ids(tsedge_run, tiny_lib, tiny_weights, prompt, "--prefill-chunk", "8", "--max-new-tokens", "60")
    assert chunked == expected
    short = cpp_ids(tsedge_run, tiny_lib, tiny_weights, prompt, "--max-new-tokens", "5")
    assert short == engine_ids(tiny_lib, tiny_weights, prompt, 5)
    stop = short[2]
    stopped = cpp_ids(tsedge_run, tiny_lib, tiny_weights, prompt, "--stop", f"{stop},299")
    assert stopped == short[:short.index(stop) + 1]


def random_weights(tiny_weights: Path, folder: Path) -> Path:
    """A 2-layer model (head_dim 64, one KV head) with random weights, written to ``folder``."""
    config = ModelConfig("tiny-ts", hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                         num_kv_heads=1, vocab_size=300, head_dim=64, context_window=256)
    rng = np.random.default_rng(0)
    params = ((name, rng.normal(1.0 if len(shape) == 1 else 0.0, 0.2, shape))
              for name, shape in expected_shapes(config).items())
    save_weights_folder(folder, params, config, load_source(str(tiny_weights)).tokenizer, {"model": config.name})
    return folder


POLICIES = {"tokenselect": ["--n-init", "4", "--n-local", "8", "--select-top-k", "8", "--chunk-size", "8"],
            "tokenselect-int8": ["--n-init", "4", "--n-local", "8", "--select-top-k", "8", "--chunk-size", "8",
                                 "--score-keys", "int8"],  # per-token state sized by the capacity
            "recycled": ["--recycle-k", "1/8", "--recycle-min-k", "1", "--recycle-stride", "2"],  # no floor: all select
            "recycled-count": ["--recycle-k", "16", "--recycle-stride", "2", "--chunk-size", "8"],
            "tidaldecode": ["--tidal-budget", "8", "--tidal-select-layer", "0", "--tidal-reselect-layers", "none"]}


@pytest.mark.parametrize("variant", sorted(POLICIES))
def test_selecting_policy_ids_equal_the_engine(tsedge_run, tiny_weights, tmp_path, variant):
    """Past the budget (TokenSelect: 4 + 8 + 8 tokens; Recycled Attention: 16, or --recycle-min-k 1
    for 1/8 of the prompt; TidalDecode: 8) the *_select functions run with the selection state."""
    weights = random_weights(tiny_weights, tmp_path / "weights")
    lib = compile_lib(weights, tmp_path / "sel.so", "--policy", variant.split("-")[0], "--max-context", "96",
                      *POLICIES[variant])
    prompt = np.random.default_rng(1).integers(0, 300, 40).tolist()
    engine = Engine(lib, str(weights))
    expected = engine.generate(prompt, 24, stop_ids=[]).tokens
    stats = engine.selection_stats()  # None: TidalDecode keeps no selection state
    assert stats is None or stats["lookups"] > 0  # selection ran
    assert cpp_ids(tsedge_run, lib, weights, prompt, "--max-new-tokens", "24") == expected


def test_smollm2_ids_equal_the_engine(tsedge_run, smol_lib, tmp_path):
    weights = tmp_path / "smol"
    result = CliRunner().invoke(main, ["convert", "--model", "smollm2-135m", "-o", str(weights)])
    assert result.exit_code == 0, result.output
    prompt = load_source(str(weights)).tokenizer.encode_chat(
        [{"role": "user", "content": "What is the capital of France?"}])
    expected = engine_ids(smol_lib, weights, prompt, 12, prefill_chunk=16)
    assert cpp_ids(tsedge_run, smol_lib, weights, prompt, "--max-new-tokens", "12", "--prefill-chunk", "16") \
        == expected


def _rewrite_header(path: Path, edit: Callable[[dict], dict]) -> None:
    """Rewrite ``path``'s safetensors header through ``edit`` (the data stays)."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(edit(json.loads(blob[8:8 + n]))).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + blob[8 + n:])


def _set(name: str, **fields: Any) -> Callable[[Path], None]:
    """A corruption: fields of tensor ``name``'s header entry replaced."""
    return lambda path: _rewrite_header(path, lambda h: {**h, name: {**h[name], **fields}})


def _raw(data: bytes) -> Callable[[Path], None]:
    """A corruption: the file replaced by ``data``."""
    return lambda path: path.write_bytes(data)


NORM = "model.norm.weight"
CORRUPTIONS = {  # name: (corruption, what the one-line error says)
    "header length": (lambda p: p.write_bytes((10**9).to_bytes(8, "little") + p.read_bytes()[8:]),
                      "corrupt safetensors file (header of 1000000000 bytes"),
    "short file": (_raw(b"\x05\x00"), "less than the 8-byte header length"),
    "not JSON": (_raw((4).to_bytes(8, "little") + b"{{{{"), "unreadable JSON"),
    "offset past the data": (_set(NORM, data_offsets=[2**62, 2**62 + 128]),
                             f"{NORM}: data_offsets is not a span inside the"),
    "shape against span": (_set(NORM, shape=[65]), "span 128 bytes, but F16 [65] needs 130"),
    "huge shape": (_set(NORM, shape=[2**31 - 1] * 3), "shape [2147483647, 2147483647, 2147483647] is too large"),
    "dtype": (_set(NORM, dtype="I64"), "dtype is I64, not the F16"),
    "missing tensor": (lambda p: _rewrite_header(p, lambda h: {k: v for k, v in h.items() if k != NORM}),
                       f"tensor {NORM} is missing; convert the weights"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_weights_are_one_line_errors(tsedge_run, tiny_lib, tiny_weights, tmp_path, corruption):  # noqa: F811
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(weights / "params.safetensors")
    result = run(tsedge_run, tiny_lib, weights, [1, 2, 3])
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr and "tsedge convert" in result.stderr, result.stderr


def test_bad_inputs_are_one_line_errors(tsedge_run, tiny_lib, tiny_weights, tmp_path):  # noqa: F811
    other = tmp_path / "other"
    shutil.copytree(tiny_weights, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rope_theta": 500000.0}))
    meta = tmp_path / "lib.json"
    meta.write_text(tiny_lib.with_suffix(".json").read_text().replace('"max_context": 64', '"max_context": -1'))
    shutil.copy(tiny_lib, meta.with_suffix(".so"))
    packed = tmp_path / "packed.json"  # a quantized library's metadata
    packed.write_text(tiny_lib.with_suffix(".json").read_text().replace('"quantization": "q0"', '"quantization": "q4f16"'))
    shutil.copy(tiny_lib, packed.with_suffix(".so"))
    cases = [
        (packed.with_suffix(".so"), tiny_weights, [1], [], "quantization is q4f16; this example reads float libraries: "
                                                          "compile with --quantization q0"),
        (tiny_lib, other, [1, 2], [], "do not match library"),
        (tiny_lib, tiny_weights, [1, 300], [], "token id 300 is outside the vocabulary of 300"),
        (tiny_lib, tiny_weights, list(range(65)), [], "prompt of 65 tokens exceeds the KV cache of 64"),
        (tiny_lib, tiny_weights, [1], ["--max-context", "65"], "exceeds the library's 64"),
        (tiny_lib, tiny_weights, [1], ["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
        (tiny_lib.with_suffix(".json"), tiny_weights, [1], [], "give the library's .so"),
        (tmp_path / "none.so", tiny_weights, [1], [], "not found; build one with `tsedge compile`"),
        (meta.with_suffix(".so"), tiny_weights, [1], [], "max_context is -1, outside"),
        (tiny_lib, tmp_path, [1], [], "config.json: cannot open it; give a folder written by `tsedge convert`"),
    ]
    for lib, weights, ids, options, message in cases:
        result = run(tsedge_run, lib, weights, ids, *options)
        assert result.returncode == 1 and result.stdout == "", message
        assert result.stderr.count("\n") == 1 and message in result.stderr, (message, result.stderr)
