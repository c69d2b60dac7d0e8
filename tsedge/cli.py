"""``tsedge`` command line: compile, convert, generate, chat, models, bench, eval."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from tsedge.cli_bench import bench_decode, bench_prefill, speed_options
from tsedge.cli_eval import eval_run, eval_table
from tsedge.cli_options import (POSITIVE_INTS, TARGET_HELP, FiniteFloatRange, PrefillDisplay,
                                 cache_correction_option, context_full_note, number_list, policy_config,
                                 policy_options, quantization_option, read_text_file, resolve_quantization,
                                 resolve_target,
                                 sampling_options, sampling_params, utf8_option)
from tsedge.cli_serve import serve
from tsedge.models.config import PRESETS, ModelConfig, PolicyConfig

DEFAULT_MODEL = "smollm2-135m"


def _fail(message: str) -> None:
    raise click.ClickException(message)


def _errors(func):
    """Turn the toolkit's user-facing errors into one clean CLI error line."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from tsedge.fetch import FetchError

        try:
            return func(*args, **kwargs)
        except (ValueError, FetchError, FileNotFoundError, NotImplementedError) as err:
            _fail(str(err))

    return wrapper


def _max_context(kw: dict, policy: PolicyConfig, window: int, cfg: ModelConfig | None = None,
                 target: str | None = None) -> int:
    if target == "vulkan" and cfg is not None:  # the KV cache must fit one storage binding
        from tsedge.vulkan import BINDING_BYTES, kv_context_limit

        limit = kv_context_limit(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 4 if kw["dtype"] == "float32" else 2)
        if kw["max_context"] and kw["max_context"] > limit:
            raise ValueError(f"--max-context {kw['max_context']}: on Vulkan {cfg.name}'s KV cache must fit one "
                             f"{BINDING_BYTES >> 20} MiB storage binding; use --max-context {limit} or less")
        if not kw["max_context"]:
            return min(_max_context(kw, policy, window), limit)
    if kw["max_context"]:
        if kw["max_context"] > window and policy.name == "dense":
            click.echo(f"tsedge: note: --max-context {kw['max_context']} exceeds the model's window of {window} "
                       "tokens; dense attention degrades past it (--policy streaming keeps working beyond it, "
                       "and tokenselect where the model's heads allow it)", err=True)
        return kw["max_context"]
    return min(window, 8192) if policy.name == "dense" else 32768


def _checked_target(target: str | None, lib: str | None, kw: dict | None = None) -> str | None:
    """The resolved ``--target`` to run on here (or a check that ``--lib`` exists), before any
    model is loaded or compiled: a CUDA target needs a visible GPU, the Vulkan target wgpu-native.
    ``kw``: the command's ``policy_options``, checked first (``policy_config``; int8 key codes are
    not for Vulkan)."""
    from tsedge.compile.targets import has_cuda_gpu

    policy = policy_config(kw) if kw is not None else None
    if lib is not None:
        from tsedge.engine import check_library  # TVM: imported here only when a library is given

        check_library(lib)
        return None
    name = resolve_target(target)
    if policy is not None and policy.score_keys != "exact" and name == "vulkan":
        raise ValueError(f"--score-keys {policy.score_keys} needs a CPU (llvm) target or a CUDA GPU of sm_80 or newer "
                         "(Vulkan's WGSL has no 8-bit storage); use --score-keys exact")
    if name.startswith("cuda") and not has_cuda_gpu():
        raise ValueError(f"--target {target} runs the model on a CUDA GPU, but none is visible; use --target "
                         "llvm here, or `tsedge compile --target cuda:sm_XX` to build for another machine")
    if name == "vulkan":  # wgpu-native runs the WGSL kernels: missing, say so before compiling
        from tsedge.vulkan import VulkanError, wgpu_resources

        try:
            wgpu_resources()
        except VulkanError as err:
            raise ValueError(str(err)) from None
    return name


