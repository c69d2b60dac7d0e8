"""Compile-on-first-use: model libraries cached by a hash of everything that shapes them."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import tsedge
from tsedge.fetch import cache_dir
from tsedge.models.config import ModelConfig, PolicyConfig
from tsedge.models.quantization import short_name
from tsedge.progress import stage_progress


def _source_digest() -> str:
    """Hash of the compiler-side sources, so a changed kernel never reuses a stale library."""
    import tsedge.compile
    import tsedge.models
    import tsedge.tir_kernels

    digest = hashlib.sha256()
    for package in (tsedge.models, tsedge.tir_kernels, tsedge.compile):
        for path in sorted(Path(package.__file__).parent.rglob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def library_path(cfg: ModelConfig, policy: PolicyConfig, target: str, dtype: str, max_context: int,
                 quantization: str = "q0", tensor_parallel: int = 1) -> Path:
    """Where the library for these inputs lives in the cache."""
    key = json.dumps({"model": cfg.to_dict(), "policy": policy.to_dict(), "target": target,
                      "dtype": dtype, "max_context": max_context, "version": tsedge.__version__,
                      "sources": _source_digest(), "quantization": quantization,
                      "tensor_parallel": tensor_parallel}, sort_keys=True)
    name = (f"{library_stem(cfg, policy, quantization, tensor_parallel)}-{target.replace(':', '_')}-"
            f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.so")
    return cache_dir() / "libs" / name


def library_stem(cfg: ModelConfig, policy: PolicyConfig, quantization: str, tensor_parallel: int) -> str:
    """A library's file name before its target: model, policy, quantization, shards."""
    quant = "" if quantization == "q0" else f"-{short_name(quantization)}"
    shards = "" if tensor_parallel == 1 else f"-tp{tensor_parallel}"
    return f"{cfg.name}-{policy.name}{quant}{shards}"


def ensure_library(cfg: ModelConfig, policy: PolicyConfig, target: str, dtype: str, max_context: int,
                   log=print, quantization: str = "q0", tensor_parallel: int = 1, runtime_only: bool = False) -> Path:
    """The cached library for these inputs, compiled now if missing. ``runtime_only``: when it is
    cached and TVM is not imported yet, TVM is then imported without its compiler library
    (``TVM_USE_RUNTIME_LIB``; ~110 MB less resident memory) — for a process that opens no other library."""
    from tsedge.compile.targets import canonical_target_name, resolve_dtype

    # no Target, no Relax until a compile: a runtime-only TVM (a GPU machine) finds cached libraries
    name = canonical_target_name(target)
    dtype = resolve_dtype(dtype, name)
    path = library_path(cfg, policy, name, dtype, max_context, quantization, tensor_parallel)
    cached = path.exists() and path.with_suffix(".json").exists()
    if cached and runtime_only and "tvm" not in sys.modules:
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    if not cached:
        from tsedge.compile.build import compile_library
        from tsedge.compile.targets import parse_target
        from tsedge.models.attention import check_policy

        tvm_target = parse_target(name)
        check_policy(policy, cfg, tensor_parallel, tvm_target)
        shards = f", {tensor_parallel} shards" if tensor_parallel > 1 else ""
        what = f"compiling {cfg.name} ({policy.name}, {target}, {dtype}, {quantization}{shards}, max context {max_context})"
        with stage_progress(what) as stage:
            meta = compile_library(cfg, policy, tvm_target, dtype, max_context, path, stage=stage,
                                   quantization=quantization, tensor_parallel=tensor_parallel)
        log(f"compiled {path.name} in {meta.compile_seconds} s")
    return path
