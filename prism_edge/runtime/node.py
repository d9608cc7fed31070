"""One device process: the per-request layer loop (shared by rank 0 and the workers) and the worker's serve loop.

The loop runs exactly the simulator's DeviceExecutor; only the communicator differs.  Per layer:

  post receives  ->  attention input (and K/V for a kv payload)  ->  the outgoing means  ->  send
  ->  while the means travel: own Q/K/V and attention over the own keys  ->  wait for the means
  ->  attention over the received keys, log-sum-exp merge with the own part  ->  MLP
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
from . import protocol
from .device import DeviceExecutor
from .simulator import plan_for
from .stats import FlopTally
from .transport import TAG_HEADER, TAG_INPUT, TAG_META, TAG_OUTPUT, TAG_STATS, DeviceLost, DistCommunicator

FAULT_ENV = "PRISM_EDGE_FAULT"  # testing aid: "RANK:die@LAYER" or "RANK:hang@LAYER" (first request only)


@dataclass
class DeviceRun:
    finals: dict[str, Tensor]
    cpu_s: float = 0.0  # this thread's CPU time for the request (time.thread_time)
    compute_s: list[float] = field(default_factory=list)  # per layer
    wait_s: list[float] = field(default_factory=list)
    tally: FlopTally | None = None
    executor: DeviceExecutor | None = None  # kept for decoding (GENERATE)


def _fault(rank: int) -> tuple[str, int] | None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    who, _, what = spec.partition(":")
    kind, _, layer = what.partition("@")
    if not who.isdigit() or int(who) != rank or kind not in ("die", "hang") or not layer.isdigit():
        return None
    return kind, int(layer)


def _inject(fault: tuple[str, int] | None, layer: int) -> None:
    if fault is None or fault[1] != layer:
        return
    if fault[0] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # hang: alive but silent, as a stuck device would be
        time.sleep(3600)


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
    fault: tuple[str, int] | None = None,
    keep_cache: bool = False,
) -> DeviceRun:
    """This process's device for one request: embed, every layer with its exchange, the head.

    plan, batch and local inputs arrive on the CPU; they move to the model's device here.
    """
    rank = comm.rank
    device = next(adapter.model.parameters()).device
    if device.type != "cpu":
        plan, batch = plan.to(device), batch.to(device)
        local = {k: v.to(device) for k, v in local.items()}
    dev = DeviceExecutor(adapter, plan, rank, cfg, batch)
    dev.keep_cache = keep_cache
    tally = FlopTally(count_flops)
    run = DeviceRun(finals={}, tally=tally, executor=dev)
    cpu0 = time.thread_time()
    with torch.inference_mode():
        x = tally.run("embed", rank, dev.embed, local)
        for i in range(adapter.geometry.layers):
            _inject(fault, i)
            t0 = time.perf_counter()
            expected = dev.expected()
            posted = comm.post_layer(i, expected)
            state, outgoing = tally.run(i, rank, dev.send, i, x)
            if not overlap:  # the plain order: all of the layer's projections before anything is sent
                tally.run(i, rank, dev.project, state)
            comm.send_layer(i, outgoing)
            # overlap: while the messages travel, Q/K/V of the own rows and attention over them
            own = tally.run(i, rank, dev.attend_own, i, state) if overlap and dev.in_routes else None
            t1 = time.perf_counter()
            incoming = comm.collect_layer(i, posted, expected)
            t2 = time.perf_counter()
            x = tally.run(i, rank, dev.receive, i, state, incoming, own)
            run.compute_s.append((t1 - t0) + (time.perf_counter() - t2))
            run.wait_s.append(t2 - t1)
        run.finals = tally.run("head", rank, dev.final, x)
    run.cpu_s = time.thread_time() - cpu0
    return run


def peak_rss_kib() -> int:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    except (ImportError, OSError):
        return -1


def stats_tensor(comm: DistCommunicator, run: DeviceRun, layers: int) -> Tensor:
    """A worker's own numbers for rank 0: per layer [sent, received, flops, compute ns, wait ns], then
    a totals row [input bytes, output bytes, all flops, thread CPU ns, peak resident memory KiB]."""
    rank, ledger, tally = comm.rank, comm.ledger, run.tally
    t = torch.zeros(layers + 1, 5, dtype=torch.int64)
    for i in range(layers):
        flops = tally.counts.get((i, rank), 0) if tally and tally.enabled else -1
        t[i] = torch.tensor([ledger.sent(i, rank), ledger.received(i, rank), flops,
                             int(run.compute_s[i] * 1e9), int(run.wait_s[i] * 1e9)])
    total = sum(v for (_, r), v in tally.counts.items() if r == rank) if tally and tally.enabled else -1
    t[layers] = torch.tensor([ledger.received("input", rank), ledger.sent("output", rank), total,
                              int(run.cpu_s * 1e9), peak_rss_kib()])
    return t


def decode_on_last_device(adapter: Adapter, comm: DistCommunicator, run: DeviceRun, length: int) -> None:
    """GENERATE on the last rank: take the decode parameters, then stream each new token id to rank 0."""
    from .generate import Generation, decode_loop, decode_request
    from .transport import TAG_GENERATE

    params = comm.recv("control", 0, [torch.zeros(16, dtype=torch.float64)], TAG_GENERATE, "decode parameters",
                       count=False)[0]
    max_new, sampling, stops = decode_request(params)
    sent = [0]

    def stream(tid: int) -> None:
        comm.isend("decode", 0, [torch.tensor([tid], dtype=torch.int64)], TAG_GENERATE + 1 + sent[0], "new token")
        sent[0] += 1

    with torch.inference_mode():
        logits = run.finals["logits"][:, -1]
        decode_loop(adapter, run.executor, logits, length, max_new, sampling, stops,
                    Generation(prompt_ids=torch.zeros(1, 0, dtype=torch.long)), stream)
    comm.isend("decode", 0, [torch.tensor([-1], dtype=torch.int64)], TAG_GENERATE + 1 + sent[0], "end of generation")
    comm.flush()


def serve_worker(adapter: Adapter, cfg: PrismConfig, comm: DistCommunicator, *, overlap: bool = True,
                 count_flops: bool = False, log=None) -> None:
    """Rank > 0: wait for requests from rank 0 until it says stop.

    Rank 0 sends a heartbeat header whenever it is idle, so silence longer than the timeout means
    the coordinator died or hung: DeviceLost.
    """
    rank, layers, causal = comm.rank, adapter.geometry.layers, adapter.geometry.causal
    cfg = cfg.resolved(adapter.kind)
    fault = _fault(rank)
    served = 0
    while True:
        raw = comm.recv("control", 0, [protocol.empty_header()], TAG_HEADER, "request header (heartbeat)", count=False)
        header = protocol.Header.decode(raw[0])
        if header.op == protocol.PING:
            continue
        if header.op == protocol.SHUTDOWN:
            if log:
                log(f"rank {rank}: shut down by rank 0 after {served} request(s)")
            return
        comm.reset()
        meta = comm.recv("input", 0, protocol.meta_buffers(header), TAG_META, "request plan data")
        batch = protocol.batch_from_meta(header, meta)
        plan = plan_for(batch, cfg, causal)
        rows = comm.recv("input", 0, protocol.input_buffers(header, plan, rank), TAG_INPUT, "request inputs")
        local = protocol.local_inputs(header, batch, plan, rank, rows)
        generating = header.op == protocol.GENERATE
        run = run_device(adapter, cfg, plan, batch, local, comm, overlap=overlap, count_flops=count_flops,
                         fault=fault if served == 0 else None, keep_cache=generating and rank == comm.world - 1)
        if not generating:
            comm.isend("output", 0, protocol.output_tensors(run.finals, plan, rank, header.mode), TAG_OUTPUT,
                       "outputs")
        comm.isend("control", 0, [stats_tensor(comm, run, layers)], TAG_STATS, "statistics", count=False)
        comm.flush()
        if generating and rank == comm.world - 1:
            decode_on_last_device(adapter, comm, run, header.length)
        served += 1


__all__ = ["DeviceLost", "DeviceRun", "run_device", "serve_worker", "stats_tensor", "FAULT_ENV"]