def _engine(model, target: str | None, lib: str | None, kw: dict, runtime_only: bool = False):
    """Engine for ``model`` (a name or a loaded ModelSource): the given library, or the cached
    one for ``target`` (compiled on first use). ``target``: what ``_checked_target`` returned.
    Float weights for a quantized library are quantized while loading, with a progress bar.
    ``kw["cache_correction"]`` (absent: 0) is the Engine's. ``runtime_only``: the command opens
    no other library, so a cached one runs on TVM's runtime alone (``ensure_library``)."""
    from tsedge.library_cache import ensure_library
    from tsedge.models.library import LibraryMeta
    from tsedge.progress import count_progress
    from tsedge.weights import ModelSource, load_source

    source = model if isinstance(model, ModelSource) else load_source(model)
    for note in source.notes:
        click.echo(f"tsedge: note: {note}", err=True)
    quantization = resolve_quantization(kw.get("quantization"), source)
    policy = policy_config(kw)
    if lib is None and source.shard is not None and kw.get("tensor_parallel", 1) == 1:  # as many as its folders
        kw = {**kw, "tensor_parallel": source.shard[1]}
    if lib is None:
        log = functools.partial(click.echo, err=True)
        lib = ensure_library(source.config, policy, target, kw["dtype"],
                             _max_context(kw, policy, source.config.context_window, source.config, target), log=log,
                             quantization=quantization,
                             tensor_parallel=kw.get("tensor_parallel", 1), runtime_only=runtime_only)
    from tsedge.tensor_parallel import open_engine  # TVM (and torch): after ensure_library's runtime_only choice

    meta = LibraryMeta.load(Path(lib).with_suffix(".json"))
    if kw.get("quantization") and quantization != meta.quantization:  # a given --lib decides the weights' format
        raise ValueError(f"--quantization {kw['quantization']} does not match library {lib} (compiled with "
                         f"{meta.quantization}): drop --quantization, or pass a library compiled with it")
    shards = kw.get("tensor_parallel", 1)
    if shards not in (1, meta.tensor_parallel):
        raise ValueError(f"--tensor-parallel {shards} does not match library {lib} (compiled for "
                         f"{meta.tensor_parallel}): drop --tensor-parallel, or pass a library compiled with it")
    # prefill_chunk is capped by the library's policy
    engine = functools.partial(open_engine, lib, source, prefill_chunk=policy.chunk_size,
                               cache_correction=kw.get("cache_correction", 0))
    if meta.quantization in ("q0", source.quantization):
        opened = engine()
    else:
        again = ("" if source.quantization == "q0" else
                 f" from its {source.quantization} blocks (a second, lossy quantization: --quantization gguf keeps them)")
        with count_progress(f"quantizing {source.config.name} to {meta.quantization}{again}", len(meta.params)) as update:
            opened = engine(on_load=lambda done, _total: update(done))
    click.get_current_context().call_on_close(opened.close)  # a sharded engine's workers end with the command
    return opened


