"""Running a tensor-parallel library: one process per shard, the collectives it calls, and the
engine that drives them (``models/tensor_parallel.py`` says how a model is split).

``open_engine(lib, weights)`` returns an ``Engine`` for a one-shard library and a
``ShardedEngine`` otherwise. A ``ShardedEngine`` is rank 0: it starts ``shards - 1`` worker
processes (``spawn``), each an ``Engine`` of its own rank on GPU ``rank`` (or the CPU) that loads
its slice of the weights. Rank 0 owns every host decision (prompt reuse, sampling, stopping,
cache corrections); it forwards each library call (``Engine._run``: the chunk's or token's ids) and
each cache truncation to the workers, which repeat them on their shards. The collectives inside
those calls keep the shards in step: an all-reduce gives every rank bit-identical sums, so every
shard's logits and selections are the same and only rank 0 reads them.

Collectives (the packed functions ``ALLREDUCE``/``ALLREDUCE_ADD``/``ALLGATHER`` the library calls):
- CUDA: NCCL through CuPy's binding (``cupy.cuda.nccl``, with the ``nvidia-nccl-cu13`` library),
  on the stream TVM runs on (``tvm_ffi.get_raw_stream``), so a decode step's CUDA graph captures
  the collectives with the rest; a decode step's float16 rows go through ``P2PAllReduce``
  (``p2p_allreduce.cu``), 4.35 µs against NCCL's 6.42 for 4,096 values on 2 H200s. NVLink
  multicast (NVLS) stays off (``NCCL_NVLS_ENABLE=0``).
- CPU: shared memory and a barrier between the processes (tests, and CPU-only hosts).
A worker that fails reports its error; rank 0 then prints it and exits (a collective would
otherwise wait for it forever). The processes start with ``spawn``: a program that opens a
sharded engine needs the usual ``if __name__ == "__main__":`` guard and a file as its main module.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np

from tsedge.engine import Engine, LibraryError, check_library
from tsedge.models.library import LibraryMeta
from tsedge.models.tensor_parallel import ALLGATHER, ALLREDUCE, ALLREDUCE_ADD

_NCCL_DTYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "int32": "NCCL_INT32"}
_open_engine = None  # weakref to this process's ShardedEngine: one at a time (the collectives are global)
_BARRIER_TIMEOUT_S = 600.0  # a CPU collective waiting longer than this for a shard: that shard is gone


class Collective:
    """The library's collectives for one rank; ``register`` makes them the packed functions the
    library calls (before its VM is made)."""

    def __init__(self, rank: int, shards: int) -> None:
        self.rank, self.shards = rank, shards

    def register(self) -> None:
        import tvm_ffi

        tvm_ffi.register_global_func(ALLREDUCE, self.allreduce, override=True)
        tvm_ffi.register_global_func(ALLREDUCE_ADD, self.allreduce_add, override=True)
        tvm_ffi.register_global_func(ALLGATHER, self.allgather, override=True)

    def allreduce(self, x, out) -> None:
        raise NotImplementedError

    def allreduce_add(self, x, residual, out) -> None:
        raise NotImplementedError

    def allgather(self, x, out) -> None:
        raise NotImplementedError

    def time_allreduce(self, x, reps: int) -> float:
        """Seconds per all-reduce of ``x`` (in place), the mean of ``reps`` after a warm-up; every
        rank must call it at once."""
        self.allreduce(x, x)
        start = time.perf_counter()
        for _ in range(reps):
            self.allreduce(x, x)
        return (time.perf_counter() - start) / reps


class SharedMemoryCollective(Collective):
    """CPU collectives: each rank writes its tensor into its slot of one shared buffer, a barrier,
    every rank combines the slots in rank order (identical sums on every rank), a barrier."""

    def __init__(self, rank: int, shards: int, name: str, slot_bytes: int, barrier) -> None:
        super().__init__(rank, shards)
        self.memory = shared_memory.SharedMemory(name=name)
        self.slots = np.ndarray((shards, slot_bytes), np.uint8, buffer=self.memory.buf)
        self.barrier = barrier

    def _exchange(self, x) -> np.ndarray:
        """Every rank's ``x`` as [shards, *x.shape]."""
        value = x.numpy()
        if value.nbytes > self.slots.shape[1]:
            raise RuntimeError(f"tensor-parallel exchange of {value.nbytes} bytes exceeds the {self.slots.shape[1]}-byte "
                               "slots; open the engine with the prefill chunk and context it runs")
        self.slots[self.rank, :value.nbytes] = value.reshape(-1).view(np.uint8)
        self.barrier.wait(_BARRIER_TIMEOUT_S)
        every = np.stack([self.slots[r, :value.nbytes].view(value.dtype).reshape(value.shape)
                          for r in range(self.shards)])
        self.barrier.wait(_BARRIER_TIMEOUT_S)  # nobody overwrites a slot before all have read it
        return every

    def _sum(self, x) -> np.ndarray:
        every = self._exchange(x)
        total = every[0].copy()
        for part in every[1:]:  # rank order, the same on every rank
            total += part
        return total

    def allreduce(self, x, out) -> None:
        out.copyfrom(self._sum(x))

    def allreduce_add(self, x, residual, out) -> None:
        out.copyfrom(self._sum(x) + residual.numpy())

    def allgather(self, x, out) -> None:
        out.copyfrom(np.ascontiguousarray(np.concatenate(list(self._exchange(x)))))


