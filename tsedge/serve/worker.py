"""One engine, one request at a time: a FIFO queue of jobs run on a single engine thread.

A job streams its text to the event loop that submitted it as it is decoded; cancelling it (the
client went away) stops its generation at the next token, or before it starts if still queued.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from tsedge.engine import Engine, GenerationResult
from tsedge.sampling import SamplingParams
from tsedge.serve.metrics import Metrics
from tsedge.serve.stops import StopText

log = logging.getLogger("tsedge.serve")

# Engine.generate's reasons -> OpenAI's finish_reason ("cancelled": the client went away).
FINISH = {"stop_token": "stop", "length": "length", "context_full": "length", "cancelled": "cancelled"}


@dataclasses.dataclass
class Outcome:
    """How a job ended: OpenAI's finish reason (or ``cancelled``) and what it took."""

    finish_reason: str
    prompt_tokens: int
    cached_tokens: int  # prompt tokens reused from the KV cache
    completion_tokens: int
    queue_s: float  # waiting for the jobs before it
    result: GenerationResult | None  # None when cancelled before it started


class Job:
    """A request's generation: prompt ids, at most ``max_tokens`` new tokens, sampling and stop
    sequences; ``endpoint`` labels its metrics. Iterate it (on the loop that created it) for its
    text pieces; the iteration ends with its ``outcome`` set, or raises what the engine raised."""

    def __init__(self, prompt: list[int], max_tokens: int, sampling: SamplingParams, stops: list[str],
                 endpoint: str) -> None:
        self.prompt, self.max_tokens, self.sampling, self.stops = prompt, max_tokens, sampling, stops
        self.endpoint = endpoint
        self.arrived = time.perf_counter()
        self.outcome: Outcome | None = None
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[str | Outcome | BaseException] = asyncio.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop at the next token (no effect once finished)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, item: str | Outcome | BaseException) -> None:
        """From the engine thread: hand a text piece, the outcome or an error to the loop."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, item)

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            item = await self._events.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Outcome):
                self.outcome = item
                return
            yield item


class Worker:
    """Runs jobs one at a time, first come first served, on ``engine`` (owned by one thread)."""

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tsedge-engine")
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Jobs queued or running."""
        return self._waiting

    def _add_waiting(self, n: int) -> None:
        with self._lock:
            self._waiting += n
            self.metrics.queued.set(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue ``job`` behind the ones already submitted."""
        self._add_waiting(1)
        self._pool.submit(self._run, job)

    def close(self) -> None:
        """Stop the running job at its next token, drop the queued ones, end the thread."""
        self._closing.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: Job) -> None:
        outcome = "error"
        try:
            result = self._generate(job)
            outcome = result.finish_reason
            job.emit(result)
        except Exception as err:  # noqa: BLE001 (reported to the job's client; the server goes on)
            log.exception("generation failed")
            job.emit(err)
        finally:
            self.metrics.requests.labels(job.endpoint, outcome).inc()
            self._add_waiting(-1)

    def _generate(self, job: Job) -> Outcome:
        queue_s = time.perf_counter() - job.arrived
        if job.cancelled or self._closing.is_set():
            return Outcome("cancelled", len(job.prompt), 0, 0, queue_s, None)
        engine, metrics = self.engine, self.metrics
        stream, stop = engine.tokenizer.stream(skip_special_tokens=True), StopText(job.stops)
        last = [job.arrived]

        def on_token(token: int) -> bool:
            now = time.perf_counter()
            (metrics.ttft if last[0] == job.arrived else metrics.token_latency).observe(now - last[0])
            last[0] = now
            if job.cancelled or self._closing.is_set():
                return False
            if text := stop.push(stream.push(token)):
                job.emit(text)
            return not stop.hit

        cached_before, selection_before = len(engine.cache), engine.selection_stats()
        result = engine.generate(job.prompt, job.max_tokens, job.sampling, on_token=on_token)
        if not stop.hit and result.stopped != "cancelled":
            tail = stop.push(stream.flush())
            if tail := tail + ("" if stop.hit else stop.flush()):
                job.emit(tail)
        self._count(result, cached_before, selection_before)
        reason = "stop" if stop.hit else FINISH[result.stopped]
        return Outcome(reason, result.prompt_tokens, result.reused_tokens, len(result.tokens), queue_s, result)

    def _count(self, result: GenerationResult, cached_before: int, selection_before: dict | None) -> None:
        """Token counters and this request's Selection Cache hits and lookups (the engine's counts
        restart when a request does not extend everything cached)."""
        self.metrics.prompt_tokens.inc(result.prompt_tokens)
        self.metrics.cached_tokens.inc(result.reused_tokens)
        self.metrics.generated_tokens.inc(len(result.tokens))
        self.metrics.cache_corrections.inc(result.corrections)
        after = self.engine.selection_stats()
        if after is not None:
            before = selection_before if result.reused_tokens >= cached_before else {"hits": 0, "lookups": 0}
            self.metrics.add_selection(after["hits"] - before["hits"], after["lookups"] - before["lookups"])
