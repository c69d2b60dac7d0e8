"""The runtime: a thin sequencer over a compiled model library (needs only the TVM runtime).

``Engine(lib, weights, device)`` loads the library and its weights, allocates the KV cache, runs
chunked prefill and the decode loop. Any language with a TVM runtime can do the same: call
``rope_table`` once, then ``prefill(ids, kv, rope, past, length, state, params)`` per chunk and
``decode(id, kv, rope, past, length, state, params)`` per token, where ``length`` is an int32 [1]
device tensor holding ``past`` plus the call's tokens; keep the token, KV cache, RoPE table,
length and state tensors at fixed addresses (a CUDA decode step replays as one CUDA graph that
captured them), and ``sample(logits, ...)`` picks the next token on the device where the library
has it (see DESIGN.md, runtime contract). ``cache_correction`` (TidalDecode's option, any policy)
re-prefills the rows that decode steps wrote, every N of them (``Engine.cache_correction``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from tsedge.device_sampling import SAMPLE_FUNCTION, DeviceSampler
from tsedge.kv_cache import ContextOverflowError, KVCache
from tsedge.models.library import LibraryMeta
from tsedge.models.quantization import (QuantizationError, QuantizedTensor, concatenate, dequantize, library_arrays,
                                        quantize, scheme_of)
from tsedge.models.tensor_parallel import linear_split, shard_tensor
from tsedge.sampling import Sampler, SamplingParams
from tsedge.threads import use_physical_cores
from tsedge.weights import ModelSource, WeightsError, load_source

use_physical_cores()  # before TVM's thread pool starts: TVM's x86 default is half the logical CPUs

__all__ = ["ContextOverflowError", "Engine", "GenerationResult", "LibraryError", "check_cache_correction"]


_GREEDY = SamplingParams()
_NO_COUNTS = {"hits": 0, "lookups": 0}


class LibraryError(ValueError):
    """A model library is missing, unreadable, or does not fit this host or these weights."""


# Called during prefill with (tokens done, tokens in all) before the first chunk and after each.
PrefillProgress = Callable[[int, int], None]
# Called while weights load with (library parameters done, in all).
LoadProgress = Callable[[int, int], None]


@dataclasses.dataclass
class GenerationResult:
    """One generation: its tokens, why it stopped, and its timings (seconds, wall clock)."""

    tokens: list[int]
    prompt_tokens: int
    reused_tokens: int  # prompt tokens already in the KV cache (not prefilled again)
    prefill_s: float  # prefill of the new prompt tokens
    ttft_s: float  # prefill plus picking the first token
    decode_s: float  # the remaining tokens (cache corrections included)
    stopped: str  # "stop_token" | "length" | "cancelled" | "context_full" (the KV cache is full)
    corrections: int = 0  # cache corrections during the decode (``Engine.cache_correction``)

    @property
    def prefill_tok_per_s(self) -> float:
        new = self.prompt_tokens - self.reused_tokens
        return new / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def target_device(target: str, index: int = 0) -> tvm.runtime.Device:
    """The device a library compiled for ``target`` runs on (``cuda:…`` GPU ``index``, ``vulkan``,
    or the CPU). Raises LibraryError where that device is missing."""
    if target.startswith("cuda"):
        dev = tvm.cuda(index)
        if not dev.exist:
            raise LibraryError(f"library is built for {target} but CUDA GPU {index} is not visible; "
                               + ("compile with --target llvm for this machine" if index == 0 else
                                  "use a --tensor-parallel no larger than the number of GPUs"))
        return dev
    if target == "vulkan":
        return _vulkan().device()
    return tvm.cpu(0)


def check_library(lib: str | Path) -> Path:
    """``lib`` if it and its metadata (.json next to it) exist; raises LibraryError otherwise."""
    lib = Path(lib)
    if lib.suffix == ".json":
        raise LibraryError(f"{lib}: that is a library's metadata; give the library itself, "
                           f"{lib.with_suffix('.so').name} (its .json stays next to it)")
    if not lib.exists() or not lib.with_suffix(".json").exists():
        raise LibraryError(f"{lib}: library or its metadata {lib.with_suffix('.json').name} not found; "
                           "build one with `tsedge compile`")
    return lib


def load_library(lib: str | Path) -> tuple[LibraryMeta, tvm.runtime.Module]:
    """Read ``lib`` (.so) and its metadata (.json next to it)."""
    lib = check_library(lib)
    meta = LibraryMeta.load(lib.with_suffix(".json"))
    if meta.target.startswith("cuda"):
        load_cuda_runtime()
    if meta.target == "vulkan":
        _vulkan().load()
    try:
        module = tvm.runtime.load_module(str(lib))
    except Exception as err:  # TVM reports a truncated or foreign file as InternalError
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise LibraryError(f"{lib} cannot be loaded ({reason}); rebuild it with `tsedge compile`") from None
    return meta, module


def _vulkan():
    """``tsedge.vulkan``; its VulkanError (no wgpu, compiler or driver) as a LibraryError."""
    from tsedge import vulkan

    try:
        vulkan.load()
    except vulkan.VulkanError as err:
        raise LibraryError(f"library is built for vulkan, but {err}") from None
    return vulkan


def check_cache_correction(tokens: int, capacity: int) -> None:
    """Raises ValueError (one line naming the fix) unless ``tokens`` (decoded tokens between cache
    corrections, 0 = off) is >= 0 and below ``capacity`` (the KV cache's tokens): a correction
    re-prefills the last ``tokens`` decoded tokens, which the cache must hold after the prompt."""
    if tokens < 0:
        raise ValueError(f"cache correction of {tokens} tokens: give a token count >= 0 "
                         "(0 = off; TidalDecode's public code uses 128)")
    if tokens >= capacity:
        raise ValueError(f"cache correction of {tokens} tokens can never run: the prompt and {tokens} "
                         f"decoded tokens exceed the KV cache of {capacity} tokens; use a --cache-correction "
                         f"below {capacity} (0 = off), or a library compiled with a larger --max-context")


def load_cuda_runtime() -> None:
    """The CUDA runtime module is not loaded by a runtime-only TVM install; load it.

    Raises LibraryError when this machine has no CUDA driver (``libcuda.so.1``)."""
    import ctypes

    path = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if path.exists():
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as err:
            raise LibraryError(f"the library is built for CUDA, but this machine has no CUDA driver ({err}); "
                               "run it on a machine with an NVIDIA GPU, or compile one with --target llvm") from None


class Engine:
    """Runs one sequence on a compiled library with its KV cache."""

    def __init__(self, lib: str | Path, weights: str | Path | ModelSource | None,
                 max_context: int | None = None, prefill_chunk: int = 512,
                 params: list[tvm.runtime.Tensor] | None = None,
                 on_load: LoadProgress | None = None, cache_correction: int = 0, rank: int = 0,
                 collective: object | None = None) -> None:
        """``weights``: a model name, .gguf, weights folder or ModelSource; or None with
        ``params`` already on the device in library order (benchmarks with random weights).
        ``on_load(done, total)`` follows the weights' loading (and quantizing, for a quantized
        library given float weights). ``cache_correction``: tokens (0 = off), see the property;
        a ValueError when it can never run (``check_cache_correction``). ``rank``: the
        tensor-parallel shard this engine runs (GPU ``rank``, that shard's slice of each
        weight) when the library has shards, with ``collective`` the registered collectives of
        its group; ``tsedge/tensor_parallel.py`` makes both and runs the shards together."""
        self.meta, module = load_library(lib)
        if self.meta.tensor_parallel > 1 and collective is None:
            raise LibraryError(f"{lib} is one of {self.meta.tensor_parallel} tensor-parallel shards: open it with "
                               "tsedge.tensor_parallel.open_engine (tsedge's commands do)")
        self.rank, self.collective = rank, collective
        self.device = target_device(self.meta.target, rank)
        self.vm = VirtualMachine(module, self.device)
        self.tokenizer = None
        if weights is not None:
            source = weights if isinstance(weights, ModelSource) else load_source(str(weights), rank)
            if source.config.to_dict() | {"name": ""} != self.meta.model.to_dict() | {"name": ""}:
                raise LibraryError(
                    f"weights {source.path} ({source.config.name}) do not match library {lib} "
                    f"(compiled for {self.meta.model.name}): compile a library for these weights")
            self.tokenizer = source.tokenizer
            params = self._load_params(source, on_load or (lambda _done, _total: None))
        if params is None:
            raise ValueError("Engine needs weights or params")
        self.params = params
        if self.meta.policy.name != "dense":  # a chunk must fit the policy's local window
            prefill_chunk = min(prefill_chunk, self.meta.policy.chunk_size)
        self.prefill_chunk = prefill_chunk
        capacity = max_context or self.meta.max_context
        if capacity > self.meta.max_context:
            raise ContextOverflowError(f"max_context {capacity} exceeds the library's "
                                       f"{self.meta.max_context}; recompile with --max-context")
        self.cache = KVCache(self.meta, capacity, self.device)
        self.cache_correction = cache_correction
        self.corrections = 0  # cache corrections since the engine was made
        self._prefilled = 0  # cache rows up to here were prefilled; later rows come from decode steps
        self._carried = _NO_COUNTS  # selection counters from before the last correction's state reset
        self.rope = self.vm["rope_table"](tvm.runtime.ShapeTuple([capacity]), self.params)
        # device tensors the library reads at fixed addresses (a decode step replays as one
        # CUDA graph that captured them): the context length after a step, a decode step's token
        self.length = tvm.runtime.empty((1,), "int32", self.device)
        self.token = tvm.runtime.empty((1,), "int32", self.device)
        self._token_value: int | None = None  # what ``self.token`` holds (None: unknown)
        # sampling on the device when the library has ``sample``: only the token id is read back
        self.sampler = (DeviceSampler(self.vm, self.device, self.meta.model.vocab_size)
                        if SAMPLE_FUNCTION in self.meta.functions else None)
        self.device_sampling = self.sampler is not None  # False: sample on the host

    def _load_params(self, source: ModelSource, on_load: LoadProgress) -> list[tvm.runtime.Tensor]:
        """Each library parameter from its source tensors (streamed once; fused projections wait
        for all their parts, then concatenate them along the output dimension; with tensor
        parallelism each is first cut to this shard's part, ``ParamSpec.split``). A quantized
        library's weights are quantized here unless the source already carries them in its
        scheme (a ``tsedge convert --quantization`` folder, a GGUF's blocks); a GGUF's blocks of
        another scheme are dequantized first."""
        self._check_quantization(source)
        shards = self.meta.tensor_parallel
        if source.shard not in (None, (self.rank, shards)):
            raise LibraryError(f"weights {source.path.parent} are {source.shard[1]} tensor-parallel shard folders but "
                               f"the library has {shards} shard(s): use a library compiled with --tensor-parallel "
                               f"{source.shard[1]} (without --lib one is compiled), or convert the weights with "
                               f"--tensor-parallel {shards}")
        slots: dict[str, list[int]] = {}  # a float parameter, or the qweight and scale of a weight
        for i, spec in enumerate(self.meta.params):
            slots.setdefault(spec.name.rpartition(".")[0] if spec.part else spec.name, []).append(i)
        wanted: dict[str, list[list[int]]] = {}
        for slot in slots.values():
            for name in self.meta.params[slot[0]].sources:
                wanted.setdefault(name, []).append(slot)
        parts: dict[int, dict[str, object]] = {}
        params: list[tvm.runtime.Tensor | None] = [None] * len(self.meta.params)
        for name, array in source.tensors():
            for slot in wanted.get(name, []):
                spec = self.meta.params[slot[0]]
                got = parts.setdefault(slot[0], {})
                got[name] = array
                if len(got) < len(spec.sources):
                    continue
                del parts[slot[0]]
                values = self._arrange(slot, [got[n] for n in spec.sources], source.shard is not None)
                for i, value in zip(slot, values):
                    params[i] = tvm.runtime.tensor(value, self.device)
                on_load(sum(p is not None for p in params), len(params))
        missing = [n for i, p in enumerate(params) if p is None for n in self.meta.params[i].sources
                   if n not in parts.get(i, {})]
        if missing:
            raise WeightsError(f"weights {source.path} lack tensor {missing[0]} "
                               f"({len(missing)} missing in all)")
        return params

    def _check_quantization(self, source: ModelSource) -> None:
        """Pre-quantized weights must carry the library's quantization (float weights, and a
        GGUF's, which are dequantized where they differ, fit any)."""
        lib, weights = self.meta.quantization, source.quantization
        if weights != "q0" and weights != lib and not source.requantizable:
            fix = (f"compile the library with --quantization {weights}" if lib == "q0" else
                   f"convert the weights with --quantization {lib}, or compile with --quantization {weights}")
            raise LibraryError(f"weights {source.path} are quantized {weights} but the library is {lib}: {fix}")

    def _arrange(self, slot: list[int], arrays: list, presplit: bool) -> list[np.ndarray]:
        """The library arrays of one slot from its source arrays, in the slot's order (each cut to
        this shard's part, except a shard folder's linears: ``presplit``); shapes checked against
        the library's."""
        specs = [self.meta.params[i] for i in slot]
        spec = specs[0]
        arrays = [a if presplit and linear_split(name) is not None
                  else shard_tensor(a, spec.split, self.rank, self.meta.tensor_parallel, name)
                  for a, name in zip(arrays, spec.sources)]
        # blocks of another scheme (a GGUF's: ``_check_quantization`` refused other sources) as floats
        qs = scheme_of(self.meta.quantization, spec.weight)
        arrays = [dequantize(a) if isinstance(a, QuantizedTensor) and a.scheme != qs else a for a in arrays]
        if spec.part:
            if all(isinstance(a, QuantizedTensor) for a in arrays):
                qt = concatenate(arrays)
            elif any(isinstance(a, QuantizedTensor) for a in arrays):
                raise QuantizationError(f"tensor {'+'.join(spec.sources)}: some parts are quantized and "
                                        "some are not; re-convert the weights folder")
            else:
                qt = quantize(np.concatenate(arrays) if len(arrays) > 1 else arrays[0], qs, "+".join(spec.sources))
            stored = library_arrays(qt, spec.transposed)
            values = [stored[sp.part] for sp in specs]
            whole_shape = list(qt.shape)
        else:
            whole = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
            values = [np.ascontiguousarray(whole.T if spec.transposed else whole, dtype=self.meta.dtype)]
            whole_shape = list(whole.shape)
        for sp, value in zip(specs, values):
            if list(value.shape) != sp.shape:
                raise WeightsError(f"tensor {'+'.join(sp.sources)}: shape {whole_shape} does not "
                                   f"fit library parameter {sp.name} {sp.shape}")
        return values

    # ---- the two library calls -----------------------------------------------------------------
    def _run(self, func: str, ids: list[int]) -> tvm.runtime.Tensor:
        past = len(self.cache)
        if f"{func}_select" in self.meta.functions and past + len(ids) > self.meta.policy.budget:
            func = f"{func}_select"
        ids_np = np.asarray(ids, dtype="int32")
        if len(ids) == 1:
            if self._token_value != ids[0]:  # the device sampler may have written it already
                self.token.copyfrom(ids_np)
                self._token_value = ids[0]
            ids_t = self.token
        else:
            ids_t = tvm.runtime.tensor(ids_np, self.device)
        self.length.copyfrom(np.array([past + len(ids)], dtype="int32"))
        logits, self.cache.tensor, _ = self.vm[func](
            ids_t, self.cache.tensor, self.rope, tvm.runtime.ShapeTuple([past]), self.length,
            self.cache.state, self.params)
        self.cache.tokens.extend(ids)
        return logits

    def prefill(self, ids: list[int], on_progress: PrefillProgress | None = None) -> np.ndarray:
        """Append ``ids`` to the cache in chunks of ``prefill_chunk`` tokens; float32 logits of
        the last token. ``on_progress(done, total)`` is called before the first chunk and after
        each one."""
        return self._prefill(ids, on_progress).numpy()[0]

    def _prefill(self, ids: list[int], on_progress: PrefillProgress | None) -> tvm.runtime.Tensor:
        """``prefill``, the logits [1, vocab] left on the device."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        self.cache.check_room(len(ids))
        for start in range(0, len(ids), self.prefill_chunk):
            if on_progress is not None:
                on_progress(start, len(ids))
            logits = self._run("prefill", ids[start:start + self.prefill_chunk])
        if on_progress is not None:
            on_progress(len(ids), len(ids))
        self._prefilled = len(self.cache)
        return logits

    def decode(self, token: int) -> np.ndarray:
        """Append ``token``; float32 logits [vocab] of the next token, copied to the host."""
        return self._decode(token).numpy()[0]

    def _decode(self, token: int) -> tvm.runtime.Tensor:
        self.cache.check_room(1)
        return self._run("decode", [token])

    def decode_greedy(self, token: int) -> int:
        """Append ``token`` and pick the next one greedily (no penalties) on the device: only its
        id (4 bytes) is copied to the host, and ``token`` is not uploaded when it is the last
        pick. Raises LibraryError for a library without ``sample`` (compiled before it existed)."""
        if self.sampler is None:
            raise LibraryError("this library has no device sampler (`sample`); recompile it with `tsedge compile`")
        if self.sampler.params != _GREEDY:
            self.sampler.start(_GREEDY)
        return self._pick_on_device(self._decode(token))

    def _pick_on_device(self, logits: tvm.runtime.Tensor) -> int:
        self._token_value = self.sampler.pick(logits, self.token)
        return self._token_value

    def reset(self) -> None:
        self._truncate(0)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` cached tokens (dropping any zeroes the policy state)."""
        self._truncate(length)

    def fill_random(self, length: int, seed: int = 0) -> None:
        """Benchmarks: make the cache hold ``length`` tokens of random K/V (and random ids)
        without running prefill: decode time depends on the context length, not its content. On
        a CUDA GPU the fill runs there (through torch). Per-token policy state derived from the
        keys (``--score-keys int8`` codes) is computed from them by the library."""
        self.reset()
        self.cache.check_room(length)
        kv = self.cache.tensor
        if self.meta.target.startswith("cuda"):
            import torch

            torch.manual_seed(seed)
            values = torch.from_dlpack(kv).normal_()
            torch.cuda.synchronize(values.device)  # the fill must not run inside a caller's timed region
        else:
            shape = list(kv.shape)
            shape[3] = length
            full = np.zeros(kv.shape, self.meta.kv_dtype)
            full[:, :, :, :length] = np.random.default_rng(seed).standard_normal(shape)
            kv.copyfrom(full)
        if "code_keys" in self.meta.functions and length:  # --score-keys int8: the codes of the filled keys
            self.length.copyfrom(np.array([length], dtype="int32"))
            self.vm["code_keys"](kv, self.length, self.cache.state, tvm.runtime.ShapeTuple([length]))
        vocab = self.meta.model.vocab_size
        self.cache.tokens = np.random.default_rng(seed).integers(min(100, vocab - 1), vocab, length).tolist()

    def close(self) -> None:
        """Release what the engine holds besides memory (a sharded engine's workers); a no-op here."""

    def _truncate(self, length: int, carry_counts: bool = False) -> None:
        """Keep the first ``length`` cached tokens. Dropping any zeroes the policy state (it
        describes them) and with it the selection counters; ``carry_counts`` keeps those counters
        in ``selection_stats``."""
        if length < len(self.cache):
            self._carried = (self.selection_stats() or _NO_COUNTS) if carry_counts else _NO_COUNTS
        self.cache.truncate(length)
        self._prefilled = min(self._prefilled, length)

    @property
    def cache_correction(self) -> int:
        """Decode steps between cache corrections, in tokens (0 = off; TidalDecode's public code
        uses 128). Within ``generate``, once that many tokens were decoded since the last prefill
        (the prompt's or a correction's), their cache rows are dropped and the same ids prefilled
        again in chunks, before the next decode step: the library's prefill (dense for tidaldecode)
        recomputes their K/V with full attention, bounding the error sparse decoding leaves in the
        cache. Cost: one N-token prefill per N tokens. Dropping rows zeroes the policy state as a
        chat turn's truncation does, and the prefill rebuilds it (TokenSelect re-selects, Recycled
        Attention rebuilds its partial caches and restarts its stride); ``selection_stats`` keeps
        counting across corrections. Rows decoded after a generation's last correction stay as
        decoded (a chat turn reusing them does not prefill them again). Setting it raises
        ValueError as ``check_cache_correction``."""
        return self._cache_correction

    @cache_correction.setter
    def cache_correction(self, tokens: int) -> None:
        check_cache_correction(tokens, self.cache.capacity)
        self._cache_correction = tokens

    def _correct(self) -> None:
        """Re-prefill the rows decoded since the last prefill (``cache_correction``)."""
        start = self._prefilled
        ids = self.cache.tokens[start:]
        self._truncate(start, carry_counts=True)
        self._prefill(ids, None)
        self.corrections += 1

    def state(self, name: str) -> np.ndarray | None:
        """A copy of the library state tensor ``name`` (e.g. ``cache_idx``), or None if it has none."""
        names = [n for n, _, _ in self.meta.state]
        return self.cache.state[names.index(name)].numpy() if name in names else None

    def selection_stats(self) -> dict[str, int] | None:
        """Selection-cache hits and lookups since the last reset or truncation (cache corrections
        do not restart them); None for a policy without a selection cache."""
        state = self.state("sel_state")
        if state is None:
            return None
        return {"hits": int(state[:, 2].sum()) + self._carried["hits"],
                "lookups": int(state[:, 3].sum()) + self._carried["lookups"]}

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, prompt: list[int], max_new_tokens: int = 256,
                 sampling: SamplingParams = SamplingParams(), stop_ids: list[int] | None = None,
                 on_token: Callable[[int], bool | None] | None = None,
                 on_prefill: PrefillProgress | None = None) -> GenerationResult:
        """Continue the cached sequence with ``prompt``; reuse the longest cached prefix.

        ``on_token`` gets each new token; returning False stops. Raises ContextOverflowError
        before any work when the prompt alone exceeds the KV cache; a generation that fills the
        cache stops with ``stopped == "context_full"``. ``on_prefill`` sees the prefill's progress.
        """
        if not prompt:
            raise ValueError("the prompt has no tokens; give some text")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompt) > self.cache.capacity:
            raise ContextOverflowError(
                f"prompt of {len(prompt)} tokens exceeds the KV cache of {self.cache.capacity} "
                "tokens; shorten it or use a library compiled with a larger --max-context")
        reused = min(self.cache.common_prefix(prompt), len(prompt) - 1)
        self._truncate(reused)
        stop = set(self.tokenizer.eos_token_ids if stop_ids is None else stop_ids)
        pick = self._picker(sampling, prompt)
        start = time.perf_counter()
        logits = self._prefill(prompt[reused:], on_prefill)
        prefill_s = time.perf_counter() - start
        token = pick(logits)
        ttft = time.perf_counter() - start
        tokens = [token]
        corrections = self.corrections
        stopped = self._continue(tokens, pick, stop, max_new_tokens, on_token)
        return GenerationResult(tokens, len(prompt), reused, prefill_s, ttft,
                                time.perf_counter() - start - ttft, stopped, self.corrections - corrections)

    def _picker(self, sampling: SamplingParams, prompt: list[int]) -> Callable[[tvm.runtime.Tensor], int]:
        """The next-token function of one generation, logits [1, vocab] on the device -> id: the
        library's ``sample`` when it has one and ``device_sampling`` is on, else the host Sampler
        (the logits copied to the host). Both give the same tokens (``tsedge/sampling.py``)."""
        if self.sampler is not None and self.device_sampling:
            self.sampler.start(sampling, prompt)
            return self._pick_on_device
        sampler = Sampler(sampling, prompt)
        return lambda logits: sampler(logits.numpy()[0])

    def _continue(self, tokens: list[int], pick: Callable[[tvm.runtime.Tensor], int], stop: set[int],
                  max_new_tokens: int, on_token: Callable[[int], bool | None] | None) -> str:
        """Decode after ``tokens`` (appended in place) until a stop, correcting the cache every
        ``cache_correction`` decoded tokens; returns why it stopped."""
        while True:
            token = tokens[-1]
            if token in stop:
                return "stop_token"
            if on_token is not None and on_token(token) is False:
                return "cancelled"
            if len(tokens) >= max_new_tokens:
                return "length"
            if len(self.cache) >= self.cache.capacity:
                return "context_full"
            if self.cache_correction and len(self.cache) - self._prefilled >= self.cache_correction:
                self._correct()
            tokens.append(pick(self._decode(token)))
