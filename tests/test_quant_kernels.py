"""Quantized linears: the NumPy quantizer against a float64 reference, and the fused
dequantize-matmul kernels (compiled by the model pipeline) against NumPy on random data."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm.relax.frontend import nn

from tsedge.compile.cuda_fatbin import fatbin_build_context
from tsedge.compile.pipeline import relax_pipeline
from tsedge.compile.targets import cuda_target, parse_target
from tsedge.models.linear import QuantLinear
from tsedge.models.quantization import (GGML_SCHEMES, SCHEMES, QuantizationError, QuantizedTensor, check_quantized,
                                        concatenate, dequantize, from_ggml_blocks, library_arrays, quantize,
                                        unpack)
from tsedge.tir_kernels import gemv

Q4, Q8 = SCHEMES["q4f16"], SCHEMES["q8f16"]
ALL = [SCHEMES[n] for n in ("q4f16", "q8f16", "q4_0", "q4_1")]
ALL_IDS = ["q4f16", "q8f16", "q4_0", "q4_1"]


def _reference_codes(w: np.ndarray, max_int: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 group quantization: (codes [out, in], float16 scales [out, in / group])."""
    g = w.astype(np.float64).reshape(w.shape[0], -1, group)
    scale = (np.abs(g).max(axis=2) / max_int).astype(np.float16)
    s = scale.astype(np.float64)[:, :, None]
    codes = np.clip(np.rint(np.divide(g, s, out=np.zeros_like(g), where=s > 0)), -max_int, max_int)
    return codes.reshape(w.shape).astype(np.int32), scale


@pytest.mark.parametrize("qs", [Q4, Q8], ids=["q4f16", "q8f16"])
def test_quantizer_matches_float64_reference(qs):
    rng = np.random.default_rng(qs.bits)
    w = rng.standard_normal((48, 96)).astype(np.float32) * rng.uniform(0.01, 3, (48, 1)).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero group: scale 0, codes 0
    w[5, 40] = 50.0  # an outlier sets its group's scale
    qt = quantize(w, qs)
    codes, scale = _reference_codes(w, qs.max_int, qs.group)
    np.testing.assert_array_equal(qt.scale, scale)
    got = unpack(qt.qweight, qs)
    # float32 and float64 division may round an exact .5 tie differently: allow those only
    with np.errstate(invalid="ignore"):  # 0 / 0 in the all-zero group
        ratio = w.astype(np.float64) / np.repeat(scale.astype(np.float64), qs.group, 1)
    ties = np.abs(np.abs(ratio) % 1 - 0.5) < 1e-5
    assert np.all((got == codes) | ties)
    assert qt.qweight.dtype == np.dtype(qs.storage_dtype) and qt.scale.dtype == np.float16
    err = np.abs(dequantize(qt) - w)
    bound = np.repeat(scale.astype(np.float32), qs.group, 1) / 2 * (1 + 1e-3) + 1e-7
    assert np.all(err <= bound)
    assert np.all(dequantize(qt)[3, :32] == 0)


def test_ragged_groups_and_bad_weights_are_refused():
    with pytest.raises(QuantizationError, match="input size 40 is not a multiple of 32.*--quantization q0"):
        quantize(np.ones((4, 40), np.float32), Q4, "x.weight")
    with pytest.raises(QuantizationError, match="NaN"):
        quantize(np.full((2, 32), np.nan, np.float32), Q8)


def test_file_checks():
    good = quantize(np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32), Q4)
    check_quantized(good, "w", (8, 64))
    with pytest.raises(QuantizationError, match=r"qweight is uint32 \[8, 8\], expected uint32 \[8, 4\]"):
        check_quantized(good, "w", (8, 32))
    bad = QuantizedTensor(Q4, good.qweight, good.scale.astype(np.float32))
    with pytest.raises(QuantizationError, match="scale is float32"):
        check_quantized(bad, "w", (8, 64))
    bad = QuantizedTensor(Q4, good.qweight | np.uint32(0xF), good.scale)  # nibble 15: code 8
    with pytest.raises(QuantizationError, match="codes outside"):
        check_quantized(bad, "w", (8, 64))


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("shape", [(3, 32), (5, 96), (64, 576)])
def test_ggml_blocks_kept_exactly(ggml_type, shape):
    """A GGUF tensor's blocks (made by the ``gguf`` package's ggml reference quantizer) in the
    canonical layout dequantize to exactly what ``gguf.quants.dequantize`` gives; quantizing to
    q4_0/q4_1 gives the same blocks' values; a wrong byte count is refused in one line."""
    import gguf

    rng = np.random.default_rng(len(ggml_type) + shape[0])
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3, (shape[0], 1))).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    w[-1, -1] = -40.0  # a negative outlier sets Q4_0's scale sign
    kind = gguf.GGMLQuantizationType[ggml_type]
    blocks = gguf.quants.quantize(w, kind)
    qt = from_ggml_blocks(blocks, ggml_type, shape)
    assert qt.scheme is SCHEMES[GGML_SCHEMES[ggml_type]]
    check_quantized(qt, "w", shape)
    np.testing.assert_array_equal(dequantize(qt), gguf.quants.dequantize(blocks, kind))
    if qt.scheme.name != "q8f16":  # ours: the float16-rounded scale (not ggml's Q8_0 quantizer)
        np.testing.assert_array_equal(dequantize(quantize(w, qt.scheme)), dequantize(qt))
    with pytest.raises(QuantizationError, match=f"w: {ggml_type} data is .* bytes, expected .* corrupt"):
        from_ggml_blocks(blocks[:, :-1], ggml_type, shape, "w")


