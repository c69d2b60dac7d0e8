"""All-reduce latency of a decode step's sizes: NCCL under its settings and tsedge's P2P kernel
(device, several GPUs).

``python3 bench/device/nccl_latency.py OUT_JSON`` runs, for each setting below, one process per GPU
(``tsedge.tensor_parallel.NcclCollective``, as a sharded engine does) and times all-reduces of
one token's hidden state (Llama-3-8B: 4,096 float16; 70B: 8,192) inside a CUDA graph
(``Collective.time_allreduce``), after checking one ``allreduce_add`` of random values against
NumPy (largest error relative to the largest value). NVLink multicast stays off
(NCCL_NVLS_ENABLE=0) in every setting.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from pathlib import Path

NCCL = {"TSEDGE_P2P_ALLREDUCE": "0"}
SETTINGS = {"p2p kernel": {}, "nccl default": NCCL,
            "nccl LL, 1 channel": {**NCCL, "NCCL_PROTO": "LL", "NCCL_MAX_NCHANNELS": "1"},
            "nccl LL, 2 channels": {**NCCL, "NCCL_PROTO": "LL", "NCCL_MAX_NCHANNELS": "2"},
            "nccl LL128": {**NCCL, "NCCL_PROTO": "LL128"}}
SIZES = (4096, 8192)


def _rank(rank: int, shards: int, unique_id, env: dict, queue) -> None:
    os.environ.update(env)
    import tvm

    from tsedge.engine import load_cuda_runtime
    from tsedge.tensor_parallel import NcclCollective

    load_cuda_runtime()

    import numpy as np

    collective = NcclCollective(rank, shards, unique_id)
    device = tvm.cuda(rank)
    times = {}
    for size in SIZES:
        parts = [np.random.default_rng(r).standard_normal(size).astype("float16") for r in range(shards + 1)]
        out = tvm.runtime.empty((size,), "float16", device)
        collective.allreduce_add(tvm.runtime.tensor(parts[rank], device), tvm.runtime.tensor(parts[-1], device), out)
        want = sum(p.astype("float32") for p in parts)
        times[f"{size} error"] = float(np.abs(out.numpy().astype("float32") - want).max() / np.abs(want).max())
        x = tvm.runtime.tensor(np.ones(size, "float16"), device)
        times[size] = collective.time_allreduce(x, 256) * 1e6
    if rank == 0:
        queue.put(times)


def main() -> None:
    import cupy

    from tsedge.tensor_parallel import nccl_unique_id

    shards = cupy.cuda.runtime.getDeviceCount()
    context = multiprocessing.get_context("spawn")
    results = {}
    for name, env in SETTINGS.items():
        env = {"NCCL_NVLS_ENABLE": "0", **env}
        queue = context.Queue()
        unique_id = nccl_unique_id()
        procs = [context.Process(target=_rank, args=(r, shards, unique_id, env, queue)) for r in range(shards)]
        for p in procs:
            p.start()
        results[name] = queue.get(timeout=120)
        for p in procs:
            p.join()
        print(f"{name:20s} " + "  ".join(f"{size}: {value:.3g}" for size, value in results[name].items()), flush=True)
    device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    Path(sys.argv[1]).write_text(json.dumps({"device": device, "gpus": shards, "us_per_allreduce": results}, indent=1))
    if any(value > 1e-2 for key, value in results["p2p kernel"].items() if "error" in str(key)):
        sys.exit("the P2P all-reduce's sums are wrong")


if __name__ == "__main__":
    main()