class _OneLineUsageErrors(click.Group):
    """Usage errors (a bad option value, a missing argument) print one ``Error: ...`` line, like
    the toolkit's own errors, instead of click's usage line, hint line and error."""

    def main(self, *args, **kwargs):
        standalone = kwargs.pop("standalone_mode", True)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as err:
            if not standalone:
                raise
            click.echo(f"Error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            if not standalone:
                raise
            err.show()
            sys.exit(err.exit_code)
        except click.exceptions.Abort:
            if not standalone:
                raise
            click.echo("Aborted!", err=True)
            sys.exit(1)


@click.group(cls=_OneLineUsageErrors)
@click.version_option(package_name="tsedge")
def main() -> None:
    """Compiled long-context LLM inference with TokenSelect KV-cache selection (Apache TVM)."""


@main.command()
def models() -> None:
    """List model presets (any Llama-family HF folder or GGUF also works via --model PATH)."""
    from tsedge.weights import EMBEDDED

    for name, cfg in PRESETS.items():
        weights = "embedded (downloaded on first use)" if name in EMBEDDED else "bring a HF folder/GGUF"
        click.echo(f"{name:14s} layers={cfg.num_layers:<3d} hidden={cfg.hidden_size:<5d} "
                   f"heads={cfg.num_heads}/{cfg.num_kv_heads} window={cfg.context_window:<7d} {weights}")


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="preset name, .gguf or HF folder")
@click.option("--target", default=None, help=TARGET_HELP)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="library file (.so)")
@quantization_option(None)
@policy_options
@_errors
def compile(model: str, target: str | None, output: str | None, **kw) -> None:  # noqa: A001
    """Compile a model library (.so plus .json metadata); by default for the weights' own
    quantization (a GGUF's blocks: the library `tsedge generate` would compile for them)."""
    from tsedge.compile.build import compile_library
    from tsedge.compile.targets import parse_target
    from tsedge.library_cache import library_stem
    from tsedge.models.attention import check_policy
    from tsedge.progress import stage_progress
    from tsedge.weights import EMBEDDED, load_source

    source = None if model in PRESETS and model not in EMBEDDED and not Path(model).exists() else load_source(model)
    cfg = PRESETS[model] if source is None else source.config
    kw["quantization"] = resolve_quantization(kw["quantization"], source)
    policy = policy_config(kw)
    target_name = resolve_target(target)
    shards = kw["tensor_parallel"]
    check_policy(policy, cfg, shards, parse_target(target_name))
    out = Path(output or f"{library_stem(cfg, policy, kw['quantization'], shards)}-{target_name.replace(':', '_')}.so")
    max_context = _max_context(kw, policy, cfg.context_window, cfg, target_name)
    what = f"{policy.name}, {target_name}, {kw['quantization']}" + (f", {shards} shards" if shards > 1 else "")
    with stage_progress(f"compiling {cfg.name} ({what})") as stage:
        meta = compile_library(cfg, policy, parse_target(target_name), kw["dtype"], max_context, out, stage=stage,
                               quantization=kw["quantization"], tensor_parallel=shards)
    shards = f", {meta.tensor_parallel} tensor-parallel shards" if meta.tensor_parallel > 1 else ""
    click.echo(f"wrote {out} and {out.with_suffix('.json')} ({meta.target}, {meta.dtype}, {meta.quantization}{shards}, "
               f"max context {meta.max_context}, {meta.compile_seconds} s)")


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="preset name, .gguf or HF folder")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="weights folder")
@quantization_option("q0")
@click.option("--tensor-parallel", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="write N shard folders (OUTPUT/shard-0 ...), each with its part of the attention and MLP linears")
@_errors
def convert(model: str, output: str, quantization: str, tensor_parallel: int) -> None:
    """Write a weights folder (float16 safetensors, or packed quantized weights and float16 scales;
    config, tokenizer) that loads without conversion."""
    from tsedge.models.tensor_parallel import linear_split, shard_config, shard_tensor
    from tsedge.progress import count_progress
    from tsedge.weights import expected_shapes, load_source, save_weights_folder

    source = load_source(model)
    quantization = resolve_quantization(quantization, source)
    if (source.quantization != "q0" and not source.requantizable) or source.shard is not None:
        what = f"a {source.quantization} folder" if source.shard is None else "a tensor-parallel shard"
        raise ValueError(f"{source.path} is already {what}; convert from the float weights (GGUF or Hugging Face "
                         "folder) instead")
    shard_config(source.config, tensor_parallel)  # sizes that do not divide: one error line, before any work
    total = len(expected_shapes(source.config))
    if Path(output).is_dir() and any(Path(output).iterdir()):
        click.echo(f"tsedge: note: {output} is not empty; its weights, config and tokenizer are replaced", err=True)
    for rank in range(tensor_parallel):
        folder = Path(output) / f"shard-{rank}" if tensor_parallel > 1 else Path(output)
        shard = f", shard {rank + 1} of {tensor_parallel}" if tensor_parallel > 1 else ""
        with count_progress(f"converting {source.config.name} ({quantization}{shard})", total) as update:
            tensors = ((update(i + 1), (name, shard_tensor(array, linear_split(name), rank, tensor_parallel, name)))[1]
                       for i, (name, array) in enumerate(source.tensors()))
            save_weights_folder(folder, tensors, source.config, source.tokenizer,
                                {"model": source.config.name, "source": str(source.path)}, quantization,
                                (rank, tensor_parallel) if tensor_parallel > 1 else None)
        _keep_sampling_defaults(source.path, folder)
    click.echo(f"wrote {output} ({quantization}" + (f", {tensor_parallel} shard folders)" if tensor_parallel > 1 else ")"))


