"""The FastAPI application: OpenAI's chat and text completions on one engine, models, health,
Prometheus metrics and the chat page."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from tsedge.engine import Engine
from tsedge.sampling import SamplingParams
from tsedge.serve import errors
from tsedge.serve.errors import APIError, body_of
from tsedge.serve.metrics import Metrics
from tsedge.serve.schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                  ChatCompletionChunk, ChatCompletionRequest, ChatDelta, Completion,
                                  CompletionChoice, CompletionRequest, GenerationRequest, ModelCard,
                                  ModelList, PromptTokensDetails, Timings, Usage)
from tsedge.serve.worker import Job, Outcome, Worker
from tsedge.tokenizer import TokenizerError

STATIC = resources.files("tsedge.serve") / "static"
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat: until the context is full)


class _Shape:
    """The objects an endpoint answers with; ``base``: their id, created and model fields."""

    def __init__(self, base: dict) -> None:
        self.base = base


class _ChatShape(_Shape):
    """A chat completion's objects: the whole answer, or its chunks."""

    def opening(self) -> BaseModel | None:
        return ChatCompletionChunk(**self.base, choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])

    def piece(self, text: str | None, finish: str | None = None, **extra) -> BaseModel:
        return ChatCompletionChunk(**self.base, choices=[ChatChunkChoice(delta=ChatDelta(content=text),
                                                                         finish_reason=finish)], **extra)

    def usage_piece(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(**self.base, choices=[], usage=usage)

    def whole(self, text: str, finish: str, **extra) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish)
        return ChatCompletion(**self.base, choices=[choice], **extra)


class _CompletionShape(_Shape):
    """A text completion's objects (streamed pieces are completions too)."""

    def opening(self) -> BaseModel | None:
        return None

    def piece(self, text: str | None, finish: str | None = None, **extra) -> BaseModel:
        return Completion(**self.base, choices=[CompletionChoice(text=text or "", finish_reason=finish)], **extra)

    def usage_piece(self, usage: Usage) -> BaseModel:
        return Completion(**self.base, choices=[], usage=usage)

    def whole(self, text: str, finish: str, **extra) -> BaseModel:
        return self.piece(text, finish, **extra)


def _sse(item: BaseModel) -> str:
    return f"data: {item.model_dump_json()}\n\n"


def _usage(outcome: Outcome) -> Usage:
    return Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
                 total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=outcome.cached_tokens))


