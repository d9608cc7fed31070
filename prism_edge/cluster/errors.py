"""What a Cluster raises when it lost a device or a device failed inside one request, and how a dead worker
process is described."""

from __future__ import annotations

import signal
from collections.abc import Sequence


class ClusterError(RuntimeError):
    """The cluster lost a device (or never came up); it has been shut down."""


class RequestError(RuntimeError):
    """One or more devices failed inside this request (a bug, out of memory) and finished its exchange with
    zeros: the request is abandoned, and the cluster is still up and serves the next one.

    failures: (rank, what failed there) per failed device, rank order; trace: rank 0's own traceback when it
    failed (for --debug; a worker prints its own)."""

    def __init__(self, failures: Sequence[tuple[int, str]], trace: str | None = None) -> None:
        self.failures, self.trace = list(failures), trace
        self.ranks = [rank for rank, _ in self.failures]
        what = "; ".join(f"rank {rank} failed {text}" for rank, text in self.failures)
        super().__init__(f"{what} (the request was abandoned; the cluster is still up and serves the next one)")


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
