"""The HTTP endpoint on rank 0: prism-edge's JSON API and an OpenAI-compatible one, over one running cluster.

  GET  /health                 the cluster, its config and whether it is alive
  GET  /v1/models[/ID]         the one served model (OpenAI)
  POST /v1/forward, /v1/generate          prism-edge's own (native.py)
  POST /v1/completions, /v1/chat/completions, /v1/embeddings   OpenAI's (openai_api.py, embeddings.py)

Requests queue and run one at a time (the cluster is one pipeline; its lock orders them), so two are
never mixed.  Errors come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a
bad request (the field named in "param"), 404 for an unknown route or model, 405 for a wrong method,
408 for a client that stops sending its body for SOCKET_TIMEOUT seconds, 413 for a body over MAX_BODY
(refused unread), 500 for a request a device failed inside (RequestError: the cluster still serves) or a
bug, 503 once a device is lost (the server then stops).  Each connection has its own thread and a socket
timeout, so a slow or stalled client holds only its own connection, never the cluster's queue.
No authentication and no TLS: bind it to localhost (the default) or a trusted network.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .api import ApiError, BadField, Stream
from ...cluster import Cluster, ClusterError, RequestError
from .embeddings import handle_embeddings
from .native import handle_forward, handle_generate
from .openai_api import handle_chat, handle_completions, list_models

MAX_BODY = 16 * 1024 * 1024  # bytes: 8 images of 3x224x224 as JSON numbers fit; anything larger is refused unread
SOCKET_TIMEOUT = 10.0  # seconds a connection may stay silent while sending a request or reading a reply


Handler = Callable[[Cluster, dict[str, Any]], "dict[str, Any] | Stream"]


def _health(cluster: Cluster, _: dict[str, Any]) -> dict[str, Any]:
    if not cluster.alive:
        raise ApiError(503, f"the cluster is down: {cluster.describe()['error'] or 'closed'}", code="cluster_down")
    return cluster.describe()


def _routes() -> dict[str, dict[str, Handler]]:
    return {
        "/health": {"GET": _health},
        "/v1/models": {"GET": list_models},
        "/v1/forward": {"POST": handle_forward},
        "/v1/generate": {"POST": handle_generate},
        "/v1/completions": {"POST": handle_completions},
        "/v1/chat/completions": {"POST": handle_chat},
        "/v1/embeddings": {"POST": handle_embeddings},
    }


def _route(routes: dict[str, dict[str, Handler]], method: str, path: str) -> tuple[Handler, dict[str, Any]]:
    """The handler for METHOD PATH, and what the path itself says (a model id)."""
    path = path.split("?", 1)[0].rstrip("/") or "/health"
    extra: dict[str, Any] = {}
    if path.startswith("/v1/models/"):
        path, extra = "/v1/models", {"id": path[len("/v1/models/"):]}
    methods = routes.get(path)
    if methods is None:
        raise ApiError(404, f"Invalid URL ({method} {path}); routes: " + ", ".join(
            f"{m} {p}" for p, ms in routes.items() for m in ms), code="unknown_url")
    if method not in methods:
        raise ApiError(405, f"{path} takes {' or '.join(methods)}, not {method}", code="method_not_allowed",
                       headers={"Allow": ", ".join(methods)})
    return methods[method], extra


class _Handler(BaseHTTPRequestHandler):
    cluster: Cluster
    routes: dict[str, dict[str, Handler]]
    server_version = "prism-edge"
    timeout = SOCKET_TIMEOUT  # socketserver sets it on every connection: a stalled client cannot hold a thread

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: the launcher prints its own lines
        pass

    def _send(self, code: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        raw = (self.headers.get("Content-Length") or "0").strip()
        if not raw.isdigit():
            raise ApiError(400, f"Content-Length must be a number of bytes, got {raw[:40]!r}", code="bad_length")
        length = int(raw)
        if length > MAX_BODY:
            raise ApiError(413, f"the body has {length:,} bytes; the limit is {MAX_BODY:,}", code="too_large")
        if length <= 0:
            raise ApiError(400, "send a JSON object as the body (with a Content-Length)")
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            raise ApiError(408, f"the body did not arrive: {length:,} bytes announced, none for "
                                f"{self.timeout:g} s", code="timeout") from None
        if len(data) < length:
            raise ApiError(400, f"the body ended after {len(data):,} of the {length:,} bytes Content-Length announced")
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise ApiError(400, f"the body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _handle(self, method: str) -> None:
        try:
            handler, extra = _route(self.routes, method, self.path)
            body = self._body() if method == "POST" else extra
            with _as_api_errors():
                reply = handler(self.cluster, body)
        except ApiError as err:
            self.close_connection = True  # an unread body may still be on the socket
            self._send(err.status, err.body(), err.headers)
            self._after(err)
            return
        if isinstance(reply, Stream):
            self._stream(reply)
        else:
            self._send(200, reply)

    def _stream(self, reply: Stream) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True  # the end of the stream is the end of the connection
        try:
            with _as_api_errors():
                reply.run(self._event)
        except ApiError as err:  # too late for a status: the error travels as an event
            self._event(err.body())
            self._after(err)
        self._write(b"data: [DONE]\n\n")

    def _after(self, err: ApiError) -> None:
        if err.status == 503:  # a device is lost: nothing more can be served
            threading.Thread(target=self.server.shutdown, daemon=True).start()

    def _event(self, payload: dict[str, Any]) -> bool:
        return self._write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _write(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except OSError:  # the client went away
            return False

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


@contextmanager
def _as_api_errors() -> Iterator[None]:
    """Turn what a handler raises into the right HTTP error."""
    try:
        yield
    except ApiError:
        raise
    except BadField as err:
        raise ApiError(400, str(err), err.param) from None
    except ValueError as err:
        raise ApiError(400, str(err)) from None
    except ClusterError as err:
        raise ApiError(503, str(err), code="cluster_down") from None
    except RequestError as err:  # a device failed inside this request; the cluster serves the next one
        raise ApiError(500, str(err), code="request_failed") from None
    except Exception as err:  # a bug on rank 0 (the cluster stays up unless the devices were mid-request)
        traceback.print_exc(file=sys.stderr)
        raise ApiError(500, f"internal error: {type(err).__name__}: {err}") from None


def make_server(cluster: Cluster, host: str = "127.0.0.1", port: int = 8000,
                timeout: float = SOCKET_TIMEOUT) -> ThreadingHTTPServer:
    """An HTTP server bound to host:port (port 0: any free port; see server.server_address); timeout: seconds
    a connection may stay silent mid-request."""
    handler = type("Handler", (_Handler,), {"cluster": cluster, "routes": _routes(), "timeout": timeout})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server