def _timings(outcome: Outcome) -> Timings:
    r = outcome.result
    return Timings(queue_ms=round(outcome.queue_s * 1e3, 3), ttft_ms=round(r.ttft_s * 1e3, 3),
                   prefill_tok_per_s=round(r.prefill_tok_per_s, 2), decode_tok_per_s=round(r.decode_tok_per_s, 2))


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` once its (non-streaming) client has gone."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    job.cancel()


class Server:
    """What one server holds: the engine's worker, the served model's names, default sampling."""

    def __init__(self, engine: Engine, model_id: str, defaults: SamplingParams, aliases: tuple[str, ...]) -> None:
        self.engine, self.model_id, self.defaults = engine, model_id, defaults
        self.names = {model_id, *aliases}
        self.metrics = Metrics(selecting=engine.selection_stats() is not None)
        self.worker = Worker(engine, self.metrics)
        self.started = int(time.time())

    @property
    def capacity(self) -> int:
        return self.engine.cache.capacity

    def card(self) -> ModelCard:
        meta = self.engine.meta
        return ModelCard(id=self.model_id, created=self.started, policy=meta.policy.name, target=meta.target,
                         dtype=meta.dtype, max_context=self.capacity)

    # ---- a request's prompt and job -------------------------------------------------------------
    def check_model(self, name: str) -> None:
        """404 (``model_not_found``) unless ``name`` is the served model or one of its aliases."""
        if name not in self.names:
            raise APIError(404, f"the model {name!r} is not served here; use {self.model_id!r} (GET /v1/models)",
                           param="model", code="model_not_found")

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        """Prompt ids of the messages through the model's chat template (a 400 if it refuses them)."""
        try:
            return self.engine.tokenizer.encode_chat([m.template_message() for m in body.messages])
        except (TokenizerError, jinja2.TemplateError) as err:
            raise APIError(400, f"the model's chat template refused these messages: {err}", param="messages") from None

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        """Prompt ids of a completion's text (BOS as the model adds it), or its ids checked against
        the vocabulary."""
        if isinstance(prompt, str):
            return self.engine.tokenizer.encode(prompt)
        vocab = self.engine.meta.model.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        return prompt

    def job(self, request: Request, body: GenerationRequest, prompt: list[int], max_tokens: int,
            param: str) -> Job:
        """A job for ``prompt`` (checked to fit the context: never truncated)."""
        if not prompt:
            raise APIError(400, "the prompt has no tokens; give some text", param=param)
        if len(prompt) > self.capacity:
            raise APIError(400, f"the prompt takes {len(prompt)} tokens, more than this model's context of "
                                f"{self.capacity} tokens; shorten it (nothing is truncated), or restart tsedge "
                                "serve with a larger --max-context", param=param, code="context_length_exceeded")
        try:
            sampling = dataclasses.replace(self.defaults, **body.sampling_fields())
        except ValueError as err:
            raise APIError(400, str(err)) from None
        return Job(prompt, max_tokens, sampling, body.stop, request.url.path)

    # ---- answering ------------------------------------------------------------------------------
    async def answer(self, request: Request, body: GenerationRequest, job: Job, shape: _Shape) -> Response:
        """Queue ``job``; stream its events, or wait for the whole answer."""
        self.worker.submit(job)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._events(job, shape, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            text = "".join([piece async for piece in job])
        finally:
            watcher.cancel()
        outcome = job.outcome
        if outcome.finish_reason == "cancelled":
            return Response(status_code=499)  # nobody is listening (nginx's "client closed request")
        return shape.whole(text, outcome.finish_reason, usage=_usage(outcome), timings=_timings(outcome))

    async def _events(self, job: Job, shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events of ``job``; a client that goes away cancels it."""
        try:
            if (opening := shape.opening()) is not None:
                yield _sse(opening)
            async for text in job:
                yield _sse(shape.piece(text))
            outcome = job.outcome
            if outcome.finish_reason != "cancelled":
                yield _sse(shape.piece(None, outcome.finish_reason, timings=_timings(outcome)))
                if include_usage:
                    yield _sse(shape.usage_piece(_usage(outcome)))
            yield "data: [DONE]\n\n"
        except Exception as err:  # noqa: BLE001 (the status line is sent: the error becomes an event)
            errors.log.exception("generation failed")
            yield APIError(500, f"generation failed ({type(err).__name__}: {err}); the server goes on").sse()
        finally:
            job.cancel()


def create_app(engine: Engine, model_id: str, defaults: SamplingParams = SamplingParams(),
               aliases: tuple[str, ...] = ()) -> FastAPI:
    """The server for ``engine`` (loaded, with its tokenizer), answering as model ``model_id``
    (or any of ``aliases``); requests' omitted sampling fields take ``defaults``."""
    server = Server(engine, model_id, defaults, aliases)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        server.worker.close()

    app = FastAPI(title="tsedge", summary="OpenAI-compatible API of a tsedge model library", lifespan=lifespan)
    app.state.server = server
    errors.install(app, lambda request, status: server.metrics.requests.labels(request.url.path, str(status)).inc())
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, "requests_waiting": server.worker.waiting}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[server.card()])

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> ModelCard:
        server.check_model(name)
        return server.card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatCompletionRequest = Depends(body_of(ChatCompletionRequest))):
        server.check_model(body.model)
        max_tokens = body.max_completion_tokens or body.max_tokens or server.capacity
        job = server.job(request, body, server.chat_prompt(body), max_tokens, "messages")
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        return await server.answer(request, body, job, _ChatShape(base))

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest = Depends(body_of(CompletionRequest))):
        server.check_model(body.model)
        job = server.job(request, body, server.text_prompt(body.prompt), body.max_tokens or COMPLETION_MAX_TOKENS, "prompt")
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        return await server.answer(request, body, job, _CompletionShape(base))

    return app
