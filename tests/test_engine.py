"""The compiled dense model against transformers (the PyTorch reference) and runtime behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from test_chat import tiny_folder, tiny_lib  # noqa: F401 (fixtures: a tiny model, 64-token cache)
from tiny_model import make_tiny_hf_model

from tsedge.bench.speed import decode_speed, prefill_chunk_speed
from tsedge.chat import ChatSession
from tsedge.compile.build import compile_library
from tsedge.compile.targets import parse_target
from tsedge.engine import ContextOverflowError, Engine
from tsedge.models.config import PolicyConfig
from tsedge.sampling import SamplingParams
from tsedge.weights import load_source

PROMPT_LEN = 300


@pytest.fixture(scope="module")
def engine(smol_lib, smol_source) -> Engine:
    return Engine(smol_lib, smol_source, prefill_chunk=128)


@pytest.fixture(scope="module")
def prompt(smol_source) -> list[int]:
    text = ("The history of astronomy spans thousands of years, from the first observations of "
            "the night sky to modern space telescopes. ") * 20
    return smol_source.tokenizer.encode(text)[:PROMPT_LEN]


def test_logits_match_transformers(engine, hf_smol, prompt):
    engine.reset()
    ours = engine.prefill(prompt)
    with torch.no_grad():
        ref = hf_smol(torch.tensor([prompt])).logits[0, -1].double().numpy()
    assert np.abs(ours - ref).max() < 5e-4, np.abs(ours - ref).max()  # measured 5.9e-5
    assert ours.argmax() == ref.argmax()


def test_greedy_32_tokens_match_transformers(engine, hf_smol, prompt):
    engine.reset()
    ours = engine.generate(prompt, max_new_tokens=32, stop_ids=[]).tokens
    with torch.no_grad():
        ref = hf_smol.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                               min_new_tokens=32)[0, len(prompt):].tolist()
    assert ours == ref


def test_chunked_prefill_and_decode_equal_one_shot(smol_lib, smol_source, prompt):
    one_shot = Engine(smol_lib, smol_source, prefill_chunk=1024)
    chunked = Engine(smol_lib, smol_source, prefill_chunk=37)
    full = one_shot.prefill(prompt)
    np.testing.assert_allclose(chunked.prefill(prompt), full, atol=1e-4)
    # decoding the last token after the rest equals prefilling everything
    one_shot.reset()
    one_shot.prefill(prompt[:-1])
    np.testing.assert_allclose(one_shot.decode(prompt[-1]), full, atol=1e-4)


def test_chat_turns_reuse_the_cache(engine, smol_source):
    engine.reset()
    session = ChatSession(engine, max_new_tokens=12)
    first = session.send("Name a planet.").result
    second = session.send("And another one?").result
    assert second.reused_tokens > first.prompt_tokens  # the first turn (and more) stayed cached
    # the reused cache gives exactly what a fresh engine gives for the whole conversation
    cached_tokens = second.tokens
    engine.reset()
    ids = smol_source.tokenizer.encode_chat(session.messages[:-1])
    fresh = engine.generate(ids, max_new_tokens=12)
    assert fresh.reused_tokens == 0 and fresh.tokens == cached_tokens


def test_sampling_is_seeded(engine, prompt):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    runs = []
    for _ in range(2):
        engine.reset()
        runs.append(engine.generate(prompt[:50], max_new_tokens=8, sampling=params, stop_ids=[]).tokens)
    assert runs[0] == runs[1]


def test_prompt_longer_than_the_cache_is_an_error(engine):
    engine.reset()
    with pytest.raises(ContextOverflowError) as err:
        engine.generate(list(range(100, 1125)), max_new_tokens=1)
    assert str(err.value) == ("prompt of 1025 tokens exceeds the KV cache of 1024 tokens; shorten it "
                              "or use a library compiled with a larger --max-context")
    assert len(engine.cache) == 0  # nothing was run or truncated silently


def test_generation_stops_at_a_full_cache(tiny_folder, tiny_lib):
    engine = Engine(tiny_lib, load_source(str(tiny_folder)))
    result = engine.generate(list(range(3, 63)), max_new_tokens=100, stop_ids=[])
    assert result.stopped == "context_full" and len(result.tokens) == 64 - 60 + 1
    assert engine.cache.tokens == list(range(3, 63)) + result.tokens[:-1]


def test_prefill_reports_progress(tiny_folder, tiny_lib):
    engine = Engine(tiny_lib, load_source(str(tiny_folder)), prefill_chunk=16)
    calls = []
    engine.generate(list(range(3, 43)), max_new_tokens=1, on_prefill=lambda *c: calls.append(c))
    assert calls == [(0, 40), (16, 40), (32, 40), (40, 40)]
    calls.clear()
    engine.generate(list(range(3, 43)) + [50, 51], max_new_tokens=1, on_prefill=lambda *c: calls.append(c))
    assert calls == [(0, 2), (2, 2)]  # only the tokens that were not cached


def test_speed_helpers_fill_and_extend_the_cache(engine):
    engine.fill_random(200)
    assert len(engine.cache) == 200
    decode = decode_speed(engine, 100, steps=4)
    assert len(engine.cache) == 100 + 1 + 4 and decode["tok_per_s"] > 0
    chunk = prefill_chunk_speed(engine, 300, 48)
    assert len(engine.cache) == 300 + 48 and chunk["seconds"] > 0
    with pytest.raises(ContextOverflowError):
        engine.fill_random(5000)


@pytest.mark.parametrize("qkv_bias, tie", [(False, False), (True, True)])
def test_tiny_hf_models_match_transformers(tmp_path, qkv_bias, tie):
    """Llama (untied) and Qwen2 (QKV bias, tied embeddings) from sharded safetensors folders."""
    folder = make_tiny_hf_model(tmp_path / "hf", qkv_bias=qkv_bias, tie=tie, seed=3)
    source = load_source(str(folder))
    lib = tmp_path / "tiny.so"
    compile_library(source.config, PolicyConfig(), parse_target("llvm"), "float32", 512, lib)
    ids = np.random.default_rng(0).integers(0, source.config.vocab_size, 200).tolist()
    ours = Engine(lib, source, prefill_chunk=64).prefill(ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.2, presence_penalty=0.4,
                   frequency_penalty=0.3, repeat_last_n=8, seed=3),
    SamplingParams(temperature=1.3, top_p=0.95, repetition_penalty=1.1, repeat_last_n=0, seed=11),
])
def test_device_sampler_generates_the_host_samplers_tokens(tiny_folder, tiny_lib, params):
    engine = Engine(tiny_lib, load_source(str(tiny_folder)))
    assert engine.sampler is not None  # the library exports ``sample``
    prompt = list(range(3, 23))
    runs = {}
    for on_device in (True, False):
        engine.device_sampling = on_device
        engine.reset()
        runs[on_device] = engine.generate(prompt, max_new_tokens=30, sampling=params, stop_ids=[]).tokens
    assert runs[True] == runs[False] and len(runs[True]) == 30
    # the greedy device step used by ``tsedge bench decode`` picks the argmax of ``decode``'s logits
    engine.reset()
    engine.prefill(prompt)
    token = engine.decode_greedy(5)
    engine.cache.truncate(len(prompt))
    assert token == int(np.argmax(engine.decode(5)))
