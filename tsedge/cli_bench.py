"""``tsedge bench decode`` and ``tsedge bench prefill``: long-context speed by policy and depth;
``tsedge bench speed``'s options and body beside llama.cpp (``--peer``, ``--threads``)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import click
import numpy as np

from tsedge.cli_options import TARGET_HELP, RecycleK, quantization_option, resolve_target
from tsedge.models.config import PRESETS, SCORE_KEYS
from tsedge.models.quantization import short_name


def _driver() -> str | None:
    """The NVIDIA driver version, when nvidia-smi is there."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _shard_variants(variants: dict, shard_counts: list[int]) -> dict:
    """``{label: (policy, shards)}``: each variant at each tensor-parallel size (``-tpN`` labels)."""
    return {name if n == 1 else f"{name}-tp{n}": (policy, n) for n in shard_counts for name, policy in variants.items()}


def _shard_counts(value: str) -> list[int]:
    try:
        counts = [int(v) for v in value.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"{value!r}: give GPU counts such as 1,2", param_hint="--tensor-parallel")
    return counts


def _libraries(preset: str, variants: dict, target: str | None, lib_dir: str | None,
               capacity: int, quantization: str) -> dict[str, Path]:
    """``<lib_dir>/<label>.so`` for each of ``_shard_variants``' labels, or cached libraries
    compiled on first use."""
    if lib_dir:
        libs = {name: Path(lib_dir) / f"{name}.so" for name in variants}
        missing = [str(p) for p in libs.values() if not p.exists()]
        if missing:
            raise click.ClickException(f"missing {', '.join(missing)}: compile them with "
                                       f"`tsedge bench {{decode,prefill}} --compile-only --lib-dir {lib_dir}`")
        return libs
    from tsedge.library_cache import ensure_library

    return {name: ensure_library(PRESETS[preset], policy, resolve_target(target), "auto", capacity,
                                 log=lambda m: click.echo(m, err=True), quantization=quantization, tensor_parallel=n)
            for name, (policy, n) in variants.items()}


def _score_key_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    """``"exact,int8"`` -> ``("exact", "int8")``; one error line for an unknown mode."""
    modes = tuple(dict.fromkeys(m.strip() for m in value.split(",")))
    for mode in modes:
        if mode not in SCORE_KEYS:
            raise click.BadParameter(f"unknown mode {mode!r}: use some of {','.join(SCORE_KEYS)}")
    return modes


def _bench_command(kind: str):
    @click.command(kind)
    @click.option("--preset", type=click.Choice(sorted(PRESETS)), default="llama3-8b", show_default=True,
                  help="model shapes (random weights)")
    @click.option("--depths", default="0,4k,32k,128k", show_default=True, help="cached tokens before the step")
    @click.option("--policies", default="dense,tokenselect", show_default=True,
                  help="comma list of dense, tokenselect, streaming, tidaldecode, recycled (decode adds "
                       "tokenselect-reselect, which re-selects at every step)")
    @click.option("--target", default=None, help=TARGET_HELP)
    @click.option("--lib-dir", type=click.Path(file_okay=False), default=None,
                  help="prebuilt libraries <variant>.so (a runtime-only host); written with --compile-only")
    @click.option("--compile-only", is_flag=True, help="compile the libraries into --lib-dir and stop")
    @click.option("--steps", type=click.IntRange(1), default=32, show_default=True, help="decode steps timed")
    @click.option("--chunk", type=click.IntRange(1), default=512, show_default=True, help="prefill chunk (tokens)")
    @click.option("--ttft", type=click.IntRange(0), default=0, show_default=True,
                  help="prefill: also time to first token of a prompt of this many tokens (0: off)")
    @click.option("--tidal-budget", type=click.IntRange(1), default=None,
                  help="TidalDecode's budget (default: the policy's, 256)")
    @click.option("--recycle-k", type=RecycleK(), default=None,
                  help="Recycled Attention's K: a token count (a same-budget comparison) or a fraction of "
                       "the context (default: the policy's, the paper's 1/8)")
    @click.option("-o", "--output-dir", type=click.Path(file_okay=False), default="bench/results",
                  show_default=True, help="JSON and PNG go here")
    @click.option("--tag", default=None, help="file name stem (default: <kind>_<preset>_<device>)")
    @quantization_option("q0", weights=False)  # the compiled libraries' weights (random values of the scheme's layout)
    @click.option("--score-keys", default="exact", show_default=True, metavar="MODE[,MODE...]",
                  callback=_score_key_list,
                  help="TokenSelect's scoring input, each run as its own variant: exact, int8 (named tokenselect-int8)")
    @click.option("--tensor-parallel", default="1", show_default=True, metavar="N[,N...]",
                  help="GPU counts to run each variant on (libraries labelled <variant>-tpN beyond 1)")
    def command(preset, depths, policies, target, lib_dir, compile_only, steps, chunk, ttft, tidal_budget, recycle_k,
                output_dir, tag, quantization, score_keys, tensor_parallel):
        from tsedge.bench import long_context as lc

        try:
            depth_list = lc.parse_depths(depths)
            variants = _shard_variants(lc.variants([p.strip() for p in policies.split(",")], kind, score_keys,
                                                   tidal_budget=tidal_budget, recycle_k=recycle_k),
                                       _shard_counts(tensor_parallel))
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        capacity = max(max(depth_list) + steps + chunk, ttft) + 8
        if compile_only:
            if not lib_dir:
                raise click.ClickException("--compile-only needs --lib-dir DIR")
            _compile_into(preset, variants, target, Path(lib_dir), capacity, quantization)
            return
        libs = _libraries(preset, variants, target, lib_dir, capacity, quantization)
        result = lc.run(kind, libs, depth_list, steps, chunk, log=lambda m: click.echo(m, err=True), ttft=ttft)
        import tvm

        import tsedge

        result["info"].update(driver=_driver(), tvm=tvm.__version__, tsedge=tsedge.__version__,
                              python=platform.python_version(), peer=json.loads(lc.PEERS.read_text())["source"])
        device = str(result["info"].get("device", result["info"]["target"])).replace(" ", "-")
        quant = "" if quantization == "q0" else f"_{quantization}"
        stem = Path(output_dir) / (tag or f"{kind}_{preset}{quant}_{device}")
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.parent.joinpath(stem.name + ".json").write_text(json.dumps(result, indent=1))  # a stem may hold dots
        lc.plot(result, stem.parent / (stem.name + ".png"))
        if len({row["tensor_parallel"] for row in result["rows"]}) > 1:
            lc.plot_scaling(result, Path(f"{stem}_gpus.png"))
        click.echo(lc.table(result))
        for row in result["ttft"]:
            click.echo(f"TTFT of a {row['tokens']}-token prompt, {row['policy']}: {row['seconds']:.3f} s "
                       f"({row['tok_per_s']:,.0f} tok/s)")
        click.echo(f"wrote {stem}.json and {stem}.png", err=True)

    command.help = (f"{kind.capitalize()} speed of dense and TokenSelect at each depth, beside llama.cpp "
                    "(random weights of the preset's shapes).")
    return command


