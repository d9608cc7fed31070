"""A device process of rank > 0 (`prism-edge worker`, `python -m prism_edge.worker`, torchrun): join, serve.

Rank 0 is the coordinator and device 0: it runs a Cluster that joins the group instead of spawning
(and then serves HTTP or runs the request flags).  Every other rank joins, loads the model, takes
part in the start-up agreement (handshake, --weights auto) and then serves rank 0 until told to stop.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from transformers.utils import logging as hf_logging

from ..config import PrismConfig, RunConfig
from ..models import Adapter, adapter_for
from .stageload import load_for_rank, take_weights, to_device
from ..runtime import wire
from ..models.parts import held_bytes
from .node import Fault, device_report, output_layout, run_device
from .rendezvous import Endpoint
from ..runtime.stages import layout_for, stage_plans
from ..runtime.wire import TAG_HEADER, TAG_INPUT, TAG_META, TAG_OUTPUT, TAG_STATS
from .transport import DeviceLost, DistCommunicator
from .liveness import exit_lost
from . import env
from .coordinator import request_config, request_layout
from .generation import serve_generation
from .startup import agree, meet
from .probes import probe_profile
from .spec import LaunchSpec


@dataclass(frozen=True)
class Seat:
    """Where this process sits in the group: its rank, the group's size and where the group meets."""

    rank: int
    world: int
    master: str  # rank 0's HOST:PORT
    bind: str | None = None
    iface: str | None = None
    agent_store: bool = False  # torchrun's agent hosts the rendezvous store

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"need 0 <= --rank < --world-size (or torchrun's RANK/WORLD_SIZE); got rank {self.rank}, "
                             f"world size {self.world}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Seat":
        """The flags, with torchrun's environment filling in what they leave out."""
        rank, world, master, agent = env.torchrun_seat()
        rank = args.rank if args.rank is not None else rank
        world = args.world_size if args.world_size is not None else world
        return cls(-1 if rank is None else rank, 0 if world is None else world, args.master or master, args.bind,
                   args.iface, agent)

    def endpoint(self) -> Endpoint:
        return Endpoint.parse(self.master, self.bind, self.iface, self.agent_store)


def serve_rank(seat: Seat, spec: LaunchSpec, cfg: PrismConfig, fault: Fault | None = None,
               slowdown: float = 0.0) -> int:
    """Rank > 0: join, load the model, agree with the others, serve.  A lost peer ends the process with code 3."""
    hf_logging.disable_progress_bar()  # one "Loading weights" bar (rank 0's) is enough
    endpoint = seat.endpoint()
    group, live = meet(endpoint, seat.rank, seat.world, spec, agent_store=seat.agent_store)
    try:
        loaded = (take_weights(group, spec, seat.rank, seat.world, spec.fetch_weights)
                  or load_for_rank(spec.model, spec.cache_dir, cfg, seat.rank))
        to_device(loaded.model, spec.torch_device())
        adapter = adapter_for(loaded.model)
        # as rank 0 does: resolved once, here; the handshake compares resolved configs
        agreed = agree(group, seat.rank, seat.world, loaded.model, adapter, cfg.resolve(adapter.kind), spec, slowdown)
    except BaseException:
        live.stop()
        group.shutdown()
        raise
    live.watch(lambda reason: exit_lost(seat.rank, reason))  # any rank lost: leave at once, code 3
    comm = DistCommunicator(group, seat.rank, seat.world, spec.timeout)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if spec.verbose else None
    try:
        def reprobe(c: DistCommunicator) -> None:  # rank 0 plans with its own copy of the profile
            probe_profile(c.group, c.rank, c.world, adapter, agreed.cfg, spec.startup_timeout, slowdown)

        serve_worker(adapter, agreed.cfg, comm, overlap=spec.overlap, count_flops=spec.count_flops,
                     fault=fault, slowdown=slowdown, log=log, reprobe=reprobe if spec.plan == "auto" else None)
    except DeviceLost as err:
        # the group is broken and may hold stuck operations: tell the others, report and leave at once
        exit_lost(seat.rank, live.tell(str(err)))
    except Exception:  # a bug or a resource error mid-request: the peers see a closed connection
        traceback.print_exc()
        live.tell(f"rank {seat.rank} failed (an error, not a lost peer: see its traceback)")
        print(f"prism-edge: error: rank {seat.rank} failed (traceback above); stopping", file=sys.stderr, flush=True)
        os._exit(1)
    live.leave()
    comm.close()
    return 0


