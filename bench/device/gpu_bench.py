"""GPU run (on the device machine, TVM runtime only): greedy check and decode speed.

Usage: python3 bench/device/gpu_bench.py GGUF LIBS_DIR OUT_JSON
Prints a short table last; writes every number to OUT_JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch  # noqa: F401  (loads libcudart for TVM's CUDA runtime)

from tsedge.bench.long_context import random_params
from tsedge.bench.speed import decode_speed, machine_info, prefill_speed
from tsedge.engine import Engine
from tsedge.models.library import LibraryMeta
from tsedge.weights import load_source

CONTEXTS = (4096, 32768)


def greedy_check(lib: Path, source, reference: dict) -> dict:
    engine = Engine(lib, source)
    result = engine.generate(reference["prompt"], max_new_tokens=len(reference["greedy"]), stop_ids=[])
    same = 0
    for a, b in zip(result.tokens, reference["greedy"]):
        if a != b:
            break
        same += 1
    return {"lib": lib.name, "tokens": result.tokens, "matching_prefix": same,
            "of": len(reference["greedy"]), "equal": result.tokens == reference["greedy"],
            "text": source.tokenizer.decode(result.tokens)}


def speed(engine: Engine) -> dict:
    out = {"info": machine_info(engine), "prefill": [prefill_speed(engine, 512)], "decode": []}
    for context in (128, *CONTEXTS):
        out["decode"].append(decode_speed(engine, context, steps=64))
    return out


def main() -> None:
    gguf, libs, out_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    reference = json.loads((libs / "cpu_reference.json").read_text())
    source = load_source(str(gguf))
    results = {"greedy": [greedy_check(libs / f"smol-{d}.so", source, reference)
                          for d in ("float32", "float16")]}
    results["smollm2-135m"] = speed(Engine(libs / "smol-float16.so", source))
    params, keep = random_params(LibraryMeta.load(libs / "llama3-8b.json"))
    results["llama3-8b-random"] = speed(Engine(libs / "llama3-8b.so", None, params=params))
    del keep
    out_path.write_text(json.dumps(results, indent=1))
    print("\n== greedy vs CPU (llvm float32) ==")
    for g in results["greedy"]:
        print(f"{g['lib']:22s} matching prefix {g['matching_prefix']}/{g['of']}  equal={g['equal']}")
    print("\n== decode tok/s (ms/token) ==")
    for name in ("smollm2-135m", "llama3-8b-random"):
        r = results[name]
        cells = "  ".join(f"{d['context']}: {d['tok_per_s']} ({d['ms_per_token']} ms)" for d in r["decode"])
        print(f"{name:18s} prefill512 {r['prefill'][0]['tok_per_s']} tok/s | decode {cells}")
    print("device:", results["smollm2-135m"]["info"].get("device"))


if __name__ == "__main__":
    main()
