"""Options the ``tsedge`` verbs share, each checked at the command line (one error line naming the
accepted range), and what ``generate`` and ``chat`` share: prompt text, sampling, prefill display."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tsedge.models.config import POLICIES, SCORE_KEYS, PolicyConfig, parse_recycle_k
from tsedge.models.quantization import SCHEMES
from tsedge.progress import interactive, token_progress
from tsedge.sampling import PEER_DEFAULTS, SamplingParams, generation_config_defaults


TARGET_HELP = "llvm | cuda | cuda:sm_XX | vulkan (default: cuda when a CUDA GPU is visible, else llvm)"


def resolve_target(name: str | None) -> str:
    """The canonical target name for ``--target`` (the local GPU's arch for a bare ``cuda``)."""
    from tsedge.compile.targets import canonical_target_name, default_target_name

    return canonical_target_name(name or default_target_name())


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also rejects NaN and infinities (which compare False to any bound)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def number_list(item_type: click.ParamType) -> Callable[[click.Context, click.Parameter, str], list]:
    """Callback parsing a comma-separated option into a list, each item checked by ``item_type``."""

    def parse(ctx: click.Context, param: click.Parameter, value: str) -> list:
        return [item_type.convert(item.strip(), param, ctx) for item in value.split(",")]

    return parse


POSITIVE_INTS = number_list(click.IntRange(min=1))


# ---- text ---------------------------------------------------------------------------------------
def utf8_text(data: bytes) -> str:
    """``data`` decoded as UTF-8, or a ValueError naming the first bad byte and the fix."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         "re-encode it as UTF-8, e.g. with iconv -f latin1 -t utf-8") from None


def utf8_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Callback for text options: click passes argv bytes that are not UTF-8 as lone surrogates
    (PEP 383); recover the bytes and reject them as ``--prompt-file`` rejects such a file."""
    if value is None:
        return None
    try:
        return utf8_text(os.fsencode(value))
    except ValueError as err:
        raise click.BadParameter(str(err), ctx, param) from None


def read_text_file(path: str) -> str:
    """The UTF-8 text of ``path`` (a ValueError naming the file and the fix otherwise)."""
    try:
        return utf8_text(Path(path).read_bytes())
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


# ---- policy -------------------------------------------------------------------------------------
def policy_options(func):
    """--policy and the budgets of selecting policies (TokenSelect paper defaults), --max-context
    and --dtype."""
    defaults = PolicyConfig()
    options = [
        click.option("--policy", type=click.Choice(POLICIES), default="dense", show_default=True),
        click.option("--n-init", type=click.IntRange(min=0), default=defaults.n_init,
                     show_default=True, help="sink tokens"),
        click.option("--n-local", type=click.IntRange(min=1), default=defaults.n_local,
                     show_default=True, help="recent tokens"),
        click.option("--select-top-k", type=click.IntRange(min=1), default=defaults.top_k,
                     show_default=True, help="tokens TokenSelect selects"),
        click.option("--chunk-size", type=click.IntRange(min=1), default=defaults.chunk_size,
                     show_default=True, help="prefill chunk (tokens)"),
        click.option("--selection-threshold", type=FiniteFloatRange(min=-1),
                     default=defaults.selection_threshold, show_default=True,
                     help="Selection Cache cosine threshold (above 1: never reuse a selection)"),
        click.option("--pool-kernel", type=click.IntRange(min=0), default=defaults.pool_kernel,
                     show_default=True,
                     help="max-pool smoothing of criticality (0 = off; the reference uses 6 for passkey)"),
        click.option("--score-keys", type=click.Choice(SCORE_KEYS), default=defaults.score_keys, show_default=True,
                     help="TokenSelect scores the cached keys (exact) or int8 codes of them kept beside the cache "
                          "(int8: half the bytes of float16 keys; CUDA sm_80+ and CPUs)"),
        click.option("--tidal-budget", type=click.IntRange(min=1), default=defaults.tidal_budget,
                     show_default=True, help="tokens each head attends to in TidalDecode's sparse layers"),
        click.option("--tidal-select-layer", type=click.IntRange(min=0),
                     default=defaults.tidal_select_layer, show_default=True,
                     help="TidalDecode: the layer that attends densely and selects (earlier: dense)"),
        click.option("--tidal-reselect-layers", default=",".join(map(str, defaults.tidal_reselect_layers)),
                     show_default=True, callback=_layer_list,
                     help="TidalDecode: layers that attend densely and select again (comma list; none)"),
        click.option("--tidal-per-kv-head", is_flag=True, default=False,
                     help="TidalDecode: one token set per KV head (max of its group's logits), not per query head"),
        click.option("--recycle-k", type=RecycleK(), default=defaults.recycle_k, show_default=True,
                     help=RECYCLE_K_HELP),
        click.option("--recycle-stride", type=click.IntRange(min=1), default=defaults.recycle_stride,
                     show_default=True, help="Recycled Attention: decode steps between refresh checks (paper: 5 or 10)"),
        click.option("--recycle-threshold", type=FiniteFloatRange(min=-1), default=defaults.recycle_threshold,
                     show_default=True,
                     help="Recycled Attention: full step when the mean query's cosine to the last full step's is below"),
        click.option("--recycle-fixed-stride", is_flag=True, default=False,
                     help="Recycled Attention: a full step every --recycle-stride steps, no similarity check"),
        click.option("--recycle-min-k", type=click.IntRange(min=1), default=defaults.recycle_min_k, show_default=True,
                     help="Recycled Attention: a fraction's K is at least this many rows (contexts up to it run dense)"),
        click.option("--max-context", type=click.IntRange(min=1), default=None,
                     help="KV cache size in tokens (default: the model's window, at most 8192; "
                          "32768 for selecting policies)"),
        click.option("--dtype", type=click.Choice(["auto", "float16", "float32"]), default="auto",
                     show_default=True, help="auto: float16 on GPUs, float32 on CPUs"),
        click.option("--tensor-parallel", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
                     help="tensor-parallel shards: heads, KV heads, MLP columns and lm_head rows split N ways; "
                          "the library runs as N processes (one per GPU over NCCL, or on the CPU)"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def cache_correction_option(func):
    """--cache-correction: ``Engine.cache_correction`` (a runtime setting; the library is the same)."""
    return click.option(
        "--cache-correction", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
        help="every N decoded tokens, prefill those N tokens again so their KV cache rows are "
             "recomputed with the policy's prefill (dense for tidaldecode), bounding sparse "
             "decoding's error; costs one N-token prefill per N tokens; 0 = off (TidalDecode's "
             "public code uses 128)")(func)


RECYCLE_K_HELP = ("Recycled Attention: rows of each layer's partial cache, a fraction of the prompt (default: "
                  "the paper's 1/8; the library holds ceil(fraction x --max-context) rows, so it is never "
                  "clamped; each prefill sets K = round(fraction x context), at least 1) or a token count")


class RecycleK(click.ParamType):
    """--recycle-k: a token count (``256``) or a fraction of the prompt (``1/8``, ``0.125``), as
    ``parse_recycle_k`` reads it; anything else fails in one line."""

    name = "K|FRACTION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        try:
            return parse_recycle_k(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def _layer_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """``"8,13"`` -> ``(8, 13)``; ``""`` or ``none`` -> ``()``; one error line otherwise."""
    if value.strip().lower() in ("", "none"):
        return ()
    return tuple(number_list(click.IntRange(min=0))(ctx, param, value))


def policy_config(kw: dict[str, Any]) -> PolicyConfig:
    """The PolicyConfig of ``policy_options``' values (a ValueError names a bad combination)."""
    return PolicyConfig(kw["policy"], kw["n_init"], kw["n_local"], kw["select_top_k"],
                        kw["chunk_size"], kw["selection_threshold"], kw["pool_kernel"],
                        kw["tidal_budget"], kw["tidal_select_layer"], kw["tidal_reselect_layers"],
                        kw["tidal_per_kv_head"], kw["recycle_k"], kw["recycle_stride"],
                        kw["recycle_threshold"], kw["recycle_fixed_stride"], kw["recycle_min_k"],
                        kw["score_keys"])


# ---- sampling -----------------------------------------------------------------------------------
def sampling_options(func):
    """--temperature, --top-p, --top-k, --repetition-penalty (default: the model's
    generation_config.json, else ``PEER_DEFAULTS``), --repeat-last-n, --presence-penalty,
    --frequency-penalty, --seed."""
    model = "default: the model's generation_config.json (the embedded model: greedy), else"
    options = [
        click.option("--temperature", type=FiniteFloatRange(min=0), default=None,
                     help=f"0 = greedy ({model} {PEER_DEFAULTS['temperature']})"),
        click.option("--top-p", type=FiniteFloatRange(0, 1, min_open=True), default=None,
                     help=f"nucleus sampling: keep the likeliest tokens up to this probability "
                          f"({model} {PEER_DEFAULTS['top_p']})"),
        click.option("--top-k", type=click.IntRange(min=0), default=None,
                     help=f"keep the k likeliest tokens, 0 = off ({model} 0)"),
        click.option("--repetition-penalty", type=FiniteFloatRange(min=0, min_open=True), default=None,
                     help=f"CTRL's: divide positive (multiply negative) logits of the last "
                          f"--repeat-last-n tokens; 1 = off ({model} {PEER_DEFAULTS['repetition_penalty']})"),
        click.option("--repeat-last-n", type=click.IntRange(min=0), default=64, show_default=True,
                     help="tokens (prompt + output) the repetition penalty looks at; 0 = all"),
        click.option("--presence-penalty", type=FiniteFloatRange(-2, 2), default=0.0, show_default=True,
                     help="OpenAI's: subtract from the logits of tokens already in the output"),
        click.option("--frequency-penalty", type=FiniteFloatRange(-2, 2), default=0.0, show_default=True,
                     help="OpenAI's: subtract this times a token's count in the output from its logit"),
        click.option("--seed", type=click.IntRange(min=0), default=None, help="sampling seed"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def sampling_params(model_path: Path, kw: dict[str, Any]) -> SamplingParams:
    """Options given on the command line, else the model's generation config (the embedded model:
    ``fetch.SAMPLING``), else PEER_DEFAULTS."""
    from tsedge import fetch

    given = {name: kw[name] for name in ("temperature", "top_p", "top_k", "repetition_penalty")
             if kw[name] is not None}
    model = fetch.SAMPLING if fetch.is_default_model(model_path) else generation_config_defaults(model_path)
    return SamplingParams(**{**PEER_DEFAULTS, **model, **given},
                          presence_penalty=kw["presence_penalty"], frequency_penalty=kw["frequency_penalty"],
                          repeat_last_n=kw["repeat_last_n"], seed=kw["seed"])


# ---- progress and notes -------------------------------------------------------------------------
class PrefillDisplay(contextlib.AbstractContextManager):
    """Engine ``on_prefill`` callback: tokens done / total and tok/s on stderr, drawn only when
    stderr is a terminal and the prefill takes more than one chunk of ``chunk`` tokens."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self._bar = contextlib.ExitStack()
        self._update: Callable[[int], None] | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._update is None and done == 0 and total > self.chunk and interactive():
            self._update = self._bar.enter_context(token_progress("prefill", total))
        if self._update is not None:
            self._update(done)
            if done == total:
                self.close()

    def close(self) -> None:
        """Take the bar off the terminal (before the reply is printed)."""
        self._update = None
        self._bar.close()

    def __exit__(self, *exc_info) -> None:
        self.close()


def context_full_note(capacity: int) -> str:
    return (f"[stopped: the KV cache of {capacity} tokens is full; use a library compiled with a "
            "larger --max-context for longer replies]")


QUANTIZATIONS = tuple(SCHEMES)  # q0, q8f16, q4f16, q4_0, q4_1 (models/quantization.py)
GGUF = "gguf"  # a GGUF file's own Q4_0/Q4_1/Q8_0 blocks, kept as stored


def quantization_option(default: str | None, weights: bool = True):
    """``--quantization`` (models/quantization.py); ``default`` None: the weights' own (a GGUF's
    blocks, a ``tsedge convert --quantization`` folder's), else q0 (``resolve_quantization``).
    ``weights``: the command runs real weights, so ``gguf`` is a choice."""
    shown = default or "the weights' own: a GGUF's blocks, a converted folder's; else q0"
    return click.option("--quantization", type=click.Choice(QUANTIZATIONS + ((GGUF,) if weights else ())),
                        default=default,
                        help="weights: q0 float, q8f16/q4f16 8/4-bit with a float16 scale per 32 inputs, q4_0/q4_1 "
                             "GGML's 4-bit blocks" + (", gguf a GGUF file's Q4_0/Q4_1/Q8_0 blocks as stored" if weights
                                                      else "") + f" [default: {shown}]")


def resolve_quantization(wanted: str | None, source) -> str:
    """The library quantization for ``--quantization wanted`` (None: not given) and the model's
    weights ``source`` (a ``weights.ModelSource``; None: a preset without weights): ``gguf`` and
    no choice give the weights' own (``ModelSource.quantization``), else q0. Raises ValueError
    for ``gguf`` without a GGUF file."""
    if wanted == GGUF:
        if source is None or source.path.suffix != ".gguf":
            where = "a preset without weights" if source is None else str(source.path)
            raise ValueError(f"--quantization gguf keeps a GGUF file's blocks, but the model is {where}: pass a .gguf "
                             f"file, or use one of {', '.join(QUANTIZATIONS)}")
        return source.quantization
    if wanted is None:
        return source.quantization if source is not None else "q0"
    return wanted
