"""Quantized libraries (q8f16, q4f16, GGML's q4_0/q4_1, a GGUF's own blocks) end to end on a tiny
random Llama and on SmolLM2: against the float library, quantized weights folders, and the
one-line errors when library and weights do not agree."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_model import make_tiny_hf_model

from tsedge.cli import main
from tsedge.compile.build import build_ir, compile_library
from tsedge.compile.targets import parse_target
from tsedge.engine import Engine, LibraryError
from tsedge.models.config import PolicyConfig
from tsedge.models.library import LibraryMeta
from tsedge.models.quantization import SCHEMES, QuantizationError, dequantize, quantize, role_of
from tsedge.weights import WeightsError, load_source, save_weights_folder

QUANTS = ("q0", "q8f16", "q4f16", "q4_0", "q4_1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("qtiny") / "hf", seed=5)


@pytest.fixture(scope="module")
def libs(tiny, tmp_path_factory):
    """One llvm float32 library per quantization (128-token cache; a float16 KV cache for the
    quantized ones, ``kv_cache_dtype``), and ``q0-kv16``: float weights over a float16 cache."""
    config = load_source(str(tiny)).config
    out = tmp_path_factory.mktemp("qlibs")
    kinds = {q: (q, None) for q in QUANTS} | {"q0-kv16": ("q0", "float16")}
    for name, (quantization, kv_dtype) in kinds.items():
        compile_library(config, PolicyConfig(), parse_target("llvm"), "float32", 128, out / f"{name}.so",
                        quantization=quantization, kv_dtype=kv_dtype)
    return {name: out / f"{name}.so" for name in kinds}


@pytest.fixture(scope="module")
def ids(tiny):
    return np.random.default_rng(0).integers(3, load_source(str(tiny)).config.vocab_size, 90).tolist()


def _dequantized_source(source, quantization):
    """``source`` with every linear weight replaced by the float weight its quantization stands for."""
    qs = SCHEMES[quantization]
    tensors = list(source.tensors())

    def read():
        return ((n, dequantize(quantize(a, qs, n)) if role_of(n) else a) for n, a in tensors)

    return dataclasses.replace(source, read=read)


@pytest.mark.parametrize("quantization", QUANTS[1:])
def test_quantized_library_equals_float_library_on_dequantized_weights(tiny, libs, ids, quantization):
    """The fused kernels compute exactly the float model of the dequantized weights (prefill
    chunks and decode; both over a float16 KV cache), so all the error is the quantization's."""
    source = load_source(str(tiny))
    ours = Engine(libs[quantization], source, prefill_chunk=32)
    ref = Engine(libs["q0-kv16"], _dequantized_source(source, quantization), prefill_chunk=32)
    np.testing.assert_allclose(ours.prefill(ids), ref.prefill(ids), atol=1e-4)
    for token in ids[:5]:
        np.testing.assert_allclose(ours.decode(token), ref.decode(token), atol=1e-4)


# Largest logit error against the float model, as a fraction of the largest |logit|: measured
# 0.8 % (q8f16) and 15 % (q4f16) on this random model (N(0, 0.02) weights, near-uniform logits);
# real models: README (SmolLM2 top-1 agreement and KL).
TOLERANCE = {"q8f16": 0.02, "q4f16": 0.25}


@pytest.mark.parametrize("quantization", ["q8f16", "q4f16"])
def test_close_to_the_float_model(tiny, libs, ids, quantization):
    source = load_source(str(tiny))
    want = Engine(libs["q0"], source).prefill(ids)
    got = Engine(libs[quantization], source).prefill(ids)
    assert np.abs(got - want).max() <= TOLERANCE[quantization] * np.abs(want).max()


def test_float16_kv_cache(tiny, libs, ids):
    """A float16 KV cache (the default of CPU libraries of quantized weights) beside the float32
    one: the same model within the cache's rounding, prefill and decode."""
    source = load_source(str(tiny))
    half, full = Engine(libs["q0-kv16"], source, prefill_chunk=32), Engine(libs["q0"], source, prefill_chunk=32)
    assert half.cache.tensor.dtype == "float16" and full.cache.tensor.dtype == "float32"
    want = full.prefill(ids)
    np.testing.assert_allclose(half.prefill(ids), want, atol=1e-2 * np.abs(want).max())
    for token in ids[:5]:
        want = full.decode(token)
        np.testing.assert_allclose(half.decode(token), want, atol=1e-2 * np.abs(want).max())


def test_smollm2_gguf_blocks_lose_nothing(smol_source, smol_lib, tmp_path):
    """The embedded Q4_1 GGUF run on its own blocks (``--quantization gguf``, the default for a
    GGUF: linears q4_1, the tied embedding Q8_0 as q8f16) computes the float library's model of
    the same file: logits equal to rounding, 32 greedy tokens equal (a float32 KV cache here, as
    the float library's: the weights alone are compared)."""
    assert smol_source.quantization == "linear=q4_1,embedding=q8f16,lm_head=q8f16"
    lib = tmp_path / "smol-gguf.so"
    meta = compile_library(smol_source.config, PolicyConfig(), parse_target("llvm"), "float32", 512, lib,
                           quantization=smol_source.quantization, kv_dtype="float32")
    assert {p.name.rpartition(".")[2] for p in meta.params} >= {"qweight", "scale", "min"}
    prompt = smol_source.tokenizer.encode("The history of astronomy spans thousands of years, from the first "
                                          "observations of the night sky to modern space telescopes.")
    ours, ref = Engine(lib, smol_source), Engine(smol_lib, smol_source)
    want = ref.prefill(prompt)
    np.testing.assert_allclose(ours.prefill(prompt), want, atol=2e-3 * np.abs(want).max())
    ours.reset(), ref.reset()
    assert ours.generate(prompt, 32, stop_ids=[]).tokens == ref.generate(prompt, 32, stop_ids=[]).tokens


