"""Group quantization of linear weights: the schemes, the NumPy reference quantizer and layouts.

Plain NumPy (no TVM): the compiler, the runtime and the tests share it.

A scheme stores each weight as a small integer code with one float16 ``scale`` per group of 32
weights along the reduction (input) dimension, and the weight is ``code * scale`` (+ ``min``):

- ``q4f16`` (MLC-LLM's ``q4f16_1`` technique): symmetric 4-bit, ``scale = max|w| / 7``, ``code =
  round(w / scale)`` in [-7, 7];
- ``q8f16``: the same with 8 bits (``max|w| / 127``, codes in [-127, 127]); it is also GGML's
  ``Q8_0`` block layout (a float16 scale and 32 int8 codes), so a GGUF's Q8_0 tensors load as it;
- ``q4_0`` and ``q4_1``: GGML's ``Q4_0`` (codes in [-8, 7]) and ``Q4_1`` (codes in [0, 15] and a
  float16 ``min`` per group: ``w = code * scale + min``) blocks, kept as a GGUF stores them
  (``from_ggml_blocks``; float weights are quantized by the ``gguf`` package's reference
  quantizer, bit for bit ggml's ``quantize_row_q4_*_ref``).

Scales are rounded to float16 first and (q4f16/q8f16) the weights quantized with the rounded
scale, so a scale is exact in float16 files and in a float32 library alike (the llvm float32
build keeps its scales in float32: the same values, no float16 arithmetic on the CPU).

Canonical (file) layout of a weight ``w`` [out, in]: ``qweight`` [out, in / 8] uint32 (4-bit: the
nibble ``code + offset`` of weight ``k`` at bits ``4 (k % 8)`` of word ``k / 8``; ``offset`` 7, 8
or 0) or [out, in] int8 (8-bit), ``scale`` (and ``min``) [out, in / 32] float16. A library stores
it as is, or transposed (``in_out``: [in / 8, out], [in, out] and [in / 32, out]) for CPU schedules
that vectorise over the output dimension. Fused projections (q|k|v, gate|up) concatenate along
``out``, which needs no requantization since groups run along ``in``.

A library's quantization names one scheme for all its quantized weights (``q4f16``), or one per
role (``linear=q4_1,embedding=q8f16,lm_head=q8f16``, what ``--quantization gguf`` resolves a GGUF
file's tensor types to); ``roles`` reads both.
"""

from __future__ import annotations

import dataclasses

import numpy as np

GROUP = 32
PARTS = ("qweight", "scale", "min")  # the arrays of a quantized weight (``min``: schemes with has_min)
# scales and mins in every library, as files store them (a CPU library computes in float32 from
# them: float32 copies were 15 MB more a SmolLM2 decode step, which is bound by memory bandwidth)
SCALE_DTYPE = "float16"
ROLES = ("linear", "embedding", "lm_head")  # quantized weights: *_proj linears, embedding table, lm_head


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """A weight quantization: ``bits`` per weight, codes in ``codes`` (lo, hi), one float16 scale
    (and with ``has_min`` one float16 min) per ``group`` inputs."""

    name: str
    bits: int
    codes: tuple[int, int]
    has_min: bool = False
    group: int = GROUP

    @property
    def max_int(self) -> int:
        """Largest code: 7 (q4f16, q4_0), 15 (q4_1), 127 (q8f16)."""
        return self.codes[1]

    @property
    def offset(self) -> int:
        """What a 4-bit nibble stores beyond its code (7 q4f16, 8 q4_0, 0 q4_1; 8-bit: 0)."""
        return -self.codes[0] if self.bits == 4 else 0

    @property
    def per_word(self) -> int:
        """Weights per stored element: 8 nibbles in a uint32, or 1 int8."""
        return 32 // self.bits if self.bits == 4 else 1

    @property
    def storage_dtype(self) -> str:
        return "uint32" if self.bits == 4 else "int8"

    def part_dtype(self, part: str) -> str:
        """The dtype a library stores ``part`` in: the codes' storage dtype, else ``SCALE_DTYPE``."""
        return self.storage_dtype if part == "qweight" else SCALE_DTYPE

    @property
    def parts(self) -> tuple[str, ...]:
        """The arrays a weight of this scheme is stored as."""
        return PARTS if self.has_min else PARTS[:2]


