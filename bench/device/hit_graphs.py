"""Conditional CUDA graphs (tsedge/cuda_graphs.py) on the GPU: same logits as TVM's graph, and the
decode step with and without them, one engine for all depths (device machine, TVM runtime only).

Usage: python3 hit_graphs.py OUT_DIR LIB [DEPTH ...]   (writes OUT_DIR/hit_graphs_<LIB stem>.json)
  LIB: a TokenSelect CUDA library with graph kernels (its .json next to it), random weights; a
  library with θ > 1 (``tokenselect-reselect``) never hits: the IF bodies run at every step.
Correctness: two engines over the same random cache (32K) decode a token sequence that both hits
and misses the Selection Cache, one through the conditional graphs and one through TVM's graph:
logits, picks and selection counters must be equal. Speed: ms per step, the same token repeated
(hits), conditional graphs on, then off (TVM's own graph), at each DEPTH.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from tsedge.bench.long_context import random_params
from tsedge.bench.speed import fill_random
from tsedge.engine import Engine
from tsedge.models.library import LibraryMeta


def steps_ms(engine: Engine, steps: int) -> float:
    engine.decode_greedy(1)  # warm-up and capture
    start = time.perf_counter()
    for _ in range(steps):
        engine.decode_greedy(1)
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    out, lib = Path(sys.argv[1]), Path(sys.argv[2])
    depths = [int(d) for d in sys.argv[3:]] or [4096, 32768, 131072]
    out.mkdir(parents=True, exist_ok=True)
    meta = LibraryMeta.load(lib.with_suffix(".json"))
    params, keep = random_params(meta)
    capacity = meta.max_context
    report: dict = {"lib": lib.name}

    sequence = [7, 7, 7, 7, 300, 300, 300, 9000, 9000, 9000, 9000, 42, 42, 42] * 3
    logits = []
    for conditional in (True, False):
        engine = Engine(lib, None, params=params, max_context=capacity)
        if not conditional:
            engine.graphs = None
        fill_random(engine, 32768)
        logits.append(np.stack([engine.decode(t) for t in sequence]))
        report[f"stats_{'on' if conditional else 'off'}"] = engine.selection_stats()
        if conditional:
            report["skipped_nodes"] = engine.graphs.skipped_nodes
        del engine
    diff = float(np.abs(logits[0] - logits[1]).max())
    report["correctness"] = {"max_abs_logit_diff": diff, "steps": len(sequence),
                             "equal_picks": bool((logits[0].argmax(1) == logits[1].argmax(1)).all())}
    print("correctness", report["correctness"], report["stats_on"], report["stats_off"], flush=True)

    rows = []
    engine = Engine(lib, None, params=params, max_context=capacity)
    graphs = engine.graphs
    for depth in depths:
        fill_random(engine, depth)
        engine.graphs = graphs
        on = steps_ms(engine, 64)
        engine.graphs = None
        off = steps_ms(engine, 64)
        rows.append({"depth": depth, "conditional_ms": round(on, 3), "tvm_graph_ms": round(off, 3),
                     "stats": engine.selection_stats()})
        print(f"depth {depth:7d}: conditional graphs {on:6.3f} ms, TVM graph {off:6.3f} ms", flush=True)
    report["rows"] = rows
    (out / f"hit_graphs_{lib.stem}.json").write_text(json.dumps(report, indent=1))
    del engine, keep


if __name__ == "__main__":
    main()
