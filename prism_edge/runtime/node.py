"""One device's work for one request: the per-request layer loop, shared by rank 0 and the workers.

The loop runs exactly the simulator's DeviceExecutor; only the communicator differs.  Per layer:

  post receives  ->  attention input (and K/V for a kv payload)  ->  the outgoing means  ->  send
  ->  while the means travel: own Q/K/V and attention over the own keys  ->  wait for the means
  ->  attention over the received keys, log-sum-exp merge with the own part  ->  MLP

How a process waits for requests and answers rank 0 is the application's business (prism_edge.app.worker).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import PrismConfig
from ..models import Adapter
from ..models.base import Batch
from ..partition.plan import Plan
from .device import DeviceExecutor
from .stats import DeviceReport, FlopTally, peak_rss_kib
from .transport import DistCommunicator

FAULTS = ("die", "hang")


@dataclass(frozen=True)
class Fault:
    """A testing aid: make this device die (SIGKILL) or hang (alive but silent) when it reaches `layer`."""

    kind: str
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in FAULTS or self.layer < 0:
            raise ValueError(f"a fault is die@LAYER or hang@LAYER with LAYER >= 0, got {self.kind}@{self.layer}")

    def strike(self, layer: int) -> None:
        if layer != self.layer:
            return
        if self.kind == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # hang: as a stuck device would be
            time.sleep(3600)


@dataclass
class DeviceRun:
    finals: dict[str, Tensor]
    cpu_s: float = 0.0  # this thread's CPU time for the request (time.thread_time)
    compute_s: list[float] = field(default_factory=list)  # per layer
    wait_s: list[float] = field(default_factory=list)
    tally: FlopTally | None = None
    executor: DeviceExecutor | None = None  # kept for decoding (GENERATE)


@dataclass
class _Loop:
    """One request's layer loop on one device: what every layer step needs."""

    dev: DeviceExecutor
    comm: DistCommunicator
    tally: FlopTally
    run: DeviceRun
    overlap: bool
    slowdown: float

    def layer(self, i: int, x: Tensor) -> Tensor:
        dev, comm, tally, rank = self.dev, self.comm, self.tally, self.comm.rank
        t0, c0 = time.perf_counter(), time.thread_time()
        expected = dev.expected()
        posted = comm.post_layer(i, expected)
        state, outgoing = tally.run(i, rank, dev.send, i, x)
        if not self.overlap:  # the plain order: all of the layer's projections before anything is sent
            tally.run(i, rank, dev.project, state)
        comm.send_layer(i, outgoing)
        # overlap: while the messages travel, Q/K/V of the own rows and attention over them
        own = tally.run(i, rank, dev.attend_own, i, state) if self.overlap and dev.in_routes else None
        t1 = time.perf_counter()
        incoming = comm.collect_layer(i, posted, expected)
        t2 = time.perf_counter()
        x = tally.run(i, rank, dev.receive, i, state, incoming, own)
        if self.slowdown:  # by CPU time: the work done, however long other processes kept this one waiting
            time.sleep(self.slowdown * (time.thread_time() - c0))
        self.run.compute_s.append((t1 - t0) + (time.perf_counter() - t2))
        self.run.wait_s.append(t2 - t1)
        return x


def run_device(
    adapter: Adapter,
    cfg: PrismConfig,
    plan: Plan,
    batch: Batch,
    local: dict[str, Tensor],
    comm: DistCommunicator,
    *,
    overlap: bool = True,
    count_flops: bool = False,
    fault: Fault | None = None,
    keep_cache: bool = False,
    slowdown: float = 0.0,
) -> DeviceRun:
    """This process's device for one request: embed, every layer with its exchange, the head.

    plan, batch and local inputs arrive on the CPU; they move to the model's device here.  slowdown
    (a testing aid for heterogeneous devices): after each layer, sleep `slowdown` times the CPU time the
    layer took, so 1.0 makes this device run at half speed; the sleep counts as compute.
    """
    device = next(adapter.model.parameters()).device
    if device.type != "cpu":
        plan, batch = plan.to(device), batch.to(device)
        local = {k: v.to(device) for k, v in local.items()}
    dev = DeviceExecutor(adapter, plan, comm.rank, cfg, batch)
    dev.keep_cache = keep_cache
    tally = FlopTally(count_flops)
    run = DeviceRun(finals={}, tally=tally, executor=dev)
    loop = _Loop(dev, comm, tally, run, overlap, slowdown)
    cpu0 = time.thread_time()
    with torch.inference_mode():
        x = tally.run("embed", comm.rank, dev.embed, local)
        for i in range(adapter.geometry.layers):
            if fault is not None:
                fault.strike(i)
            x = loop.layer(i, x)
        run.finals = tally.run("head", comm.rank, dev.final, x)
    run.cpu_s = time.thread_time() - cpu0
    return run


def device_report(comm: DistCommunicator, run: DeviceRun, layers: int) -> DeviceReport:
    """This device's numbers for the request, from its communicator's ledger and the run."""
    rank, ledger, tally = comm.rank, comm.ledger, run.tally
    counted = tally is not None and tally.enabled
    counts = tally.counts if tally is not None else {}
    return DeviceReport(
        sent=tuple(ledger.sent(i, rank) for i in range(layers)),
        received=tuple(ledger.received(i, rank) for i in range(layers)),
        layer_flops=tuple(counts.get((i, rank), 0) for i in range(layers)) if counted else None,
        compute_s=tuple(run.compute_s), wait_s=tuple(run.wait_s),
        input_bytes=ledger.received("input", rank), output_bytes=ledger.sent("output", rank),
        flops=sum(v for (_, r), v in counts.items() if r == rank) if counted else None,
        cpu_s=run.cpu_s, peak_rss_kib=peak_rss_kib(),
    )


__all__ = ["DeviceRun", "Fault", "device_report", "run_device"]
