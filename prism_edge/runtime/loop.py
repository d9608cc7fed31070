"""One device's forward pass in the steps its exchanges interleave with: the per-layer loop body that the
simulator (every device in lockstep, in one process) and a device process (cluster/node.py) both drive.

    f = Forward(dev, local, tally, overlap=...)
    f.start()                               # the embedding
    for i in range(layers):
        outgoing = f.send(i)                # the layer's send half: {dst: message}
        ... the communicator carries the messages; meanwhile:
        f.meanwhile(i)                      # overlap: own Q/K/V and attention over the own keys
        f.receive(i, incoming)              # attention over what arrived, the rest of the layer
    finals = f.finish()                     # the head

The drivers differ only in what carries `outgoing` to `incoming`.  With a Containment, a failure inside the
computation is remembered instead of raised, and the device goes on sending what its peers wait for.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .device import DeviceExecutor, LayerState
from .stats import FlopTally

Strike = Callable[[int, str], None]  # a testing fault: (layer, point) -> may raise, hang or kill


class PeerLost(RuntimeError):
    """A peer died, hung or fell out of step: never contained, the whole group must stop."""


def describe_error(err: BaseException, where: str) -> str:
    """One line for a failure inside a request: what, where."""
    text = " ".join(str(err).split()) or "(no message)"
    return f"{where}: {type(err).__name__}: {text}"


@dataclass
class Containment:
    """The one failure-containment path, for the prefill and for decoding alike.

    A failure inside a request's computation (a bug, out of memory) is caught and remembered (the first one,
    as one line and its traceback); from then on `attempt` computes nothing, and the caller still sends every
    message its peers wait for (zeros of the planned shapes), so the request ends in step and the group stays
    usable; rank 0 learns of the failure from the device's report or status.  A lost peer is never contained.
    """

    error: str | None = None  # what failed inside the request (one line)
    trace: str | None = None  # its traceback, for --debug

    def attempt(self, where: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), or None once anything in the request has failed (now or before)."""
        if self.error is not None:
            return None
        try:
            return fn(*args)
        except PeerLost:
            raise
        except Exception as err:  # noqa: BLE001 - contained: the request fails, the device goes on
            self.error, self.trace = describe_error(err, where), traceback.format_exc()
            return None


def _where(stage: object) -> str:
    return f"in layer {stage}" if isinstance(stage, int) else {"embed": "in the embedding"}.get(
        str(stage), f"in the {stage}")


class Forward:
    """One device's forward pass for one request, step by step (see the module's docstring)."""

    def __init__(self, dev: DeviceExecutor, local: dict[str, Tensor], tally: FlopTally, *, overlap: bool = False,
                 contain: Containment | None = None, strike: Strike | None = None, rank: int | None = None) -> None:
        """rank: the device's global rank, for the FLOP tally (default its rank in its plan: one stage)."""
        self.dev, self.local, self.tally, self.overlap = dev, local, tally, overlap
        self.rank = dev.rank if rank is None else rank
        self.contain, self.strike = contain, strike
        self.x: Tensor | None = None
        self.state: LayerState | None = None
        self.own: Any = None

    def _run(self, stage: object, point: str, fn: Callable[..., Any], *args: Any) -> Any:
        """tally.run of fn(*args) (stage: a layer index, "embed" or "head"), contained when there is a
        Containment.  point: where a testing fault may strike."""
        def step() -> Any:
            if self.strike is not None and isinstance(stage, int):
                self.strike(stage, point)
            return self.tally.run(stage, self.rank, fn, *args)

        return step() if self.contain is None else self.contain.attempt(_where(stage), step)

    @property
    def failed(self) -> bool:
        return self.contain is not None and self.contain.error is not None

    def start(self) -> None:
        self.x = self._run("embed", "-", self.dev.embed, self.local)

    def resume(self, x: Tensor | None) -> None:
        """A later pipeline stage: the rows the previous stage handed over instead of the embedding (None once
        the request failed here)."""
        self.x = None if self.failed else x

    def send(self, i: int) -> dict[int, list[Tensor]]:
        """Layer i's messages (zeros of their planned shapes once the request failed here)."""
        sent = self._run(i, "send", self.dev.send, i, self.x)
        self.state, outgoing = sent if sent is not None else (None, None)
        if not self.overlap:  # the plain order: all of the layer's projections before anything is sent
            self._run(i, "project", self.dev.project, self.state)
        return self.zeros() if self.failed or outgoing is None else outgoing

    def meanwhile(self, i: int) -> None:
        """overlap: while the messages travel, Q/K/V of the own rows and attention over them."""
        use = self.overlap and bool(self.dev.in_routes)
        self.own = self._run(i, "own", self.dev.attend_own, i, self.state) if use else None

    def receive(self, i: int, incoming: dict[int, list[Tensor]]) -> None:
        self.x = self._run(i, "receive", self.dev.receive, i, self.state, incoming, self.own)

    def finish(self, rows: Tensor | None = None) -> dict[str, Tensor]:
        """The head over every row, or (rows: (B,) one row per sequence) over those only: outputs (B, 1, ...)."""
        x = self.x
        if rows is not None and x is not None:
            x = x[torch.arange(x.shape[0], device=x.device), rows.to(x.device)].unsqueeze(1)
        return self._run("head", "-", self.dev.final, x) or {}

    def zeros(self) -> dict[int, list[Tensor]]:
        """The layer's outgoing messages as zeros of their planned shapes (after a failure)."""
        dev, width = self.dev, self.dev.wire_width()
        return {r.dst: [torch.zeros(shape, dtype=dtype) for shape, dtype in dev.codec.expected(r, width)]
                for r in dev.out_routes}
