"""Request and response bodies of the OpenAI-compatible API (the fields tsedge implements).

Requests ignore fields they do not know (as OpenAI's SDKs send some this server has no use for);
a known field out of its range is a 400 naming it. Responses carry OpenAI's fields plus
``timings`` (tsedge's: where the time of a request went).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

FinishReason = Literal["stop", "length"]


def _none(value: object) -> bool:
    return value is None


class TextPart(BaseModel):
    """One part of a message's content given as a list (only text parts)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message of the conversation; ``developer`` is OpenAI's newer name for ``system``."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def template_message(self) -> dict[str, str]:
        """The message as the chat template takes it (list content joined by newlines)."""
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What both endpoints share: the model, sampling, stops and streaming. A sampling field left
    out takes the server's default (``tsedge serve``'s sampling options, else the model's)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError("give at most 4 stop sequences, none empty")
        return stops

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("this server returns one choice per request; send n=1 (or leave it out)")
        return value

    def sampling_fields(self) -> dict[str, float | int]:
        """The sampling fields this request sets (``SamplingParams`` names)."""
        names = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens

    @field_validator("messages")
    @classmethod
    def _some(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("the conversation is empty; send at least one message")
        return value


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("this server completes one prompt per request; send one string")
            return value[0]
        return value


# ---- responses ----------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens reused from the previous request's KV cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class Timings(BaseModel):
    """Where a request's time went (tsedge's own field; milliseconds and tokens per second)."""

    queue_ms: float  # waiting for the requests before it
    ttft_ms: float  # the engine's time to first token (prefill of the uncached prompt + sampling)
    prefill_tok_per_s: float
    decode_tok_per_s: float


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_none)
    content: str | None = Field(None, exclude_if=_none)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class _Response(BaseModel):
    id: str
    created: int  # Unix time, seconds
    model: str
    usage: Usage | None = Field(None, exclude_if=_none)
    timings: Timings | None = Field(None, exclude_if=_none)


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class Completion(_Response):
    """A completion, or one streamed piece of it (OpenAI uses the same object for both)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    """A served model: OpenAI's fields plus what the library was compiled with."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tsedge"
    policy: str
    target: str
    dtype: str
    max_context: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
