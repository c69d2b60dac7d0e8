"""Model and attention-policy configuration: plain data shared by the compiler and the runtime.

No TVM import here: the runtime reads these from a library's metadata.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and hyper-parameters of a Llama-family decoder."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF "rope_scaling" of type llama3, or None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    context_window: int = 8192  # training context (max_position_embeddings)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return cls(**data)

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies (float32, head_dim/2), with Llama-3.1 scaling if configured."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type")) == "llama3":
            factor = scaling["factor"]
            low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
            old_ctx = scaling["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            smooth = (old_ctx / wavelen - low) / (high - low)
            scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
            mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
            inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
        return inv.astype(np.float32)


_LLAMA31_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA32_SCALING = {**_LLAMA31_SCALING, "factor": 32.0}

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        ModelConfig("smollm2-135m", 576, 1536, 30, 9, 3, 49152, rope_theta=100000.0,
                    tie_embeddings=True, context_window=8192),
        ModelConfig("llama3-8b", 4096, 14336, 32, 32, 8, 128256, rope_theta=500000.0,
                    context_window=8192),
        ModelConfig("llama3.1-8b", 4096, 14336, 32, 32, 8, 128256, rope_theta=500000.0,
                    rope_scaling=_LLAMA31_SCALING, context_window=131072),
        ModelConfig("llama3.2-1b", 2048, 8192, 16, 32, 8, 128256, rope_theta=500000.0,
                    rope_scaling=_LLAMA32_SCALING, tie_embeddings=True, context_window=131072),
        ModelConfig("llama3.2-3b", 3072, 8192, 28, 24, 8, 128256, rope_theta=500000.0,
                    rope_scaling=_LLAMA32_SCALING, tie_embeddings=True, context_window=131072),
        ModelConfig("qwen2-7b", 3584, 18944, 28, 28, 4, 152064, rope_theta=1000000.0,
                    rms_norm_eps=1e-6, qkv_bias=True, context_window=32768),
    ]
}


def from_hf_config(cfg: dict[str, Any], name: str = "custom") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face ``config.json`` dictionary."""
    arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        raise ValueError(f"unsupported architecture {arch!r}: tsedge compiles Llama-family models")
    heads = cfg["num_attention_heads"]
    return ModelConfig(
        name=name,
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        vocab_size=cfg["vocab_size"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=cfg.get("rope_scaling"),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
        context_window=int(cfg.get("max_position_embeddings", 8192)),
    )


POLICIES = ("dense", "tokenselect", "streaming")


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Attention policy and its budgets (TokenSelect paper defaults)."""

    name: str = "dense"
    n_init: int = 128
    n_local: int = 512
    top_k: int = 2048
    chunk_size: int = 512
    selection_threshold: float = 0.9
    pool_kernel: int = 0

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"unknown policy {self.name!r}; choose one of {', '.join(POLICIES)}")
        if self.name != "dense" and self.chunk_size > self.n_local:
            raise ValueError(
                f"chunk_size={self.chunk_size} > n_local={self.n_local}: a prefill chunk must fit "
                "in the local window; lower --chunk-size or raise --n-local"
            )

    @property
    def budget(self) -> int:
        """Tokens attended per step once the context exceeds it (streaming selects no top-k)."""
        selected = self.top_k if self.name == "tokenselect" else 0
        return self.n_init + selected + self.n_local

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
