"""The Vulkan runtime backend: a ``webgpu`` device for the TVM runtime on wgpu-native.

``--target vulkan`` libraries hold WGSL kernels (TVM's webgpu codegen). ``load()`` builds
``webgpu_backend.cc`` with g++ on first use (into ``~/.cache/tsedge/vulkan``, keyed by the source,
TVM and wgpu versions), loads it, and so registers ``device_api.webgpu`` and
``ffi.Module.load_from_bytes.webgpu`` with the TVM runtime; then ``tvm.runtime.load_module`` reads
such a library and ``device()`` is where it runs. Needs the ``wgpu`` wheel (``pip install
tsedge[vulkan]``: wgpu-native and its C headers), a C++ compiler and a Vulkan driver.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import tvm

__all__ = ["VulkanError", "describe", "device", "dispatch_counts", "kv_context_limit", "load", "shader_f16"]

# The storage binding size every WebGPU adapter offers (wgpu-native on llvmpipe offers no more):
# the KV cache is one tensor, bound whole by each attention kernel
BINDING_BYTES = 128 << 20

_SOURCE = Path(__file__).with_name("webgpu_backend.cc")
_loaded: Path | None = None


class VulkanError(RuntimeError):
    """The Vulkan backend cannot run here (no wgpu, no C++ compiler, no driver); one line with the fix."""


def wgpu_resources() -> Path:
    """The wgpu package's folder of ``webgpu.h`` and ``libwgpu_native``; raises VulkanError (one line
    naming the fix) where wgpu is missing or incomplete. Cheap: run commands check it before compiling."""
    try:
        import wgpu
    except ImportError:
        raise VulkanError("the Vulkan target needs wgpu-native: pip install 'tsedge[vulkan]' (or pip install wgpu)") from None
    res = Path(wgpu.__file__).parent / "resources"
    if not (res / "webgpu.h").exists() or not list(res.glob("libwgpu_native*.so")):
        raise VulkanError(f"the wgpu package at {res.parent} lacks webgpu.h or libwgpu_native: reinstall it, "
                          "pip install --force-reinstall wgpu")
    return res


def _cache_dir() -> Path:
    root = os.environ.get("TSEDGE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                          os.path.expanduser("~/.cache"), "tsedge")
    return Path(root) / "vulkan"


def _build(out: Path, res: Path) -> None:
    """g++ ``webgpu_backend.cc`` into ``out`` against the tvm/tvm_ffi wheels and wgpu-native."""
    import tvm_ffi

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise VulkanError("building the Vulkan backend needs a C++ compiler: apt install g++ (or set CXX)")
    tvm_dir, ffi_dir = Path(tvm.__file__).parent, Path(tvm_ffi.__file__).parent
    native = sorted(res.glob("libwgpu_native*.so"))[0]
    tvm_lib = tvm_dir / "lib"
    cmd = [compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-o", "", str(_SOURCE),
           f"-I{tvm_dir / 'include'}", f"-I{ffi_dir / 'include'}", f"-I{res}",
           f"-I{ffi_dir / '3rdparty' / 'dlpack' / 'include'}",
           str(native), f"-L{tvm_lib}", f"-L{ffi_dir / 'lib'}", "-ltvm_runtime", "-ltvm_ffi",
           f"-Wl,-rpath,{res}", f"-Wl,-rpath,{tvm_lib}", f"-Wl,-rpath,{ffi_dir / 'lib'}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        cmd[6] = str(Path(tmp) / out.name)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log = out.with_suffix(".log")
            log.write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
            first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr[:200])
            raise VulkanError(f"building the Vulkan backend with {compiler} failed ({first.strip()}; log: {log}); "
                              "it needs a C++17 compiler (apt install g++) and the wgpu wheel's headers")
        os.replace(cmd[6], out)


def load() -> Path:
    """Build (first use) and load the backend; returns the shared library's path.

    Raises VulkanError (one line naming the fix) when wgpu, a C++ compiler or a Vulkan driver is
    missing. Loading twice is a no-op."""
    global _loaded
    if _loaded is not None:
        return _loaded
    res = wgpu_resources()
    import wgpu

    key = hashlib.sha256(_SOURCE.read_bytes() + f"{tvm.__version__} {wgpu.__version__}".encode()).hexdigest()[:16]
    path = _cache_dir() / f"webgpu_backend-{key}.so"
    if not path.exists():
        _build(path, res)
    if "XDG_RUNTIME_DIR" not in os.environ:  # headless: Mesa's Wayland probe prints an "error" without it
        runtime = _cache_dir() / "runtime"
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    _loaded = path
    describe()  # fails here, in one line, when there is no Vulkan device
    return path


def kv_context_limit(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """The largest ``max_context`` (a multiple of 256 tokens) whose KV cache
    ``[num_layers, 2, num_kv_heads, max_context, head_dim]`` fits one storage binding."""
    per_token = num_layers * 2 * num_kv_heads * head_dim * dtype_bytes
    return BINDING_BYTES // per_token // 256 * 256


def describe() -> str:
    """The Vulkan adapter the backend runs on, e.g. ``llvmpipe (LLVM 15.0.6, 256 bits) (Mesa 22.3.6)``.

    Raises VulkanError naming the driver to install when wgpu finds no Vulkan adapter."""
    if _loaded is None:
        load()
    try:
        return tvm.get_global_func("tsedge.vulkan.describe")()
    except Exception as e:  # the backend's message already names the fix
        raise VulkanError(str(e).strip().splitlines()[-1]) from None


def shader_f16() -> bool:
    """Whether the adapter offers WGSL ``f16`` (float16 kernels need it)."""
    load()
    return bool(tvm.get_global_func("tsedge.vulkan.shader_f16")())


def device() -> tvm.runtime.Device:
    """``tvm.webgpu(0)`` with the backend loaded (the device a vulkan library runs on)."""
    load()
    return tvm.runtime.device("webgpu", 0)


def dispatch_counts() -> dict[str, tuple[int, float]]:
    """``{kernel: (dispatches so far, seconds)}`` over the vulkan libraries loaded in this process.

    Seconds are measured only with ``TSEDGE_VULKAN_PROFILE=1`` set before ``load()``: each
    dispatch then runs alone (submitted and waited for), so the sum is the kernels' time plus one
    submit-and-wait each; without it they are 0."""
    load()
    counts = tvm.get_global_func("tsedge.vulkan.dispatch_counts")()
    return {k: (int(v[0]), float(v[1])) for k, v in counts.items()}
