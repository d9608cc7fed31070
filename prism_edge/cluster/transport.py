"""The multi-process communicator: every byte between device processes goes through torch.distributed.

Each device is one process in a gloo process group (point-to-point isend/irecv of plain tensors;
nothing is pickled).  The communicator records every tensor it sends or receives in a ByteLedger
with the same (stage, src, dst) keys as the simulator's, and turns a peer that died, hung or fell out
of step into a `DeviceLost` error that names the peer and the stage, within a bounded time.  How the
group is formed is runtime/rendezvous.py.
"""

from __future__ import annotations

import math
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from ..runtime.comm import ByteLedger
from ..runtime.loop import PeerLost
from ..runtime.wire import layer_tag

class DeviceLost(PeerLost):
    """A peer died, hung or fell out of step: this process cannot go on and the cluster must stop."""


def _describe(err: Exception) -> str:
    text = str(err)
    if "Timed out" in text or "timed out" in text:
        return "timeout"
    if "closed" in text or "reset" in text.lower() or "Broken pipe" in text or "EOF" in text:
        return "closed"
    return text.splitlines()[0] if text else type(err).__name__


class DistCommunicator:
    """Point-to-point exchange over a process group, every byte counted, every wait bounded."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world: int, timeout: float = 30.0) -> None:
        """group None: a communicator of one device (world 1), which never sends anything."""
        self.group, self.rank, self.world, self.timeout = group, rank, world, timeout
        self.ledger = ByteLedger()
        self._sends: list[tuple[object, int, str, Tensor]] = []

    def _group(self) -> dist.ProcessGroup:
        if self.group is None:
            raise RuntimeError(f"rank {self.rank}: this communicator has no process group (closed, or one device)")
        return self.group

    def reset(self) -> None:
        """A new request: a fresh ledger."""
        self.ledger = ByteLedger()

    # ------------------------------------------------------------------ primitives
    def isend(self, stage: object, dst: int, tensors: list[Tensor], tag: int, what: str, count: bool = True) -> None:
        for j, t in enumerate(tensors):
            if t.numel() == 0:
                continue
            t = t.detach().cpu().contiguous()  # gloo moves host memory: a GPU device stages through it
            if count:
                self.ledger.record(stage, self.rank, dst, t)
            work = self._guard(lambda: self._group().send([t], dst, tag + j), dst, what)
            self._sends.append((work, dst, what, t))  # keep t alive until the send completes

    def irecv(self, src: int, buffers: list[Tensor], tag: int, what: str) -> list[tuple[object, Tensor]]:
        return [(self._guard(lambda b=b, j=j: self._group().recv([b], src, tag + j), src, what), b)
                for j, b in enumerate(buffers) if b.numel() > 0]

    def wait_recv(self, stage: object, src: int, posted: list[tuple[object, Tensor]], what: str,
                  deadline: float | None = None, count: bool = True) -> None:
        deadline = deadline if deadline is not None else time.monotonic() + self.timeout
        for work, buf in posted:
            self._wait(work, src, what, deadline)
            if count:
                self.ledger.record(stage, src, self.rank, buf)

    def recv(self, stage: object, src: int, buffers: list[Tensor], tag: int, what: str,
             timeout: float | None = None, count: bool = True) -> list[Tensor]:
        posted = self.irecv(src, buffers, tag, what)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self.wait_recv(stage, src, posted, what, deadline, count)
        return buffers

    def flush(self, keep: int = 0, timeout: float | None = None) -> None:
        """Wait until every posted send but the `keep` newest has gone out (keep 1: a stream keeps one in flight)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        cut = max(0, len(self._sends) - keep)
        sends, self._sends = self._sends[:cut], self._sends[cut:]
        for work, dst, what, _ in sends:
            self._wait(work, dst, what, deadline, sending=True)

    def close(self, abort: bool = False) -> None:
        """Release the process group's threads and sockets (left to die with the interpreter, they abort it).

        After a lost peer the group may have operations stuck on it: abort in a helper thread, bounded.
        """
        group, self.group = self.group, None
        if group is None:
            return

        def release():
            try:
                group.abort() if abort else group.shutdown()
            except RuntimeError:
                pass

        thread = threading.Thread(target=release, daemon=True)
        thread.start()
        thread.join(5.0)

    # ------------------------------------------------------------------ one layer's exchange
    def post_layer(self, index: int, expected: dict[int, list[tuple[tuple[int, ...], torch.dtype]]]) -> dict:
        """Post the layer's receives before computing anything: gloo sends go out only once posted."""
        return {src: self.irecv(src, [torch.empty(shape, dtype=dtype) for shape, dtype in parts],
                                layer_tag(index), f"layer {index} message")
                for src, parts in expected.items()}

    def send_layer(self, index: int, outgoing: dict[int, list[Tensor]]) -> None:
        self.flush()  # the previous layer's sends: long done unless a peer is stuck
        for dst, tensors in outgoing.items():
            self.isend(index, dst, tensors, layer_tag(index), f"layer {index} message")

    def collect_layer(self, index: int, posted: dict, expected: dict) -> dict[int, list[Tensor]]:
        deadline = time.monotonic() + self.timeout
        out = {}
        for src, works in posted.items():
            self.wait_recv(index, src, works, f"layer {index} message", deadline)
            received = iter(buf for _, buf in works)
            # empty tensors are not sent (gloo cannot); rebuild them so the message keeps its layout
            out[src] = [next(received) if math.prod(shape) else torch.empty(shape, dtype=dtype)
                        for shape, dtype in expected[src]]
        return out

    # ------------------------------------------------------------------ errors
    def _guard(self, start, peer: int, what: str):
        try:
            return start()
        except RuntimeError as err:
            raise self._lost(err, peer, what) from None

    def _wait(self, work, peer: int, what: str, deadline: float, sending: bool = False) -> None:
        left = max(0.001, deadline - time.monotonic())
        try:
            work.wait(timedelta(seconds=left))
        except RuntimeError as err:
            raise self._lost(err, peer, what, sending) from None

    def _lost(self, err: Exception, peer: int, what: str, sending: bool = False) -> DeviceLost:
        kind = _describe(err)
        me = f"rank {self.rank}"
        if kind == "timeout":
            verb = f"could not deliver {what} to" if sending else f"got no {what} from"
            return DeviceLost(f"{me}: {verb} rank {peer} within {self.timeout:g} s: rank {peer} died, hung or is "
                              f"unreachable; stopping (raise --timeout if the devices are only slow)")
        if kind == "closed":
            return DeviceLost(f"{me}: lost rank {peer} while exchanging the {what} (connection closed: that process "
                              f"crashed, was killed or stopped); stopping")
        return DeviceLost(f"{me}: exchanging the {what} with rank {peer} failed: {kind}; stopping")


