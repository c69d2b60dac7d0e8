"""The device sampler (``tir_kernels/sampling.py``) against the host Sampler given the same uniform
number, and its penalty-state update against the state rebuilt from the history."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from kernel_harness import CUDA, MODE, build, cuda_source, tensor

from tsedge.device_sampling import param_row, penalty_state
from tsedge.sampling import Sampler, SamplingParams
from tsedge.tir_kernels.sampling import make_sample

VOCABS = [777, 1000, 49152, 128256]
PARAMS = [  # every option alone, then together
    SamplingParams(),
    SamplingParams(repetition_penalty=1.3, repeat_last_n=16),
    SamplingParams(presence_penalty=0.7, frequency_penalty=0.4, repeat_last_n=0),
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=1.2, top_k=40),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=0.995),  # cut far down a flat tail
    SamplingParams(temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.1, presence_penalty=0.5,
                   frequency_penalty=0.3, repeat_last_n=64),
    SamplingParams(temperature=1.5, top_p=0.5, top_k=1000, repetition_penalty=0.8, repeat_last_n=0),
]


def logits_with_ties(rng, vocab: int) -> np.ndarray:
    """Random logits (never zeros) whose maximum and a mid value occur several times."""
    logits = (rng.standard_normal(vocab) * 3).astype(np.float32)
    logits[rng.integers(0, vocab, 4)] = logits.max()
    logits[rng.integers(0, vocab, 50)] = np.float32(1.25)
    return logits


def ring_window(recent: np.ndarray) -> list[int]:
    """The tokens of a ``recent`` ring, oldest first."""
    ring = recent[1:]
    return [int(t) for t in np.concatenate([ring[recent[0]:], ring[:recent[0]]]) if t >= 0]


def sample_on_device(vocab, logits, params, history, generated, u):
    """(token, counts, recent) after one ``sample`` call."""
    counts, recent = penalty_state(vocab, params, history, generated)
    counts_t, recent_t, token_t = tensor(counts), tensor(recent), tensor(np.array([-7], np.int32))
    build(make_sample, vocab)(tensor(logits[None]), tensor(param_row(params, u)), counts_t, recent_t, token_t,
                              tensor(np.full(vocab, np.nan, np.float32)))
    return int(token_t.numpy()[0]), counts_t.numpy(), recent_t.numpy()


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("case", range(len(PARAMS)))
def test_sample_equals_host_sampler(vocab, case):
    params = PARAMS[case]
    rng = np.random.default_rng(vocab + case)
    for trial in range(3):
        logits = logits_with_ties(rng, vocab)
        history = rng.integers(0, vocab, 80).tolist()
        if trial == 0:  # penalized tokens include the maximum
            history[-1] = int(np.argmax(logits))
        host = Sampler(params, history)
        host.generated = Counter(history[-12:])  # the last 12 are this generation's output
        u = float(rng.random())
        want = host.pick(logits, u)
        got, counts, recent = sample_on_device(vocab, logits, params, history, host.generated, u)
        if MODE == "cuda-build":
            continue
        assert got == want, (trial, got, want)
        host.record(want)
        want_counts, want_recent = penalty_state(vocab, params, host.history, host.generated)
        np.testing.assert_array_equal(counts, want_counts)
        assert ring_window(recent) == ring_window(want_recent)


@pytest.mark.parametrize("vocab", [777, 128256])
def test_greedy_takes_the_first_maximum(vocab):
    logits = logits_with_ties(np.random.default_rng(vocab), vocab)
    top = np.flatnonzero(logits == logits.max())
    assert len(top) > 1
    got, _, _ = sample_on_device(vocab, logits, SamplingParams(), [], Counter(), 0.0)
    if MODE != "cuda-build":
        assert got == top[0]


def test_draws_follow_the_uniform_number():
    """Sweeping u over [0, 1) walks the kept tokens in id order, as the host's inverse CDF."""
    vocab = 1000
    rng = np.random.default_rng(5)
    logits = logits_with_ties(rng, vocab)
    params = SamplingParams(temperature=1.0, top_p=0.8, top_k=12)
    host = Sampler(params)
    picks = []
    for u in [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.999999]:
        got, _, _ = sample_on_device(vocab, logits, params, [], Counter(), u)
        picks.append(got)
        if MODE != "cuda-build":
            assert got == host.pick(logits, u)
    if MODE != "cuda-build":
        assert picks == sorted(picks) and len(set(picks)) > 2


def test_top_p_ties_are_taken_by_lower_id():
    """Four tokens tie for the top; p = 0.4 keeps the first two of them by id."""
    vocab = 777
    logits = np.full(vocab, -20.0, np.float32)
    tied = [600, 33, 400, 7]
    logits[tied] = 5.0
    params = SamplingParams(temperature=1.0, top_p=0.4)
    for u in [0.0, 0.49, 0.51, 0.99]:
        got, _, _ = sample_on_device(vocab, logits, params, [], Counter(), u)
        if MODE != "cuda-build":
            assert got == (7 if u < 0.5 else 33) == Sampler(params).pick(logits, u)


def test_window_ring_drops_the_oldest_token():
    vocab = 1000
    params = SamplingParams(repetition_penalty=2.0, repeat_last_n=3)
    logits = np.linspace(-1, 1, vocab, dtype=np.float32)
    logits[[5, 9]] = [3.0, 2.0]
    history = [5, 100, 200]  # 5 is in the window: 3 / 2 < 2, so 9 wins
    got, counts, recent = sample_on_device(vocab, logits, params, history, Counter(), 0.0)
    if MODE != "cuda-build":
        assert got == 9 and ring_window(recent) == [100, 200, 9]
        assert counts[0, 5] == 0 and counts[0, 9] == 1 and counts[1, 9] == 1


def test_bad_vocab_is_an_error():
    with pytest.raises(ValueError, match="vocab must be >= 1"):
        make_sample(0, None)


@pytest.mark.skipif(MODE == "cuda-run", reason="compiles CUDA")
def test_cuda_codegen_uses_one_block_with_shared_histograms():
    source = cuda_source(make_sample(128256, CUDA))
    assert "__launch_bounds__(1024)" in source and "atomicAdd" in source and "__syncthreads" in source
