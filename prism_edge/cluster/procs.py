"""The worker processes a Cluster starts on this machine: spawn them, watch them start, stop them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping

from .errors import ClusterError, exit_reason


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: a worker gets SIGTERM when the process that spawned it dies, whatever the cause."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20  # bytes: buffers this large come from mmap and go back to the system when freed


def steady_heap() -> bool:
    """A device process that serves for long (launch, worker): allocations of 1 MiB and more are mmapped, so
    freed activation buffers go back to the system.  glibc otherwise raises this threshold after each large free
    and keeps the freed buffers in its heap: with batches of changing shapes a server's RSS grew 11 % over
    10 000 requests (4.7 % with this; docs/RESULTS.md §9).  False where the C library is not glibc."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


class LocalWorkers:
    """Ranks 1..P-1 as child processes of rank 0 (none when the other ranks join from elsewhere)."""

    def __init__(self) -> None:
        self.procs: dict[int, subprocess.Popen] = {}

    def spawn(self, commands: Mapping[int, list[str]], env: Mapping[str, str] | None = None) -> None:
        """Start one process per rank; env adds to (or overrides) this process's environment."""
        full = {**os.environ, **(env or {})}
        for rank, cmd in commands.items():
            # a session of their own: Ctrl-C reaches rank 0 only, which then stops them in order
            self.procs[rank] = subprocess.Popen(cmd, env=full, start_new_session=True, preexec_fn=_die_with_parent,
                                                stdin=subprocess.DEVNULL)

    @property
    def pids(self) -> dict[int, int]:
        return {rank: p.pid for rank, p in self.procs.items()}

    def check_started(self) -> None:
        """During start-up: a worker that already exited (bad flags, import error) fails the start at once."""
        for rank, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                raise ClusterError(f"worker rank {rank} (pid {proc.pid}) {exit_reason(code)} during start-up; "
                                   "see its error above")

    def crashed(self) -> list[str]:
        """The workers that died with an error, described (after giving a crash a moment to settle); not those
        that left with code 3 (they stopped because of a lost peer)."""
        time.sleep(0.2)
        return [f"rank {r} (pid {p.pid}) {exit_reason(p.returncode)}" for r, p in self.procs.items()
                if p.poll() is not None and p.returncode not in (0, 3)]

    def died(self) -> str | None:
        """A worker that is gone, described (None while all run): the liveness watch asks every beat."""
        return next((f"rank {r} (pid {p.pid}) {exit_reason(p.returncode)}" for r, p in self.procs.items()
                     if p.poll() is not None), None)

    def stop(self, grace: float = 10.0) -> None:
        """Wait up to `grace` seconds for the workers to leave (they were told to), then terminate, then kill."""
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
