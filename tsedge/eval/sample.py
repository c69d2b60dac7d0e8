"""One generated test case, its greedy answer, and RULER's scoring rules.

Scoring follows RULER (NVIDIA/RULER, ``scripts/eval/synthetic/constants.py``): case-insensitive
substring match of each reference in the model's answer; ``string_match_all`` (its metric for
NIAH and variable tracking) scores the fraction of references found.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from tsedge.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Sample:
    """A prompt (token ids, chat template and answer prefix included), the strings a correct
    answer contains, and how many tokens the answer may take."""

    prompt: list[int]
    references: list[str]
    max_new_tokens: int


def sample_rng(seed: int, *parts: object) -> random.Random:
    """A generator for one sample, fixed by the run's seed and the sample's coordinates (task,
    haystack, length, index): the same sample for every policy and whatever else the run holds."""
    return random.Random(":".join(map(str, (seed, *parts))))  # str seeds hash with SHA-512: stable


def string_match_all(answer: str, references: list[str]) -> float:
    """Fraction of ``references`` found in ``answer`` (case-insensitive), in [0, 1]."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    text = answer.lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def answer(engine, sample: Sample) -> dict[str, Any]:
    """The greedy answer to ``sample`` from an empty cache, scored by ``string_match_all``."""
    engine.reset()
    out = engine.generate(sample.prompt, sample.max_new_tokens, SamplingParams(temperature=0.0))
    text = engine.tokenizer.decode(out.tokens, skip_special_tokens=True)
    return {"references": sample.references, "answer": text,
            "score": string_match_all(text, sample.references), "prompt_tokens": len(sample.prompt),
            "selection_cache": engine.selection_stats()}
