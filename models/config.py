"""Model and attention-policy configuration: plain data shared by the compiler and the runtime.

No TVM import here: the runtime reads these from a library's metadata.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from fractions import Fraction
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
    rope_scaling: dict[str, Any] | None = None  # Llama-3 scaling (keys of _LLAMA31_SCALING)
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    context_window: int = 8192  # training context (max_position_embeddings)

    def __post_init__(self) -> None:
        sizes = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "vocab_size")
        bad = [f"{k}={getattr(self, k)}" for k in sizes if getattr(self, k) <= 0]
        if bad:
            raise ValueError(f"{self.name}: {', '.join(bad)}; sizes must be positive")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        scaling = self.rope_scaling
        if scaling is not None and (set(scaling) != set(_LLAMA31_SCALING)
                                    or scaling["rope_type"] != "llama3"):
            raise ValueError(f"{self.name}: rope_scaling {scaling} is not Llama-3 "
                             "scaling, the only RoPE scaling tsedge computes")
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
        scaling = self.rope_scaling
        if scaling:  # Llama 3.1 (transformers' _compute_llama3_parameters)
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
        ModelConfig("llama3.1-70b", 8192, 28672, 80, 64, 8, 128256, rope_theta=500000.0,
                    rope_scaling=_LLAMA31_SCALING, context_window=131072),
        ModelConfig("llama3.2-1b", 2048, 8192, 16, 32, 8, 128256, rope_theta=500000.0,
                    rope_scaling=_LLAMA32_SCALING, tie_embeddings=True, context_window=131072),
        ModelConfig("llama3.2-3b", 3072, 8192, 28, 24, 8, 128256, rope_theta=500000.0,
                    rope_scaling=_LLAMA32_SCALING, tie_embeddings=True, context_window=131072),
        ModelConfig("qwen2-7b", 3584, 18944, 28, 28, 4, 152064, rope_theta=1000000.0,
                    rms_norm_eps=1e-6, qkv_bias=True, context_window=32768),
    ]
}


class ConfigError(ValueError):
    """A ``config.json`` that tsedge cannot compile faithfully (one line: the field and the fix)."""


_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                  "MistralForCausalLM": "mistral"}
_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "vocab_size")  # required: no default
_ROPE_FIELDS = ("rope_theta", "rope_scaling", "rope_parameters")  # read by _rope
_COMMON = {"head_dim": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "hidden_act": "silu", "rope_interleaved": False}  # the last: nanotron's (SmolLM2)
# Values of absent fields, from transformers' LlamaConfig, Qwen2Config and MistralConfig; each
# table names every field of that architecture that can change the computation.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {**_COMMON, "num_key_value_heads": None, "max_position_embeddings": 2048,
              "attention_bias": False, "mlp_bias": False},
    "qwen2": {**_COMMON, "num_key_value_heads": 32, "max_position_embeddings": 32768,
              "use_sliding_window": False, "layer_types": None},
    "mistral": {**_COMMON, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                "sliding_window": 4096},
}
# Fields whose null means "absent, derive it" in transformers (typed ``X | None`` there).
_NULLABLE = {"num_key_value_heads", "head_dim", "rope_scaling", "rope_parameters",
             "sliding_window", "layer_types", "architectures", "model_type"}
# Fields that never change the forward pass: metadata, tokenizer ids, training-only settings
# (dropout, init, pretraining_tp: transformers 4.x slices the same matmuls) and generation
# defaults; Qwen2's window fields are inert while use_sliding_window is false (checked).
_INERT = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype",
    "dtype", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
    "attention_dropout", "pretraining_tp", "is_llama_config", "transformers.js_config",
    "output_attentions", "output_hidden_states", "return_dict", "use_bfloat16", "torchscript",
    "tokenizer_class", "max_length", "do_sample", "temperature", "top_p", "top_k",
})
_ARCH_INERT = {"llama": frozenset(), "mistral": frozenset(),
               "qwen2": frozenset({"sliding_window", "max_window_layers"})}
# Fields whose other values select computations tsedge's model does not implement:
# field -> (JSON type, accepts(value), what other values select).
_IMPLEMENTED: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "hidden_act": (str, lambda v: v in ("silu", "swish"), "an MLP activation other than SiLU"),
    "attention_bias": (bool, lambda v: not v, "biases on the attention projections (incl. o_proj)"),
    "mlp_bias": (bool, lambda v: not v, "biases on the MLP projections"),
    "rope_interleaved": (bool, lambda v: not v, "interleaved RoPE pairs"),
    "use_sliding_window": (bool, lambda v: not v, "sliding-window attention"),
    "sliding_window": (int, lambda v: v is None, "sliding-window attention"),
    "layer_types": (list, lambda v: all(t == "full_attention" for t in v or ()),
                    "attention kinds other than full attention"),
}
# RoPE types tsedge computes -> their parameters (transformers' modeling_rope_utils).
_ROPE_KEYS = {
    "default": (),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               dict: "an object", list: "a list"}


def _is(value: Any, kind: type) -> bool:
    """JSON typing: a float may be written as an integer; a bool is not a number."""
    kinds = (int, float) if kind is float else kind
    return isinstance(value, kinds) and (kind is bool or not isinstance(value, bool))


def _value(data: dict[str, Any], key: str, kind: type, defaults: dict[str, Any],
           where: str = "") -> Any:
    """``data[key]`` checked to be a ``kind``; absent: ``defaults[key]`` (none there: required).

    null is kept only for the fields transformers types as optional (``_NULLABLE``).
    """
    name = where + key
    if key not in data:
        if key not in defaults:
            raise ConfigError(f"{name} is missing; set it to {_KIND_NAMES[kind]}")
        return defaults[key]
    value = data[key]
    if value is None and key in _NULLABLE:
        return None
    if value is None:
        raise ConfigError(f"{name} is null; set it to the model's value ({_KIND_NAMES[kind]})")
    if not _is(value, kind):
        raise ConfigError(f"{name}={json.dumps(value)} is not {_KIND_NAMES[kind]}; set it to "
                          "the model's value")
    return value


def _architecture(cfg: dict[str, Any]) -> str:
    """``architectures[0]`` (else ``model_type``; else Llama) as a key of ``_DEFAULTS``."""
    absent = {"architectures": None, "model_type": None}
    name = str((_value(cfg, "architectures", list, absent) or [None])[0]
               or _value(cfg, "model_type", str, absent) or "llama")
    arch = _ARCHITECTURES.get(name, name if name in _DEFAULTS else None)
    if arch is None:
        raise ConfigError(f"unsupported architecture {name!r}: tsedge compiles Llama-family "
                          f"models ({', '.join(_ARCHITECTURES)})")
    return arch


def _check_fields(cfg: dict[str, Any], arch: str) -> None:
    """Refuse unknown fields and values of known ones that the model does not implement."""
    defaults = _DEFAULTS[arch]
    unknown = sorted(set(cfg) - _INERT - _ARCH_INERT[arch] - set(defaults) - set(_SIZES)
                     - set(_ROPE_FIELDS))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}: tsedge cannot tell whether "
                          "they change the model; remove them if they are only metadata")
    for key in (k for k in _IMPLEMENTED if k in defaults):
        kind, accepts, what = _IMPLEMENTED[key]
        value = _value(cfg, key, kind, defaults)
        if not accepts(value):
            default = "" if key in cfg else " (transformers' default when absent)"
            raise ConfigError(f"{key}={json.dumps(value)}{default} selects {what}, which tsedge "
                              "does not implement; use a model without it")


def _rope(cfg: dict[str, Any], context_window: int) -> tuple[float, dict[str, Any] | None]:
    """RoPE base and scaling from transformers 5.x ``rope_parameters`` or 4.x ``rope_theta`` +
    ``rope_scaling`` (transformers' ``convert_rope_params_to_dict``: a theta inside the dict
    beats the top-level one, default 10000; llama3's ``original_max_position_embeddings``
    defaults to ``max_position_embeddings``)."""
    field, params = _rope_params(cfg)
    theta = _rope_theta(cfg, field, params)
    kind = params.get("rope_type", params.get("type", "default"))
    if not isinstance(kind, str) or kind not in _ROPE_KEYS:
        raise ConfigError(f"{field}.rope_type={json.dumps(kind)} is not implemented; tsedge "
                          f"computes {' and '.join(_ROPE_KEYS)} RoPE")
    extra = sorted(set(params) - {"rope_type", "type", "rope_theta", *_ROPE_KEYS[kind]})
    if extra:
        raise ConfigError(f"{field}.{extra[0]} is not implemented for rope_type {kind!r}; "
                          "remove it or use a model without it")
    if kind == "default":
        return theta, None
    defaults = {"original_max_position_embeddings": context_window}
    return theta, {"rope_type": kind} | {
        key: _value(params, key, float, defaults, f"{field}.") for key in _ROPE_KEYS[kind]}


def _rope_params(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The RoPE dictionary and its field name (``rope_scaling`` first, as transformers 5.x)."""
    scaling = _value(cfg, "rope_scaling", dict, {"rope_scaling": None})
    params = _value(cfg, "rope_parameters", dict, {"rope_parameters": None})
    if scaling and params and scaling != params:
        raise ConfigError("rope_scaling and rope_parameters disagree; keep rope_parameters "
                          "(transformers 5.x) only")
    return ("rope_scaling", scaling) if scaling else ("rope_parameters", params or {})


