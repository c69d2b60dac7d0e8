"""tsedge.weights on untrusted files: lying GGUF lengths and metadata, inconsistent safetensors
headers, and every GGML type tsedge accepts against an independent decoding."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from tiny_model import make_tiny_hf_model, write_gguf

from tsedge.cli import main
from tsedge.weights import GGUF_TYPES, WeightsError, load_source

Q = gguf.GGMLQuantizationType
SHARED_CASES = Path(__file__).resolve().parents[1].parent / "shared" / "cases"
FIX_META = "; fix the GGUF metadata or re-convert the model"


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``."""
    def expire(*_) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refused(path: Path, message: str) -> None:
    """``load_source(path)`` raises a one-line WeightsError that is exactly ``path: message``."""
    with deadline(60), pytest.raises(WeightsError) as info:
        load_source(str(path))
    assert "\n" not in str(info.value)
    assert re.fullmatch(re.escape(f"{path}: ") + message, str(info.value)), str(info.value)


# ---- GGUF layout: every length, count and offset against the bytes that remain ------------------
def gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def gguf_file(path: Path, kvs: list[bytes], tensors: list[bytes] = (), n_kv: int | None = None,
              n_tensors: int | None = None, data: bytes = b"") -> Path:
    """A GGUF v3 file from encoded key/values and tensor infos (counts may lie)."""
    head = struct.pack("<4sIQQ", b"GGUF", 3, len(tensors) if n_tensors is None else n_tensors,
                       len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    path.write_bytes(body + b"\0" * (-len(body) % 32) + data)
    return path


ARCH = gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama")


def tensor_info(name: str, dims: list[int], qtype: int = 0, offset: int = 0) -> bytes:
    return (gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset))


def test_lying_array_length_is_refused_at_once(tmp_path):
    # the shape of /work/shared/cases/lying_array_len.gguf: an INT32 array of 2**60 items
    lying = (gguf_string("tokenizer.ggml.token_type") + struct.pack("<IIQ", 9, 5, 2**60)
             + struct.pack("<4i", 1, 1, 1, 1))
    path = gguf_file(tmp_path / "lying.gguf", [ARCH, lying])
    refused(path, r"corrupt or truncated GGUF file \(metadata tokenizer.ggml.token_type declares "
                  r"1152921504606846976 INT32 items, which need at least 4611686018427387904 "
                  r"bytes, but only \d+ remain\); re-download or re-convert it")


@pytest.mark.parametrize("kvs, tensors, counts, data, message", [
    ([ARCH], [], {"n_kv": 2**62}, b"",
     r"header declares 4611686018427387904 metadata keys and 0 tensors, more than the \d+ "
     r"remaining bytes can hold"),
    ([ARCH], [], {"n_tensors": 2**40}, b"",
     r"header declares 1 metadata keys and 1099511627776 tensors, more than the \d+ remaining "
     r"bytes can hold"),
    ([struct.pack("<Q", 2**50) + b"general"], [], {}, b"",
     r"metadata key #0 needs 1125899906842624 bytes at offset 32, but only \d+ remain"),
    ([ARCH, gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3)
      + gguf_string("a") + struct.pack("<Q", 2**63)], [], {}, b"",
     r"metadata tokenizer.ggml.tokens\[1\] needs 9223372036854775808 bytes at offset \d+, but "
     r"only \d+ remain"),
    ([ARCH, gguf_string("general.alignment") + struct.pack("<II", 4, 48)], [], {}, b"",
     r"metadata general.alignment is 48, not a power of two"),
    ([ARCH, ARCH], [], {}, b"", r"metadata key general.architecture appears twice"),
    ([ARCH], [tensor_info("token_embd.weight", [2**32, 2**32])], {}, b"\0" * 64,
     r"tensor token_embd.weight needs bytes \d+ to \d+, but the file has \d+ bytes "
     r"\(truncated\?\)"),
    ([ARCH], [tensor_info("a", [8]), tensor_info("b", [8], offset=0)], {}, b"\0" * 64,
     r"tensor b's data \(offset 0\) overlaps the tensor before it"),
    ([ARCH], [tensor_info("a", [8], offset=4)], {}, b"\0" * 64,
     r"tensor a's data offset 4 is not a multiple of the alignment 32"),
    ([ARCH], [tensor_info("a", [8], qtype=1000)], {}, b"\0" * 64,
     r"tensor a has unknown GGML type 1000"),
    ([ARCH], [tensor_info("a", [8], qtype=Q.Q4_0)], {}, b"\0" * 64,
     r"tensor a's rows of 8 values are not whole Q4_0 blocks of 32"),
    ([ARCH], [tensor_info("a", [1] * 5)], {}, b"\0" * 64,
     r"tensor a has 5 dimensions \(1 to 4 allowed\)"),
])
def test_gguf_layout_checked_against_the_file(tmp_path, kvs, tensors, counts, data, message):
    path = gguf_file(tmp_path / "bad.gguf", kvs, tensors, data=data, **counts)
    refused(path, rf"corrupt or truncated GGUF file \({message}\); re-download or re-convert it")