class NcclCollective(Collective):
    """CUDA collectives through NCCL (CuPy's binding), enqueued on TVM's current stream; a decode
    step's small float16 all-reduces (with their residual) through ``P2PAllReduce`` where the
    GPUs reach each other's memory (``TSEDGE_P2P_ALLREDUCE=0`` in the environment: NCCL only)."""

    def __init__(self, rank: int, shards: int, unique_id: tuple) -> None:
        super().__init__(rank, shards)
        import cupy
        from cupy.cuda import nccl

        self.cupy, self.nccl = cupy, nccl
        cupy.cuda.Device(rank).use()
        self.comm = nccl.NcclCommunicator(shards, unique_id, rank)
        self.p2p = P2PAllReduce.open(self) if os.environ.get("TSEDGE_P2P_ALLREDUCE", "1") != "0" else None
        self._streams: dict[int, Any] = {}

    def _args(self, x) -> tuple[int, int, int]:
        import tvm_ffi

        return x.numel(), getattr(self.nccl, _NCCL_DTYPES[str(x.dtype)]), tvm_ffi.get_raw_stream(x.device)

    def stream(self, handle: int):
        """CuPy's view of the CUDA stream ``handle`` (TVM's current one)."""
        if handle not in self._streams:
            self._streams[handle] = self.cupy.cuda.ExternalStream(handle)
        return self._streams[handle]

    def allreduce(self, x, out) -> None:
        self._reduce(x, None, out)

    def allreduce_add(self, x, residual, out) -> None:
        self._reduce(x, residual, out)

    def _reduce(self, x, residual, out) -> None:
        """``out = Σ_ranks x`` (+ ``residual`` where given): the P2P kernel where it fits, else NCCL
        (and CuPy's add for the residual)."""
        count, dtype, stream = self._args(x)
        if self.p2p is not None and self.p2p.fits(x):
            extra = 0 if residual is None else residual.data_ptr()
            self.p2p.run(x.data_ptr(), extra, out.data_ptr(), count, self.stream(stream))
            return
        self.comm.allReduce(x.data_ptr(), out.data_ptr(), count, dtype, self.nccl.NCCL_SUM, stream)
        if residual is not None:
            with self.stream(stream):
                total, extra = (self._cupy_view(t) for t in (out, residual))
                self.cupy.add(total, extra, out=total)

    def _cupy_view(self, tensor):
        cp = self.cupy
        nbytes = tensor.numel() * np.dtype(str(tensor.dtype)).itemsize
        memory = cp.cuda.UnownedMemory(tensor.data_ptr(), nbytes, tensor, self.rank)
        return cp.ndarray((tensor.numel(),), str(tensor.dtype), cp.cuda.MemoryPointer(memory, 0))

    def allgather(self, x, out) -> None:
        count, dtype, stream = self._args(x)
        self.comm.allGather(x.data_ptr(), out.data_ptr(), count, dtype, stream)

    def time_allreduce(self, x, reps: int) -> float:
        """GPU seconds per all-reduce of ``x`` as a decode step runs them: ``reps`` of them
        captured in one CUDA graph, the graph's replay timed by CUDA events (after a warm-up)."""
        cupy = self.cupy
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            import tvm_ffi

            with tvm_ffi.use_raw_stream(x.device, stream.ptr):  # our allreduce enqueues on TVM's stream
                self.allreduce(x, x)
                stream.begin_capture()
                for _ in range(reps):
                    self.allreduce(x, x)
                graph = stream.end_capture()
            graph.launch(stream)
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / 1000 / reps


