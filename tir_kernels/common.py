"""Conventions shared by every kernel in ``tsedge.tir_kernels``.

Layouts (batch size 1, one sequence):
- KV cache: ``kv[num_layers, 2, n_kv_heads, capacity, head_dim]`` in the model dtype; ``kv[l, 0]``
  holds keys **without** RoPE, ``kv[l, 1]`` values. Kernels take the layer index as an int64
  scalar parameter, so one PrimFunc serves every layer.
- RoPE table: ``rope[positions, head_dim]`` float32, ``rope[p, i] = cos(p * inv_freq[i])`` and
  ``rope[p, half + i] = sin(p * inv_freq[i])`` for ``i < half = head_dim // 2`` (rotate-half
  convention of Hugging Face Llama): ``y[i] = x[i] cos - x[i + half] sin``,
  ``y[i + half] = x[i + half] cos + x[i] sin``.
- Queries: ``q[n, n_heads, head_dim]`` before RoPE. Query head ``h`` reads KV head ``h // group``.

Every factory is ``make_<kernel>(<static shapes>, dtype, target) -> PrimFunc`` and returns a
PrimFunc already scheduled for ``target`` (marked ``tirx.is_scheduled``) with int64 buffer dims
and ``op_pattern`` 8 (opaque) so Relax fusion leaves it alone.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

GPU_KINDS = ("cuda", "rocm", "metal", "vulkan", "webgpu", "opencl")


def is_gpu(target: Target) -> bool:
    """True for targets whose kernels bind loops to GPU threads."""
    return target.kind.name in GPU_KINDS


def has_warp_shuffle(target: Target) -> bool:
    """True for GPU targets whose kernels may use 32-lane warp shuffles (CUDA, ROCm); the Vulkan
    target (``webgpu`` kind: WGSL, warp size 1, no subgroups) takes the kernels that reduce
    through workgroup memory instead."""
    return is_gpu(target) and int(target.attrs.get("thread_warp_size", 1)) >= 32


def emits_wgsl(target: Target) -> bool:
    """True for the Vulkan target (TVM's ``webgpu`` kind): WGSL has no atomics in TVM's codegen,
    no 64-bit integers and vectors of at most 4 lanes."""
    return target.kind.name == "webgpu"


def has_mma_sync(target: Target) -> bool:
    """True for CUDA targets of sm_80 or newer (``mma.sync.m16n8k16`` with float16, ``ldmatrix``,
    ``cp.async``)."""
    return target.kind.name == "cuda" and _cuda_arch(target) >= 80


def mma_m16n8k16(a, a_off, b, b_off, c, c_off):
    """``c[c_off:] += a[a_off:] @ b[b_off:]`` on tensor cores: one ``mma.sync.m16n8k16`` (row-major
    A, column-major B, float16 operands, float32 accumulators) on a warp's fragments (local
    buffers; offsets in elements), inside TIR."""
    return T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                       a.data, a_off, b.data, b_off, c.data, c_off, False, dtype="float32"))


def _cuda_arch(target: Target) -> int:
    arch = str(target.attrs.get("arch", "sm_0"))
    return int("".join(ch for ch in arch if ch.isdigit()) or 0)


def max_shared_memory(target: Target) -> int:
    """Bytes of (dynamic) shared memory one block may use: 227 KB on sm_90, 163 KB on sm_80/87,
    99 KB on other sm_80+ GPUs (sm_86/89), else the 48 KB every GPU target gives."""
    arch = _cuda_arch(target) if target.kind.name == "cuda" else 0
    return {90: 227, 80: 163, 87: 163}.get(arch, 99 if arch >= 80 else 48) * 1024


def max_threads_per_block(target: Target) -> int:
    """The target's thread limit per block (1 on CPUs)."""
    if not is_gpu(target):
        return 1
    return int(target.attrs.get("max_num_threads", 256))


def i64(value: int) -> tirx.IntImm:
    """A static int64 dimension (Relax FuseTIR needs int64 buffer dims)."""
    return tirx.IntImm("int64", value)


def device_count(count: tirx.Buffer, limit: int) -> tirx.PrimExpr:
    """``min(count[0], limit)`` as int64: a count held in a device tensor ``count[1]`` int32
    (e.g. Recycled Attention's active K), never past ``limit`` (the static size it indexes)."""
    return T.min(T.Cast("int64", count[0]), i64(limit))


# 2^f on [0, 1): a degree-6 polynomial fitted for relative error (2.3e-8 in float64 arithmetic;
# exp2f's accuracy in float32), coefficients from the constant term up
_EXP2_POLY = (1.0, 0.6931468844413757, 0.24023030698299408, 0.05548214912414551,
              0.009679985232651234, 0.0012437946861609817, 0.0002168343198718503)


def exp2_vectorizable(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``2^x`` for a float32 expression ``x``, clamped to [-126, 127] (never subnormal, never
    inf), from element-wise operations LLVM vectorises (floor, a polynomial, the exponent bits
    set by an integer shift), where ``T.exp2`` is a call to the C library per element."""
    x = T.min(T.max(x, T.float32(-126)), T.float32(127))
    whole = T.floor(x)
    frac = x - whole
    poly = T.float32(_EXP2_POLY[-1])
    for c in reversed(_EXP2_POLY[:-1]):
        poly = poly * frac + T.float32(c)
    return T.reinterpret("float32", T.shift_left(T.Cast("int32", whole) + 127, 23)) * poly
