"""Decode GEMV (one token) vs NumPy float32 references and TVM's own RMSNorm (runs on the GPU through
bench/device/kernels.sh); on the CPU, its CUDA code and where the model's decode step uses it."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_harness import CUDA, MODE, build, cuda_source, tensor

from tsedge.models.quantization import SCHEMES, dequantize, quantize, unpack
from tsedge.tir_kernels import gemv

SHAPES = [
    # N (outputs), K (inputs), prologue, epilogue
    (4096, 4096, "none", "residual"),     # Llama-3-8B o_proj + the residual stream
    (6144, 4096, "none", "none"),         # Llama-3-8B fused QKV
    (4096, 14336, "swiglu", "residual"),  # Llama-3-8B down_proj on the gate/up output (K: 7 groups of loads)
    (2051, 768, "none", "none"),          # N not a multiple of a block's 8 rows, K of 3 warp reads
    (3001, 512, "swiglu", "none"),        # odd N
    (6144, 4096, "rmsnorm", "none"),      # Llama-3-8B fused QKV on the residual stream, input_layernorm fused
    (2051, 768, "rmsnorm", "none"),       # N not a multiple of 8 rows; K: 3 warps stage x, 5 idle
    (1003, 14336, "rmsnorm", "none"),     # odd N, K: 7 pieces of x a thread
    (3001, 256, "rmsnorm", "none"),       # K of one warp read: one warp stages x
]
EPS = 1e-5


def _silu(v: np.ndarray) -> np.ndarray:
    return v / (1 + np.exp(-v))


def _rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    """``topi.nn.rms_norm`` (what ``relax.op.nn.rms_norm`` legalizes to) in NumPy: float32 throughout,
    one rounding to float16 at the end."""
    xf, k = x.astype(np.float32), x.shape[-1]
    scale = 1 / np.sqrt(np.sum(xf * xf, axis=-1, keepdims=True, dtype=np.float32) / np.float32(k) + np.float32(eps))
    return (scale * xf * gamma.astype(np.float32)).astype(np.float16)


def _gamma(rng, k: int) -> np.ndarray:
    """A norm weight with no zeros (a mix-up of x and gamma would show)."""
    return (rng.uniform(0.5, 1.5, k) * rng.choice([-1, 1], k)).astype(np.float16)


@pytest.mark.skipif(MODE == "llvm", reason="CUDA kernel (CPU linears run the CPU matmul schedule)")
@pytest.mark.parametrize("n_out, k, prologue, epilogue", SHAPES)
def test_decode_gemv(n_out, k, prologue, epilogue):
    rng = np.random.default_rng(n_out + k)
    x = rng.standard_normal((1, 2 * k if prologue == "swiglu" else k)).astype(np.float16)
    if prologue == "rmsnorm":
        x = (x * 7).astype(np.float16)  # the residual stream, not of unit scale
    w = (rng.standard_normal((n_out, k)) / np.sqrt(k)).astype(np.float16)
    y = tensor(np.full((1, n_out), np.nan, np.float16))
    xf = x.astype(np.float32)
    inp = (_silu(xf[:, :k]) * xf[:, k:]).astype(np.float16).astype(np.float32) if prologue == "swiglu" else xf
    if prologue == "rmsnorm":
        gamma = _gamma(rng, k)
        inp = _rms_norm(x, gamma, EPS).astype(np.float32)
    full = inp @ w.astype(np.float32).T
    kernel = build(gemv.make_decode_gemv, n_out, k, "float16", epilogue=epilogue, prologue=prologue)
    if prologue == "rmsnorm":
        kernel(tensor(x), tensor(gamma), tensor(w), y)
        expected = full
    elif epilogue == "residual":
        r = rng.standard_normal((1, n_out)).astype(np.float16)
        kernel(tensor(x), tensor(w), tensor(r), y)
        expected = full.astype(np.float16).astype(np.float32) + r.astype(np.float32)
    else:
        kernel(tensor(x), tensor(w), y)
        expected = full
    np.testing.assert_allclose(y.numpy().astype(np.float32), expected, rtol=1e-2, atol=2e-3 * np.abs(expected).max())


Q_SHAPES = [
    # N, K, prologue, epilogue: Llama-3-8B's four decode linears, then ragged ones
    (6144, 4096, "rmsnorm", "none"),      # fused QKV on the residual stream: 4 groups a lane
    (4096, 4096, "none", "residual"),     # o_proj + residual
    (28672, 4096, "rmsnorm", "none"),     # fused gate/up with the post-attention norm
    (4096, 14336, "swiglu", "residual"),  # down_proj: 14 groups a lane (2 loads of 8, the second ragged)
    (1003, 576, "none", "none"),          # SmolLM2's K: 18 groups, lanes 18..31 idle; N not a multiple of 8
    (577, 1536, "swiglu", "none"),        # SmolLM2's down K
    (2051, 96, "rmsnorm", "none"),        # K of 3 groups: most warps stage nothing
]


def quantized_model(inp: np.ndarray, qt) -> np.ndarray:
    """What the quantized GEMV computes, in float64: the input quantized to int8 per group of 32
    (``round(x · 127 / max|x|)``), then ``Σ_groups s_x (s_w Σ w_code · xq + m_w Σ xq)`` (4-bit:
    ``w_code`` the nibble minus the scheme's offset; ``m_w`` q4_1's min, else 0)."""
    x = inp.astype(np.float32).reshape(-1, 32)
    amax = np.abs(x).max(axis=1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.trunc(x * inv + np.copysign(np.float32(0.5), x))  # CUDA roundf: halves away from zero
    codes = unpack(qt.qweight, qt.scheme).reshape(qt.qweight.shape[0], -1, 32).astype(np.float64)
    group_dots = np.einsum("ngk,gk->ng", codes, xq.astype(np.float64))
    if qt.scheme.has_min:
        group_dots = group_dots + qt.min.astype(np.float64) / qt.scale.astype(np.float64) * xq.sum(axis=1)
    return (qt.scale.astype(np.float64) * (amax.T / 127) * group_dots).sum(axis=1)


@pytest.mark.skipif(MODE == "llvm", reason="CUDA kernel (CPU linears run the CPU matmul schedule)")
@pytest.mark.parametrize("n_out, k, prologue, epilogue", Q_SHAPES)
@pytest.mark.parametrize("quantization", ["q4f16", "q8f16", "q4_0", "q4_1"])
def test_decode_gemv_quantized(quantization, n_out, k, prologue, epilogue):
    """q4f16 / q8f16 / GGML Q4_0 / Q4_1 weights: equal to the kernel's arithmetic modelled in NumPy
    (``quantized_model``) to float32 rounding, and within 2 % of the largest output of the float
    GEMV on the dequantized weight."""
    rng = np.random.default_rng(n_out * 7 + k)
    x = rng.standard_normal((1, 2 * k if prologue == "swiglu" else k)).astype(np.float16)
    if prologue == "rmsnorm":
        x = (x * 7).astype(np.float16)
    qt = quantize((rng.standard_normal((n_out, k)) / np.sqrt(k)).astype(np.float32), SCHEMES[quantization])
    xf = x.astype(np.float32)
    inp = (_silu(xf[:, :k]) * xf[:, k:]).astype(np.float16) if prologue == "swiglu" else x
    args = [tensor(x)]
    if prologue == "rmsnorm":
        gamma = _gamma(rng, k)
        inp = _rms_norm(x, gamma, EPS)
        args.append(tensor(gamma))
    args += [tensor(a) for a in qt.arrays().values()]
    modelled = quantized_model(inp[0], qt)
    floats = inp.astype(np.float32) @ dequantize(qt).astype(np.float32).T
    if epilogue == "residual":
        r = rng.standard_normal((1, n_out)).astype(np.float16)
        args.append(tensor(r))
        modelled = modelled.astype(np.float16).astype(np.float64) + r[0]
        floats = floats.astype(np.float16).astype(np.float32) + r
    y = tensor(np.full((1, n_out), np.nan, np.float16))
    qs = SCHEMES[quantization]
    build(gemv.make_decode_gemv, n_out, k, "float16", epilogue=epilogue, prologue=prologue,
          bits=qs.bits, offset=qs.offset, has_min=qs.has_min)(*args, y)
    got = y.numpy()[0].astype(np.float64)
    np.testing.assert_allclose(got, modelled, rtol=2e-3, atol=2e-3 * np.abs(modelled).max())
    assert np.abs(got - floats[0]).max() <= 0.02 * np.abs(floats).max()


def tvm_rms_norm(k: int, eps: float, target):
    """TVM's own RMSNorm of x[1, k] float16 with gamma[k] -> [1, k] float16 — ``topi.nn.rms_norm``, the
    legalization of ``relax.op.nn.rms_norm`` (``nn.RMSNorm``) — scheduled as the model's pipeline
    schedules it (a kernel factory for ``build``)."""
    import tvm
    from tvm import te, topi

    from tsedge.compile.pipeline import schedule_passes

    x, gamma = te.placeholder((1, k), "float16", "x"), te.placeholder((k,), "float16", "gamma")
    func = te.create_prim_func([x, gamma, topi.nn.rms_norm(x, gamma, [-1], eps)])
    with target:
        return tvm.transform.Sequential(schedule_passes(target))(tvm.IRModule({"main": func}))["main"]


@pytest.mark.skipif(MODE == "llvm", reason="CUDA kernel (CPU linears run the CPU matmul schedule)")
@pytest.mark.parametrize("k, scale", [(768, 1e-3), (4096, 8.0)])  # 1e-3: eps is a third of the mean square
def test_rmsnorm_prologue_equals_tvm_rms_norm(k, scale):
    """An identity weight makes the GEMV's output its normalised input: it equals TVM's unfused
    rms_norm kernel on the same data within one float16 rounding (the sums of squares add in
    another order), and the NumPy model of that kernel too."""
    n_out, eps = k - 5, 1e-6  # N not a multiple of 8 rows
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((1, k)) * scale).astype(np.float16)
    gamma = _gamma(rng, k)
    fused, unfused = tensor(np.full((1, n_out), np.nan, np.float16)), tensor(np.full((1, k), np.nan, np.float16))
    build(gemv.make_decode_gemv, n_out, k, "float16", prologue="rmsnorm", eps=eps)(
        tensor(x), tensor(gamma), tensor(np.eye(n_out, k, dtype=np.float16)), fused)
    build(tvm_rms_norm, k, eps)(tensor(x), tensor(gamma), unfused)
    fused, unfused = fused.numpy()[0].astype(np.float32), unfused.numpy()[0, :n_out]
    model = _rms_norm(x, gamma, eps)[0, :n_out]
    for reference in (unfused, model):
        ulp = np.spacing(np.abs(reference)).astype(np.float32)
        assert np.all(np.abs(fused - reference.astype(np.float32)) <= ulp)
        assert np.mean(fused != reference.astype(np.float32)) < 0.01


def _kernel_calls(mod, function: str) -> list[str]:
    """The PrimFuncs ``function`` of a lowered Relax module calls, in order (also through the Relax
    functions it calls, such as captured CUDA graphs)."""
    from tvm import relax

    calls = []

    @relax.expr_functor.visitor
    class _Calls(relax.PyExprVisitor):
        def visit_global_var_(self, gv):
            if isinstance(mod[gv], relax.Function):
                self.visit_expr(mod[gv])
            else:
                calls.append(gv.name_hint)

    _Calls().visit_expr(mod[function])
    return calls


@pytest.mark.skipif(MODE != "llvm", reason="model compile checks run where the compiler is")
@pytest.mark.parametrize("gate_up_norm_gemv", [False, True])
def test_decode_step_norms_run_in_gemv_prologues(gate_up_norm_gemv, monkeypatch):
    """A 1-layer model compiled for CUDA (no GPU needed): decode launches no rms_norm before its QKV
    GEMV, which takes the residual stream and the input_layernorm weight; the post-attention norm
    stays a kernel unless ``GATE_UP_NORM_GEMV``; prefill still launches both norms."""
    import tvm

    from tsedge.compile.build import build_ir
    from tsedge.compile.pipeline import relax_pipeline
    from tsedge.compile.targets import parse_target
    from tsedge.models import llama
    from tsedge.models.config import ModelConfig, PolicyConfig

    monkeypatch.setattr(llama, "GATE_UP_NORM_GEMV", gate_up_norm_gemv)
    cfg = ModelConfig("one-layer", hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4,
                      num_kv_heads=2, vocab_size=256)
    target = parse_target("cuda:sm_90")
    mod, lowered = build_ir(cfg, PolicyConfig(), target, "float16")[0], {}

    @tvm.transform.module_pass(opt_level=0, name="KeepLowered")
    def keep_lowered(m, _ctx):
        lowered["mod"] = relax_pipeline(target)(m)
        return lowered["mod"]

    with target:
        executable = tvm.compile(mod, target=target, relax_pipeline=keep_lowered)
    decode, prefill = (_kernel_calls(lowered["mod"], f) for f in ("decode", "prefill"))
    qkv = decode.index(gemv.kernel_name(512, 256, "rmsnorm_none"))
    assert not any("rms_norm" in c for c in decode[:qkv])
    gate_up = gemv.kernel_name(1024, 256, "rmsnorm_none")
    assert (gate_up in decode) == gate_up_norm_gemv
    assert sum("rms_norm" in c for c in decode) == (1 if gate_up_norm_gemv else 2)  # (post-attention,) final
    assert any("rms_norm" in c for c in prefill[:prefill.index("prefill_matmul_512x256")])
    assert sum("rms_norm" in c for c in prefill) == 3 and not any(c.startswith("decode_gemv") for c in prefill)
    source = executable.mod.imports_[0].imports_[0].inspect_source()
    assert f"{gemv.kernel_name(512, 256, 'rmsnorm_none')}_kernel" in source and "rsqrtf" in source


@pytest.mark.skipif(MODE != "llvm", reason="codegen and target checks run where the compiler is")
def test_decode_gemv_codegen_and_support():
    source = cuda_source(gemv.make_decode_gemv(4096, 14336, "float16", CUDA, "residual", "swiglu"))
    assert "uint4" in source and "__shfl" in source  # 16-byte loads, warp sums
    assert gemv.supported(4096, 14336, "float16", CUDA)
    assert not gemv.supported(4096, 576, "float16", CUDA)  # K not a multiple of 256
    assert not gemv.supported(4096, 4096, "float32", CUDA)
    with pytest.raises(ValueError, match="use none, swiglu or rmsnorm / none or residual"):
        gemv.make_decode_gemv(4096, 4096, "float16", CUDA, "swiglu")
    with pytest.raises(ValueError, match=r"\(rmsnorm with none\)"):
        gemv.make_decode_gemv(4096, 4096, "float16", CUDA, "residual", "rmsnorm")


@pytest.mark.skipif(MODE != "llvm", reason="codegen checks run where the compiler is")
def test_decode_gemv_q4_codegen_and_support():
    """q4: 16-byte loads of packed nibbles (a group of 32 weights a lane), 8 ``__dp4a`` a group (the
    loop over groups unrolled), the scale as an argument; K a whole number of groups."""
    source = cuda_source(gemv.make_decode_gemv(6144, 4096, "float16", CUDA, "none", "rmsnorm", bits=4))
    kernel = source[source.index("decode_gemv_q4_rmsnorm_none_6144x4096_kernel("):]
    assert "uint4" in kernel and kernel.count("__dp4a") == 8 * 4 and "ws" in kernel  # K 4096: 4 groups a lane
    assert gemv.supported(4096, 576, "float16", CUDA, bits=4) and not gemv.supported(4096, 600, "float16", CUDA, bits=4)
    with pytest.raises(ValueError, match="K % 32 == 0"):
        gemv.make_decode_gemv(4096, 600, "float16", CUDA, bits=4)
    q8 = cuda_source(gemv.make_decode_gemv(4096, 4096, "float16", CUDA, "residual", "swiglu", bits=8))
    kernel = q8[q8.index("decode_gemv_q8_swiglu_residual_4096x4096_kernel("):]
    assert kernel.count("__dp4a(") == 4 * 8 and "int4" in kernel  # 8 pieces (half a group each) a lane
    q41 = cuda_source(gemv.make_decode_gemv(4096, 4096, "float16", CUDA, bits=4, offset=0, has_min=True))
    kernel = q41[q41.index("decode_gemv_q4o0m_none_none_4096x4096_kernel("):]
    assert kernel.count("__dp4a") == 8 * 4 and "wm" in kernel  # Q4_1: the min an argument of its own
    assert not gemv.supported(4096, 4096, "float16", CUDA, bits=8, has_min=True)


@pytest.mark.skipif(MODE != "llvm", reason="codegen checks run where the compiler is")
def test_decode_gemv_rmsnorm_codegen():
    """The RMSNorm prologue: x read once with 16-byte loads into registers, its sum of squares over
    the block (warp shuffles, then one shared float a warp), ``rsqrtf`` as TVM's rms_norm lowers,
    two barriers (the warps' sums, the staged input); eps and K as float32 constants."""
    source = cuda_source(gemv.make_decode_gemv(6144, 4096, "float16", CUDA, "none", "rmsnorm", eps=1e-6))
    kernel = source[source.index("decode_gemv_rmsnorm_none_6144x4096_kernel(half* __restrict__ gamma"):]
    assert kernel.count("__syncthreads()") == 2 and kernel.count("__shfl_sync") == 10  # 5 for the norm, 5 the dot
    assert "rsqrtf(" in kernel and "red_ptr[8]" in kernel and "xr_ptr[16]" in kernel
    assert "/ 0x1p+12f" in kernel  # divided by K = 4096 in float32, as topi.nn.rms_norm does
