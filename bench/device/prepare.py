"""Prepare a GPU run (on the build machine): CUDA libraries, the CPU reference, weights parts.

Writes under ``.carry/`` (git-ignored, sent with the device call):
  libs/*.so|json      SmolLM2-135M (float32 and float16) and Llama-3-8B (float16) for cuda:sm_90a
  libs/cpu_reference.json  greedy tokens of the CPU (llvm, float32) build for a fixed prompt
  w1/, w2/            the SmolLM2 GGUF in two parts (one device call carries at most 64 MiB)
Kernel libraries come from ``TSEDGE_KERNEL_MODE=cuda-build pytest tests/test_*kernels.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tsedge.compile.build import compile_library
from tsedge.compile.targets import parse_target
from tsedge.engine import Engine
from tsedge.fetch import default_model_path
from tsedge.models.config import PRESETS, PolicyConfig
from tsedge.weights import load_source

CARRY = Path(".carry")
PROMPT = "Tell me about the Moon in two sentences."
GPU_CONTEXT = 32768 + 256


def main() -> None:
    libs = CARRY / "libs"
    smol = load_source("smollm2-135m")
    cuda = parse_target("cuda:sm_90a")
    for dtype in ("float32", "float16"):
        compile_library(smol.config, PolicyConfig(), cuda, dtype, GPU_CONTEXT, libs / f"smol-{dtype}.so")
    compile_library(PRESETS["llama3-8b"], PolicyConfig(), cuda, "float16", GPU_CONTEXT, libs / "llama3-8b.so")
    cpu_lib = Path("build/smol-cpu.so")
    compile_library(smol.config, PolicyConfig(), parse_target("llvm"), "float32", 4096, cpu_lib)
    engine = Engine(cpu_lib, smol)
    prompt = smol.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    result = engine.generate(prompt, max_new_tokens=32, stop_ids=[])
    (libs / "cpu_reference.json").write_text(json.dumps({"prompt": prompt, "greedy": result.tokens}))
    data = default_model_path().read_bytes()
    half = 50 * 2**20  # part 1 travels with the kernel libraries, part 2 with the model libraries
    for i, part in enumerate((data[:half], data[half:]), 1):
        (CARRY / f"w{i}").mkdir(parents=True, exist_ok=True)
        (CARRY / f"w{i}" / "part").write_bytes(part)
    print("prepared", sorted(p.name for p in libs.iterdir()), file=sys.stderr)


if __name__ == "__main__":
    main()
