"""Long-context speed by policy and depth: ``tsedge bench decode`` and ``tsedge bench prefill``.

Decode is ms per token after ``depth`` cached tokens; prefill is tok/s of one ``chunk``-token
prefill call appended to ``depth`` cached tokens (llama-bench's ``-d DEPTH`` convention). The KV
cache is filled with random values (time depends on the length, not the content). Without
weights, the preset's shapes get random float16 weights (made on the GPU through torch when it is
there). TokenSelect decode is reported twice: ``tokenselect`` (the decode token repeats, so the
Selection Cache hits almost every step; hit counts recorded) and ``tokenselect-reselect``
(θ = 1.5: never hits, so every layer scores and selects at every step).
"""

from __future__ import annotations

import dataclasses

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tsedge.bench.speed import decode_speed, machine_info, prefill_chunk_speed, prefill_speed
from tsedge.models.config import POLICIES, PolicyConfig
from tsedge.models.library import LibraryMeta
from tsedge.models.quantization import scheme_of
from tsedge.tensor_parallel import open_engine

VARIANTS = {"dense": PolicyConfig(), "tokenselect": PolicyConfig("tokenselect"),
            "tokenselect-reselect": PolicyConfig("tokenselect", selection_threshold=1.5)}
PEERS = Path(__file__).with_name("peers.json")


def parse_depths(text: str) -> list[int]:
    """``"0,4k,32k,128k"`` -> ``[0, 4096, 32768, 131072]``; raises ValueError on a bad entry."""
    depths = []
    for item in text.split(","):
        item = item.strip().lower()
        scale = 1024 if item.endswith("k") else 1
        try:
            depths.append(int(item.rstrip("k")) * scale)
        except ValueError:
            raise ValueError(f"bad depth {item!r}: use token counts like 0,4k,32k,128k") from None
        if depths[-1] < 0:
            raise ValueError(f"bad depth {item!r}: depths are >= 0")
    return depths


def variants(policies: list[str], kind: str, score_keys: tuple[str, ...] = ("exact",),
             **budgets: int | str | None) -> dict[str, PolicyConfig]:
    """Library variants measured for ``policies``, each with its default budgets but those given
    (``PolicyConfig`` fields, e.g. ``tidal_budget``, ``recycle_k``: a count, or a fraction ``"1/8"``
    of the context, the default, whose K at a depth is that depth's; None keeps the default) —
    decode adds ``tokenselect-reselect``; each TokenSelect variant runs with each of
    ``score_keys`` (a mode other than exact is suffixed: ``tokenselect-int8``); raises ValueError
    for a policy the compiler does not know."""
    chosen = {}
    given = {field: value for field, value in budgets.items() if value is not None}
    for policy in policies:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r} for bench: use some of {','.join(POLICIES)}")
        names = [policy, "tokenselect-reselect"] if policy == "tokenselect" and kind == "decode" else [policy]
        for name in names:
            base = dataclasses.replace(VARIANTS.get(name, PolicyConfig(policy)), **given)
            for mode in (score_keys if policy == "tokenselect" else ("exact",)):
                chosen[name if mode == "exact" else f"{name}-{mode}"] = dataclasses.replace(base, score_keys=mode)
    return chosen


