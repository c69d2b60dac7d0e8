"""Linear layers: over float weights, or over group-quantized weights (``models/quantization.py``)
dequantized in the kernel that multiplies.

Where ``tir_kernels.matmul`` supports the shape on ``target`` (None: never), a prefill chunk (a
symbolic row count) runs its tensor-core kernel; where ``tir_kernels.gemv`` does (and the layer
was made with ``decode_gemv``), one row (decode) runs its GEMV with the residual add, SwiGLU or
the preceding RMSNorm fused; elsewhere one row stays a matmul the pipeline schedules as a GEMV.

The dequantization is a ``te.compute`` whose output feeds ``matmul``; Relax's FuseOps/FuseTIR make
the pair one PrimFunc (as MLC-LLM's ``fused_dequantize_*_matmul``), which the CPU schedule and
dlight's GEMV rule then schedule with the dequantization inlined into the reduction: the float
weight never exists in memory. On CUDA a prefill chunk dequantizes the weight to float16 first
(a kernel of its own) and runs ``tir_kernels.matmul``'s tensor-core GEMM on it.
"""

from __future__ import annotations

from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tsedge.tir_kernels import gemv, matmul

from .quantization import QuantScheme


def param_shapes(qs: QuantScheme, in_features: int, out_features: int,
                 in_out: bool) -> tuple[list[int], list[int]]:
    """Library shapes of (qweight, scale) — ``min`` is shaped as ``scale``: canonical [out,
    in/per_word], [out, in/group], or transposed with ``in_out``."""
    q = [out_features, in_features // qs.per_word]
    s = [out_features, in_features // qs.group]
    return (q[::-1], s[::-1]) if in_out else (q, s)


def dequantize_expr(qs: QuantScheme, q: te.Tensor, s: te.Tensor, in_out: bool, dtype: str,
                    m: te.Tensor | None = None) -> te.Tensor:
    """The float weight ([in, out] with ``in_out``, else [out, in]) as a TE compute in ``dtype``
    (the scale and min are float16, converted): ``code * scale`` (``+ min`` for q4_1, ``m``) with
    the code unpacked from its nibble (4-bit, less the scheme's offset) or int8 (8-bit)."""

    def weight(k, j):  # k: reduction (input) index, j: output index
        code = q[k // qs.per_word, j] if in_out else q[j, k // qs.per_word]
        group = (k // qs.group, j) if in_out else (j, k // qs.group)
        if qs.bits == 4:
            shift = (k % qs.per_word).astype("uint32") * tirx.const(4, "uint32")
            # via int32: a signed int-to-float conversion is one instruction on x86 (unsigned is not)
            nibble = ((code >> shift) & tirx.const(15, "uint32")).astype("int32")
            value = nibble.astype(dtype) - tirx.const(qs.offset, dtype) if qs.offset else nibble.astype(dtype)
        else:
            value = code.astype(dtype)
        scaled = value * s[group].astype(dtype)
        return scaled + m[group].astype(dtype) if qs.has_min else scaled

    inp = (q.shape[0] if in_out else q.shape[1]) * qs.per_word
    out = q.shape[1] if in_out else q.shape[0]
    if in_out:
        return te.compute((inp, out), lambda k, j: weight(k, j), name="dequantize")
    return te.compute((out, inp), lambda j, k: weight(k, j), name="dequantize")


class _Packed:
    """The stored arrays of a quantized weight as parameters: ``qweight``, ``scale`` and, for
    schemes with a min (q4_1), ``min``."""

    def _packed_params(self, qs: QuantScheme, q_shape: list[int], s_shape: list[int], dtype: str) -> None:
        """``dtype``: the dequantized weight's."""
        self.qs, self.dtype = qs, dtype
        self.qweight = nn.Parameter(q_shape, qs.part_dtype("qweight"))
        self.scale = nn.Parameter(s_shape, qs.part_dtype("scale"))
        self.min = nn.Parameter(s_shape, qs.part_dtype("min")) if qs.has_min else None

    def _packed(self) -> list[nn.Tensor]:
        return [getattr(self, part) for part in self.qs.parts]

    def _dequantized(self, tensors: list[nn.Tensor], in_out: bool, name: str) -> nn.Tensor:
        return op.tensor_expr_op(lambda q, s, *m: dequantize_expr(self.qs, q, s, in_out, self.dtype, *m), name,
                                 args=tensors)


class Linear(nn.Module):
    """``y = x W^T (+ b)``; the weight is stored [out, in] or, with ``in_out``, [in, out].
    ``decode_gemv=False``: one row stays a matmul (dlight's GEMV) even where ``tir_kernels.gemv``
    would run."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str, in_out: bool, target,
                 decode_gemv: bool = True):
        shape = [in_features, out_features] if in_out else [out_features, in_features]
        self.weight = nn.Parameter(shape, dtype)
        self._setup(in_features, out_features, bias, dtype, in_out, target, decode_gemv)

    def _setup(self, in_features: int, out_features: int, bias: bool, dtype: str, in_out: bool, target,
               decode_gemv: bool, scheme: QuantScheme | None = None) -> None:
        self.bias = nn.Parameter([out_features], dtype) if bias else None
        self.in_out, self.shape = in_out, (out_features, in_features)
        self.prefill_kernel = (matmul.make_prefill_matmul(out_features, in_features, dtype, target)
                               if target is not None and not in_out
                               and matmul.supported(out_features, in_features, dtype, target) else None)
        # how the decode GEMV reads the weights: float16, or the scheme's codes (bits, offset, min)
        self.gemv_format = {} if scheme is None else {"bits": scheme.bits, "offset": scheme.offset,
                                                      "has_min": scheme.has_min}
        self.gemv_target = (target if decode_gemv and target is not None and not in_out and not bias
                            and gemv.supported(out_features, in_features, dtype, target, **self.gemv_format) else None)

    def _weights(self) -> list[nn.Tensor]:
        """The parameters the decode GEMV reads."""
        return [self.weight]

    def _weight(self) -> nn.Tensor:
        return self.weight

    def forward(self, x: nn.Tensor, residual: nn.Tensor | None = None) -> nn.Tensor:
        """``x[n, in] -> x W^T (+ b) (+ residual)`` [n, out]."""
        if self.gemv_applies(x):
            return self.decode_gemv(x, residual)
        if self.prefill_kernel is not None and not isinstance(x.shape[0], int):
            y = op.tensor_ir_op(self.prefill_kernel, matmul.kernel_name(*self.shape), args=[x, self._weight()],
                                out=nn.Tensor.placeholder([x.shape[0], self.shape[0]], x.dtype))
        else:
            w = self._weight()
            y = op.matmul(x, w if self.in_out else op.permute_dims(w))
        y = y + self.bias if self.bias is not None else y
        return y + residual if residual is not None else y

    def gemv_applies(self, x: nn.Tensor) -> bool:
        """True for one row (a decode step) where ``tir_kernels.gemv`` runs this weight."""
        return self.gemv_target is not None and isinstance(x.shape[0], int) and x.shape[0] == 1

    def decode_gemv(self, x: nn.Tensor, residual: nn.Tensor | None = None, swiglu: bool = False,
                    norm: nn.RMSNorm | None = None) -> nn.Tensor:
        """``tir_kernels.gemv`` on ``x[1, in]`` (``swiglu``: x[1, 2 in], the gate/up output, whose
        SwiGLU is the input; ``norm``: the RMSNorm whose output is the input, computed in the
        GEMV's prologue from x, the un-normalised residual stream), the residual added where given."""
        n_out, k = self.shape
        prologue = "swiglu" if swiglu else "rmsnorm" if norm is not None else "none"
        epilogue = "none" if residual is None else "residual"
        eps = norm.epsilon if norm is not None else 1e-5
        kernel = gemv.make_decode_gemv(n_out, k, x.dtype, self.gemv_target, epilogue, prologue, eps, **self.gemv_format)
        args = ([x] + ([norm.weight] if norm is not None else []) + self._weights()
                + ([residual] if residual is not None else []))
        return op.tensor_ir_op(kernel, gemv.kernel_name(n_out, k, f"{prologue}_{epilogue}", **self.gemv_format), args=args,
                               out=nn.Tensor.placeholder([1, n_out], x.dtype))


class QuantLinear(_Packed, Linear):
    """``Linear`` with ``W`` stored as ``qweight`` + ``scale`` (+ ``min``; see ``param_shapes``).
    Decode: through ``tir_kernels.gemv``'s 4/8-bit GEMV (fusions as ``Linear``'s) where it runs;
    otherwise inside dlight's GEMV (the float weight never exists)."""

    def __init__(self, qs: QuantScheme, in_features: int, out_features: int, bias: bool, dtype: str,
                 in_out: bool, target):
        self._packed_params(qs, *param_shapes(qs, in_features, out_features, in_out), dtype)
        self._setup(in_features, out_features, bias, dtype, in_out, target, decode_gemv=True, scheme=qs)

    def _weights(self) -> list[nn.Tensor]:
        return self._packed()

    def _weight(self) -> nn.Tensor:
        return self._dequantized(self._packed(), self.in_out, "dequantize")


def make_linear(quant: QuantScheme | None, in_features: int, out_features: int, bias: bool, dtype: str,
                in_out: bool, target, decode_gemv: bool = True) -> Linear:
    """A ``Linear`` over float weights, or a ``QuantLinear`` over ``quant``'s packed weights;
    ``decode_gemv`` as ``Linear``'s (float weights only: quantized ones decode through the GEMV wherever it runs)."""
    if quant is None:
        return Linear(in_features, out_features, bias, dtype, in_out, target, decode_gemv)
    return QuantLinear(quant, in_features, out_features, bias, dtype, in_out, target)


class QuantEmbedding(_Packed, nn.Module):
    """An embedding table [vocab, hidden] stored as ``qweight`` + ``scale`` (+ ``min``) in the
    canonical layout (groups along ``hidden``): a lookup gathers the packed rows and dequantizes
    only them; ``weight()`` is the whole float table as a dequantize compute (a tied lm_head's
    matmul fuses it, as ``QuantLinear``'s)."""

    def __init__(self, qs: QuantScheme, vocab: int, hidden: int, dtype: str):
        self._packed_params(qs, *param_shapes(qs, hidden, vocab, in_out=False), dtype)

    def weight(self) -> nn.Tensor:
        return self._dequantized(self._packed(), False, "dequantize")

    def lookup(self, ids: nn.Tensor) -> nn.Tensor:
        """Rows of ``ids`` [n] -> [n, hidden]; ids outside the table are clipped into it."""
        rows = [op.wrap_nested(relax.op.take(p._expr, ids._expr, axis=0, mode="clip"), name="embed_rows")
                for p in self._packed()]
        return self._dequantized(rows, False, "dequantize_rows")
