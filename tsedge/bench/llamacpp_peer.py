"""llama.cpp beside tsedge in ``tsedge bench speed --peer llama.cpp``: the same GGUF file, the
same token ids and the same thread count, timed through llama-cpp-python's low-level API.

The peer runs in a child process (``python -m tsedge.bench.llamacpp_peer REQUEST.json``) so that
its OpenMP threads and TVM's thread pool never spin against each other on the same cores, and
so that llama.cpp's own logging stays out of the table; the child prints one JSON object.

What the child sets (recorded in its ``settings``): ``n_threads`` = ``n_threads_batch`` = the
bench's thread count; ``n_ctx`` the largest prompt or context plus the decode steps, rounded up to
256; ``n_batch`` = ``n_ctx`` so a whole prompt is one ``llama_decode`` call (llama.cpp splits it
into ``n_ubatch`` = 512-token micro-batches, tsedge's prefill chunk); KV cache float16 (llama.cpp's
default); logits of the last token only; model loading as llama.cpp's defaults. Everything is timed
twice, flash attention on and off (on this CPU build, on slows decode at 2K tokens of context
2.4x), and the ratios are taken against the faster. Decode steps are single-token
``llama_decode`` calls, each fed the argmax of the previous step's logits (NumPy on the host),
after one warm-up step.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NAME = "llama.cpp"
INSTALL = 'pip install -e ".[bench]"'
UBATCH = 512


class PeerError(RuntimeError):
    """llama.cpp could not be run; the message is one line naming the fix."""


def missing_message() -> str | None:
    """None when llama-cpp-python is importable, else the one line that says how to install it."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return None
    return (f"--peer {NAME} needs llama-cpp-python, which is not installed: run `{INSTALL}` (builds llama.cpp "
            "from source, CPU only; needs cmake and a C++ compiler; minutes on 2 cores)")


def measure(gguf: Path, prefill: dict[int, list[int]], decode: dict[int, list[int]], steps: int,
            threads: int) -> dict[str, Any]:
    """Time llama.cpp on ``gguf``: a prefill of each id list in ``prefill`` (keyed by length) and
    ``steps`` greedy decode steps after each context in ``decode``; in a child process."""
    request = {"gguf": str(gguf), "prefill": {str(k): v for k, v in prefill.items()},
               "decode": {str(k): v for k, v in decode.items()}, "steps": steps, "threads": threads}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    try:
        proc = subprocess.run([sys.executable, "-m", "tsedge.bench.llamacpp_peer", f.name],
                              capture_output=True, text=True)
    finally:
        Path(f.name).unlink()
    if proc.returncode:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise PeerError(f"{NAME} failed on {gguf.name}: {reason} (reinstall it with `{INSTALL}`)")
    return json.loads(proc.stdout)


# ---- the comparison ---------------------------------------------------------------------------------
def _fa(on: bool) -> str:
    return "FA on" if on else "FA off"


def best_of_rounds(rounds: list[dict]) -> dict[str, list[dict]]:
    """``{"prefill": [...], "decode": [...]}`` from several rounds of the same measurements (each
    such a dict, rows in the same order): per row the round with the most tok/s, and with more
    than one round every round's tok/s (``rounds_tok_per_s``)."""
    best = {}
    for kind in ("prefill", "decode"):
        best[kind] = []
        for rows in zip(*(r[kind] for r in rounds)):
            top = max(rows, key=lambda row: row["tok_per_s"])
            best[kind].append(top if len(rows) == 1 else {**top, "rounds_tok_per_s": [r["tok_per_s"] for r in rows]})
    return best


def best_peer_of_rounds(rounds: list[dict]) -> dict[str, Any]:
    """Several rounds of ``measure`` as one: each run (flash attention setting) with the best of
    its rows over the rounds (``best_of_rounds``)."""
    runs = [{**run, **best_of_rounds([r["runs"][i] for r in rounds])} for i, run in enumerate(rounds[0]["runs"])]
    return {**rounds[0], "runs": runs}


def ratios(result: dict) -> list[dict[str, Any]]:
    """One row per measurement both engines made: tok/s of tsedge, of llama.cpp with flash
    attention on and off, and tsedge / the faster llama.cpp (> 1: tsedge faster). With rounds
    (``rounds_tok_per_s`` on both sides) also each round's ratio (``round_ratios``: the engines
    timed minutes apart, not the best of each over the whole run) and their median."""
    rows = []
    for kind, key in (("prefill", "tokens"), ("decode", "context")):
        runs = {_fa(run["flash_attention"]): {r[key]: r for r in run[kind]} for run in result["peer"]["runs"]}
        for row in result[kind]:
            peer = {fa: values[row[key]] for fa, values in runs.items() if row[key] in values}
            if not peer:
                continue
            best = max(r["tok_per_s"] for r in peer.values())
            rows.append({"kind": kind, key: row[key], "tsedge": row["tok_per_s"],
                         "llama.cpp": {fa: r["tok_per_s"] for fa, r in peer.items()},
                         "ratio": round(row["tok_per_s"] / best, 3)})
            if "rounds_tok_per_s" in row and all("rounds_tok_per_s" in r for r in peer.values()):
                per_round = [round(ours / max(r["rounds_tok_per_s"][i] for r in peer.values()), 3)
                             for i, ours in enumerate(row["rounds_tok_per_s"])]
                rows[-1].update(round_ratios=per_round, median_round_ratio=statistics.median(per_round))
    return rows


