"""Rank 0's side of one request: check it, send every device its slice, run device 0, gather the answer.

Everything that can be wrong with a request is found in `prepare`, before any device hears of it, so
a bad request fails with a ValueError and leaves the cluster as it was.  A device that still fails inside
the request (a bug, out of memory) finishes its exchange with zeros and says so in its report
(cluster.node): rank 0 then raises RequestError, naming the rank, and the cluster serves the next request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import RunConfig
from ..models import Adapter
from ..models.base import Batch
from ..models.loading import IMAGE_TYPES
from ..partition.plan import Plan
from ..partition.stages import StageLayout
from ..planning import Candidate, Choice, Drift, Planner, candidate_config, check_fidelity
from ..runtime import wire
from ..models.parts import held_bytes
from .node import DeviceRun, describe_error, device_report, output_layout, run_device
from ..runtime.simulator import PrismOutput
from ..runtime.stages import layout_for, stage_plans
from ..runtime.stats import DeviceReport, Stats
from ..runtime.wire import TAG_HEADER, TAG_INPUT, TAG_META, TAG_OUTPUT, TAG_STATS
from .transport import DistCommunicator
from .errors import RequestError

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass(frozen=True)
class Request:
    batch: Batch
    plan: Plan  # the first stage's (every device's, with one stage): it embeds the inputs and returns the outputs
    plans: list[Plan]  # every pipeline stage's
    cfg: RunConfig  # the config this request runs under (its own budget; a generation's prefill budget)
    header: wire.Header
    messages: list[tuple[list[Tensor], list[Tensor]]]  # per rank 1..world-1: what it is sent (plan data, inputs)
    local: dict[str, Tensor]  # device 0's own inputs
    layout: StageLayout  # the request's stages over ranks 0..world-1
    choice: Choice | None = None  # the planner's pick (None: the plan was given)

    @property
    def world(self) -> int:
        """Devices taking part: ranks 0..world-1 (the others sit the request out)."""
        return self.layout.world


def check_inputs(inputs: dict[str, Tensor | None], family: str) -> dict[str, Tensor]:
    """Only tensors, only the inputs this family reads, at least one sequence; images as float32 (the wire's)."""
    given = {k: v for k, v in inputs.items() if v is not None}
    for name, value in given.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a torch tensor, got {type(value).__name__}; use return_tensors='pt'")
    takes = ("pixel_values",) if family in IMAGE_TYPES else TEXT_INPUTS
    extra = sorted(set(given) - set(takes))
    if extra:
        raise ValueError(f"{family} models take {', '.join(takes)}; drop {', '.join(extra)}")
    ids = given.get("input_ids")
    if ids is not None and ids.dim() >= 1 and ids.shape[0] == 0:
        raise ValueError("input_ids holds no sequence (a batch of 0); send at least one")
    pixels = given.get("pixel_values")
    if pixels is not None and pixels.is_floating_point():
        given["pixel_values"] = pixels.to(torch.float32)  # patches travel as float32
    return given


def request_config(cfg: RunConfig, header: wire.Header) -> RunConfig:
    """The config one request runs under: on the devices, under the scheme and at the budget its header names
    (the config's where it names none); a generation's prefill at the generation budget.  Rank 0 and every
    taking-part worker derive it alike from the header."""
    cand = Candidate(header.devices or cfg.effective_devices, header.scheme or cfg.scheme, header.budget)
    if cand.devices == 1:
        return candidate_config(cfg, cand)
    cfg = candidate_config(cfg, Candidate(cand.devices, cand.scheme)).with_budget(header.budget)
    return cfg.for_generation() if header.op == wire.GENERATE else cfg


def request_layout(layout: StageLayout, cfg: RunConfig, layers: int) -> StageLayout:
    """The stages of one request: the group's own when its devices hold only their layers, else one stage of
    the request's devices."""
    return layout if layout.staged else StageLayout.single(cfg.effective_devices, layers)


def check_plan(plan: Candidate | str | None, world: int, staged: bool) -> Candidate | None:
    """A request's plan as given (None: the config on every device), checked against the cluster."""
    if plan is None or plan == "fixed":
        return None
    if not isinstance(plan, Candidate):
        raise ValueError(f"plan must be 'auto', 'fixed' or a Candidate, got {plan!r}")
    if not 1 <= plan.devices <= world:
        raise ValueError(f"plan devices must be 1..{world} (the devices of this cluster), got {plan.devices}")
    if staged and plan.devices != world:
        raise ValueError(f"this cluster's devices hold only their pipeline stage's layers: every request runs on "
                         f"all {world}; drop the plan's devices")
    if plan.scheme not in wire.PLAN_SCHEMES:
        raise ValueError(f"plan scheme must be one of {', '.join(wire.PLAN_SCHEMES)}, got {plan.scheme!r}")
    return plan


class Coordinator:
    """Runs requests on a group whose rank 0 is this process (comm); one at a time (the caller locks).

    in_flight is True from the first byte sent for a request until its exchange is complete: an error
    that escapes while it is set leaves the devices out of step (the cluster must go down); any other
    leaves them ready for the next request."""

    def __init__(self, adapter: Adapter, cfg: RunConfig, comm: DistCommunicator, *, overlap: bool,
                 count_flops: bool, plan: str = "fixed", fidelity: str | float = "high") -> None:
        """plan, fidelity: what a request runs under unless it says (LaunchSpec's)."""
        self.adapter, self.cfg, self.comm = adapter, cfg, comm
        self.overlap, self.count_flops = overlap, count_flops
        self.requests = 0
        self.layout = output_layout(adapter)
        self.stages = layout_for(cfg, adapter)
        self.param_bytes = held_bytes(adapter.model)
        self.in_flight = False
        self.planner: Planner | None = None  # set once the start-up probes ran (plan auto)
        self.plan, self.fidelity = plan, check_fidelity(fidelity)
        self.drift = Drift()
        self.ping_every = comm.timeout / 3

    @property
    def world(self) -> int:
        return self.comm.world

    def prepare(self, inputs: dict[str, Tensor | None], outputs: str, op: int = wire.FORWARD,
                budget: float | None = None, plan: Candidate | str | None = None,
                fidelity: str | float | None = None) -> Request:
        """Validate a request on rank 0, plan it and build every device's message (ValueError: nothing was sent).
        budget: the request's own byte budget (None: the config's; every device derives the same plan).
        plan: "fixed" runs the config on every device; a Candidate runs that; "auto" asks the planner for the
        fastest candidate at `fidelity` (a budget given with it is the fidelity); None: the coordinator's plan
        and fidelity."""
        batch = self.batch(inputs, outputs)
        choice, cand = _resolve(self, batch, outputs, op, budget, plan, fidelity)
        if cand is not None and cand.budget is not None:
            budget = cand.budget
        header = dataclasses.replace(wire.request_header(batch, 0, outputs), op=op,  # numbered when sent
                                     budget_ppm=wire.budget_ppm(budget),
                                     devices=cand.devices if cand is not None else 0,
                                     scheme=cand.scheme if cand is not None and cand.scheme != self.cfg.scheme else "")
        cfg = request_config(self.cfg, header)  # the plan as every worker reads it from the header
        layout = request_layout(self.stages, cfg, self.adapter.geometry.layers)
        est = choice.estimate if choice is not None else None
        plans = (list(est.plans) if est is not None and est.config == cfg and est.plans
                 else stage_plans(batch, cfg, self.adapter.geometry, layout))  # the planner's, when it made them
        plan0 = plans[0]
        messages = [(wire.meta_tensors(batch, header), wire.input_tensors(batch, plan0, p) if p < plan0.world else [])
                    for p in range(1, layout.world)]
        return Request(batch, plan0, plans, cfg, header, messages, batch.gather(plan0.devices[0].index), layout,
                       choice)

    def resolve(self, inputs: dict[str, Tensor | None], outputs: str, op: int = wire.FORWARD,
                budget: float | None = None, plan: Candidate | str | None = None,
                fidelity: str | float | None = None) -> tuple[Choice | None, Candidate | None]:
        """What `prepare` would run the request on, checking it the same way, without building its messages:
        the planner's choice (None: the plan was given) and the candidate (None: the config on every device).
        Safe beside a running request (a server groups requests by it)."""
        return _resolve(self, self.batch(inputs, outputs), outputs, op, budget, plan, fidelity)

    def batch(self, inputs: dict[str, Tensor | None], outputs: str = "all") -> Batch:
        """The request's inputs checked and prepared (ValueError: what is wrong with them), as `prepare` reads them."""
        if not isinstance(outputs, str) or outputs not in wire.OUTPUT_MODES:
            raise ValueError(f"unknown outputs {outputs!r}; choose one of {', '.join(wire.OUTPUT_MODES)}")
        given = check_inputs(inputs, self.adapter.family)
        try:
            batch = self.adapter.prepare(**given, sink_token_ids=self.cfg.sink_token_ids)
        except (TypeError, RuntimeError, IndexError) as err:  # odd dtypes or shapes the checks did not foresee
            raise ValueError(f"the request's inputs cannot be read: {' '.join(str(err).split())}") from None
        n_pos = self.adapter.position_limit()
        if n_pos and self.adapter.family not in IMAGE_TYPES and int(batch.positions.max()) >= n_pos:
            raise ValueError(f"position {int(batch.positions.max())} is beyond the model's {n_pos} positions; "
                             f"truncate the input to {n_pos} tokens")
        return batch

    def start(self, req: Request, keep_cache: bool = False) -> DeviceRun:
        """Send every other device its header, plan data and slice; then run device 0's share."""
        self.comm.reset()
        self.requests += 1
        header = dataclasses.replace(req.header, request=self.requests)
        self.in_flight = True
        for p, (meta, rows) in enumerate(req.messages, start=1):
            self.comm.isend("control", p, [header.encode()], TAG_HEADER, "request header", count=False)
            self.comm.isend("input", p, meta, TAG_META, "request plan data")
            self.comm.isend("input", p, rows, TAG_INPUT, "request inputs")
        return run_device(self.adapter, req.cfg, req.plans, req.layout, req.batch, req.local, self.comm,
                          overlap=self.overlap, count_flops=self.count_flops, keep_cache=keep_cache,
                          outputs=req.header.mode, tick=self.pinger(req))

    def sitting_out(self, req: Request) -> list[int]:
        """The workers a request leaves out: they wait for the next header and must be kept awake."""
        return list(range(req.world, self.world))

    def pinger(self, req: Request) -> Callable[[], None] | None:
        """For rank 0's layer loop: a heartbeat to the workers sitting the request out, every ping_every s."""
        idle = self.sitting_out(req)
        if not idle:
            return None
        last = [time.monotonic()]

        def tick() -> None:
            if time.monotonic() - last[0] > self.ping_every:
                self.tell(wire.PING, idle, "heartbeat")
                last[0] = time.monotonic()
        return tick

    def worker_reports(self, req: Request) -> list[DeviceReport]:
        """Every taking-part worker's own numbers for the request, rank order."""
        layers = self.adapter.geometry.layers
        raw = [self.comm.recv("control", p, [wire.report_buffer(layers)], TAG_STATS, "statistics", count=False)[0]
               for p in range(1, req.world)]
        return [wire.report_from(t) for t in raw]

    def stats(self, run: DeviceRun, workers: list[DeviceReport], t0: float) -> Stats:
        """Rank 0's report (taken last: it includes the pooler's FLOPs) and the workers', as the request's Stats."""
        own = device_report(self.comm, run, self.adapter.geometry.layers, self.param_bytes)
        return Stats.from_reports([own, *workers], time.perf_counter() - t0)

    @staticmethod
    def failures(run: DeviceRun, workers: list[DeviceReport]) -> list[tuple[int, str]]:
        """(rank, what failed) for every device that failed inside the request, rank 0 first."""
        return ([(0, run.error)] if run.error else []) + [(p, r.error) for p, r in enumerate(workers, 1) if r.error]

    def settle(self, run: DeviceRun, workers: list[DeviceReport]) -> None:
        """The request's exchange is complete: the devices are in step again.  RequestError if one failed in it."""
        self.in_flight = False
        failures = self.failures(run, workers)
        if failures:
            raise RequestError(failures, trace=run.trace)

    def forward(self, req: Request) -> PrismOutput:
        t0 = time.perf_counter()
        run = self.start(req)
        mode, plan = req.header.mode, req.plan
        own_mode = "all" if mode == "pooled" else mode  # the pooler reads rank 0's rows
        finals = run.finals if run.error is None else wire.zero_finals(self.layout, plan, 0)
        parts = [wire.output_tensors(finals, plan, 0, own_mode)]
        for p in range(1, plan.world):  # the first stage's devices hold the head
            bufs = wire.output_buffers(self.layout, plan, p, mode)
            parts.append(self.comm.recv("output", p, bufs, TAG_OUTPUT, "outputs"))
        workers = self.worker_reports(req)
        self.comm.flush()
        self.settle(run, workers)
        try:
            result = self._outputs(parts, sorted(self.layout), req, run)
        except Exception as err:  # rank 0's own last step (the pooler): the devices are in step already
            raise RequestError([(0, describe_error(err, "assembling the outputs"))],
                               trace=traceback.format_exc()) from None
        stats = self.stats(run, workers, t0)
        return PrismOutput(**result, stats=stats, plan=req.plan, planned=self.planned(req, stats))

    def planned(self, req: Request, stats: Stats | None) -> dict[str, Any]:
        """What ran (the planner's pick, or the fixed plan), its predicted time and the measured one; the measured
        time is checked against the prediction (drift: the probes run again between requests)."""
        if req.choice is not None:
            info = req.choice.to_dict()
            if stats is not None and stats.wall_s is not None:
                self.drift.observe(req.choice.estimate.seconds, stats.wall_s)
        else:
            info = {"plan": "given" if req.header.devices else "fixed", "devices": req.world,
                    "scheme": req.cfg.scheme, "budget": req.header.budget, "predicted_ms": None}
        info["measured_ms"] = round((stats.wall_s or 0.0) * 1e3, 1) if stats is not None else None
        return info

    def _outputs(self, parts: list[list[Tensor]], names: list[str], req: Request, run: DeviceRun) -> dict[str, Tensor]:
        mode, plan, length = req.header.mode, req.plan, req.batch.valid.shape[1]
        if mode not in ("all", "pooled"):
            return wire.assemble(parts, names, plan, mode, length)
        if mode == "pooled":  # only rank 0's rows are here, and the pooler reads position 0 (rank 0's)
            parts = [parts[0]] + [[t.new_zeros(int(sl.owned.sum()), t.shape[-1]) for t in parts[0]]
                                  for sl in plan.devices[1:]]
        full = wire.assemble(parts, names, plan, "all", length)
        device = next(self.adapter.model.parameters()).device
        assert run.tally is not None
        with torch.inference_mode():  # rank 0's work, counted as in simulate
            pooled = run.tally.run("head", 0, self.adapter.pool, {k: v.to(device) for k, v in full.items()})
        pooled = {k: v.cpu() for k, v in pooled.items()}
        return pooled if mode == "pooled" else {**full, **pooled}

    def tell(self, op: int, ranks: Sequence[int], what: str) -> None:
        """Send a bare control header (heartbeat, shutdown) to `ranks` and wait until it has gone out."""
        for p in ranks:
            self.comm.isend("control", p, [wire.Header(op).encode()], TAG_HEADER, what, count=False)
        self.comm.flush()


def _resolve(co: "Coordinator", batch: Batch, outputs: str, op: int, budget: float | None,
             plan: Candidate | str | None, fidelity: str | float | None) -> tuple[Choice | None, Candidate | None]:
    """The planner's choice (None: the plan was given) and the candidate (None: the config on every device)."""
    co.cfg.with_budget(budget)  # refuses a bad budget before the header quantises it
    choice, plan = None, co.plan if plan is None else plan
    if fidelity is not None and plan != "auto":
        raise ValueError(f"fidelity {fidelity!r} is what a planned request may trade, but this request runs "
                         "its plan as given; start the cluster with --plan auto (plan='auto'), or drop fidelity")
    fidelity = co.fidelity if fidelity is None else check_fidelity(fidelity)
    if plan == "auto":
        if co.planner is None:
            raise ValueError("plan 'auto' needs the start-up probes: start the cluster with plan='auto' "
                             "(--plan auto)")
        choice = co.planner.choose(batch, outputs, budget if budget is not None else fidelity, op == wire.GENERATE)
        plan = choice.candidate
    return choice, check_plan(plan, co.world, co.stages.staged)
