"""Group quantization of linear weights: the schemes, the NumPy reference quantizer and layouts.

Plain NumPy (no TVM): the compiler, the runtime and the tests share it.

``q4f16`` follows MLC-LLM's ``q4f16_1`` technique: symmetric 4-bit, one scale per group of 32
weights along the reduction (input) dimension, ``scale = max|w| / 7``, ``q = round(w / scale)``
clipped to [-7, 7] and stored as ``q + 7`` (0..14) in nibbles, 8 to a uint32 (weight ``k`` of a
word at bits ``4 (k % 8)``). ``q8f16``: the same with 8 bits, ``scale = max|w| / 127``, ``q`` stored
as int8. Scales are rounded to float16 first and the weights quantized with the rounded scale, so
a scale is exact in float16 files and in a float32 library alike (the llvm float32 build keeps its
scales in float32: the same values, no float16 arithmetic on the CPU).

Canonical (file) layout of a weight ``w`` [out, in]: ``qweight`` [out, in / 8] uint32 (q4) or
[out, in] int8 (q8), ``scale`` [out, in / 32] float16. A library stores it as is, or transposed
(``in_out``: [in / 8, out], [in, out] and [in / 32, out]) for CPU schedules that vectorise over the
output dimension. Fused projections (q|k|v, gate|up) concatenate along ``out``, which needs no
requantization since groups run along ``in``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

GROUP = 32


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """A weight quantization: ``bits`` per weight, one scale per ``group`` inputs."""

    name: str
    bits: int
    group: int = GROUP

    @property
    def max_int(self) -> int:
        """Largest stored magnitude: 7 (4 bits), 127 (8 bits)."""
        return (1 << (self.bits - 1)) - 1

    @property
    def per_word(self) -> int:
        """Weights per stored element: 8 nibbles in a uint32, or 1 int8."""
        return 32 // self.bits if self.bits == 4 else 1

    @property
    def storage_dtype(self) -> str:
        return "uint32" if self.bits == 4 else "int8"


SCHEMES: dict[str, QuantScheme | None] = {"q0": None, "q8f16": QuantScheme("q8f16", 8),
                                          "q4f16": QuantScheme("q4f16", 4)}


class QuantizationError(ValueError):
    """A weight or file cannot take (or does not carry) the requested quantization."""


def scheme(name: str) -> QuantScheme | None:
    """The scheme called ``name`` (None for ``q0``, float weights); ValueError for an unknown one."""
    if name not in SCHEMES:
        raise QuantizationError(f"unknown quantization {name!r}: use one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def is_quantized_weight(name: str) -> bool:
    """Whether a library or Hugging Face tensor ``name`` is quantized under a q4f16/q8f16 scheme:
    the linear weights (attention and MLP projections, lm_head) and the embedding table (groups
    along hidden, like the lm_head it may be tied to); norms and biases stay float."""
    return name.endswith("_proj.weight") or name in ("lm_head.weight", "model.embed_tokens.weight")


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
    [out, in / group] float16; ``shape`` is the float weight's [out, in]."""

    scheme: QuantScheme
    qweight: np.ndarray
    scale: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.scale.shape[1] * self.scheme.group


