"""Tensor parallelism on the CPU: N shard processes (shared-memory collectives) against one.

The sharded library's math is checked without GPUs: the logits of every step of a greedy
continuation beyond each selecting policy's budget (so the sharded selections run) must equal the
one-shard library's within float32 rounding, with the same tokens and Selection Cache counts. The
tiny random Llama (4 heads, 2 KV heads) runs 2 shards; TokenSelect (head_dim 64 or 128) runs on
SmolLM2-135M (9 heads, 3 KV heads) with 3 shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_tidaldecode_model import TIDAL, prompt_ids
from tiny_model import make_tiny_hf_model

from tsedge.cli import main
from tsedge.compile.build import compile_library
from tsedge.compile.targets import parse_target
from tsedge.engine import Engine, LibraryError
from tsedge.eval.agreement import greedy
from tsedge.models.config import PolicyConfig
from tsedge.models.quantization import SCHEMES, dequantize, quantize
from tsedge.models.tensor_parallel import param_split, shard_config, shard_tensor
from tsedge.tensor_parallel import ShardedEngine, open_engine
from tsedge.weights import load_source

CONTEXT = 256
TINY_POLICIES = {
    "dense": dict(name="dense"),
    "streaming": dict(name="streaming", n_init=4, n_local=32, top_k=0, chunk_size=32),
    "tidaldecode": dict(TIDAL, tidal_reselect_layers=(2,)),
    "recycled": dict(name="recycled", recycle_k=32, recycle_stride=2),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny-tp"), num_layers=4, seed=5)


def _library(tmp_path_factory, source, policy: dict, shards: int, quantization: str = "q0",
             context: int = CONTEXT) -> Path:
    path = tmp_path_factory.mktemp("tp") / f"{policy['name']}-{shards}.so"
    compile_library(source.config, PolicyConfig(**policy), parse_target("llvm"), "float32", context, path,
                    quantization=quantization, tensor_parallel=shards)
    return path


def _greedy_both(tmp_path_factory, source, weights, policy: dict, shards: int, prompt: list[int], steps: int,
                 quantization: str = "q0", context: int = CONTEXT):
    """(tokens, logits, selection stats) of one shard and of ``shards`` shards (``weights`` None:
    random weights, ``random_params``)."""
    results = []
    for n in (1, shards):
        engine = open_engine(_library(tmp_path_factory, source, policy, n, quantization, context), weights,
                             random_weights=weights is None, max_context=context,
                             prefill_chunk=policy.get("chunk_size", 32))
        try:
            assert isinstance(engine, ShardedEngine) == (n > 1)
            results.append((*greedy(engine, prompt, steps), engine.selection_stats()))
        finally:
            if n > 1:
                engine.close()
    return results


@pytest.mark.parametrize("policy", sorted(TINY_POLICIES))
def test_two_shards_equal_one(tmp_path_factory, tiny, policy):
    """Dense prefill in chunks, then decode steps beyond the policy's budget."""
    source = load_source(str(tiny))
    prompt = prompt_ids(source, 90)
    (tokens, logits, stats), (tp_tokens, tp_logits, tp_stats) = _greedy_both(
        tmp_path_factory, source, str(tiny), TINY_POLICIES[policy], 2, prompt, 12)
    assert tp_tokens == tokens
    np.testing.assert_allclose(np.stack(tp_logits), np.stack(logits), rtol=1e-4, atol=1e-5)
    assert tp_stats == stats


@pytest.mark.parametrize("quantization", ["q0", "q4f16"])
def test_random_weights_agree_across_shards(tmp_path_factory, tiny, quantization):
    """Benchmarks' random weights are drawn per Hugging Face tensor and then split, so one and
    two shards run the same model."""
    source = load_source(str(tiny))
    prompt = prompt_ids(source, 40)
    (tokens, logits, _), (tp_tokens, tp_logits, _) = _greedy_both(
        tmp_path_factory, source, None, TINY_POLICIES["dense"], 2, prompt, 6, quantization=quantization)
    assert tp_tokens == tokens
    np.testing.assert_allclose(np.stack(tp_logits), np.stack(logits), rtol=1e-4, atol=1e-5)


