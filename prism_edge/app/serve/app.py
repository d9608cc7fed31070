"""The HTTP endpoint on rank 0, as an ASGI application (Starlette, served by uvicorn: server.py).

  GET  /health                 the cluster, its config and whether it is alive (no key needed)
  GET  /metrics                Prometheus metrics (metrics.py)
  GET  /v1/models[/ID]         the one served model (OpenAI)
  POST /v1/forward, /v1/generate          prism-edge's own (native.py)
  POST /v1/completions, /v1/chat/completions, /v1/embeddings   OpenAI's (openai_api.py, embeddings.py)

Why Starlette and not FastAPI: the bodies are read here, not by the framework, so that a body over the size limit
is refused unread (413), a client that stalls while sending is answered 408 after --client-timeout, and every
error, a schema's included, comes in OpenAI's shape; pydantic checks the schemas (schemas.py).

Every request but /health needs `Authorization: Bearer KEY` once the server has keys (401 otherwise).  At most
--max-queue requests are admitted at once (running, batched or waiting for the cluster); past that, 429 with
Retry-After.  The cluster runs one request at a time: forward and embeddings requests that arrive together run as
one batch (batching.py); generations take turns.  Errors: 400 for a bad request (the field named in "param"), 401,
404 for an unknown route or model, 405, 408, 413, 429, 500 for a request a device failed inside (the cluster still
serves) or a bug, 503 once a device is lost (the server then stops).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .api import ApiError, Ctx, Stream, as_api_errors
from .embeddings import handle_embeddings
from .metrics import CONTENT_TYPE, Metrics
from .native import handle_forward, handle_generate
from .openai_api import handle_chat, handle_completions, list_models
from .options import ServeOptions
from .runner import Runner
from .schemas import check_body

Handler = Callable[[Ctx, dict[str, Any]], "dict[str, Any] | Stream"]
POSTS: dict[str, Handler] = {"/v1/forward": handle_forward, "/v1/generate": handle_generate,
                             "/v1/completions": handle_completions, "/v1/chat/completions": handle_chat,
                             "/v1/embeddings": handle_embeddings}

BATCHED = ("/v1/forward", "/v1/embeddings")  # their requests run together when they arrive together


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), err.status, headers=err.headers)


class Service:
    """One server's state: the cluster, its keys, the admission count, the batcher and the metrics."""

    def __init__(self, cluster: Any, options: ServeOptions, keys: tuple[str, ...] = (),
                 on_lost: Callable[[], None] = lambda: None) -> None:
        self.cluster, self.options, self.on_lost = cluster, options, on_lost
        self._keys = tuple(k.encode() for k in keys)
        self.metrics = Metrics(cluster)
        self.runner = Runner(cluster, options, self.metrics)
        self.inflight = 0
        self._count = threading.Lock()
        self._latency = 0.5  # seconds, a running mean of answered requests: what Retry-After says
        self.app = Starlette(routes=self._routes(), exception_handlers={HTTPException: self._http_error})

    def _routes(self) -> list[Route]:
        routes = [Route("/health", self._health, methods=["GET"]), Route("/metrics", self._metrics, methods=["GET"]),
                  Route("/v1/models", self._models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self._models, methods=["GET"])]
        return routes + [Route(path, self._post, methods=["POST"]) for path in POSTS]

    # ------------------------------------------------------------------ plain routes
    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            err = ApiError(405, f"{request.url.path} takes {allow or 'another method'}, not {request.method}",
                           code="method_not_allowed", headers={"Allow": allow})
        elif exc.status_code == 404:
            paths = ", ".join(f"{'/'.join(r.methods or ())} {r.path}" for r in self.app.routes
                              if isinstance(r, Route) and "{" not in r.path)
            err = ApiError(404, f"Invalid URL ({request.method} {request.url.path}); routes: {paths}",
                           code="unknown_url")
        else:
            err = ApiError(exc.status_code, str(exc.detail))
        self._count_reply(request.url.path, err.status)
        return error_response(err)

    async def _health(self, request: Request) -> Response:
        if not self.cluster.alive:
            err = ApiError(503, f"the cluster is down: {self.cluster.describe()['error'] or 'closed'}",
                           code="cluster_down")
            return error_response(err)
        return JSONResponse({**self.cluster.describe(), "server": self.describe()})

    async def _metrics(self, request: Request) -> Response:
        try:
            self.authorize(request)
        except ApiError as err:
            return error_response(err)
        return Response(self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _models(self, request: Request) -> Response:
        try:
            self.authorize(request)
        except ApiError as err:
            self._count_reply("/v1/models", err.status)
            return error_response(err)
        given = {"id": request.path_params["model"]} if "model" in request.path_params else {}
        return await self._answer("/v1/models", list_models, given)

    def describe(self) -> dict[str, Any]:
        o = self.options
        return {"inflight": self.inflight, "max_queue": o.max_queue, "max_batch": o.max_batch,
                "batch_wait_ms": o.batch_wait_ms, "api_keys": len(self._keys)}

    # ------------------------------------------------------------------ POST routes
    async def _post(self, request: Request) -> Response:
        route = request.url.path.rstrip("/")
        try:
            self.authorize(request)
            body = await self.read_json(request)
            with as_api_errors():
                check_body(route, body)
        except ApiError as err:
            self._count_reply(route, err.status)
            return error_response(err)
        return await self._answer(route, POSTS[route], body)

    async def _answer(self, route: str, handler: Handler, body: dict[str, Any]) -> Response:
        """Admit an authorized request, run its handler in a thread, and answer (a stream: as server-sent events)."""
        t0 = time.monotonic()
        try:
            self._admit()
        except ApiError as err:
            self._count_reply(route, err.status)
            return error_response(err)
        ctx = self.runner.context(route, t0)
        try:
            with as_api_errors():
                reply = await run_in_threadpool(self.runner.call, handler, ctx, body, route in BATCHED)
        except ApiError as err:
            self._done(route, err.status, t0)
            self._after(err)
            return error_response(err)
        if isinstance(reply, Stream):
            return StreamingResponse(self._events(reply, route, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        self._done(route, 200, t0)
        return JSONResponse(reply)

    async def _events(self, reply: Stream, route: str, t0: float) -> AsyncIterator[bytes]:
        """The stream's events as they come (its handler runs in a thread); a client that leaves stops it."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue[bytes | None]()
        gone, status = threading.Event(), [200]

        def emit(payload: dict[str, Any]) -> bool:
            if gone.is_set():
                return False
            loop.call_soon_threadsafe(queue.put_nowait, b"data: " + json.dumps(payload).encode() + b"\n\n")
            return True

        def work() -> None:
            try:
                with as_api_errors():
                    reply.run(emit)
            except ApiError as err:  # too late for a status: the error travels as an event
                status[0] = err.status
                emit(err.body())
                self._after(err)
            finally:
                self._done(route, status[0], t0)
                loop.call_soon_threadsafe(queue.put_nowait, None)

        loop.run_in_executor(None, work)
        try:
            while (event := await queue.get()) is not None:
                yield event
            yield b"data: [DONE]\n\n"
        finally:
            gone.set()

    # ------------------------------------------------------------------ checks
    def authorize(self, request: Request) -> None:
        """401 unless the request carries one of the keys (none set: every request passes)."""
        if not self._keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() == "bearer" and any(hmac.compare_digest(given, key) for key in self._keys):
            return
        message = ("Incorrect API key provided" if token.strip() else
                   "You didn't provide an API key. Send it in an Authorization header using Bearer auth "
                   "(Authorization: Bearer YOUR_KEY)")
        raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object: 413 past the size limit (unread when Content-Length says so), 408 when the
        client stops sending for --client-timeout seconds, 400 when it is not a JSON object."""
        limit, raw = self.options.max_body, request.headers.get("content-length")
        if raw is not None and raw.strip().isdigit() and int(raw) > limit:
            raise ApiError(413, f"the body has {int(raw):,} bytes; the limit is {limit:,}", code="too_large",
                           headers={"Connection": "close"})
        try:
            data = await asyncio.wait_for(_read(request, limit), self.options.client_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the body did not arrive within {self.options.client_timeout:g} s", code="timeout",
                           headers={"Connection": "close"}) from None
        except ClientDisconnect:
            raise ApiError(400, "the client closed the connection before sending its body") from None
        if not data:
            raise ApiError(400, "send a JSON object as the body")
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise ApiError(400, f"the body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _admit(self) -> None:
        with self._count:
            if self.inflight >= self.options.max_queue:
                wait = max(1, min(60, math.ceil(self._latency * self.inflight / self.options.max_batch)))
                raise ApiError(429, f"the server has {self.inflight} requests in flight (--max-queue "
                                    f"{self.options.max_queue}); retry in {wait} s", code="rate_limit_exceeded",
                               headers={"Retry-After": str(wait)})
            self.inflight += 1
            self.metrics.inflight.set(self.inflight)

    def _done(self, route: str, status: int, t0: float) -> None:
        took = time.monotonic() - t0
        with self._count:
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)
            self._latency += 0.1 * (took - self._latency)
        self.metrics.latency.labels(route).observe(took)
        self._count_reply(route, status)

    def _count_reply(self, route: str, status: int) -> None:
        known = route if route in POSTS or route in ("/health", "/metrics", "/v1/models") else "other"
        self.metrics.requests.labels(known, str(status)).inc()

    def _after(self, err: ApiError) -> None:
        if err.status == 503:  # a device is lost: nothing more can be served
            self.runner.close(err)
            self.on_lost()


async def _read(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is over the limit of {limit:,} bytes", code="too_large",
                           headers={"Connection": "close"})
        chunks.append(chunk)
    return b"".join(chunks)
