"""Builds kernels for the kernel tests, on the CPU here or on a GPU through prebuilt libraries.

``TSEDGE_KERNEL_MODE``:
- unset / ``llvm``: compile for this CPU and run (CI);
- ``cuda-build``: compile every kernel a test asks for into ``TSEDGE_KERNEL_DIR`` as a CUDA
  library with an embedded fatbin and hand the test a no-op (its checks then fail: only the
  libraries matter; run here, before a device run);
- ``cuda-run``: load those libraries and run the same tests, with the same references, on GPU 0
  (``bench/device/run.sh`` does this on the lent H100; needs only the TVM runtime).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import re
import sys
from pathlib import Path

import tvm

MODE = os.environ.get("TSEDGE_KERNEL_MODE", "llvm")
LIB_DIR = Path(os.environ.get("TSEDGE_KERNEL_DIR", "build/kernels"))
if MODE == "cuda-run":  # runtime-only TVM: no targets, no compiler, no TVMScript
    import types

    import torch  # noqa: F401  (loads libcudart for TVM's CUDA runtime)

    class _NoScript(types.ModuleType):
        """Stands in for ``tvm.script.tirx`` so kernel modules import (factories are never called:
        their libraries were built beforehand)."""

        def __getattr__(self, name):
            return lambda *args, **kwargs: args[0] if args and callable(args[0]) else None

    sys.modules["tvm.script"] = types.ModuleType("tvm.script")
    sys.modules["tvm.script"].tirx = sys.modules["tvm.script.tirx"] = _NoScript("tvm.script.tirx")

    from tsedge.engine import load_cuda_runtime

    load_cuda_runtime()
    DEV = tvm.cuda(0)
    LLVM = CUDA = None
else:
    DEV = tvm.cpu(0)
    LLVM = tvm.target.Target("llvm")
    from tsedge.compile.targets import cuda_target

    CUDA = cuda_target("sm_90a")  # what `cuda` resolves to on the H200 (wgmma kernels need the "a")


@functools.lru_cache(maxsize=None)
def build(factory, *args, cuda_arch: str | None = None, **options):
    """The ``main`` function of ``factory(*args, target, **options)`` for the current mode
    (``cuda_arch``: a CUDA arch other than ``CUDA``'s, e.g. ``sm_90`` for a pre-Hopper schedule)."""
    if MODE == "llvm":
        return tvm.compile(tvm.IRModule({"main": factory(*args, LLVM, **options)}), target=LLVM)["main"]
    source = _sources(factory.__module__)  # a changed kernel, or a kernel module it imports, rebuilds
    keyed = {**options, "cuda_arch": cuda_arch} if cuda_arch is not None else options  # the arch keys it too
    named = sorted((k, f"{v.__module__}.{v.__qualname__}" if callable(v) else v) for k, v in keyed.items())
    key = hashlib.sha1(repr((factory.__name__, args, named)).encode() + source).hexdigest()[:12]  # no addresses
    path = LIB_DIR / f"{factory.__name__}-{key}.so"
    if MODE == "cuda-build":
        if not path.exists():
            from tsedge.compile.cuda_fatbin import fatbin_build_context

            LIB_DIR.mkdir(parents=True, exist_ok=True)
            target = CUDA if cuda_arch is None else cuda_target(cuda_arch)
            with fatbin_build_context(target):
                lib = tvm.compile(tvm.IRModule({"main": factory(*args, target, **options)}), target=target)
            lib.export_library(str(path))
        return lambda *args: None
    if MODE != "cuda-run":
        raise ValueError(f"TSEDGE_KERNEL_MODE={MODE!r}: use llvm, cuda-build or cuda-run")
    return tvm.runtime.load_module(str(path))["main"]


def _sources(module: str, seen: set | None = None) -> bytes:
    """The source of ``module`` and of the package modules it imports relatively (``from .x import``,
    ``from . import x, y``), each once."""
    seen = set() if seen is None else seen
    seen.add(module)
    text = Path(importlib.import_module(module).__file__).read_bytes()
    package = module.rsplit(".", 1)[0]
    names = re.findall(rb"from \.(\w+) import", text)
    for group in re.findall(rb"from \. import ([\w, ]+)", text):
        names += [n.strip() for n in group.split(b",")]
    out = text
    for name in sorted(set(names)):
        dep = f"{package}.{name.decode()}"
        if dep not in seen:
            out += _sources(dep, seen)
    return out


def tensor(array) -> tvm.runtime.Tensor:
    return tvm.runtime.tensor(array, DEV)


def cuda_source(func) -> str:
    """CUDA source of ``func`` compiled as the library build does (fatbin for ``CUDA``'s arch with
    nvcc), whatever earlier tests registered as TVM's CUDA compile callback."""
    from tsedge.compile.cuda_fatbin import fatbin_build_context

    with fatbin_build_context(CUDA):
        lib = tvm.compile(tvm.IRModule({"main": func}), target=CUDA)
    return lib.mod.imports_[0].inspect_source()
