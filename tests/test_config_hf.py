"""config.json as transformers 4.x and 5.x write it: RoPE layouts, null fields, refused fields.

Each case of ``../shared/cases`` (next to the repository, skipped when absent) has an equivalent
built here from transformers' own config classes, so the behaviour is covered without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_model import make_tiny_hf_model
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          Qwen2Config)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from tsedge.models.config import from_hf_config

CASES = Path(__file__).resolve().parents[1] / ".." / "shared" / "cases"
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 500000.0}
THETA = {"rope_type": "default", "rope_theta": 500000.0}
DROP = object()  # a change that removes the field


def v5(config_class: type = LlamaConfig, **changes: Any) -> dict[str, Any]:
    """config.json as transformers 5.x writes it (RoPE in ``rope_parameters``), then ``changes``."""
    cfg = json.loads(config_class(**TINY).to_json_string())
    cfg |= changes
    return {k: v for k, v in cfg.items() if v is not DROP}


def as_v4(cfg: dict[str, Any]) -> dict[str, Any]:
    """The 4.x layout of the same config: top-level ``rope_theta``, scaling in ``rope_scaling``."""
    cfg = dict(cfg)
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = None if params["rope_type"] == "default" else params
    return cfg


def transformers_inv_freq(cfg: dict[str, Any]) -> np.ndarray:
    return LlamaRotaryEmbedding(LlamaConfig.from_dict(cfg)).inv_freq.numpy()


def head_dim(config: Any) -> int:
    """The head size transformers' attention modules use (Qwen2Config has no head_dim field)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def shared_case(name: str) -> Path:
    if not (CASES / name).is_dir():
        pytest.skip(f"{CASES / name} is absent")
    return CASES / name


def refused(cfg: dict[str, Any], field: str) -> str:
    """The one-line error (a ValueError, as the CLI expects) ``cfg`` raises; it names ``field``."""
    with pytest.raises(ValueError) as info:
        from_hf_config(cfg)
    message = str(info.value)
    assert field in message and "\n" not in message, message
    return message


# ---- RoPE: both layouts, as transformers computes them ------------------------------------------
@pytest.mark.parametrize("rope", [THETA, LLAMA3, {k: v for k, v in LLAMA3.items()
                                                  if k != "original_max_position_embeddings"}],
                         ids=["theta", "llama3", "llama3-default-original-context"])
def test_rope_layouts_equal_transformers(rope):
    """transformers 5.x ``rope_parameters`` and 4.x ``rope_theta`` + ``rope_scaling`` give the
    same model, with the inverse frequencies of transformers' rotary embedding."""
    new = v5(rope_parameters=dict(rope))
    old = as_v4(new)
    assert from_hf_config(new) == from_hf_config(old)
    assert from_hf_config(new).rope_theta == 500000.0
    for cfg in (new, old):
        np.testing.assert_allclose(from_hf_config(cfg).inv_freq(), transformers_inv_freq(cfg),
                                   rtol=1e-6)


def test_rope_scaling_legacy_type_key():
    params = {k: v for k, v in LLAMA3.items() if k != "rope_type"} | {"type": "llama3"}
    cfg = as_v4(v5(rope_parameters=dict(LLAMA3))) | {"rope_scaling": params}
    np.testing.assert_allclose(from_hf_config(cfg).inv_freq(), transformers_inv_freq(cfg),
                               rtol=1e-6)


@pytest.mark.parametrize("case", ["v5_rope_theta", "v4_rope_theta_control"])
def test_shared_rope_cases_equal_transformers(case):
    folder = shared_case(case)
    ours = from_hf_config(json.loads((folder / "config.json").read_text()))
    theirs = LlamaForCausalLM.from_pretrained(folder).model.rotary_emb.inv_freq.numpy()
    assert ours.rope_theta == 500000.0
    np.testing.assert_allclose(ours.inv_freq(), theirs, rtol=1e-6)


# ---- null fields ---------------------------------------------------------------------------------
@pytest.mark.parametrize("config_class, field", [
    (LlamaConfig, "num_key_value_heads"), (LlamaConfig, "head_dim"), (Qwen2Config, "head_dim"),
    (Qwen2Config, "num_key_value_heads"), (MistralConfig, "sliding_window")])
def test_null_means_transformers_default(config_class, field):
    cfg = v5(config_class, **{field: None})
    ours, theirs = from_hf_config(cfg), config_class.from_dict(cfg)
    assert (ours.num_kv_heads, ours.head_dim) == (theirs.num_key_value_heads, head_dim(theirs))


def test_shared_kv_heads_null_reads_head_count():
    folder = shared_case("cfg_kv_heads_null")
    cfg = json.loads((folder / "config.json").read_text())
    assert from_hf_config(cfg).num_kv_heads == LlamaConfig.from_dict(cfg).num_key_value_heads == 4


@pytest.mark.parametrize("cfg, field", [
    (as_v4(v5(rope_parameters=THETA)) | {"rope_theta": None}, "rope_theta is null"),
    (v5(rope_parameters={"rope_type": "default", "rope_theta": None}),
     "rope_parameters.rope_theta is null"),
    (v5(rms_norm_eps=None), "rms_norm_eps is null"),
    (v5(hidden_size=None), "hidden_size is null"),
    (v5(tie_word_embeddings=None), "tie_word_embeddings is null"),
], ids=["rope_theta", "rope_parameters.rope_theta", "rms_norm_eps", "hidden_size", "tie"])
def test_null_without_default_is_refused(cfg, field):
    refused(cfg, field)


