"""NumPy float64 reference of TidalDecode's selection and sparse attention (arXiv 2410.05076).

Layouts follow ``tir_kernels/common.py``: ``q[n, H, d]`` before RoPE, keys in
``kv[layer, 0, n_kv, capacity, d]`` without RoPE, ``table[P, d]`` = cos | sin.
"""

from __future__ import annotations

import numpy as np
from attention_reference import rotate


def logits(q: np.ndarray, keys: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``[H, L]``: the last query's ``q.k / sqrt(d)`` over ``keys[n_kv, L, d]``, key ``t`` and the
    query at their true positions ``t`` and ``L - 1``."""
    n_heads, d = q.shape[1:]
    length = keys.shape[1]
    qr = rotate(q[-1].astype(np.float64), np.full(n_heads, length - 1), table)  # [H, d]
    kr = np.repeat(rotate(keys.astype(np.float64), np.arange(length), table), n_heads // len(keys), axis=0)
    return np.einsum("hd,htd->ht", qr, kr) / np.sqrt(d)


def set_logits(head_logits: np.ndarray, sets: int) -> np.ndarray:
    """``[sets, L]``: per query head as they are, per KV head the max over its group."""
    return head_logits.reshape(sets, -1, head_logits.shape[1]).max(axis=1)


def select(scores: np.ndarray, budget: int) -> np.ndarray:
    """``[sets, budget]`` int32: per row the ``budget - 1`` largest of ``scores[:, :L - 1]`` (ties:
    lower position first), sorted, then ``L - 1`` (the current token is always kept)."""
    length = scores.shape[1]
    order = np.argsort(-scores[:, :length - 1], axis=1, kind="stable")[:, :budget - 1]
    last = np.full((len(scores), 1), length - 1)
    return np.concatenate([np.sort(order, axis=1), last], axis=1).astype(np.int32)


def sparse_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, rows: np.ndarray,
                     table: np.ndarray) -> np.ndarray:
    """Attention of ``q[n, H, d]`` where head ``h`` reads the rows ``rows[h * sets // H]`` of
    ``keys/values[n_kv, cap, d]`` at their true positions; query ``i`` sits at
    ``rows[set, -1] - n + 1 + i`` and sees the rows up to it. -> ``[n, H, d]`` float64."""
    n, n_heads, d = q.shape
    group, sets = n_heads // len(keys), len(rows)
    out = np.zeros((n, n_heads, d))
    for h in range(n_heads):
        r = rows[h * sets // n_heads].astype(np.int64)
        kvh = h // group
        qpos = r[-1] - n + 1 + np.arange(n)
        qr = rotate(q[:, h].astype(np.float64), qpos, table)  # [n, d]
        kr = rotate(keys[kvh, r].astype(np.float64), r, table)  # [M, d]
        s = qr @ kr.T / np.sqrt(d)
        s[r[None, :] > qpos[:, None]] = -np.inf
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ values[kvh, r].astype(np.float64)
    return out
