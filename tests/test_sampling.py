"""Sampling penalties and filters against NumPy references (and transformers' processors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper

from tsedge.sampling import (Sampler, SamplingParams, generation_config_defaults, presence_penalty,
                             repetition_penalty)

VOCAB = 50


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 3, VOCAB)


def test_repetition_penalty_matches_numpy_and_transformers(logits):
    seen = [3, 7, 7, 12, 3, 40]
    ours = repetition_penalty(logits, seen, 1.3)
    reference = logits.copy()
    for token in set(seen):  # CTRL: each seen token once, positive / penalty, negative * penalty
        reference[token] = logits[token] / 1.3 if logits[token] > 0 else logits[token] * 1.3
    np.testing.assert_array_equal(ours, reference)
    hf = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), torch.from_numpy(logits[None]))
    np.testing.assert_allclose(ours, hf[0].numpy(), rtol=1e-12)


def test_presence_penalty_matches_numpy(logits):
    generated = [5, 5, 5, 9]
    ours = presence_penalty(logits, generated, 0.8)
    reference = logits.copy()
    for token in set(generated):  # OpenAI: subtracted once per present token, not per occurrence
        reference[token] -= 0.8
    np.testing.assert_array_equal(ours, reference)


def test_greedy_sampler_applies_penalties():
    logits = np.zeros(VOCAB)
    logits[[4, 6]] = [2.0, 1.9]
    assert Sampler(SamplingParams())(logits) == 4
    assert Sampler(SamplingParams(repetition_penalty=1.1), prompt=[4])(logits) == 6  # 2/1.1 < 1.9
    sampler = Sampler(SamplingParams(presence_penalty=0.5))
    assert [sampler(logits), sampler(logits)] == [4, 6]  # 4 is in the output after the first pick


def test_repetition_penalty_looks_at_the_last_n_tokens():
    logits = np.zeros(VOCAB)
    logits[[4, 6]] = [2.0, 1.9]
    old = [4] + [9] * 64  # token 4 left the 64-token window
    assert Sampler(SamplingParams(repetition_penalty=1.1), prompt=old)(logits) == 4
    assert Sampler(SamplingParams(repetition_penalty=1.1, repeat_last_n=0), prompt=old)(logits) == 6
    assert Sampler(SamplingParams(repetition_penalty=1.1, repeat_last_n=66), prompt=old)(logits) == 6


def test_top_k_keeps_the_k_likeliest(logits):
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=3, seed=0))
    picks = {sampler(logits) for _ in range(300)}
    assert picks == set(np.argsort(-logits)[:3].tolist())
    hf = TopKLogitsWarper(3)(None, torch.from_numpy(logits[None]))[0].numpy()
    assert set(np.flatnonzero(np.isfinite(hf)).tolist()) == picks


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0))
    assert {sampler(np.log(probs)) for _ in range(300)} == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3


def test_seeded_sampling_repeats(logits):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=10, repetition_penalty=1.2,
                            presence_penalty=0.3, seed=11)
    runs = [[Sampler(params, prompt=[1, 2])(logits) for _ in range(20)] for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("field, value, message", [
    ("temperature", float("nan"), "temperature must be >= 0, got nan"),
    ("temperature", -0.1, "temperature must be >= 0, got -0.1"),
    ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
    ("top_k", -1, "top_k must be >= 0 (0 = off), got -1"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0 (1 = off), got 0.0"),
    ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2] (0 = off), got 2.5"),
    ("seed", -3, "seed must be >= 0, got -3"),
])
def test_bad_params_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert str(err.value) == message


def test_generation_config_defaults(tmp_path):
    assert generation_config_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": None, "top_k": 20, "eos_token_id": 2}))
    assert generation_config_defaults(tmp_path) == {"temperature": 0.6, "top_k": 20}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(ValueError, match="generation_config.json: top_p must be in"):
        generation_config_defaults(tmp_path)


@pytest.mark.parametrize("vocab, p, scale", [(49152, 0.9, 3.0), (128256, 0.95, 1.0), (5000, 0.5, 0.01),
                                             (3000, 0.999, 8.0)])
def test_top_p_equals_a_full_stable_sort(vocab, p, scale):
    """The partial selection keeps exactly the set a full stable sort keeps, ties included."""
    from tsedge.sampling import _top_p

    rng = np.random.default_rng(vocab)
    logits = np.round(rng.standard_normal(vocab) * scale, 1)  # rounding makes many exact ties
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = order[: int(np.searchsorted(np.cumsum(probs[order]), p)) + 1]
    expected = np.zeros_like(probs)
    expected[keep] = probs[keep]
    np.testing.assert_array_equal(_top_p(probs, p), expected / expected.sum())
