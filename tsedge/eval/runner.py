"""``tsedge eval run``: a grid of tasks x policies x lengths on one model, as a table, JSON and a
heatmap.

Tasks take RULER's names (NVIDIA/RULER): ``passkey``, ``niah_single``, ``niah_multikey``,
``niah_multivalue``, ``niah_multiquery``, ``vt``, each sample generated from the run's seed (the
same prompts for every policy), answered greedily and scored by ``string_match_all`` (fraction of
references in the answer); and ``ppl``, perplexity per position bucket of a long document.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tsedge.eval import niah, ppl, vt
from tsedge.eval.haystack import DEPTHS, HAYSTACKS
from tsedge.eval.passkey import build_prompt
from tsedge.eval.sample import Sample, answer, sample_rng
from tsedge.models.config import POLICIES

PASSKEY_NEW_TOKENS = 16  # as `tsedge eval passkey`: SmolLM2 answers "The pass key is NNNNN"
PLANNED_POLICIES = tuple(p for p in ("tidaldecode", "recycled") if p not in POLICIES)  # issue 10


def _passkey(tokenizer, length: int, rng, haystack: str) -> Sample:
    """A passkey sample (its own repeated filler), the key at one of RULER's 40 depths."""
    key = rng.randrange(10000, 100000)
    return Sample(build_prompt(tokenizer, length, rng.choice(DEPTHS) / 100, key), [str(key)], PASSKEY_NEW_TOKENS)


# task -> (haystacks it runs on, sample maker; None for ppl, which scores a document)
TASKS: dict[str, tuple[tuple[str, ...], Callable | None]] = {
    "passkey": (("repeat",), _passkey),
    **{name: (HAYSTACKS, functools.partial(niah.make_sample, name)) for name in niah.VARIANTS},
    "vt": (HAYSTACKS, vt.make_sample),
    "ppl": (("prose",), None),
}


def check_names(names: list[str], what: str, available: tuple[str, ...], planned: tuple[str, ...] = ()) -> list[str]:
    """``names`` if each is in ``available``; else ValueError (one line naming them)."""
    if not names:
        raise ValueError(f"no {what} given; available: {', '.join(available)}")
    for name in names:
        if name not in available:
            state = "is not implemented yet (issue 10)" if name in planned else "is unknown"
            raise ValueError(f"{what} {name!r} {state}; available: {', '.join(available)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a {what} is named twice in {','.join(names)}")
    return names


def check_policies(names: list[str]) -> list[str]:
    """``names`` if each policy is compiled by tsedge (a variant ``policy@label`` by its policy);
    else ValueError naming the available ones."""
    check_names(list(dict.fromkeys(name.split("@")[0] for name in names)), "policy", POLICIES, PLANNED_POLICIES)
    if len(set(names)) != len(names):
        raise ValueError(f"a policy is named twice in {','.join(names)}")
    return names


def parse_lengths(text: str) -> list[int]:
    """``"2k,4k,8k"`` -> ``[2048, 4096, 8192]``; raises ValueError on an entry that is not a
    positive token count."""
    lengths = []
    for item in text.split(","):
        item = item.strip().lower()
        digits = item[:-1] if item.endswith("k") else item
        if not digits.isdigit() or int(digits) == 0:
            raise ValueError(f"bad length {item!r}: use positive token counts like 2k,4k,8k or 3000")
        lengths.append(int(digits) * (1024 if item.endswith("k") else 1))
    return lengths


