"""Variable tracking (``vt``), as RULER defines it (NVIDIA/RULER,
``scripts/data/synthetic/variable_tracking.py``; prompt and answer prefix from its ``constants.py``).

One chain of 4 hops hides in the haystack, in order, at distinct depths from RULER's 40:
"VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ...; the question asks for every variable assigned
12345 and the score is ``string_match_all`` over the 5 names. As in RULER, one solved example (a
short haystack, 3-letter names) comes before the question, and the answer prefix names the value.
"""

from __future__ import annotations

import random
import string

from tsedge.eval.haystack import chat_prompt, draw_depths, filler, fit, insert_at_depths
from tsedge.eval.sample import Sample

HOPS = 4
TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
            "{context}\nQuestion: Find all variables that are assigned the value {value} in the text above.")
ANSWER_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {count} "
                 "variables are assigned the value {value}, they are: ")
EXAMPLE_SENTENCES = 10  # filler sentences around the solved example's chain
MAX_NEW_TOKENS = 30  # RULER's tokens_to_generate for vt


def chain(rng: random.Random, letters: int, taken: set[str]) -> tuple[list[str], str, list[str]]:
    """(variable names, value, statements) of one chain of ``HOPS`` hops; names are ``letters``
    uppercase letters, none of them in ``taken`` (which gets them)."""
    names: list[str] = []
    while len(names) < HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in taken:
            taken.add(name)
            names.append(name)
    value = str(rng.randint(10000, 99999))
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    return names, value, statements


def _question(sentences: list[str], statements: list[str], depths: list[int], value: str) -> tuple[str, str]:
    """(user text, answer prefix) of one chain hidden in ``sentences``."""
    context = insert_at_depths(sentences, statements, depths)
    return (TEMPLATE.format(context=context, value=value),
            ANSWER_PREFIX.format(count=HOPS + 1, value=value))


def make_sample(tokenizer, length: int, rng: random.Random, haystack: str) -> Sample:
    """One ``vt`` sample of at most ``length`` prompt tokens (within one filler sentence of it).
    Raises ValueError for an unknown haystack or a length too short for the example and question."""
    take = filler(haystack, rng)
    taken: set[str] = set()
    example_names, example_value, example_chain = chain(rng, 3, taken)
    question, prefix = _question(take(EXAMPLE_SENTENCES), example_chain, draw_depths(rng, HOPS + 1),
                                 example_value)
    example = f"{question}\n{prefix}{' '.join(example_names)}\n\n"
    names, value, statements = chain(rng, 5, taken)
    depths = draw_depths(rng, HOPS + 1)
    take = filler(haystack, rng)  # prose: another stretch of the text than the example's

    def build(sentences: int) -> list[int]:
        user, answer_prefix = _question(take(sentences), statements, depths, value)
        return chat_prompt(tokenizer, example + user, answer_prefix.rstrip())

    return Sample(fit(build, length), names, MAX_NEW_TOKENS)
