"""Speed measurements of an Engine: prefill tok/s and decode tok/s at a given context length."""

from __future__ import annotations

import hashlib
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tsedge.engine import Engine

# the /proc/cpuinfo flags that decide which kernels llama.cpp and LLVM pick
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def random_ids(engine: Engine, count: int, seed: int = 0) -> list[int]:
    vocab = engine.meta.model.vocab_size
    return np.random.default_rng(seed).integers(100, vocab, count).tolist()


def text_ids(engine: Engine, count: int) -> list[int]:
    """The first ``count`` token ids of CPython's docs (``pydoc_data.topics``) by the engine's
    tokenizer (a BOS first when the model adds one, as for a prompt): natural text that both
    engines of a comparison are fed, id for id."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics.values())
    ids = engine.tokenizer.encode(text[:16 * count])  # a token is 2-5 characters of it
    if len(ids) < count:
        ids = engine.tokenizer.encode(text)
    if len(ids) < count:
        raise ValueError(f"CPython's docs give {len(ids)} tokens, fewer than the {count} asked for")
    return ids[:count]


def ids_digest(ids: list[int]) -> str:
    """A short SHA-256 of token ids: two engines fed the same ids report the same digest."""
    return hashlib.sha256(np.asarray(ids, "<i4").tobytes()).hexdigest()[:16]


def prefill_speed(engine: Engine, length: int, seed: int = 0, ids: list[int] | None = None) -> dict[str, float]:
    """Prefill ``length`` random tokens (or the given ``ids``) from an empty cache (chunked as
    the engine is set)."""
    ids = ids if ids is not None else random_ids(engine, length, seed)
    engine.reset()
    engine.prefill(ids[:8])  # warm-up: first calls allocate
    engine.reset()
    start = time.perf_counter()
    engine.prefill(ids)
    seconds = time.perf_counter() - start
    return {"tokens": length, "seconds": round(seconds, 4), "tok_per_s": round(length / seconds, 2)}


def decode_speed(engine: Engine, context: int, steps: int = 64) -> dict[str, Any]:
    """Decode steps after ``context`` cached tokens filled with random values (``Engine.fill_random``);
    with a device sampler each step includes its greedy pick on the device (``Engine.decode_greedy``)."""
    engine.fill_random(context)
    engine.cache.check_room(steps + 2)
    # a library with ``sample``: each step decodes and picks greedily on the device (only the id
    # crosses to the host), as generation does; else the logits come to the host. Every step
    # feeds the same token, so a policy's cache behaves as its variant says (TokenSelect's
    # Selection Cache hits on repeats; ``tokenselect-reselect`` misses by construction).
    on_device = engine.sampler is not None
    step = engine.decode_greedy if on_device else engine.decode
    step(1)  # warm-up (and the CUDA graph's capture)
    start = time.perf_counter()
    for _ in range(steps):
        step(1)
    seconds = time.perf_counter() - start
    return {"context": context, "steps": steps, "ms_per_token": round(1000 * seconds / steps, 3),
            "tok_per_s": round(steps / seconds, 2), "sampling": "device" if on_device else "host"}


def greedy_decode_speed(engine: Engine, ids: list[int], steps: int) -> dict[str, Any]:
    """Prefill ``ids`` (untimed), then time ``steps`` greedy decode steps, each one token fed
    and the argmax of its logits picked (on the device with a sampler, else on the host), after
    one warm-up step; ``tokens`` lists the picks (the prefill's first)."""
    engine.reset()
    engine.cache.check_room(len(ids) + steps + 1)
    on_device = engine.sampler is not None
    step = engine.decode_greedy if on_device else (lambda token: int(np.argmax(engine.decode(token))))
    picks = [int(np.argmax(engine.prefill(ids)))]
    picks.append(step(picks[-1]))  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        picks.append(step(picks[-1]))
    seconds = time.perf_counter() - start
    return {"context": len(ids), "steps": steps, "ms_per_token": round(1000 * seconds / steps, 3),
            "tok_per_s": round(steps / seconds, 2), "sampling": "device" if on_device else "host",
            "tokens": picks}


def prefill_chunk_speed(engine: Engine, context: int, chunk: int, reps: int = 5) -> dict[str, float]:
    """Time of one ``chunk``-token prefill call appended to ``context`` random cached tokens: the
    median of ``reps`` calls, the cache truncated back to ``context`` before each (after a warm-up
    call at the same shapes)."""
    ids = random_ids(engine, chunk)
    engine.fill_random(context)
    times = []
    for _ in range(reps + 1):
        engine.truncate(context)
        start = time.perf_counter()
        engine.prefill(ids)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times[1:]))
    return {"context": context, "tokens": chunk, "seconds": round(seconds, 4),
            "tok_per_s": round(chunk / seconds, 2)}


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model name, core count and vector flags from ``/proc/cpuinfo`` (Linux)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    first = cpuinfo.split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name", platform.processor()),
            "cpu_id": " ".join(f"{key} {fields[key]}" for key in ("cpu family", "model", "stepping") if key in fields),
            "cpu_logical": cpuinfo.count("processor\t:") or None,
            "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def machine_info(engine: Engine) -> dict[str, Any]:
    info = {"target": engine.meta.target, "dtype": engine.meta.dtype, "quantization": engine.meta.quantization,
            "model": engine.meta.model.name,
            "host": platform.node(), "cpu": platform.processor()}
    if engine.meta.target.startswith("cuda"):
        info["device"] = engine.device.device_name
    return info
