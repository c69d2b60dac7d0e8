"""Attention kernels alone at Llama-3-8B shapes: decode (issue 9) and prefill chunks (issue 8).

``python bench/device/attention_speed.py prepare [decode,prefill,scoring]`` (build machine) compiles the variants for
cuda:sm_90 (the chunk kernel's wgmma variants for sm_90a) into ``.carry/attn``; ``python3 bench/device/attention_speed.py run OUT_JSON [decode,prefill,scoring]`` (device,
after ``source bench/device/setup.sh``) times each over dense rows ``0..M-1`` and over a Selection
Cache hit's 2,688 gathered rows of a 128K cache. Each call reads another layer of an 8-layer cache,
so K/V come from HBM, not the 60 MB L2. Bandwidth counts the K and V bytes of the attended rows
once (the floor), so it is comparable with the copy bandwidth (~4.3 TB/s read + write).
Prefill: a 512-query chunk after DEPTH cached rows on the tensor-core chunk kernel; TFLOP/s count the
causal multiply-adds of Q·Kᵀ and P·V (4·H·d per visible pair). Scoring: TokenSelect's pass over
130K candidate keys (GB/s of the keys read). ``DECODE_SHAPES``/``CHUNK_SHAPES`` name the variants.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

LIBS = Path(".carry/attn")
LAYERS, HEADS, KV_HEADS, HEAD_DIM, CAPACITY = 8, 32, 8, 128, 131072 + 64
CASES = [("dense", m) for m in (128, 4096, 32768, 131072)] + [("gathered", 2688)]
# variants over row lists: (kernel, options): "simt" make_decode_attention, "mma" make_decode_attention_mma
DECODE_SHAPES = {"decode": ("simt", {}), "mma": ("mma", {}),
                 "mma h8 min64": ("mma", {"heads_per_block": 8, "min_keys": 64}),
                 "mma h2": ("mma", {"heads_per_block": 2})}
# variants of the dense decode kernel (rows 0..L-1 from a device length, a fixed grid of max_splits)
DENSE_SHAPES = {"dense 256": ("simt", {"max_splits": 256, "min_keys": 8}), "mma dense": ("mma", {}),
                "mma dense h8 min64": ("mma", {"heads_per_block": 8, "min_keys": 64}),
                "mma dense min16": ("mma", {"min_keys": 16})}
SPLIT_OPTIONS = ("max_splits", "min_keys")  # the options decode_splits takes
REPLAYS = 4  # graph replays timed
# scoring variants: (key bits, cp.async stages, candidates a tile of the tensor-core pass; None: the default)
# (int8: 16- or 32-key tiles, 2-6 stages all within 60-62 us a layer but 32 keys x 3 stages, 69 us:
# scoring_int8_tiles_h200.json)
SCORING_SHAPES = {"scoring": (16, None, None), "scoring int8": (8, None, None)}
PARTS = ("decode", "prefill", "scoring")  # what prepare builds and run times (default: all)
PREFILL_N = 512
PREFILL_DEPTHS = (0, 4096, 32768, 131072)
# variants: (arch, make_chunk_attention options): sm_90 runs mma.sync, sm_90a wgmma
# (sm_90a: the time includes make_rotated_keys, the pre-pass the kernel needs)
CHUNK_SHAPES = {"chunk": ("sm_90", {}), "chunk wgmma": ("sm_90a", {})}


def prepare(parts: list[str]) -> None:
    """Compile the variants of ``parts`` (decode, prefill, scoring) into LIBS."""
    import tvm

    from tsedge.compile.cuda_fatbin import fatbin_build_context
    from tsedge.compile.targets import parse_target
    from tsedge.tir_kernels import (attention, chunk_attention, decode_attention, decode_attention_mma,
                                    tokenselect_scoring)

    target, hopper = parse_target("cuda:sm_90"), parse_target("cuda:sm_90a")
    makers = {"simt": decode_attention.make_decode_attention, "mma": decode_attention_mma.make_decode_attention_mma}
    LIBS.mkdir(parents=True, exist_ok=True)
    builds = [("merge", attention.make_attention_merge(HEADS, HEAD_DIM, "float16", target), target)]
    if "decode" in parts:
        builds += [(name, makers[kind](LAYERS, HEADS, KV_HEADS, HEAD_DIM, "float16", target, **kw), target)
                   for name, (kind, kw) in DECODE_SHAPES.items()]
        for name, (kind, kw) in DENSE_SHAPES.items():
            builds += [(name, makers[kind](LAYERS, HEADS, KV_HEADS, HEAD_DIM, "float16", target, dense=True, **kw), target),
                       (f"merge {name}", attention.make_attention_merge(
                           HEADS, HEAD_DIM, "float16", target,
                           functools.partial(decode_attention.decode_splits, **_split_options(kind, kw))), target)]
    if "scoring" in parts:  # TokenSelect paper budgets 128/512; exact keys and int8 codes (--score-keys)
        builds += [(name, tokenselect_scoring.make_scoring(LAYERS, HEADS, KV_HEADS, HEAD_DIM, 128, 512, 0, "float16",
                                                           target, bits, stages, keys), target)
                   for name, (bits, stages, keys) in SCORING_SHAPES.items()]
    if "prefill" in parts:
        builds += [("merge chunks", attention.make_attention_merge(HEADS, HEAD_DIM, "float16", target, few_chunks=True),
                    target),
                   ("rotated keys", chunk_attention.make_rotated_keys(LAYERS, KV_HEADS, HEAD_DIM, "float16", hopper),
                    hopper)]
        for name, (arch, kw) in CHUNK_SHAPES.items():
            tgt = parse_target(f"cuda:{arch}")
            builds.append((name, chunk_attention.make_chunk_attention(LAYERS, HEADS, KV_HEADS, HEAD_DIM, "float16",
                                                                      tgt, **kw), tgt))
    for name, func, tgt in builds:
        with fatbin_build_context(tgt):
            tvm.compile(tvm.IRModule({"main": func}), target=tgt).export_library(str(LIBS / f"{_file(name)}.so"))


def rope_table(positions: int, dev):
    """Llama-3's RoPE table (theta 500,000) for ``positions`` rows: float32 [positions, HEAD_DIM] on ``dev``."""
    import torch

    pos = torch.arange(positions, device=dev, dtype=torch.float64)[:, None]
    inv = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=dev, dtype=torch.float64) / HEAD_DIM)
    return torch.cat([torch.cos(pos * inv), torch.sin(pos * inv)], 1).float()