def quantize(w: np.ndarray, qs: QuantScheme, name: str = "weight") -> QuantizedTensor:
    """Quantize ``w`` [out, in] (any float dtype; computed in float32) group-wise along ``in``.

    Raises QuantizationError when ``in`` is not a multiple of the group size or ``w`` is not 2-D
    or not finite. All-zero groups get scale 0 and codes 0.
    """
    if w.ndim != 2:
        raise QuantizationError(f"{name}: shape {list(w.shape)} is not a 2-D weight")
    out, inp = w.shape
    check_quantizable(qs, name, inp)
    groups = np.asarray(w, dtype=np.float32).reshape(out, inp // qs.group, qs.group)
    if not np.isfinite(groups).all():
        raise QuantizationError(f"{name}: weights contain NaN or infinity; they cannot be quantized")
    scale = (np.abs(groups).max(axis=2) / np.float32(qs.max_int)).astype(np.float16)
    s32 = scale.astype(np.float32)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(s32 > 0, np.rint(groups / s32), 0)
    codes = np.clip(codes, -qs.max_int, qs.max_int).astype(np.int32).reshape(out, inp)
    return QuantizedTensor(qs, pack(codes, qs), scale)


def pack(codes: np.ndarray, qs: QuantScheme) -> np.ndarray:
    """Signed codes [out, in] in [-max_int, max_int] -> stored elements [out, in / per_word]."""
    if qs.bits == 8:
        return codes.astype(np.int8)
    nibbles = (codes + qs.max_int).astype(np.uint32).reshape(codes.shape[0], -1, qs.per_word)
    shifts = (4 * np.arange(qs.per_word, dtype=np.uint32))
    return np.bitwise_or.reduce(nibbles << shifts, axis=2).astype(np.uint32)


def unpack(qweight: np.ndarray, qs: QuantScheme) -> np.ndarray:
    """Stored elements [out, in / per_word] -> signed codes [out, in] (int32)."""
    if qs.bits == 8:
        return qweight.astype(np.int32)
    shifts = (4 * np.arange(qs.per_word, dtype=np.uint32))
    nibbles = (qweight[:, :, None] >> shifts) & np.uint32(15)
    return nibbles.reshape(qweight.shape[0], -1).astype(np.int32) - qs.max_int


def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """The float32 weight [out, in] a quantized tensor stands for."""
    codes = unpack(qt.qweight, qt.scheme).astype(np.float32)
    scale = np.repeat(qt.scale.astype(np.float32), qt.scheme.group, axis=1)
    return codes * scale


def concatenate(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Fused projections: quantized weights stacked along ``out`` (same scheme and ``in``)."""
    qs = parts[0].scheme
    return QuantizedTensor(qs, np.concatenate([p.qweight for p in parts]),
                           np.concatenate([p.scale for p in parts]))


def library_arrays(qt: QuantizedTensor, transposed: bool, scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(qweight, scale) as a library stores them: canonical, or transposed for ``in_out``
    libraries; the scale in the library's float dtype (float16 values, exact in float32)."""
    q, s = qt.qweight, qt.scale.astype(scale_dtype)
    if transposed:
        q, s = q.T, s.T
    return np.ascontiguousarray(q), np.ascontiguousarray(s)


def check_quantized(qt: QuantizedTensor, name: str, shape: tuple[int, int]) -> None:
    """Check a quantized tensor read from a file against the float shape [out, in] it must have:
    storage dtypes, packed and scale shapes, group counts. Raises QuantizationError in one line."""
    qs = qt.scheme
    out, inp = shape
    check_quantizable(qs, name, inp)
    want = {"qweight": ((out, inp // qs.per_word), np.dtype(qs.storage_dtype)),
            "scale": ((out, inp // qs.group), np.dtype(np.float16))}
    for part, (want_shape, want_dtype) in want.items():
        array = getattr(qt, part)
        if array.dtype != want_dtype or tuple(array.shape) != want_shape:
            raise QuantizationError(
                f"{name}: {qs.name} {part} is {array.dtype} {list(array.shape)}, expected {want_dtype} "
                f"{list(want_shape)} for a [{out}, {inp}] weight; re-convert the weights folder")
    if not np.isfinite(qt.scale).all():
        raise QuantizationError(f"{name}: {qs.name} scales contain NaN or infinity; re-convert the weights folder")
    if np.abs(unpack(qt.qweight, qs)).max(initial=0) > qs.max_int:
        raise QuantizationError(f"{name}: {qs.name} codes outside [-{qs.max_int}, {qs.max_int}]; "
                                "re-convert the weights folder")
