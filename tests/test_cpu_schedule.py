"""The CPU matmul schedule (``compile/cpu_schedule.py``): a prefill chunk's linear (float or
fused dequantize, with the residual add as its epilogue) over a symbolic row count, run at ragged
row counts against NumPy, and scheduled as padded register tiles (no per-row predicate)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.relax.frontend import nn

from tsedge.compile.pipeline import relax_pipeline
from tsedge.compile.targets import parse_target
from tsedge.models.linear import make_linear
from tsedge.models.quantization import SCHEMES, dequantize, library_arrays, quantize


class _Residual(nn.Module):
    def __init__(self, qs, k, n):
        self.lin = make_linear(qs, k, n, False, "float32", True, None)

    def forward(self, x, residual):
        return self.lin(x, residual)


@pytest.fixture(scope="module", params=[None, "q4_1"], ids=["float32", "q4_1"])
def compiled(request):
    qs = SCHEMES[request.param] if request.param else None
    k, n = 96, 192
    spec = {"forward": {"x": nn.spec.Tensor(["n", k], "float32"), "residual": nn.spec.Tensor(["n", n], "float32"),
                        "$": {"param_mode": "packed", "effect_mode": "none"}}}
    mod, _ = _Residual(qs, k, n).export_tvm(spec=spec)
    target = parse_target("llvm")
    lowered = []

    @tvm.transform.module_pass(opt_level=0)
    def keep(m, _ctx):
        lowered.append(m)
        return m

    ex = tvm.compile(mod, target=target, relax_pipeline=tvm.transform.Sequential([relax_pipeline(target), keep]))
    return qs, k, n, ex, lowered[0]


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 64])
def test_matmul_matches_numpy_at_ragged_rows(compiled, rows):
    qs, k, n, ex, _ = compiled
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if qs is None:
        params, w_ref = [w.T.copy()], w
    else:
        qt = quantize(w, qs)
        params, w_ref = list(library_arrays(qt, True).values()), dequantize(qt)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    residual = rng.standard_normal((rows, n)).astype(np.float32)
    vm = tvm.runtime.vm.VirtualMachine(ex, tvm.cpu())
    y = vm["forward"](tvm.runtime.tensor(x), tvm.runtime.tensor(residual),
                      [tvm.runtime.tensor(p) for p in params]).numpy()
    expected = x.astype(np.float64) @ w_ref.astype(np.float64).T + residual
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4 * np.abs(expected).max())


def test_matmul_runs_in_padded_register_tiles(compiled):
    """The matmul's accumulators are a local buffer over rows padded to the tile, and no
    predicate guards the update inside the reduction."""
    *_, lowered = compiled
    (script,) = [f.script() for gv, f in lowered.functions.items()
                 if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint]
    assert "_pad_local" in script and 'scope="local"' in script, script
    update = script[script.index('T.sblock("matmul_update")'):]
    update = update[:update.index("\n", update.index("_pad_local[v0, v1] = "))]  # up to its statement
    assert "T.where" not in update, update


def test_vectorizable_exp2_and_silu_match_numpy():
    """``exp2_vectorizable`` (clamped to [-126, 127]) and the CPU pipeline's SiLU against NumPy
    in float64, over random values of both signs and large magnitudes."""
    from tvm import relax

    from tsedge.tir_kernels.common import exp2_vectorizable

    rng = np.random.default_rng(7)
    x = np.concatenate([rng.uniform(-130, 130, 4000), rng.standard_normal(4000) * 4]).astype(np.float32)
    target = parse_target("llvm")
    t = tvm.te.placeholder((x.size,), "float32", name="x")
    exp2 = tvm.te.compute(t.shape, lambda i: exp2_vectorizable(t[i]), name="exp2")
    f = tvm.compile(tvm.te.create_prim_func([t, exp2]), target=target)
    out = tvm.runtime.tensor(np.zeros_like(x))
    f(tvm.runtime.tensor(x), out)
    expected = np.exp2(np.clip(x.astype(np.float64), -126, 127))
    np.testing.assert_allclose(out.numpy(), expected, rtol=3e-7)

    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType([x.size], "float32"))
    with bb.function("main", [xv]):
        bb.emit_func_output(bb.emit(relax.op.nn.silu(xv)))
    ex = tvm.compile(bb.get(), target=target, relax_pipeline=relax_pipeline(target))
    y = tvm.runtime.vm.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    x64 = x.astype(np.float64)
    # -x log2(e) rounds to float32: relative error up to |x| 2^-24 (5e-6 at x = -86, where silu ~ 1e-35)
    np.testing.assert_allclose(y, x64 / (1 + np.exp(-x64)), rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(y[np.abs(x) < 16], (x64 / (1 + np.exp(-x64)))[np.abs(x) < 16], rtol=1e-6, atol=1e-7)
