"""Model weights: read a GGUF file, a Hugging Face folder or a tsedge weights folder.

``load_source`` gives the config, the tokenizer and a lazy stream of tensors under Hugging Face
names and shapes ([out, in] for linears), float32 or float16, checked against the config.
``save_weights_folder`` / ``load_weights_folder`` write and read the folder a compiled library
runs from: ``params.safetensors`` (float16), ``tsedge.json``, ``config.json`` and tokenizer files.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from tsedge.fetch import default_model_path
from tsedge.models.config import PRESETS, ModelConfig, from_hf_config
from tsedge.tokenizer import Tokenizer, TokenizerError

Tensors = Iterator[tuple[str, np.ndarray]]

# Presets tsedge can fetch by name.
EMBEDDED = {"smollm2-135m": default_model_path}

GGUF_TYPES = {q.name for q in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                               gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
                               gguf.GGMLQuantizationType.Q8_0)}

_GGUF_NAMES = {  # GGUF tensor name (without ".weight"/".bias") -> Hugging Face name
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


class WeightsError(ValueError):
    """Weights cannot be found, read, or do not fit the model config."""


@dataclasses.dataclass
class ModelSource:
    """A model to compile or run: config, tokenizer, and its tensors read on demand."""

    config: ModelConfig
    tokenizer: Tokenizer
    path: Path
    read: Callable[[], Tensors] = dataclasses.field(repr=False)

    def tensors(self) -> Tensors:
        """Yield ``(name, array)`` one at a time (HF names; a tsedge folder: as it was saved)."""
        return self.read()


# ---- entry point --------------------------------------------------------------------------------
def load_source(model: str) -> ModelSource:
    """Open a model: a preset name with embedded weights, a ``.gguf`` file or a weights folder."""
    path = Path(model).expanduser()
    if not path.exists():
        if model in EMBEDDED:
            path = EMBEDDED[model]()
        elif model in PRESETS:
            raise WeightsError(f"preset {model!r} has no embedded weights: pass a .gguf file or a "
                               "Hugging Face folder of that model")
        elif "/" in model or "\\" in model or path.suffix:
            raise WeightsError(f"{model}: no such file or folder (for built-in model names see "
                               "`tsedge models`)")
        else:
            raise WeightsError(f"unknown model name {model!r}; built-in: {', '.join(EMBEDDED)} "
                               "(see `tsedge models`), or pass a .gguf file or weights folder")
    if path.is_dir():
        return _load_folder(path)
    if path.suffix == ".gguf":
        return _load_gguf(path)
    raise WeightsError(f"{path}: expected a .gguf file or a folder with config.json")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes of a Llama-family model, in load order."""
    h, d, f = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h),
                   p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h)}
        if config.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,),
                       p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
        shapes |= {p + "self_attn.o_proj.weight": (h, q),
                   p + "post_attention_layernorm.weight": (h,),
                   p + "mlp.gate_proj.weight": (f, h),
                   p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f)}
    shapes["model.norm.weight"] = (h,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def _checked(config: ModelConfig, found: dict[str, tuple[int, ...]],
             read: Callable[[str], np.ndarray], origin: Path) -> Callable[[], Tensors]:
    """Check ``found`` names/shapes against the config now; return a stream in load order."""
    shapes = expected_shapes(config)
    for name, shape in shapes.items():
        if name not in found:
            missing = len(set(shapes) - set(found))
            raise WeightsError(f"{origin}: tensor {name} is missing ({missing} missing in all) "
                               f"for {config.name}")
        if found[name] != shape:
            raise WeightsError(f"{origin}: tensor {name} has shape {found[name]}, expected "
                               f"{shape} for {config.name}")
    return lambda: ((name, read(name)) for name in shapes)


def _match_preset(config: ModelConfig) -> ModelConfig:
    """The preset with the same shapes (its name and RoPE scaling), else ``config`` itself."""
    for preset in PRESETS.values():
        same = dataclasses.replace(config, name=preset.name, rope_scaling=preset.rope_scaling)
        if same == preset:
            return preset
    return config


# ---- safetensors (own reader: lazy, and BF16 without torch) -------------------------------------
def _safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor entries of a safetensors file, with offsets made absolute; checks truncation."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{path}: corrupt safetensors file (header unreadable: {e})") from e
    if 8 + n + end > size:
        raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, needs "
                           f"{8 + n + end})")
    for entry in header.values():
        entry["file"], entry["start"] = path, 8 + n + entry["data_offsets"][0]
    return header


