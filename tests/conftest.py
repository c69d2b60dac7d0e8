"""Shared fixtures: the embedded SmolLM2-135M model, its CPU library, and transformers' copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tsedge.models.config import PolicyConfig
from tsedge.weights import ModelSource, load_source

SMOL_CONTEXT = 1024
# Once any test imports tvm.support.nvcc, every CUDA tvm.compile runs its compile callback, NVRTC by
# default (needs cuda-bindings, not a dependency): nvcc (on CI) for the whole session, whatever the
# test order; a compile without a target in scope goes through kernel_harness.cuda_source
os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")


@pytest.fixture(scope="session")
def smol_source() -> ModelSource:
    return load_source("smollm2-135m")


@pytest.fixture(scope="session")
def smol_lib(smol_source, tmp_path_factory) -> Path:
    """SmolLM2-135M, dense, llvm, float32, 1024-token cache."""
    from tsedge.compile.build import compile_library  # compiler side: not on a runtime-only host
    from tsedge.compile.targets import parse_target

    path = tmp_path_factory.mktemp("smol") / "smol-dense.so"
    compile_library(smol_source.config, PolicyConfig(), parse_target("llvm"), "float32", SMOL_CONTEXT, path)
    return path


@pytest.fixture(scope="session")
def hf_smol(smol_source):
    """transformers' SmolLM2 from the same GGUF, float32 (the PyTorch reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = smol_source.path
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()