def _rope_theta(cfg: dict[str, Any], field: str, params: dict[str, Any]) -> float:
    absent = {"rope_theta": None}
    top = _value(cfg, "rope_theta", float, absent)
    inner = _value(params, "rope_theta", float, absent, f"{field}.")
    if top is not None and inner is not None and top != inner:
        raise ConfigError(f"rope_theta={top} disagrees with {field}.rope_theta={inner}; keep one")
    return float(next((t for t in (inner, top) if t is not None), 10000.0))


def from_hf_config(cfg: dict[str, Any], name: str = "custom") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face ``config.json``; refuse what it cannot compute.

    Absent fields take transformers' defaults for the architecture, null ones only where
    transformers derives them (``num_key_value_heads``: the head count, as LlamaConfig).
    """
    arch = _architecture(cfg)
    _check_fields(cfg, arch)
    defaults = _DEFAULTS[arch]
    get = lambda key, kind: _value(cfg, key, kind, defaults)  # noqa: E731
    heads, hidden = get("num_attention_heads", int), get("hidden_size", int)
    kv_heads, head_dim = get("num_key_value_heads", int), get("head_dim", int)
    context = get("max_position_embeddings", int)
    theta, scaling = _rope(cfg, context)
    return ModelConfig(
        name=name,
        hidden_size=hidden,
        intermediate_size=get("intermediate_size", int),
        num_layers=get("num_hidden_layers", int),
        num_heads=heads,
        num_kv_heads=heads if kv_heads is None else kv_heads,
        vocab_size=get("vocab_size", int),
        head_dim=head_dim or 0,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(get("rms_norm_eps", float)),
        tie_embeddings=get("tie_word_embeddings", bool),
        qkv_bias=arch == "qwen2",
        context_window=context,
    )


POLICIES = ("dense", "tokenselect", "streaming", "tidaldecode", "recycled")
CAPACITY = "capacity"  # in a state shape: the KV cache's capacity in tokens (a per-token state tensor)
SCORE_KEYS = ("exact", "int8")  # TokenSelect's scoring input: the cached keys, or int8 codes of them
RECYCLE_K = "1/8"  # Recycled Attention's K: the paper's 1/8 of the prompt
MAX_DENOMINATOR = 65536  # of a --recycle-k fraction (the device computes 2 p L in int64)


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Attention policy and its budgets (TokenSelect paper defaults; TidalDecode's ``tidal_*``:
    arXiv 2410.05076 and DerrickYLJ/TidalDecode's scripts, Llama-3-8B; Recycled Attention's
    ``recycle_*``: arXiv 2411.05787, Llama-3.1-8B).

    ``recycle_k`` (``parse_recycle_k``): a token count (int), or a fraction of the prompt, the
    string ``"p/q"`` (default ``"1/8"``, the paper's). The library's partial caches have
    ``recycle_capacity(max_context)`` slots (K_max); a prefill sets the active K
    (``recycle_active_k``) from the context it ends at, on the device. A fraction's K is at least
    ``recycle_min_k`` (the paper's setting is for long prompts: 1/8 of a 30-token prompt is 4 rows,
    which derails generation); contexts up to it run dense, as a count's budget does."""

    name: str = "dense"
    n_init: int = 128
    n_local: int = 512
    top_k: int = 2048
    chunk_size: int = 512
    selection_threshold: float = 0.9
    pool_kernel: int = 0
    tidal_budget: int = 256  # tokens each head attends to in sparse layers (current one included)
    tidal_select_layer: int = 2  # attends densely and selects; earlier layers dense
    tidal_reselect_layers: tuple[int, ...] = (13,)  # attend densely and select again
    tidal_per_kv_head: bool = False  # one set per KV head (max of its group's logits)
    recycle_k: int | str = RECYCLE_K  # rows of each layer's partial cache: a count, or "p/q" of the prompt
    recycle_stride: int = 5  # a refresh check (or, fixed, a full step) every this many decode steps
    recycle_threshold: float = 0.85  # full step when cos(mean query, the last full step's) is below
    recycle_fixed_stride: bool = False  # full step every recycle_stride steps, no similarity check
    recycle_min_k: int = 256  # a fraction's K at least this (contexts up to it: dense)
    score_keys: str = "exact"  # TokenSelect scores the cached keys ("exact") or their int8 codes ("int8")

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"unknown policy {self.name!r}; choose one of {', '.join(POLICIES)}")
        if self.score_keys not in SCORE_KEYS:
            raise ValueError(f"unknown score_keys {self.score_keys!r}; choose one of {', '.join(SCORE_KEYS)}")
        if self.score_keys != "exact" and self.name != "tokenselect":
            raise ValueError(f"--score-keys {self.score_keys} is TokenSelect's scoring; use it with --policy "
                             f"tokenselect, or leave --score-keys exact for --policy {self.name}")
        if self.name not in ("dense", "tidaldecode", "recycled") and self.chunk_size > self.n_local:
            raise ValueError(
                f"chunk_size={self.chunk_size} > n_local={self.n_local}: a prefill chunk must fit "
                "in the local window; lower --chunk-size or raise --n-local"
            )
        object.__setattr__(self, "tidal_reselect_layers", tuple(self.tidal_reselect_layers))
        if self.name == "tidaldecode":
            self._check_tidal()
        object.__setattr__(self, "recycle_k", parse_recycle_k(self.recycle_k))
        if self.name == "recycled":
            self._check_recycled()

    def _check_recycled(self) -> None:
        """Recycled Attention settings (one line naming the option to fix)."""
        if self.recycle_min_k < 1:
            raise ValueError(f"recycle_min_k={self.recycle_min_k}: the partial cache holds at least the current "
                             "token; set --recycle-min-k >= 1")
        if self.recycle_stride < 1:
            raise ValueError(f"recycle_stride={self.recycle_stride}: set --recycle-stride >= 1 "
                             "(the paper uses 5 or 10)")
        if not math.isfinite(self.recycle_threshold):
            raise ValueError(f"recycle_threshold={self.recycle_threshold}: set --recycle-threshold "
                             "to a finite cosine (the paper: 0.85 for Llama-3.1-8B)")

    def _check_tidal(self) -> None:
        """TidalDecode settings on their own (the model's depth: ``check_layers``)."""
        if self.tidal_budget < 1:
            raise ValueError(f"tidal_budget={self.tidal_budget}: TidalDecode keeps at least the "
                             "current token; set --tidal-budget >= 1")
        layers = (self.tidal_select_layer, *self.tidal_reselect_layers)
        if self.tidal_select_layer < 0 or list(layers) != sorted(set(layers)):
            raise ValueError(f"TidalDecode layers {self.tidal_select_layer} then "
                             f"{','.join(map(str, self.tidal_reselect_layers)) or '(none)'}: the "
                             "selection layer must be >= 0 and each re-selection layer after it, "
                             "increasing; fix --tidal-select-layer/--tidal-reselect-layers")

    def check_layers(self, num_layers: int) -> None:
        """Raises ValueError (one line) where a TidalDecode layer is not one of ``num_layers``."""
        if self.name != "tidaldecode":
            return
        last = max((self.tidal_select_layer, *self.tidal_reselect_layers))
        if last >= num_layers:
            raise ValueError(f"TidalDecode layer {last} does not exist in a {num_layers}-layer "
                             f"model; choose layers below {num_layers} (--tidal-select-layer, "
                             "--tidal-reselect-layers)")

    @property
    def budget(self) -> int:
        """Tokens attended per step once the context exceeds it (streaming selects no top-k).
        Recycled Attention with a fraction: ``recycle_min_k`` (the least K)."""
        if self.name == "tidaldecode":
            return self.tidal_budget
        if self.name == "recycled":
            return self.recycle_min_k if self.recycle_fraction else self.recycle_k
        selected = self.top_k if self.name == "tokenselect" else 0
        return self.n_init + selected + self.n_local

    @property
    def recycle_fraction(self) -> Fraction | None:
        """``recycle_k`` as a fraction of the prompt, or None for a token count."""
        return Fraction(self.recycle_k) if isinstance(self.recycle_k, str) else None

    def recycle_capacity(self, max_context: int) -> int:
        """K_max, the slots of each partial cache in a library of ``max_context`` tokens: the
        count, or ``max(ceil(fraction * max_context), recycle_min_k)`` (the K of the longest prompt
        the library holds, so the active K is never clamped from above). Raises ValueError (one
        line) for a fraction and ``max_context < 1``."""
        fraction = self.recycle_fraction
        if fraction is None:
            return self.recycle_k
        if max_context < 1:
            raise ValueError(f"recycle_k={self.recycle_k} is a fraction of the prompt: its partial caches are "
                             f"sized by the library's KV cache; set --max-context >= 1 (got {max_context})")
        return max(math.ceil(fraction * max_context), self.recycle_min_k)

    def recycle_active_k(self, context: int, max_context: int) -> int:
        """The active K after a prefill that ends at ``context`` tokens: the count, or
        ``clamp(round(fraction * context), recycle_min_k, K_max)`` rounding halves up, as the
        library computes it on the device (``tir_kernels/recycle.py``'s ``make_recycle_k``)."""
        k_max, fraction = self.recycle_capacity(max_context), self.recycle_fraction
        if fraction is None:
            return k_max
        return min(max((2 * fraction.numerator * context + fraction.denominator) // (2 * fraction.denominator),
                       self.recycle_min_k), k_max)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_recycle_k(value: int | str) -> int | str:
    """``--recycle-k``: a token count (``256``, ``"256"``) -> int >= 1, or a fraction of the
    prompt (``"1/8"``, ``"0.125"``, in (0, 1], denominator at most ``MAX_DENOMINATOR``) -> its
    lowest terms ``"p/q"``. Raises ValueError (one line naming --recycle-k) otherwise."""
    text = str(value).strip()
    if isinstance(value, int) or text.isdigit():
        if int(text) < 1:
            raise ValueError(f"recycle_k={value}: the partial cache holds at least the current token; "
                             "set --recycle-k to a count >= 1 or a fraction like 1/8")
        return int(text)
    try:
        fraction = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"recycle_k={value!r}: give --recycle-k a token count (256) or a fraction of the "
                         "prompt (1/8 or 0.125)") from None
    if not 0 < fraction <= 1 or fraction.denominator > MAX_DENOMINATOR:
        raise ValueError(f"recycle_k={value!r}: a fraction of the prompt must be in (0, 1] with a denominator "
                         f"up to {MAX_DENOMINATOR}; set --recycle-k like 1/8 (a count: a whole number)")
    return f"{fraction.numerator}/{fraction.denominator}"
