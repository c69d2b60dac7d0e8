"""Token sampling on the host: penalties, then greedy or temperature + top-k + top-p (seeded).

Order per step, as transformers' ``generate`` and vLLM apply them: repetition penalty, presence
and frequency penalties, then greedy (temperature 0) or temperature, top-k, top-p and a draw.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

# Sampling defaults when the weights carry none (llama.cpp, Ollama and MLC-LLM sample by default).
# Repetition penalty 1.1 over the last 64 tokens is Ollama's default (llama.cpp's repeat_last_n):
# without it small models such as SmolLM2-135M loop on long replies at T 0.7.
PEER_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}
# Fields of a Hugging Face generation_config.json that set our sampling defaults.
GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")
TOP_P_CANDIDATES = 1024  # tokens _top_p sorts first


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is picked; the default is greedy (the library API stays deterministic).

    ``temperature`` divides the logits (0: greedy); ``top_p`` keeps the smallest set of tokens
    whose probability reaches it; ``top_k`` keeps the k most likely tokens (0: off);
    ``repetition_penalty`` (CTRL, arXiv 1909.05858; 1: off), ``presence_penalty`` and
    ``frequency_penalty`` (OpenAI's, in logits; 0: off) are defined in the functions of those
    names below;
    the repetition penalty looks at the last ``repeat_last_n`` tokens of prompt + output
    (llama.cpp's ``repeat_last_n``; 0: all of them, as transformers).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature", ">= 0"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (self.top_k >= 0, "top_k", ">= 0 (0 = off)"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             "repetition_penalty", "> 0 (1 = off)"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2] (0 = off)"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2] (0 = off)"),
            (self.repeat_last_n >= 0, "repeat_last_n", ">= 0 (0 = all tokens)"),
            (self.seed is None or self.seed >= 0, "seed", ">= 0"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")


def generation_config_defaults(model_path: Path) -> dict[str, float]:
    """The sampling fields (``GENERATION_CONFIG_FIELDS``) of the ``generation_config.json`` in a
    Hugging Face model folder, as transformers reads them; {} for a file (GGUF) or a folder
    without one."""
    path = model_path / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable generation config ({err}); fix or delete it") from err
    found = {name: config[name] for name in GENERATION_CONFIG_FIELDS if config.get(name) is not None}
    try:
        SamplingParams(**found)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}; fix the file or give the option") from None
    return found


def repetition_penalty(logits: np.ndarray, seen: Iterable[int], penalty: float) -> np.ndarray:
    """CTRL's repetition penalty, as transformers' ``RepetitionPenaltyLogitsProcessor``: the logit
    of every token in ``seen`` (prompt and output so far) is divided by ``penalty`` when positive
    and multiplied by it when negative (each token once, however often it occurred)."""
    ids = np.unique(np.fromiter(seen, dtype=np.int64))
    out = logits.copy()
    picked = out[ids]
    out[ids] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def presence_penalty(logits: np.ndarray, generated: Iterable[int], penalty: float) -> np.ndarray:
    """OpenAI's presence penalty: ``penalty`` is subtracted once from the logit of every token
    present in the output so far (``generated``), however often it occurred."""
    ids = np.unique(np.fromiter(generated, dtype=np.int64))
    out = logits.copy()
    out[ids] -= penalty
    return out


def frequency_penalty(logits: np.ndarray, counts: Counter[int], penalty: float) -> np.ndarray:
    """OpenAI's frequency penalty: ``penalty`` times the number of times a token occurs in the
    output so far (``counts``: token id -> occurrences) is subtracted from its logit."""
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    out = logits.copy()
    out[ids] -= penalty * np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
    return out


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits (and any tied with the k-th), as transformers' TopKLogitsWarper."""
    if k == 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def _top_p(probs: np.ndarray, p: float) -> np.ndarray:
    """Keep the most likely tokens until their probability reaches ``p`` (ties: lower id first);
    renormalize. Sorts only the likeliest candidates (``TOP_P_CANDIDATES``, more while they do not
    reach ``p``): a full sort of a 128K vocabulary costs ~10 ms a token on a CPU."""
    if p >= 1:
        return probs
    count = min(TOP_P_CANDIDATES, probs.size)
    while True:
        top = np.argpartition(-probs, count - 1)[:count] if count < probs.size else np.arange(probs.size)
        order = top[np.lexsort((top, -probs[top]))]  # by probability, then id
        cut = min(int(np.searchsorted(np.cumsum(probs[order]), p)), count - 1)
        # exact once the cut lies above the candidates' smallest probability (no tie at the border)
        if count == probs.size or probs[order[cut]] > probs[order[-1]]:
            break
        count = min(4 * count, probs.size)
    keep = order[: cut + 1]
    kept = np.zeros_like(probs)
    kept[keep] = probs[keep]
    return kept / kept.sum()


class Sampler:
    """Picks each next token of one generation from float32 logits; remembers the prompt and
    its own picks for the penalties."""

    def __init__(self, params: SamplingParams, prompt: Iterable[int] = ()) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.history = list(prompt)
        self.generated: Counter[int] = Counter()  # output token id -> occurrences

    def __call__(self, logits: np.ndarray) -> int:
        token = self.pick(logits, self.uniform())
        self.record(token)
        return token

    def uniform(self) -> float:
        """The uniform number in [0, 1) of the next draw from the seeded generator (one per
        sampled step, none when greedy: returns 0.0 without advancing the generator)."""
        return float(self.rng.random()) if self.params.temperature > 0 else 0.0

    def record(self, token: int) -> None:
        """Remember a picked token for the penalties."""
        self.history.append(token)
        self.generated[token] += 1

    def pick(self, logits: np.ndarray, u: float) -> int:
        """The token for ``logits`` [vocab] (any float dtype) after the penalties, drawn at the
        uniform number ``u`` (unused when greedy); the state is not changed."""
        return self._pick(self._penalized(np.asarray(logits, dtype=np.float64).reshape(-1)), u)

    def _penalized(self, logits: np.ndarray) -> np.ndarray:
        p = self.params
        if p.repetition_penalty != 1 and self.history:
            window = self.history[-p.repeat_last_n:] if p.repeat_last_n else self.history
            logits = repetition_penalty(logits, window, p.repetition_penalty)
        if p.presence_penalty != 0 and self.generated:
            logits = presence_penalty(logits, self.generated, p.presence_penalty)
        if p.frequency_penalty != 0 and self.generated:
            logits = frequency_penalty(logits, self.generated, p.frequency_penalty)
        return logits

    def _pick(self, logits: np.ndarray, u: float) -> int:
        p = self.params
        if p.temperature == 0:
            return int(np.argmax(logits))
        z = _top_k(logits / p.temperature, p.top_k)
        probs = np.exp(z - z.max())
        probs = _top_p(probs / probs.sum(), p.top_p)
        return inverse_cdf(probs, u)


def inverse_cdf(probs: np.ndarray, u: float) -> int:
    """The first token whose cumulative probability (in id order) exceeds ``u`` in [0, 1): what
    numpy's ``Generator.choice(n, p=probs)`` returns when its ``random()`` gives ``u``."""
    cdf = np.cumsum(probs)
    return int(np.searchsorted(cdf / cdf[-1], u, side="right"))
