"""Whether the partial caches Recycled Attention builds from a NIAH prompt hold the needle's value:
the library's own ``cache_idx`` after the prefill, per layer and KV head (CPU, seconds per sample).
Run: ``python bench/probe_recycled.py --model smollm2-135m --length 2048 -o bench/results/x.json``.

Per sample and layer: the number of the value's tokens that the best KV head's partial cache holds.
"""

from __future__ import annotations

import argparse
import json

from probe_tidaldecode import value_span

from tsedge.engine import Engine
from tsedge.eval import niah
from tsedge.eval.sample import sample_rng
from tsedge.library_cache import ensure_library
from tsedge.models.config import PolicyConfig, parse_recycle_k
from tsedge.weights import load_source


def probe(model: str, length: int, samples: int, seed: int, recycle_k: int | str) -> dict:
    source = load_source(model)
    policy = PolicyConfig("recycled", recycle_k=recycle_k)
    engine = Engine(ensure_library(source.config, policy, "llvm", "float32", length + 64), source)
    rows = []
    for i in range(samples):
        sample = niah.make_sample("niah_single", source.tokenizer, length, sample_rng(seed, "niah_single", "prose", length, i),
                                  "prose")
        span = set(value_span(source.tokenizer, sample.prompt, sample.references[0]))
        engine.reset()
        engine.prefill(sample.prompt)
        caches = engine.state("cache_idx")[:, :, :engine.state("recycle_k")[0]]  # [layers, n_kv, active K]
        held = [max(len(span & set(head.tolist())) for head in layer) for layer in caches]
        rows.append({"sample": i, "value_tokens": len(span), "held_per_layer": held,
                     "layers_holding_all": sum(h == len(span) for h in held)})
    return {"model": model, "length": length, "recycle_k": recycle_k, "samples": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recycle-k", type=parse_recycle_k, default=PolicyConfig().recycle_k,
                        help="a token count or a fraction of the prompt (default: the paper's 1/8)")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    result = probe(args.model, args.length, args.samples, args.seed, args.recycle_k)
    print(json.dumps(result["samples"]))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
