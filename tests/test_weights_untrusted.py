"""tsedge.weights on untrusted files: lying GGUF lengths and metadata, inconsistent safetensors
headers, and every GGML type tsedge accepts against an independent decoding."""

from __future__ import annotations

import contextlib
import dataclasses
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


def refused(model: Path, message: str, origin: Path | None = None) -> None:
    """``load_source(model)`` raises a one-line WeightsError ``{origin or model}: {message}``."""
    with deadline(60), pytest.raises(WeightsError) as info:
        load_source(str(model))
    prefix = re.escape(f"{origin or model}: ")
    assert re.fullmatch(prefix + message, str(info.value)), str(info.value)


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


# ---- safetensors headers against their byte spans ------------------------------------------------
def rewrite_header(shard: Path, edit) -> None:
    """Apply ``edit(header)`` to a safetensors file's JSON header, keeping the data as it is."""
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    shard.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + n:])


def first_tensor(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("edit, message", [
    (lambda h, t: h[t].update(dtype="F16"),
     r"tensor {t} is F16 of shape \[\d+, \d+\] \(\d+ bytes\), but its data_offsets span \d+ bytes"),
    (lambda h, t: h[t].pop("shape"), r"tensor {t} has no 'shape' in the header"),
    (lambda h, t: h[t].pop("dtype"), r"tensor {t} has no 'dtype' in the header"),
    (lambda h, t: h[t].update(dtype="F7"), r"tensor {t} has unknown dtype 'F7'"),
    (lambda h, t: h[t].update(shape=[-1, 2]),
     r"tensor {t} has shape \[-1, 2\], not a list of sizes"),
    (lambda h, t: h[t].update(data_offsets=[8, 4]),
     r"tensor {t} has data_offsets \[8, 4\], not \[begin, end\]"),
    (lambda h, t: h[t].update(data_offsets=[4, 4 + h[t]["data_offsets"][1]]),
     r"tensor {t} starts at byte 4 of the data, expected 0 \(tensors overlap or leave a gap\)"),
    (lambda h, t: h.update({t: [1, 2]}), r"tensor {t}: header entry is not a JSON object"),
])
def test_safetensors_entries_checked(tiny, tmp_path, edit, message):
    folder = Path(shutil.copytree(tiny, tmp_path / "m"))
    shard = sorted(folder.glob("*.safetensors"))[0]
    names: list[str] = []
    rewrite_header(shard, lambda h: (names.append(first_tensor(h)), edit(h, names[0])))
    detail = message.format(t=re.escape(names[0]))
    refused(folder, rf"corrupt safetensors file \({detail}\); re-download or re-save it", shard)


def test_safetensors_header_longer_than_file(tiny, tmp_path):
    folder = Path(shutil.copytree(tiny, tmp_path / "m"))
    shard = sorted(folder.glob("*.safetensors"))[0]
    size = shard.stat().st_size
    shard.write_bytes((2**62).to_bytes(8, "little") + shard.read_bytes()[8:])
    refused(folder, rf"corrupt safetensors file \(header of {2**62} bytes in a {size}-byte file\); "
                    "re-download or re-save it", shard)


def test_safetensors_tensor_in_two_shards(tiny, tmp_path):
    folder = Path(shutil.copytree(tiny, tmp_path / "m"))
    first, second = sorted(folder.glob("*.safetensors"))[:2]
    shutil.copy(first, second)
    names = json.loads(first.read_bytes()[8:8 + int.from_bytes(first.read_bytes()[:8], "little")])
    name = sorted(k for k in names if k != "__metadata__")[0]
    refused(folder, rf"tensor {re.escape(name)} is in both {first.name} and {second.name}; remove "
                    "one copy")


def test_hf_config_with_fewer_layers_than_the_weights(tiny, tmp_path):
    folder = Path(shutil.copytree(tiny, tmp_path / "m"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    refused(folder, r"tensor model.layers.1.\S+ is not part of m \(\d+ such tensors\); the config "
                    "or metadata does not describe these weights")


# ---- the shared cases of issue 7 (CI keeps a copy at ../shared/cases) ----------------------------
@pytest.mark.skipif(not SHARED_CASES.is_dir(), reason="no ../shared/cases")
@pytest.mark.parametrize("case, file, message", [
    ("lying_array_len.gguf", "lying_array_len.gguf",
     r"corrupt or truncated GGUF file \(metadata tokenizer.ggml.token_type declares "
     r"1152921504606846976 INT32 items, which need at least 4611686018427387904 bytes, but only "
     r"16 remain\); re-download or re-convert it"),
    ("st_dtype_mismatch", "st_dtype_mismatch/model.safetensors",
     r"corrupt safetensors file \(tensor model.layers.0.mlp.down_proj.weight is F16 of shape "
     r"\[64, 128\] \(16384 bytes\), but its data_offsets span 32768 bytes\); re-download or "
     "re-save it"),
    ("st_no_shape", "st_no_shape/model.safetensors",
     r"corrupt safetensors file \(tensor model.layers.0.mlp.down_proj.weight has no 'shape' in "
     r"the header\); re-download or re-save it"),
])
def test_shared_cases(case, file, message):
    refused(SHARED_CASES / case, message, SHARED_CASES / file)


# ---- every accepted GGML type against an independent decoding -----------------------------------
HIDDEN, VOCAB = 256, 300  # rows of 256 values: whole blocks of every type
MATRICES = {"token_embd": (VOCAB, HIDDEN), "blk.0.attn_q": (HIDDEN, HIDDEN),
            "blk.0.attn_k": (128, HIDDEN), "blk.0.attn_v": (128, HIDDEN),
            "blk.0.attn_output": (HIDDEN, HIDDEN), "blk.0.ffn_gate": (HIDDEN, HIDDEN),
            "blk.0.ffn_up": (HIDDEN, HIDDEN), "blk.0.ffn_down": (HIDDEN, HIDDEN)}
COMPARED = {"token_embd": "model.embed_tokens.weight",
            "blk.0.attn_v": "model.layers.0.self_attn.v_proj.weight",
            "blk.0.attn_output": "model.layers.0.self_attn.o_proj.weight",
            "blk.0.ffn_down": "model.layers.0.mlp.down_proj.weight"}
TINY_META = {"llama.block_count": 1, "llama.context_length": 256, "llama.embedding_length": HIDDEN,
             "llama.feed_forward_length": HIDDEN, "llama.attention.head_count": 4,
             "llama.attention.head_count_kv": 2, "llama.attention.layer_norm_rms_epsilon": 1e-5,
             "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.eos_token_id": 1}


def tiny_gguf(path: Path, matrices: dict[str, tuple[np.ndarray, Q]], tokens: int = VOCAB) -> Path:
    """A one-block Llama GGUF with the given (raw) matrices and F32 norms."""
    norms = {n: (np.ones(HIDDEN, np.float32), Q.F32)
             for n in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight")}
    meta = {**TINY_META, "tokenizer.ggml.tokens": [f"t{i}" for i in range(tokens)]}
    return write_gguf(path, meta, {**matrices, **norms})


def test_token_list_against_embedding(tmp_path):
    matrices = {f"{n}.weight": (np.zeros(s, np.float32), Q.F32) for n, s in MATRICES.items()}
    path = tiny_gguf(tmp_path / "t.gguf", matrices, tokens=VOCAB - 1)
    refused(path, r"metadata tokenizer.ggml.tokens has 299 tokens, but token_embd.weight has 300 "
                  "rows" + re.escape(FIX_META))


# formats gguf.quants can write: quantize random data, compare with it (atol: × the largest value)
QUANTIZED_ATOL = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1 / 128, Q.Q8_0: 1 / 120, Q.Q5_0: 1 / 15,
                  Q.Q5_1: 1 / 15, Q.Q4_0: 1 / 7, Q.Q4_1: 1 / 7, Q.TQ1_0: 0, Q.TQ2_0: 0,
                  Q.MXFP4: 0}
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                      np.float32)


def exact_values(qtype: Q, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Data the type stores without loss (ternary; FP4 with a block maximum of 6), else normal."""
    if qtype in (Q.TQ1_0, Q.TQ2_0):
        x = rng.integers(-1, 2, shape).astype(np.float32) * 0.5
        x[:, ::256] = 0.5
        return x
    if qtype == Q.MXFP4:
        x = rng.choice(E2M1, shape)
        x[:, ::32] = 6
        return x
    return rng.standard_normal(shape).astype(np.float32)


def f16(block: np.ndarray, at: int) -> np.ndarray:
    return block[:, at:at + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def k_scale_min(scales: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 of ggml-quants.c: 6-bit scale and min of sub-block j."""
    q = scales.astype(np.int32)
    if j < 4:
        return q[:, j] & 63, q[:, j + 4] & 63
    return ((q[:, j + 4] & 0xF) | ((q[:, j - 4] >> 6) << 4),
            (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4))


def decode_q2_k(b: np.ndarray) -> np.ndarray:  # scales[16] qs[64] d dmin
    d, dmin, y = f16(b, 80), f16(b, 82), []
    for n in range(2):
        q = b[:, 16 + 32 * n:48 + 32 * n].astype(np.int32)
        for shift in (0, 2, 4, 6):
            for half in range(2):
                sc = b[:, 8 * n + shift + half].astype(np.int32)
                qv = (q[:, 16 * half:16 * half + 16] >> shift) & 3
                y.append((d * (sc & 0xF))[:, None] * qv - (dmin * (sc >> 4))[:, None])
    return np.concatenate(y, axis=1)


def decode_q3_k(b: np.ndarray) -> np.ndarray:  # hmask[32] qs[64] scales[12] d
    d, hmask, s = f16(b, 108), b[:, :32].astype(np.int32), b[:, 96:108].astype(np.int32)
    low = np.concatenate([s[:, :8] & 0xF, s[:, :8] >> 4], axis=1)
    high = np.concatenate([(s[:, 8:12] >> k) & 3 for k in (0, 2, 4, 6)], axis=1)
    scales, y, m = (low | (high << 4)) - 32, [], 0
    for n in range(2):
        q = b[:, 32 + 32 * n:64 + 32 * n].astype(np.int32)
        for shift in (0, 2, 4, 6):
            for half in range(2):
                sl = slice(16 * half, 16 * half + 16)
                qv = ((q[:, sl] >> shift) & 3) - np.where(hmask[:, sl] & (1 << m), 0, 4)
                y.append((d * scales[:, 8 * n + shift + half])[:, None] * qv)
            m += 1
    return np.concatenate(y, axis=1)


def decode_q45_k(b: np.ndarray, five: bool) -> np.ndarray:  # d dmin scales[12] (qh[32]) qs[128]
    d, dmin, y = f16(b, 0), f16(b, 2), []
    qs = b[:, 48 if five else 16:].astype(np.int32)
    qh = b[:, 16:48].astype(np.int32)
    for j in range(4):
        for half in range(2):
            sc, mn = k_scale_min(b[:, 4:16], 2 * j + half)
            q = (qs[:, 32 * j:32 * j + 32] >> (4 * half)) & 0xF
            if five:
                q = q + np.where(qh & (1 << (2 * j + half)), 16, 0)
            y.append((d * sc)[:, None] * q - (dmin * mn)[:, None])
    return np.concatenate(y, axis=1)


def decode_q6_k(b: np.ndarray) -> np.ndarray:  # ql[128] qh[64] scales[16] (int8) d
    d, sc = f16(b, 208), b[:, 192:208].view(np.int8).astype(np.float32)
    y = np.zeros((len(b), 256), np.float32)
    for n in range(2):
        ql = b[:, 64 * n:64 * n + 64].astype(np.int32)
        qh = b[:, 128 + 32 * n:160 + 32 * n].astype(np.int32)
        for part, (lo, shift) in enumerate(((0, 0), (32, 0), (0, 4), (32, 4))):
            q = ((ql[:, lo:lo + 32] >> shift) & 0xF) | (((qh >> (2 * part)) & 3) << 4)
            for half in range(2):
                col = 128 * n + 32 * part + 16 * half
                y[:, col:col + 16] = ((d * sc[:, 8 * n + 2 * part + half])[:, None]
                                      * (q[:, 16 * half:16 * half + 16] - 32))
    return y


def decode_iq4(qs: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """32 values per 16 bytes: low nibbles then high nibbles, through the IQ4 value table."""
    q = qs.astype(np.int32)
    return scale[:, None] * np.concatenate([IQ4_VALUES[q & 0xF], IQ4_VALUES[q >> 4]], axis=1)


def decode_iq4_xs(b: np.ndarray) -> np.ndarray:  # d scales_h (u16) scales_l[4] qs[128]
    d, high = f16(b, 0), b[:, 2:4].copy().view(np.uint16)[:, 0].astype(np.int32)
    y = []
    for ib in range(8):
        low = (b[:, 4 + ib // 2].astype(np.int32) >> (4 * (ib % 2))) & 0xF
        scale = d * ((low | (((high >> (2 * ib)) & 3) << 4)) - 32)
        y.append(decode_iq4(b[:, 8 + 16 * ib:24 + 16 * ib], scale))
    return np.concatenate(y, axis=1)


# formats gguf.quants reads but cannot write: random blocks, their float16 scales at these offsets
DECODERS = {Q.Q2_K: (decode_q2_k, (80, 82)), Q.Q3_K: (decode_q3_k, (108,)),
            Q.Q4_K: (lambda b: decode_q45_k(b, False), (0, 2)),
            Q.Q5_K: (lambda b: decode_q45_k(b, True), (0, 2)), Q.Q6_K: (decode_q6_k, (208,)),
            Q.IQ4_NL: (lambda b: decode_iq4(b[:, 2:], f16(b, 0)), (0,)),
            Q.IQ4_XS: (decode_iq4_xs, (0,))}
# codebook formats (their grids are hundreds of table entries): the reference is gguf's own decoder,
# so these check the loader's plumbing (block sizes, row layout, names), not the decoding math
DECODERS.update({q: (lambda b, q=q: gguf.quants.dequantize(b, q), scales) for q, scales in (
    (Q.IQ1_S, (0,)), (Q.IQ1_M, ()), (Q.IQ2_XXS, (0,)), (Q.IQ2_XS, (0,)), (Q.IQ2_S, (0,)),
    (Q.IQ3_XXS, (0,)), (Q.IQ3_S, (0,)), (Q.NVFP4, ()))})


def random_blocks(qtype: Q, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random blocks of ``qtype`` for a float matrix of ``shape``, with finite float16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // block, size), dtype=np.uint8)
    for at in DECODERS[qtype][1]:
        blocks[:, at:at + 2] = rng.uniform(-0.1, 0.1, (len(blocks), 1)).astype(np.float16).view(
            np.uint8)
    if qtype == Q.IQ1_M:  # its float16 scale is spread over the top nibbles; these bits keep it finite
        blocks[:, -1] &= 0x3F
    return blocks.reshape(shape[0], -1)


def test_accepted_types_are_all_tested():
    assert set(GGUF_TYPES) == {q.name for q in (*QUANTIZED_ATOL, *DECODERS)}


@pytest.mark.parametrize("qtype", [*QUANTIZED_ATOL, *DECODERS], ids=lambda q: q.name)
def test_gguf_type_against_reference(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    matrices, expected = {}, {}
    for name, shape in MATRICES.items():
        if qtype in DECODERS:
            raw = random_blocks(qtype, rng, shape)
            decode = DECODERS[qtype][0]
            block = gguf.GGML_QUANT_SIZES[qtype][1]
            expected[name] = decode(raw.reshape(-1, block)).reshape(shape)
        else:
            expected[name] = exact_values(qtype, rng, shape)
            raw = gguf.quants.quantize(expected[name], qtype)
        matrices[f"{name}.weight"] = (raw, qtype)
    tensors = dict(load_source(str(tiny_gguf(tmp_path / "q.gguf", matrices))).tensors(blocks=False))
    for name, hf in COMPARED.items():
        atol = QUANTIZED_ATOL.get(qtype, 0) * np.abs(expected[name]).max()
        np.testing.assert_allclose(tensors[hf], expected[name], rtol=1e-6, atol=atol, err_msg=hf)


def test_gguf_rope_scaling_type_refused(tmp_path):
    matrices = {f"{n}.weight": (np.ones(s, np.float32), Q.F32) for n, s in MATRICES.items()}
    norms = {n: (np.ones(HIDDEN, np.float32), Q.F32)
             for n in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight")}
    meta = {**TINY_META, "tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)], "llama.rope.scaling.type": "yarn"}
    path = write_gguf(tmp_path / "yarn.gguf", meta, {**matrices, **norms})
    refused(path, r"metadata llama.rope.scaling.type is 'yarn', which tsedge does not implement "
                  r"\(Llama 3.1's rope_freqs scaling is supported\); use another model")


def test_hf_folder_keeps_its_own_rope_scaling(tmp_path):
    """A folder with a preset's shapes takes the preset's name, never its RoPE scaling."""
    from tsedge.models.config import PRESETS
    from tsedge.weights import _match_preset

    plain = dataclasses.replace(PRESETS["llama3.1-8b"], name="mine", rope_scaling=None)
    assert _match_preset(plain).rope_scaling is None
    assert _match_preset(plain, adopt_rope_scaling=True) == PRESETS["llama3.1-8b"]
