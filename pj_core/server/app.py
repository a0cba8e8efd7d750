"""The HTTP application: OpenAI's chat-completions protocol over one Persona-judge engine.

Routes: ``POST /v1/chat/completions`` (whole or streamed as server-sent events),
``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /health``, and the profiles
(``GET/PUT/DELETE /v1/profiles/{user_id}``, ``GET /v1/profiles``:
:mod:`pj_core.server.profiles`). A request's ``user`` selects the saved profile that
personalises it; the ``persona_judge`` object may carry preferences
and Persona-judge settings instead (:mod:`pj_core.server.schemas`).

One process owns the model. Requests decode together, continuously batched
(:class:`pj_core.scheduler.ContinuousBatcher`): a new request is prefilled and joins the
running batch at the next step, a finished one leaves at once, and a stream whose client goes
away is cancelled (its rows leave at the next step). The event loop only hands events over,
so it keeps answering other requests meanwhile.

Every error is a JSON body in OpenAI's error shape with its status: 400 (malformed JSON, a
value the engine refuses, a prompt over the context window), 404 (unknown model, user or
route), 409 (a profile written by someone else since it was read), 413 (a body over
``max_body_bytes``), 429 (the queue is full; ``Retry-After`` says when to retry), 504 (past
``request_timeout``), 422 (wrong types, missing or unknown fields),
500 (a failure of the model itself); the server stays up.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from openai.types import Model
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pj_core.backends.hf.models import DEFAULT_MODEL
from pj_core.calls import AdapterSettings, PersonaSources, build_call, shared_engine
from pj_core.errors import (
    AuthenticationError,
    BackendCapacityError,
    ContextOverflowError,
    InvalidGenerationConfigError,
    InvalidPersonaError,
    ModelNotFoundError,
    ModelOutputError,
    PermissionDeniedError,
    PersonaJudgeError,
    ProfileNotFoundError,
    ProfileStoreError,
    RequestTimeoutError,
    ServerBusyError,
)
from pj_core.personas.store import AbstractProfileStore, ProfileConflictError, open_store
from pj_core.results import final_result
from pj_core.scheduler import DEFAULT_PREFIX_CACHE_TOKENS, ContinuousBatcher
from pj_core.server.auth import OPEN, KeyRing, Principal
from pj_core.server.profiles import profile_router
from pj_core.server.responses import ChunkWriter, completion, error_body, new_id
from pj_core.server.schemas import ChatCompletionRequest, call_options, conversation
from pj_core.threads import iterate_in_thread

if TYPE_CHECKING:
    from pj_core.engine import PersonaJudge
    from pj_core.results import StreamEvent

LOG = logging.getLogger("pj_core.server")

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
"""The largest request body accepted (4 MiB); a larger one gets a 413."""

OWNER = "persona-judge"


@dataclass(frozen=True)
class ServerConfig:
    """What :func:`create_app` serves.

    Attributes:
        model: the model spec (alias or path) to load, unless ``engine`` is given.
        engine: a ready engine to serve instead of loading ``model``.
        served_model_name: the name clients send as ``model`` (default: the engine's name,
            e.g. ``smollm2-135m-instruct``).
        profile_store: the profile store (a store object, a SQLite path, a ``postgresql://``
            URL, or ``None`` for
            the default store, the one ``pj profiles`` uses).
        preferences: preferences for requests that name no ``user`` and no
            ``persona_judge.preferences`` (``None``: such a request is a 400).
        max_body_bytes: the largest request body accepted.
        api_keys: the keys requests must bring (:mod:`pj_core.server.auth`); ``None`` or
            an empty ring: every request is allowed (run such a server on loopback only).
        batching: decode concurrent requests as one continuously batched decode
            (:class:`pj_core.scheduler.ContinuousBatcher`: a request joins the running batch
            at its next step); ``False`` decodes each request on its own, side by side.
        max_batch_rows: the most rows one batched step carries (each request brings one row
            per persona, plus a neutral row when guided); others wait in the queue.
        max_queue: the most requests waiting; more get a 429 with ``Retry-After``.
        request_timeout: seconds a request may take, queue included; a request past it is
            stopped (a 504, or an error event in a stream). ``None``: no limit. The
            scheduler enforces it, so it needs ``batching``.
        prefix_cache_tokens: prompt tokens whose keys and values the batching scheduler keeps
            for later prompts that begin the same way (a user's persona text, a chat's
            earlier turns); ``0`` turns prefix reuse off. ``None``: the scheduler's default
            (:data:`pj_core.scheduler.DEFAULT_PREFIX_CACHE_TOKENS`).

        backend: what runs ``model``: ``"transformers"`` (``None``) or ``"llama.cpp"`` (the
            GGUF file as it is; needs llama-cpp-python). Unused with ``engine``.

    Example:
        >>> ServerConfig(preferences=["humor", "concise"]).max_body_bytes
        4194304
    """

    model: str | os.PathLike[str] = DEFAULT_MODEL
    backend: str | None = None
    engine: PersonaJudge | None = None
    served_model_name: str | None = None
    profile_store: AbstractProfileStore | str | os.PathLike[str] | None = None
    preferences: list[str] | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    api_keys: KeyRing | None = None
    batching: bool = True
    max_batch_rows: int | None = None
    max_queue: int | None = None
    request_timeout: float | None = None
    prefix_cache_tokens: int | None = None
    started: float = field(default_factory=time.time)


STATUSES: tuple[tuple[type[Exception], int, str], ...] = (
    (AuthenticationError, 401, "invalid_api_key"),
    (PermissionDeniedError, 403, "permission_denied"),
    (ProfileNotFoundError, 404, "profile_not_found"),
    (ProfileConflictError, 409, "profile_conflict"),  # before ProfileStoreError, its base
    (ModelNotFoundError, 404, "model_not_found"),
    (ContextOverflowError, 400, "context_length_exceeded"),
    (ServerBusyError, 429, "server_busy"),
    (RequestTimeoutError, 504, "timeout"),
    (ProfileStoreError, 503, "profile_store_unavailable"),
    (BackendCapacityError, 503, "backend_capacity"),  # no room now: retry later
    (ModelOutputError, 500, "model_output_error"),
    (ValueError, 400, "invalid_value"),  # the Invalid*Error family: a value the caller can fix
)
"""The HTTP status and OpenAI error ``code`` of the library's errors; the first match wins."""


