"""Decode GEMV (one token) vs NumPy float32 references (runs on the GPU through bench/device/kernels.sh)."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_harness import CUDA, MODE, build, cuda_source, tensor

from tsedge.tir_kernels import gemv

SHAPES = [
    # N (outputs), K (inputs), prologue, epilogue
    (4096, 4096, "none", "residual"),     # Llama-3-8B o_proj + the residual stream
    (6144, 4096, "none", "none"),         # Llama-3-8B fused QKV
    (4096, 14336, "swiglu", "residual"),  # Llama-3-8B down_proj on the gate/up output (K: 7 groups of loads)
    (2051, 768, "none", "none"),          # N not a multiple of a block's 8 rows, K of 3 warp reads
    (3001, 512, "swiglu", "none"),        # odd N
]


def _silu(v: np.ndarray) -> np.ndarray:
    return v / (1 + np.exp(-v))


@pytest.mark.skipif(MODE == "llvm", reason="CUDA kernel (CPU linears run the CPU matmul schedule)")
@pytest.mark.parametrize("n_out, k, prologue, epilogue", SHAPES)
def test_decode_gemv(n_out, k, prologue, epilogue):
    rng = np.random.default_rng(n_out + k)
    x = rng.standard_normal((1, 2 * k if prologue == "swiglu" else k)).astype(np.float16)
    w = (rng.standard_normal((n_out, k)) / np.sqrt(k)).astype(np.float16)
    y = tensor(np.full((1, n_out), np.nan, np.float16))
    xf = x.astype(np.float32)
    inp = (_silu(xf[:, :k]) * xf[:, k:]).astype(np.float16).astype(np.float32) if prologue == "swiglu" else xf
    full = inp @ w.astype(np.float32).T
    kernel = build(gemv.make_decode_gemv, n_out, k, "float16", epilogue=epilogue, prologue=prologue)
    if epilogue == "residual":
        r = rng.standard_normal((1, n_out)).astype(np.float16)
        kernel(tensor(x), tensor(w), tensor(r), y)
        expected = full.astype(np.float16).astype(np.float32) + r.astype(np.float32)
    else:
        kernel(tensor(x), tensor(w), y)
        expected = full
    np.testing.assert_allclose(y.numpy().astype(np.float32), expected, rtol=1e-2, atol=2e-3 * np.abs(expected).max())


@pytest.mark.skipif(MODE != "llvm", reason="codegen and target checks run where the compiler is")
def test_decode_gemv_codegen_and_support():
    source = cuda_source(gemv.make_decode_gemv(4096, 14336, "float16", CUDA, "residual", "swiglu"))
    assert "uint4" in source and "__shfl" in source  # 16-byte loads, warp sums
    assert gemv.supported(4096, 14336, "float16", CUDA)
    assert not gemv.supported(4096, 576, "float16", CUDA)  # K not a multiple of 256
    assert not gemv.supported(4096, 4096, "float32", CUDA)
    with pytest.raises(ValueError, match="use none or swiglu / none or residual"):
        gemv.make_decode_gemv(4096, 4096, "float16", CUDA, "swiglu")