def random_params(meta: LibraryMeta, rank: int = 0) -> tuple[list, Any]:
    """Random weights of the library's shapes on its device: (params, keep-alive). Float tensors
    N(0, 0.02); a quantized library's packed weights random bits, its scales 0.02 / max code
    and its mins (q4_1) N(0, 0.02), so a dequantized weight has about the float weights' scale. Each Hugging Face source tensor
    is drawn whole from a seed of its name, then cut to tensor-parallel shard ``rank``'s part and
    arranged as the library stores it, so every shard count runs the same model. Drawn on a
    CUDA GPU through torch where there is one (16 GB for an 8B model), else with NumPy; a library
    for another device (Vulkan, the CPU) gets a copy on its device."""
    import zlib

    import tvm

    from tsedge.engine import target_device
    from tsedge.weights import expected_shapes

    shapes = expected_shapes(meta.model)
    try:
        import torch

        on_gpu = torch.cuda.is_available()
    except ImportError:
        on_gpu = False

    def shape_of(name: str, part: str, quant) -> tuple[int, ...]:
        if not part:
            return shapes[name]
        out, inp = shapes[name]
        return (out, inp // (quant.per_word if part == "qweight" else quant.group))

    if on_gpu:
        draw_on = f"cuda:{rank}" if meta.target.startswith("cuda") else "cuda:0"  # torch draws there

        def draw(name: str, part: str, shape: tuple[int, ...], quant):
            gen = torch.Generator(device=draw_on).manual_seed(zlib.crc32(f"{name}.{part}".encode()))
            if part == "qweight":  # random bits, as int32 (uint32 nibbles) or int8
                bits = torch.randint(-2**31, 2**31 - 1, shape, generator=gen, device=draw_on, dtype=torch.int32)
                return bits.view(torch.uint32) if quant.storage_dtype == "uint32" else bits.to(torch.int8)
            value = torch.randn(shape, generator=gen, device=draw_on,
                                dtype=getattr(torch, quant.part_dtype(part) if part else meta.dtype))
            return value.abs() * (0.02 / quant.max_int) if part == "scale" else value * 0.02

        def arrange(pieces: list, transposed: bool):
            whole = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
            return (whole.t() if transposed else whole).contiguous()
    else:
        def draw(name: str, part: str, shape: tuple[int, ...], quant):
            rng = np.random.default_rng(zlib.crc32(f"{name}.{part}".encode()))
            if part == "qweight":
                return rng.integers(0, 2**32 if quant.storage_dtype == "uint32" else 128, shape).astype(quant.storage_dtype)
            value = rng.standard_normal(shape, np.float32) * 0.02
            return (np.abs(value) / quant.max_int if part == "scale" else value).astype(
                quant.part_dtype(part) if part else meta.dtype)

        def arrange(pieces: list, transposed: bool):
            whole = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
            return np.ascontiguousarray(whole.T if transposed else whole)

    def make(p):
        pieces = []
        quant = scheme_of(meta.quantization, p.weight)
        for name in p.sources:
            whole = draw(name, p.part, shape_of(name, p.part, quant), quant)
            if p.split is not None:
                whole = whole.chunk(meta.tensor_parallel, p.split)[rank] if on_gpu else np.split(
                    whole, meta.tensor_parallel, p.split)[rank]
            pieces.append(whole)
        return arrange(pieces, p.transposed)

    if on_gpu and meta.target.startswith("cuda"):  # shared with torch, no copy
        import tvm_ffi

        keep = [make(p) for p in meta.params]
        return [tvm_ffi.from_dlpack(t) for t in keep], keep
    device = target_device(meta.target, rank)
    host = (lambda t: t.cpu().numpy()) if on_gpu else (lambda a: a)
    return [tvm.runtime.tensor(host(make(p)), device) for p in meta.params], None


def run(kind: str, libs: dict[str, Path], depths: list[int], steps: int = 32, chunk: int = 512,
        log: Callable[[str], None] = print, ttft: int = 0) -> dict[str, Any]:
    """Measure ``kind`` ("decode" or "prefill") for each library variant at each depth.

    Each variant draws the same random weights (``random_params``: seeded per tensor, so shard
    counts agree too); a tensor-parallel library runs on its shards (``open_engine``), and its
    decode rows record the measured all-reduce times. Returns ``{"info", "kind", "rows":
    [{"policy", "depth", "tensor_parallel", "ms_per_token" or "tok_per_s", ...}], "ttft": [...]}``;
    ``ttft`` > 0 (prefill): also the time to first token of a ``ttft``-token prompt from empty.
    """
    capacity = max(max(depths) + steps + chunk, ttft) + 8
    rows, info, ttfts = [], {}, []
    for name, lib in libs.items():
        engine = open_engine(lib, None, random_weights=True, max_context=capacity)
        info = machine_info(engine)
        shards = {"tensor_parallel": engine.meta.tensor_parallel}
        if engine.meta.tensor_parallel > 1 and kind == "decode":
            shards.update(collective_times(engine, capacity))
            log(f"all-reduce {name}: {shards['allreduce_hidden_us']:.1f} us (hidden) per call")
        for depth in depths:
            if kind == "decode":
                row = decode_speed(engine, depth, steps)
                if engine.selection_stats() is not None:
                    row["selection_cache"] = engine.selection_stats()
                value = f"{row['ms_per_token']:8.2f} ms/token"
            else:
                row = prefill_chunk_speed(engine, depth, chunk)
                value = f"{row['tok_per_s']:10.1f} tok/s"
            rows.append({"policy": name, "depth": depth, **shards, **row})
            log(f"{kind} {name:21s} depth {depth:7d}: {value}")
        if ttft and kind == "prefill":
            ttfts.append({"policy": name, **prefill_speed(engine, ttft)})
            log(f"TTFT {name:21s} {ttft:7d}-token prompt: {ttfts[-1]['seconds']:.3f} s")
        engine.close()
        del engine
        _free_device_memory()
    return {"info": info, "kind": kind, "rows": rows, "ttft": ttfts}


def collective_times(engine, capacity: int) -> dict[str, Any]:
    """A sharded engine's all-reduce times (microseconds, GPU time in a CUDA graph on CUDA): of
    one token's hidden state (two a layer in every decode step) and, for TokenSelect, of a vote
    over the cache's candidates (float32; one a layer in a selecting step, plus an all-gather of
    the fingerprint)."""
    cfg = engine.meta.model
    times = {"allreduce_hidden_us": round(1e6 * engine.allreduce_seconds(cfg.hidden_size), 2),
             "allreduces_per_step": 2 * cfg.num_layers}
    if engine.meta.policy.name == "tokenselect":
        candidates = capacity - engine.meta.policy.n_init - engine.meta.policy.n_local
        times["allreduce_vote_us"] = round(1e6 * engine.allreduce_seconds(candidates, dtype="float32"), 2)
    return times


def _free_device_memory() -> None:
    """Give the last engine's GPU memory back before the next one draws its weights."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# the llama.cpp weights compared with a library's quantization: (peers.json table, label)
PEER_WEIGHTS = {"q0": ("models", "llama.cpp F16"), "q4f16": ("models_q4_0", "llama.cpp Q4_0")}


def peer_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """llama.cpp's numbers (``peers.json``, with its source) when measured on the same GPU and model,
    with the weights that match the library's (F16 for float libraries, Q4_0 for q4f16)."""
    peers = json.loads(PEERS.read_text())
    info = result["info"]
    table, label = PEER_WEIGHTS.get(info.get("quantization", "q0"), (None, None))
    if table is None or peers["device"] not in str(info.get("device")) or info.get("model") not in peers[table]:
        return []
    return [{"policy": label, "depth": int(depth), **values[result["kind"]]}
            for depth, values in peers[table][info["model"]].items()]


def table(result: dict[str, Any]) -> str:
    """A markdown table: one row per depth, one column per policy (and llama.cpp)."""
    kind = result["kind"]
    key = "ms_per_token" if kind == "decode" else "tok_per_s"
    rows = result["rows"] + [r for r in peer_rows(result) if any(r["depth"] == x["depth"] for x in result["rows"])]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    depths = sorted({r["depth"] for r in rows})
    cell = {(r["policy"], r["depth"]): r[key] for r in rows}
    unit = "ms per token" if kind == "decode" else f"tok/s, {result['rows'][0]['tokens']}-token chunk"
    lines = [f"| depth ({unit}) | " + " | ".join(policies) + " |", "|---" * (len(policies) + 1) + "|"]
    for depth in depths:
        lines.append(f"| {depth} | " + " | ".join(
            f"{cell[(p, depth)]:,.2f}" if (p, depth) in cell else "—" for p in policies) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """PNG: ms/token (decode) or tok/s (prefill) against depth, one line per policy + llama.cpp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = result["kind"]
    key = "ms_per_token" if kind == "decode" else "tok_per_s"
    rows = result["rows"] + peer_rows(result)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        points = sorted((max(r["depth"], 512), r[key]) for r in rows if r["policy"] == policy)
        ax.plot(*zip(*points), marker="o", linestyle="--" if "llama.cpp" in policy else "-", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("depth (cached tokens; 0 drawn at 512)")
    ax.set_ylabel("ms per decoded token" if kind == "decode"
                  else f"prefill tok/s ({result['rows'][0]['tokens']}-token chunk)")
    quant = result["info"].get("quantization", "q0")
    weights = "" if quant == "q0" else f" {quant}"
    ax.set_title(f"{result['info'].get('model', '')}{weights} {kind}, {result['info'].get('device', result['info']['target'])}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scaling(result: dict[str, Any], path: Path) -> None:
    """PNG: ms/token (decode) or tok/s (prefill) against the number of GPUs (tensor-parallel
    shards), one line per policy and depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "ms_per_token" if result["kind"] == "decode" else "tok_per_s"
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines: dict[tuple[str, int], list] = {}
    for r in result["rows"]:
        base = r["policy"].rsplit("-tp", 1)[0] if r["tensor_parallel"] > 1 else r["policy"]
        lines.setdefault((base, r["depth"]), []).append((r["tensor_parallel"], r[key]))
    for (policy, depth), points in lines.items():
        ax.plot(*zip(*sorted(points)), marker="o", label=f"{policy}, depth {depth}")
    ax.set_xlabel("GPUs (tensor-parallel shards)")
    ax.set_xticks(sorted({r["tensor_parallel"] for r in result["rows"]}))
    ax.set_ylabel("ms per decoded token" if result["kind"] == "decode" else "prefill tok/s")
    ax.set_title(f"{result['info'].get('model', '')} {result['kind']}, {result['info'].get('device', '')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
