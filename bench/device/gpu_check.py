"""The compiled model on the GPU against the CPU build: same weights, same tokens, logits compared.

``python bench/device/gpu_check.py prepare`` (build machine) compiles a 4-layer Llama (8 heads,
2 KV heads, head_dim 64) for llvm float32 and cuda:sm_90a float32 and float16, and with q4f16
weights for both (the CUDA one decodes through the dp4a GEMV), dense and TokenSelect (budgets
16/64/128, chunk 64), draws its weights (float16-exact, N(0, 0.05)) and
records the CPU logits of a 600-token prompt (chunked prefill, beyond the TokenSelect budget)
and 8 teacher-forced decode steps into ``.carry/check``. ``python3 bench/device/gpu_check.py run
OUT_JSON`` (device) runs the CUDA libraries on the same weights and tokens and reports the largest
logit difference (relative to the largest logit) and the top-1 agreement with the CPU build of
the same weights (float32, or q4f16 quantized by the engine at load).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tsedge.models.config import ModelConfig, PolicyConfig
from tsedge.weights import ModelSource, expected_shapes

DIR = Path(".carry/check")
CONFIG = ModelConfig("check-4l", hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8,
                     num_kv_heads=2, vocab_size=1024, rope_theta=500000.0, context_window=2048)
POLICIES = {"dense": PolicyConfig(), "tokenselect": PolicyConfig("tokenselect", n_init=16, n_local=64,
                                                                  top_k=128, chunk_size=64)}
# build: (target, dtype, quantization); the CUDA builds are compared with the CPU build of their weights
BUILDS = {"cpu-float32": ("llvm", "float32", "q0"), "cuda-float32": ("cuda:sm_90a", "float32", "q0"),
          "cuda-float16": ("cuda:sm_90a", "float16", "q0"), "cpu-q4f16": ("llvm", "float32", "q4f16"),
          "cuda-q4f16": ("cuda:sm_90a", "float16", "q4f16")}
REFERENCES = {"q0": "cpu-float32", "q4f16": "cpu-q4f16"}
PROMPT, STEPS, CHUNK = 600, 8, 64


def _source(weights: dict[str, np.ndarray]) -> ModelSource:
    return ModelSource(CONFIG, None, DIR / "weights.npz", lambda: iter(weights.items()))


def _logits(lib: Path, weights: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    from tsedge.engine import Engine

    engine = Engine(lib, _source(weights), max_context=1024, prefill_chunk=CHUNK)
    rows = [engine.prefill(ids[:PROMPT])]
    rows += [engine.decode(t) for t in ids[PROMPT:]]
    return np.stack([np.asarray(r, np.float32).reshape(-1) for r in rows])


def prepare() -> None:
    from tsedge.compile.build import compile_library
    from tsedge.compile.targets import parse_target

    DIR.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    weights = {name: (rng.standard_normal(shape, np.float32) * 0.05).astype(np.float16).astype(np.float32)
               for name, shape in expected_shapes(CONFIG).items()}
    weights.update({n: np.ones_like(w) for n, w in weights.items() if n.endswith("norm.weight")})
    np.savez(DIR / "weights.npz", **{n: w.astype(np.float16) for n, w in weights.items()})
    ids = rng.integers(0, CONFIG.vocab_size, PROMPT + STEPS).tolist()
    (DIR / "ids.json").write_text(json.dumps(ids))
    for policy_name, policy in POLICIES.items():
        for build, (target, dtype, quant) in BUILDS.items():
            lib = DIR / f"{policy_name}-{build}.so"
            compile_library(CONFIG, policy, parse_target(target), dtype, 1024, lib, quantization=quant)
        for quant, build in REFERENCES.items():
            np.save(DIR / f"ref-{policy_name}-{quant}.npy", _logits(DIR / f"{policy_name}-{build}.so", weights, ids))


def run(out: Path) -> None:
    import torch  # loads libcudart for TVM's CUDA runtime

    from tsedge.engine import load_cuda_runtime

    load_cuda_runtime()
    weights = {n: w.astype(np.float32) for n, w in np.load(DIR / "weights.npz").items()}
    ids = json.loads((DIR / "ids.json").read_text())
    results = []
    for policy_name in POLICIES:
        for build in (b for b, (target, _, _) in BUILDS.items() if target.startswith("cuda")):
            quant = BUILDS[build][2]
            ref = np.load(DIR / f"ref-{policy_name}-{quant}.npy")
            got = _logits(DIR / f"{policy_name}-{build}.so", weights, ids)
            rel = float(np.abs(got - ref).max() / np.abs(ref).max())
            top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
            results.append({"policy": policy_name, "build": build, "reference": REFERENCES[quant],
                            "max_rel_diff": rel, "top1_agreement": top1})
            print(f"{policy_name:12s} {build:13s} max |Δlogit| / max|logit| = {rel:.2e}, "
                  f"top-1 agreement {top1:.3f} over {len(ref)} positions", flush=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "config": CONFIG.to_dict(),
                               "prompt": PROMPT, "steps": STEPS,
                               "references": REFERENCES, "results": results}, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        prepare()
    else:
        run(Path(sys.argv[2]))
