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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import RunConfig
from ..models import Adapter
from ..models.parts import first_held
from ..models.base import Batch
from ..partition.plan import Plan
from ..partition.stages import StageLayout
from ..runtime import wire
from ..runtime.device import DeviceExecutor
from ..runtime.loop import Containment, Forward, describe_error
from ..runtime.stages import handoff_expected, handoff_messages, handoff_rows, ring_keep
from ..runtime.stats import STAGE, DeviceReport, FlopTally, peak_rss_kib
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
    compute_s: list[float] = field(default_factory=list)  # per model layer (0 for another stage's)
    wait_s: list[float] = field(default_factory=list)
    tally: FlopTally | None = None
    executor: DeviceExecutor | None = None  # kept for decoding (GENERATE)


def run_device(
    adapter: Adapter,
    cfg: RunConfig,
    plans: list[Plan],
    layout: StageLayout,
    batch: Batch,
    local: dict[str, Tensor],
    comm: DistCommunicator,
    *,
    overlap: bool = True,
    count_flops: bool = False,
    fault: Fault | None = None,
    keep_cache: bool = False,
    slowdown: float = 0.0,
    outputs: str = "all",
    tick: Callable[[], None] | None = None,
) -> DeviceRun:
    """This process's device for one request: embed (first stage) or take the previous stage's rows, every layer
    of its stage with its exchange, hand the rows on; the first stage then takes the last stage's rows back
    (the ring) and runs the head.  plans: every stage's plan (runtime.stages.stage_plans); one stage: [plan].

    plan, batch and local inputs arrive on the CPU; they move to the model's device here.  slowdown
    (a testing aid for heterogeneous devices): after each layer, sleep `slowdown` times the CPU time the
    layer took, so 1.0 makes this device run at half speed; the sleep counts as compute.  A failure inside
    the request leaves `error` set and `finals` empty, with every message of the request exchanged (_Loop).
    outputs `last` (the request's output mode): only the last device of the first stage runs the head, on each
    sequence's last row, and the last stage hands back only those rows.  tick: called after every layer (rank 0
    keeps the devices that sit the request out awake with it).
    """
    device = first_held(adapter.model).device
    st = layout.stage_of(comm.rank)
    if device.type != "cpu":
        plans, batch = [p.to(device) for p in plans], batch.to(device)
        local = {k: v.to(device) for k, v in local.items()}
    plan, offset = plans[st.index], st.first_rank
    dev = DeviceExecutor(adapter, plan, comm.rank - offset, cfg, batch, layers=st.layers)
    dev.keep_cache = keep_cache
    run = DeviceRun(tally=FlopTally(count_flops), executor=dev)
    assert run.tally is not None
    steps = Forward(dev, local, run.tally, overlap=overlap, contain=run, strike=fault.strike if fault else None,
                    rank=comm.rank)
    hand = _Handoff(layout, plans, comm, dev, adapter, ring_keep(batch.valid, outputs)) if layout.staged else None
    run.compute_s, run.wait_s = [0.0] * adapter.geometry.layers, [0.0] * adapter.geometry.layers  # per model layer
    cpu0 = time.thread_time()
    with torch.inference_mode():
        if hand is not None:
            hand.post()  # before anything: the previous stage's rows (and for the first stage, the ring's)
        steps.start() if st.index == 0 else steps.resume(hand.take(run) if hand is not None else None)
        for i in st.layers:
            _layer(i, dev, steps, comm, run, offset, fault, slowdown)
            if tick is not None:
                tick()
        if hand is not None:
            hand.give(steps.x)
            if st.index == 0:
                steps.resume(hand.take(run))
        if st.index == 0 and (outputs != "last" or dev.rank == plan.world - 1):  # `last`: the last rows only
            run.finals = steps.finish(wire.last_rows(plan, dev.rank) if outputs == "last" else None)
    run.cpu_s = time.thread_time() - cpu0
    return run