def _read_safetensor(entry: dict[str, Any]) -> np.ndarray:
    if entry["dtype"] not in _ST_DTYPES:
        raise WeightsError(f"{entry['file']}: unsupported tensor dtype {entry['dtype']} "
                           f"(supported: {', '.join(_ST_DTYPES)})")
    count = int(np.prod(entry["shape"]))
    array = np.fromfile(entry["file"], _ST_DTYPES[entry["dtype"]], count, offset=entry["start"])
    if entry["dtype"] == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.reshape(entry["shape"])


def _write_safetensors(path: Path, params: Iterable[tuple[str, np.ndarray]]) -> list[str]:
    """Stream ``params`` as float16 into a safetensors file; returns the names in order."""
    header: dict[str, Any] = {}
    with tempfile.TemporaryFile(dir=path.parent) as data:
        for name, array in params:
            if name in header:
                raise WeightsError(f"tensor {name} is given twice")
            array = np.ascontiguousarray(array, dtype=np.float16)
            start = data.tell()
            data.write(array.tobytes())
            header[name] = {"dtype": "F16", "shape": list(array.shape),
                            "data_offsets": [start, data.tell()]}
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        data.seek(0)
        with open(path, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            shutil.copyfileobj(data, f)
    return list(header)


# ---- folders ------------------------------------------------------------------------------------
def _load_folder(path: Path) -> ModelSource:
    """A Hugging Face folder or a folder written by ``save_weights_folder``."""
    if not (path / "config.json").exists():
        raise WeightsError(f"{path}: no config.json; expected a Hugging Face model folder, a "
                           "tsedge weights folder or a .gguf file")
    cfg = json.loads((path / "config.json").read_text())
    tokenizer = _folder_tokenizer(path)
    if cfg.pop("tsedge", False):
        _, names, entries = _weights_manifest(path)
        read = lambda: ((n, _read_safetensor(entries[n])) for n in names)  # noqa: E731
        return ModelSource(ModelConfig.from_dict(cfg), tokenizer, path, read)
    try:
        config = _match_preset(from_hf_config(cfg, name=path.name))
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{path / 'config.json'}: cannot use this config ({e!r})") from e
    entries = _folder_entries(path)
    found = {name: tuple(e["shape"]) for name, e in entries.items()}
    read = _checked(config, found, lambda name: _read_safetensor(entries[name]), path)
    return ModelSource(config, tokenizer, path, read)


def _folder_entries(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor entries of all shards (those named by ``model.safetensors.index.json`` if any)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise WeightsError(f"{index}: shard {absent[0]} is missing from the folder")
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{path}: no *.safetensors weights in the folder")
    return {name: e for f in files for name, e in _safetensors_header(f).items()}


def _folder_tokenizer(path: Path) -> Tokenizer:
    if not (path / "tokenizer.json").exists():
        raise WeightsError(f"{path}: no tokenizer.json")
    config = path / "tokenizer_config.json"
    return Tokenizer.from_file(path / "tokenizer.json", config if config.exists() else None)


def save_weights_folder(out_dir: str | Path, params: Iterable[tuple[str, np.ndarray]],
                        config: ModelConfig, tokenizer: Tokenizer, meta: dict[str, Any]) -> None:
    """Write a tsedge weights folder; ``params`` are consumed one at a time, stored as float16."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    order = _write_safetensors(out_dir / "params.safetensors", params)
    (out_dir / "tsedge.json").write_text(json.dumps({"meta": meta, "params": order}, indent=1))
    (out_dir / "config.json").write_text(json.dumps({**config.to_dict(), "tsedge": True}, indent=2))
    tokenizer.save(out_dir)


def load_weights_folder(directory: str | Path
                        ) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """``(meta, [(name, float16 array), ...])`` of a folder written by ``save_weights_folder``."""
    meta, names, entries = _weights_manifest(Path(directory))
    return meta, [(n, _read_safetensor(entries[n])) for n in names]


def _weights_manifest(directory: Path) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """``(meta, param names in order, safetensors entries)`` of a tsedge weights folder."""
    manifest, params = directory / "tsedge.json", directory / "params.safetensors"
    if not manifest.exists() or not params.exists():
        raise WeightsError(f"{directory}: no tsedge.json or params.safetensors; not a folder "
                           "written by `tsedge convert`")
    info = json.loads(manifest.read_text())
    entries = _safetensors_header(params)
    missing = [n for n in info["params"] if n not in entries]
    if missing:
        raise WeightsError(f"{params}: tensor {missing[0]} is missing")
    return info["meta"], info["params"], entries


# ---- GGUF ---------------------------------------------------------------------------------------
def _load_gguf(path: Path) -> ModelSource:
    try:
        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise WeightsError(f"{path}: corrupt or truncated GGUF file ({e!r})") from e
    if arch not in ("llama", "qwen2"):
        raise WeightsError(f"{path}: unsupported GGUF architecture {arch!r} (llama, qwen2)")
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        if t.tensor_type.name not in GGUF_TYPES:
            raise WeightsError(f"{path}: tensor {t.name} has unsupported GGUF type "
                               f"{t.tensor_type.name} (supported: {', '.join(sorted(GGUF_TYPES))})")
    try:
        tokenizer = Tokenizer.from_gguf(reader)
    except TokenizerError as e:
        raise WeightsError(f"{path}: {e}") from e
    config = _gguf_config(reader, arch, path.stem, set(tensors))
    hf_to_gguf = {_hf_name(name): name for name in tensors}
    # GGUF shapes are [ne0 (inner), ne1, ...]: reversed, they are numpy/HF shapes
    found = {hf: tuple(reversed(tensors[g].shape.tolist())) for hf, g in hf_to_gguf.items()}

    def read(name: str) -> np.ndarray:
        t = tensors[hf_to_gguf[name]]
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
            array = _unpermute(array, heads)
        return array

    return ModelSource(config, tokenizer, path, _checked(config, found, read, path))


def _hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; others unchanged."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GGUF_NAMES:
        return f"{_GGUF_NAMES[parts[0]]}.{parts[1]}"
    return gguf_name


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved RoPE pairs) back to HF's rotate-half order."""
    return w.reshape(heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_config(reader: gguf.GGUFReader, arch: str, name: str, tensors: set[str]
                 ) -> ModelConfig:
    def get(key: str, default: Any = None) -> Any:  # no default: the key is required
        field = reader.fields.get(f"{arch}.{key}")
        if field is None and default is None:
            raise WeightsError(f"GGUF metadata {arch}.{key} is missing")
        return default if field is None else field.contents()

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    config = ModelConfig(
        name=name,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        head_dim=get("attention.key_length", hidden // heads),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(f"{get('attention.layer_norm_rms_epsilon'):.6g}"),  # stored as float32
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        context_window=get("context_length"),
    )
    matched = _match_preset(config)
    if "rope_freqs.weight" in tensors and matched is config:
        raise WeightsError(f"{name}: RoPE frequency scaling (rope_freqs) of a model that matches "
                           "no preset; convert it from its Hugging Face folder instead")
    return matched
