"""Test fixtures: a tiny random Llama/Qwen2 as a Hugging Face folder, and tiny GGUF files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # 1234567890",
    "Tiny models are useful for fast tests; héllo wörld, 日本語, 🤖!",
]


def make_tiny_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE trained on a few sentences; adds ``<|endoftext|>`` as BOS like Llama 3."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    return tok


def make_tiny_hf_model(directory: str | Path, *, qkv_bias: bool = False, tie: bool = False,
                       seed: int = 0, num_layers: int = 2) -> Path:
    """Save a random ``num_layers``-layer model (hidden 64, 4 heads, 2 KV heads) and its tokenizer.

    Sharded (with ``model.safetensors.index.json``); ``qkv_bias`` makes it a Qwen2, else a Llama.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    directory = Path(directory)
    tok = make_tiny_tokenizer()
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if qkv_bias else (LlamaConfig,
                                                                             LlamaForCausalLM)
    config = config_cls(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # norms start at 1: randomize them so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory, max_shard_size="100KB")
    tok.save(str(directory / "tokenizer.json"))
    tok_config = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": CHATML}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return directory


def write_gguf(path: str | Path, metadata: dict[str, Any],
               tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
               arch: str = "llama") -> Path:
    """A small GGUF file with the given metadata and raw tensors ``{name: (data, type)}``."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        sub_type = _gguf_value_type(value[0]) if isinstance(value, list) else None
        writer.add_key_value(key, value, _gguf_value_type(value), sub_type=sub_type)
    for name, (data, qtype) in (tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _gguf_value_type(value: Any) -> gguf.GGUFValueType:
    return {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32,
            float: gguf.GGUFValueType.FLOAT32, str: gguf.GGUFValueType.STRING,
            list: gguf.GGUFValueType.ARRAY}[type(value)]
