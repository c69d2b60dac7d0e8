"""OpenAI-style error objects: ``{"error": {"message", "type", "param", "code"}}`` with the
HTTP status OpenAI gives the same mistake; every error is answered and the server goes on."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from tsedge.cli_options import utf8_text
from tsedge.serve.schemas import ErrorBody, ErrorResponse

log = logging.getLogger("tsedge.serve")
Schema = TypeVar("Schema", bound=BaseModel)


class APIError(Exception):
    """An error answered as ``{"error": ...}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        """The JSON error object."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"  # as OpenAI's
        error = ErrorBody(message=self.message, type=kind, param=self.param, code=self.code)
        return ErrorResponse(error=error).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def sse(self) -> str:
        """The error as the last event of a stream that already started (status 200 was sent)."""
        return f"data: {json.dumps(self.body())}\n\n"


def _validation_message(err: ValidationError) -> APIError:
    """The first problem of a request body, in one line naming the field and the fix."""
    first = err.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first['ctx']['error']}); "
                             "send one JSON object", code="invalid_json")
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return APIError(400, f"missing required field {where}", param=where)
    got = f" (got {json.dumps(first['input'])})" if isinstance(first["input"], (int, float, str)) else ""
    return APIError(400, f"invalid {where or 'body'}: {message}{got}", param=where or None)


def body_of(schema: type[Schema]) -> Callable[[Request], Awaitable[Schema]]:
    """A FastAPI dependency reading the request body as ``schema``: UTF-8 JSON whatever the
    Content-Type says (curl -d sends form-encoded), else a 400 naming the problem."""

    async def parse(request: Request) -> Schema:
        try:
            text = utf8_text(await request.body())
        except ValueError as err:
            raise APIError(400, f"the request body is {err}", code="invalid_encoding") from None
        try:
            return schema.model_validate_json(text)
        except ValidationError as err:
            raise _validation_message(err) from None

    return parse


def install(app: FastAPI, on_error: Callable[[Request, int], None]) -> None:
    """Answer APIError, Starlette's HTTP errors (404 path, 405 method) and anything unexpected
    with error objects; ``on_error(request, status)`` counts each."""

    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        on_error(request, exc.status)
        return exc.response()

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return await api_error(request, APIError(exc.status_code, f"{request.method} {request.url.path}: "
                                                 f"{exc.detail}; see GET /v1/models and POST /v1/chat/completions"))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return await api_error(request, APIError(500, f"internal error ({type(exc).__name__}: {exc}); "
                                                 "the server goes on, please report it"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
