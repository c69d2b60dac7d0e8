"""Library metadata: what a compiled model library needs from its runtime (plain data, no TVM)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .config import ModelConfig, PolicyConfig
from .tensor_parallel import shard_config

FORMAT_VERSION = 3


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One library parameter: the source tensors ``sources`` (HF names) concatenated along their
    first (output) dimension — e.g. q, k and v for a fused ``qkv_proj`` — then transposed or not.

    ``part``: "" for a float tensor; "qweight" or "scale" for one half of a quantized weight
    (``models/quantization.py``: the sources quantized, or read quantized, in the canonical layout).
    ``split``: with tensor parallelism, the axis of each source ([out, in] or [out]) cut into the
    shards' parts before the concatenation; None: every shard holds the whole sources."""

    name: str
    shape: list[int]
    sources: list[str]
    transposed: bool = False
    part: str = ""
    split: int | None = None

    @property
    def weight(self) -> str:
        """The (fused) weight this parameter stores (``W`` for ``W.qweight``), or its own name."""
        return f"{self.name.rpartition('.')[0]}.weight" if self.part else self.name


@dataclasses.dataclass(frozen=True)
class LibraryMeta:
    model: ModelConfig
    policy: PolicyConfig
    target: str
    target_json: str
    dtype: str
    kv_dtype: str  # the KV cache's (compile.targets.kv_cache_dtype)
    max_context: int
    params: list[ParamSpec]
    functions: list[str]
    tvm_version: str
    state: list[list] = dataclasses.field(default_factory=list)  # [name, shape, dtype] per tensor
    compile_seconds: float = 0.0
    quantization: str = "q0"  # models/quantization.py SCHEMES: q0 (float weights), q8f16, q4f16
    tensor_parallel: int = 1  # shards that each run this library (models/tensor_parallel.py)
    format_version: int = FORMAT_VERSION

    @property
    def shard_model(self) -> ModelConfig:
        """The shapes one shard computes with (``model`` itself without tensor parallelism)."""
        return shard_config(self.model, self.tensor_parallel)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_dict()
        data["policy"] = self.policy.to_dict()
        return data

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> "LibraryMeta":
        data = json.loads(Path(path).read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: library format {data.get('format_version')} is not "
                             f"{FORMAT_VERSION}; recompile it with `tsedge compile`")
        data["model"] = ModelConfig.from_dict(data["model"])
        data["policy"] = PolicyConfig(**data["policy"])
        data["params"] = [ParamSpec(**p) for p in data["params"]]
        return cls(**data)
