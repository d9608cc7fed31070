"""The cost model: how long a candidate plan will take for one request, before it runs.

A request's time is rank 0's fixed work, then every layer in turn, then the head:

  layer   the slowest device's compute, then its exchange: the latency of the slowest link it uses, plus the
          larger of the bytes it sends and receives over its link's rate (the bytes exactly as the plan will
          send them: every route's message shapes, at the request's wire).
  compute per device and layer: its probed intercept (Python, kernel launches) plus the layer's FLOPs over its
          probed speed.  FLOPs: 2 x the layer's parameters per row it computes, 4 x heads x head_dim per (query,
          key) pair (own rows and received slots), the top-k scoring of every route it sends.  Devices that share
          a host share its cores: a device runs `contention` times slower while the others compute.
  fixed   rank 0 turning the inputs into a plan and messages, and with several devices the inputs going out, the
          outputs and reports coming back (a latency each) and the per-device messaging overhead.
  stages  each stage's layers on its own group, its rows handed to the next stage over the slowest link between
          them (and, for the first stage's head, back).

What the probes do not measure (Constants) was fitted on this machine's measurements (`prism-edge bench plan`,
docs/RESULTS.md §8) and is scaled by each device's own probed speed and each link's probed latency.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..models import Adapter
from ..models.base import Batch, Geometry
from ..models.parts import part_bytes
from ..partition.plan import Plan
from ..partition.stages import StageLayout
from ..runtime.device import exchange_layout
from ..runtime.stages import stage_config, stage_plans
from .profile import Profile

@dataclass(frozen=True)
class Constants:
    """What the probes do not measure, fitted on this machine's measurements (`prism-edge bench plan`, MiniLM and
    the BERT-base shape; SmolLM2 held out: docs/RESULTS.md §8).  Overheads are in units of the device's own probed
    per-layer intercept, so they scale with its speed; trips in units of the link's probed one-way latency."""

    # fitted values (the fit set two to 0: the probed intercepts already cover rank 0's own work per request)
    exchange_overhead: float = 0.347  # per layer and route a device sends or takes: building, merging, gloo calls
    layer_trips: float = 1.38  # one-way latencies per layer's exchange (gloo: the receive is posted, then data)
    request_overhead: float = 0.0  # rank 0's fixed work per request: validating, planning, embedding, reports
    device_overhead: float = 0.0  # per extra device and request: its header, inputs, outputs and report
    request_trips: float = 13.051  # one-way latencies per request with several devices: inputs out, outputs,
    # reports and statuses back, each a gloo rendezvous


CONSTANTS = Constants()
MEMORY_SHARE = 0.8  # of a host's free memory (at the probe) a request's activations may take


@dataclass(frozen=True)
class ModelCost:
    """What the cost model needs of a model: its geometry, and FLOPs per row, per key pair, per head row."""

    geo: Geometry
    layer_flops: float  # per row and layer: the projections and the MLP
    pair_flops: float  # per (query, key) pair and layer: scores and the weighted sum
    head_flops: float  # per row that runs the head (the LM head's matrix; 0 for an encoder's last norm)
    param_bytes: int  # the whole model as loaded
    itemsize: int  # bytes per value of the hidden rows (stage hand-offs)

    @classmethod
    def of(cls, adapter: Adapter) -> "ModelCost":
        parts, geo = part_bytes(adapter.model), adapter.geometry
        dtype = next(iter(adapter.model.parameters())).dtype
        item = torch.empty((), dtype=dtype).element_size()
        per_layer = sum(parts.layers) / max(1, len(parts.layers)) / item
        head = 2.0 * adapter.vocab_size() * geo.hidden if adapter.head == "lm" else 0.0
        return cls(geo, 2.0 * per_layer, 4.0 * geo.heads * geo.head_dim, head, parts.total, item)

    def probe_flops(self, positions: int) -> float:
        """One layer over one sequence of `positions` on one device."""
        return positions * self.layer_flops + positions * positions * self.pair_flops