def greedy_agreement(result: dict) -> list[dict[str, Any]]:
    """Per decode context both engines ran: how many greedy picks, from the first on, tsedge and
    llama.cpp (each flash attention setting) have in common (``equal_prefix``), of ``picks``."""
    rows = []
    for row in result["decode"]:
        same = {}
        for run in result["peer"]["runs"]:
            theirs = next((r["tokens"] for r in run["decode"] if r["context"] == row["context"]), None)
            if theirs is not None:
                pairs = list(zip(row["tokens"], theirs))
                same[_fa(run["flash_attention"])] = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
        if same:
            rows.append({"context": row["context"], "picks": len(row["tokens"]), "equal_prefix": same})
    return rows


def _label(row: dict) -> str:
    return f"prefill {row['tokens']} tokens" if row["kind"] == "prefill" else f"decode after {row['context']}"


def table(result: dict) -> str:
    """Markdown: tok/s of tsedge and of llama.cpp (each flash attention setting) side by side and
    tsedge / the faster llama.cpp."""
    info, peer = result["info"], result["peer"]
    settings = [_fa(run["flash_attention"]) for run in peer["runs"]]
    rounds = any("round_ratios" in r for r in result["ratios"])
    lines = ["| " + " | ".join([f"{info['model']}, {info['threads']} threads", f"tsedge {info['quantization']}",
                                *(f"llama.cpp {peer['model_type']} {fa}" for fa in settings),
                                "tsedge / faster llama.cpp"] + ["per round (median)"] * rounds) + " |",
             "|---" * (len(settings) + 3 + rounds) + "|"]
    for r in result["ratios"]:
        cells = [_label(r), f"{r['tsedge']:.1f} tok/s",
                 *(f"{r['llama.cpp'][fa]:.1f} tok/s" if fa in r["llama.cpp"] else "—" for fa in settings),
                 f"{r['ratio']:.2f}×"]
        if rounds:
            cells.append(" / ".join(f"{x:.2f}" for x in r.get("round_ratios", [])) +
                         (f"× ({r['median_round_ratio']:.2f}×)" if "round_ratios" in r else "—"))
        lines.append("| " + " | ".join(cells) + " |")
    for g in result.get("greedy", []):
        same = ", ".join(f"{n} ({fa})" for fa, n in g["equal_prefix"].items())
        margin = (f"; at the first difference tsedge's logit of its pick leads llama.cpp's pick by "
                  f"{g['margin']:.4f}" if "margin" in g else "")
        lines.append(f"greedy picks after {g['context']}: the first {same} of {g['picks']} equal{margin}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Bars of tok/s, tsedge beside llama.cpp (each flash attention setting) for each
    measurement, tsedge / the faster llama.cpp above each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, info, peer = result["ratios"], result["info"], result["peer"]
    series = [(f"tsedge {info['quantization']}", lambda r: r["tsedge"])]
    series += [(f"llama.cpp {peer['model_type']} {fa}", lambda r, fa=fa: r["llama.cpp"].get(fa, 0))
               for fa in (_fa(run["flash_attention"]) for run in peer["runs"])]
    width = 0.8 / len(series)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind in zip(axes, ("prefill", "decode")):
        mine = [r for r in rows if r["kind"] == kind]
        for k, (name, value) in enumerate(series):
            ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(mine))], [value(r) for r in mine],
                   width, label=name)
        for i, r in enumerate(mine):
            ax.annotate(f"{r['ratio']:.2f}×", (i, max(value(r) for _, value in series)), ha="center", va="bottom")
        ax.set_xticks(range(len(mine)), [_label(r) for r in mine])
        ax.set_ylabel("tokens / s")
        ax.set_title(kind)
        ax.margins(y=0.15)
        ax.legend(fontsize="small")
    fig.suptitle(f"{info['model']} on {info['cpu_model']}, {info['threads']} threads "
                 "(above: tsedge / the faster llama.cpp)", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the child process ---------------------------------------------------------------------------
def _set_flash_attention(params, on: bool) -> str:
    """Flash attention on or off in llama_context_params, whichever field this version has."""
    import llama_cpp as L

    if "flash_attn_type" in {name for name, _ in params._fields_}:  # llama.cpp since mid-2025
        params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if on else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        return f"flash_attn_type=LLAMA_FLASH_ATTN_TYPE_{'ENABLED' if on else 'DISABLED'}"
    params.flash_attn = on
    return f"flash_attn={str(on).lower()}"


class _Runner:
    """One llama.cpp model and context, fed token ids through ``llama_decode``."""

    def __init__(self, gguf: str, n_ctx: int, threads: int, flash_attention: bool) -> None:
        import llama_cpp as L

        self.L = L
        self._quiet = L.llama_log_callback(lambda *_args: None)  # referenced while llama.cpp may call it
        L.llama_log_set(self._quiet, None)
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(gguf.encode(), L.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {gguf}")
        params = L.llama_context_default_params()
        params.n_ctx = params.n_batch = n_ctx
        params.n_ubatch = UBATCH
        params.n_threads = params.n_threads_batch = threads
        flash = _set_flash_attention(params, flash_attention)
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise SystemExit("llama.cpp could not create a context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        desc = ctypes.create_string_buffer(256)
        L.llama_model_desc(self.model, desc, len(desc))
        self.desc = desc.value.decode()  # e.g. "llama 256M Q4_1" (the size is llama.cpp's guess)
        kv_types = {0: "f32", 1: "f16", 8: "q8_0"}
        self.settings = {"n_ctx": L.llama_n_ctx(self.ctx), "n_batch": L.llama_n_batch(self.ctx),
                         "n_ubatch": L.llama_n_ubatch(self.ctx), "n_threads": L.llama_n_threads(self.ctx),
                         "n_threads_batch": L.llama_n_threads_batch(self.ctx), "flash_attention": flash,
                         "type_k": kv_types.get(params.type_k, params.type_k),
                         "type_v": kv_types.get(params.type_v, params.type_v), "logits": "last token only"}

    def close(self) -> None:
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)

    def clear(self) -> None:
        L = self.L
        if hasattr(L, "llama_memory_clear"):
            L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        else:
            L.llama_kv_self_clear(self.ctx)

    def eval(self, ids: list[int]) -> int:
        """Append ``ids`` (one llama_decode call); the argmax of the last token's logits."""
        import numpy as np

        L = self.L
        tokens = (L.llama_token * len(ids))(*ids)
        rc = L.llama_decode(self.ctx, L.llama_batch_get_one(tokens, len(ids)))
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc} for {len(ids)} tokens")
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        return int(np.argmax(logits))


def _time(runner: _Runner, prefill: dict[int, list[int]], decode: dict[int, list[int]], steps: int) -> dict:
    """Prefill speed of each prompt and greedy decode speed after each context, as tsedge's
    ``prefill_speed`` and ``greedy_decode_speed`` time them."""
    from tsedge.bench.speed import ids_digest

    run = {"flash_attention": runner.settings["flash_attention"].endswith(("ENABLED", "true")),
           "settings": runner.settings, "prefill": [], "decode": []}
    for length, ids in prefill.items():
        runner.clear()
        runner.eval(ids[:8])  # warm-up
        runner.clear()
        start = time.perf_counter()
        runner.eval(ids)
        seconds = time.perf_counter() - start
        run["prefill"].append({"tokens": length, "seconds": round(seconds, 4),
                               "tok_per_s": round(length / seconds, 2), "ids": ids_digest(ids)})
    for context, ids in decode.items():
        runner.clear()
        picks = [runner.eval(ids)]
        picks.append(runner.eval(picks[-1:]))  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            picks.append(runner.eval(picks[-1:]))
        seconds = time.perf_counter() - start
        run["decode"].append({"context": context, "steps": steps, "ms_per_token": round(1000 * seconds / steps, 3),
                              "tok_per_s": round(steps / seconds, 2), "sampling": "host",
                              "ids": ids_digest(ids), "tokens": picks})
    return run


def _file_type(desc: str) -> str:
    """The weight type in llama.cpp's model description ("llama 256M Q4_1" -> "Q4_1")."""
    words = desc.split()
    return words[2] if len(words) > 2 else desc


def _child(request: dict) -> dict:
    import llama_cpp

    steps = request["steps"]
    prefill = {int(k): v for k, v in request["prefill"].items()}
    decode = {int(k): v for k, v in request["decode"].items()}
    need = max([len(v) for v in prefill.values()] + [len(v) + steps + 2 for v in decode.values()])
    result = {"name": NAME, "llama_cpp_python": llama_cpp.__version__,
              "system_info": llama_cpp.llama_print_system_info().decode().strip(), "runs": []}
    for flash_attention in (True, False):
        runner = _Runner(request["gguf"], -(-need // 256) * 256, request["threads"], flash_attention)
        result.update(model_desc=runner.desc, model_type=_file_type(runner.desc))
        result["runs"].append(_time(runner, prefill, decode, steps))
        runner.close()
    return result


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(Path(sys.argv[1]).read_text()))))
