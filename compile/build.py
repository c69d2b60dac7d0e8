"""Build a model library: (preset, policy, target, dtype, max-context) -> lib.so + lib.json."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import tvm
from tvm import relax
from tvm.target import Target

from tsedge.models.attention import check_policy, make_policy
from tsedge.models.config import ModelConfig, PolicyConfig
from tsedge.models.library import LibraryMeta, ParamSpec
from tsedge.models.llama import LlamaForCausalLM
from tsedge.models.quantization import PARTS, check_quantizable, roles
from tsedge.models.tensor_parallel import param_split, shard_config, vocab_parallel

from .cuda_fatbin import fatbin_build_context
from .pipeline import relax_pipeline
from .targets import kv_cache_dtype, resolve_dtype, target_name


def build_ir(cfg: ModelConfig, policy: PolicyConfig, target: Target, dtype: str, quantization: str = "q0",
             max_context: int = 0, tensor_parallel: int = 1, kv_dtype: str | None = None):
    """The model's Relax IRModule, its parameter specs and its policy-state specs.

    ``max_context``: the KV cache the library is compiled for (sizes Recycled Attention's
    partial caches). ``tensor_parallel``: the library is one of that many shards (every shard
    runs it; ``models/tensor_parallel.py``), parameter and state shapes a shard's. ``kv_dtype``:
    the KV cache's element type (default: ``kv_cache_dtype``'s rule). Raises
    ValueError for an unknown ``quantization``, a linear whose input size (a shard's) is not a
    whole number of quantization groups, sizes that do not split into the shards, a policy the
    shards' heads cannot take (``check_policy``), or a fraction ``recycle_k`` without ``max_context``."""
    in_out = target.kind.name == "llvm"
    quant = roles(quantization)
    check_policy(policy, cfg, tensor_parallel)
    shard = shard_config(cfg, tensor_parallel)
    for qs in {q for q in quant.values() if q is not None}:  # every scheme's groups run along hidden sizes
        for size, what in ((shard.hidden_size, "hidden_size"), (shard.num_heads * shard.head_dim, "heads x head_dim"),
                           (shard.intermediate_size, "intermediate_size")):
            check_quantizable(qs, f"{cfg.name} {what}" + (" per shard" if tensor_parallel > 1 else ""), size)
    vocab_split = vocab_parallel(cfg, tensor_parallel)
    attention = make_policy(policy, shard, dtype, target, max_context, tensor_parallel,
                            kv_dtype or kv_cache_dtype(dtype, target, quantization))
    model = LlamaForCausalLM(shard, attention, dtype, in_out, quant, tensor_parallel, vocab_split)
    mod, named = model.export_tvm(spec=model.get_default_spec())
    state = [[name, shape, dt] for name, shape, dt in model.policy.state_specs()]
    functions = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function)]
    specs = []
    for name, param in named:
        shape = [int(s) for s in param.shape]
        base, _, part = name.rpartition(".")
        part = part if part in PARTS else ""
        weight = f"{base}.weight" if part else name
        transposed = in_out and (weight.endswith("_proj.weight") or weight == "lm_head.weight")
        split = param_split(name, vocab_split) if tensor_parallel > 1 else None
        specs.append(ParamSpec(name, shape, _sources(weight, cfg), transposed, part, split))
    return mod, specs, state, functions


@tvm.instrument.pass_instrument
class _PassReporter:
    """Reports the name of each TVM pass as it starts (compile progress)."""

    def __init__(self, stage: Callable[[str], None]) -> None:
        self.stage = stage

    def run_before_pass(self, _mod: tvm.ir.IRModule, info: tvm.transform.PassInfo) -> None:
        self.stage(f"pass {info.name}")


FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _sources(name: str, cfg: ModelConfig) -> list[str]:
    """The HF tensors a library parameter is made of (fused projections concatenate several)."""
    if name == "lm_head.weight" and cfg.tie_embeddings:
        return ["model.embed_tokens.weight"]
    prefix, _, rest = name.rpartition(".")[0].rpartition(".")
    parts = FUSED.get(rest)
    return [f"{prefix}.{part}.{name.rpartition('.')[2]}" for part in parts] if parts else [name]


def compile_library(cfg: ModelConfig, policy: PolicyConfig, target: Target, dtype: str,
                    max_context: int, out: Path, stage: Callable[[str], None] | None = None,
                    quantization: str = "q0", tensor_parallel: int = 1, kv_dtype: str | None = None) -> LibraryMeta:
    """Compile and export ``out`` (.so) with its metadata next to it (``out`` with .json).

    ``stage(name)`` is called as each stage (model IR, each TVM pass, export) starts.
    ``quantization``: q0 (float weights), a scheme, or a scheme per role (``models/quantization.py``).
    ``tensor_parallel``: shards (``build_ir``); the metadata keeps the whole model's config.
    ``kv_dtype``: the KV cache's element type (default: ``kv_cache_dtype``'s rule).
    """
    stage = stage or (lambda _name: None)
    dtype = resolve_dtype(dtype, target)
    stage("model IR")
    kv_dtype = kv_dtype or kv_cache_dtype(dtype, target, quantization)
    mod, params, state, functions = build_ir(cfg, policy, target, dtype, quantization, max_context, tensor_parallel,
                                             kv_dtype)
    start = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    # CUDA: the static stretches of each function (a decode step: all its kernels but the
    # last cast of the logits) are captured once as CUDA graphs and replayed (RewriteCUDAGraph)
    config = {"relax.backend.use_cuda_graph": target.kind.name == "cuda"}
    with fatbin_build_context(target), tvm.transform.PassContext(config=config, instruments=[_PassReporter(stage)]):
        executable = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target, max_context))
        stage("export (host compiler" + (", nvcc)" if target.kind.name == "cuda" else ")"))
        tmp = out.with_suffix(".tmp.so")
        executable.export_library(str(tmp))
    os.replace(tmp, out)
    meta = LibraryMeta(
        model=cfg, policy=policy, target=target_name(target), target_json=str(target),
        dtype=dtype, kv_dtype=kv_dtype, max_context=max_context, params=params, functions=sorted(functions),
        tvm_version=tvm.__version__, state=state, compile_seconds=round(time.time() - start, 1),
        quantization=quantization, tensor_parallel=tensor_parallel,
    )
    meta.save(out.with_suffix(".json"))
    return meta