def _compile_into(preset: str, variants: dict, target: str | None, lib_dir: Path, capacity: int,
                  quantization: str) -> None:
    from tsedge.compile.build import compile_library
    from tsedge.compile.targets import parse_target

    for name, (policy, shards) in variants.items():
        meta = compile_library(PRESETS[preset], policy, parse_target(resolve_target(target)), "auto", capacity,
                               lib_dir / f"{name}.so", quantization=quantization, tensor_parallel=shards)
        click.echo(f"wrote {lib_dir / name}.so ({meta.target}, {meta.compile_seconds} s)", err=True)


def speed_options(func):
    """``--peer``, ``--threads`` and ``--rounds`` of ``tsedge bench speed``."""
    func = click.option("--rounds", "rounds_count", type=click.IntRange(min=1), default=1, show_default=True,
                        help="repeat the measurement, tsedge and the peer taking turns; each number is the best "
                             "of its rounds (for a machine whose speed varies)")(func)
    func = click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="CPU threads of tsedge (TVM_NUM_THREADS) and of the peer [default: the physical cores "
                             "this process may run on]")(func)
    return click.option("--peer", type=click.Choice(["llama.cpp"]), default=None,
                        help="also time llama.cpp (llama-cpp-python, the `bench` extra) on the same GGUF file, "
                             "token ids and threads, and print both with their ratio")(func)


def speed_setup(peer: str | None, threads: int | None, model: str):
    """Before the engine is made: the peer's checks (one line naming the fix, before any model
    is fetched or compiled), the model (a ModelSource) and the thread count, set for TVM (whose
    default on x86 is half the cores: it assumes hyper-threading). Returns (threads, source)."""
    from tsedge.bench.llamacpp_peer import missing_message
    from tsedge.threads import physical_cores
    from tsedge.weights import load_source

    if peer and (message := missing_message()):
        raise click.ClickException(message)
    source = load_source(model)
    if peer and source.path.suffix != ".gguf":
        raise click.ClickException(f"--peer llama.cpp reads GGUF files only, and {source.path} is not one: "
                                   "pass --model with a .gguf file (the default model is one)")
    threads = threads or physical_cores()
    os.environ["TVM_NUM_THREADS"] = str(threads)  # read when TVM's thread pool starts
    return threads, source