@dataclass(frozen=True)
class Estimate:
    """A candidate's predicted time, in parts (seconds), and what it sends."""

    seconds: float
    compute_s: float  # the layers' compute on the slowest device, summed over layers
    exchange_s: float  # the layers' exchanges and the stage hand-offs
    fixed_s: float  # rank 0's fixed work, the messaging of inputs and outputs, the head
    exchange_bytes: int  # per request, every layer, every device (what the ledger will count)
    peak_bytes: int = 0  # the largest activation memory one host needs for the request (all its devices)
    fits: bool = True  # within MEMORY_SHARE of every host's free memory at the probe (unknown free memory: True)
    # what it was computed from (not part of the prediction): the config and every stage's plan, which the request
    # then runs with instead of planning again
    config: RunConfig | None = dataclasses.field(default=None, compare=False, repr=False)
    plans: tuple[Plan, ...] = dataclasses.field(default=(), compare=False, repr=False)

    def to_dict(self) -> dict[str, float]:
        """Times in ms (rounded), bytes as counted."""
        return {f.name: (round(getattr(self, f.name) * 1e3, 2) if f.name.endswith("_s") or f.name == "seconds"
                         else getattr(self, f.name)) for f in dataclasses.fields(self) if f.compare}


def route_bytes(plan: Plan, cfg: RunConfig, geo: Geometry, wire: str) -> dict[tuple[int, int], int]:
    """Bytes of every route's message in one layer, (src, dst) -> bytes: the shapes the executor sends."""
    _, codec, width = exchange_layout(cfg, geo, wire)
    out = {}
    for r in plan.routes:
        out[(r.src, r.dst)] = sum(torch.Size(s).numel() * d.itemsize for s, d in codec.expected(r, width))
    return out


def _device_flops(plan: Plan, p: int, cost: ModelCost) -> float:
    sl = plan.devices[p]
    batch, rows = sl.index.shape
    keys = rows + sum(r.width for r in plan.routes_to(p))
    scoring = sum(batch * r.observe.shape[1] * r.cand.shape[1] for r in plan.routes_from(p) if r.k_max > 0)
    return batch * rows * cost.layer_flops + batch * rows * keys * cost.pair_flops + scoring * cost.pair_flops / 2


def _group_layer(plan: Plan, cfg: RunConfig, cost: ModelCost, profile: Profile, ranks: list[int], wire: str,
                 contention: dict[int, float], k: Constants) -> tuple[float, float, int]:
    """(compute s, exchange s, bytes) of one layer on one PRISM group whose devices are `ranks`."""
    bytes_ = route_bytes(plan, cfg, cost.geo, wire) if plan.world > 1 else {}
    compute, exchange = 0.0, 0.0
    for p, rank in enumerate(ranks):
        dev = profile.devices[rank]
        routes = sum(1 for (s, d) in bytes_ if p in (s, d))
        work = dev.layer_s * (1 + k.exchange_overhead * routes) + _device_flops(plan, p, cost) / dev.flops_per_s
        compute = max(compute, work * contention[rank])
        if routes:
            links = [profile.link(rank, ranks[q]) for q in range(plan.world) if q != p]
            out = sum(b for (s, _), b in bytes_.items() if s == p)
            into = sum(b for (_, d), b in bytes_.items() if d == p)
            rate = min(link.mbit for link in links) * 1e6 / 8
            exchange = max(exchange, k.layer_trips * max(link.latency_s for link in links) + max(out, into) / rate)
    return compute, exchange, sum(bytes_.values())