def serve_worker(adapter: Adapter, cfg: RunConfig, comm: DistCommunicator, *, overlap: bool = True,
                 count_flops: bool = False, fault: Fault | None = None, slowdown: float = 0.0,
                 log: Callable[[str], None] | None = None,
                 reprobe: Callable[[DistCommunicator], None] | None = None) -> None:
    """Rank > 0: wait for requests from rank 0 until it says stop.

    Rank 0 sends a heartbeat header whenever it is idle, so silence longer than the timeout means the
    coordinator died or hung: DeviceLost.  fault (testing) strikes in its request only.  A failure
    inside a request (cluster.node) is reported to rank 0 and the worker serves the next one.  A request
    header names the devices taking part: a worker left out hears nothing of it but heartbeats.  reprobe:
    what a PROBE header runs (the start-up probes again, with every other rank).
    """
    rank, layers = comm.rank, adapter.geometry.layers
    stages = layout_for(cfg, adapter)
    heads = output_layout(adapter) if stages.stage_of(rank).index == 0 else {}  # the first stage holds the head
    param_bytes = held_bytes(adapter.model)
    served = 0
    while True:
        raw = comm.recv("control", 0, [wire.empty_header()], TAG_HEADER, "request header (heartbeat)", count=False)
        header = wire.Header.decode(raw[0])
        if header.op == wire.PING:
            continue
        if header.op == wire.SHUTDOWN:
            if log:
                log(f"rank {rank}: shut down by rank 0 after {served} request(s)")
            return
        if header.op == wire.PROBE:
            if reprobe is not None:
                reprobe(comm)
            continue
        comm.reset()
        batch = wire.batch_from_meta(header, comm.recv("input", 0, wire.meta_buffers(header), TAG_META,
                                                           "request plan data"))
        run_cfg = request_config(cfg, header)
        layout = request_layout(stages, run_cfg, layers)
        plans = stage_plans(batch, run_cfg, adapter.geometry, layout)
        plan = plans[0]
        first = layout.stage_of(rank).index == 0
        local = {}
        if first:
            rows = comm.recv("input", 0, wire.input_buffers(header, plan, rank), TAG_INPUT, "request inputs")
            local = wire.local_inputs(header, batch, plan, rank, rows)
        generating, strike = header.op == wire.GENERATE, fault if fault is not None and fault.request == served + 1 else None
        run = run_device(adapter, run_cfg, plans, layout, batch, local, comm, overlap=overlap,
                         count_flops=count_flops, keep_cache=generating, slowdown=slowdown, outputs=header.mode,
                         fault=strike)
        if run.error is not None:
            _report(rank, run.error, run.trace)
        if not generating and first:
            finals = run.finals if run.error is None else wire.zero_finals(heads, plan, rank)
            comm.isend("output", 0, wire.output_tensors(finals, plan, rank, header.mode), TAG_OUTPUT,
                       "outputs")
        report = device_report(comm, run, layers, param_bytes)
        comm.isend("control", 0, [wire.report_tensor(report)], TAG_STATS, "statistics", count=False)
        comm.flush()
        if generating:
            decoded = serve_generation(comm, run, layout, strike)
            if decoded.error is not None:
                _report(rank, decoded.error, decoded.trace)
        served += 1


def _report(rank: int, error: str, trace: str | None) -> None:
    """A failure inside one request, on this worker's stderr (rank 0 reports it to the user)."""
    if trace and os.environ.get(env.DEBUG_ENV):
        print(trace, file=sys.stderr, end="", flush=True)
    print(f"prism-edge: rank {rank}: request failed {error}; serving the next one", file=sys.stderr, flush=True)
