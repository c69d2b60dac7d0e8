"""How close a selecting policy stays to dense attention: next-token agreement and KL."""

from __future__ import annotations

from typing import Any

import numpy as np

from tsedge.engine import Engine


def forced_logits(engine: Engine, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """Logits after the prompt and after each of ``tokens`` fed in turn (teacher forcing)."""
    engine.reset()
    return [engine.prefill(prompt)] + [engine.decode(t) for t in tokens]


def greedy(engine: Engine, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy continuation: (tokens, logits before each token)."""
    engine.reset()
    logits = [engine.prefill(prompt)]
    tokens = [int(np.argmax(logits[0]))]
    for _ in range(steps - 1):
        logits.append(engine.decode(tokens[-1]))
        tokens.append(int(np.argmax(logits[-1])))
    return tokens, logits


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(softmax(p) || softmax(q)) in nats."""
    lp = p_logits - np.logaddexp.reduce(p_logits.astype(np.float64))
    lq = q_logits - np.logaddexp.reduce(q_logits.astype(np.float64))
    return float(np.sum(np.exp(lp) * (lp - lq)))


def agreement(reference: Engine, candidate: Engine, prompt: list[int], steps: int) -> dict[str, Any]:
    """Dense's greedy path fed to both: top-1 agreement and KL(dense || candidate) per step."""
    tokens, want = greedy(reference, prompt, steps + 1)
    got = forced_logits(candidate, prompt, tokens[:steps])
    kls = [kl_divergence(w, g) for g, w in zip(got, want)]
    top1 = [bool(np.argmax(g) == np.argmax(w)) for g, w in zip(got, want)]
    return {"prompt_tokens": len(prompt), "steps": steps + 1, "top1_agreement": float(np.mean(top1)),
            "mean_kl": float(np.mean(kls)), "max_kl": float(np.max(kls)),
            "finite": bool(all(np.isfinite(g).all() for g in got)),
            "selection": candidate.selection_stats()}