def _keep_sampling_defaults(source: Path, output: Path) -> None:
    """The converted folder samples as its source did: the source folder's generation_config.json,
    or the embedded model's greedy default (``fetch.SAMPLING``) written as one."""
    import shutil

    from tsedge import fetch

    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", output / "generation_config.json")
    elif fetch.is_default_model(source):
        (output / "generation_config.json").write_text(json.dumps(fetch.SAMPLING, indent=1))


def _prompt_ids(engine, prompt: str, raw: bool) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(prompt) if raw else tok.encode_chat([{"role": "user", "content": prompt}])


def _generate_json(engine, result) -> str:
    out = {"text": engine.tokenizer.decode(result.tokens, skip_special_tokens=True),
           "prompt_tokens": result.prompt_tokens, "generated_tokens": len(result.tokens),
           "ttft_s": round(result.ttft_s, 4), "prefill_tok_per_s": round(result.prefill_tok_per_s, 2),
           "decode_tok_per_s": round(result.decode_tok_per_s, 2), "stopped": result.stopped,
           "policy": engine.meta.policy.name, "target": engine.meta.target,
           "cache_corrections": result.corrections}
    stats = engine.selection_stats()
    if stats is not None:
        out["selection_cache_hit_rate"] = stats["hits"] / stats["lookups"] if stats["lookups"] else 0.0
    return json.dumps(out)


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="preset name, .gguf or HF folder")
@click.option("--target", default=None, help=TARGET_HELP)
@click.option("--lib", type=click.Path(dir_okay=False), default=None, help="use this compiled library")
@click.option("--prompt", default=None, callback=utf8_option, help="UTF-8 text")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="UTF-8 text file")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@sampling_options
@click.option("--raw", is_flag=True, help="continue the prompt text as it is (no chat template)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@quantization_option(None)
@policy_options
@cache_correction_option
@_errors
def generate(model, target, lib, prompt, prompt_file, max_new_tokens, raw, as_json, **kw) -> None:
    """Answer one prompt, wrapped in the model's chat template as chat does (--raw: continue the text as
    it is; sampled like chat, --temperature 0 for greedy)."""
    from tsedge.weights import load_source

    if (prompt is None) == (prompt_file is None):
        _fail("give exactly one of --prompt or --prompt-file")
    text = prompt if prompt is not None else read_text_file(prompt_file)
    if not text.strip():
        _fail(f"the prompt{' file ' + prompt_file if prompt_file else ''} is empty; give the text to answer")
    target = _checked_target(target, lib, kw)
    source = load_source(model)
    sampling = sampling_params(source.path, kw)
    engine = _engine(source, target, lib, kw, runtime_only=True)
    ids = _prompt_ids(engine, text, raw)
    stream = engine.tokenizer.stream(skip_special_tokens=True)

    def echo(token: int) -> None:
        if not as_json:
            click.echo(stream.push(token), nl=False)

    with PrefillDisplay(engine.prefill_chunk) as progress:
        result = engine.generate(ids, max_new_tokens, sampling, on_token=echo, on_prefill=progress)
    click.echo(_generate_json(engine, result) if as_json else stream.flush())
    if result.stopped == "context_full":
        click.echo(context_full_note(engine.cache.capacity), err=True)


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="preset name, .gguf or HF folder")
@click.option("--target", default=None, help=TARGET_HELP)
@click.option("--lib", type=click.Path(dir_okay=False), default=None, help="use this compiled library")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--system", default=None, callback=utf8_option, help="system prompt (UTF-8 text)")
@sampling_options
@quantization_option(None)
@policy_options
@cache_correction_option
@_errors
def chat(model, target, lib, max_new_tokens, system, **kw) -> None:
    """Interactive chat: /help lists the commands (/stats, /reset, /exit); Ctrl-C stops a reply."""
    from tsedge.chat import ChatSession
    from tsedge.cli_chat import repl
    from tsedge.weights import load_source

    target = _checked_target(target, lib, kw)
    source = load_source(model)
    sampling = sampling_params(source.path, kw)
    repl(ChatSession(_engine(source, target, lib, kw, runtime_only=True), sampling, max_new_tokens, system))


