"""ServeOptions: how the HTTP endpoint runs (keys, limits, batching), one frozen dataclass that is also its flags.

Torch-free: the command line builds its parser from it.  API keys come from --api-key, --api-key-file (one key per
line, # comments) or $PRISM_EDGE_API_KEY (cluster/env.py names it); a key on the command line shows in `ps`, so the
file or the variable is the way on a shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...flags import add_dataclass_flags, dataclass_from_args, option

MIB = 2**20


@dataclass(frozen=True)
class ServeOptions:
    """Settings of `prism-edge launch --serve HOST:PORT` (and of serve.Server)."""

    api_key: tuple[str, ...] = option("accept requests that send `Authorization: Bearer KEY` (one or more keys; every "
                                      "route but /health needs one once any key is set)", default=(), nargs="+")
    api_key_file: str | None = option("a file of API keys, one per line (# comments)", default=None)
    max_queue: int = option("requests admitted at once (running, batched or waiting for the cluster); past it a "
                            "request is answered 429 with Retry-After", default=64)
    max_connections: int = option("open HTTP connections at once; past it uvicorn answers 503", default=256)
    client_timeout: float = option("seconds a client may stay silent while sending its request (408) or idle "
                                   "between requests on a kept-alive connection", default=10.0)
    max_body_mib: float = option("largest request body in MiB (413 past it, refused unread)", default=16.0)
    batch_wait_ms: float = option("how long a forward/embeddings request may wait for others to batch with "
                                  "(only while other requests are in flight; 0: batch only what queued while the "
                                  "cluster was busy)", default=2.0)
    max_batch: int = option("sequences run together in one batch at most (1: no dynamic batching)", default=32)
    shutdown_grace: float = option("seconds in-flight requests get to finish on SIGTERM / Ctrl-C before they are "
                                   "failed and every device stops", default=30.0)

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_connections", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("client_timeout", "max_body_mib", "shutdown_grace"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"batch_wait_ms must be between 0 and 1000 ms, got {self.batch_wait_ms!r}")
        if not all(isinstance(k, str) and k.strip() == k and k for k in self.api_key):
            raise ValueError("api_key: every key must be a non-empty string without surrounding spaces")

    @property
    def max_body(self) -> int:
        return int(self.max_body_mib * MIB)

    def keys(self, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
        """Every accepted key: the given ones, the file's, and the environment's (environ: the entry point's)."""
        keys = list(self.api_key)
        if self.api_key_file:
            path = Path(self.api_key_file)
            try:
                lines = path.read_text().splitlines()
            except OSError as err:
                raise ValueError(f"--api-key-file {path}: cannot read it ({err.strerror})") from None
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not keys:
                raise ValueError(f"--api-key-file {path} holds no key (one per line)")
        from ...cluster.env import api_key

        env_key = api_key(environ) if environ is not None else None
        return tuple(dict.fromkeys(keys + ([env_key] if env_key else [])))

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        add_dataclass_flags(parser, cls)  # type: ignore[arg-type]  # a group takes the same add_argument

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServeOptions":
        return dataclass_from_args(cls, args)

    def replace(self, **changes: Any) -> "ServeOptions":
        return dataclasses.replace(self, **changes)


def is_loopback(host: str) -> bool:
    """Whether HOST only listens on this machine (localhost, 127.0.0.0/8, ::1)."""
    if host in ("localhost", ""):  # "" is what --serve :PORT binds: 127.0.0.1
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
