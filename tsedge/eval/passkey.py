"""Passkey retrieval (as in the TokenSelect README): find a 5-digit key hidden in filler text.

The user message is the filler below, repeated sentence by sentence, with the key sentence placed
after a fraction ``depth`` of the filler sentences, then the question; the model's chat template
wraps it. A cell (length, depth) scores the fraction of greedy answers that contain the key.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from tsedge.bench.speed import machine_info
from tsedge.eval.haystack import FILLER_SENTENCES, fit
from tsedge.sampling import SamplingParams

FILLER = " ".join(FILLER_SENTENCES)
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."


def _prompt(tokenizer, sentences: int, depth: float, key: int) -> list[int]:
    """The chat prompt with ``sentences`` filler sentences, the key after ``depth`` of them."""
    filler = [FILLER_SENTENCES[i % len(FILLER_SENTENCES)] for i in range(sentences)]
    at = round(depth * sentences)
    haystack = " ".join(filler[:at] + [KEY_SENTENCE.format(key=key)] + filler[at:])
    return tokenizer.encode_chat([{"role": "user", "content": f"{haystack}\n\n{QUESTION}"}])


def build_prompt(tokenizer, length_tokens: int, depth: float, key: int) -> list[int]:
    """The longest prompt of at most ``length_tokens`` tokens (so within one filler sentence of
    it), key at ``depth`` in [0, 1] of the filler."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return fit(lambda sentences: _prompt(tokenizer, sentences, depth, key), length_tokens)


def ask(engine, prompt: list[int], key: int, max_new_tokens: int) -> dict[str, Any]:
    """One greedy answer from an empty cache (answers do not depend on the order of prompts)."""
    engine.reset()
    out = engine.generate(prompt, max_new_tokens, SamplingParams(temperature=0.0))
    answer = engine.tokenizer.decode(out.tokens, skip_special_tokens=True)
    return {"key": key, "answer": answer, "correct": str(key) in answer,
            "prompt_tokens": len(prompt), "selection_cache": engine.selection_stats()}


def run_passkey(engine, lengths: list[int], depths: list[float], keys_per_cell: int, seed: int,
                max_new_tokens: int = 16,
                progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Score every (length, depth) cell on ``keys_per_cell`` random 5-digit keys.

    ``max_new_tokens`` 16: SmolLM2 splits digits, and answers "The pass key is NNNNN" (10 tokens).

    ``progress`` gets each finished cell. Returns a JSON-able dict: ``config`` and ``cells``
    (length, depth, score, and per answer: key, text, correct, prompt tokens, selection-cache
    hits/lookups or None).
    """
    rng = random.Random(seed)
    cells = []
    for length in lengths:
        for depth in depths:
            keys = [rng.randrange(10000, 100000) for _ in range(keys_per_cell)]
            answers = [ask(engine, build_prompt(engine.tokenizer, length, depth, key), key,
                           max_new_tokens) for key in keys]
            cell = {"length": length, "depth": depth,
                    "score": sum(a["correct"] for a in answers) / keys_per_cell, "answers": answers}
            cells.append(cell)
            if progress is not None:
                progress(cell)
    meta = engine.meta
    config = {"lengths": lengths, "depths": depths, "keys_per_cell": keys_per_cell, "seed": seed,
              "max_new_tokens": max_new_tokens, "policy": meta.policy.to_dict(), **machine_info(engine)}
    return {"task": "passkey", "config": config, "cells": cells}


def _length_label(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def format_table(result: dict[str, Any]) -> str:
    """Markdown table: one row per depth, one column per length, correct/keys per cell."""
    config = result["config"]
    lengths, depths, keys = config["lengths"], config["depths"], config["keys_per_cell"]
    score = {(c["length"], c["depth"]): c["score"] for c in result["cells"]}
    policy = config["policy"]["name"]
    lines = [f"| {policy}: depth \\ length | " + " | ".join(map(_length_label, lengths)) + " |",
             "|---" * (len(lengths) + 1) + "|"]
    for depth in depths:
        row = [f"{round(score[length, depth] * keys)}/{keys}" for length in lengths]
        lines.append(f"| {depth:.0%} | " + " | ".join(row) + " |")
    mean = [sum(score[length, d] for d in depths) / len(depths) for length in lengths]
    lines.append("| mean | " + " | ".join(f"{m:.0%}" for m in mean) + " |")
    return "\n".join(lines)
