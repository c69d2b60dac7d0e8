"""Model weights: read a GGUF file, a Hugging Face folder or a tsedge weights folder.

``load_source`` gives the config, the tokenizer and a lazy stream of tensors under Hugging Face
names and shapes ([out, in] for linears), float32 or float16, checked against the config.
``save_weights_folder`` / ``load_weights_folder`` write and read the folder a compiled library
runs from: ``params.safetensors`` (float16; with a quantization, each quantized weight ``W`` as
``W.qweight`` (U32 or I8) + ``W.scale`` (F16) (+ ``W.min`` (F16), q4_1) in
``models/quantization.py``'s canonical layout), ``tsedge.json`` (which records the quantization),
``config.json`` and tokenizer files. A GGUF's Q4_0/Q4_1/Q8_0 weights are read as stored
(``models.quantization.from_ggml_blocks``): its ``quantization`` is what they are
(``gguf_quantization``), and a library of another quantization dequantizes (and re-quantizes) them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from tsedge.fetch import default_model_path
from tsedge.gguf_check import GGUFCheckError, check_counts, check_layout
from tsedge.models.config import PRESETS, ModelConfig, from_hf_config
from tsedge.models.tensor_parallel import shard_shapes
from tsedge.models.quantization import (GGML_SCHEMES, ROLES, QuantizationError, QuantizedTensor, check_quantized,
                                        dequantize, from_ggml_blocks, quantize, role_of, role_spec, roles,
                                        scheme_of)
from tsedge.tokenizer import Tokenizer, TokenizerError

Tensors = Iterator[tuple[str, np.ndarray]]

# Presets tsedge can fetch by name.
EMBEDDED = {"smollm2-135m": default_model_path}

# GGML tensor types tsedge reads: those gguf.quants dequantizes, each tested against an
# independent decoding (tests/test_weights_untrusted.py)
GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
              "Q5_K", "Q6_K", "TQ1_0", "TQ2_0", "MXFP4", "IQ4_NL", "IQ4_XS", "IQ1_S", "IQ1_M", "IQ2_XXS",
              "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "NVFP4")

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
_ST_PACKED = {"U32": np.uint32, "I8": np.int8}  # quantized weights (tsedge folders only)
_ST_NAMES = {np.dtype(np.float16): "F16", np.dtype(np.uint32): "U32", np.dtype(np.int8): "I8"}
_ST_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class WeightsError(ValueError):
    """Weights cannot be found, read, or do not fit the model config."""


@dataclasses.dataclass
class ModelSource:
    """A model to compile or run: config, tokenizer, and its tensors read on demand."""

    config: ModelConfig
    tokenizer: Tokenizer
    path: Path
    read: Callable[[], Tensors] = dataclasses.field(repr=False)
    quantization: str = "q0"  # what its weights are stored in (models/quantization.py roles; q0: float)
    shard: tuple[int, int] | None = None  # (rank, shards): a shard folder's linears hold that part only
    requantizable: bool = False  # a library of another quantization may take it (GGUF: dequantized first)
    notes: tuple[str, ...] = ()  # what a user should know about how it loads (one line each)

    def tensors(self, blocks: bool = True) -> Tensors:
        """Yield ``(name, array)`` one at a time under HF names: float arrays, and the weights
        stored quantized (a quantized tsedge folder's, a GGUF's Q4_0/Q4_1/Q8_0 ones) as
        ``QuantizedTensor``; ``blocks=False``: those dequantized to float32 too."""
        stream = self.read()
        return stream if blocks else ((n, dequantize(a) if isinstance(a, QuantizedTensor) else a) for n, a in stream)


# ---- entry point --------------------------------------------------------------------------------
def load_source(model: str, rank: int = 0) -> ModelSource:
    """Open a model: a preset name with embedded weights, a ``.gguf`` file or a weights folder;
    a folder of tensor-parallel shard folders (``tsedge convert --tensor-parallel``) opens as its
    ``shard-<rank>``."""
    path = Path(model).expanduser()
    if (path / "shard-0").is_dir():
        if not (path / f"shard-{rank}").is_dir():
            raise WeightsError(f"{path} has no shard-{rank}: it was converted for fewer tensor-parallel shards; "
                               "convert it with the library's --tensor-parallel")
        path = path / f"shard-{rank}"
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
    unused = sorted(n for n in set(found) - set(shapes) if not _ignorable(n, config))
    if unused:
        raise WeightsError(f"{origin}: tensor {unused[0]} is not part of {config.name} "
                           f"({len(unused)} such tensors); the config or metadata does not "
                           "describe these weights")
    for name, shape in shapes.items():
        if name not in found:
            missing = len(set(shapes) - set(found))
            raise WeightsError(f"{origin}: tensor {name} is missing ({missing} missing in all) "
                               f"for {config.name}")
        if found[name] != shape:
            raise WeightsError(f"{origin}: tensor {name} has shape {found[name]}, expected "
                               f"{shape} for {config.name}{_shape_hint(name, config)}")
    return lambda: ((name, read(name)) for name in shapes)


def _shape_hint(name: str, config: ModelConfig) -> str:
    """Which config values an attention projection's expected shape came from."""
    heads = {"q_proj": ("num_attention_heads", config.num_heads),
             "k_proj": ("num_key_value_heads", config.num_kv_heads),
             "v_proj": ("num_key_value_heads", config.num_kv_heads)}
    for proj, (field, count) in heads.items():
        if f".{proj}." in name:
            return (f" ({field} {count} x head_dim {config.head_dim} x hidden_size {config.hidden_size}): "
                    f"check {field} and head_dim in the config")
    return ""


