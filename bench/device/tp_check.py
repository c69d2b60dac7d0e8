"""Tensor parallelism on GPUs against one GPU: same random weights (seeded per tensor), same tokens.

``python3 bench/device/tp_check.py LIB_DIR OUT_JSON [PROMPT]`` (device, several GPUs): for each
policy with ``<policy>.so`` and ``<policy>-tp2.so`` in LIB_DIR (``tsedge bench decode
--compile-only --tensor-parallel 1,2``), a greedy continuation of PROMPT random token ids (beyond
TokenSelect's 2,688-token budget by default, so its sharded selection runs) on one GPU and on two;
reports whether the tokens are equal, the first divergence, and the largest logit difference
relative to the largest logit over the steps both runs share.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tsedge.eval.agreement import greedy
from tsedge.tensor_parallel import open_engine

STEPS = 24


def main() -> None:
    lib_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    prompt_len = int(sys.argv[3]) if len(sys.argv) > 3 else 3000
    results = {}
    for policy in ("dense", "tokenselect"):
        if not (lib_dir / f"{policy}-tp2.so").exists():
            continue
        runs = {}
        for label in (policy, f"{policy}-tp2"):
            engine = open_engine(lib_dir / f"{label}.so", None, random_weights=True, max_context=8192)
            prompt = np.random.default_rng(1).integers(100, engine.meta.model.vocab_size, prompt_len).tolist()
            tokens, logits = greedy(engine, prompt, STEPS)
            runs[label] = (tokens, np.stack(logits), engine.selection_stats())
            engine.close()
            del engine
        (one, one_logits, one_stats), (two, two_logits, two_stats) = runs.values()
        same = next((i for i, (a, b) in enumerate(zip(one, two)) if a != b), len(one))
        scale = float(np.abs(one_logits).max())
        diff = float(np.abs(one_logits[:same + 1] - two_logits[:same + 1]).max()) / scale
        results[policy] = {"tokens_equal": one == two, "first_divergence": None if one == two else same,
                           "max_rel_logit_diff": diff, "tokens_1gpu": one, "tokens_2gpu": two,
                           "selection_1gpu": one_stats, "selection_2gpu": two_stats, "prompt_tokens": prompt_len}
        print(f"{policy:12s} tokens equal {one == two} (first divergence {results[policy]['first_divergence']}), "
              f"max |dlogit|/max|logit| {diff:.2e}, selection cache {one_stats} vs {two_stats}", flush=True)
    import torch

    out.write_text(json.dumps({"device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}", **results},
                              indent=1))


if __name__ == "__main__":
    main()
