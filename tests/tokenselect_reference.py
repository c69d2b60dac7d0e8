"""NumPy float64 reference of TokenSelect selection, as DESIGN.md specifies it.

Layouts follow ``tir_kernels/common.py``: ``q[n, H, d]`` before RoPE, keys in
``kv[layer, 0, n_kv, capacity, d]`` without RoPE, ``rope[P, d]`` = cos | sin.
"""

from __future__ import annotations

import attention_reference
import numpy as np


def rope_table(positions: int, head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """``rope[p] = [cos(p * inv_freq), sin(p * inv_freq)]`` as float32."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return attention_reference.rope_table(inv_freq, positions).astype(np.float32)


def rope_rotate(x: np.ndarray, rope_row: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of ``x[..., d]`` with one table row."""
    half = x.shape[-1] // 2
    cos, sin = rope_row[:half].astype(np.float64), rope_row[half:].astype(np.float64)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def fingerprint(q: np.ndarray, rope: np.ndarray, n_local: int) -> np.ndarray:
    """``qbar[H, d]``: mean over the step's queries ``i`` of query ``i`` rotated at position
    ``n_local + i``."""
    rotated = [rope_rotate(qi.astype(np.float64), rope[n_local + i]) for i, qi in enumerate(q)]
    return np.mean(rotated, axis=0)


def head_scores(qbar: np.ndarray, kv: np.ndarray, layer: int, length: int, n_init: int,
                n_local: int) -> np.ndarray:
    """``s[h, t] = qbar[h] · k[layer, h // group, n_init + t]`` for the candidates (no scaling)."""
    keys = kv[layer, 0, :, n_init:length - n_local].astype(np.float64)  # [n_kv, C, d]
    group = qbar.shape[0] // keys.shape[0]
    return np.einsum("hd,htd->ht", qbar, np.repeat(keys, group, axis=0))


def key_codes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and float32 scales of key rows ``keys[..., d]`` (``tir_kernels/key_codes.py``):
    ``scale = max|k| / 127``, ``code = round(k * 127 / max|k|)`` half away from zero, in float32."""
    k = keys.astype(np.float32)
    m = np.abs(k).max(axis=-1)
    with np.errstate(divide="ignore"):
        inv = np.where(m > 0, np.float32(127) / m, np.float32(0)).astype(np.float32)
    x = k * inv[..., None]
    codes = np.clip(np.sign(x) * np.floor(np.abs(x) + np.float32(0.5)), -127, 127).astype(np.int8)
    return codes, (m / np.float32(127)).astype(np.float32)


def decoded_keys(kv: np.ndarray) -> np.ndarray:
    """``kv`` (float64) with its keys replaced by ``code · scale``: what int8 scoring reads."""
    codes, scales = key_codes(kv[:, 0])
    out = kv.astype(np.float64)
    out[:, 0] = codes * scales[..., None].astype(np.float64)
    return out


def soft_vote(scores: np.ndarray) -> np.ndarray:
    """Per-head softmax over tokens, summed over heads."""
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).sum(axis=0)


def max_pool(crit: np.ndarray, p: int) -> np.ndarray:
    """``F.max_pool1d(crit, p, padding=(p - 1) // 2, stride=1)``; the entries past its output
    (the last one for even ``p``) are -inf so that the length stays ``C``."""
    if p <= 1:
        return crit.copy()
    pad = (p - 1) // 2
    padded = np.concatenate([np.full(pad, -np.inf), crit, np.full(pad, -np.inf)])
    n_out = len(crit) + 2 * pad - p + 1
    pooled = np.array([padded[i:i + p].max() for i in range(n_out)])
    return np.concatenate([pooled, np.full(len(crit) - n_out, -np.inf)])


def criticality(qbar: np.ndarray, kv: np.ndarray, layer: int, length: int, n_init: int,
                n_local: int, pool_kernel: int) -> np.ndarray:
    """``crit[C]`` of candidates ``[n_init, length - n_local)``."""
    scores = head_scores(qbar, kv, layer, length, n_init, n_local)
    return max_pool(soft_vote(scores), pool_kernel)


def topk_positions(crit: np.ndarray, k: int, n_init: int) -> np.ndarray:
    """The ``k`` largest (ties: lower position first) as absolute positions, sorted."""
    order = np.argsort(-crit, kind="stable")[:k]
    return (np.sort(order) + n_init).astype(np.int32)


def select(q: np.ndarray, kv: np.ndarray, rope: np.ndarray, layer: int, length: int, n_init: int,
           n_local: int, k: int, pool_kernel: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole selection of one layer and step: ``(qbar, crit, idx)``."""
    qbar = fingerprint(q, rope, n_local)
    crit = criticality(qbar, kv, layer, length, n_init, n_local, pool_kernel)
    return qbar, crit, topk_positions(crit, k, n_init)


def cache_check(qbar: np.ndarray, cache_qbar: np.ndarray, state: np.ndarray, layer: int,
                threshold: float, force_miss: bool) -> bool:
    """Selection-cache decision, updating ``cache_qbar`` and ``state`` in place; True on a hit.

    ``state[layer] = [hit_this_step, valid, hits, lookups]``; forced misses are not counted.
    """
    a, b = qbar.ravel().astype(np.float64), cache_qbar[layer].ravel().astype(np.float64)
    cos = a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8)
    hit = bool(not force_miss and state[layer, 1] and cos >= threshold)
    if not hit:
        cache_qbar[layer] = qbar
    state[layer, 0] = int(hit)
    state[layer, 1] = 1
    state[layer, 2] += int(hit)
    state[layer, 3] += int(not force_miss)
    return hit
