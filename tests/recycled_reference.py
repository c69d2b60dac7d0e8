"""NumPy float64 reference of Recycled Attention / RefreshKV (arXiv 2411.05787), as
``tir_kernels/recycle.py`` and ``models/attention/recycled.py`` compute it.

Layouts follow ``tir_kernels/common.py``; a layer's partial cache is ``idx[n_kv, K]`` (rows) and
``score[n_kv, K]``; its refresh state ``[partial_this_step, valid, partial_steps, decode_checks,
steps_since_full]``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import tidaldecode_reference as tidal
from tokenselect_reference import max_pool

NEW_TOKEN_SCORE = 2.0  # an appended token ranks above every probability


def query_mean(q: np.ndarray) -> np.ndarray:
    """``[d]``: the mean over heads of the step's last query ``q[-1]`` (before RoPE)."""
    return q[-1].astype(np.float64).mean(axis=0)


def scores(logits: np.ndarray, n_kv: int, pool: int) -> np.ndarray:
    """``[n_kv, L]``: per head softmax of ``logits[H, L]`` (natural units), max over each KV
    head's query heads, max-pooled over positions with the odd kernel ``pool``."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    grouped = p.reshape(n_kv, -1, p.shape[1]).max(axis=1)
    return np.stack([max_pool(row, pool) for row in grouped])


def top_rows(crit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row the ``k`` largest of ``crit`` (ties: lower position), sorted: (rows, their scores)."""
    idx = np.sort(np.argsort(-crit, axis=1, kind="stable")[:, :k], axis=1)
    return idx.astype(np.int32), np.take_along_axis(crit, idx, axis=1)


def append(idx: np.ndarray, score: np.ndarray, length: int) -> None:
    """In place, per KV head: the lowest (score, row) leaves, the last slot's entry takes its
    slot, the step's token ``length - 1`` the last slot."""
    for g in range(len(idx)):
        slot = min(range(idx.shape[1]), key=lambda j: (score[g, j], idx[g, j]))
        idx[g, slot], score[g, slot] = idx[g, -1], score[g, -1]
        idx[g, -1], score[g, -1] = length - 1, NEW_TOKEN_SCORE


def refresh_check(qmean: np.ndarray, cache_qbar: np.ndarray, state: np.ndarray, threshold: float | None,
                  stride: int, force_full: bool) -> bool:
    """One layer's decision (``cache_qbar[d]`` and ``state[5]`` updated in place); True: partial step.

    Partial when not forced, the cache is valid, and either the step is not a multiple of
    ``stride`` after the last full step or (``threshold`` not None) the cosine of the mean
    queries is at least ``threshold``."""
    since = state[4] + 1
    a, b = qmean.astype(np.float64), cache_qbar.astype(np.float64)
    cos = a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8)
    similar = threshold is not None and cos >= threshold
    partial = bool(not force_full and state[1] and (since % stride != 0 or similar))
    if not partial:
        cache_qbar[:] = qmean
    state[0], state[1] = int(partial), 1
    state[2] += int(partial)
    state[3] += int(not force_full)
    state[4] = since if partial else 0
    return partial


def capacity(recycle_k: int | str, max_context: int, min_k: int = 1) -> int:
    """K_max: a count as it is, a fraction ``"p/q"`` of ``max_context`` rounded up (at least ``min_k``)."""
    if isinstance(recycle_k, int):
        return recycle_k
    return max(math.ceil(Fraction(recycle_k) * max_context), min_k)


def active_k(recycle_k: int | str, context: int, max_context: int, min_k: int = 1) -> int:
    """The active K of a prefill ending at ``context`` tokens: the count, or ``round(fraction *
    context)`` (halves up) clamped to ``[min_k, K_max]``."""
    k_max = capacity(recycle_k, max_context, min_k)
    if isinstance(recycle_k, int):
        return k_max
    return min(max(math.floor(Fraction(recycle_k) * context + Fraction(1, 2)), min_k), k_max)


class PartialCaches:
    """Every layer's partial cache (``idx``/``score[layer, :, :k]``, ``k`` the active K of
    ``k_max`` slots) and refresh state, with the policy's two kinds of step."""

    def __init__(self, policy, num_layers: int, n_kv: int, head_dim: int, pool: int, max_context: int) -> None:
        self.policy, self.pool, self.max_context = policy, pool, max_context
        self.threshold = None if policy.recycle_fixed_stride else policy.recycle_threshold
        self.k, self.k_max = 0, capacity(policy.recycle_k, max_context, policy.recycle_min_k)
        self.idx = np.zeros((num_layers, n_kv, self.k_max), np.int32)
        self.score = np.zeros((num_layers, n_kv, self.k_max))
        self.qbar = np.zeros((num_layers, head_dim))
        self.state = np.zeros((num_layers, 5), np.int64)

    def set_k(self, length: int, prefill: bool) -> None:
        """A step beyond the budget: a prefill sets the active K, a decode step where unset."""
        if prefill or self.k == 0:
            self.k = active_k(self.policy.recycle_k, length, self.max_context, self.policy.recycle_min_k)

    def rebuild(self, layer: int, q: np.ndarray, keys: np.ndarray, table: np.ndarray) -> None:
        """From the last query of ``q`` over ``keys[n_kv, L, d]`` (RoPE at true positions)."""
        crit = scores(tidal.logits(q, keys, table), len(keys), self.pool)
        self.idx[layer, :, :self.k], self.score[layer, :, :self.k] = top_rows(crit, self.k)

    def append(self, layer: int, length: int) -> np.ndarray:
        """A partial step's update of the layer's active slots; their rows ``[n_kv, k]``."""
        append(self.idx[layer, :, :self.k], self.score[layer, :, :self.k], length)
        return self.idx[layer, :, :self.k]

    def decide(self, layer: int, q: np.ndarray, force_full: bool) -> bool:
        return refresh_check(query_mean(q), self.qbar[layer], self.state[layer], self.threshold,
                             self.policy.recycle_stride, force_full)