def estimate(batch: Batch, cfg: RunConfig, cost: ModelCost, profile: Profile, layout: StageLayout,
             outputs: str = "all", plans: list[Plan] | None = None, constants: Constants = CONSTANTS) -> Estimate:
    """The predicted time of one request (`batch`, output mode `outputs`) under `cfg` laid out as `layout` on the
    devices of `profile` (ranks 0.. as the layout numbers them)."""
    plans = plans if plans is not None else stage_plans(batch, cfg, cost.geo, layout)
    wire = cfg.wire_for(batch.longest)
    used = list(range(sum(st.devices for st in layout.stages)))
    share = dict(zip(used, profile.contention(used)))
    compute = exchange = 0.0
    sent = 0
    for st, plan in zip(layout.stages, plans):
        ranks = list(st.ranks)
        # a stage computes while the others wait: only its own devices share their hosts' cores
        stage_share = dict(zip(ranks, profile.contention(ranks))) if layout.staged else share
        c, e, b = _group_layer(plan, stage_config(cfg, st), cost, profile, ranks, wire, stage_share, constants)
        compute, exchange, sent = compute + c * len(st.layers), exchange + e * len(st.layers), sent + b * len(st.layers)
    exchange += _handoffs(batch, layout, cost, profile, outputs, constants)
    rank0 = profile.devices[0]
    fixed = rank0.layer_s * (constants.request_overhead + constants.device_overhead * (len(used) - 1))
    if len(used) > 1:  # inputs out, outputs and reports back
        fixed += constants.request_trips * max(profile.link(0, q).latency_s for q in used[1:])
    fixed += _head_rows(batch, plans[0], outputs) * cost.head_flops / rank0.flops_per_s * share[0]
    peak, fits = _memory(batch, layout, plans, cost, profile, outputs)
    return Estimate(compute + exchange + fixed, compute, exchange, fixed, int(sent), peak, fits, cfg, tuple(plans))


def _memory(batch: Batch, layout: StageLayout, plans: list[Plan], cost: ModelCost, profile: Profile,
            outputs: str) -> tuple[int, bool]:
    """(the most activation bytes one host needs, whether every host has them within MEMORY_SHARE of its free
    memory).  Per device and layer: every weight matrix's output for each row it computes, the attention scores
    over its own rows and received slots; on the first stage the head's outputs.  Summed over the devices of a
    host (and over stages: an upper bound)."""
    head = _head_rows(batch, plans[0], outputs) * cost.head_flops / (2 * cost.geo.hidden) * 4  # float32 outputs
    per_row = cost.layer_flops / 2 / cost.geo.hidden  # values a row's layer writes: every weight matrix's width
    need: dict[str, float] = {}
    for st, plan in zip(layout.stages, plans):
        for p, rank in enumerate(st.ranks):
            sl = plan.devices[p]
            b, rows = sl.index.shape
            keys = rows + sum(r.width for r in plan.routes_to(p))
            act = cost.itemsize * (b * rows * per_row + b * cost.geo.heads * rows * keys) + (head if st.index == 0
                                                                                             else 0.0)
            host = profile.devices[rank].host
            need[host] = need.get(host, 0.0) + act
    free = {d.host: d.free_mib * 2**20 for d in profile.devices}
    fits = all(not free[h] or n <= MEMORY_SHARE * free[h] for h, n in need.items())
    return int(max(need.values())), fits


def _head_rows(batch: Batch, plan: Plan, outputs: str) -> int:
    """Rows the head runs on, on its busiest device: each sequence's last for `last`, else the largest slice."""
    if outputs == "last":
        return int(batch.valid.shape[0])
    return max(int(sl.index.numel()) for sl in plan.devices)


def _handoffs(batch: Batch, layout: StageLayout, cost: ModelCost, profile: Profile, outputs: str,
              k: Constants) -> float:
    """Seconds of the hidden rows crossing every stage boundary (and back to the first stage for the head)."""
    if not layout.staged:
        return 0.0
    rows = int(batch.valid.numel())
    back = int(batch.valid.shape[0]) if outputs == "last" else rows
    seconds = 0.0
    stages = layout.stages
    for i, st in enumerate(stages):
        nxt = stages[(i + 1) % len(stages)]
        links = [profile.link(p, q) for p in st.ranks for q in nxt.ranks if p != q]
        n = back if nxt.index == 0 else rows
        if links:
            rate = min(link.mbit for link in links) * 1e6 / 8
            seconds += k.layer_trips * max(link.latency_s for link in links) + n * cost.geo.hidden * cost.itemsize / rate
    return seconds
