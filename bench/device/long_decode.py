"""Long-context speed, dense vs TokenSelect, Llama-3-8B shapes with random float16 weights.

``python bench/device/long_decode.py prepare`` (build machine) compiles both libraries for
cuda:sm_90 into ``.carry/libs3``; ``python3 bench/device/long_decode.py run OUT_JSON`` (device, after
``source bench/device/setup.sh``) measures, per context length, the decode ms/token and the time of
one 512-token prefill chunk appended to that context. The KV cache is filled with random values
(time depends on the length, not the content). Decode repeats one token, so TokenSelect's Selection
Cache hits on almost every step (hit counts are recorded); ``tokenselect-reselect`` (θ 1.5, never
hits) scores and selects at every step of every layer: the two bound TokenSelect's decode cost.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tsedge.models.config import PRESETS, PolicyConfig

LIBS = Path(".carry/libs3")
CONTEXTS = (32768, 65536, 131072)
CAPACITY = CONTEXTS[-1] + 1024
POLICIES = {"dense": PolicyConfig(), "tokenselect": PolicyConfig("tokenselect"),
            "tokenselect-reselect": PolicyConfig("tokenselect", selection_threshold=1.5)}


def prepare() -> None:
    from tsedge.compile.build import compile_library
    from tsedge.compile.targets import parse_target

    for name, policy in POLICIES.items():
        compile_library(PRESETS["llama3-8b"], policy, parse_target("cuda:sm_90"), "float16", CAPACITY,
                        LIBS / f"{name}.so")


def run(out_path: Path) -> None:
    from gpu_bench import random_params

    from tsedge.bench.speed import decode_speed, machine_info, prefill_chunk_speed
    from tsedge.engine import Engine

    keep, params = random_params(LIBS / "dense.so")
    results = []
    for name in POLICIES:
        engine = Engine(LIBS / f"{name}.so", None, params=params)
        for context in CONTEXTS:
            row = {"policy": name, **decode_speed(engine, context, steps=32),
                   "selection_cache": engine.selection_stats(),
                   "prefill_chunk": prefill_chunk_speed(engine, context, 512)}
            results.append(row)
            print(f"{name:12s} {context:7d}: decode {row['ms_per_token']:8.2f} ms/token, "
                  f"512-token chunk {row['prefill_chunk']['seconds'] * 1000:8.1f} ms", flush=True)
        info = machine_info(engine)
        del engine
    del keep
    out_path.write_text(json.dumps({"info": info, "model": "llama3-8b (random weights)",
                                    "results": results}, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        prepare()
    else:
        run(Path(sys.argv[2]))
