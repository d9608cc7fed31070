"""A Cluster's read-only views: its settings, its processes, and the whole of it as one JSON-able document."""

from __future__ import annotations

import dataclasses
import os
from typing import Any


class ClusterViews:
    """What a Cluster shows of itself (mixed into cluster.Cluster, whose attributes these read)."""

    spec: Any
    coordinator: Any
    workers: Any
    adapter: Any
    model: Any
    cfg: Any
    world: int
    device: Any
    _broken: str | None
    _closed: bool

    model_name = property(lambda self: self.spec.model)
    threads = property(lambda self: self.spec.threads)
    timeout = property(lambda self: self.spec.timeout)
    overlap = property(lambda self: self.spec.overlap)
    count_flops = property(lambda self: self.spec.count_flops)
    requests = property(lambda self: self.coordinator.requests)

    @property
    def pids(self) -> dict[int, int]:
        return {0: os.getpid(), **self.workers.pids}

    @property
    def alive(self) -> bool:
        return not (self._broken or self._closed)

    def describe(self) -> dict[str, Any]:
        g = self.adapter.geometry
        return {"model": self.model_name, "class": type(self.model).__name__, "devices": self.world,
                "layers": g.layers, "hidden": g.hidden, "config": dataclasses.asdict(self.cfg),
                "threads": self.threads, "timeout_s": self.timeout, "overlap": self.overlap, "device": str(self.device),
                "auto_weights": self.spec.auto_weights, "requests": self.requests, "alive": self.alive,
                "error": self._broken, "plan": self.spec.plan, "fidelity": self.spec.fidelity,
                "profile": self.profile.to_dict() if self.profile is not None else None}

    def resolve(self, inputs: dict[str, Any], outputs: str = "all", budget: float | None = None,
                fidelity: str | float | None = None) -> tuple[Any, Any]:
        """What a forward request would run on, checked as a request is (ValueError), without running it and
        without waiting for the running one: the planner's Choice (None: the plan is fixed) and the Candidate
        (None: the config on every device).  A server groups concurrent requests by it."""
        return self.coordinator.resolve(inputs, outputs, budget=budget, fidelity=fidelity)

    planner = property(lambda self: self.coordinator.planner)  # plan auto: the planner, else None
    profile = property(lambda self: self.planner.profile if self.planner is not None else None)  # what the probes saw
