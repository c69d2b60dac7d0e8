"""Bounded checks of an untrusted GGUF file, before ``gguf.GGUFReader`` walks it.

``check_layout`` parses the header, the metadata and the tensor infos itself, checking every
count, length and offset against the bytes that remain, so a lying length is refused in O(file)
time and memory (GGUFReader would iterate over whatever count the file declares).
``check_counts`` checks the model's metadata counts against the tensors actually present.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType
from gguf import GGUFValueType as V

_SCALARS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
            V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}
_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MIN_KV, _MIN_TENSOR = 13, 24  # smallest encodings: key + type + 1-byte value; name + dims + ...


class GGUFCheckError(ValueError):
    """The file's structure or metadata is inconsistent (message without the file name)."""


class _Cursor:
    """Reads little/big-endian values from a buffer, never past its end."""

    def __init__(self, buf: mmap.mmap | bytes, order: str) -> None:
        self.buf, self.order, self.pos = buf, order, 0

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def skip(self, n: int, what: str) -> int:
        """Advance over ``n`` bytes; returns where they start."""
        if n > self.remaining():
            raise GGUFCheckError(f"{what} needs {n} bytes at offset {self.pos}, but only "
                                 f"{self.remaining()} remain")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, code: str, what: str) -> int | float | bool:
        fmt = self.order + code
        return struct.unpack_from(fmt, self.buf, self.skip(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", f"length of {what}")
        start = self.skip(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFCheckError(f"{what} is not valid UTF-8 ({e.reason})") from e


def check_layout(path: Path) -> None:
    """Walk the GGUF header, metadata and tensor infos; check the tensor data lies in the file."""
    with open(path, "rb") as f:
        if path.stat().st_size == 0:
            raise GGUFCheckError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _check(buf)


def _check(buf: mmap.mmap | bytes) -> None:
    cur = _Cursor(buf, "<")
    if cur.scalar("I", "magic") != GGUF_MAGIC:
        raise GGUFCheckError("not a GGUF file (bad magic)")
    version = cur.scalar("I", "version")
    if version & 0xFFFF == 0:  # written on a big-endian host
        cur.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in _VERSIONS:
        raise GGUFCheckError(f"GGUF version {version} is not supported (versions 2 and 3 are)")
    n_tensors, n_kv = cur.scalar("Q", "tensor count"), cur.scalar("Q", "metadata count")
    if n_kv * _MIN_KV + n_tensors * _MIN_TENSOR > cur.remaining():
        raise GGUFCheckError(f"header declares {n_kv} metadata keys and {n_tensors} tensors, more "
                             f"than the {cur.remaining()} remaining bytes can hold")
    alignment = _check_metadata(cur, n_kv)
    spans = _check_tensor_infos(cur, n_tensors, alignment)
    data_start = -(-cur.pos // alignment) * alignment
    end = data_start
    for offset, size, name in sorted(spans):
        if data_start + offset < end:
            raise GGUFCheckError(f"tensor {name}'s data (offset {offset}) overlaps the tensor "
                                 "before it")
        end = data_start + offset + size
        if end > len(buf):
            raise GGUFCheckError(f"tensor {name} needs bytes {data_start + offset} to {end}, but "
                                 f"the file has {len(buf)} bytes (truncated?)")


def _check_metadata(cur: _Cursor, count: int) -> int:
    """Walk ``count`` key/value pairs; returns ``general.alignment``."""
    keys: set[str] = set()
    alignment = GGUF_DEFAULT_ALIGNMENT
    for i in range(count):
        key = cur.string(f"metadata key #{i}")
        if key in keys:
            raise GGUFCheckError(f"metadata key {key} appears twice")
        keys.add(key)
        vtype = _value_type(cur, f"metadata {key}")
        start = cur.pos
        _skip_value(cur, vtype, f"metadata {key}")
        if key == "general.alignment":
            alignment = _alignment(cur, vtype, start)
    return alignment


def _value_type(cur: _Cursor, what: str) -> V:
    raw = cur.scalar("I", f"type of {what}")
    try:
        return V(raw)
    except ValueError:
        raise GGUFCheckError(f"{what} has unknown value type {raw}") from None


def _skip_value(cur: _Cursor, vtype: V, what: str) -> None:
    if vtype in _SCALARS:
        cur.skip(struct.calcsize(_SCALARS[vtype]), what)
    elif vtype == V.STRING:
        cur.string(what)
    else:  # ARRAY
        item = _value_type(cur, f"items of {what}")
        n = cur.scalar("Q", f"length of {what}")
        if item == V.ARRAY:
            raise GGUFCheckError(f"{what} is an array of arrays (not supported)")
        size = struct.calcsize(_SCALARS[item]) if item in _SCALARS else 8  # 8: a string's length
        if n * size > cur.remaining():
            raise GGUFCheckError(f"{what} declares {n} {item.name} items, which need at least "
                                 f"{n * size} bytes, but only {cur.remaining()} remain")
        if item == V.STRING:
            for i in range(n):
                cur.string(f"{what}[{i}]")
        else:
            cur.skip(n * size, what)


def _alignment(cur: _Cursor, vtype: V, start: int) -> int:
    if vtype != V.UINT32:
        raise GGUFCheckError(f"metadata general.alignment has type {vtype.name}, expected UINT32")
    value = struct.unpack_from(cur.order + "I", cur.buf, start)[0]
    if value == 0 or value & (value - 1):
        raise GGUFCheckError(f"metadata general.alignment is {value}, not a power of two")
    return value


def _check_tensor_infos(cur: _Cursor, count: int, alignment: int
                        ) -> list[tuple[int, int, str]]:
    """Walk ``count`` tensor infos; returns ``(data offset, byte size, name)`` of each."""
    spans, names = [], set()
    for i in range(count):
        name = cur.string(f"name of tensor #{i}")
        if name in names:
            raise GGUFCheckError(f"tensor {name} appears twice")
        names.add(name)
        n_dims = cur.scalar("I", f"dimension count of tensor {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise GGUFCheckError(f"tensor {name} has {n_dims} dimensions (1 to {_MAX_DIMS} "
                                 "allowed)")
        dims = [cur.scalar("Q", f"dimensions of tensor {name}") for _ in range(n_dims)]
        qtype = _tensor_type(cur.scalar("I", f"type of tensor {name}"), name)
        offset = cur.scalar("Q", f"data offset of tensor {name}")
        if offset % alignment:
            raise GGUFCheckError(f"tensor {name}'s data offset {offset} is not a multiple of the "
                                 f"alignment {alignment}")
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise GGUFCheckError(f"tensor {name}'s rows of {dims[0]} values are not whole "
                                 f"{qtype.name} blocks of {block}")
        spans.append((offset, math.prod(dims) // block * block_bytes, name))
    return spans


def _tensor_type(raw: int, name: str) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType(raw)
    except ValueError:
        raise GGUFCheckError(f"tensor {name} has unknown GGML type {raw}") from None
    if qtype not in GGML_QUANT_SIZES:
        raise GGUFCheckError(f"tensor {name} has GGML type {qtype.name} of unknown block size")
    return qtype


def check_counts(arch: str, meta: dict[str, int], shapes: dict[str, tuple[int, ...]],
                 n_tokens: int) -> int:
    """Check ``{arch}.*`` counts in ``meta`` against tensor ``shapes`` (numpy order) and the
    token list; returns the head dim."""
    def disagree(key: str, fact: str) -> GGUFCheckError:
        return _disagree(arch, meta, key, fact)

    blocks = [int(n.split(".")[1]) for n in shapes if n.split(".")[0] == "blk"
              and n.split(".")[1].isdigit()]
    n_blocks = max(blocks, default=-1) + 1
    if meta["block_count"] != n_blocks:
        raise disagree("block_count", f"the tensors have {n_blocks} blocks "
                                      f"(blk.0 to blk.{n_blocks - 1})")
    vocab, width = _shape(shapes, "token_embd.weight")
    if meta["embedding_length"] != width:
        raise disagree("embedding_length", f"token_embd.weight has {width} columns")
    if n_tokens != vocab:
        raise GGUFCheckError(f"metadata tokenizer.ggml.tokens has {n_tokens} tokens, but "
                             f"token_embd.weight has {vocab} rows")
    if meta.get("vocab_size", vocab) != vocab:
        raise disagree("vocab_size", f"token_embd.weight has {vocab} rows")
    for key in ("context_length", "attention.head_count", "attention.head_count_kv"):
        if meta[key] < 1:
            raise GGUFCheckError(f"metadata {arch}.{key} is {meta[key]}; it must be positive")
    head_dim = _head_dim(arch, meta)
    if n_blocks:
        _check_block0(arch, meta, shapes, head_dim)
    for key in ("attention.value_length", "rope.dimension_count"):
        if meta.get(key, head_dim) != head_dim:
            raise disagree(key, f"the head dim is {head_dim} (tsedge needs them equal)")
    return head_dim


def _head_dim(arch: str, meta: dict[str, int]) -> int:
    heads, kv = meta["attention.head_count"], meta["attention.head_count_kv"]
    if heads % kv:
        raise GGUFCheckError(f"metadata {arch}.attention.head_count {heads} is not a multiple of "
                             f"{arch}.attention.head_count_kv {kv}")
    if "attention.key_length" in meta:
        return meta["attention.key_length"]
    if meta["embedding_length"] % heads:
        raise GGUFCheckError(f"metadata {arch}.attention.head_count {heads} does not divide "
                             f"{arch}.embedding_length {meta['embedding_length']}")
    return meta["embedding_length"] // heads


def _check_block0(arch: str, meta: dict[str, int], shapes: dict[str, tuple[int, ...]],
                  head_dim: int) -> None:
    """Heads × head dim against the q/k rows, the FFN width against the gate rows."""
    source = (f"{arch}.attention.key_length" if "attention.key_length" in meta else
              f"{arch}.embedding_length / {arch}.attention.head_count")
    for key, tensor in (("attention.head_count", "attn_q"), ("attention.head_count_kv", "attn_k")):
        rows = _shape(shapes, f"blk.0.{tensor}.weight")[0]
        if meta[key] * head_dim != rows:
            raise _disagree(arch, meta, key, f"with head dim {head_dim} ({source}) that is "
                                             f"{meta[key] * head_dim} rows, and "
                                             f"blk.0.{tensor}.weight has {rows}")
    rows = _shape(shapes, "blk.0.ffn_gate.weight")[0]
    if meta["feed_forward_length"] != rows:
        raise _disagree(arch, meta, "feed_forward_length",
                        f"blk.0.ffn_gate.weight has {rows} rows")


def _disagree(arch: str, meta: dict[str, int], key: str, fact: str) -> GGUFCheckError:
    return GGUFCheckError(f"metadata {arch}.{key} is {meta[key]}, but {fact}")


def _shape(shapes: dict[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    if name not in shapes or len(shapes[name]) != 2:
        raise GGUFCheckError(f"tensor {name} is missing or not 2-D")
    return shapes[name]
