"""Long-text perplexity (``ppl``): mean next-token loss per position bucket of a long natural
document, for comparing a selecting policy with dense attention on the same tokens.

The compiled library returns the logits of a call's last token only (``prefill`` runs a whole
chunk but gives one row), so the loss of a position is read from a teacher-forced **decode step**:
the document up to a scored stretch is prefilled, then each token of the stretch is fed with
``decode`` and the logits it returns score the next document token. Each of ``buckets`` equal
stretches of positions is scored on its last ``window`` positions, which measures the policy where
it matters in use (decode, with the context up to that bucket's end) at a fraction of the cost of
decoding every position (a decode step costs several prefill tokens' time on a CPU). The text is
``haystack.prose_sentences`` from a random sentence on.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np

from tsedge.eval.haystack import filler, prose_sentences

BUCKETS = 4
WINDOW = 32


def document(tokenizer, length: int, rng: random.Random) -> list[int]:
    """The first ``length`` tokens (BOS first if the model adds one) of the prose from a random
    sentence on, each sentence at most once. Raises ValueError when the whole text is shorter."""
    take = filler("prose", rng)
    total = len(prose_sentences())
    sentences = min(total, max(1, length // 16))
    while True:  # a sentence has well over 16 tokens on average: rarely more than one pass
        ids = tokenizer.encode(" ".join(take(sentences)))
        if len(ids) >= length:
            return ids[:length]
        if sentences == total:
            raise ValueError(f"ppl's text (CPython's docs prose) has {len(ids)} tokens, fewer than {length}; "
                             "use shorter --lengths for ppl")
        sentences = min(total, 2 * sentences)


def scored_positions(length: int, buckets: int = BUCKETS, window: int = WINDOW) -> list[range]:
    """Per bucket, the positions whose loss is measured: the last ``window`` of each of
    ``buckets`` equal stretches of ``length`` tokens. Raises ValueError when a bucket is not
    longer than the window (position 0 has no loss; stretches must not overlap)."""
    if length // buckets <= window:
        raise ValueError(f"ppl needs more than {window} tokens per bucket: length {length} gives "
                         f"{length // buckets} in each of {buckets}; use a longer --lengths entry")
    ends = [length * (b + 1) // buckets for b in range(buckets)]
    return [range(end - window, end) for end in ends]


def next_token_loss(logits: np.ndarray, target: int) -> float:
    """Cross-entropy of ``target`` under ``softmax(logits)`` in nats (float64)."""
    values = logits.astype(np.float64)
    return float(np.logaddexp.reduce(values) - values[target])


def bucket_losses(engine, ids: list[int], buckets: int = BUCKETS, window: int = WINDOW) -> list[dict[str, Any]]:
    """Per bucket of ``ids`` (one document, from an empty cache): its scored positions and their
    mean loss in nats. Position ``t`` is scored by ``decode(ids[t - 1])`` after ``ids[:t - 1]``."""
    engine.reset()
    out = []
    for positions in scored_positions(len(ids), buckets, window):
        start = positions.start
        if start - 1 > len(engine.cache):
            engine.prefill(ids[len(engine.cache):start - 1])
        losses = [next_token_loss(engine.decode(ids[t - 1]), ids[t]) for t in positions]
        out.append({"start": start, "end": positions.stop, "loss": float(np.mean(losses))})
    return out


def summarize(per_document: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean loss and perplexity per bucket and over all scored positions of several documents."""
    rows = []
    for parts in zip(*per_document):
        loss = float(np.mean([p["loss"] for p in parts]))
        rows.append({"start": parts[0]["start"], "end": parts[0]["end"], "loss": loss, "ppl": math.exp(loss)})
    loss = float(np.mean([r["loss"] for r in rows]))
    return {"loss": loss, "ppl": math.exp(loss), "buckets": rows}
