"""Rank 0's planner over a cluster's life: built from the start-up probes, rebuilt when the probes run again.

The probes run again (every device, between requests, never during one) when the measured request times drifted
from the model's predictions for several requests in a row (planning.Drift), at most every REPROBE_MIN_S.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..cluster.spec import LaunchSpec
from ..config import RunConfig
from ..models import Adapter
from ..planning import ModelCost, Planner, Profile
from ..runtime import wire
from ..runtime.stages import layout_for
from .coordinator import Coordinator
from .probes import probe_profile

REPROBE_MIN_S = 60.0  # the probes run again at most this often, and only between requests


class Replanner:
    """The planner a coordinator plans with (plan auto), and when its probes are due again."""

    def __init__(self, coordinator: Coordinator, adapter: Adapter, cfg: RunConfig, spec: LaunchSpec,
                 profile: Profile | None, log: Callable[[str], None]) -> None:
        self.coordinator, self.adapter, self.cfg, self.spec, self.log = coordinator, adapter, cfg, spec, log
        if spec.plan == "auto" and profile is None:  # one device: nothing to agree on, its speed still counts
            profile = probe_profile(None, 0, 1, adapter, cfg, spec.startup_timeout)
        if profile is not None:
            coordinator.planner = Planner(cfg, ModelCost.of(adapter), profile, layout_for(cfg, adapter))
        self.probed = time.monotonic()

    @property
    def due(self) -> bool:
        return self.coordinator.drift.drifted and time.monotonic() - self.probed > REPROBE_MIN_S

    def reprobe(self) -> None:
        """Every device runs the probes again (the caller holds the cluster's lock: no request is running)."""
        coord = self.coordinator
        planner = coord.planner
        if planner is None:
            raise ValueError("this cluster does not plan (start it with plan='auto'): there is nothing to re-probe")
        coord.tell(wire.PROBE, range(1, coord.world), "probe")
        profile = probe_profile(coord.comm.group, 0, coord.world, self.adapter, self.cfg, self.spec.startup_timeout,
                                log=self.log)
        coord.planner = Planner(self.cfg, planner.cost, profile, planner.layout)
        coord.drift.reset()
        self.probed = time.monotonic()