def test_q4_1_min_is_checked():
    qt = quantize(np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32), SCHEMES["q4_1"])
    with pytest.raises(QuantizationError, match="min is missing"):
        check_quantized(QuantizedTensor(qt.scheme, qt.qweight, qt.scale), "w", (8, 64))
    with pytest.raises(QuantizationError, match="mins contain NaN"):
        check_quantized(QuantizedTensor(qt.scheme, qt.qweight, qt.scale, np.full_like(qt.min, np.nan)), "w", (8, 64))


def test_concatenation_is_quantization_of_the_concatenation():
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((n, 64)).astype(np.float32) for n in (16, 8, 8)]
    whole = quantize(np.concatenate(parts), Q4)
    joined = concatenate([quantize(p, Q4) for p in parts])
    np.testing.assert_array_equal(joined.qweight, whole.qweight)
    np.testing.assert_array_equal(joined.scale, whole.scale)


class _Linear(nn.Module):
    def __init__(self, qs, k, n, bias, dtype, in_out, target):
        self.lin = QuantLinear(qs, k, n, bias, dtype, in_out, target)

    def forward(self, x):
        return self.lin(x)


def _module(qs, k, n, bias, dtype, in_out, target, rows):
    model = _Linear(qs, k, n, bias, dtype, in_out, target)
    spec = {"forward": {"x": nn.spec.Tensor([rows, k], dtype), "$": {"param_mode": "packed", "effect_mode": "none"}}}
    mod, _ = model.export_tvm(spec=spec)
    return mod


# rows (1: decode GEMV, else a prefill chunk), outputs, inputs (a multiple of 32)
SHAPES = [(1, 64, 32), (1, 960, 576), (1, 4160, 96), (7, 1536, 576), (13, 128, 1536)]


@pytest.mark.parametrize("qs", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("rows, n, k", SHAPES)
def test_fused_dequantize_matmul_cpu(qs, rows, n, k):
    """llvm float32, weights [in, out] as the CPU build stores them; the bias add fused too."""
    target = parse_target("llvm")
    mod = _module(qs, k, n, True, "float32", True, None, "n" if rows > 1 else 1)
    ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
    rng = np.random.default_rng(rows * n + k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    qt = quantize(w, qs)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    vm = tvm.runtime.vm.VirtualMachine(ex, tvm.cpu())
    params = [tvm.runtime.tensor(a) for a in (*library_arrays(qt, True).values(), bias)]
    y = vm["forward"](tvm.runtime.tensor(x), params).numpy()
    expected = x.astype(np.float64) @ dequantize(qt).astype(np.float64).T + bias
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("qs", ALL, ids=ALL_IDS)
def test_dequantize_fuses_into_the_matmul(qs):
    """One PrimFunc reads the packed weight: no kernel writes a float weight (CPU: the fused
    dequantize-matmul pair; CUDA decode: ``tir_kernels.gemv``'s 4/8-bit GEMV)."""
    import tvm.relax as relax

    from tsedge.compile.pipeline import fuse_dequantize_matmul

    for target, in_out, dtype in ((parse_target("llvm"), True, "float32"), (cuda_target("sm_90"), False, "float16")):
        mod = _module(qs, 576, 960, False, dtype, in_out, None if in_out else target, 1)
        with target:
            fused = tvm.transform.Sequential([fuse_dequantize_matmul(), relax.transform.LegalizeOps(),
                                              relax.transform.FuseTIR()])(mod)
        prims = [gv.name_hint for gv, f in fused.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
        if not in_out:  # CUDA
            assert prims == [gemv.kernel_name(960, 576, "none_none", qs.bits, qs.offset, qs.has_min)], prims
        else:
            assert len(prims) == 1 and "dequantize" in prims[0] and "matmul" in prims[0], prims


def _cuda_kernels(module) -> list[str]:
    """Names of the ``__global__`` kernels in the CUDA module imported (at any depth) by ``module``."""
    if module.kind == "cuda":
        return re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(.*\{$", module.inspect_source(),
                          re.MULTILINE)
    return [name for sub in module.imports_ for name in _cuda_kernels(sub)]


@pytest.mark.parametrize("qs", ALL, ids=ALL_IDS)
def test_cuda_build_compiles(qs):
    """sm_90, float16: decode is one kernel reading the packed weight (tir_kernels.gemv's 4/8-bit
    GEMV); a prefill chunk dequantizes to float16, then runs tir_kernels.matmul's tensor-core GEMM."""
    target = cuda_target("sm_90")
    kernels = {}
    for rows in (1, "n"):
        mod = _module(qs, 576, 960, False, "float16", False, target, rows)
        with fatbin_build_context(target):  # nvcc, as a library build (kernel_harness.cuda_source)
            ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
        kernels[rows] = _cuda_kernels(ex.mod)
    assert kernels[1] == [f"{gemv.kernel_name(960, 576, 'none_none', qs.bits, qs.offset, qs.has_min)}_kernel"]
    assert sorted(kernels["n"]) == ["dequantize_kernel", "prefill_matmul_960x576_kernel"]

