"""Make CUDA libraries embed a precompiled fatbin, also on a build machine without a GPU driver.

TVM stores compiled device code (instead of CUDA source that needs a compiler at load time) only
when its CUDA runtime library can be loaded during the build. That library links the driver
(``libcuda.so.1``); where none is installed, a build-time-only stub that exports the symbols it
links (each returning an error) is loaded first. The stub is never shipped with a library.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tvm.target import Target

from tsedge.engine import load_cuda_runtime

_STUB_SYMBOLS = ("cuGetErrorName", "cuGetErrorString", "cuDeviceGetName", "cuFuncSetAttribute",
                 "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload",
                 "cuTensorMapEncodeTiled", "cuLaunchKernel", "cuModuleGetGlobal_v2", "cuInit")


def _stub_path() -> Path:
    cache = Path(os.environ.get("TSEDGE_CACHE", Path.home() / ".cache" / "tsedge"))
    return cache / "stub" / "libcuda.so.1"


def _build_stub(path: Path) -> None:
    source = "\n".join(f"int {name}(void) {{ return 999; }}" for name in _STUB_SYMBOLS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".c", delete=False) as src:
        src.write(source + "\n")
    try:
        subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(path), src.name],
                       check=True, capture_output=True)
    finally:
        os.unlink(src.name)


def _load_cuda_runtime_with_driver() -> None:
    """Load TVM's CUDA runtime (with a stub driver where no real one exists)."""
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        stub = _stub_path()
        if not stub.exists():
            _build_stub(stub)
        ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
    load_cuda_runtime()


@contextlib.contextmanager
def fatbin_build_context(target: Target) -> Iterator[None]:
    """Inside it, ``tvm.compile`` for a CUDA target emits a fatbin for the target's arch."""
    if target.kind.name != "cuda":
        yield
        return
    _load_cuda_runtime_with_driver()
    old = os.environ.get("TVM_CUDA_COMPILE_MODE")
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    try:
        with target:
            yield
    finally:
        if old is None:
            del os.environ["TVM_CUDA_COMPILE_MODE"]
        else:
            os.environ["TVM_CUDA_COMPILE_MODE"] = old
