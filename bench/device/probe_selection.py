"""What TokenSelect selects after a passkey prompt's prefill (the last chunk's top-k per layer).

Per length and layer: how many distinct token ids the top-k rows hold, the most frequent ones, and
which fractions of the key's digits and of its sentence are selected; plus the top next tokens. Run:
``python probe_selection.py --model M.gguf --lib tokenselect.so --lengths 57344,63488 -o out.json``.
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np

from tsedge.engine import Engine
from tsedge.eval.passkey import build_prompt


def probe(engine: Engine, length: int, depth: float, key: int) -> dict:
    tok = engine.tokenizer
    prompt = build_prompt(tok, length, depth, key)
    other = build_prompt(tok, length, depth, 11111 if key != 11111 else 22222)
    digits = {i for i, (a, b) in enumerate(zip(prompt, other)) if a != b}
    sentence = set(range(min(digits) - 4, max(digits) + 6))  # "The pass key is N…N … the pass key."
    engine.reset()
    logits = engine.prefill(prompt)
    selected = engine.state("cache_idx")
    layers = []
    for layer, rows in enumerate(selected):
        counts = collections.Counter(prompt[r] for r in rows)
        layers.append({"layer": layer, "distinct_tokens": len(counts),
                       "top_tokens": [(tok.decode([t]), n) for t, n in counts.most_common(4)],
                       "key_digits_selected": len(digits & set(rows.tolist())) / len(digits),
                       "key_sentence_selected": len(sentence & set(rows.tolist())) / len(sentence),
                       "span": [int(rows.min()), int(rows.max())]})
    best = np.argsort(-logits)[:5]
    return {"length": len(prompt), "depth": depth, "key": key,
            "next_token": [(tok.decode([int(t)]), float(logits[t])) for t in best], "layers": layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--lib", required=True)
    ap.add_argument("--lengths", default="57344,63488")
    ap.add_argument("--depth", type=float, default=1.0)
    ap.add_argument("--key", type=int, default=60494)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    engine = Engine(args.lib, args.model, max_context=max(lengths) + 256)
    results = [probe(engine, n, args.depth, args.key) for n in lengths]
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    for r in results:
        print(r["length"], "next:", r["next_token"][:3])
        for layer in r["layers"][::6]:
            print(f"  layer {layer['layer']:2d}: {layer['distinct_tokens']:4d} distinct, "
                  f"key digits {layer['key_digits_selected']:.0%}, "
                  f"sentence {layer['key_sentence_selected']:.0%}, top {layer['top_tokens'][:3]}")


if __name__ == "__main__":
    main()
