"""What a Cluster raises when it lost a device, and how a dead worker process is described."""

from __future__ import annotations

import signal


class ClusterError(RuntimeError):
    """The cluster lost a device (or never came up); it has been shut down."""


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
