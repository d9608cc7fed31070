"""A cluster with its HTTP endpoint on a free port, for the tests that talk HTTP to it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def serving(cluster: Any, **options: Any) -> Iterator[str]:
    """Serve `cluster` on 127.0.0.1 (a free port) in a thread; yields the base URL.  options: ServeOptions' fields,
    and keys=(...) for the API keys accepted."""
    from prism_edge.app.serve.options import ServeOptions
    from prism_edge.app.serve.server import Server

    keys = tuple(options.pop("keys", ()))
    server = Server(cluster, "127.0.0.1", 0, ServeOptions(**options), keys)
    with server.running() as url:
        yield url