# ---------------------------------------------------------------------------------------- start-up collectives
# The start-up agreement (handshake.py, calibrate.py) uses the group's collectives; like every send and
# receive they live here.  A rank that drops out raises RuntimeError from gloo: the callers name the phase.
def all_gather_bytes(group: dist.ProcessGroup, world: int, payload: bytes, timeout: float) -> list[bytes]:
    """Every rank's payload (any lengths), rank order: lengths first, then the zero-padded bytes."""
    wait = timedelta(seconds=timeout)
    size = torch.tensor([len(payload)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    group.allgather([sizes], [size]).wait(wait)
    longest = int(max(s.item() for s in sizes))
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    docs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)]
    group.allgather([docs], [mine]).wait(wait)
    return [bytes(d[: int(s.item())].tolist()) for d, s in zip(docs, sizes)]


def barrier(group: dist.ProcessGroup, timeout: float) -> None:
    group.allreduce([torch.zeros(1)]).wait(timedelta(seconds=timeout))


def all_gather_floats(group: dist.ProcessGroup, world: int, value: float, timeout: float) -> list[float]:
    mine = torch.tensor([value], dtype=torch.float64)
    every = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    group.allgather([every], [mine]).wait(timedelta(seconds=timeout))
    return [float(t) for t in every]


def broadcast_floats(group: dist.ProcessGroup, values: list[float], timeout: float) -> list[float]:
    """Rank 0's `values` on every rank (the others pass a list of the same length)."""
    t = torch.tensor(values, dtype=torch.float64)
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    group.broadcast([t], opts).wait(timedelta(seconds=timeout))
    return [float(v) for v in t]


def ping_pong(group: dist.ProcessGroup, peer: int, lead: bool, nbytes: int, rounds: int, timeout: float
              ) -> list[float]:
    """`rounds` round trips of `nbytes` with `peer` (the lead sends first and times them; the other echoes):
    the lead's seconds per round trip, the other's list empty.  A link probe (cluster/probes.py)."""
    wait = timedelta(seconds=timeout)
    buf = torch.zeros(max(1, nbytes), dtype=torch.uint8)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        if lead:
            group.send([buf], peer, 7).wait(wait)
            group.recv([buf], peer, 8).wait(wait)
            times.append(time.perf_counter() - t0)
        else:
            group.recv([buf], peer, 7).wait(wait)
            group.send([buf], peer, 8).wait(wait)
    return times


def exchange_int(group: dist.ProcessGroup, peer: int, lead: bool, value: Tensor, timeout: float) -> None:
    """The lead's one-element int64 `value` into its partner's (a link probe's payload size)."""
    wait = timedelta(seconds=timeout)
    (group.send([value], peer, 9) if lead else group.recv([value], peer, 9)).wait(wait)