def length_label(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


@dataclasses.dataclass(frozen=True)
class Grid:
    """What to run: tasks (each on those of ``haystacks`` it takes), lengths in
    prompt tokens, samples (documents for ``ppl``) per cell, and the seed of every sample."""

    tasks: list[str]
    haystacks: list[str]
    lengths: list[int]
    samples: int
    seed: int

    def __post_init__(self) -> None:
        check_names(self.tasks, "task", tuple(TASKS))
        check_names(self.haystacks, "haystack", HAYSTACKS)
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")

    def cases(self) -> list[tuple[str, str, int]]:
        """(task, haystack, length) of every cell of one policy, in run order; a task with one
        haystack of its own (passkey, ppl) runs whatever ``haystacks`` holds."""
        return [(task, haystack, length) for length in self.lengths for task in self.tasks
                for haystack in TASKS[task][0] if haystack in self.haystacks or len(TASKS[task][0]) == 1]

    def capacity(self) -> int:
        """KV-cache tokens the longest prompt and its answer need."""
        return max(self.lengths) + max(niah.MAX_NEW_TOKENS, vt.MAX_NEW_TOKENS, PASSKEY_NEW_TOKENS)

    def inputs(self, tokenizer) -> dict[tuple[str, str, int], list]:
        """Per case, its samples (token-id documents for ``ppl``), made once for all policies."""
        out = {}
        for task, haystack, length in self.cases():
            make = TASKS[task][1]
            rngs = [sample_rng(self.seed, task, haystack, length, i) for i in range(self.samples)]
            out[task, haystack, length] = [ppl.document(tokenizer, length, rng) if make is None
                                           else make(tokenizer, length, rng, haystack) for rng in rngs]
        return out


def _cell(engine, task: str, items: list, on_sample: Callable[[], None]) -> dict[str, Any]:
    """Score of one (task, haystack, length) cell on ``engine``: mean ``string_match_all`` with
    every answer, or (``ppl``) the perplexity summary with every document's buckets."""
    results = []
    for item in items:
        results.append(ppl.bucket_losses(engine, item) if task == "ppl" else answer(engine, item))
        on_sample()
    if task == "ppl":
        summary = ppl.summarize(results)
        return {"metric": "ppl", "score": summary["ppl"], **summary, "samples": results}
    return {"metric": "string_match_all", "score": sum(r["score"] for r in results) / len(results),
            "samples": results}


# progress(policy, (task, haystack, length), finished cell or None after a sample)
Progress = Callable[[str, tuple[str, str, int], "dict[str, Any] | None"], None]


def _quiet(*_args) -> None:
    pass


def run(open_engine: Callable[[str], Any], policies: list[str], grid: Grid,
        progress: Progress | None = None) -> dict[str, Any]:
    """Every cell of ``grid`` on each policy's engine (``open_engine(policy)``, opened in turn).

    ``progress`` is called after each sample and each cell. Returns a JSON-able dict: ``config``,
    ``info`` (machine, from the first engine) and ``cells`` (task, haystack, policy, length, metric,
    score — a fraction for string matches, a perplexity for ``ppl`` — and every sample's details).
    """
    import tsedge
    from tsedge.bench.speed import machine_info

    check_policies(policies)
    inputs = None
    config: dict[str, Any] = {**dataclasses.asdict(grid), "policies": {}, "capacity": grid.capacity()}
    info: dict[str, Any] = {}
    cells = []
    for policy in policies:
        engine = open_engine(policy)
        inputs = inputs or grid.inputs(engine.tokenizer)
        info = info or {**machine_info(engine), "tsedge": tsedge.__version__}
        config["policies"][policy] = engine.meta.policy.to_dict()
        for case, items in inputs.items():
            start = time.perf_counter()
            cell = _cell(engine, case[0], items, functools.partial(progress or _quiet, policy, case, None))
            task, haystack, length = case
            cells.append({"task": task, "haystack": haystack, "policy": policy, "length": length,
                          "seconds": round(time.perf_counter() - start, 2), **cell})
            (progress or _quiet)(policy, case, cells[-1])
        engine.close()
    return {"task": "eval", "config": config, "info": info, "cells": cells}


# ---- report -------------------------------------------------------------------------------------
def _rows(result: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(label, task, haystack) of each table row, in the run's task order."""
    seen = dict.fromkeys((c["task"], c["haystack"]) for c in result["cells"])
    for task, haystack in seen:
        yield f"{task} ({haystack})", task, haystack


def _columns(result: dict[str, Any]) -> list[tuple[str, int]]:
    config = result["config"]
    return [(policy, length) for policy in config["policies"] for length in config["lengths"]]


def _scores(result: dict[str, Any]) -> dict[tuple[str, str, str, int], float]:
    return {(c["task"], c["haystack"], c["policy"], c["length"]): c["score"] for c in result["cells"]}


def format_table(result: dict[str, Any]) -> str:
    """Markdown table: a row per task (and haystack), a column per policy and length; string-match
    tasks in % of references recalled (mean over samples), ``ppl`` as perplexity (lower is better),
    the mean of the string-match rows, and "-" for a cell that did not run."""
    columns, scores = _columns(result), _scores(result)
    lines = ["| task | " + " | ".join(f"{p} {length_label(n)}" for p, n in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    matched = []
    for label, task, haystack in _rows(result):
        row = [scores.get((task, haystack, p, n)) for p, n in columns]
        if task == "ppl":
            lines.append(f"| {label}, perplexity | " + " | ".join("-" if s is None else f"{s:.2f}" for s in row) + " |")
        else:
            matched.append(row)
            lines.append(f"| {label} | " + " | ".join("-" if s is None else f"{100 * s:.0f} %" for s in row) + " |")
    if len(matched) > 1:
        means = [None if None in col else sum(col) / len(col) for col in zip(*matched)]
        lines.append("| mean of the string-match rows | "
                     + " | ".join("-" if m is None else f"{100 * m:.0f} %" for m in means) + " |")
    return "\n".join(lines)


def load_result(path: Path) -> dict[str, Any]:
    """A saved ``tsedge eval run`` result; raises ValueError (one line naming the file) for a file
    that is not JSON or not such a result."""
    try:
        result = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e}); give files written by `tsedge eval run -o`") from None
    if not isinstance(result, dict) or not {"config", "info", "cells"} <= result.keys():
        raise ValueError(f"{path} is not a `tsedge eval run` result (no config/info/cells); "
                         "give files written by `tsedge eval run -o`")
    return result


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result of several runs of one model (e.g. one per length or per policy): their cells,
    policies, lengths and tasks together. Raises ValueError when the models differ or a policy
    ran with different settings."""
    first = results[0]
    policies: dict[str, Any] = {}
    for result in results:
        if result["info"].get("model") != first["info"].get("model"):
            raise ValueError(f"these results are of different models ({first['info'].get('model')}, "
                             f"{result['info'].get('model')}); table them apart")
        for name, settings in result["config"]["policies"].items():
            if policies.setdefault(name, settings) != settings:
                raise ValueError(f"policy {name} ran with different settings in these results; table them apart")
    config = {**first["config"], "policies": policies,
              "tasks": list(dict.fromkeys(t for r in results for t in r["config"]["tasks"])),
              "lengths": sorted({n for r in results for n in r["config"]["lengths"]}),
              "samples": sorted({r["config"]["samples"] for r in results})}
    return {**first, "config": config, "cells": [c for r in results for c in r["cells"]]}


def plot(result: dict[str, Any], path: Path) -> None:
    """Heatmap PNG: string-match scores (%) by task x (policy, length); beside it, when ``ppl``
    ran, perplexity by position bucket x (policy, length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _columns(result)
    xlabels = [f"{p}\n{length_label(n)}" for p, n in columns]
    rows = [r for r in _rows(result) if r[1] != "ppl"]
    ppl_cells = {(c["policy"], c["length"]): c for c in result["cells"] if c["task"] == "ppl"}
    panels = [p for p, present in (("match", rows), ("ppl", ppl_cells)) if present]
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(2.2 + 1.1 * len(columns) * len(panels), 1.6 + 0.45 * max(len(rows), 4)))
    info = result["info"]
    fig.suptitle(f"{info.get('model', '')} on {info.get('device', info.get('target', ''))}: "
                 f"samples per cell: {result['config']['samples']}")
    for ax, panel in zip(axes[0], panels):
        if panel == "match":
            scores = _scores(result)
            grid = [[100 * scores[t, h, p, n] for p, n in columns] for _, t, h in rows]
            labels, title, fmt, cmap, limits = [r[0] for r in rows], "% of references recalled", "{:.0f}", "RdYlGn", (0, 100)
        else:
            buckets = len(next(iter(ppl_cells.values()))["buckets"])
            grid = [[ppl_cells[col]["buckets"][b]["ppl"] for col in columns] for b in range(buckets)]
            labels = [f"tokens to {100 * (b + 1) // buckets} %" for b in range(buckets)]
            title, fmt, cmap, limits = "perplexity by position (prose)", "{:.1f}", "RdYlGn_r", (None, None)
        image = ax.imshow(grid, cmap=cmap, vmin=limits[0], vmax=limits[1], aspect="auto")
        ax.set_xticks(range(len(columns)), xlabels, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(title, fontsize=9)
        for y, line in enumerate(grid):
            for x, value in enumerate(line):
                ax.text(x, y, fmt.format(value), ha="center", va="center", fontsize=7)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
