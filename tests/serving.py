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


def until_serving(proc: Any, wait: float = 120.0) -> tuple[str | None, list[int], list[str]]:
    """Read a `prism-edge launch --serve` process's stderr until it serves (or ends, or `wait` s pass): its URL
    (None if it never served), its workers' pids and the lines read."""
    import time

    url, pids, lines = None, [], []
    deadline = time.monotonic() + wait
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "pids" in line:
            pids = [int(p) for p in line.split("pids")[1].replace(",", " ").split()]
        if "serving on" in line:
            url = line.split("serving on ")[1].split()[0]
        if not line:
            break
    return url, pids, lines