def _layer(i: int, dev: DeviceExecutor, steps: Forward, comm: DistCommunicator, run: DeviceRun, offset: int,
           fault: Fault | None, slowdown: float) -> None:
    """Layer i on this device, its exchange with the devices of its stage (global ranks from `offset`) timed."""
    t0, c0 = time.perf_counter(), time.thread_time()
    if fault is not None:
        fault.strike(i, "start")
    expected = {offset + s: parts for s, parts in dev.expected().items()}
    posted = comm.post_layer(i, expected)  # before computing anything: gloo sends go out once posted
    comm.send_layer(i, {offset + d: m for d, m in steps.send(i).items()})
    steps.meanwhile(i)
    t1 = time.perf_counter()
    incoming = comm.collect_layer(i, posted, expected)
    t2 = time.perf_counter()
    steps.receive(i, {s - offset: m for s, m in incoming.items()})
    if slowdown:  # by CPU time: the work done, however long other processes kept this one waiting
        time.sleep(slowdown * (time.thread_time() - c0))
    run.compute_s[i] = (t1 - t0) + (time.perf_counter() - t2)
    run.wait_s[i] = t2 - t1


class _Handoff:
    """This device's stage boundaries in one request: the rows it takes from the previous stage (the first
    stage: from the last, for the head) and the rows it hands the next, every byte counted under "stage"."""

    def __init__(self, layout: StageLayout, plans: list[Plan], comm: DistCommunicator, dev: DeviceExecutor,
                 adapter: Adapter, ring: Tensor | None = None) -> None:
        """ring: the positions the last stage hands back to the first (None: all)."""
        self.layout, self.plans, self.comm, self.dev = layout, plans, comm, dev
        self.stage = layout.stage_of(comm.rank)
        self.src = layout.stages[self.stage.index - 1]  # the first stage's rows come back from the last
        self.dst = layout.next_stage(self.stage)
        self.width, self.dtype = adapter.geometry.hidden, first_held(adapter.model).dtype
        self.take_keep = ring if self.stage.index == 0 else None  # what comes back to the first stage
        self.give_keep = ring if self.dst.index == 0 else None  # what the last stage hands back
        self.expected = handoff_expected(plans[self.src.index], self.src, plans[self.stage.index], dev.rank,
                                         self.width, self.dtype, self.take_keep)
        self.posted: dict = {}
        # a whole pipeline may run before the rows come back: allow every stage its time
        self.deadline_s = comm.timeout * len(layout.stages)

    def post(self) -> None:
        self.posted = {src: self.comm.irecv(src, [torch.empty(s, dtype=d) for s, d in parts], wire.TAG_STAGE_ROWS,
                                            "stage hand-off rows")
                       for src, parts in self.expected.items()}

    def take(self, run: DeviceRun) -> Tensor | None:
        deadline = time.monotonic() + self.deadline_s
        incoming = {}
        for src, works in self.posted.items():
            self.comm.wait_recv(STAGE, src, works, "stage hand-off rows", deadline)
            incoming[src] = [buf for _, buf in works]
        like = torch.empty(1, self.width, dtype=self.dtype, device=self.dev.slice.index.device)
        return run.attempt("taking the previous stage's rows", handoff_rows, incoming, self.plans[self.src.index],
                           self.src, self.plans[self.stage.index], self.dev.rank, like, self.take_keep)

    def give(self, x: Tensor | None) -> None:
        me, to = self.plans[self.stage.index], self.plans[self.dst.index]
        if x is None:  # failed here: zeros of the planned shapes keep the request in step
            x = torch.zeros(*me.devices[self.dev.rank].index.shape, self.width, dtype=self.dtype)
        for g, message in handoff_messages(x, me, self.dev.rank, to, self.dst, self.give_keep).items():
            self.comm.isend(STAGE, g, message, wire.TAG_STAGE_ROWS, "stage hand-off rows")


def output_layout(adapter: Adapter) -> dict[str, tuple[int, torch.dtype]]:
    """Name -> (width, dtype) of every position-wise output of the model's head: what a device sends back
    for a request, known before any request (a device that failed sends zeros in this layout)."""
    param = first_held(adapter.model)
    with torch.inference_mode():
        probe = adapter.final(torch.zeros(1, 1, adapter.geometry.hidden, dtype=param.dtype, device=param.device))
    return {name: (int(t.shape[-1]), t.dtype) for name, t in probe.items()}


def device_report(comm: DistCommunicator, run: DeviceRun, layers: int, param_bytes: int = 0) -> DeviceReport:
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
        stage_sent=ledger.sent(STAGE, rank), stage_received=ledger.received(STAGE, rank), param_bytes=param_bytes,
    )


__all__ = ["Containment", "DeviceRun", "Fault", "InjectedFault", "describe_error", "device_report", "output_layout",
           "run_device"]
