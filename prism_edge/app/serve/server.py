"""The HTTP server: the ASGI application (app.py) on uvicorn.

  Server(cluster, host, port, options, keys).run()        in the main thread, until SIGTERM / Ctrl-C or a lost
                                                           device (launch --serve)
  with Server(...).running() as url: ...                   in a thread (tests, `bench load`)

Graceful shutdown: on SIGTERM or Ctrl-C uvicorn stops accepting connections and gives the requests in flight
--shutdown-grace seconds to finish; then they are cancelled (a generation whose client is gone stops within a few
tokens), the queued ones fail, and the caller closes the cluster, which stops every device.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .api import ApiError
from .app import Service
from .options import ServeOptions, is_loopback


class Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, and a client that connects and sends no complete request head within the
    keep-alive timeout (--client-timeout) is dropped: uvicorn itself times out only idle kept-alive connections."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm()  # still no whole request head: the clock keeps running

    def _arm(self) -> None:
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)


class Server:
    def __init__(self, cluster: Any, host: str = "127.0.0.1", port: int = 8000,
                 options: ServeOptions | None = None, keys: tuple[str, ...] = ()) -> None:
        """port 0: any free port (see `url` once started); keys: the API keys accepted (ServeOptions.keys)."""
        self.options = options or ServeOptions()
        self.service = Service(cluster, self.options, keys, on_lost=self.stop)
        o = self.options
        config = uvicorn.Config(self.service.app, host=host or "127.0.0.1", port=port, log_level="error", http=Protocol,
                                access_log=False, lifespan="off", limit_concurrency=o.max_connections,
                                timeout_keep_alive=max(1, int(o.client_timeout)),
                                timeout_graceful_shutdown=max(1, int(o.shutdown_grace)))
        self.uvicorn = uvicorn.Server(config)
        self.host = host or "127.0.0.1"

    @property
    def url(self) -> str:
        """http://HOST:PORT of the listening socket (once started)."""
        sock = self.uvicorn.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def warnings(self) -> list[str]:
        """What a user should hear before serving: no key on an address other machines reach."""
        if not self.service._keys and not is_loopback(self.host):
            return [f"warning: serving on {self.host} without an API key: anyone who reaches this port can use the "
                    "cluster; set --api-key-file FILE or PRISM_EDGE_API_KEY"]
        return []

    def run(self, on_start: Callable[[str], None] | None = None) -> None:
        """Serve in this (main) thread until SIGTERM / Ctrl-C (re-raised once shut down) or a lost device;
        on_start(url) is called once it listens."""
        if on_start is not None:
            threading.Thread(target=self._announce, args=(on_start,), daemon=True).start()
        try:
            self.uvicorn.run()
        finally:
            self.service.runner.close(ApiError(503, "the server is shutting down", code="shutting_down"))

    def _announce(self, on_start: Callable[[str], None]) -> None:
        while not self.uvicorn.started and not self.uvicorn.should_exit:
            time.sleep(0.01)
        if self.uvicorn.started:
            on_start(self.url)

    def stop(self) -> None:
        self.uvicorn.should_exit = True

    @contextmanager
    def running(self, timeout: float = 30.0) -> Iterator[str]:
        """Serve in a thread; yields the base URL; stops (gracefully) on leaving."""
        thread = threading.Thread(target=self.run, name="prism-http", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.host} (see above)")
            time.sleep(0.01)
        try:
            yield self.url
        finally:
            self.stop()
            thread.join(self.options.shutdown_grace + 5)
            if thread.is_alive():
                print("prism-edge: the HTTP server did not stop in time", file=sys.stderr)
