"""NumPy float64 references for RoPE and the attention kernels (conventions in tir_kernels/common.py)."""

from __future__ import annotations

import numpy as np


def rope_table(inv_freq: np.ndarray, num_pos: int) -> np.ndarray:
    """cos | sin table, float64."""
    angle = np.arange(num_pos, dtype=np.float64)[:, None] * inv_freq.astype(np.float64)[None]
    return np.concatenate([np.cos(angle), np.sin(angle)], axis=1)


def rotate(x: np.ndarray, positions: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of ``x[..., t, d]`` at ``positions[t]``."""
    half = x.shape[-1] // 2
    cos, sin = table[positions, :half], table[positions, half:]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Causal attention of ``q[n, H, d]`` over the attended list ``keys/values[n_kv, M, d]``.

    Key j sits at position j, query i at ``M - n + i`` (the kernels' convention).
    """
    n, n_heads, d = q.shape
    n_kv, m, _ = keys.shape
    group = n_heads // n_kv
    qr = rotate(q.astype(np.float64).transpose(1, 0, 2), np.arange(m - n, m), table)  # [H, n, d]
    kr = rotate(keys.astype(np.float64), np.arange(m), table)  # [n_kv, M, d]
    kr = np.repeat(kr, group, axis=0)
    vals = np.repeat(values.astype(np.float64), group, axis=0)
    scores = qr @ kr.transpose(0, 2, 1) / np.sqrt(d)  # [H, n, M]
    mask = np.arange(m)[None, :] > (m - n + np.arange(n))[:, None]
    scores[:, mask] = -np.inf
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ vals).transpose(1, 0, 2)  # [n, H, d]
