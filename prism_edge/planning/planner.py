"""Choosing each request's plan: the fastest candidate that keeps the fidelity asked for and fits memory.

Candidates, for a group of P devices that each hold the whole model: the first k ranks for every k in 1..P
(rank 0 holds the inputs, so it always takes part; the others sit the request out), slices weighted by the
agreed device speeds, at the requested fidelity:

  exact     one device, or several exchanging every row as itself (Voltage, float32): the full model's answer.
  high      the configured fidelity (the kind's defaults unless options were given): what `--plan fixed` runs.
  balanced  the smallest byte budget whose fidelity on held-out data (prism_edge/data/frontiers.json) still
            meets BALANCED_FLOORS at the request's length; the configured one where none measured does.
  a number  that byte budget (a fraction of Voltage's bytes).

One device is exact at any fidelity.  A group with pipeline stages (devices holding only their layers) has
one layout: only the fidelity is chosen.  Among candidates within PREFER_FEWER of the fastest prediction the
one with the fewest devices wins: the model's error is of that order, and fewer devices is the safer bet.  A
candidate whose activations would not fit its hosts' free memory (cost.MEMORY_SHARE of it, at the probe) is not
run; a request no candidate fits is refused with a ValueError.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..config import RunConfig
from ..frontiers import predict
from ..models.base import Batch
from ..partition.stages import StageLayout
from .cost import CONSTANTS, MEMORY_SHARE, Estimate, ModelCost, estimate
from .profile import Profile

FIDELITIES = ("exact", "high", "balanced")
# what `balanced` keeps, per fidelity metric of the frontiers (held-out data, P=4): embeddings within 0.99
# cosine of the full model's, perplexity within 2 %, image labels agreeing on 97 %
BALANCED_FLOORS = {"cosine": 0.99, "perplexity_increase": 0.02, "agreement": 0.97}
PREFER_FEWER = 0.05  # a plan with more devices must be predicted this much faster than one with fewer
RECENT = 256  # choices remembered by request shape (a server sees many: each sentence length, each batch)


def check_fidelity(value: Any, name: str = "fidelity") -> str | float:
    """`exact`, `high`, `balanced` or a byte budget in (0, 1] (as a string from a flag, or a number)."""
    if isinstance(value, str) and value in FIDELITIES:
        return value
    try:
        budget = float(value)
    except (TypeError, ValueError):
        budget = -1.0
    if isinstance(value, bool) or not 0 < budget <= 1:
        raise ValueError(f"{name} must be one of {', '.join(FIDELITIES)} or a byte budget in (0, 1], got {value!r}")
    return budget


@dataclass(frozen=True)
class Candidate:
    """One way to run a request: on ranks 0..devices-1, under a scheme, at a byte budget (None: the config's)."""

    devices: int
    scheme: str = "prism"
    budget: float | None = None

    @property
    def label(self) -> str:
        if self.devices == 1:
            return "1 device"
        extra = "" if self.scheme == "prism" and self.budget is None else (
            f", {self.scheme}" if self.scheme != "prism" else f", budget {self.budget:g}")
        return f"{self.devices} devices{extra}"


@dataclass(frozen=True)
class Choice:
    """The planner's pick for one request, with every candidate it weighed (fastest prediction first)."""

    candidate: Candidate
    estimate: Estimate
    fidelity: str | float
    considered: tuple[tuple[Candidate, Estimate], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.candidate.label, "devices": self.candidate.devices, "scheme": self.candidate.scheme,
                "budget": self.candidate.budget, "fidelity": self.fidelity,
                "predicted_ms": round(self.estimate.seconds * 1e3, 1),
                "candidates": {c.label: round(e.seconds * 1e3, 1) for c, e in self.considered}}


class Planner:
    """Rank 0's planner for one group: its resolved config, the model's costs, the probed profile, its layout."""

    def __init__(self, cfg: RunConfig, cost: ModelCost, profile: Profile, layout: StageLayout) -> None:
        if profile.world != cfg.effective_devices:
            raise ValueError(f"the profile has {profile.world} devices but the config {cfg.effective_devices}")
        self.cfg, self.cost, self.profile, self.layout = cfg, cost, profile, layout
        self._recent: OrderedDict[tuple, Choice] = OrderedDict()  # the last choices, by request shape
        self._lock = threading.Lock()  # a server plans requests in its threads beside the running one

    def scheme_budget(self, fidelity: str | float, length: int) -> tuple[str, float | None]:
        """(scheme, budget) of a distributed candidate at `fidelity` for inputs of `length` positions."""
        cfg = self.cfg
        if fidelity == "exact":
            return "voltage", None
        if isinstance(fidelity, float):
            return "prism", fidelity
        if fidelity == "balanced" and cfg.scheme == "prism":
            return "prism", balanced_budget(cfg, length)
        return cfg.scheme, None

    def candidates(self, fidelity: str | float, length: int) -> list[Candidate]:
        scheme, budget = self.scheme_budget(fidelity, length)
        world = self.cfg.effective_devices
        if self.layout.staged:  # devices hold only their layers: the one layout
            return [Candidate(world, scheme, budget)]
        return [Candidate(1, "full")] + [Candidate(k, scheme, budget) for k in range(2, world + 1)]

    def config_for(self, cand: Candidate) -> RunConfig:
        """The config a candidate runs under (what every taking-part device derives from the request header)."""
        return candidate_config(self.cfg, cand)

    def layout_for(self, cand: Candidate) -> StageLayout:
        return self.layout if self.layout.staged else StageLayout.single(cand.devices, self.cost.geo.layers)

    def weigh(self, batch: Batch, cand: Candidate, outputs: str) -> Estimate:
        return estimate(batch, self.config_for(cand), self.cost, self.profile, self.layout_for(cand), outputs)

    def choose(self, batch: Batch, outputs: str, fidelity: str | float = "high",
               generating: bool = False) -> Choice:
        """The fastest candidate for this request (within PREFER_FEWER, the one with the fewest devices).  A
        candidate whose compute alone, spread perfectly over its devices, could not win is not planned at all
        (building a plan costs milliseconds: short requests would pay more for planning than they gain)."""
        key = (hashlib.sha1(batch.valid.cpu().numpy().tobytes() + batch.sink.cpu().numpy().tobytes()).hexdigest(),
               tuple(batch.valid.shape), outputs, fidelity, generating)
        with self._lock:
            if key in self._recent:  # the same shape again (a server's traffic repeats): the same plan, no planning
                self._recent.move_to_end(key)
                return self._recent[key]
            choice = self._choose(batch, outputs, fidelity, generating)
            self._recent[key] = choice
            if len(self._recent) > RECENT:
                self._recent.popitem(last=False)
            return choice

    def _choose(self, batch: Batch, outputs: str, fidelity: str | float, generating: bool) -> Choice:
        length = batch.longest
        considered: list[tuple[Candidate, Estimate]] = []
        for cand in self.candidates(fidelity, length):
            if cand.devices > length:
                continue  # every device needs a position
            fitting = [e.seconds for _, e in considered if e.fits]
            if fitting and self.lower_bound(batch, cand) > min(fitting):
                continue
            cfg = self.config_for(cand)
            if generating and cand.devices > 1:
                cfg = cfg.for_generation()
            considered.append((cand, estimate(batch, cfg, self.cost, self.profile, self.layout_for(cand), outputs)))
        considered.sort(key=lambda ce: ce[1].seconds)
        fit = [ce for ce in considered if ce[1].fits]
        if not fit:
            least = min(e.peak_bytes for _, e in considered) / 2**20
            free = min(d.free_mib for d in self.profile.devices)
            raise ValueError(f"no plan fits this request in memory: its activations need at least {least:,.0f} MiB "
                             f"on a device, {MEMORY_SHARE:.0%} of the {free:,.0f} MiB free is the limit; send fewer "
                             "or shorter sequences")
        best = fit[0][1].seconds
        pick = min((ce for ce in fit if ce[1].seconds <= best * (1 + PREFER_FEWER)),
                   key=lambda ce: (ce[0].devices, ce[1].seconds))
        return Choice(pick[0], pick[1], fidelity, tuple(considered))

    def lower_bound(self, batch: Batch, cand: Candidate) -> float:
        """Less than the candidate can take: the layers' FLOPs spread evenly over its devices at their best
        speed, plus the latencies the model charges whatever the bytes (every layer's exchange, the request's)."""
        if self.layout.staged or cand.devices == 1:
            return 0.0
        rows, length = batch.valid.shape
        flops = rows * length * self.cost.layer_flops * self.cost.geo.layers
        fastest = max(d.flops_per_s for d in self.profile.devices[:cand.devices])
        latency = min(self.profile.link(0, q).latency_s for q in range(1, cand.devices))
        k = CONSTANTS
        return flops / (cand.devices * fastest) + latency * (k.layer_trips * self.cost.geo.layers + k.request_trips)


def candidate_config(cfg: RunConfig, cand: Candidate) -> RunConfig:
    """`cfg` on the first `cand.devices` ranks under the candidate's scheme and budget (one device: scheme full)."""
    if cand.devices == cfg.effective_devices and cand.scheme == cfg.scheme and cand.budget is None:
        return cfg
    if cand.devices == 1:
        return cfg.replace(devices=1, weights=None, scheme="full", stages=1, stage_devices=None, layer_split=None,
                           memory_budget=None)
    weights = cfg.weights[:cand.devices] if cfg.weights is not None else None
    out = cfg.replace(devices=cand.devices, weights=weights)
    if cand.scheme != cfg.scheme:
        out = out.settings.replace(scheme=cand.scheme, wire_dtype=None if cand.scheme != "prism" else
                                   out.wire_dtype).resolve(cfg.kind)
    return out.with_budget(cand.budget)


def balanced_budget(cfg: RunConfig, length: int) -> float | None:
    """The smallest measured budget whose predicted fidelity at `length` meets its floor, if below the config's."""
    current = cfg.budget or 1.0
    for budget in (0.05, 0.1, 0.15, 0.2, 0.25):
        if budget >= current:
            return None
        pred = predict(cfg.kind, budget, length)
        if pred is None or pred.metric not in BALANCED_FLOORS:
            continue
        floor = BALANCED_FLOORS[pred.metric]
        if (pred.value >= floor) if pred.higher_is_better else (pred.value <= floor):
            return budget
    return None


def speed_weights(profile: Profile, ranks: int | None = None, tolerance: float = 0.15) -> tuple[float, ...] | None:
    """Slice weights from the probed speeds (relative, the slowest 1.0, 3 significant digits); None (equal
    slices) when every device is within `tolerance` of the others: noise, not a faster device."""
    speeds = [d.flops_per_s for d in profile.devices[:ranks]]
    if max(speeds) <= min(speeds) * (1 + tolerance):
        return None
    return tuple(float(f"{s / min(speeds):.3g}") for s in speeds)




class Drift:
    """Whether the devices or links drifted from the profile: the planned requests' measured times were, `window`
    requests in a row, more than `factor` times the model's prediction (plus `slack_s`), or under 1/factor of it.
    (Whole requests, not the exchange waits alone: with overlap the last device to finish waits for nothing, and
    the first waits for the others' compute too, so neither wait reads the wire.)"""

    def __init__(self, window: int = 3, factor: float = 2.0, slack_s: float = 0.01) -> None:
        self.window, self.factor, self.slack_s = window, factor, slack_s
        self.run = 0  # requests in a row off the model

    def observe(self, predicted_s: float, measured_s: float) -> None:
        off = measured_s > self.factor * predicted_s + self.slack_s or measured_s + self.slack_s < predicted_s / self.factor
        self.run = self.run + 1 if off else 0

    @property
    def drifted(self) -> bool:
        return self.run >= self.window

    def reset(self) -> None:
        self.run = 0


__all__ = ["BALANCED_FLOORS", "Candidate", "Choice", "Drift", "FIDELITIES", "Planner", "balanced_budget",
           "candidate_config", "check_fidelity", "speed_weights"]