@pytest.mark.parametrize("source", ["shared", "built"])
@pytest.mark.parametrize("case, field, message", [
    ("cfg_kv_heads_null", "num_key_value_heads", "k_proj.weight has shape"),
    ("cfg_rope_theta_null", "rope_theta", "rope_theta is null")])
def test_null_fields_load_as_one_line_errors(tmp_path, source, case, field, message):
    """Loading the folder: null KV heads read as the head count, which the weights contradict
    (transformers refuses the same checkpoint); a null rope_theta is refused."""
    from tsedge.weights import load_source

    if source == "shared":
        folder = shared_case(case)
    else:
        folder = make_tiny_hf_model(tmp_path / "hf")
        cfg = as_v4(json.loads((folder / "config.json").read_text()))
        (folder / "config.json").write_text(json.dumps(cfg | {field: None}))
    with pytest.raises(ValueError) as info:
        load_source(str(folder))
    assert message in str(info.value) and "\n" not in str(info.value), info.value


def test_shared_rope_theta_null_is_refused():
    folder = shared_case("cfg_rope_theta_null")
    refused(json.loads((folder / "config.json").read_text()), "rope_theta is null")


# ---- what the compiled model does not compute is refused, naming the field -----------------------
@pytest.mark.parametrize("cfg, field", [
    (v5(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "rope_parameters.rope_type"),
    (as_v4(v5()) | {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
    (v5(rope_parameters=THETA | {"partial_rotary_factor": 0.5}),
     "rope_parameters.partial_rotary_factor"),
    (v5(rope_parameters={k: v for k, v in LLAMA3.items() if k != "factor"}),
     "rope_parameters.factor"),
    (as_v4(v5(rope_parameters=THETA)) | {"rope_parameters": {"rope_theta": 1e4}}, "rope_theta"),
    (v5(mlp_bias=True), "mlp_bias"),
    (v5(attention_bias=True), "attention_bias"),
    (v5(hidden_act="gelu"), "hidden_act"),
    (v5(rope_interleaved=True), "rope_interleaved"),
    (v5(sliding_window=4096), "sliding_window"),
    (v5(MistralConfig, sliding_window=4096), "sliding_window"),
    (v5(MistralConfig, sliding_window=DROP), "sliding_window"),  # MistralConfig's default: 4096
    (v5(Qwen2Config, use_sliding_window=True), "use_sliding_window"),
    (v5(Qwen2Config, layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    (v5(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    (v5(num_hidden_layers=DROP), "num_hidden_layers is missing"),
    (v5(hidden_size="64"), "hidden_size"),
    (v5(num_attention_heads=0), "num_heads=0"),
    (v5(rope_parameters={"rope_type": ["default"]}), "rope_parameters.rope_type"),
    (v5(architectures=None, model_type="gemma"), "unsupported architecture 'gemma'"),
], ids=lambda x: None if isinstance(x, dict) else x)
def test_unimplemented_fields_are_refused(cfg, field):
    refused(cfg, field)


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen2Config, MistralConfig])
def test_transformers_configs_are_accepted(config_class):
    extra = {"sliding_window": None} if config_class is MistralConfig else {}
    cfg = v5(config_class, **extra)
    ours = from_hf_config(cfg)
    theirs = config_class.from_dict(cfg)
    assert (ours.num_kv_heads, ours.head_dim, ours.rms_norm_eps, ours.context_window) == (
        theirs.num_key_value_heads, head_dim(theirs), theirs.rms_norm_eps,
        theirs.max_position_embeddings)
    assert ours.qkv_bias == (config_class is Qwen2Config)


def test_smollm2_metadata_is_accepted():
    """SmolLM2's config.json carries nanotron and transformers.js fields that change nothing."""
    cfg = as_v4(v5()) | {"is_llama_config": True, "rope_interleaved": False,
                         "torch_dtype": "bfloat16",
                         "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16"}}}
    assert from_hf_config(cfg).rope_theta == 10000.0


# ---- the compiled model against transformers -----------------------------------------------------
def _tiny_v5(tmp_path: Path, rope: dict[str, Any]) -> Path:
    """A tiny random Llama whose config.json carries ``rope`` in ``rope_parameters``."""
    folder = make_tiny_hf_model(tmp_path / "hf", seed=5)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"rope_parameters": rope}))
    return folder


@pytest.mark.parametrize("source", ["shared", "theta", "llama3"])
def test_compiled_logits_equal_transformers(tmp_path, source):
    from tsedge.compile.build import compile_library
    from tsedge.compile.targets import parse_target
    from tsedge.engine import Engine
    from tsedge.models.config import PolicyConfig
    from tsedge.weights import load_source

    folder = (shared_case("v5_rope_theta") if source == "shared"
              else _tiny_v5(tmp_path, THETA if source == "theta" else LLAMA3))
    model = load_source(str(folder))
    lib = tmp_path / "tiny.so"
    compile_library(model.config, PolicyConfig(), parse_target("llvm"), "float32", 256, lib)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 120).tolist()
    ours = Engine(lib, model, prefill_chunk=64).prefill(ids)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)