def test_metadata_records_the_quantization(libs):
    meta = LibraryMeta.load(libs["q4f16"].with_suffix(".json"))
    assert meta.quantization == "q4f16" and meta.kv_dtype == "float16"
    parts = {p.name: p.part for p in meta.params}
    assert parts["model.layers.0.self_attn.qkv_proj.qweight"] == "qweight"
    assert parts["model.layers.0.self_attn.qkv_proj.scale"] == "scale"
    assert parts["lm_head.qweight"] == "qweight" and parts["model.embed_tokens.qweight"] == "qweight"
    assert parts["model.layers.0.input_layernorm.weight"] == ""
    q0 = LibraryMeta.load(libs["q0"].with_suffix(".json"))
    assert q0.quantization == "q0" and q0.kv_dtype == "float32"


def test_converted_folder_loads_without_requantizing(tiny, libs, ids, tmp_path):
    result = CliRunner().invoke(main, ["convert", "--model", str(tiny), "--quantization", "q4f16",
                                       "-o", str(tmp_path / "q4")])
    assert result.exit_code == 0, result.output
    folder = load_source(str(tmp_path / "q4"))
    assert folder.quantization == "q4f16"
    stored = dict(folder.tensors())
    assert stored["model.layers.0.mlp.down_proj.weight"].qweight.dtype == np.uint32
    assert stored["model.norm.weight"].dtype == np.float16
    from_folder = Engine(libs["q4f16"], folder).prefill(ids)
    on_the_fly = Engine(libs["q4f16"], load_source(str(tiny))).prefill(ids)
    # the folder keeps the float weights' non-linear tensors in float16, as a q0 folder does
    np.testing.assert_allclose(from_folder, on_the_fly, atol=2e-3)


def test_gguf_blocks_convert_to_a_folder_as_stored(smol_source, tmp_path):
    """`convert --quantization gguf` writes the GGUF's blocks (q4_1 with its mins, the Q8_0 table)
    unchanged, and the folder reads back as the same quantization and the same arrays."""
    result = CliRunner().invoke(main, ["convert", "--quantization", "gguf", "-o", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    folder = load_source(str(tmp_path / "w"))
    assert folder.quantization == smol_source.quantization == "linear=q4_1,embedding=q8f16,lm_head=q8f16"
    stored, blocks = dict(folder.tensors()), dict(smol_source.tensors())
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight",
                 "model.embed_tokens.weight"):
        assert stored[name].scheme == blocks[name].scheme
        for part, array in blocks[name].arrays().items():
            np.testing.assert_array_equal(stored[name].arrays()[part], array, err_msg=f"{name}.{part}")


def _folder(tiny, path, quantization):
    source = load_source(str(tiny))
    save_weights_folder(path, source.tensors(), source.config, source.tokenizer, {}, quantization)
    return path


def test_library_and_weights_must_agree(tiny, libs, tmp_path):
    q8 = _folder(tiny, tmp_path / "q8", "q8f16")
    with pytest.raises(LibraryError, match=r"are quantized q8f16 but the library is q4f16: convert the weights "
                                           r"with --quantization q4f16, or compile with --quantization q8f16$"):
        Engine(libs["q4f16"], str(q8))
    with pytest.raises(LibraryError, match=r"but the library is q0: compile the library with --quantization q8f16$"):
        Engine(libs["q0"], str(q8))


def test_untrusted_quantized_folders(tiny, libs, tmp_path):
    folder = _folder(tiny, tmp_path / "q4", "q4f16")
    manifest = folder / "tsedge.json"
    info = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**info, "quantization": "q8f16"}))  # q4 data read as q8
    with pytest.raises(WeightsError, match=r"embed_tokens.weight: q8f16 qweight is uint32 \[300, 8\], expected int8 \[300, 64\]"):
        Engine(libs["q8f16"], str(folder))
    manifest.write_text(json.dumps({**info, "quantization": "q3"}))
    with pytest.raises(WeightsError, match="unknown quantization 'q3'"):
        load_source(str(folder))


def test_ragged_models_are_refused_at_compile(tiny):
    config = dataclasses.replace(load_source(str(tiny)).config, intermediate_size=120)
    with pytest.raises(QuantizationError, match="intermediate_size: input size 120 is not a multiple of 32"):
        build_ir(config, PolicyConfig(), parse_target("llvm"), "float32", "q4f16")
    result = CliRunner().invoke(main, ["compile", "--model", str(tiny), "--quantization", "q5"])
    assert result.exit_code != 0 and "'q5' is not one of 'q0', 'q8f16', 'q4f16'" in result.output


def test_a_quantization_that_disagrees_with_the_given_library_is_refused(tiny, libs):
    """``--lib`` decides the weights' format: an explicit ``--quantization`` of another scheme is one
    error line naming the fix, not silently ignored."""
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny), "--lib", str(libs["q0"]),
                                       "--quantization", "q4f16", "--prompt", "hi", "--max-new-tokens", "2"])
    assert result.exit_code != 0
    assert "--quantization q4f16 does not match library" in result.output and "(compiled with q0)" in result.output
    assert "Traceback" not in result.output
