"""Rank 0's heartbeat: while idle, it tells every worker it is alive (they give up after `timeout` s of silence)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Heartbeat:
    """Calls `beat` every `interval` seconds from a daemon thread, whenever `lock` is free (a request in
    progress holds it, and requests keep the workers busy anyway)."""

    def __init__(self, lock: threading.RLock, interval: float, beat: Callable[[], None]) -> None:
        self._lock, self._interval, self._beat = lock, interval, beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prism-edge-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            if not self._lock.acquire(timeout=self._interval):
                continue
            try:
                if not self._stop.is_set():
                    self._beat()
            finally:
                self._lock.release()
