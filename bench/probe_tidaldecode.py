"""Where a NIAH needle's value tokens rank in each layer's per-head logits (TidalDecode's selection
criterion, q.k / sqrt(d) at true positions) for the last prompt token, by a float64 NumPy forward of
the model (CPU; a few minutes for SmolLM2-135M at 2K). Run:
``python bench/probe_tidaldecode.py --model smollm2-135m --length 2048 -o bench/results/x.json``.

Per layer and query head: the best rank (0 = largest logit) among the value's tokens; a head's
TidalDecode set of ``budget`` tokens holds part of the value when that rank is below ``budget - 1``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from tsedge.eval import niah
from tsedge.eval.sample import sample_rng
from tsedge.weights import load_source


def rotate(x: np.ndarray, pos: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of ``x[..., t, d]`` at positions ``pos[t]`` (float64)."""
    angle = pos[:, None] * inv_freq[None].astype(np.float64)
    cos, sin = np.cos(angle), np.sin(angle)
    half = x.shape[-1] // 2
    return np.concatenate([x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin], -1)


def value_span(tokenizer, ids: list[int], value: str) -> list[int]:
    """The shortest token span whose text holds ``value`` (its first occurrence)."""
    for start in range(len(ids)):
        if value in tokenizer.decode(ids[start:start + 16]):
            end = start + 1
            while value not in tokenizer.decode(ids[start:end]):
                end += 1
            while value in tokenizer.decode(ids[start + 1:end]):
                start += 1
            return list(range(start, end))
    raise ValueError(f"value {value!r} not in the prompt")


def probe(model: str, length: int, seed: int) -> dict:
    source = load_source(model)
    cfg, tok = source.config, source.tokenizer
    sample = niah.make_sample("niah_single", tok, length, sample_rng(seed, "niah_single", "prose", length, 0), "prose")
    ids, value = sample.prompt, sample.references[0]
    span = value_span(tok, ids, value)
    w = {name: a.astype(np.float64) for name, a in source.tensors(blocks=False)}
    n, h, hkv, d = len(ids), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pos, inv = np.arange(n, dtype=np.float64), cfg.inv_freq()
    causal = np.triu(np.full((n, n), -np.inf), 1)
    norm = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps) * g  # noqa: E731
    x = w["model.embed_tokens.weight"][ids]
    layers = []
    for layer in range(cfg.num_layers):
        p = lambda name: w[f"model.layers.{layer}.{name}.weight"]  # noqa: E731
        hs = norm(x, p("input_layernorm"))
        q = rotate((hs @ p("self_attn.q_proj").T).reshape(n, h, d).transpose(1, 0, 2), pos, inv)
        k = rotate((hs @ p("self_attn.k_proj").T).reshape(n, hkv, d).transpose(1, 0, 2), pos, inv)
        v = (hs @ p("self_attn.v_proj").T).reshape(n, hkv, d).transpose(1, 0, 2)
        k, v = np.repeat(k, h // hkv, 0), np.repeat(v, h // hkv, 0)
        logits = np.einsum("hd,htd->ht", q[:, -1], k) / np.sqrt(d)  # the last token's, per head
        layers.append([int(min((logits[i] > logits[i, j]).sum() for j in span)) for i in range(h)])
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d) + causal
        a = np.exp(s - s.max(-1, keepdims=True))
        o = (a / a.sum(-1, keepdims=True)) @ v  # [h, n, d]
        x = x + o.transpose(1, 0, 2).reshape(n, -1) @ p("self_attn.o_proj").T
        hs = norm(x, p("post_attention_layernorm"))
        gate = hs @ p("mlp.gate_proj").T
        x = x + (gate / (1 + np.exp(-gate)) * (hs @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    return {"model": cfg.name, "length": n, "value": value, "value_positions": span,
            "best_rank_per_layer_and_head": layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    result = probe(args.model, args.length, args.seed)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    for layer, ranks in enumerate(result["best_rank_per_layer_and_head"]):
        print(layer, ranks)


if __name__ == "__main__":
    main()
