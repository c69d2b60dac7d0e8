"""Target names accepted by ``tsedge compile --target``."""

from __future__ import annotations

import ctypes

from tvm.target import Target

TARGET_HELP = "llvm (this CPU), cuda (local GPU's arch, else sm_90) or cuda:sm_XX"


def _local_cuda_arch() -> str | None:
    """``sm_XY`` of GPU 0 when a CUDA driver and GPU are visible, else None."""
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
    return f"sm_{major.value}{minor.value}"


def has_cuda_gpu() -> bool:
    return _local_cuda_arch() is not None


def default_target_name() -> str:
    """``cuda`` when a CUDA GPU is visible, else ``llvm``."""
    return "cuda" if has_cuda_gpu() else "llvm"


def parse_target(name: str) -> Target:
    """Turn a CLI target name into a TVM Target; raises ValueError with the accepted forms."""
    kind, _, arch = name.partition(":")
    if kind == "llvm" and not arch:
        return Target({"kind": "llvm", "mcpu": _host_cpu()})
    if kind == "cuda":
        arch = arch or _local_cuda_arch() or "sm_90"
        if not (arch.startswith("sm_") and arch[3:].rstrip("a").isdigit()):
            raise ValueError(f"bad CUDA arch {arch!r}: expected e.g. cuda:sm_80 or cuda:sm_90")
        return Target({"kind": "cuda", "arch": arch})
    raise ValueError(f"unknown target {name!r}; use {TARGET_HELP}")


def target_name(target: Target) -> str:
    """Inverse of ``parse_target`` for metadata and cache keys."""
    if target.kind.name == "cuda":
        return f"cuda:{target.attrs['arch']}"
    return target.kind.name


def _host_cpu() -> str:
    import tvm

    return tvm.get_global_func("target.llvm_get_system_cpu")()
