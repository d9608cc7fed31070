"""What the probes measured: every device's speed and memory, every link's latency and rate.

A Profile is plain data (frozen dataclasses, JSON both ways), built at start-up by cluster/probes.py from
timed runs on every device and timed gloo transfers between every pair, and read by the cost model
(planning/cost.py).  Nothing here measures anything.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


def _positive(name: str, value: float, zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            not (value >= 0 if zero else value > 0):
        raise ValueError(f"{name} must be a finite number {'>= 0' if zero else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class DeviceProfile:
    """One device process as its probe found it."""

    rank: int
    host: str  # which machine: devices on one host share its cores
    cores: int  # CPUs this process may run on
    threads: int  # torch threads it computes with
    flops_per_s: float  # sustained speed on the model's layers (the probe's slope)
    layer_s: float  # per layer and request, whatever the positions (Python, kernel launches: the intercept)
    free_mib: float  # memory available on its host at the probe
    probe_ms: tuple[float, ...] = ()  # ms of one layer at each probe length, as measured (the fastest)

    def __post_init__(self) -> None:
        _positive("flops_per_s", self.flops_per_s)
        _positive("layer_s", self.layer_s, zero=True)
        _positive("free_mib", self.free_mib, zero=True)
        if self.cores < 1 or self.threads < 1:
            raise ValueError(f"cores and threads must be >= 1, got {self.cores} and {self.threads}")


@dataclass(frozen=True)
class LinkProfile:
    """The link from device `src` to device `dst` (measured both ways at once: taken as symmetric)."""

    src: int
    dst: int
    latency_s: float  # one way: half a small message's round trip
    mbit: float  # rate of a large transfer, after its latency

    def __post_init__(self) -> None:
        _positive("latency_s", self.latency_s, zero=True)
        _positive("mbit", self.mbit)

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes * 8 / (self.mbit * 1e6)


@dataclass(frozen=True)
class Profile:
    """Every device and every pair of devices of a group (rank order), and what the probes cost."""

    devices: tuple[DeviceProfile, ...]
    links: tuple[LinkProfile, ...] = ()
    probe_s: float = 0.0  # wall time of all the probes together

    def __post_init__(self) -> None:
        if not self.devices or [d.rank for d in self.devices] != list(range(len(self.devices))):
            raise ValueError("a profile needs every device, ranks 0..P-1 in order")
        world = len(self.devices)
        pairs = {(min(link.src, link.dst), max(link.src, link.dst)) for link in self.links}
        missing = [(p, q) for p in range(world) for q in range(p + 1, world) if (p, q) not in pairs]
        if missing:
            raise ValueError(f"a profile needs every pair's link; missing {missing[:4]}")

    @property
    def world(self) -> int:
        return len(self.devices)

    def link(self, p: int, q: int) -> LinkProfile:
        for link in self.links:
            if {link.src, link.dst} == {p, q}:
                return link
        raise KeyError(f"no link between {p} and {q}")

    def contention(self, ranks: range | list[int]) -> list[float]:
        """Per device of `ranks` computing at once: how much slower than alone, as the devices on a host share its
        cores (threads beyond the cores queue)."""
        load: dict[str, int] = {}
        for p in ranks:
            load[self.devices[p].host] = load.get(self.devices[p].host, 0) + self.devices[p].threads
        return [max(1.0, load[self.devices[p].host] / self.devices[p].cores) for p in ranks]

    def to_dict(self) -> dict[str, Any]:
        return {"devices": [dataclasses.asdict(d) for d in self.devices],
                "links": [dataclasses.asdict(link) for link in self.links], "probe_s": self.probe_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Profile":
        devices = tuple(DeviceProfile(**{**d, "probe_ms": tuple(d.get("probe_ms", ()))}) for d in data["devices"])
        return cls(devices, tuple(LinkProfile(**link) for link in data.get("links", ())), data.get("probe_s", 0.0))

    def describe(self) -> list[str]:
        """One line per device, then one per link."""
        lines = [f"device {d.rank}: {d.flops_per_s / 1e9:.1f} GFLOP/s + {d.layer_s * 1e3:.2f} ms per layer, "
                 f"{d.threads} thread(s) on {d.cores} core(s) of host {d.host}, {d.free_mib:,.0f} MiB free"
                 for d in self.devices]
        lines += [f"link {link.src}-{link.dst}: {link.latency_s * 1e3:.2f} ms one way, {link.mbit:,.0f} Mbit/s"
                  for link in self.links]
        return lines