def test_two_shards_quantized(tmp_path_factory, tiny):
    """q4f16: each shard quantizes its slice; row-parallel slices fall on whole groups."""
    source = load_source(str(tiny))
    prompt = prompt_ids(source, 40)
    (tokens, logits, _), (tp_tokens, tp_logits, _) = _greedy_both(
        tmp_path_factory, source, str(tiny), TINY_POLICIES["dense"], 2, prompt, 6, quantization="q4f16")
    assert tp_tokens == tokens
    np.testing.assert_allclose(np.stack(tp_logits), np.stack(logits), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("score_keys", ["exact", "int8"])
def test_tokenselect_three_shards(tmp_path_factory, smol_source, score_keys):
    """TokenSelect beyond its budget: the soft vote all-reduced over the shards' heads and the
    Selection Cache deciding on every head's fingerprint pick the same rows as one shard (int8:
    each shard codes and scores its own KV heads)."""
    from test_tokenselect_model import BUDGETS, TEXT

    prompt = smol_source.tokenizer.encode(TEXT)[:300]
    policy = dict(name="tokenselect", score_keys=score_keys, **BUDGETS)
    (tokens, logits, stats), (tp_tokens, tp_logits, tp_stats) = _greedy_both(
        tmp_path_factory, smol_source, smol_source.path, policy, 3, prompt, 10, context=512)
    assert tp_tokens == tokens
    np.testing.assert_allclose(np.stack(tp_logits), np.stack(logits), rtol=1e-3, atol=1e-3)
    assert tp_stats == stats and stats["lookups"] > 0


def test_shard_config_and_tensors():
    cfg = load_source.__globals__["PRESETS"]["llama3-8b"]
    shard = shard_config(cfg, 4)
    assert (shard.num_heads, shard.num_kv_heads, shard.intermediate_size, shard.head_dim) == (8, 2, 3584, 128)
    with pytest.raises(ValueError, match="not divisible by --tensor-parallel 3"):
        shard_config(cfg, 3)
    names = ("model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.down_proj.qweight",
             "model.layers.0.self_attn.qkv_proj.bias", "model.norm.weight", "lm_head.scale", "model.embed_tokens.weight")
    assert [param_split(n, vocab_split=True) for n in names] == [0, 1, 0, None, 0, None]
    assert param_split("lm_head.weight", vocab_split=False) is None
    w = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    np.testing.assert_array_equal(np.concatenate([shard_tensor(w, 1, r, 2) for r in range(2)], axis=1), w)
    np.testing.assert_array_equal(np.concatenate([shard_tensor(w, 0, r, 3) for r in range(3)]), w)
    for qs in (SCHEMES["q4f16"], SCHEMES["q8f16"]):  # packed slices dequantize to the float slices
        qt = quantize(w, qs)
        for r in range(2):
            np.testing.assert_array_equal(dequantize(shard_tensor(qt, 1, r, 2)), dequantize(qt)[:, r * 64:(r + 1) * 64])
        with pytest.raises(ValueError, match="whole q"):
            shard_tensor(qt, 1, 0, 8)  # 16 inputs a shard: half a group


def test_sharded_library_needs_the_launcher(tmp_path_factory, tiny):
    lib = _library(tmp_path_factory, load_source(str(tiny)), TINY_POLICIES["dense"], 2)
    with pytest.raises(LibraryError, match="open_engine"):
        Engine(lib, str(tiny))


def test_cli(tmp_path, tiny):
    runner = CliRunner()
    out = tmp_path / "tp.so"
    ok = runner.invoke(main, ["compile", "--model", str(tiny), "--target", "llvm", "--tensor-parallel", "2",
                              "--max-context", "128", "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "2 tensor-parallel shards" in ok.output
    greedy_args = ["generate", "--model", str(tiny), "--raw", "--max-new-tokens", "4", "--temperature", "0",
                   "--prompt", "The quick brown fox"]
    run = runner.invoke(main, greedy_args + ["--lib", str(out)])
    assert run.exit_code == 0, run.output
    single = runner.invoke(main, greedy_args + ["--target", "llvm", "--max-context", "128"])
    assert single.exit_code == 0 and single.stdout == run.stdout
    for args, message in ((["--tensor-parallel", "3"], "not divisible by --tensor-parallel 3"),
                          (["--lib", str(out), "--tensor-parallel", "4"], "does not match library")):
        bad = runner.invoke(main, ["generate", "--model", str(tiny), "--target", "llvm", "--prompt", "x", *args])
        assert bad.exit_code != 0 and message in bad.output and len(bad.output.strip().splitlines()) == 1


def test_convert_shard_folders(tmp_path, tiny):
    """`convert --tensor-parallel 2` writes shard folders whose linears hold one shard's part; a
    2-shard library runs from them (each process opens its own) with the same tokens as from the
    whole weights, and a library of another shard count says how to convert."""
    runner = CliRunner()
    lib = tmp_path / "tp.so"
    assert runner.invoke(main, ["compile", "--model", str(tiny), "--target", "llvm", "--tensor-parallel", "2",
                                "--max-context", "128", "-o", str(lib)]).exit_code == 0
    shards = tmp_path / "shards"
    done = runner.invoke(main, ["convert", "--model", str(tiny), "-o", str(shards), "--tensor-parallel", "2"])
    assert done.exit_code == 0, done.output
    assert "2 shard folders" in done.output
    half = load_source(str(shards), rank=1)
    assert half.shard == (1, 2) and half.path.name == "shard-1"
    sizes = dict((name, array.shape) for name, array in half.tensors())
    assert sizes["model.layers.0.self_attn.q_proj.weight"] == (32, 64) and sizes["model.layers.0.mlp.down_proj.weight"] == (64, 64)
    assert sizes["model.embed_tokens.weight"] == (load_source(str(tiny)).config.vocab_size, 64)
    args = ["generate", "--lib", str(lib), "--raw", "--max-new-tokens", "4", "--temperature", "0", "--prompt", "The quick"]
    whole = runner.invoke(main, args + ["--model", str(tiny)])
    split = runner.invoke(main, args + ["--model", str(shards)])
    assert whole.exit_code == 0 and split.exit_code == 0, split.output
    assert split.stdout == whole.stdout
    auto = runner.invoke(main, args[:1] + args[3:] + ["--model", str(shards), "--target", "llvm", "--max-context", "128"])
    assert auto.exit_code == 0 and auto.stdout == whole.stdout  # the folder's shard count, without the option
    single = tmp_path / "single.so"
    assert runner.invoke(main, ["compile", "--model", str(tiny), "--target", "llvm", "--max-context", "128",
                                "-o", str(single)]).exit_code == 0
    bad = runner.invoke(main, ["generate", "--model", str(shards), "--lib", str(single), "--prompt", "x"])
    assert bad.exit_code != 0 and "use a library compiled with --tensor-parallel 2" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_ctrl_c_waits_for_the_forwarded_call():
    """A Ctrl-C inside a forwarded call interrupts once the call is done on rank 0 too."""
    import os
    import signal

    from tsedge.tensor_parallel import _uninterrupted

    done, before = [], signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with _uninterrupted():
            os.kill(os.getpid(), signal.SIGINT)
            done.append(True)
    assert done == [True]
    assert signal.getsignal(signal.SIGINT) is before
