"""``tsedge eval run``: RULER-style tasks and perplexity over policies x lengths (tsedge/eval/runner.py);
``tsedge eval table``: the table of saved runs."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from tsedge.cli_options import TARGET_HELP, cache_correction_option, policy_config, policy_options, resolve_target
from tsedge.progress import interactive

ALL_TASKS = "passkey,niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt,ppl"


def _cli_errors(func):
    """``tsedge.cli``'s one-line errors, looked up when the command runs (tsedge.cli imports this
    module to register the command)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from tsedge.cli import _errors

        return _errors(func)(*args, **kwargs)

    return wrapper


def _budget_options(func):
    """The budgets of ``policy_options`` and --dtype; not --policy (--policies lists them) nor
    --max-context (the grid's longest prompt and answer set it)."""
    func = policy_options(func)
    func.__click_params__ = [p for p in func.__click_params__ if p.name not in ("policy", "max_context")]
    return func


def _tidal_sweep(configs: dict[str, Any], sweep: str) -> dict[str, Any]:
    """``configs`` with ``tidaldecode`` replaced by one variant per re-selection layer of ``sweep``
    (``"8,10,none"``), named ``tidaldecode@r8``, ..., ``tidaldecode@rnone``. Raises ValueError (one
    line) without tidaldecode among the policies or for an entry that is not a layer."""
    if "tidaldecode" not in configs:
        raise ValueError("--tidal-reselect-sweep varies TidalDecode: add tidaldecode to --policies")
    out = {}
    for name, config in configs.items():
        if name != "tidaldecode":
            out[name] = config
            continue
        for item in (part.strip().lower() for part in sweep.split(",")):
            if item != "none" and not item.isdigit():
                raise ValueError(f"--tidal-reselect-sweep {sweep!r}: use layer numbers or none, e.g. 8,10,13,none")
            layers = () if item == "none" else (int(item),)
            out[f"tidaldecode@r{item}"] = dataclasses.replace(config, tidal_reselect_layers=layers)
    return out


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Any]:
    """``runner.run``'s progress callback: a bar naming the current cell on a terminal, else one
    line on stderr per finished cell."""
    from tsedge.eval.runner import length_label

    def describe(policy: str, case: tuple[str, str, int]) -> str:
        task, haystack, length = case
        return f"{policy} {length_label(length)} {task} ({haystack})"

    def score(cell: dict) -> str:
        return f"perplexity {cell['score']:.2f}" if cell["metric"] == "ppl" else f"{100 * cell['score']:.0f} %"

    if not interactive():
        def line(policy, case, cell) -> None:
            if cell is not None:
                click.echo(f"tsedge: {describe(policy, case)}: {score(cell)} ({cell['seconds']} s)", err=True)

        yield line
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as bar:
        task = bar.add_task("eval", total=total)

        def update(policy, case, cell) -> None:
            if cell is None:
                bar.update(task, advance=1, description=describe(policy, case))
            else:
                bar.console.print(f"{describe(policy, case)}: {score(cell)} ({cell['seconds']} s)")

        yield update


@click.command("run")
@click.option("--model", default="smollm2-135m", show_default=True, help="preset name, .gguf or HF folder")
@click.option("--target", default=None, help=TARGET_HELP)
@click.option("--tasks", default=ALL_TASKS, show_default=True, help="comma-separated RULER task names")
@click.option("--haystacks", default="repeat,prose", show_default=True,
              help="filler of the NIAH and vt tasks: repeated sentences, natural prose (CPython's docs)")
@click.option("--policies", default="dense,tokenselect,streaming", show_default=True)
@click.option("--lengths", default="2k,4k,8k", show_default=True, help="prompt tokens (ppl: document tokens)")
@click.option("--samples", type=click.IntRange(min=1), default=4, show_default=True,
              help="samples per cell (ppl: documents)")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="seed of every sample")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="JSON file, the heatmap PNG beside it (default: bench/results/eval_<model>_<target>.json)")
@click.option("--tidal-reselect-sweep", default=None, metavar="R,R,...",
              help="TidalDecode: one variant per re-selection layer (`none` for none), e.g. 8,10,13 — to find "
                   "a model's R; columns tidaldecode@r8, ... (replaces --tidal-reselect-layers)")
@click.option("--compile-only", is_flag=True,
              help="compile the policies' libraries into the library cache (TSEDGE_CACHE) and stop: build "
                   "here, run on another machine with the same cache")
@_budget_options
@cache_correction_option
@_cli_errors
def eval_run(model, target, tasks, haystacks, policies, lengths, samples, seed, output, tidal_reselect_sweep,
             compile_only, **kw) -> None:
    """Accuracy of each policy on RULER's synthetic tasks and perplexity, by prompt length."""
    from tsedge.cli import _checked_target, _max_context
    from tsedge.engine import Engine
    from tsedge.eval.runner import Grid, check_policies, format_table, parse_lengths, plot, run
    from tsedge.library_cache import ensure_library
    from tsedge.tensor_parallel import open_engine as open_library
    from tsedge.weights import load_source

    names = check_policies(_names(policies))
    grid = Grid(_names(tasks), _names(haystacks), parse_lengths(lengths), samples, seed)
    configs = {name: policy_config({**kw, "policy": name}) for name in names}
    if tidal_reselect_sweep is not None:
        configs = _tidal_sweep(configs, tidal_reselect_sweep)
        names = list(configs)
    if compile_only:  # the GPU is where it runs, not here
        target = resolve_target(target)
    else:
        target = _checked_target(target, None)
    source = load_source(model)
    libs = {}
    for name, config in configs.items():
        capacity = _max_context({"max_context": grid.capacity()}, config, source.config.context_window)
        libs[name] = ensure_library(source.config, config, target, kw["dtype"], capacity,
                                    log=functools.partial(click.echo, err=True), tensor_parallel=kw["tensor_parallel"])
    if compile_only:
        click.echo("\n".join(str(path) for path in libs.values()))
        return

    def open_engine(name: str) -> Engine:
        return open_library(libs[name], source, prefill_chunk=configs[name].chunk_size,
                            cache_correction=kw["cache_correction"])

    with _progress(len(names) * len(grid.cases()) * samples) as progress:
        result = run(open_engine, names, grid, progress)
    result["config"]["cache_correction"] = kw["cache_correction"]
    click.echo(format_table(result))
    path = Path(output or f"bench/results/eval_{source.config.name}_{result['info']['target'].replace(':', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    plot(result, path.with_suffix(".png"))
    click.echo(f"wrote {path} and {path.with_suffix('.png')}", err=True)


@click.command("table")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@_cli_errors
def eval_table(results) -> None:
    """The table of one or more `tsedge eval run` JSON files of one model (e.g. one per length)."""
    from tsedge.eval.runner import format_table, load_result, merge

    click.echo(format_table(merge([load_result(Path(path)) for path in results])))
