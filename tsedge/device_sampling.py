"""Sampling on the device: the runtime side of a library's ``sample`` function.

The logits stay on the device; ``sample`` applies the penalties, picks the token (greedy, or
temperature + top-k + top-p and a draw at a uniform number the host takes from the seeded
generator, as ``tsedge.sampling.Sampler`` does), writes it into the engine's token tensor (the
next decode step's input) and updates the penalty state in place. Per step the host uploads at
most the 32-byte parameter row (only when sampling, for the uniform number) and reads back the
4-byte token id; every tensor lives at a fixed address for the whole session.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import tvm

from tsedge.models.sampling_layout import (FREQUENCY, PARAMS, PRESENCE, REPETITION, TEMPERATURE, TOP_K, TOP_P,
                                          UNIFORM, WINDOW)
from tsedge.sampling import SamplingParams

SAMPLE_FUNCTION = "sample"


def param_row(params: SamplingParams, u: float = 0.0) -> np.ndarray:
    """``sample``'s params[PARAMS] float32 for ``params`` and the draw's uniform number ``u``."""
    row = np.zeros(PARAMS, np.float32)
    row[[TEMPERATURE, TOP_P, TOP_K, REPETITION, PRESENCE, FREQUENCY]] = [
        params.temperature, params.top_p, params.top_k, params.repetition_penalty, params.presence_penalty,
        params.frequency_penalty]
    row[UNIFORM] = min(u, float(np.nextafter(np.float32(1), np.float32(0))))  # stays below 1 in float32
    row[WINDOW] = 1.0 if params.repeat_last_n else 0.0
    return row


def penalty_state(vocab: int, params: SamplingParams, history: list[int],
                  generated: Counter[int]) -> tuple[np.ndarray, np.ndarray]:
    """``sample``'s counts[2, vocab] and recent[R + 1] int32 for a sequence ``history`` (prompt
    and output) whose output tokens are ``generated`` (token id -> occurrences).

    counts[0]: occurrences in the repetition window (the last ``repeat_last_n`` tokens, or all);
    counts[1]: occurrences in the output. recent: [ring slot of the oldest window token, then the
    ring of R = ``repeat_last_n`` slots, -1 where empty] (R = 1, unused, for ``repeat_last_n`` 0).
    Raises ValueError for a token id outside [0, vocab).
    """
    n = params.repeat_last_n
    window = history[-n:] if n else history
    ids = list(window) + list(generated)
    if ids and not 0 <= min(ids) <= max(ids) < vocab:
        raise ValueError(f"token id {min(ids) if min(ids) < 0 else max(ids)} is outside the vocabulary of {vocab}")
    counts = np.zeros((2, vocab), np.int32)
    np.add.at(counts[0], np.asarray(window, np.int64), 1)
    for token, times in generated.items():
        counts[1, token] = times
    recent = np.full(max(n, 1) + 1, -1, np.int32)
    if n:
        recent[1:1 + len(window)] = window
        recent[0] = len(window) % n  # full: slot 0 holds the oldest; else the first empty slot
    else:
        recent[0] = 0
    return counts, recent


class DeviceSampler:
    """Picks each next token of a generation on the device (a library with ``sample``).

    ``start(params, prompt)`` before a generation, then ``pick(logits, token)`` per step:
    ``logits`` [1, vocab] float32 on the device (``decode``/``prefill``'s result), ``token`` [1]
    int32 on the device receives the id, which is also returned."""

    def __init__(self, vm, device: tvm.runtime.Device, vocab: int) -> None:
        self._sample = vm[SAMPLE_FUNCTION]
        self.vocab = vocab
        self.params_t = tvm.runtime.empty((PARAMS,), "float32", device)
        self.counts = tvm.runtime.empty((2, vocab), "int32", device)
        self.workspace = tvm.runtime.empty((vocab,), "float32", device)
        self.recent: tvm.runtime.Tensor | None = None
        self.device = device
        self.params: SamplingParams | None = None  # until ``start``
        self.rng = np.random.default_rng()

    def start(self, params: SamplingParams, prompt: Iterable[int] = (),
              generated: Counter[int] | None = None) -> None:
        """Begin a generation after ``prompt`` (and ``generated`` output tokens already in it):
        seed the generator and upload the penalty state (once per generation)."""
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        counts, recent = penalty_state(self.vocab, params, list(prompt), generated or Counter())
        self.counts.copyfrom(counts)
        if self.recent is None or self.recent.shape[0] != recent.shape[0]:
            self.recent = tvm.runtime.tensor(recent, self.device)
        else:
            self.recent.copyfrom(recent)
        self.params_t.copyfrom(param_row(params))

    def pick(self, logits: tvm.runtime.Tensor, token: tvm.runtime.Tensor) -> int:
        """The next token id for ``logits``, written to ``token`` on the device. Raises
        RuntimeError before ``start``."""
        if self.params is None:
            raise RuntimeError("DeviceSampler.pick before start: call start(params, prompt) first")
        if self.params.temperature > 0:
            self.params_t.copyfrom(param_row(self.params, float(self.rng.random())))
        self._sample(logits, self.params_t, self.counts, self.recent, token, self.workspace)
        return int(token.numpy()[0])
