"""One device's work for one request in a device process, shared by rank 0 and the workers.

It drives the same per-layer steps as the simulator (runtime/loop.py `Forward` over the DeviceExecutor);
only what carries the messages differs.  Per layer:

  post receives  ->  attention input (and K/V for a kv payload)  ->  the outgoing means  ->  send
  ->  while the means travel: own Q/K/V and attention over the own keys  ->  wait for the means
  ->  attention over the received keys, log-sum-exp merge with the own part  ->  MLP

How a process waits for requests and answers rank 0 is the application's business (prism_edge.cluster.follower).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import RunConfig
from ..models import Adapter
from ..models.base import Batch
from ..partition.plan import Plan
from ..runtime.device import DeviceExecutor
from ..runtime.loop import Containment, Forward, describe_error
from ..runtime.stats import DeviceReport, FlopTally, peak_rss_kib
from .transport import DistCommunicator

FAULTS = ("die", "hang", "raise", "late", "decode")
# where each kind strikes: die / hang as the layer starts; raise in the layer's computation before its message
# goes out; late after the message went out; decode in a generation's decoding step of that layer
_POINTS = {"die": "start", "hang": "start", "raise": "send", "late": "receive", "decode": "decode"}


class InjectedFault(RuntimeError):
    """What a `raise`, `late` or `decode` fault raises: a stand-in for a bug or an out-of-memory error."""


@dataclass(frozen=True)
class Fault:
    """A testing aid: at `layer` of its `request`-th request (1-based), make this device die (SIGKILL), hang
    (alive but silent) or raise an error inside the request (raise, late, decode: see _POINTS)."""

    kind: str
    layer: int
    request: int = 1

    def __post_init__(self) -> None:
        if self.kind not in FAULTS or self.layer < 0 or self.request < 1:
            raise ValueError(f"a fault is KIND@LAYER[#REQUEST] with KIND in {', '.join(FAULTS)}, LAYER >= 0 and "
                             f"REQUEST >= 1, got {self.kind}@{self.layer}#{self.request}")

    def strike(self, layer: int, point: str) -> None:
        if layer != self.layer or point != _POINTS[self.kind]:
            return
        if self.kind == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "hang":
            while True:  # as a stuck device would be
                time.sleep(3600)
        raise InjectedFault(f"injected fault ({self.kind} at layer {layer})")


@dataclass
class DeviceRun(Containment):
    finals: dict[str, Tensor] = field(default_factory=dict)  # empty when the request failed here
    cpu_s: float = 0.0  # this thread's CPU time for the request (time.thread_time)
    compute_s: list[float] = field(default_factory=list)  # per layer
    wait_s: list[float] = field(default_factory=list)
    tally: FlopTally | None = None
    executor: DeviceExecutor | None = None  # kept for decoding (GENERATE)


def run_device(
    adapter: Adapter,
    cfg: RunConfig,
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
    layer took, so 1.0 makes this device run at half speed; the sleep counts as compute.  A failure inside
    the request leaves `error` set and `finals` empty, with every message of the request exchanged (_Loop).
    """
    device = next(adapter.model.parameters()).device
    if device.type != "cpu":
        plan, batch = plan.to(device), batch.to(device)
        local = {k: v.to(device) for k, v in local.items()}
    dev = DeviceExecutor(adapter, plan, comm.rank, cfg, batch)
    dev.keep_cache = keep_cache
    run = DeviceRun(tally=FlopTally(count_flops), executor=dev)
    assert run.tally is not None
    steps = Forward(dev, local, run.tally, overlap=overlap, contain=run, strike=fault.strike if fault else None)
    cpu0 = time.thread_time()
    with torch.inference_mode():
        steps.start()
        for i in range(adapter.geometry.layers):
            t0, c0 = time.perf_counter(), time.thread_time()
            if fault is not None:
                fault.strike(i, "start")
            expected = dev.expected()
            posted = comm.post_layer(i, expected)  # before computing anything: gloo sends go out once posted
            comm.send_layer(i, steps.send(i))
            steps.meanwhile(i)
            t1 = time.perf_counter()
            incoming = comm.collect_layer(i, posted, expected)
            t2 = time.perf_counter()
            steps.receive(i, incoming)
            if slowdown:  # by CPU time: the work done, however long other processes kept this one waiting
                time.sleep(slowdown * (time.thread_time() - c0))
            run.compute_s.append((t1 - t0) + (time.perf_counter() - t2))
            run.wait_s.append(t2 - t1)
        run.finals = steps.finish()
    run.cpu_s = time.thread_time() - cpu0
    return run


def output_layout(adapter: Adapter) -> dict[str, tuple[int, torch.dtype]]:
    """Name -> (width, dtype) of every position-wise output of the model's head: what a device sends back
    for a request, known before any request (a device that failed sends zeros in this layout)."""
    model = adapter.model
    param = next(model.parameters())
    with torch.inference_mode():
        probe = adapter.final(torch.zeros(1, 1, adapter.geometry.hidden, dtype=param.dtype, device=param.device))
    return {name: (int(t.shape[-1]), t.dtype) for name, t in probe.items()}


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
        cpu_s=run.cpu_s, peak_rss_kib=peak_rss_kib(), error=run.error or "",
    )


__all__ = ["Containment", "DeviceRun", "Fault", "InjectedFault", "describe_error", "device_report", "output_layout", "run_device"]