def _ignorable(name: str, config: ModelConfig) -> bool:
    """Tensors a checkpoint may carry that the model recomputes: RoPE tables, a tied head."""
    return name.endswith(".rotary_emb.inv_freq") or (name == "lm_head.weight"
                                                     and config.tie_embeddings)


def _match_preset(config: ModelConfig, adopt_rope_scaling: bool = False) -> ModelConfig:
    """The preset equal to ``config`` but for its name, else ``config`` itself.

    ``adopt_rope_scaling``: also take the preset's RoPE scaling (a GGUF file carries Llama 3.1's
    scaling only as a ``rope_freqs`` tensor, not as parameters).
    """
    for preset in PRESETS.values():
        scaling = preset.rope_scaling if adopt_rope_scaling else config.rope_scaling
        same = dataclasses.replace(config, name=preset.name, rope_scaling=scaling)
        if same == preset:
            return preset
    return config


# ---- safetensors (own reader: lazy, and BF16 without torch) -------------------------------------
def _safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor entries of a safetensors file, offsets made absolute; each checked against the file.

    ``dtype`` × ``shape`` must fill the entry's byte span, and the spans must tile the data.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8:
            raise _corrupt(path, f"{size} bytes, less than the 8-byte header length")
        if n > size - 8:
            raise _corrupt(path, f"header of {n} bytes in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise _corrupt(path, f"header unreadable: {e}") from e
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    entries = {name: _safetensors_entry(path, name, entry) for name, entry in header.items()}
    end = 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"]):
        begin, stop = entry["data_offsets"]
        if begin != end:
            raise _corrupt(path, f"tensor {name} starts at byte {begin} of the data, expected "
                                 f"{end} (tensors overlap or leave a gap)")
        end = stop
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "corrupt"
        raise WeightsError(f"{path}: {what} safetensors file ({size} bytes, the header describes "
                           f"{8 + n + end}); re-download or re-save it")
    for name, entry in entries.items():
        entry["file"], entry["name"], entry["start"] = path, name, 8 + n + entry["data_offsets"][0]
    return entries


def _safetensors_entry(path: Path, name: str, entry: Any) -> dict[str, Any]:
    """A header entry with ``dtype``, ``shape`` and ``data_offsets`` that agree with each other."""
    if not isinstance(entry, dict):
        raise _corrupt(path, f"tensor {name}: header entry is not a JSON object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise _corrupt(path, f"tensor {name} has no {key!r} in the header")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _ST_SIZES:
        raise _corrupt(path, f"tensor {name} has unknown dtype {dtype!r}")
    if not _naturals(shape):
        raise _corrupt(path, f"tensor {name} has shape {shape!r}, not a list of sizes")
    if not (_naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise _corrupt(path, f"tensor {name} has data_offsets {offsets!r}, not [begin, end]")
    need = math.prod(shape) * _ST_SIZES[dtype]
    if offsets[1] - offsets[0] != need:
        raise _corrupt(path, f"tensor {name} is {dtype} of shape {shape} ({need} bytes), but its "
                             f"data_offsets span {offsets[1] - offsets[0]} bytes")
    return entry


def _naturals(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _corrupt(path: Path, detail: str) -> WeightsError:
    return WeightsError(f"{path}: corrupt safetensors file ({detail}); re-download or re-save it")


def _read_safetensor(entry: dict[str, Any], dtypes: dict[str, type] = _ST_DTYPES) -> np.ndarray:
    if entry["dtype"] not in dtypes:
        raise WeightsError(f"{entry['file']}: tensor {entry['name']} has dtype {entry['dtype']}, "
                           f"which tsedge does not read here (supported: {', '.join(dtypes)}); "
                           "save the weights as one of those")
    count = int(np.prod(entry["shape"]))
    array = np.fromfile(entry["file"], dtypes[entry["dtype"]], count, offset=entry["start"])
    if entry["dtype"] == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.reshape(entry["shape"])


def _write_safetensors(path: Path, params: Iterable[tuple[str, np.ndarray]]) -> list[str]:
    """Stream ``params`` into a safetensors file (float arrays as float16, uint32/int8 as they
    are); returns the names in order."""
    header: dict[str, Any] = {}
    with tempfile.TemporaryFile(dir=path.parent) as data:
        for name, array in params:
            if name in header:
                raise WeightsError(f"tensor {name} is given twice")
            packed = array.dtype in (np.uint32, np.int8)
            array = np.ascontiguousarray(array, dtype=array.dtype if packed else np.float16)
            start = data.tell()
            data.write(array.tobytes())
            header[name] = {"dtype": _ST_NAMES[array.dtype], "shape": list(array.shape),
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
        return _tsedge_folder(path, ModelConfig.from_dict(cfg), tokenizer)
    try:
        config = _match_preset(from_hf_config(cfg, name=path.name))
    except ValueError as e:
        raise WeightsError(f"{path / 'config.json'}: {e}") from e
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
    entries: dict[str, dict[str, Any]] = {}
    for f in files:
        for name, entry in _safetensors_header(f).items():
            if name in entries:
                raise WeightsError(f"{path}: tensor {name} is in both {entries[name]['file'].name} "
                                   f"and {f.name}; remove one copy")
            entries[name] = entry
    return entries


def _folder_tokenizer(path: Path) -> Tokenizer:
    if not (path / "tokenizer.json").exists():
        raise WeightsError(f"{path}: no tokenizer.json")
    config = path / "tokenizer_config.json"
    return Tokenizer.from_file(path / "tokenizer.json", config if config.exists() else None)


def _tsedge_folder(path: Path, config: ModelConfig, tokenizer: Tokenizer) -> ModelSource:
    """A folder written by ``save_weights_folder``; a quantized one's packed weights and scales are
    checked (dtypes, shapes, group counts, code range) against the config as they are read."""
    info, names, entries = _weights_manifest(path)
    quantization = str(info.get("quantization", "q0"))  # checked by _weights_manifest
    shard = info.get("shard")
    if shard is not None and not (_naturals(shard) and len(shard) == 2 and shard[0] < shard[1]):
        raise WeightsError(f"{path / 'tsedge.json'}: shard {shard!r} is not [rank, shards]; re-convert the weights")
    shapes = expected_shapes(config) if shard is None else shard_shapes(expected_shapes(config), shard[1])

    def read(name: str) -> np.ndarray | QuantizedTensor:
        qs = scheme_of(quantization, name)
        if qs is None:
            return _read_safetensor(entries[name])
        qt = QuantizedTensor(qs, _read_safetensor(entries[f"{name}.qweight"], _ST_PACKED),
                             *(_read_safetensor(entries[f"{name}.{part}"]) for part in qs.parts[1:]))
        if name not in shapes:
            raise WeightsError(f"{path}: quantized tensor {name} is not part of {config.name}")
        try:
            check_quantized(qt, name, shapes[name])
        except QuantizationError as e:
            raise WeightsError(f"{path}: {e}") from e
        return qt

    stored = [f"{n}.{part}" for n in names if scheme_of(quantization, n) is not None
              for part in scheme_of(quantization, n).parts]
    absent = [n for n in stored if n not in entries]
    if absent:
        raise WeightsError(f"{path / 'params.safetensors'}: tensor {absent[0]} of a {quantization} folder is "
                           "missing; re-convert the weights folder")
    return ModelSource(config, tokenizer, path, lambda: ((n, read(n)) for n in names), quantization,
                       None if shard is None else (shard[0], shard[1]))


def quantized_tensors(tensors: Tensors, quantization: str) -> Tensors:
    """``tensors`` with each weight ``W`` that ``quantization`` quantizes replaced by ``W.qweight``
    and ``W.scale`` (and ``W.min``) in the canonical layout of ``models/quantization.py`` (weights
    already in its scheme as they are; others dequantized first), for ``save_weights_folder``."""
    for name, array in tensors:
        qs = scheme_of(quantization, name)
        if isinstance(array, QuantizedTensor) and array.scheme != qs:
            array = dequantize(array)
        if qs is None:
            yield name, array
            continue
        qt = array if isinstance(array, QuantizedTensor) else quantize(array, qs, name)
        for part, value in qt.arrays().items():
            yield f"{name}.{part}", value


def save_weights_folder(out_dir: str | Path, params: Iterable[tuple[str, np.ndarray]],
                        config: ModelConfig, tokenizer: Tokenizer, meta: dict[str, Any],
                        quantization: str = "q0", shard: tuple[int, int] | None = None) -> None:
    """Write a tsedge weights folder; ``params`` are consumed one at a time, stored as float16, or
    with a ``quantization`` its weights quantized (``quantized_tensors``).
    ``shard``: (rank, shards) when ``params`` are a tensor-parallel shard's (its linears cut by
    ``models.tensor_parallel.linear_split``), recorded for the loader."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stored = _write_safetensors(out_dir / "params.safetensors", quantized_tensors(params, quantization))
    order = [n.removesuffix(".qweight") for n in stored if n.rpartition(".")[2] not in ("scale", "min")]
    info = {"meta": meta, "params": order, "quantization": quantization}
    if shard is not None:
        info["shard"] = list(shard)
    (out_dir / "tsedge.json").write_text(json.dumps(info, indent=1))
    (out_dir / "config.json").write_text(json.dumps({**config.to_dict(), "tsedge": True}, indent=2))
    tokenizer.save(out_dir)


def load_weights_folder(directory: str | Path
                        ) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """``(meta, [(name, float16 array), ...])`` of a float (q0) folder written by ``save_weights_folder``."""
    info, names, entries = _weights_manifest(Path(directory))
    return info["meta"], [(n, _read_safetensor(entries[n])) for n in names]


def _weights_manifest(directory: Path) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """``(tsedge.json, param names in order, safetensors entries)`` of a tsedge weights folder
    (a quantized weight ``W`` is listed as ``W``, stored as ``W.qweight``, ``W.scale`` (and ``W.min``))."""
    manifest, params = directory / "tsedge.json", directory / "params.safetensors"
    if not manifest.exists() or not params.exists():
        raise WeightsError(f"{directory}: no tsedge.json or params.safetensors; not a folder "
                           "written by `tsedge convert`")
    info = json.loads(manifest.read_text())
    entries = _safetensors_header(params)
    quantization = str(info.get("quantization", "q0"))
    try:
        roles(quantization)
    except QuantizationError as e:
        raise WeightsError(f"{manifest}: {e}") from e
    missing = [n for n in info["params"] if n not in entries and scheme_of(quantization, n) is None]
    if missing:
        raise WeightsError(f"{params}: tensor {missing[0]} is missing")
    return info, info["params"], entries


# ---- GGUF ---------------------------------------------------------------------------------------
def _load_gguf(path: Path) -> ModelSource:
    reader = _open_gguf(path)
    try:
        return _gguf_source(reader, path)
    except GGUFCheckError as e:
        raise WeightsError(f"{path}: {e}; fix the GGUF metadata or re-convert the model") from e


def _open_gguf(path: Path) -> gguf.GGUFReader:
    """``GGUFReader`` of a file whose lengths, counts and offsets were checked first."""
    try:
        check_layout(path)
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise WeightsError(f"{path}: corrupt or truncated GGUF file ({e}); re-download or "
                           "re-convert it") from e


def _gguf_source(reader: gguf.GGUFReader, path: Path) -> ModelSource:
    arch = _meta(reader, "general.architecture", str)
    if arch not in ("llama", "qwen2"):
        raise WeightsError(f"{path}: unsupported GGUF architecture {arch!r} (llama, qwen2)")
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        if t.tensor_type.name not in GGUF_TYPES:
            raise WeightsError(f"{path}: tensor {t.name} has GGML type {t.tensor_type.name}, which "
                               f"tsedge cannot read (supported: {', '.join(GGUF_TYPES)}); "
                               "re-quantize the model to one of those")
    # GGUF shapes are [ne0 (inner), ne1, ...]: reversed, they are numpy/HF shapes
    shapes = {name: tuple(reversed(t.shape.tolist())) for name, t in tensors.items()}
    config = _gguf_config(reader, arch, path, shapes, _check_token_arrays(reader))
    try:
        tokenizer = Tokenizer.from_gguf(reader)
    except TokenizerError as e:
        raise WeightsError(f"{path}: {e}") from e
    hf_to_gguf = {_hf_name(name): name for name in tensors if name != "rope_freqs.weight"}
    found = {hf: shapes[g] for hf, g in hf_to_gguf.items()}

    types = {hf: tensors[g].tensor_type.name for hf, g in hf_to_gguf.items()}
    quantization, notes = gguf_quantization(types)

    def read(name: str) -> np.ndarray | QuantizedTensor:
        t = tensors[hf_to_gguf[name]]
        data = _tensor_data(path, t)
        if scheme_of(quantization, name) is not None:  # blocks kept as stored
            try:
                array = from_ggml_blocks(data, t.tensor_type.name, shapes[t.name], name)
            except QuantizationError as e:
                raise WeightsError(f"{path}: {e}") from e
        else:
            array = gguf.quants.dequantize(data, t.tensor_type)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
            array = array.map(lambda a: _unpermute(a, heads)) if isinstance(array, QuantizedTensor) else _unpermute(array, heads)
        return array

    return ModelSource(config, tokenizer, path, _checked(config, found, read, path), quantization,
                       requantizable=True, notes=notes)


def _tensor_data(path: Path, t: gguf.ReaderTensor) -> np.ndarray:
    """``t.data`` (dtype and shape as the reader gives them) read from the file, not through the
    reader's memory map: the map's pages would stay resident in the process beside the library's
    copy of the weights (~93 MB of SmolLM2's RSS). Offsets and lengths were checked (``check_layout``)."""
    with open(path, "rb") as f:
        f.seek(t.data_offset)
        raw = np.fromfile(f, dtype=np.uint8, count=t.n_bytes)
    if raw.size != t.n_bytes:
        raise WeightsError(f"{path}: tensor {t.name} is cut short ({raw.size} of {t.n_bytes} bytes); "
                           "re-download or re-convert the file")
    return raw.view(t.data.dtype).reshape(t.data.shape)


_FLOAT_TYPES = ("F32", "F16", "BF16")


def gguf_quantization(types: dict[str, str]) -> tuple[str, tuple[str, ...]]:
    """What a GGUF's weights are, as a quantization (``models/quantization.py`` roles), from the
    GGML type of each tensor (HF names): a role whose tensors are all Q4_0, all Q4_1 or all Q8_0
    keeps them as stored (q4_0, q4_1, q8f16); float tensors, other block types (K-quants, IQ, ...)
    and mixes load as float (q0), each such role named in a note. A tied lm_head is the embedding."""
    by_role, notes = {}, []
    for role in ROLES:
        kinds = sorted({t for n, t in types.items() if role_of(n) == role})
        if role == "lm_head" and not kinds:  # tied to the embedding table
            by_role[role] = by_role["embedding"]
            continue
        names = {GGML_SCHEMES.get(k, "q0") for k in kinds}
        by_role[role] = names.pop() if len(names) == 1 else "q0"
        if by_role[role] == "q0" and set(kinds) - set(_FLOAT_TYPES):
            notes.append(f"the {role} weights are {'/'.join(kinds)}; tsedge keeps only Q4_0, Q4_1 and Q8_0 blocks "
                         f"as stored (one type per role), so they load as float (--quantization q4f16 or q8f16 "
                         "re-quantizes them instead)")
    return role_spec(by_role), tuple(notes)


_REQUIRED = object()
_V = gguf.GGUFValueType
_INTS = {_V.UINT8, _V.INT8, _V.UINT16, _V.INT16, _V.UINT32, _V.INT32, _V.UINT64, _V.INT64}
_KINDS = {int: _INTS, float: _INTS | {_V.FLOAT32, _V.FLOAT64}, str: {_V.STRING}}


def _meta(reader: gguf.GGUFReader, key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """The scalar metadata value ``key`` as ``kind`` (int, float, str); ``default`` if absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise GGUFCheckError(f"metadata {key} is missing")
        return default
    if len(field.types) != 1 or field.types[0] not in _KINDS[kind]:
        raise GGUFCheckError(f"metadata {key} has type {_type_name(field)}, expected "
                             f"{kind.__name__}")
    return kind(field.contents())


def _type_name(field: gguf.ReaderField) -> str:
    return "[".join(t.name for t in field.types) + "]" * (len(field.types) - 1)


def _check_token_arrays(reader: gguf.GGUFReader) -> int:
    """Types and lengths of the ``tokenizer.ggml.*`` arrays and token ids; the token count."""
    arrays = {"tokens": {_V.STRING}, "token_type": _INTS, "scores": {_V.FLOAT32},
              "merges": {_V.STRING}}
    n_tokens = None
    for name, items in arrays.items():
        field = reader.fields.get(f"tokenizer.ggml.{name}")
        if field is None:
            continue
        if field.types[0] != _V.ARRAY or len(field.types) != 2 or field.types[1] not in items:
            raise GGUFCheckError(f"metadata tokenizer.ggml.{name} has type {_type_name(field)}")
        n_tokens = len(field.data) if n_tokens is None else n_tokens
        if name in ("token_type", "scores") and len(field.data) != n_tokens:
            raise GGUFCheckError(f"metadata tokenizer.ggml.{name} has {len(field.data)} entries, "
                                 f"but tokenizer.ggml.tokens has {n_tokens}")
    if n_tokens is None:
        raise GGUFCheckError("metadata tokenizer.ggml.tokens is missing")
    for key in ("bos_token_id", "eos_token_id"):
        token = _meta(reader, f"tokenizer.ggml.{key}", int, 0)
        if not 0 <= token < n_tokens:
            raise GGUFCheckError(f"metadata tokenizer.ggml.{key} is {token}, but "
                                 f"tokenizer.ggml.tokens has {n_tokens} tokens")
    return n_tokens


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


_COUNTS = ("block_count", "context_length", "embedding_length", "feed_forward_length",
           "attention.head_count")
_OPTIONAL_COUNTS = ("attention.head_count_kv", "attention.key_length", "attention.value_length",
                    "rope.dimension_count", "vocab_size")


def _gguf_config(reader: gguf.GGUFReader, arch: str, path: Path,
                 shapes: dict[str, tuple[int, ...]], n_tokens: int) -> ModelConfig:
    meta = {key: _meta(reader, f"{arch}.{key}", int) for key in _COUNTS}
    meta |= {key: _meta(reader, f"{arch}.{key}", int) for key in _OPTIONAL_COUNTS
             if f"{arch}.{key}" in reader.fields}
    meta.setdefault("attention.head_count_kv", meta["attention.head_count"])
    head_dim = check_counts(arch, meta, shapes, n_tokens)
    rope_theta = _positive(reader, f"{arch}.rope.freq_base", 10000.0)
    eps = _positive(reader, f"{arch}.attention.layer_norm_rms_epsilon", _REQUIRED)
    config = ModelConfig(
        name=path.stem,
        hidden_size=meta["embedding_length"],
        intermediate_size=meta["feed_forward_length"],
        num_layers=meta["block_count"],
        num_heads=meta["attention.head_count"],
        num_kv_heads=meta["attention.head_count_kv"],
        vocab_size=n_tokens,
        head_dim=head_dim,
        rope_theta=rope_theta,
        rms_norm_eps=float(f"{eps:.6g}"),  # stored as float32
        tie_embeddings="output.weight" not in shapes,
        qkv_bias="blk.0.attn_q.bias" in shapes,
        context_window=meta["context_length"],
    )
    scaling = _meta(reader, f"{arch}.rope.scaling.type", str, "none")
    if scaling != "none":
        raise WeightsError(f"{path}: metadata {arch}.rope.scaling.type is {scaling!r}, which tsedge does "
                           "not implement (Llama 3.1's rope_freqs scaling is supported); use another model")
    matched = _match_preset(config, adopt_rope_scaling="rope_freqs.weight" in shapes)
    if "rope_freqs.weight" in shapes and matched is config:
        raise WeightsError(f"{path}: RoPE frequency scaling (rope_freqs) of a model that matches "
                           "no preset; convert it from its Hugging Face folder instead")
    return matched


def _positive(reader: gguf.GGUFReader, key: str, default: Any) -> float:
    value = _meta(reader, key, float, default)
    if not 0 < value < math.inf:
        raise GGUFCheckError(f"metadata {key} is {value}; it must be a positive number")
    return value
