"""Target names accepted by ``tsedge compile --target``."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tvm.target import Target

TARGET_HELP = ("llvm (this CPU), cuda (local GPU's arch, else sm_90a), cuda:sm_XX or vulkan (WGSL through "
               "wgpu-native; pip install tsedge[vulkan])")


def _local_cuda_arch() -> str | None:
    """``sm_XY`` of GPU 0 when a CUDA driver and GPU are visible, else None. Hopper (9.0) gets
    ``sm_90a``, the arch-specific target whose ``wgmma`` the prefill matmul uses (its code runs on
    sm_90 GPUs only, which is what the library is being built for)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return None
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, 0)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, 0)
    arch = f"sm_{major.value}{minor.value}"
    return "sm_90a" if arch == "sm_90" else arch


# The limits TVM's schedules plan for, the same on every arch from sm_70 (CUDA Programming Guide,
# "Compute Capabilities" table). ``max_shared_memory_per_block`` is the *static* per-block limit
# that TVM's ``shared`` buffers face (ptxas rejects more; it is what cudaDevAttrMaxSharedMemoryPerBlock
# reports and what TVM's own nvidia/* target tags carry); the larger opt-in limit (227 KB on sm_90)
# applies only to dynamic shared memory, which a kernel must request itself.
_CUDA_LIMITS = {"max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
                "max_num_threads": 1024, "thread_warp_size": 32, "registers_per_block": 65536}
CUDA_ARCHS = ("sm_70", "sm_72", "sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_90a",
              "sm_100", "sm_100a", "sm_120", "sm_120a")


def cuda_target(arch: str) -> Target:
    """CUDA target for ``arch`` (e.g. ``sm_90``) carrying the device limits its schedules plan for.

    Raises ValueError for an arch not in ``CUDA_ARCHS``.
    """
    if arch not in CUDA_ARCHS:
        raise ValueError(f"bad CUDA arch {arch!r}: use one of {', '.join(CUDA_ARCHS)}")
    from tvm.target import Target

    return Target({"kind": "cuda", "arch": arch, **_CUDA_LIMITS})


# What every Vulkan adapter wgpu-native exposes offers at least (Mesa llvmpipe: 32 KB of workgroup
# memory, 1024 invocations; NVIDIA: 48 KB): kernels plan for these so one library runs on both.
_VULKAN_LIMITS = {"max_num_threads": 256, "max_shared_memory_per_block": 32768, "thread_warp_size": 1}


def vulkan_target() -> Target:
    """``--target vulkan``: TVM's webgpu codegen (WGSL, run on Vulkan by wgpu-native through
    ``tsedge.vulkan``) with an LLVM host for the Relax VM code."""
    from tvm.target import Target

    return Target({"kind": "webgpu", **_VULKAN_LIMITS, "host": {"kind": "llvm"}})


def has_cuda_gpu() -> bool:
    return _local_cuda_arch() is not None


def default_target_name() -> str:
    """``cuda`` when a CUDA GPU is visible, else ``llvm``."""
    return "cuda" if has_cuda_gpu() else "llvm"


def canonical_target_name(name: str) -> str:
    """A CLI target name as metadata and cache keys spell it (``cuda`` gets the local GPU's arch,
    else sm_90a), without building a TVM Target: a runtime-only TVM (no compiler) can resolve it.
    Raises ValueError with the accepted forms."""
    kind, _, arch = name.partition(":")
    if kind in ("llvm", "vulkan") and not arch:
        return kind
    if kind == "cuda":
        arch = arch or _local_cuda_arch() or "sm_90a"
        if arch not in CUDA_ARCHS:
            raise ValueError(f"bad CUDA arch {arch!r}: use one of {', '.join(CUDA_ARCHS)}")
        return f"cuda:{arch}"
    raise ValueError(f"unknown target {name!r}; use {TARGET_HELP}")


def parse_target(name: str) -> Target:
    """Turn a CLI target name into a TVM Target; raises ValueError with the accepted forms."""
    from tvm.target import Target

    kind, _, arch = canonical_target_name(name).partition(":")
    if kind == "llvm":
        return Target({"kind": "llvm", "mcpu": _host_cpu()})
    if kind == "cuda":
        return cuda_target(arch)
    return vulkan_target()


def target_name(target: Target) -> str:
    """Inverse of ``parse_target`` for metadata and cache keys."""
    if target.kind.name == "cuda":
        return f"cuda:{target.attrs['arch']}"
    if target.kind.name == "webgpu":
        return "vulkan"
    return target.kind.name


def resolve_dtype(dtype: str, target: Target | str) -> str:
    """``auto``: float16 on GPUs, float32 on CPUs (no fast fp16 arithmetic there); ``target`` a
    Target or a canonical target name."""
    if dtype == "auto":
        kind = target.split(":")[0] if isinstance(target, str) else target.kind.name
        return "float32" if kind == "llvm" else "float16"
    if dtype not in ("float16", "float32"):
        raise ValueError(f"unsupported dtype {dtype!r}: use float16, float32 or auto")
    return dtype


def kv_cache_dtype(dtype: str, target: Target, quantization: str) -> str:
    """The KV cache's element type: float16 for a CPU library of quantized weights (half the
    bytes a decode step reads from the cache, as llama.cpp's default F16 cache; the kernels
    compute in float32 from it), else the library's ``dtype`` (float32 CPU libraries of float
    weights keep an exact cache: they are the reference the other builds are checked against)."""
    return "float16" if target.kind.name == "llvm" and quantization != "q0" else dtype


def _host_cpu() -> str:
    import tvm

    return tvm.get_global_func("target.llvm_get_system_cpu")()