class P2PAllReduce:
    """``p2p_allreduce.cu``'s one-shot all-reduce: every rank's buffer and flag array mapped into
    every other rank (CUDA IPC handles exchanged through NCCL), one kernel a call, for float16
    tensors of at most ``MAX_BYTES`` (a decode step's hidden state) on GPUs with peer access."""

    MAX_BYTES = 64 * 1024
    THREADS = 1024

    def __init__(self, collective: NcclCollective) -> None:
        cp, rt = collective.cupy, collective.cupy.cuda.runtime
        self.cupy, self.rank, self.shards = cp, collective.rank, collective.shards
        self.buffer = rt.malloc(2 * self.MAX_BYTES)  # cudaMalloc'd (not pooled): IPC maps whole allocations
        self.flags = rt.malloc(4 * self.shards)
        rt.memset(self.flags, 0, 4 * self.shards)
        self.epoch = cp.zeros(1, cp.uint32)
        handles = np.frombuffer(rt.ipcGetMemHandle(self.buffer) + rt.ipcGetMemHandle(self.flags), np.uint8)
        mine, every = cp.asarray(handles), cp.empty(handles.size * self.shards, cp.uint8)
        collective.comm.allGather(mine.data.ptr, every.data.ptr, handles.size, collective.nccl.NCCL_UINT8,
                                  cp.cuda.Stream.null.ptr)
        cp.cuda.Stream.null.synchronize()
        size = handles.size // 2
        gathered = every.get().tobytes()
        bufs, flags = [], []
        for r in range(self.shards):
            if r == self.rank:
                bufs.append(self.buffer)
                flags.append(self.flags)
                continue
            base = r * 2 * size
            bufs.append(rt.ipcOpenMemHandle(gathered[base:base + size]))
            flags.append(rt.ipcOpenMemHandle(gathered[base + size:base + 2 * size]))
        self.bufs = cp.asarray(np.array(bufs, np.uint64))
        self.flag_ptrs = cp.asarray(np.array(flags, np.uint64))
        source = (Path(__file__).with_name("p2p_allreduce.cu")).read_text()
        self.kernel = cp.RawKernel(source, "tsedge_p2p_allreduce_f16")

    @classmethod
    def open(cls, collective: NcclCollective) -> P2PAllReduce | None:
        """The all-reduce for ``collective``'s ranks, or None where a GPU cannot reach a peer's memory."""
        rt = collective.cupy.cuda.runtime
        if not all(rt.deviceCanAccessPeer(collective.rank, r) for r in range(collective.shards) if r != collective.rank):
            return None
        return cls(collective)

    def fits(self, x) -> bool:
        nbytes = x.numel() * 2
        return str(x.dtype) == "float16" and nbytes <= self.MAX_BYTES and nbytes % 16 == 0

    def run(self, x: int, residual: int, out: int, numel: int, stream) -> None:
        """``out = residual (0: none) + Σ_ranks x`` for ``numel`` float16 values, on ``stream``."""
        u64, i32 = np.uint64, np.int32
        self.kernel((1,), (self.THREADS,), (u64(x), u64(residual), u64(out), i32(numel // 8), self.bufs,
                                             self.flag_ptrs, self.epoch, i32(self.rank), i32(self.shards),
                                             i32(self.MAX_BYTES // 16)), stream=stream)


def nccl_unique_id() -> tuple:
    """A new NCCL communicator id (rank 0 makes it, every rank joins with it). Raises
    LibraryError (one line naming the fix) where CuPy's NCCL binding is missing."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (the GPU machines' rule)
    try:
        from cupy.cuda import nccl

        return nccl.get_unique_id()
    except Exception as err:  # ImportError, or CuPy without an NCCL library
        raise LibraryError(f"tensor parallelism on CUDA needs NCCL through CuPy ({type(err).__name__}: {err}); "
                           "install it with `pip install tsedge[tp]`") from None


def _exchange_bytes(meta: LibraryMeta, max_context: int, prefill_chunk: int) -> int:
    """The largest tensor one CPU collective exchanges: a prefill chunk's hidden states, a
    TokenSelect vote over the cache, or every head's fingerprint."""
    itemsize = np.dtype(meta.dtype).itemsize
    cfg = meta.model
    return max(prefill_chunk * cfg.hidden_size * itemsize, max_context * 4, cfg.num_heads * cfg.head_dim * 4)


def open_engine(lib: str | Path, weights: Any, random_weights: bool = False, **kwargs: Any) -> Engine:
    """An engine for ``lib``: ``Engine`` for a one-shard library, else a ``ShardedEngine`` over
    ``meta.tensor_parallel`` processes. ``random_weights``: every shard draws random weights of
    the library's shapes (``tsedge.bench.long_context.random_params``; benchmarks), ``weights``
    then None. ``kwargs``: ``Engine``'s (``max_context``, ``prefill_chunk``, ``on_load``,
    ``cache_correction``)."""
    meta = LibraryMeta.load(check_library(lib).with_suffix(".json"))
    if meta.tensor_parallel > 1:
        return ShardedEngine(lib, weights, meta, random_weights, **kwargs)
    return _engine(lib, meta, weights, random_weights, 0, kwargs)


def _weights_inputs(meta: LibraryMeta, weights: Any, random_weights: bool, rank: int) -> tuple[Any, dict, Any]:
    """``(weights, extra Engine kwargs, keep-alive)`` for shard ``rank``: ``weights`` as given, or
    random weights drawn for that shard (``params``) and the torch tensors that own them."""
    if not random_weights:
        return weights, {}, None
    from tsedge.bench.long_context import random_params

    params, keep = random_params(meta, rank)
    return None, {"params": params}, keep


def _engine(lib: str | Path, meta: LibraryMeta, weights: Any, random_weights: bool, rank: int,
            kwargs: dict, collective: Collective | None = None) -> Engine:
    weights, extra, keep = _weights_inputs(meta, weights, random_weights, rank)
    engine = Engine(lib, weights, rank=rank, collective=collective, **extra, **kwargs)
    engine.keep_alive = keep
    return engine


def _collective(spec: tuple, rank: int, shards: int) -> Collective:
    kind, *args = spec
    return NcclCollective(rank, shards, *args) if kind == "nccl" else SharedMemoryCollective(rank, shards, *args)


def _worker(rank: int, shards: int, lib: str, weights: Any, random_weights: bool, kwargs: dict,
            spec: tuple, conn) -> None:
    """A shard's process: its collective and engine, then the calls rank 0 forwards."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is rank 0's to handle
    try:
        collective = _collective(spec, rank, shards)
        collective.register()
        engine = _engine(lib, LibraryMeta.load(Path(lib).with_suffix(".json")), weights, random_weights, rank, kwargs,
                         collective)
        conn.send(("ready", None))
        while True:
            call = conn.recv()
            if call is None:
                return
            name, args = call
            _CALLS[name](engine, *args)
    except EOFError:  # rank 0 is gone
        return
    except BaseException as err:  # reported to rank 0, which stops
        conn.send(("error", f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"))


def _time_allreduce(engine: Engine, numel: int, dtype: str, reps: int) -> float:
    import tvm

    zeros = tvm.runtime.tensor(np.zeros(numel, dtype), engine.device)  # repeated in-place sums stay finite
    return engine.collective.time_allreduce(zeros, reps)


# what rank 0 forwards and every worker repeats on its shard
_CALLS = {"_run": Engine._run, "_truncate": Engine._truncate, "fill_random": Engine.fill_random,
          "time_allreduce": _time_allreduce}


class ShardedEngine(Engine):
    """Rank 0 of a tensor-parallel library (see the module docstring); the same API as ``Engine``.
    Raises LibraryError (one line) where the shards cannot start: too few GPUs, no NCCL binding,
    or a worker's own load error (wrong weights, …)."""

    def __init__(self, lib: str | Path, weights: Any, meta: LibraryMeta, random_weights: bool = False,
                 **kwargs: Any) -> None:
        global _open_engine
        if _open_engine is not None and _open_engine() is not None and _open_engine()._workers:
            raise LibraryError("another tensor-parallel engine is open in this process (their collectives would "
                               "mix): close it first, or run the other library in its own process")
        _open_engine = weakref.ref(self)
        shards = meta.tensor_parallel
        source_path = getattr(weights, "path", weights)  # a ModelSource travels as its path
        if getattr(weights, "shard", None) is not None:  # a shard folder: the workers open their own
            source_path = source_path.parent
        cuda = meta.target.startswith("cuda")
        context = multiprocessing.get_context("spawn")
        self._memory = None
        if cuda:
            spec: tuple = ("nccl", nccl_unique_id())
        else:
            slot = _exchange_bytes(meta, kwargs.get("max_context") or meta.max_context, kwargs.get("prefill_chunk", 512))
            self._memory = shared_memory.SharedMemory(create=True, size=slot * shards)
            spec = ("shm", self._memory.name, slot, context.Barrier(shards))
            share_cpu_threads(shards)
        self._conns, self._workers = [], []
        self._ready, self._failure, self._started = 0, None, False
        self._changed = threading.Condition()
        self._exit_on_failure = cuda  # rank 0 may wait in NCCL's setup for a shard that failed
        worker_kwargs = {k: v for k, v in kwargs.items() if k != "on_load"}
        for rank in range(1, shards):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker, daemon=True, name=f"tsedge-shard-{rank}",
                                      args=(rank, shards, str(lib), None if source_path is None else str(source_path),
                                            random_weights, worker_kwargs, spec, theirs))
            process.start()
            self._conns.append(ours)
            self._workers.append(process)
        threading.Thread(target=self._watch, daemon=True, name="tsedge-shard-watch").start()
        try:
            collective = _collective(spec, 0, shards)
            collective.register()
            weights, extra, self.keep_alive = _weights_inputs(meta, weights, random_weights, 0)
            super().__init__(lib, weights, collective=collective, **extra, **kwargs)
            with self._changed:
                self._changed.wait_for(lambda: self._ready == shards - 1 or self._failure is not None)
                if self._failure is not None:
                    raise LibraryError(f"tensor-parallel shard {self._failure}")
                self._started = self._exit_on_failure = True
        except BaseException:
            self.close()
            raise

    def _watch(self) -> None:
        """Workers' reports: ready, or an error (or death). After the start an error ends the
        process: the shards' collectives would wait for the failed one forever."""
        from multiprocessing.connection import wait

        conns = list(self._conns)
        while self._conns:
            for ready in wait(conns + [w.sentinel for w in self._workers], timeout=1.0):
                rank = 1 + (conns.index(ready) if ready in conns else [w.sentinel for w in self._workers].index(ready))
                try:
                    status, detail = ready.recv() if ready in conns else ("error", "its process ended")
                except EOFError:
                    status, detail = "error", "its process ended"
                if not self._conns:  # closing
                    return
                with self._changed:
                    if status == "ready":
                        self._ready += 1
                    else:
                        self._failure = f"{rank} failed: {detail}"
                        if self._exit_on_failure:
                            print(f"Error: tensor-parallel shard {self._failure}; stopping", file=sys.stderr, flush=True)
                            os._exit(1)
                        conns.remove(ready) if ready in conns else None
                    self._changed.notify_all()
                if status != "ready" and not self._exit_on_failure:
                    return

    def _forward(self, name: str, *args: Any) -> None:
        for conn in self._conns:
            conn.send((name, args))

    def _run(self, func: str, ids: list[int]):
        with _uninterrupted():
            self._forward("_run", func, ids)
            return super()._run(func, ids)

    def _truncate(self, length: int, carry_counts: bool = False) -> None:
        with _uninterrupted():
            self._forward("_truncate", length, carry_counts)
            super()._truncate(length, carry_counts)

    def allreduce_seconds(self, numel: int, dtype: str | None = None, reps: int = 200) -> float:
        """Seconds per all-reduce of ``numel`` values of ``dtype`` (default: the library's) over
        the shards (``Collective.time_allreduce``: on CUDA, GPU time inside a CUDA graph, as in a
        decode step)."""
        dtype = dtype or self.meta.dtype
        self._forward("time_allreduce", numel, dtype, reps)
        return _time_allreduce(self, numel, dtype, reps)

    def fill_random(self, length: int, seed: int = 0) -> None:
        with _uninterrupted():
            super().fill_random(length, seed)  # forwards its reset first
            self._forward("fill_random", length, seed)

    def close(self) -> None:
        """Stop the workers and free the shared memory (also when the engine is collected)."""
        conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for worker in self._workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
        self._workers = []
        if self._memory is not None:
            self._memory.close()
            self._memory.unlink()
            self._memory = None

    def __del__(self) -> None:
        if getattr(self, "_workers", None):
            self.close()


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Ctrl-C (SIGINT) waits until the block is done, then interrupts: rank 0 never forwards a call
    it does not run itself (the shards would fall out of step)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, _frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@atexit.register
def _close_at_exit() -> None:
    """Stop the workers before multiprocessing's own exit handler ends them (which the watcher
    would report as a failure)."""
    engine = _open_engine() if _open_engine is not None else None
    if engine is not None:
        engine.close()


def share_cpu_threads(shards: int) -> None:
    """Give each of ``shards`` CPU processes an equal share of TVM's threads (the workers inherit
    the setting); call before they start."""
    from tsedge.threads import physical_cores

    threads = int(os.environ.get("TVM_NUM_THREADS") or physical_cores())
    os.environ["TVM_NUM_THREADS"] = str(max(1, threads // shards))
