"""KV append, RoPE table, row list and split-K attention kernels vs NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
from attention_reference import attention, rope_table, rotate
from kernel_harness import CUDA, MODE, build, cuda_source, tensor

from tsedge.tir_kernels import attention as attn
from tsedge.tir_kernels import cache_ops
from tsedge.tir_kernels import chunk_attention as chunk
from tsedge.tir_kernels import decode_attention as dec
from tsedge.tir_kernels import decode_attention_mma as dec_mma

NUM_LAYERS, LAYER = 3, 2


def inv_freq(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    return (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)


def test_rope_table():
    table = tensor(np.full((777, 128), np.nan, np.float32))
    build(cache_ops.make_rope_table, 128)(tensor(inv_freq(128)), 777, table)
    np.testing.assert_allclose(table.numpy(), rope_table(inv_freq(128), 777), atol=2e-4)


@pytest.mark.parametrize("n, pos, dtype", [(1, 0, "float16"), (5, 17, "float16"), (300, 1000, "float16"),
                                           (7, 33, "float32")])  # float32 steps into a float16 cache
def test_kv_append(n, pos, dtype):
    rng = np.random.default_rng(n)
    kv = rng.standard_normal((NUM_LAYERS, 2, 3, 1400, 64)).astype(np.float16)
    k, v = (rng.standard_normal((n, 3, 64)).astype(dtype) for _ in range(2))
    out = tensor(kv)
    q = rng.standard_normal((n, 6, 64)).astype(dtype)  # the fused projection's q heads come first
    build(cache_ops.make_kv_append, NUM_LAYERS, 3, 64, dtype, kv_dtype="float16")(
        out, tensor(np.concatenate([q, k, v], axis=1)), LAYER, tensor(np.array([pos + n], np.int32)))
    expected = kv.copy()
    expected[LAYER, 0, :, pos:pos + n] = k.transpose(1, 0, 2).astype(np.float16)
    expected[LAYER, 1, :, pos:pos + n] = v.transpose(1, 0, 2).astype(np.float16)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_iota():
    rows = tensor(np.full(1000, -1, np.int32))
    build(cache_ops.make_iota)(1000, rows)
    np.testing.assert_array_equal(rows.numpy(), np.arange(1000))


def test_last_row():
    x = np.random.default_rng(0).standard_normal((37, 576)).astype(np.float32)
    last = tensor(np.full((1, 576), np.nan, np.float32))
    build(cache_ops.make_last_row, 576, "float32")(tensor(x), last)
    np.testing.assert_array_equal(last.numpy()[0], x[-1])


CASES = [
    # n_heads, n_kv, head_dim, dtype, n (queries), M (attended rows), capacity, KV cache dtype
    (4, 4, 64, "float32", 1, 1, 64, "float32"),         # group 1, single key
    (9, 3, 64, "float32", 1, 300, 1200, "float32"),     # SmolLM2 heads (group 3), decode
    (8, 2, 128, "float16", 1, 4099, 5000, "float16"),   # group 4, M not a multiple of the chunk
    (16, 2, 128, "float32", 7, 513, 900, "float32"),    # group 8, prefill chunk, M = 2 chunks + 1
    (32, 8, 128, "float16", 64, 257, 300, "float16"),   # Llama-3-8B heads, chunk one key past a tile
    (6, 2, 64, "float16", 40, 40, 40, "float16"),       # prefill from empty: causal only
    # CPU libraries of quantized weights: float32 queries over a float16 cache
    (9, 3, 64, "float32", 1, 2049, 2100, "float16"),    # SmolLM2 heads, decode, M = 8 chunks + 1
    (9, 3, 64, "float32", 37, 600, 700, "float16"),     # a prefill chunk after 563 cached tokens
    (4, 2, 40, "float32", 1, 77, 100, "float32"),       # decode's partial sums 4 lanes wide (half 20)
    (6, 2, 48, "float32", 1, 300, 300, "float16"),      # ... 8 lanes wide (half 24)
]


@pytest.mark.parametrize("n_heads, n_kv, head_dim, dtype, n, m, capacity, kv_dtype", CASES)
def test_attention(n_heads, n_kv, head_dim, dtype, n, m, capacity, kv_dtype):
    if (kv_dtype != dtype or head_dim % 32) and MODE != "llvm":
        pytest.skip("a float16 cache beside float32 queries and head_dim % 32 != 0 are CPU cases")
    rng = np.random.default_rng(m + n)
    kv = rng.standard_normal((NUM_LAYERS, 2, n_kv, capacity, head_dim)).astype(kv_dtype)
    q = rng.standard_normal((n, n_heads, head_dim)).astype(dtype)
    rows = np.sort(rng.choice(capacity, m, replace=False)).astype(np.int32)
    table = rope_table(inv_freq(head_dim), m)
    chunks = attn.num_chunks(m)
    o = tensor(np.full((n, chunks, n_heads, head_dim), np.nan, np.float32))
    lse = tensor(np.full((n, chunks, n_heads), np.nan, np.float32))
    out = tensor(np.full((n, n_heads, head_dim), np.nan, dtype))
    qkv = np.concatenate([q, rng.standard_normal((n, 2 * n_kv, head_dim)).astype(dtype)], axis=1)
    partial = build(attn.make_attention_partial, NUM_LAYERS, n_heads, n_kv, head_dim, dtype, kv_dtype=kv_dtype)
    partial(tensor(qkv), tensor(kv), tensor(table.astype(np.float32)), tensor(rows), LAYER, o, lse)
    build(attn.make_attention_merge, n_heads, head_dim, dtype)(o, lse, out)
    expected = attention(q, kv[LAYER, 0][:, rows], kv[LAYER, 1][:, rows], table)
    tol = 2e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(out.numpy().astype(np.float64), expected, rtol=tol, atol=tol)


DECODE_CASES = [
    # n_heads, n_kv, head_dim, dtype, M (attended rows), capacity
    (32, 8, 128, "float16", 1, 16),          # Llama-3-8B heads, one key, one split
    (32, 8, 128, "float16", 97, 200),        # splits of 9 keys, last one short
    (32, 8, 128, "float16", 2049, 2100),     # 256 splits of 9 keys, the last ones empty
    (32, 8, 128, "float16", 2689, 40000),    # a Selection Cache hit's gathered rows
    (32, 8, 128, "float16", 40961, 41000),   # 256 splits of 161 keys
    (32, 8, 128, "float16", 8449, 9000),     # mma: 132 splits of 65 keys, the last ones empty
    (9, 3, 64, "float16", 300, 1200),        # SmolLM2 heads (group 3)
    (16, 2, 128, "float16", 1000, 1200),     # group 8: each slot one query head, no key lanes
    (9, 3, 64, "float32", 4099, 5000),       # float32 library: 4-element loads
    (4, 4, 64, "float32", 33, 64),           # group 1, a split of one key
    (24, 2, 64, "float16", 777, 900),        # group 12: mma rows past 8 hold query heads too
]
# kernel maker, its chunks for M rows, its dense grid
DECODE_KERNELS = {"simt": (dec.make_decode_attention, dec.decode_splits, dec.MAX_SPLITS),
                  "mma": (dec_mma.make_decode_attention_mma, dec_mma.mma_splits, dec_mma.MAX_SPLITS)}


def decode_kernel(name: str, n_heads: int, n_kv: int, head_dim: int, dtype: str):
    """(maker, splits, max_splits) of decode kernel ``name``; skips shapes the tensor-core kernel
    does not take."""
    if name == "mma" and not dec_mma.fits(n_heads, n_kv, head_dim, dtype):
        pytest.skip("tensor-core decode attention: float16, head_dim % 32 == 0, group <= 16 only")
    return DECODE_KERNELS[name]


@pytest.mark.skipif(MODE == "llvm", reason="GPU-only kernel (CPU decode runs attention_partial, tested above)")
@pytest.mark.parametrize("n_heads, n_kv, head_dim, dtype, m, capacity", DECODE_CASES)
@pytest.mark.parametrize("kernel", DECODE_KERNELS)
def test_decode_attention(kernel, n_heads, n_kv, head_dim, dtype, m, capacity):
    make, splits_of, _ = decode_kernel(kernel, n_heads, n_kv, head_dim, dtype)
    rng = np.random.default_rng(m)
    kv = rng.standard_normal((NUM_LAYERS, 2, n_kv, capacity, head_dim)).astype(dtype)
    q = rng.standard_normal((1, n_heads, head_dim)).astype(dtype)
    rows = np.sort(rng.choice(capacity, m, replace=False)).astype(np.int32)
    table = rope_table(inv_freq(head_dim, 5e5), m)
    splits = splits_of(m)
    o = tensor(np.full((1, splits, n_heads, head_dim), np.nan, np.float32))
    lse = tensor(np.full((1, splits, n_heads), np.nan, np.float32))
    out = tensor(np.full((1, n_heads, head_dim), np.nan, dtype))
    qkv = np.concatenate([q, rng.standard_normal((1, 2 * n_kv, head_dim)).astype(dtype)], axis=1)
    build(make, NUM_LAYERS, n_heads, n_kv, head_dim, dtype)(
        tensor(qkv), tensor(kv), tensor(table.astype(np.float32)), tensor(rows), LAYER, o, lse)
    build(attn.make_attention_merge, n_heads, head_dim, dtype)(o, lse, out)
    expected = attention(q, kv[LAYER, 0][:, rows], kv[LAYER, 1][:, rows], table)
    tol = (4e-3 if kernel == "mma" else 2e-3) if dtype == "float16" else 1e-5  # mma: float16 q and rotated keys
    np.testing.assert_allclose(out.numpy().astype(np.float64), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("n, chunks, n_heads, head_dim", [(1, 1, 32, 128), (37, 3, 9, 64), (512, 5, 32, 128)])
def test_merge_few_chunks(n, chunks, n_heads, head_dim):
    """The prefill chunks' merge (a thread per 4 outputs) against NumPy, chunks without keys included."""
    rng = np.random.default_rng(n * chunks)
    o = rng.standard_normal((n, chunks, n_heads, head_dim)).astype(np.float32)
    lse = (rng.standard_normal((n, chunks, n_heads)) * 4).astype(np.float32)
    lse[:, 1:][rng.random((n, chunks - 1, n_heads)) < 0.3] = attn.NEG_INF  # chunk 0 always has keys
    out = tensor(np.full((n, n_heads, head_dim), np.nan, np.float16))
    build(attn.make_attention_merge, n_heads, head_dim, "float16", few_chunks=True)(tensor(o), tensor(lse), out)
    w = np.where(lse > attn.NEG_INF / 2, np.exp2(lse - lse.max(axis=1, keepdims=True)), 0.0)
    expected = (w[..., None] * o).sum(axis=1) / w.sum(axis=1)[..., None]
    np.testing.assert_allclose(out.numpy().astype(np.float64), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("chunks, valid", [(256, 1), (256, 37), (9, 9)])
def test_merge_reads_only_the_valid_chunks(chunks, valid):
    """The merge of a dense GPU decode step: the device length says how many chunks hold
    keys; the others (left unwritten by the kernel: NaN here) are never read."""
    rng = np.random.default_rng(valid)
    n_heads, head_dim, length = 4, 64, valid * dec.MIN_KEYS_PER_SPLIT
    assert dec.decode_splits(length) == valid
    o = np.full((1, chunks, n_heads, head_dim), np.nan, np.float32)
    lse = np.full((1, chunks, n_heads), np.nan, np.float32)
    o[:, :valid] = rng.standard_normal((1, valid, n_heads, head_dim))
    lse[:, :valid] = rng.standard_normal((1, valid, n_heads)) * 3
    out = tensor(np.full((1, n_heads, head_dim), np.nan, np.float32))
    merge = build(attn.make_attention_merge, n_heads, head_dim, "float32", valid_chunks=dec.decode_splits)
    merge(tensor(o), tensor(lse), tensor(np.array([length], np.int32)), out)
    w = np.exp2(lse[0, :valid] - lse[0, :valid].max(0))  # [valid, H]
    want = np.einsum("ch,chd->hd", w, o[0, :valid]) / w.sum(0)[:, None]
    np.testing.assert_allclose(out.numpy()[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(MODE == "llvm", reason="GPU-only kernel (CPU decode runs attention_partial, tested above)")
@pytest.mark.parametrize("n_heads, n_kv, head_dim, dtype, m, capacity", [
    (32, 8, 128, "float16", 1, 16), (32, 8, 128, "float16", 97, 200), (9, 3, 64, "float16", 2049, 2100),
    (32, 8, 128, "float16", 40001, 40003)])
@pytest.mark.parametrize("kernel", DECODE_KERNELS)
def test_decode_attention_dense(kernel, n_heads, n_kv, head_dim, dtype, m, capacity):
    """Rows 0 .. length - 1 from a device length, ``MAX_SPLITS`` chunks whatever the length."""
    make, splits_of, splits = decode_kernel(kernel, n_heads, n_kv, head_dim, dtype)
    rng = np.random.default_rng(m)
    kv = rng.standard_normal((NUM_LAYERS, 2, n_kv, capacity, head_dim)).astype(dtype)
    q = rng.standard_normal((1, n_heads, head_dim)).astype(dtype)
    table = rope_table(inv_freq(head_dim, 5e5), capacity)
    o = tensor(np.full((1, splits, n_heads, head_dim), np.nan, np.float32))
    lse = tensor(np.full((1, splits, n_heads), np.nan, np.float32))
    out = tensor(np.full((1, n_heads, head_dim), np.nan, dtype))
    length = tensor(np.array([m], np.int32))
    build(make, NUM_LAYERS, n_heads, n_kv, head_dim, dtype, dense=True)(
        tensor(q), tensor(kv), tensor(table.astype(np.float32)), length, LAYER, o, lse)
    build(attn.make_attention_merge, n_heads, head_dim, dtype, valid_chunks=splits_of)(o, lse, length, out)
    expected = attention(q, kv[LAYER, 0][:, :m], kv[LAYER, 1][:, :m], table[:m])
    tol = 4e-3 if kernel == "mma" else 2e-3
    np.testing.assert_allclose(out.numpy().astype(np.float64), expected, rtol=tol, atol=tol)


CHUNK_CASES = [
    # n_heads, n_kv, head_dim, n (queries), M (attended rows), capacity
    (32, 8, 128, 512, 512, 600),             # Llama-3-8B heads, a 512-token chunk from empty
    (32, 8, 128, 64, 257, 300),              # a key tile one key past full
    (9, 3, 64, 40, 1000, 1200),              # SmolLM2 heads: 120 rows, a ragged last row tile
    (16, 2, 128, 7, 513, 900),               # group 8, 56 rows: one tile, part empty
    (4, 4, 64, 33, 8192 + 77, 8300),         # group 1, the rows cross a split
    (8, 2, 128, 300, 2 * 8192 + 5, 17000),   # three splits, the last of 5 keys
]


@pytest.mark.skipif(MODE == "llvm", reason="CUDA tensor-core kernel (CPU prefill runs attention_partial, tested above)")
@pytest.mark.parametrize("n_heads, n_kv, head_dim, n, m, capacity", CHUNK_CASES)
@pytest.mark.parametrize("variant", [{}, {"keys": 32}, {"keys": 32, "stages": 3}, {"cuda_arch": "sm_90"}],
                         ids=["wgmma", "wgmma-keys32", "wgmma-keys32-stages3", "mma-sync"])  # harness CUDA: sm_90a
def test_chunk_attention(n_heads, n_kv, head_dim, n, m, capacity, variant):
    rng = np.random.default_rng(m * 7 + n)
    kv = rng.standard_normal((NUM_LAYERS, 2, n_kv, capacity, head_dim)).astype(np.float16)
    q = rng.standard_normal((n, n_heads, head_dim)).astype(np.float16)
    rows = np.sort(rng.choice(capacity, m, replace=False)).astype(np.int32)
    table = rope_table(inv_freq(head_dim, 5e5), m)
    splits = chunk.chunk_splits(m)
    o = tensor(np.full((n, splits, n_heads, head_dim), np.nan, np.float32))
    lse = tensor(np.full((n, splits, n_heads), np.nan, np.float32))
    out = tensor(np.full((n, n_heads, head_dim), np.nan, np.float16))
    qkv = np.concatenate([q, rng.standard_normal((n, 2 * n_kv, head_dim)).astype(np.float16)], axis=1)
    args = [tensor(qkv), tensor(kv), tensor(table.astype(np.float32)), tensor(rows), LAYER, o, lse]
    if "cuda_arch" not in variant and head_dim % 64 == 0:  # Hopper: the keys rotated by a pre-pass first
        krot = tensor(np.full((n_kv, m, head_dim), np.nan, np.float16))
        build(chunk.make_rotated_keys, NUM_LAYERS, n_kv, head_dim, "float16")(*args[1:5], krot)
        args.insert(2, krot)
    build(chunk.make_chunk_attention, NUM_LAYERS, n_heads, n_kv, head_dim, "float16", **variant)(*args)
    if len(args) == 8:  # the pre-pass alone: RoPE at list positions, rounded once
        np.testing.assert_allclose(krot.numpy().astype(np.float64),
                                   rotate(kv[LAYER, 0][:, rows].astype(np.float64), np.arange(m), table),
                                   rtol=2e-3, atol=2e-3)
    build(attn.make_attention_merge, n_heads, head_dim, "float16", few_chunks=True)(o, lse, out)
    expected = attention(q, kv[LAYER, 0][:, rows], kv[LAYER, 1][:, rows], table)
    np.testing.assert_allclose(out.numpy().astype(np.float64), expected, rtol=4e-3, atol=4e-3)


@pytest.mark.skipif(MODE != "llvm", reason="codegen check runs where the compiler is")
def test_chunk_attention_cuda_uses_tensor_cores():
    from tsedge.compile.targets import cuda_target

    hopper = cuda_source(chunk.make_chunk_attention(2, 32, 8, 128, "float16", CUDA))  # sm_90a: wgmma
    assert f"m64n{chunk.WGMMA_KEYS}k16_f32_f16_f16_1_1_0_0(sf" in hopper and "m64n128k16_f32_f16_f16_1_1_1(of" in hopper
    assert "mma.sync" not in hopper and "fence.proxy.async.shared::cta" in hopper
    assert "__shared__ alignas" not in hopper  # every tile in the (1024-byte aligned) dynamic buffer
    assert "krot_ptr" in hopper and "rope_ptr" in hopper  # keys pre-rotated; the queries rotated here
    func = chunk.make_chunk_attention(2, 32, 8, 128, "float16", cuda_target("sm_90"))
    source = cuda_source(func)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in source
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in source
    # the queries and the K/V/RoPE stages in one dynamic buffer; the rotated key tile static apart
    assert "extern __shared__" in source and "q_sh_ptr" not in source and "kv_st_ptr" not in source
    assert "__shared__ alignas(64) half k_sh_ptr[" in source


@pytest.mark.skipif(MODE != "llvm", reason="target checks run where the compiler is")
def test_chunk_attention_support():
    assert chunk.supported("float16", 128, CUDA)
    assert not chunk.supported("float32", 128, CUDA)
    assert not chunk.supported("float16", 72, CUDA)
    with pytest.raises(ValueError, match="attention_partial"):
        chunk.make_chunk_attention(2, 32, 8, 128, "float32", CUDA)
    # sm_86/89 give a block 99 KB: one mma tile per warp (64 rows a block) instead of sm_90's two
    from tsedge.compile.targets import cuda_target

    sm86 = cuda_target("sm_86")
    assert chunk.supported("float16", 128, sm86)
    assert "blockIdx.z) * (int64_t)64)" in cuda_source(chunk.make_chunk_attention(2, 32, 8, 128, "float16", sm86))
    assert "blockIdx.z) * (int64_t)128)" in cuda_source(chunk.make_chunk_attention(2, 32, 8, 128, "float16", CUDA))
    with pytest.raises(ValueError, match="shared memory"):
        chunk.make_chunk_attention(2, 32, 8, 128, "float16", sm86, m_tiles=2)


@pytest.mark.skipif(MODE != "llvm", reason="codegen check runs where the compiler is")
@pytest.mark.parametrize("dtype, load", [("float16", "uint4"), ("float32", "float4")])
def test_decode_attention_cuda_pipelines_16_byte_copies(dtype, load):
    source = cuda_source(dec.make_decode_attention(2, 32, 8, 128, dtype, CUDA))
    assert "cp.async.cg.shared.global" in source and "cp.async.wait_group 0" in source  # 2 stages
    assert f"*({load}*)(((" in source  # a thread reads 16 bytes of a row from shared memory


@pytest.mark.skipif(MODE != "llvm", reason="codegen check runs where the compiler is")
def test_decode_attention_mma_uses_tensor_cores():
    source = cuda_source(dec_mma.make_decode_attention_mma(2, 32, 8, 128, "float16", CUDA))
    assert source.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") == 32  # 16 Q Kᵀ + 16 P V a tile
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in source and "cp.async.cg.shared.global" in source
    assert "__launch_bounds__(128)" in source  # four KV heads (warps) a block
    from tsedge.compile.targets import cuda_target  # sm_86/89: 99 KB of shared memory, two KV heads a block

    assert "__launch_bounds__(64)" in cuda_source(dec_mma.make_decode_attention_mma(2, 32, 8, 128, "float16",
                                                                                     cuda_target("sm_86")))


@pytest.mark.skipif(MODE != "llvm", reason="target checks run where the compiler is")
def test_decode_attention_mma_support():
    assert dec_mma.supported(32, 8, 128, "float16", CUDA) and dec_mma.supported(9, 3, 64, "float16", CUDA)
    assert not dec_mma.supported(32, 8, 128, "float32", CUDA)
    assert not dec_mma.supported(32, 8, 80, "float16", CUDA)  # RoPE halves of 40 dims: not whole k-steps
    assert not dec_mma.supported(64, 2, 128, "float16", CUDA)  # a group of 32 query heads
    with pytest.raises(ValueError, match="make_decode_attention"):
        dec_mma.make_decode_attention_mma(2, 32, 8, 128, "float32", CUDA)
    with pytest.raises(ValueError, match="shared memory"):
        dec_mma.make_decode_attention_mma(2, 32, 8, 128, "float16", CUDA, keys=256)


@pytest.mark.skipif(MODE != "llvm", reason="target checks run where the compiler is")
def test_decode_attention_tiles_checked():
    with pytest.raises(ValueError, match="do not fit one block"):
        dec.make_decode_attention(2, 9, 3, 64, "float16", CUDA, tile_keys=8)  # not a multiple of 10 slots
    with pytest.raises(ValueError, match="do not fit one block"):
        dec.make_decode_attention(2, 32, 8, 128, "float16", CUDA, tile_keys=64, stages=3)  # 771 KB


def test_decode_splits():
    assert [dec.decode_splits(m) for m in (1, 8, 9, 2048, 2049, 131072)] == [1, 1, 2, 256, 256, 256]