def test_cli_lying_gguf_is_one_line_error(tmp_path):
    lying = (gguf_string("tokenizer.ggml.token_type") + struct.pack("<IIQ", 9, 5, 2**60)
             + struct.pack("<4i", 1, 1, 1, 1))
    path = gguf_file(tmp_path / "lying.gguf", [ARCH, lying])
    with deadline(60):
        result = CliRunner().invoke(main, ["generate", "--model", str(path), "--prompt", "hi"])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"Error: {path}: corrupt or truncated GGUF file (metadata "
                                    "tokenizer.ggml.token_type declares 1152921504606846976")


# ---- GGUF metadata against the tensors (the embedded SmolLM2, metadata rewritten in place) ------
@pytest.fixture(scope="module")
def smol_copy(tmp_path_factory) -> Path:
    from tsedge.fetch import default_model_path

    return Path(shutil.copy(default_model_path(), tmp_path_factory.mktemp("smol") / "smol.gguf"))


@pytest.fixture(scope="module")
def smol_values(smol_copy) -> dict[str, np.ndarray]:
    """The scalar metadata values of the copy, as writable views into the file (shared map)."""
    fields = gguf.GGUFReader(smol_copy, "r+").fields
    return {key: f.parts[f.data[0]] for key, f in fields.items() if len(f.types) == 1}


@pytest.fixture
def edit_smol(smol_copy, smol_values):
    """``edit(key, value)`` rewrites a scalar metadata value of the copy; undone after the test."""
    originals: dict[str, object] = {}

    def edit(key: str, value) -> Path:
        originals.setdefault(key, smol_values[key][0].item())
        smol_values[key][0] = value
        return smol_copy

    yield edit
    for key, value in originals.items():
        edit(key, value)


@pytest.mark.parametrize("key, value, message", [
    ("llama.block_count", 29,
     r"metadata llama.block_count is 29, but the tensors have 30 blocks \(blk.0 to blk.29\)"),
    ("llama.block_count", 0,
     r"metadata llama.block_count is 0, but the tensors have 30 blocks \(blk.0 to blk.29\)"),
    ("llama.block_count", 31,
     r"metadata llama.block_count is 31, but the tensors have 30 blocks \(blk.0 to blk.29\)"),
    ("llama.attention.head_count", 0, r"metadata llama.attention.head_count is 0; it must be "
                                      "positive"),
    ("llama.attention.head_count", 6,
     r"metadata llama.attention.head_count_kv is 3, but with head dim 96 \(llama.embedding_length"
     r" / llama.attention.head_count\) that is 288 rows, and blk.0.attn_k.weight has 192"),
    ("llama.attention.head_count", 18,
     r"metadata llama.attention.head_count_kv is 3, but with head dim 32 \(llama.embedding_length"
     r" / llama.attention.head_count\) that is 96 rows, and blk.0.attn_k.weight has 192"),
    ("llama.attention.head_count_kv", 0, r"metadata llama.attention.head_count_kv is 0; it must "
                                         "be positive"),
    ("llama.attention.head_count_kv", 1,
     r"metadata llama.attention.head_count_kv is 1, but with head dim 64 \(llama.embedding_length"
     r" / llama.attention.head_count\) that is 64 rows, and blk.0.attn_k.weight has 192"),
    ("llama.attention.head_count_kv", 4, r"metadata llama.attention.head_count 9 is not a "
                                         "multiple of llama.attention.head_count_kv 4"),
    ("llama.embedding_length", 512,
     r"metadata llama.embedding_length is 512, but token_embd.weight has 576 columns"),
    ("llama.feed_forward_length", 1024,
     r"metadata llama.feed_forward_length is 1024, but blk.0.ffn_gate.weight has 1536 rows"),
    ("llama.vocab_size", 49000,
     r"metadata llama.vocab_size is 49000, but token_embd.weight has 49152 rows"),
    ("llama.rope.dimension_count", 32,
     r"metadata llama.rope.dimension_count is 32, but the head dim is 64 \(tsedge needs them "
     r"equal\)"),
    ("llama.context_length", 0, r"metadata llama.context_length is 0; it must be positive"),
    ("llama.rope.freq_base", float("nan"),
     r"metadata llama.rope.freq_base is nan; it must be a positive number"),
    ("tokenizer.ggml.eos_token_id", 49152,
     r"metadata tokenizer.ggml.eos_token_id is 49152, but tokenizer.ggml.tokens has 49152 tokens"),
])
def test_gguf_metadata_against_tensors(edit_smol, key, value, message):
    refused(edit_smol(key, value), message + re.escape(FIX_META))


def test_edited_copy_restored(smol_copy):
    """The edits above are undone: the copy loads like the original."""
    assert load_source(str(smol_copy)).config.num_layers == 30
