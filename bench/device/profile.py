"""Per-kernel GPU time of one decode step (device machine). Usage: profile.py LIB CONTEXT"""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path

import torch

from tsedge.bench.speed import fill_random
from tsedge.engine import Engine

sys.path.insert(0, str(Path(__file__).parent))
from gpu_bench import random_params  # noqa: E402


def main() -> None:
    lib, context = Path(sys.argv[1]), int(sys.argv[2])
    keep, params = random_params(lib)
    engine = Engine(lib, None, params=params)
    fill_random(engine, context)
    engine.decode(1)
    totals, counts, start = collections.defaultdict(float), collections.Counter(), {}

    def instrument(func, name, before, ret, *args):
        torch.cuda.synchronize()
        if before:
            start[name] = time.perf_counter()
        else:
            totals[name] += time.perf_counter() - start[name]
            counts[name] += 1
        return 0

    engine.vm.set_instrument(instrument)
    engine.decode(1)
    print(f"{lib.name} decode at {context}: per-kernel time (synchronised)")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1])[:14]:
        print(f"{seconds * 1e3:9.3f} ms {counts[name]:4d}x  {name}")


if __name__ == "__main__":
    main()