@main.group()
def bench() -> None:
    """Benchmarks (results written to bench/results/*.json)."""


@bench.command("speed")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="preset name, .gguf or HF folder")
@click.option("--target", default=None, help=TARGET_HELP)
@click.option("--lib", type=click.Path(dir_okay=False), default=None, help="use this compiled library")
@click.option("--prefill", "prefill_lengths", default="2048,7168", show_default=True,
              callback=POSITIVE_INTS, help="prompt lengths (tokens)")
@click.option("--decode-context", "decode_contexts", default="128,2048", show_default=True,
              callback=POSITIVE_INTS, help="context before decoding (tokens)")
@click.option("--steps", type=click.IntRange(min=1), default=64, show_default=True, help="decode steps")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="write the results as JSON here")
@speed_options
@quantization_option(None)
@policy_options
@_errors
def bench_speed(model, target, lib, prefill_lengths, decode_contexts, steps, output, peer, threads, rounds_count,
                **kw) -> None:
    """Prefill tok/s at the given lengths and greedy decode tok/s after the given contexts (CPython's
    docs); with --peer llama.cpp beside it on the same GGUF, token ids and threads."""
    from tsedge.cli_bench import run_speed, speed_setup

    threads, source = speed_setup(peer, threads, model)  # before TVM's thread pool starts
    engine = _engine(source, _checked_target(target, lib), lib, kw)
    run_speed(engine, source.path, prefill_lengths, decode_contexts, steps, output, peer, threads, rounds_count)


@bench.command("accuracy")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="preset name, .gguf or HF folder")
@click.option("--target", default=None, help=TARGET_HELP)
@click.option("--lib", type=click.Path(dir_okay=False), default=None, help="library of --quantization")
@click.option("--reference-lib", type=click.Path(dir_okay=False), default=None, help="float (q0) library")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="tokens prefilled before the compared positions")
@click.option("--positions", type=click.IntRange(min=1), default=300, show_default=True,
              help="next-token positions compared (teacher-forced decode steps)")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="write the results as JSON here")
@quantization_option("q4f16")
@policy_options
@_errors
def bench_accuracy(model, target, lib, reference_lib, prompt_tokens, positions, output, **kw) -> None:
    """Top-1 agreement, KL and perplexity of --quantization (and --score-keys) against float weights
    (and exact scoring) on natural text (CPython's docs), teacher-forced."""
    import pydoc_data.topics

    from tsedge.bench.quant_accuracy import text_accuracy
    from tsedge.bench.speed import machine_info
    from tsedge.weights import load_source

    kw["max_context"] = kw["max_context"] or prompt_tokens + positions + 8
    targets = _checked_target(target, lib, kw), _checked_target(target, reference_lib)
    source = load_source(model)
    candidate = _engine(source, targets[0], lib, kw)
    reference = _engine(source, targets[1], reference_lib, {**kw, "quantization": "q0", "score_keys": "exact"})
    ids = reference.tokenizer.encode("\n\n".join(pydoc_data.topics.topics.values()))[:prompt_tokens + positions]
    result = text_accuracy(reference, candidate, ids, prompt_tokens)
    names = [f"{e.meta.quantization}" + (f" ({e.meta.policy.score_keys} keys)" if e.meta.policy.name == "tokenselect" else "")
             for e in (candidate, reference)]
    click.echo(f"{names[0]} vs {names[1]}, {result['positions']} positions: "
               f"top-1 agreement {result['top1_agreement']:.3f}, mean KL {result['mean_kl']:.4f} nats "
               f"(max {result['max_kl']:.3f}), perplexity {result['candidate_ppl']:.2f} vs {result['reference_ppl']:.2f}")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps({**machine_info(candidate), "reference": machine_info(reference),
                                            **result}, indent=1))
        click.echo(f"wrote {output}", err=True)


