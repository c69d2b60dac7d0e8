"""Presets, HF config parsing and RoPE frequencies (incl. Llama-3.1 scaling) vs transformers."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tsedge.models.config import PRESETS, PolicyConfig, from_hf_config


@pytest.mark.parametrize("name", ["llama3.1-8b", "llama3.2-1b", "llama3-8b", "smollm2-135m"])
def test_inv_freq_matches_transformers(name):
    cfg = PRESETS[name]
    hf = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
                     rope_theta=cfg.rope_theta,  # a copy: transformers 5 adds keys to it
                     rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
                     max_position_embeddings=cfg.context_window)
    kind = "llama3" if cfg.rope_scaling else "default"
    if kind == "default":
        want = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    else:
        want = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")[0].numpy()
    np.testing.assert_allclose(cfg.inv_freq(), want, rtol=1e-6)


def test_from_hf_config_qwen2():
    cfg = from_hf_config({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
                          "intermediate_size": 18944, "num_hidden_layers": 28,
                          "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                          "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                          "max_position_embeddings": 32768}, name="qwen2-7b")
    assert cfg == PRESETS["qwen2-7b"]


def test_unsupported_architecture():
    with pytest.raises(ValueError, match="unsupported architecture"):
        from_hf_config({"architectures": ["GPT2LMHeadModel"]})


def test_streaming_budget_has_no_top_k():
    assert PolicyConfig("streaming", n_init=4, n_local=64, top_k=2048, chunk_size=64).budget == 68
    assert PolicyConfig("tokenselect").budget == 128 + 2048 + 512