SCHEMES: dict[str, QuantScheme | None] = {
    "q0": None, "q8f16": QuantScheme("q8f16", 8, (-127, 127)), "q4f16": QuantScheme("q4f16", 4, (-7, 7)),
    "q4_0": QuantScheme("q4_0", 4, (-8, 7)), "q4_1": QuantScheme("q4_1", 4, (0, 15), has_min=True)}
# GGML block types kept as stored (``from_ggml_blocks``) -> scheme; other types load as float
GGML_SCHEMES = {"Q8_0": "q8f16", "Q4_0": "q4_0", "Q4_1": "q4_1"}
_GGML_QUANTIZED = {"q4_0": "Q4_0", "q4_1": "Q4_1"}  # schemes quantized by the gguf package


class QuantizationError(ValueError):
    """A weight or file cannot take (or does not carry) the requested quantization."""


def scheme(name: str) -> QuantScheme | None:
    """The scheme called ``name`` (None for ``q0``, float weights); ValueError for an unknown one."""
    if name not in SCHEMES:
        raise QuantizationError(f"unknown quantization {name!r}: use one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def roles(quantization: str) -> dict[str, QuantScheme | None]:
    """The scheme of each role (``ROLES``) of a quantization: one scheme name for all, or
    ``role=scheme`` pairs joined by commas (every role named once). Raises QuantizationError for
    an unknown scheme or role, or a role missing."""
    if "=" not in quantization:
        return dict.fromkeys(ROLES, scheme(quantization))
    pairs = [item.partition("=") for item in quantization.split(",")]
    named = {role: scheme(name) for role, _, name in pairs}
    if sorted(named) != sorted(ROLES) or len(pairs) != len(ROLES):
        raise QuantizationError(f"quantization {quantization!r} must name each of {', '.join(ROLES)} once "
                                "(role=scheme, comma-separated)")
    return named


def role_spec(by_role: dict[str, str]) -> str:
    """The quantization string of a scheme name per role (one name when all agree)."""
    names = [by_role[r] for r in ROLES]
    return names[0] if len(set(names)) == 1 else ",".join(f"{r}={n}" for r, n in zip(ROLES, names))


def short_name(quantization: str) -> str:
    """A quantization for file names and tables: the roles' distinct schemes joined by ``+`` in
    role order (``linear=q4_1,embedding=q8f16,lm_head=q8f16`` -> ``q4_1+q8f16``)."""
    return "+".join(dict.fromkeys(q.name if q else "q0" for q in roles(quantization).values()))


def role_of(name: str) -> str | None:
    """The role of a library or Hugging Face tensor ``name`` if it may be quantized: the linear
    weights (attention and MLP projections), the embedding table (groups along hidden) and the
    lm_head; None for norms and biases, which stay float."""
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    return "linear" if name.endswith("_proj.weight") else None


def scheme_of(quantization: str, name: str) -> QuantScheme | None:
    """The scheme tensor ``name`` is stored in under ``quantization`` (None: float)."""
    role = role_of(name)
    return None if role is None else roles(quantization)[role]


def check_quantizable(qs: QuantScheme, name: str, in_features: int) -> None:
    """Raise QuantizationError unless ``in_features`` (the reduction size) is a whole number of
    groups: ragged group tails are refused rather than padded."""
    if in_features % qs.group:
        raise QuantizationError(
            f"{name}: input size {in_features} is not a multiple of {qs.group}, the {qs.name} group "
            "size (ragged groups are not supported); use --quantization q0 for this model")


@dataclasses.dataclass
class QuantizedTensor:
    """A quantized weight in the canonical layout: ``qweight`` [out, in / per_word], ``scale``
    (and for ``has_min`` schemes ``min``) [out, in / group] float16; ``shape`` is the float
    weight's [out, in]."""

    scheme: QuantScheme
    qweight: np.ndarray
    scale: np.ndarray
    min: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.scale.shape[1] * self.scheme.group

    def arrays(self) -> dict[str, np.ndarray]:
        """The stored arrays by part name (``scheme.parts``)."""
        return {part: getattr(self, part) for part in self.scheme.parts}

    def map(self, fn) -> "QuantizedTensor":
        """The same scheme with ``fn`` applied to each stored array (row cuts and permutations)."""
        return QuantizedTensor(self.scheme, **{part: fn(a) for part, a in self.arrays().items()})


def quantize(w: np.ndarray, qs: QuantScheme, name: str = "weight") -> QuantizedTensor:
    """Quantize ``w`` [out, in] (any float dtype; computed in float32) group-wise along ``in``:
    q4f16/q8f16 as the module docstring says, q4_0/q4_1 by the ``gguf`` package's reference
    quantizer (ggml's rules: ``scale = max / -8`` of the signed largest weight, codes
    ``trunc(w / scale + 8.5) - 8``; ``scale = (max - min) / 15``, codes ``trunc((w - min) / scale + 0.5)``).

    Raises QuantizationError when ``in`` is not a multiple of the group size or ``w`` is not 2-D
    or not finite. All-zero groups get scale 0 (and min 0) and weights 0.
    """
    if w.ndim != 2:
        raise QuantizationError(f"{name}: shape {list(w.shape)} is not a 2-D weight")
    out, inp = w.shape
    check_quantizable(qs, name, inp)
    groups = np.asarray(w, dtype=np.float32).reshape(out, inp // qs.group, qs.group)
    if not np.isfinite(groups).all():
        raise QuantizationError(f"{name}: weights contain NaN or infinity; they cannot be quantized")
    if qs.name in _GGML_QUANTIZED:
        import gguf  # here: the CLI imports this module at start-up, and gguf takes ~70 ms to import

        ggml = _GGML_QUANTIZED[qs.name]
        blocks = gguf.quants.quantize(groups.reshape(out, inp), gguf.GGMLQuantizationType[ggml])
        return from_ggml_blocks(blocks, ggml, (out, inp), name)
    scale = (np.abs(groups).max(axis=2) / np.float32(qs.max_int)).astype(np.float16)
    s32 = scale.astype(np.float32)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(s32 > 0, np.rint(groups / s32), 0)
    codes = np.clip(codes, -qs.max_int, qs.max_int).astype(np.int32).reshape(out, inp)
    return QuantizedTensor(qs, pack(codes, qs), scale)


def from_ggml_blocks(data: np.ndarray, ggml_type: str, shape: tuple[int, int], name: str = "weight") -> QuantizedTensor:
    """A GGUF tensor's raw blocks (uint8, ``shape[0]`` rows of ``shape[1] / 32`` blocks) of GGML type
    ``ggml_type`` (a ``GGML_SCHEMES`` key) in the canonical layout, losslessly: Q8_0 blocks are a
    float16 scale and 32 int8 codes; Q4_0 a float16 scale and 16 bytes whose low nibbles are
    weights 0..15 and high nibbles 16..31 (stored as code + 8); Q4_1 a float16 scale, a float16
    min and the nibbles (stored as the code). Raises QuantizationError when the byte count is not
    the shape's (a file's lengths are untrusted)."""
    qs = SCHEMES[GGML_SCHEMES[ggml_type]]
    out, inp = shape
    check_quantizable(qs, name, inp)
    head = 4 if qs.has_min else 2  # float16 scale (and min) before a block's codes
    block = head + (qs.group if qs.bits == 8 else qs.group // 2)
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    if raw.size != out * inp // qs.group * block:
        raise QuantizationError(f"{name}: {ggml_type} data is {raw.size} bytes, expected {out * inp // qs.group * block} "
                                f"for a [{out}, {inp}] weight; the file is corrupt: re-download or re-convert it")
    blocks = raw.reshape(out, inp // qs.group, block)
    halves = blocks[:, :, :head].copy().view(np.float16)  # [out, groups, 1 or 2]
    codes = blocks[:, :, head:]
    if qs.bits == 8:
        qweight = codes.copy().view(np.int8).reshape(out, inp)
    else:  # nibbles in weight order, 8 to a uint32 word
        nibbles = np.concatenate([codes & np.uint8(15), codes >> np.uint8(4)], axis=2).reshape(out, inp)
        qweight = _pack_nibbles(nibbles.astype(np.uint32))
    return QuantizedTensor(qs, qweight, np.ascontiguousarray(halves[:, :, 0]),
                           np.ascontiguousarray(halves[:, :, 1]) if qs.has_min else None)


def _pack_nibbles(nibbles: np.ndarray) -> np.ndarray:
    """uint32 nibbles [out, in] -> words [out, in / 8], weight ``k`` at bits ``4 (k % 8)``."""
    shifts = 4 * np.arange(8, dtype=np.uint32)
    return np.bitwise_or.reduce(nibbles.reshape(nibbles.shape[0], -1, 8) << shifts, axis=2).astype(np.uint32)


def pack(codes: np.ndarray, qs: QuantScheme) -> np.ndarray:
    """Codes [out, in] within ``qs.codes`` -> stored elements [out, in / per_word]."""
    if qs.bits == 8:
        return codes.astype(np.int8)
    return _pack_nibbles((codes + qs.offset).astype(np.uint32))


def unpack(qweight: np.ndarray, qs: QuantScheme) -> np.ndarray:
    """Stored elements [out, in / per_word] -> codes [out, in] (int32)."""
    if qs.bits == 8:
        return qweight.astype(np.int32)
    shifts = (4 * np.arange(qs.per_word, dtype=np.uint32))
    nibbles = (qweight[:, :, None] >> shifts) & np.uint32(15)
    return nibbles.reshape(qweight.shape[0], -1).astype(np.int32) - qs.offset


def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """The float32 weight [out, in] a quantized tensor stands for (``code * scale (+ min)`` in
    float32, as ggml's dequantization computes it)."""
    codes = unpack(qt.qweight, qt.scheme).astype(np.float32)
    w = codes * np.repeat(qt.scale.astype(np.float32), qt.scheme.group, axis=1)
    return w + np.repeat(qt.min.astype(np.float32), qt.scheme.group, axis=1) if qt.scheme.has_min else w


def concatenate(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Fused projections: quantized weights stacked along ``out`` (same scheme and ``in``)."""
    return QuantizedTensor(parts[0].scheme, **{name: np.concatenate([p.arrays()[name] for p in parts])
                                               for name in parts[0].scheme.parts})


def library_arrays(qt: QuantizedTensor, transposed: bool) -> dict[str, np.ndarray]:
    """The stored arrays by part name as a library stores them: canonical, or transposed for
    ``in_out`` libraries; scale and min float16 (``SCALE_DTYPE``) in every library."""
    arrays = {part: a if part == "qweight" else a.astype(SCALE_DTYPE) for part, a in qt.arrays().items()}
    return {part: np.ascontiguousarray(a.T if transposed else a) for part, a in arrays.items()}


def check_quantized(qt: QuantizedTensor, name: str, shape: tuple[int, int]) -> None:
    """Check a quantized tensor read from a file against the float shape [out, in] it must have:
    storage dtypes, packed and scale shapes, group counts, the code range. Raises
    QuantizationError in one line."""
    qs = qt.scheme
    out, inp = shape
    check_quantizable(qs, name, inp)
    want = {"qweight": ((out, inp // qs.per_word), np.dtype(qs.storage_dtype))}
    want |= {part: ((out, inp // qs.group), np.dtype(np.float16)) for part in qs.parts[1:]}
    for part, (want_shape, want_dtype) in want.items():
        array = getattr(qt, part)
        if array is None or array.dtype != want_dtype or tuple(array.shape) != want_shape:
            got = "missing" if array is None else f"{array.dtype} {list(array.shape)}"
            raise QuantizationError(
                f"{name}: {qs.name} {part} is {got}, expected {want_dtype} "
                f"{list(want_shape)} for a [{out}, {inp}] weight; re-convert the weights folder")
        if part != "qweight" and not np.isfinite(array).all():
            raise QuantizationError(f"{name}: {qs.name} {part}s contain NaN or infinity; re-convert the weights folder")
    codes = unpack(qt.qweight, qs)
    lo, hi = qs.codes
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise QuantizationError(f"{name}: {qs.name} codes outside [{lo}, {hi}]; re-convert the weights folder")
