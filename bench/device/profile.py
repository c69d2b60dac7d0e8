"""Where a decode step's or a prefill chunk's time goes (device machine): kernels by GPU time,
launches, gaps.

Usage: python3 bench/device/profile.py OUT_JSON LIB:DEPTH[:prefill] [...]
For each library (random weights; a tensor-parallel one profiled on GPU 0, its rank 0) and depth: the step's wall time without the profiler, then
torch.profiler's CUDA kernel records over 10 steps: GPU time per step, kernel launches per step,
the gap (wall − kernel time: launch and host overhead) and the top 40 kernels. A step is one decoded
token, or with ``:prefill`` one 512-token prefill chunk after DEPTH cached tokens (the cache
truncated back to DEPTH before each chunk).
"""

from __future__ import annotations

import collections
import json
import sys
import time
from pathlib import Path

import torch

from tsedge.bench.speed import random_ids
from tsedge.tensor_parallel import open_engine

STEPS = 10
CHUNK = 512


def profile(lib: Path, depth: int, kind: str = "decode") -> dict:
    engine = open_engine(lib, None, random_weights=True, prefill_chunk=CHUNK,
                         max_context=depth + (CHUNK if kind == "prefill" else 4 * STEPS) + 8)
    engine.fill_random(depth)
    chunk = random_ids(engine, CHUNK, seed=1)

    def step() -> None:
        if kind == "decode":
            engine.decode(1)
        else:
            engine.truncate(depth)
            engine.prefill(chunk)

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    wall_ms = (time.perf_counter() - start) * 1e3 / STEPS
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
    times, counts = collections.defaultdict(float), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] += event.device_time / 1e3 / STEPS  # ms per step
            counts[event.name] += 1
    kernel_ms = sum(times.values())
    top = sorted(times, key=times.get, reverse=True)[:40]
    engine.close()
    del engine
    return {"lib": lib.name, "kind": kind, "depth": depth, "wall_ms": round(wall_ms, 3), "kernel_ms": round(kernel_ms, 3),
            "gap_ms": round(wall_ms - kernel_ms, 3), "launches": sum(counts.values()) // STEPS,
            "top": [{"kernel": k[:80], "ms": round(times[k], 3), "per_step": counts[k] // STEPS} for k in top]}


def main() -> None:
    out, runs = Path(sys.argv[1]), []
    for item in sys.argv[2:]:
        lib, depth, *kind = item.split(":")
        runs.append(profile(Path(lib), int(depth), *kind))
        r = runs[-1]
        print(f"{r['lib']} {r['kind']} depth {r['depth']}: wall {r['wall_ms']} ms, kernels {r['kernel_ms']} ms, "
              f"gap {r['gap_ms']} ms, {r['launches']} launches", flush=True)
        for k in r["top"][:6]:
            print(f"   {k['ms']:8.3f} ms {k['per_step']:4d}x  {k['kernel']}")
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