def _split_options(kind: str, options: dict) -> dict:
    """The split options (``SPLIT_OPTIONS``) of a ``kind`` variant: its module's defaults, then ``options``."""
    from tsedge.tir_kernels import decode_attention, decode_attention_mma

    defaults = {"simt": {"max_splits": decode_attention.MAX_SPLITS, "min_keys": decode_attention.MIN_KEYS_PER_SPLIT},
                "mma": {"max_splits": decode_attention_mma.MAX_SPLITS, "min_keys": decode_attention_mma.MIN_KEYS}}
    return {k: v for k, v in {**defaults[kind], **options}.items() if k in SPLIT_OPTIONS}


def _file(name: str) -> str:
    return name.split(" (")[0].replace(" ", "_").replace(",", "")


def run(out_path: Path, parts: list[str]) -> None:
    import os

    os.environ["TSEDGE_KERNEL_MODE"] = "cuda-run"  # kernel modules import without TVMScript
    import kernel_harness  # noqa: F401  (tests/ is on PYTHONPATH: bench/device/setup.sh)
    import numpy as np
    import torch
    import tvm
    import tvm_ffi

    from tsedge.tir_kernels import chunk_attention, decode_attention, tokenselect_scoring

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    kv = torch.randn((LAYERS, 2, KV_HEADS, CAPACITY, HEAD_DIM), generator=gen, device=dev, dtype=torch.float16)
    q = torch.randn((PREFILL_N, HEADS, HEAD_DIM), generator=gen, device=dev, dtype=torch.float16)
    rope = rope_table(CAPACITY, dev)
    merge = tvm.runtime.load_module(str(LIBS / "merge.so"))["main"]
    ffi = tvm_ffi.from_dlpack

    def timed(kernel, queries, rows, splits: int, calls: int, rotate=None, merge=merge) -> float:
        """Microseconds per layer of kernel + ``merge`` (+ ``rotate``, the keys' pre-pass, whose output
        the kernel then takes after ``kv``), each call on another layer."""
        o = torch.empty((len(queries), splits, HEADS, HEAD_DIM), device=dev, dtype=torch.float32)
        lse = torch.empty((len(queries), splits, HEADS), device=dev, dtype=torch.float32)
        out = torch.empty((len(queries), HEADS, HEAD_DIM), device=dev, dtype=torch.float16)
        args = [ffi(t) for t in (queries, kv, rope, rows)]
        krot = ffi(torch.empty((KV_HEADS, len(rows), HEAD_DIM), device=dev, dtype=torch.float16))

        def call(layer: int) -> None:
            if rotate is None:
                kernel(*args, layer, ffi(o), ffi(lse))
            else:
                rotate(*args[1:], layer, krot)
                kernel(args[0], args[1], krot, *args[2:], layer, ffi(o), ffi(lse))
            merge(ffi(o), ffi(lse), ffi(out))

        return timed_calls(call, calls)

    def timed_calls(call, calls: int) -> float:
        """Microseconds per ``call(layer)``, each call on another layer (after one of each), the calls
        replayed as one CUDA graph: GPU time as in a decode step's graph, without Python's launches."""
        for layer in range(LAYERS):
            call(layer)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), tvm_ffi.use_torch_stream():
            for i in range(calls):
                call(i % LAYERS)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / calls / REPLAYS

    def load(name: str):
        return tvm.runtime.load_module(str(LIBS / f"{name}.so"))["main"]

    results = []
    for name, (kind, kw) in DECODE_SHAPES.items() if "decode" in parts else ():
        kernel = load(_file(name))
        for case, m in CASES:
            rows = (torch.arange(m, device=dev) if case == "dense" else
                    torch.from_numpy(np.sort(np.random.default_rng(0).choice(CAPACITY, m, replace=False))).to(dev))
            splits = decode_attention.decode_splits(m, **_split_options(kind, kw))
            us = timed(kernel, q[:1], rows.to(torch.int32), splits, 8 * LAYERS if m >= 32768 else 64 * LAYERS)
            gbs = m * KV_HEADS * HEAD_DIM * 2 * 2 / us / 1e3
            results.append({"variant": name, "kind": "decode", "rows": case, "m": m, "us_per_layer": round(us, 2),
                            "kv_gb_per_s": round(gbs, 1)})
            print(f"{name:38s} {case:8s} M={m:7d}: {us:9.2f} us/layer  {gbs:8.1f} GB/s", flush=True)
    for name, (kind, kw) in DENSE_SHAPES.items() if "decode" in parts else ():
        kernel, merge_dense = load(_file(name)), load(_file(f"merge {name}"))
        splits = _split_options(kind, kw)["max_splits"]
        o = torch.empty((1, splits, HEADS, HEAD_DIM), device=dev, dtype=torch.float32)
        lse = torch.empty((1, splits, HEADS), device=dev, dtype=torch.float32)
        out = torch.empty((1, HEADS, HEAD_DIM), device=dev, dtype=torch.float16)
        for case, m in CASES[:-1]:
            length = torch.tensor([m], device=dev, dtype=torch.int32)
            args = [ffi(t) for t in (q[:1], kv, rope, length)]
            calls = 8 * LAYERS if m >= 32768 else 64 * LAYERS

            def call(layer: int) -> None:
                kernel(*args, layer, ffi(o), ffi(lse))
                merge_dense(ffi(o), ffi(lse), ffi(length), ffi(out))

            us = timed_calls(call, calls)
            gbs = m * KV_HEADS * HEAD_DIM * 2 * 2 / us / 1e3
            results.append({"variant": name, "kind": "decode", "rows": case, "m": m, "us_per_layer": round(us, 2),
                            "kv_gb_per_s": round(gbs, 1)})
            print(f"{name:38s} {case:8s} M={m:7d}: {us:9.2f} us/layer  {gbs:8.1f} GB/s", flush=True)
    for name, (arch, _) in CHUNK_SHAPES.items() if "prefill" in parts else ():
        kernel, rotate = load(_file(name)), load("rotated_keys") if arch == "sm_90a" else None
        for depth in PREFILL_DEPTHS:
            m = depth + PREFILL_N
            splits = chunk_attention.chunk_splits(m)
            us = timed(kernel, q, torch.arange(m, device=dev, dtype=torch.int32), splits, 2 * LAYERS, rotate,
                       load("merge_chunks"))
            pairs = PREFILL_N * depth + PREFILL_N * (PREFILL_N + 1) // 2
            tflops = 4 * HEADS * HEAD_DIM * pairs / us / 1e6
            results.append({"variant": name, "kind": "prefill", "queries": PREFILL_N, "depth": depth,
                            "us_per_layer": round(us, 2), "tflop_per_s": round(tflops, 1)})
            print(f"{name:38s} prefill {PREFILL_N} after {depth:7d}: {us:10.1f} us/layer {tflops:7.1f} TFLOP/s",
                  flush=True)
    state = torch.zeros((LAYERS, 4), device=dev, dtype=torch.int32)  # no Selection Cache hit: score
    qbar = torch.randn((HEADS, HEAD_DIM), generator=gen, device=dev, dtype=torch.float32)
    length = CAPACITY - 64  # 131,072 rows: 130,432 candidates after the 128 sinks and 512 local ones
    candidates, size = length - 128 - 512, CAPACITY - 128 - 512
    outs = [torch.empty(shape, device=dev, dtype=torch.float32)
            for shape in ((size,), (HEADS, size), (HEADS, tokenselect_scoring.SCORE_BLOCKS + 1, 2))]
    length_t = torch.tensor([length], device=dev, dtype=torch.int32)
    codes = [torch.randint(-127, 128, (LAYERS, KV_HEADS, CAPACITY, HEAD_DIM), generator=gen, device=dev,
                           dtype=torch.int8),
             torch.rand((LAYERS, KV_HEADS, CAPACITY), generator=gen, device=dev) * 0.05] if "scoring" in parts else []
    for name, (bits, _, _) in SCORING_SHAPES.items() if "scoring" in parts else ():
        keys, key_bytes = ([kv], 2 * HEAD_DIM) if bits == 16 else (codes, HEAD_DIM + 4)
        kernel = load(_file(name))
        us = timed_calls(lambda layer: kernel(ffi(qbar), *[ffi(t) for t in keys], ffi(state), layer, ffi(length_t),
                                              *[ffi(t) for t in outs]), 8 * LAYERS)
        gbs = candidates * KV_HEADS * key_bytes / us / 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for layer in range(LAYERS):
                kernel(ffi(qbar), *[ffi(t) for t in keys], ffi(state), layer, ffi(length_t), *[ffi(t) for t in outs])
            torch.cuda.synchronize()
        passes = {e.key: round(getattr(e, "device_time", 0) or e.cuda_time, 2) for e in prof.key_averages()}  # mean us of each kernel
        results.append({"variant": f"{name} (TokenSelect, re-selecting)", "kind": "scoring", "candidates": candidates,
                        "us_per_layer": round(us, 2), "k_gb_per_s": round(gbs, 1), "bytes_per_key": key_bytes,
                        "passes_us": passes})
        print(f"  passes (us each, outside a graph): {passes}", flush=True)
        print(f"{name} {candidates} candidates: {us:9.2f} us/layer {gbs:8.1f} GB/s", flush=True)
    out_path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "shapes": {
        "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "float16"},
        "note": "per layer: attention kernel + merge; decode GB/s = K+V bytes of the attended rows / time; "
                "prefill TFLOP/s = 4 H d x (visible query-key pairs) / time",
        "results": results}, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "prepare":  # prepare [PARTS]
        prepare(sys.argv[2].split(",") if len(sys.argv) > 2 else list(PARTS))
    else:  # run OUT_JSON [PARTS]
        run(Path(sys.argv[2]), sys.argv[3].split(",") if len(sys.argv) > 3 else list(PARTS))
