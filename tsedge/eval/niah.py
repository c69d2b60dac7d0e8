"""Needle in a haystack, RULER's four variants (NVIDIA/RULER, ``scripts/synthetic.yaml`` and
``scripts/data/synthetic/niah.py``; prompt and answer prefix from its ``constants.py``).

A needle is "One of the special magic numbers for {key} is: {value}." with an adjective-noun key
and a 7-digit value. Variants (keys, values per key, keys asked):

- ``niah_single``: 1, 1, 1.
- ``niah_multikey``: 4, 1, 1 — three needles of other keys are distractors.
- ``niah_multivalue``: 1, 4, 1 — all four values of the key must be recalled.
- ``niah_multiquery``: 4, 1, 4 — the values of all four keys must be recalled.

Needles are shuffled and inserted at distinct depths drawn from RULER's 40; the score is
``string_match_all`` (fraction of the asked values in the answer).
"""

from __future__ import annotations

import random

from tsedge.eval.haystack import chat_prompt, draw_depths, filler, fit, insert_at_depths
from tsedge.eval.sample import Sample

VARIANTS = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1),
            "niah_multiquery": (4, 1, 4)}
NEEDLE = "One of the special magic numbers for {key} is: {value}."
TEMPLATE = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.\n{context}\n"
            "What are all the special magic numbers for {query} mentioned in the provided text?")
ANSWER_PREFIX = "The special magic numbers for {query} mentioned in the provided text are"
# RULER's single-answer wording: its replacements of "Some", "are all", "are" and "numbers".
SINGULAR = (("Some special magic numbers are", "A special magic number is"),
            ("the numbers afterwards", "the number afterwards"),
            ("What are all the special magic numbers", "What is the special magic number"),
            ("magic numbers for {query} mentioned in the provided text are",
             "magic number for {query} mentioned in the provided text is"))
ADJECTIVES = ("amber", "ancient", "bitter", "brave", "calm", "clever", "crooked", "curious", "dusty",
              "eager", "fragile", "gentle", "giant", "golden", "hollow", "humble", "frosty", "jolly", "lively",
              "lonely", "loud", "misty", "modest", "narrow", "nimble", "odd", "pale", "proud", "quiet",
              "rapid", "rusty", "silent", "silver", "sleepy", "smooth", "solid", "spicy", "steep", "swift",
              "tender", "tidy", "vivid", "wary", "wild", "wooden", "young")
NOUNS = ("anchor", "badger", "bakery", "beacon", "blanket", "bridge", "candle", "canyon", "castle",
         "cellar", "compass", "cottage", "crystal", "dolphin", "falcon", "feather", "fountain", "garden",
         "glacier", "harbor", "helmet", "island", "jungle", "kettle", "ladder", "lantern", "meadow",
         "mirror", "orchard", "parrot", "pebble", "pillow", "puzzle", "rabbit", "ribbon", "saddle",
         "scarecrow", "shovel", "spider", "teapot", "thimble", "tunnel", "violin", "walrus", "window")
MAX_NEW_TOKENS = 128  # RULER's tokens_to_generate for NIAH


def _wording(queries: int, values: int) -> tuple[str, str]:
    """(template, answer prefix) in RULER's singular wording when one value is asked for."""
    template, prefix = TEMPLATE, ANSWER_PREFIX
    if queries * values == 1:
        for plural, singular in SINGULAR:
            template, prefix = template.replace(plural, singular), prefix.replace(plural, singular)
    return template, prefix


def _join(items: list[str]) -> str:
    """RULER's list of keys in a question: "a", "a, and b", "a, b, and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def make_sample(task: str, tokenizer, length: int, rng: random.Random, haystack: str) -> Sample:
    """One ``task`` sample of at most ``length`` prompt tokens (within one filler sentence of it).
    Raises ValueError for an unknown task or haystack, or a length too short for the question."""
    if task not in VARIANTS:
        raise ValueError(f"unknown NIAH task {task!r}; choose from {', '.join(VARIANTS)}")
    n_keys, n_values, n_queries = VARIANTS[task]
    keys = [f"{a}-{n}" for a, n in rng.sample([(a, n) for a in ADJECTIVES for n in NOUNS], n_keys)]
    numbers = rng.sample(range(10**6, 10**7), n_keys * n_values)  # distinct: a distractor never answers
    values = [[str(v) for v in numbers[i * n_values:(i + 1) * n_values]] for i in range(n_keys)]
    needles = [NEEDLE.format(key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    depths = draw_depths(rng, len(needles))
    asked = sorted(rng.sample(range(n_keys), n_queries))
    query = _join([keys[i] for i in asked])
    template, prefix = _wording(n_queries, n_values)
    take = filler(haystack, rng)

    def build(sentences: int) -> list[int]:
        context = insert_at_depths(take(sentences), needles, depths)
        return chat_prompt(tokenizer, template.format(context=context, query=query), prefix.format(query=query))

    return Sample(fit(build, length), [v for i in asked for v in values[i]], MAX_NEW_TOKENS)