main.add_command(serve)
bench.add_command(bench_decode)
bench.add_command(bench_prefill)


@main.group("eval")
def eval_group() -> None:
    """Accuracy tasks (results written to bench/results/*.json)."""


eval_group.add_command(eval_run)
eval_group.add_command(eval_table)


@eval_group.command("passkey")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="preset name, .gguf or HF folder")
@click.option("--target", default=None, help=TARGET_HELP)
@click.option("--lib", type=click.Path(dir_okay=False), default=None, help="use this compiled library")
@click.option("--lengths", default="2048,4096,8192,16384,32768", show_default=True,
              callback=POSITIVE_INTS, help="prompt tokens")
@click.option("--depths", default="0,0.25,0.5,0.75,1", show_default=True,
              callback=number_list(FiniteFloatRange(0, 1)), help="key position (0-1)")
@click.option("--keys", "keys_per_cell", type=click.IntRange(min=1), default=10, show_default=True,
              help="keys per cell")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="write the results as JSON here")
@policy_options
@_errors
def eval_passkey(model, target, lib, lengths, depths, keys_per_cell, seed, output, **kw) -> None:
    """Passkey retrieval (TokenSelect README task) over lengths x depths."""
    from tsedge.eval.passkey import format_table, run_passkey

    if not kw["max_context"]:
        kw["max_context"] = max(lengths) + 256
    engine = _engine(model, _checked_target(target, lib, kw), lib, kw)

    def progress(cell: dict) -> None:
        click.echo(f"{cell['length']:6d} tokens, depth {cell['depth']:.2f}: {cell['score']:.0%}", err=True)

    result = run_passkey(engine, lengths, depths, keys_per_cell, seed, progress=progress)
    click.echo(format_table(result))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=1))
        click.echo(f"wrote {output}", err=True)


@eval_group.command("agreement")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="preset name, .gguf or HF folder")
@click.option("--target", default=None, help=TARGET_HELP)
@click.option("--dense-lib", type=click.Path(dir_okay=False), default=None, help="dense library")
@click.option("--lib", type=click.Path(dir_okay=False), default=None, help="library of --policy")
@click.option("--lengths", default="4096,8192", show_default=True, callback=POSITIVE_INTS,
              help="prompt tokens")
@click.option("--steps", type=click.IntRange(min=1), default=32, show_default=True,
              help="teacher-forced decode steps")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="write the results as JSON here")
@policy_options
@_errors
def eval_agreement(model, target, dense_lib, lib, lengths, steps, output, **kw) -> None:
    """Top-1 agreement and KL of --policy against dense on natural text (CPython's docs)."""
    import pydoc_data.topics

    from tsedge.bench.speed import machine_info
    from tsedge.eval.agreement import agreement
    from tsedge.weights import load_source

    kw["max_context"] = kw["max_context"] or max(lengths) + steps + 256
    targets = _checked_target(target, lib, kw), _checked_target(target, dense_lib)
    source = load_source(model)  # read once, shared by both engines
    candidate = _engine(source, targets[0], lib, kw)
    dense = _engine(source, targets[1], dense_lib, {**kw, "policy": "dense"})
    text_ids = dense.tokenizer.encode("\n\n".join(pydoc_data.topics.topics.values()))
    results = []
    for length in lengths:
        results.append(agreement(dense, candidate, text_ids[:length], steps))
        click.echo(f"{length:6d} tokens: top-1 agreement {results[-1]['top1_agreement']:.3f}, "
                   f"mean KL {results[-1]['mean_kl']:.4f} nats, selection {results[-1]['selection']}")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps({"policy": candidate.meta.policy.to_dict(),
                                            **machine_info(candidate), "results": results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
