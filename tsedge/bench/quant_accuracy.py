"""How close a quantized library stays to the float one on natural text: both read the same text
teacher-forced (prefill of a prompt, then one decode step per token), and at every position the
next-token distributions are compared (top-1 agreement, KL) and each model's perplexity of the
true next tokens is taken."""

from __future__ import annotations

from typing import Any

import numpy as np

from tsedge.engine import Engine
from tsedge.eval.agreement import forced_logits, kl_divergence


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    return z - np.logaddexp.reduce(z)


def text_accuracy(reference: Engine, candidate: Engine, ids: list[int], prompt: int) -> dict[str, Any]:
    """Compare ``candidate`` with ``reference`` at each of the ``len(ids) - prompt`` positions
    after the first ``prompt`` tokens of ``ids``: top-1 agreement, KL(reference || candidate) in
    nats (mean, max), and each model's perplexity of ``ids[prompt:]``.

    Raises ValueError when ``ids`` has no token after the prompt."""
    if not 0 < prompt < len(ids):
        raise ValueError(f"need 0 < prompt ({prompt}) < text tokens ({len(ids)})")
    head, tail = ids[:prompt], ids[prompt:]
    want = forced_logits(reference, head, tail[:-1])
    got = forced_logits(candidate, head, tail[:-1])
    kls = [kl_divergence(w, g) for w, g in zip(want, got)]
    top1 = [int(np.argmax(w)) == int(np.argmax(g)) for w, g in zip(want, got)]

    def perplexity(logits: list[np.ndarray]) -> float:
        return float(np.exp(-np.mean([_log_softmax(lg)[t] for lg, t in zip(logits, tail)])))

    return {"prompt_tokens": prompt, "positions": len(tail), "top1_agreement": float(np.mean(top1)),
            "mean_kl": float(np.mean(kls)), "max_kl": float(np.max(kls)),
            "reference_ppl": perplexity(want), "candidate_ppl": perplexity(got),
            "finite": bool(all(np.isfinite(g).all() for g in got))}
