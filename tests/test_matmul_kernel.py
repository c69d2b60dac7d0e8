"""Tensor-core prefill matmul vs a NumPy float32 reference (runs on the GPU through bench/device/kernels.sh)."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_harness import CUDA, MODE, build, cuda_source, tensor

from tsedge.tir_kernels import matmul

SHAPES = [
    # m (rows: prefill tokens), N (outputs), K (inputs)
    (1, 256, 64),        # one row of a 128-row tile
    (37, 576, 576),      # SmolLM2 hidden size: N past a 128-column tile, ragged rows
    (128, 960, 576),     # SmolLM2 fused QKV
    (300, 1024, 4096),   # Llama-3-8B K, rows over two tiles and a part
    (512, 4096, 14336),  # Llama-3-8B down projection, a full 512-token chunk
]


@pytest.mark.skipif(MODE == "llvm", reason="CUDA tensor-core kernel (CPU linears run the CPU matmul schedule)")
@pytest.mark.parametrize("m, n_out, k", SHAPES)
def test_prefill_matmul(m, n_out, k):
    rng = np.random.default_rng(m + n_out)
    x = rng.standard_normal((m, k)).astype(np.float16)
    w = (rng.standard_normal((n_out, k)) / np.sqrt(k)).astype(np.float16)
    y = tensor(np.full((m, n_out), np.nan, np.float16))
    build(matmul.make_prefill_matmul, n_out, k, "float16")(tensor(x), tensor(w), y)
    expected = x.astype(np.float32) @ w.astype(np.float32).T
    np.testing.assert_allclose(y.numpy().astype(np.float32), expected, rtol=2e-2, atol=4e-3 * np.abs(expected).max())


@pytest.mark.skipif(MODE != "llvm", reason="codegen and target checks run where the compiler is")
def test_prefill_matmul_cuda_codegen_and_support():
    source = cuda_source(matmul.make_prefill_matmul(4096, 4096, "float16", CUDA))
    tiles = matmul.TILES  # one mma per 16-wide k-slice of a step and per 16x8 tile of a warp
    per_warp = (tiles.bm // tiles.warps_m // 16) * (tiles.bn // tiles.warps_n // 8)
    assert source.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") == tiles.bk // 16 * per_warp
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in source
    assert matmul.supported(576, 576, "float16", CUDA)
    assert not matmul.supported(4096, 4100, "float16", CUDA)  # K not a multiple of the k-step
    assert not matmul.supported(4096, 4096, "float32", CUDA)
    with pytest.raises(ValueError, match="K % 64"):
        matmul.make_prefill_matmul(4096, 4100, "float16", CUDA)