def _divergence_margin(engine, prompt: list[int], result: dict, agreement: dict) -> dict:
    """Where tsedge's and llama.cpp's greedy picks first differ (the earliest over llama.cpp's
    runs): tsedge's logits there, fed the prompt and the common picks, give ``margin`` = logit of
    its pick − logit of llama.cpp's (a near-tie is a small fraction of the logits' scale, ``scale``:
    their max − median). Empty when all picks agree."""
    first = min(agreement["equal_prefix"].values())
    if first >= agreement["picks"]:
        return {}
    ours = next(r["tokens"] for r in result["decode"] if r["context"] == agreement["context"])
    theirs = next(r["tokens"] for run in result["peer"]["runs"] for r in run["decode"]
                  if r["context"] == agreement["context"] and r["tokens"][first] != ours[first])
    engine.reset()
    logits = engine.prefill(prompt + ours[:first])
    return {"first_difference": first, "tsedge_pick": ours[first], "llama_cpp_pick": theirs[first],
            "margin": round(float(logits[ours[first]] - logits[theirs[first]]), 5),
            "scale": round(float(logits.max() - np.median(logits)), 3)}


def run_speed(engine, model_path: Path, prefill_lengths: list[int], decode_contexts: list[int], steps: int,
              output: str | None, peer: str | None, threads: int, rounds_count: int = 1) -> dict:
    """``tsedge bench speed``: prefill and greedy decode of CPython's docs (tsedge's tokenizer),
    then with ``peer`` llama.cpp on the same ids, the table of both; JSON (and with a peer a PNG
    beside it, by default ``bench/results/cpu_<model>_vs_llamacpp_<quantization>``). With
    ``rounds_count`` > 1 the whole measurement repeats, tsedge and the peer taking turns, and each
    number is the best of its rounds (every round's in ``rounds_tok_per_s``)."""
    from datetime import datetime, timezone

    import tvm

    import tsedge
    from tsedge.bench import llamacpp_peer as lp
    from tsedge.bench.speed import (cpu_info, greedy_decode_speed, ids_digest, machine_info, prefill_speed,
                                    text_ids)

    if peer and engine.meta.target != "llvm":
        raise click.ClickException(f"--peer llama.cpp runs llama.cpp on the CPU, and this library is for "
                                   f"{engine.meta.target}: use --target llvm")
    ids = text_ids(engine, max(prefill_lengths + decode_contexts))
    prefill = {n: ids[:n] for n in prefill_lengths}
    decode = {n: ids[:n] for n in decode_contexts}
    result = {"info": {**machine_info(engine), **cpu_info(), "threads": threads,
                       "tvm_threads": tvm.get_global_func("runtime.NumThreads")(),
                       "tvm": tvm.__version__, "tsedge": tsedge.__version__, "python": platform.python_version(),
                       "model_file": Path(model_path).name,
                       "tokens": "CPython's docs (pydoc_data.topics) by tsedge's tokenizer, fed to both engines",
                       "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}}
    rounds, peer_rounds = [], []
    for index in range(rounds_count):  # interleaved, so that both engines see the machine's slow spells
        label = f"round {index + 1} of {rounds_count}: " if rounds_count > 1 else ""
        ours = {"prefill": [], "decode": []}
        for length, prompt in prefill.items():
            ours["prefill"].append({**prefill_speed(engine, length, ids=prompt), "ids": ids_digest(prompt)})
            click.echo(f"{label}prefill {length:6d} tokens: {ours['prefill'][-1]['tok_per_s']:8.1f} tok/s")
        for context, prompt in decode.items():
            ours["decode"].append({**greedy_decode_speed(engine, prompt, steps), "ids": ids_digest(prompt)})
            click.echo(f"{label}decode after {context:6d}: {ours['decode'][-1]['tok_per_s']:8.1f} tok/s")
        rounds.append(ours)
        if peer:
            click.echo(f"timing {peer} on {Path(model_path).name} with the same token ids, {threads} threads", err=True)
            try:
                peer_rounds.append(lp.measure(Path(model_path), prefill, decode, steps, threads))
            except lp.PeerError as err:
                raise click.ClickException(str(err)) from None
    result.update(lp.best_of_rounds(rounds))
    if peer:
        result["peer"] = lp.best_peer_of_rounds(peer_rounds)
        result["ratios"] = lp.ratios(result)
        result["greedy"] = [{**g, **_divergence_margin(engine, decode[g["context"]], result, g)}
                            for g in lp.greedy_agreement(result)]
        click.echo(lp.table(result))
        output = output or (f"bench/results/cpu_{engine.meta.model.name.split('-')[0]}_vs_llamacpp_"
                            f"{short_name(engine.meta.quantization)}.json")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=1))
        if peer:
            lp.plot(result, Path(output).with_suffix(".png"))
        click.echo(f"wrote {output}" + (" and its .png" if peer else ""), err=True)
    return result


bench_decode = _bench_command("decode")
bench_prefill = _bench_command("prefill")


if __name__ == "__main__":  # `python -m tsedge.cli_bench decode|prefill ...` (runtime-only hosts)
    import sys

    {"decode": bench_decode, "prefill": bench_prefill}[sys.argv.pop(1)]()
