"""Tensor-core prefill matmuls (``mma.sync`` and Hopper's ``wgmma``) vs a NumPy float32 reference
(runs on the GPU through bench/device/kernels.sh)."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_harness import CUDA, MODE, build, cuda_source, tensor

from tsedge.compile.targets import cuda_target
from tsedge.tir_kernels import matmul, matmul_wgmma

SHAPES = [
    # m (rows: prefill tokens), N (outputs), K (inputs)
    (1, 256, 64),        # one row of a 128-row tile
    (37, 576, 576),      # SmolLM2 hidden size: N past a 128-column tile, ragged rows
    (128, 960, 576),     # SmolLM2 fused QKV
    (300, 1024, 4096),   # Llama-3-8B K, rows over two tiles and a part
    (512, 4096, 14336),  # Llama-3-8B down projection, a full 512-token chunk
]


WGMMA_TILES = [None, matmul_wgmma.WgmmaTiles(bn=128, stages=5), matmul_wgmma.WgmmaTiles(bn=256, stages=4),
               matmul_wgmma.WgmmaTiles(bn=64, stages=3)]


def _check_matmul(kernel, m: int, n_out: int, k: int) -> None:
    rng = np.random.default_rng(m + n_out)
    x = rng.standard_normal((m, k)).astype(np.float16)
    w = (rng.standard_normal((n_out, k)) / np.sqrt(k)).astype(np.float16)
    y = tensor(np.full((m, n_out), np.nan, np.float16))
    kernel(tensor(x), tensor(w), y)
    expected = x.astype(np.float32) @ w.astype(np.float32).T
    np.testing.assert_allclose(y.numpy().astype(np.float32), expected, rtol=2e-2, atol=4e-3 * np.abs(expected).max())


@pytest.mark.skipif(MODE == "llvm", reason="CUDA tensor-core kernel (CPU linears run the CPU matmul schedule)")
@pytest.mark.parametrize("m, n_out, k", SHAPES)
def test_prefill_matmul(m, n_out, k):
    _check_matmul(build(matmul.make_mma_matmul, n_out, k, "float16"), m, n_out, k)


@pytest.mark.skipif(MODE == "llvm", reason="CUDA sm_90a kernel (wgmma: Hopper GPUs)")
@pytest.mark.parametrize("tiles", WGMMA_TILES, ids=lambda t: "default" if t is None else f"n{t.bn}s{t.stages}")
@pytest.mark.parametrize("m, n_out, k", SHAPES + [(700, 6144, 4096)])  # N >= 6144: 256-wide tiles by default
def test_prefill_matmul_wgmma(m, n_out, k, tiles):
    _check_matmul(build(matmul_wgmma.make_prefill_matmul_wgmma, n_out, k, "float16", tiles=tiles), m, n_out, k)


@pytest.mark.skipif(MODE != "llvm", reason="codegen and target checks run where the compiler is")
def test_prefill_matmul_cuda_codegen_and_support():
    source = cuda_source(matmul.make_mma_matmul(4096, 4096, "float16", CUDA))
    tiles = matmul.TILES  # one mma per 16-wide k-slice of a step and per 16x8 tile of a warp
    per_warp = (tiles.bm // tiles.warps_m // 16) * (tiles.bn // tiles.warps_n // 8)
    assert source.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") == tiles.bk // 16 * per_warp
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in source
    assert matmul.supported(576, 576, "float16", CUDA)
    assert not matmul.supported(4096, 4100, "float16", CUDA)  # K not a multiple of the k-step
    assert not matmul.supported(4096, 4096, "float32", CUDA)
    with pytest.raises(ValueError, match="K % 64"):
        matmul.make_prefill_matmul(4096, 4100, "float16", CUDA)


@pytest.mark.skipif(MODE != "llvm", reason="codegen and target checks run where the compiler is")
def test_prefill_matmul_dispatches_wgmma_on_sm90a():
    """sm_90a gets the wgmma kernel (4 wgmma a k-step, the async-proxy fence, 128-byte swizzle
    descriptors), under the name the model calls; sm_90 keeps mma.sync."""
    hopper, plain = cuda_target("sm_90a"), cuda_target("sm_90")
    func = matmul.make_prefill_matmul(4096, 4096, "float16", hopper)
    assert func.attrs["global_symbol"] == matmul.kernel_name(4096, 4096)
    source = cuda_source(func)  # the harness's CUDA target is sm_90a
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16" in source  # the helper, called a k-slice:
    assert source.count("m64n128k16_f32_f16_f16_1_1_0_0(acc") == matmul_wgmma.BK // 16
    assert "fence.proxy.async.shared::cta" in source and "mma.sync" not in source
    assert "m64n256k16" in cuda_source(matmul.make_prefill_matmul(6144, 4096, "float16", hopper))
    assert "wgmma" not in str(matmul.make_prefill_matmul(4096, 4096, "float16", plain).script())
    assert not matmul_wgmma.supported(4096, 4096, "float16", plain)
    with pytest.raises(ValueError, match="bn must be"):
        matmul_wgmma.make_prefill_matmul_wgmma(4096, 4096, "float16", hopper, matmul_wgmma.WgmmaTiles(bn=96))
