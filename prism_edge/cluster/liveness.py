"""Liveness: every rank beats in the rendezvous store and watches the others, so that a lost process stops
every other one within seconds, wherever the ranks run.

A process that is SIGKILLed closes its gloo connections, but only a rank with an operation pending on one of
them hears of it.  A rank that waits on a live peer (one that itself waits on the dead rank, or that gave up
before sending) or sits idle between requests would wait out its --timeout.  So each rank runs one daemon
thread over the rendezvous store (rank 0 hosts it, or torchrun's agent; every rank reaches it) that, every BEAT_S:

  beats   adds 1 to its own counter
  reads   `lost`: a rank that learned of a loss wrote what it learned there, first writer wins
  judges  (once watching) a rank whose counter stood still for the lease (LEASE_S, at most --timeout) is lost:
          killed, crashed, frozen or cut off; so is any local child process rank 0 sees exit (`local`)

A loss, however learned, is written under `lost` and handed to `on_lost` once: a worker leaves at once with
code 3 (follower.py), rank 0's Cluster goes down and names the lost rank (cluster.py).  A rank whose own
exchange fails (a closed connection, a timeout) writes it too (`tell`).  Leaving on purpose never counts:
rank 0 writes `closing` before it tells the workers to stop, and waits for each to say it `left`.
The watch uses a store connection of its own, with a short timeout, so it never queues behind the main
thread's store calls.  A rank that is alive but stuck (its main thread hung) keeps beating: that is still
--timeout's to find, as before.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import NoReturn

import torch.distributed as dist

BEAT_S = 0.1  # seconds between a rank's beats (and its reads of the others')
LEASE_S = 2.0  # seconds a rank's counter may stand still before it counts as lost
STORE_S = 2.0  # the watch's own limit for one store call
PREFIX = "prism-edge-live"  # PrefixStore adds the "/"


class Liveness:
    """One rank's beat and watch over the rendezvous store (see the module doc)."""

    def __init__(self, host: str, port: int, rank: int, world: int, lease: float = LEASE_S) -> None:
        client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=STORE_S))
        self.store = dist.PrefixStore(PREFIX, client)
        self.rank, self.world, self.lease = rank, world, lease
        self.reason: str | None = None  # what was lost, once known
        self._on_lost: Callable[[str], None] | None = None
        self._local: Callable[[], str | None] | None = None
        self._quiet = threading.Event()  # closing or leaving: nothing counts as lost any more
        self._stop = threading.Event()
        self._once = threading.Lock()
        self._seen: dict[int, tuple[int, float]] = {}
        self._thread = threading.Thread(target=self._loop, name=f"prism-edge-liveness-{rank}", daemon=True)
        self._thread.start()

    @classmethod
    def over(cls, store: dist.Store, rank: int, world: int, timeout: float) -> "Liveness":
        """The watch over the rendezvous TCPStore `store` (its host and port), with a lease of at most `timeout`."""
        return cls(store.host, store.port, rank, world, min(LEASE_S, timeout))  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ the owner's side
    def watch(self, on_lost: Callable[[str], None], local: Callable[[], str | None] | None = None) -> None:
        """From now on judge the other ranks; on_lost(reason) is called once, from the watch thread."""
        now = time.monotonic()
        self._seen = {r: (-1, now) for r in range(self.world) if r != self.rank}
        self._local = local
        self._on_lost = on_lost

    def tell(self, reason: str) -> str:
        """Write a loss this rank learned of (the first one written stays); returns the one that stays."""
        if self.reason is None:
            try:
                self.reason = self.store.compare_set("lost", "", reason).decode(errors="replace") or reason
            except (RuntimeError, OSError):  # the store went with rank 0: nobody is left to tell
                self.reason = reason
        return self.reason

    def closing(self, tell_stop: Callable[[], None], limit: float = 1.0) -> None:
        """Rank 0's close: from now on nothing counts as lost; tell_stop() the workers, then give them up to
        `limit` s to say they left (so they are done with the store before it goes with rank 0)."""
        self._quiet.set()
        try:
            self.store.set("closing", "1")
            tell_stop()
            end = time.monotonic() + limit
            while self.store.add("left", 0) < self.world - 1 and time.monotonic() < end:
                time.sleep(0.01)
        except (RuntimeError, OSError):  # a worker or the store is gone already (PeerLost is a RuntimeError)
            pass

    def leave(self) -> None:
        """A worker told to stop: stop watching and beating, and say so (rank 0 waits for it)."""
        self._quiet.set()
        self.stop()
        try:
            self.store.add("left", 1)
        except (RuntimeError, OSError):
            pass

    def stop(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(STORE_S + 1.0)

    # ------------------------------------------------------------------ the watch thread
    def _loop(self) -> None:
        me, failing = f"beat/{self.rank}", False
        while not self._stop.wait(BEAT_S):
            try:
                self.store.add(me, 1)
                failing = False
                if self._on_lost is not None and not self._quiet.is_set():
                    reason = self._judge()
                    if reason is not None:
                        return self._lost(reason)
            except (RuntimeError, OSError) as err:  # closed, or no answer within STORE_S: once more, then lost
                if self._quiet.is_set() or self._stop.wait(0.5):
                    return
                if failing and self._on_lost is not None:
                    what = str(err).splitlines()[0] if str(err) else type(err).__name__
                    return self._lost(f"rank {self.rank}: lost the rendezvous store ({what}): rank 0 (or torchrun's "
                                      "agent, which hosts it) was killed, crashed, froze or is cut off")
                failing = True

    def _judge(self) -> str | None:
        """What was lost, if anything: what another rank wrote, a local child that exited, a lapsed lease."""
        if self.store.check(["closing"]):
            self._quiet.set()
            return None
        if self.store.check(["lost"]):
            return self.store.get("lost").decode(errors="replace")
        local = self._local() if self._local is not None else None
        if local is not None:
            return f"rank {self.rank}: {local}"
        now = time.monotonic()
        for r, (count, since) in self._seen.items():
            beats = self.store.add(f"beat/{r}", 0)
            if beats != count:
                self._seen[r] = (beats, now)
            elif now - since > self.lease:
                return (f"rank {self.rank}: rank {r} gave no sign of life for {now - since:.1f} s (its liveness "
                        "beat in the rendezvous store stopped): it was killed, crashed, froze or is cut off")
        return None

    def _lost(self, reason: str) -> None:
        if self._once.acquire(blocking=False) and self._on_lost is not None:
            self._on_lost(self.tell(reason))


def exit_lost(rank: int, reason: str) -> NoReturn:
    """A worker that learned of a loss: one line on stderr, then leave at once with code 3 (the group is broken
    and may hold stuck operations, so nothing waits for them)."""
    said = reason if reason.startswith(f"rank {rank}:") else \
        f"rank {rank}: stopping, because {reason.removesuffix('; stopping')}"
    print(f"prism-edge: error: {said}", file=sys.stderr, flush=True)
    os._exit(3)


def down_when_lost(lock: threading.RLock, down: Callable[[], bool], fail: Callable[[str], None]
                   ) -> Callable[[str], None]:
    """Rank 0's on_lost: fail(reason) as soon as no request holds `lock`.  A request in flight fails by itself,
    naming the reason: the workers leave on it, so whatever rank 0 waits for ends with a closed connection."""
    def on_lost(reason: str) -> None:
        while not down():
            if lock.acquire(timeout=0.05):
                try:
                    if not down():
                        fail(reason)
                finally:
                    lock.release()
                return
    return on_lost
