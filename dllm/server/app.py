"""The FastAPI app: thin routes over `ServingChat` / `ServingCompletions`, the API-key gate, and exception
handlers that turn every failure into an OpenAI-style error body (`{"error": {"message", "type", "param",
"code"}}`) with its status: 400 bad JSON or values, 401 missing/wrong key, 404 unknown model or route,
413 prompt over the context, 429 queue full, 503 shutting down, 500 (no traceback) for bugs.

A client that disconnects cancels its request: non-streamed requests race a disconnect watcher; streams stop
their engine requests when the watcher fires or the body is closed.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from contextlib import asynccontextmanager, suppress
from typing import Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from dllm.errors import DllmError
from dllm.server.engine_client import EngineClient
from dllm.server.errors import ApiError, ServerClosingError
from dllm.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from dllm.server.serving_chat import ServingChat
from dllm.server.serving_common import OpenAIServing, SseStream
from dllm.server.serving_completions import ServingCompletions

logger = logging.getLogger(__name__)

ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


def build_app(client: EngineClient, served_model_names: list[str], api_key: str | None = None,
              shutdown_timeout_s: float = 10.0) -> FastAPI:
    """The app around a not yet started `EngineClient`; its lifespan starts and stops the client."""
    serving = OpenAIServing(client, served_model_names)
    chat, completions = ServingChat(serving), ServingCompletions(serving)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await client.start()
        yield
        await client.shutdown(shutdown_timeout_s)

    app = FastAPI(title="dllm", description="OpenAI-compatible server for diffusion language models",
                  lifespan=lifespan)
    app.add_middleware(Gate, api_key=api_key, client=client)
    _add_exception_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if not client.is_ready:
            return error_response(ServerClosingError())
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(client.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> ModelList:
        max_len = client.max_model_len
        return ModelList(data=[ModelCard(id=name, max_model_len=max_len) for name in served_model_names])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await _answer(raw, chat.create(body))

    @app.post("/v1/completions")
    async def create_completions(body: CompletionRequest, raw: Request) -> Response:
        return await _answer(raw, completions.create(body))

    return app


async def _answer(raw: Request, work: Awaitable) -> Response:
    result = await _until_disconnect(raw, work)
    if result is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    if isinstance(result, ApiError):
        return error_response(result)
    if isinstance(result, SseStream):
        return StreamingResponse(_sse_body(raw, result), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(result.model_dump(exclude_none=True) if isinstance(result, BaseModel) else result)


async def _wait_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(raw: Request, work: Awaitable):
    """`work`'s result, or None (with `work` cancelled) if the client disconnects first."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(_wait_disconnect(raw))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is itself cancelled (shutdown timeout)
        watcher.cancel()
        if not task.done():
            task.cancel()
    if watcher.done() and not watcher.cancelled():
        watcher.exception()  # a receive that failed also means the client is gone
    with suppress(asyncio.CancelledError):
        return await task
    logger.info("client disconnected; request cancelled")
    return None


async def _sse_body(raw: Request, stream: SseStream):
    watcher = asyncio.ensure_future(_wait_disconnect(raw))
    watcher.add_done_callback(lambda t: None if t.cancelled() else (t.exception(), stream.cancel()))
    try:
        async for line in stream.lines:
            yield line
    finally:
        watcher.cancel()
        stream.cancel()


def _field(error: dict) -> str:
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    return loc[0] if loc else "body"


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _add_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors() or [{}]
        first = errors[0]
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            return error_response(ApiError(message, code="invalid_json"))
        field = _field(first)
        same = [e for e in errors if _field(e) == field]
        if len(same) > 1:  # a union (e.g. prompt: string, token ids, or lists of them): no form matched
            return error_response(ApiError(f"{field}: not any of the accepted forms ({same[0].get('msg')}, ...)",
                                           param=field))
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error_response(ApiError(f"{where}: {first.get('msg', 'invalid value')}", param=field))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(f"{exc.detail}: {request.method} {request.url.path!r}", exc.status_code))

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(DllmError)
    async def dllm_error(_request: Request, exc: DllmError) -> JSONResponse:
        return error_response(ApiError(str(exc)))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled %s while serving a request", type(exc).__name__, exc_info=exc)
        return error_response(ApiError(f"internal server error ({type(exc).__name__}); see the server log", 500,
                                       code="internal_error"))


class Gate:
    """ASGI middleware: the API key (every route but /health) and the count of answers per route and status.
    Plain ASGI rather than BaseHTTPMiddleware, so streaming and disconnect detection pass through untouched."""

    def __init__(self, app, api_key: str | None, client: EngineClient):
        self.app, self.api_key, self.client = app, api_key, client

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in ROUTES else "other"
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"] != "/health" and not self._authorized(scope):
                error = ApiError("missing or wrong API key; send the header 'Authorization: Bearer <key>'", 401,
                                 code="invalid_api_key")
                await error_response(error)(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.client.metrics.http_requests.inc(1, path, status[0])

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers", ())).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())