def status_of(exc: PersonaJudgeError) -> tuple[int, str]:
    """The HTTP status and OpenAI error ``code`` of one of the library's errors
    (:data:`STATUSES`; anything else is a 500 ``server_error``)."""
    for kind, status, code in STATUSES:
        if isinstance(exc, kind):
            return status, code
    return 500, "server_error"


def _json_error(status: int, message: str, **kwargs: Any) -> JSONResponse:
    return JSONResponse(error_body(status, message, **kwargs), status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413 before the application
    reads it (checked against ``Content-Length`` and, for chunked bodies, while reading)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads wait for the client to disconnect

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _json_error(
            413,
            f"the request body is over {self.limit} bytes; send a shorter conversation "
            "(the limit is `pj serve --max-body-bytes`)",
            code="request_too_large",
        )
        response.headers["connection"] = "close"
        await response(scope, receive, send)


OPEN_PATHS = frozenset({"/health", "/docs", "/openapi.json"})
"""Paths that need no API key (they carry no user's data)."""


class AuthGate:
    """ASGI middleware: every request but :data:`OPEN_PATHS` must bring a key of ``keys``
    (a 401 otherwise, before its body is read); the request's :class:`Principal` is put in
    ``request.state.principal`` for the routes."""

    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            authorization = headers.get(b"authorization", b"").decode("latin-1") or None
            try:
                principal = (
                    OPEN
                    if scope.get("path") in OPEN_PATHS
                    else self.keys.authenticate(authorization)
                )
            except AuthenticationError as exc:
                response = _json_error(401, str(exc), code="invalid_api_key")
                response.headers["www-authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def principal_of(request: Request) -> Principal:
    """Who the request acts as (set by :class:`AuthGate`)."""
    principal: Principal = request.state.principal
    return principal


def create_app(config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI application serving ``config`` (loads the model if no engine is given).

    Example:
        >>> app = create_app(ServerConfig(preferences=["humor", "concise"]))  # doctest: +SKIP
        >>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP

    Raises:
        ModelNotFoundError, ModelPackageMissingError, ModelLoadError: loading the model.
        ProfileStoreError: the profile store cannot be opened.
    """
    config = config or ServerConfig()
    engine = (
        config.engine
        if config.engine is not None
        else shared_engine(config.model, config.backend).engine
    )
    name = config.served_model_name or (
        engine.name if config.engine is not None else os.fspath(config.model)
    )
    store = (
        config.profile_store
        if isinstance(config.profile_store, AbstractProfileStore)
        else open_store(config.profile_store)
    )
    settings = AdapterSettings(
        model=config.model,
        generation={},
        personas=PersonaSources(preferences=config.preferences),
        profile_store=store,
        engine=engine,
        backend=config.backend,
    )
    settings.check()
    if config.request_timeout is not None and not config.request_timeout > 0:
        raise InvalidGenerationConfigError(
            f"request_timeout must be > 0 seconds, got {config.request_timeout}"
        )
    if not config.batching and (
        config.request_timeout
        or config.max_queue
        or config.max_batch_rows
        or config.prefix_cache_tokens
    ):
        raise InvalidGenerationConfigError(
            "request_timeout, max_queue, max_batch_rows and prefix_cache_tokens belong to "
            "the batching scheduler; keep batching=True to use them"
        )
    batcher = (
        ContinuousBatcher(
            engine,
            max_rows=config.max_batch_rows,
            max_queue=config.max_queue,
            prefix_cache_tokens=(
                DEFAULT_PREFIX_CACHE_TOKENS
                if config.prefix_cache_tokens is None
                else config.prefix_cache_tokens
            ),
        )
        if config.batching
        else None
    )

    app = FastAPI(title="persona-judge", summary="OpenAI-compatible personalised chat completions")
    app.state.engine = engine
    app.state.store = store
    app.state.model_name = name
    app.state.batcher = batcher
    app.state.keys = config.api_keys or KeyRing()
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(AuthGate, keys=app.state.keys)  # added last: runs first

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if bad_json is not None:
            detail = bad_json.get("ctx", {}).get("error", "malformed")
            return _json_error(400, f"the body is not valid JSON ({detail})", code="invalid_json")
        parts, params = [], []
        for error in errors:
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
            params.append(where or None)
            message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            parts.append(f"{where}: {message}" if where else message)
        return _json_error(422, "; ".join(parts), param=params[0], code="invalid_request_body")

    @app.exception_handler(PersonaJudgeError)
    async def library_error(request: Request, exc: PersonaJudgeError) -> JSONResponse:
        status, code = status_of(exc)
        if status >= 500 and status != 504:
            LOG.error("request failed: %s", exc, exc_info=exc)
        response = _json_error(status, str(exc), code=code)
        if isinstance(exc, ServerBusyError):
            response.headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json_error(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        LOG.error("request failed", exc_info=exc)
        return _json_error(500, f"internal error: {type(exc).__name__}", code="server_error")

    def model_card() -> dict[str, Any]:
        return Model(
            id=name, created=int(config.started), object="model", owned_by=OWNER
        ).model_dump(mode="json")

    app.include_router(profile_router(store, principal_of))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        if model_id != name:
            return _unknown_model(model_id, name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        if body.model != name:
            return _unknown_model(body.model, name)
        options = principal_of(request).personalise_as(call_options(body))
        if "user_id" in options and "preferences" in options:
            raise InvalidPersonaError(
                "send either 'user' (whose saved profile personalises the answer) or "
                "'persona_judge': {'preferences': [...]}, not both"
            )
        if "user_id" not in options and "preferences" not in options and not config.preferences:
            raise InvalidPersonaError(
                "no personas: send 'user' (a user id with a saved profile, see "
                "`pj profiles add`) or 'persona_judge': {'preferences': [...]}"
            )
        turns = conversation(body.messages)
        call = await anyio.to_thread.run_sync(lambda: build_call(settings, turns, options))

        def start() -> Iterator[StreamEvent]:  # validates before any byte is sent
            if batcher is not None and call.batchable:  # joins the running batch
                return batcher.submit(call.batch_request(), timeout=config.request_timeout)
            return call.stream()

        events = await anyio.to_thread.run_sync(start)
        if not body.stream:
            result = await anyio.to_thread.run_sync(lambda: final_result(events))
            return completion(call, result, model=name, completion_id=new_id())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writer = ChunkWriter(call, model=name, include_usage=include_usage)
        return EventSourceResponse(_sse(writer, events), sep="\n")

    return app


def _unknown_model(requested: str, served: str) -> JSONResponse:
    return _json_error(
        404,
        f"model {requested!r} is not served here; this server serves {served!r} (GET /v1/models)",
        param="model",
        code="model_not_found",
    )


async def _sse(writer: ChunkWriter, events: Any) -> AsyncIterator[dict[str, str]]:
    """The stream's server-sent events: OpenAI's chunks, then ``[DONE]``. An error after the
    first byte cannot change the status any more: it is sent as an ``error`` event (which
    OpenAI's clients raise) and the stream ends without ``[DONE]``."""

    def data(body: dict[str, Any]) -> dict[str, str]:
        return {"data": json.dumps(body)}

    yield data(writer.first())
    stream: AsyncIterator[StreamEvent] = iterate_in_thread(lambda: events)
    try:
        async for event in stream:
            if event.done:
                assert event.result is not None  # the engine's final event carries it
                for chunk in writer.last(event.result):
                    yield data(chunk)
            else:
                piece = writer.text(event.text)
                if piece is not None:
                    yield data(piece)
    except PersonaJudgeError as exc:
        status, code = status_of(exc)
        LOG.error("stream failed: %s", exc, exc_info=exc if status >= 500 else None)
        yield data(error_body(status, str(exc), code=code))
        return
    except Exception as exc:
        LOG.error("stream failed", exc_info=exc)
        yield data(error_body(500, f"internal error: {type(exc).__name__}", code="server_error"))
        return
    finally:
        await stream.aclose()  # type: ignore[attr-defined]  # an async generator
    yield {"data": "[DONE]"}
