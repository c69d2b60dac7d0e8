"""Where a Vulkan decode step's time goes (issue 12), on a runtime-only host: a prebuilt library,
random weights, the KV cache filled to CONTEXT tokens.

Usage: python3 vulkan_profile.py LIB OUT_JSON [CONTEXT] [STEPS]
Run it twice: plainly (ms per step, dispatches per step) and with ``TSEDGE_VULKAN_PROFILE`` set
(each dispatch submitted and waited for alone: the per-kernel times include a submit + wait each).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tsedge import vulkan
from tsedge.bench.long_context import random_params
from tsedge.engine import Engine
from tsedge.models.library import LibraryMeta


def main() -> None:
    lib, out = Path(sys.argv[1]), Path(sys.argv[2])
    context = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    meta = LibraryMeta.load(lib.with_suffix(".json"))
    params, keep = random_params(meta)
    engine = Engine(lib, None, params=params, max_context=min(meta.max_context, context + steps + 8))
    engine.fill_random(context)
    engine.decode(1)  # warm-up: pipelines, bind groups
    before = vulkan.dispatch_counts()
    start = time.perf_counter()
    for _ in range(steps):
        engine.decode(1)
    elapsed = time.perf_counter() - start
    after = vulkan.dispatch_counts()
    kernels = {k: (after[k][0] - before.get(k, (0, 0))[0], after[k][1] - before.get(k, (0, 0))[1]) for k in after}
    profiled = "TSEDGE_VULKAN_PROFILE" in os.environ  # the backend profiles when it is set at all
    result = {"lib": lib.name, "model": meta.model.name, "policy": meta.policy.name, "adapter": vulkan.describe(),
              "context": context, "profiled": profiled, "ms_per_step": round(1e3 * elapsed / steps, 3),
              "dispatches_per_step": sum(c for c, _ in kernels.values()) / steps,
              "kernels": {k: {"per_step": c / steps, "ms_per_dispatch": round(1e3 * s / c, 4) if c and profiled else None}
                          for k, (c, s) in sorted(kernels.items(), key=lambda kv: -kv[1][1]) if c}}
    out.write_text(json.dumps(result, indent=1))
    print(f"{meta.model.name} {meta.policy.name} vulkan, context {context}{' (profiled)' if profiled else ''}: "
          f"{result['ms_per_step']:.2f} ms a step, {result['dispatches_per_step']:.0f} dispatches a step", flush=True)
    del engine, keep


if __name__ == "__main__":
    main()
