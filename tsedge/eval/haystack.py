"""Filler text for the synthetic long-context tasks, needle placement, and fitting a prompt to a
token length. Technique of RULER (NVIDIA/RULER, ``scripts/data/synthetic/niah.py``): a haystack of
sentences grown until the prompt reaches the length (binary search), items inserted at depths drawn
from 40 evenly spaced percentages.

Two haystacks:

- ``repeat``: RULER's "noise" haystack, five short sentences repeated (the passkey filler).
- ``prose``: natural English. RULER uses Paul Graham's essays (downloaded); here the prose
  paragraphs of CPython's language reference as ``pydoc_data.topics`` ships it with Python (PSF
  License), code blocks, grammar, lists and headings left out, so nothing is downloaded. A
  haystack longer than the text (~26K SmolLM2 tokens) wraps around to its start, as RULER
  repeats its essays.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Sequence

FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")  # RULER's noise haystack, also the passkey filler
HAYSTACKS = ("repeat", "prose")
DEPTHS = tuple(round(100 * i / 39) for i in range(40))  # RULER: np.linspace(0, 100, 40), rounded
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")


@functools.cache
def prose_sentences() -> tuple[str, ...]:
    """The distinct sentences of the prose paragraphs of CPython's pydoc topics, in document order
    (~1,000 sentences, ~26K SmolLM2 tokens)."""
    import pydoc_data.topics

    sentences: list[str] = []
    for topic in pydoc_data.topics.topics.values():
        for block in re.split(r"\n\s*\n", topic):
            lines = block.strip("\n").split("\n")
            if any(line.startswith((" ", "\t", "*", "-", "=", ">")) for line in lines):
                continue  # code, grammar rules, lists, headings and their underlines
            text = re.sub(r"(?<=\w)- (?=[a-z])", "-", " ".join(line.strip() for line in lines))
            if text.endswith(".") and len(text) >= 40:
                sentences.extend(_SENTENCE_END.split(text))
    return tuple(dict.fromkeys(sentences))  # topics share passages: each sentence once, so no copying


def filler(haystack: str, rng: random.Random) -> Callable[[int], list[str]]:
    """``take(n)``: the first ``n`` sentences of a haystack (prose from a random sentence of the
    corpus on, wrapping around). Raises ValueError for an unknown haystack."""
    if haystack == "repeat":
        source, start = FILLER_SENTENCES, 0
    elif haystack == "prose":
        source = prose_sentences()
        start = rng.randrange(len(source))
    else:
        raise ValueError(f"unknown haystack {haystack!r}; choose from {', '.join(HAYSTACKS)}")
    return lambda n: [source[(start + i) % len(source)] for i in range(n)]


def draw_depths(rng: random.Random, count: int) -> list[int]:
    """``count`` distinct depths (percent) from RULER's 40, in increasing order."""
    return sorted(rng.sample(DEPTHS, count))


def insert_at_depths(sentences: Sequence[str], items: Sequence[str], depths: Sequence[int]) -> str:
    """The sentences with ``items[i]`` inserted after ``int(len * depths[i] / 100)`` of them
    (depths in increasing order, as ``draw_depths`` gives), joined by spaces."""
    out: list[str] = []
    done = 0
    for item, depth in zip(items, depths):
        at = int(len(sentences) * depth / 100)
        out += [*sentences[done:at], item]
        done = at
    return " ".join([*out, *sentences[done:]])


def fit(build: Callable[[int], list[int]], length: int) -> list[int]:
    """``build(n)`` for the largest filler size ``n`` whose prompt has at most ``length`` tokens
    (so one more filler sentence would pass it). Raises ValueError when ``build(0)`` is longer."""
    if len(build(0)) > length:
        raise ValueError(f"length {length} is shorter than the prompt without filler ({len(build(0))} "
                         "tokens); use a longer --lengths entry")
    lo, hi = 0, length  # every filler sentence has at least one token: ``length`` sentences is too many
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(build(mid)) <= length:
            lo = mid
        else:
            hi = mid - 1
    return build(lo)


def chat_prompt(tokenizer, user: str, answer_prefix: str = "") -> list[int]:
    """The chat-template prompt of one user message, the assistant's reply started with
    ``answer_prefix`` (RULER's answer prefix: the model continues it)."""
    ids = tokenizer.encode_chat([{"role": "user", "content": user}])
    return ids + tokenizer.encode(answer_prefix, add_special_tokens=False) if answer_prefix else ids
