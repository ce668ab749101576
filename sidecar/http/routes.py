"""The HTTP routes: each reads its body, runs the dataplane in the call envelope and answers
JSON, or server-sent events for a streamed completion.

Every route but /health needs the bearer token when the server has one. A call is admitted,
counted and timed by the same envelope as a gRPC call (under its route, with the HTTP
status), and traced with a server span that joins the caller's W3C `traceparent`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterator
from contextlib import AsyncExitStack
from typing import Any, TypeVar

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar import errors
from sidecar.dataplane.calls import Call, Calls
from sidecar.dataplane.service import DataPlane
from sidecar.domain import EmbedResult, GenerateChunk, RerankResult
from sidecar.http import to_domain, to_json
from sidecar.http.events import EventStream, cancelled_on_disconnect
from sidecar.http.status import CLIENT_CLOSED, code_name, error_of
from sidecar.http.to_domain import Body, InvalidFieldError

T = TypeVar("T")
Work = Callable[[Body, float | None], Coroutine[Any, Any, tuple[dict[str, Any], dict[str, str]]]]
TIMEOUT_HEADER = "x-request-timeout"  # seconds, as a decimal number


def _json(payload: object) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _event(payload: object) -> bytes:
    return b"data: " + _json(payload) + b"\n\n"


class HttpApi:
    """The OpenAI-compatible routes over one dataplane, as a Starlette app (`app`)."""

    def __init__(self, dataplane: DataPlane, token: bytes | None, state: Callable[[], str]) -> None:
        self._dataplane = dataplane
        self._settings = dataplane.settings
        self._calls = Calls(
            dataplane.admission,
            dataplane.telemetry,
            dataplane.settings.max_message_bytes,
            code_name,
            transport="http",
            ok="200",
            cancelled=str(CLIENT_CLOSED),
        )
        self._digest = hashlib.sha256(token).digest() if token is not None else None
        self._state = state
        self._created = int(time.time())
        unary: list[tuple[str, str, Work]] = [
            ("POST", "/v1/embeddings", self._embeddings),
            ("POST", "/v1/rerank", self._rerank),
            ("GET", "/v1/models", self._models),
            ("GET", "/v1/models/{model:path}", self._model),
        ]
        routes = [Route(path, self._unary(path, work), methods=[m]) for m, path, work in unary]
        routes += [
            Route("/v1/chat/completions", self._generation(chat=True), methods=["POST"]),
            Route("/v1/completions", self._generation(chat=False), methods=["POST"]),
            Route("/health", self._health, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self._no_route})

    # -- what every call does ------------------------------------------------------------

    async def _no_route(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = (
                f"no route {request.method} {request.url.path}: this server answers "
                "/v1/embeddings, /v1/chat/completions, /v1/completions, /v1/models, "
                "/v1/rerank and /health"
            )
        error = {"message": message, "type": "invalid_request_error", "param": None}
        return JSONResponse({"error": {**error, "code": None}}, exc.status_code)

    def _authorize(self, request: Request) -> None:
        """The bearer token, when this server has one (digests compared in constant time)."""
        if self._digest is None:
            return
        header = request.headers.get("authorization")
        if header is None:
            raise errors.UnauthenticatedError(
                "this server needs a bearer token: send `Authorization: Bearer <token>` (with "
                "the openai SDK, api_key=<token>); the token is the one in auth_token_file"
            )
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise errors.UnauthenticatedError("the Authorization header must read `Bearer <token>`")
        digest = hashlib.sha256(token.strip().encode("latin-1", "replace")).digest()
        if not hmac.compare_digest(digest, self._digest):
            raise errors.UnauthenticatedError("the bearer token does not match this server's token")

    def _deadline(self, request: Request) -> float | None:
        """From X-Request-Timeout (seconds), else http_timeout_s; a time.monotonic() value."""
        header = request.headers.get(TIMEOUT_HEADER)
        if header is None:
            timeout = self._settings.http_timeout_s
            return time.monotonic() + timeout if timeout > 0 else None
        try:
            timeout = float(header)
        except ValueError:
            timeout = math.nan
        if not math.isfinite(timeout) or timeout <= 0:
            raise errors.InvalidInputError(
                f"the X-Request-Timeout header must be a positive number of seconds, got {header!r}"
            )
        return time.monotonic() + timeout

    async def _body(self, request: Request) -> Body:
        """The JSON body, read up to max_message_bytes (413 past it)."""
        limit = self._settings.max_message_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise errors.TooLargeError(
                f"the body is {declared} bytes, over max_message_bytes {limit}: send fewer or "
                "shorter inputs per call"
            )
        parts, size = [], 0
        try:
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise errors.TooLargeError(
                        f"the body is over max_message_bytes {limit}: send fewer or shorter inputs"
                    )
                parts.append(part)
        except ClientDisconnect:
            raise errors.CancelledError("the caller disconnected while sending the body") from None
        return to_domain.parse(b"".join(parts))

    async def _unless_left(self, request: Request, work: Coroutine[Any, Any, T]) -> T:
        """`work`'s result; cancelled as soon as the caller disconnects."""
        async with cancelled_on_disconnect(request.receive):
            return await work

    def _span(self, request: Request, route: str) -> Span | None:
        """A server span for the call, a child of the caller's traceparent when it sends one."""
        tracer = self._dataplane.telemetry.tracer
        if tracer is None:
            return None
        return tracer.start_span(
            f"{request.method} {route}",
            context=propagate.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "http.route": route,
                "url.path": request.url.path,
                "url.scheme": request.url.scheme,
                "user_agent.original": request.headers.get("user-agent", ""),
            },
        )

    @staticmethod
    def _ended(span: Span | None, status: int) -> None:
        if span is None:
            return
        span.set_attribute("http.response.status_code", status)
        if status >= 500:  # a server span marks only its own faults as errors
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    @contextlib.contextmanager
    def _current(self, span: Span | None) -> Iterator[None]:
        if span is None:
            yield
            return
        with trace.use_span(span, end_on_exit=False):
            yield

    def _failed(self, exc: BaseException) -> Response:
        status, body, headers = error_of(exc)
        return Response(_json(body), status, headers, media_type="application/json")

    def _closing(self, response: Response) -> Response:
        """While draining, ask the caller to close the connection: its retry (the openai SDK
        retries a 503 by itself) then opens a new one, which can reach another replica."""
        if self._state() == "draining":
            response.headers["connection"] = "close"
        return response

    # -- unary routes ---------------------------------------------------------------------

    def _unary(self, route: str, work: Work) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            span = self._span(request, route)
            with self._current(span):
                try:
                    async with self._calls.call(route, "") as call:
                        self._authorize(request)
                        deadline = self._deadline(request)
                        body = await self._body(request) if request.method == "POST" else {}
                        body.setdefault("model", request.path_params.get("model", ""))
                        call.model = body["model"] if isinstance(body["model"], str) else ""
                        payload, headers = await self._unless_left(request, work(body, deadline))
                        data = _json(payload)
                        call.check_answer(len(data), headers.get("x-sidecar-model", ""))
                    response = Response(data, 200, headers, media_type="application/json")
                except errors.PROPAGATE:
                    self._ended(span, CLIENT_CLOSED)
                    raise
                except BaseException as exc:  # a tokenizer's Rust panic is a BaseException
                    response = self._failed(exc)
            self._ended(span, response.status_code)
            return self._closing(response)

        return endpoint

    async def _embeddings(
        self, body: Body, deadline: float | None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        request, encoding, dimensions = to_domain.embed(body)
        result = await self._dataplane.run(request, deadline)
        assert isinstance(result, EmbedResult)
        if dimensions is not None and dimensions != result.dimensions:
            raise InvalidFieldError(
                "dimensions",
                f"model {result.info.model!r} gives {result.dimensions}-dimensional embeddings "
                f"and cannot shorten them: leave dimensions out or send {result.dimensions}",
            )
        return to_json.embeddings(result, encoding), to_json.info_headers(result.info)

    async def _rerank(
        self, body: Body, deadline: float | None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        request = to_domain.rerank(body)
        result = await self._dataplane.run(request, deadline)
        assert isinstance(result, RerankResult)
        payload = to_json.rerank(result, documents=request.return_text)
        return payload, to_json.info_headers(result.info)

    async def _models(
        self, body: Body, deadline: float | None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        registry = self._dataplane.registry
        data = [to_json.model(status, self._created) for status in registry]
        return {"object": "list", "data": data}, {}

    async def _model(
        self, body: Body, deadline: float | None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        status = self._dataplane.registry.status(body["model"])
        return to_json.model(status, self._created), {}

    # -- generation -----------------------------------------------------------------------

    def _generation(self, *, chat: bool) -> Callable[[Request], Awaitable[Response]]:
        route = "/v1/chat/completions" if chat else "/v1/completions"

        async def endpoint(request: Request) -> Response:
            span = self._span(request, route)
            stack = AsyncExitStack()
            with self._current(span):
                try:
                    call = await stack.enter_async_context(self._calls.call(route, ""))
                    self._authorize(request)
                    deadline = self._deadline(request)
                    body = await self._body(request)
                    streaming, include_usage = to_domain.stream_options(body)
                    wanted = to_domain.generate(body, chat=chat)
                    call.model = wanted.model
                    generation = self._dataplane.generate(wanted, deadline)
                    model = generation.model
                    call.model = model.name
                    chunks = generation.chunks()
                    stack.push_async_callback(chunks.aclose)
                    completion = to_json.Completion(model.name, model.manifest.digest, chat=chat)
                    if not streaming:
                        payload = await self._unless_left(request, _whole(chunks, completion))
                        data = _json(payload)
                        call.check_answer(len(data), model.name)
                        await stack.aclose()
                        response = Response(data, 200, media_type="application/json")
                    else:
                        # The first step before the status: a prompt or a format refused while
                        # it is prepared still gets its own status, not a 200 and an event.
                        first = await self._unless_left(request, anext(chunks))
                        events = _events(
                            stack, call, chunks, first, completion, include_usage=include_usage
                        )
                        return EventStream(events, span, self._ended, stack.aclose)
                except BaseException as exc:  # the call ends with it, counted by its kind
                    await stack.__aexit__(type(exc), exc, exc.__traceback__)
                    if isinstance(exc, errors.PROPAGATE):
                        self._ended(span, CLIENT_CLOSED)
                        raise
                    response = self._failed(exc)
            self._ended(span, response.status_code)
            return self._closing(response)

        return endpoint

    async def _health(self, request: Request) -> Response:
        """200 while serving; 503 while the models load or the server drains."""
        state = self._state()
        return JSONResponse({"status": state}, 200 if state == "serving" else 503)


async def _whole(
    chunks: AsyncGenerator[GenerateChunk, None], completion: to_json.Completion
) -> dict[str, Any]:
    """A whole reply from every chunk."""
    parts: list[str] = []
    last = GenerateChunk("", [])
    async for chunk in chunks:
        parts.append(chunk.text)
        last = chunk
    return completion.whole("".join(parts), last.finish, last.usage)


async def _events(
    stack: AsyncExitStack,
    call: Call,
    chunks: AsyncGenerator[GenerateChunk, None],
    chunk: GenerateChunk,
    completion: to_json.Completion,
    *,
    include_usage: bool,
) -> AsyncGenerator[bytes, None]:
    """Server-sent events: a chunk per step, the usage when asked, then [DONE]. A failure
    after the first step is an error event, as OpenAI's SDKs read one mid-stream."""
    async with stack:
        try:
            first, used = True, None
            while True:
                if chunk.text or first or chunk.finish is not None:
                    yield _event(
                        completion.chunk(
                            chunk.text, chunk.finish, first=first, with_usage=include_usage
                        )
                    )
                    first = False
                if chunk.finish is not None:
                    used = chunk.usage
                    await chunks.aclose()  # the generation's slot is free before the last writes
                    break
                chunk = await anext(chunks)
            if include_usage:
                yield _event(completion.usage_chunk(used))
        except errors.PROPAGATE:
            raise
        except BaseException as exc:
            call.failed(exc)
            yield _event(error_of(exc)[1])
        yield b"data: [DONE]\n\n"
