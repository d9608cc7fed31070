"""Start-up probes (`--plan auto`): every device's speed and memory, every link's latency and rate.

  compute  each device alone (one after the other: devices sharing a machine would slow each other's probe) runs
           PROBE_LAYERS of its model over two request sizes, in rounds that run both sizes, after a warm-up, and
           keeps each size's fastest layer (another program's burst of work only slows a layer down, so the
           fastest is the device's own speed), adding rounds within a bound while those are not yet trusted;
           a line through the two (seconds against FLOPs) gives its speed (the slope) and its per-layer intercept.
  memory   MemAvailable of its host; which host it is (hostname and boot id) and how many cores it may use.
  links    every pair of devices, in rounds where each device has one partner: round trips of a tiny message
           (latency: half the median) and of LINK_BYTES (rate: the extra time of the larger payload).

Every rank all-gathers every rank's numbers as JSON bytes, so each holds the same Profile (prism_edge.planning);
rank 0 re-runs the probes between requests when the measured times drift from the model (cluster/replan.py).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..models import Adapter
from ..models.loading import hf_config
from ..models.parts import first_held
from ..planning.cost import ModelCost
from ..planning.profile import DeviceProfile, LinkProfile, Profile
from ..runtime.device import DeviceExecutor
from ..runtime.loop import Forward
from ..runtime.stages import layout_for, plan_for
from ..runtime.stats import FlopTally
from .calibrate import probe_in_turn
from .transport import DeviceLost, all_gather_bytes, exchange_int, ping_pong

PROBE_LAYERS = 2  # layers per run, each timed apart: enough to average a layer, few enough for a Raspberry Pi's start-up
PROBE_SIZES = (32, 128)  # positions of the two text requests (images: 1 and 4 images)
PROBE_ROUNDS = 3  # timed rounds after a warm-up; a round runs every size once, so a burst of load hits all sizes
PROBE_MORE = 2.0  # rounds added while the times are not yet trusted, for at most this many times the first rounds'
CONFIRM = 1.1  # a size's fastest layer is trusted once another layer time lies within 10 % of it
LINK_ROUNDS = 3  # timed round trips per payload, after one warm-up
LINK_BYTES = 64 * 1024  # the first payload of the rate probe
LINK_MAX_BYTES = 4 * 2**20
LINK_TARGET_S = 0.02  # one way, for the second payload


def _inputs(adapter: Adapter, size: int, small: bool) -> dict[str, torch.Tensor]:
    cfg = hf_config(adapter.model)
    if adapter.family in ("vit", "dinov2"):
        side = cfg.image_size if adapter.family == "vit" else cfg.patch_size * 8
        return {"pixel_values": torch.zeros(1 if small else 4, cfg.num_channels, side, side)}
    n = min(size, adapter.position_limit() or size)
    return {"input_ids": (torch.arange(n) % adapter.vocab_size()).unsqueeze(0)}


class ProbeSize:
    """One probe size: a one-device request of `inputs` through `layers`, prepared once and run again and again;
    every layer's seconds are kept (a burst of load on the machine only ever makes one slower)."""

    def __init__(self, adapter: Adapter, cfg: RunConfig, layers: range, inputs: dict[str, torch.Tensor],
                 slowdown: float) -> None:
        self.one = cfg.replace(devices=1, weights=None, scheme="full", stages=1, stage_devices=None, layer_split=None,
                               memory_budget=None)
        self.adapter, self.layers, self.slowdown = adapter, layers, slowdown
        self.batch = adapter.prepare(**inputs)
        self.plan = plan_for(self.batch, self.one, adapter.geometry)
        self.local = self.batch.gather(self.plan.devices[0].index)
        rows = self.batch.valid.shape[1]
        self.start = torch.zeros(self.batch.valid.shape[0], rows, adapter.geometry.hidden,
                                 dtype=first_held(adapter.model).dtype)
        self.flops = self.batch.valid.shape[0] * ModelCost.of(adapter).probe_flops(rows)
        self.times: list[float] = []

    def run(self, keep: bool = True) -> None:
        with torch.inference_mode():
            dev = DeviceExecutor(self.adapter, self.plan, 0, self.one, self.batch, layers=self.layers)
            steps = Forward(dev, self.local, FlopTally(False))
            steps.resume(self.start.clone())
            for j in self.layers:
                t0, c0 = time.perf_counter(), time.thread_time()
                steps.send(j)
                steps.meanwhile(j)
                steps.receive(j, {})
                if self.slowdown:  # the testing aid of heterogeneous devices, as in a request (cluster.node)
                    time.sleep(self.slowdown * (time.thread_time() - c0))
                if keep:
                    self.times.append(time.perf_counter() - t0)

    def trusted(self) -> bool:
        """Another layer time within CONFIRM of the fastest: the fastest is the device's, not a lucky timer."""
        fast = sorted(self.times)
        return len(fast) >= 2 and fast[1] <= CONFIRM * fast[0]


def time_sizes(adapter: Adapter, cfg: RunConfig, layers: range, inputs: list[dict[str, torch.Tensor]],
               slowdown: float = 0.0) -> list[tuple[float, float]]:
    """(seconds of one layer, its FLOPs) per request in `inputs`: the fastest layer of PROBE_ROUNDS rounds after a
    warm-up, each round running every request once.  While a size's fastest time is not trusted or the times do
    not grow with the FLOPs (a load came and went), more rounds, within PROBE_MORE times the first rounds' time."""
    return measure([ProbeSize(adapter, cfg, layers, x, slowdown) for x in inputs])


def measure(sizes: list[ProbeSize]) -> list[tuple[float, float]]:
    """time_sizes's rounds over prepared sizes: (fastest layer seconds, FLOPs) per size."""
    for size in sizes:
        size.run(keep=False)
    t0 = time.perf_counter()
    for _ in range(PROBE_ROUNDS):
        for size in sizes:
            size.run()
    end = time.perf_counter() + PROBE_MORE * (time.perf_counter() - t0)
    while not _plausible(sizes) and time.perf_counter() < end:
        for size in sizes:
            size.run()
    return [(min(size.times), size.flops) for size in sizes]


def _plausible(sizes: list[ProbeSize]) -> bool:
    points = sorted((size.flops, min(size.times)) for size in sizes)
    growing = all(t2 > t1 for (_, t1), (_, t2) in zip(points, points[1:]))
    return all(size.trusted() for size in sizes) and growing and fit(points)[1] > 0


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(FLOP/s, intercept s) of the line through (FLOPs, seconds) points (two sizes): a noisy pair whose line
    would go below zero or slope down is read as all speed, no intercept."""
    (f1, t1), (f2, t2) = sorted(points)[0], sorted(points)[-1]
    if f2 > f1 and t2 > t1:
        speed = (f2 - f1) / (t2 - t1)
        intercept = t1 - f1 / speed
        if intercept >= 0:
            return speed, intercept
    return f2 / t2, 0.0


def _free_mib() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _host() -> tuple[str, int]:
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()[:8]
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return f"{socket.gethostname()}/{boot}" if boot else socket.gethostname(), cores


def probe_device(adapter: Adapter, cfg: RunConfig, rank: int, slowdown: float = 0.0) -> dict[str, Any]:
    """This device's numbers (a DeviceProfile's fields): its speed on the layers it holds."""
    layout = layout_for(cfg, adapter)
    held = layout.stage_of(rank).layers if rank < layout.world else range(adapter.geometry.layers)
    layers = range(held.start, min(held.stop, held.start + PROBE_LAYERS))
    timed = time_sizes(adapter, cfg, layers, [_inputs(adapter, n, k == 0) for k, n in enumerate(PROBE_SIZES)], slowdown)
    ms = [round(seconds * 1e3, 3) for seconds, _ in timed]
    speed, intercept = fit([(flops, seconds) for seconds, flops in timed])
    host, cores = _host()
    return {"rank": rank, "host": host, "cores": cores, "threads": torch.get_num_threads(), "flops_per_s": speed,
            "layer_s": intercept, "free_mib": _free_mib(), "probe_ms": ms}


def rounds(world: int) -> list[list[tuple[int, int]]]:
    """Every pair of ranks once, in rounds where each rank has at most one partner (the circle method)."""
    ranks = list(range(world)) + ([-1] if world % 2 else [])
    n, out = len(ranks), []
    for _ in range(n - 1):
        out.append([(min(a, b), max(a, b)) for a, b in zip(ranks[: n // 2], reversed(ranks[n // 2:]))
                    if a >= 0 and b >= 0])
        ranks = [ranks[0], ranks[-1], *ranks[1:-1]]
    return out


def probe_links(group: dist.ProcessGroup, rank: int, world: int, timeout: float) -> list[dict[str, Any]]:
    """This rank's measurements of the links where it leads (the lower rank of a pair leads): round trips of 8
    bytes (latency), then of LINK_BYTES, then of as many bytes as take about LINK_TARGET_S one way at the rate
    those suggest (a link's token bucket lets a short burst through at line rate: a larger payload reads the
    sustained rate); the lead tells its partner that size first."""
    found = []
    for pairs in rounds(world):
        for p, q in pairs:
            if rank not in (p, q):
                continue
            lead, peer = rank == p, q if rank == p else p
            small = ping_pong(group, peer, lead, 8, LINK_ROUNDS + 1, timeout)[1:]
            first = ping_pong(group, peer, lead, LINK_BYTES, 2, timeout)[1:]
            size = torch.zeros(1, dtype=torch.int64)
            if lead:
                rate = LINK_BYTES / max((first[0] - statistics.median(small)) / 2, 1e-6)  # bytes/s, one way
                size[0] = int(min(LINK_MAX_BYTES, max(LINK_BYTES, rate * LINK_TARGET_S)))
            exchange_int(group, peer, lead, size, timeout)
            nbytes = int(size[0])
            large = ping_pong(group, peer, lead, nbytes, LINK_ROUNDS, timeout)
            if lead:
                rtt, big = statistics.median(small), statistics.median(large)
                extra = max(big - rtt, 1e-6)  # both ways: twice the payload
                found.append({"src": p, "dst": q, "latency_s": rtt / 2, "mbit": 2 * nbytes * 8 / extra / 1e6})
    return found


def probe_profile(group: dist.ProcessGroup | None, rank: int, world: int, adapter: Adapter, cfg: RunConfig,
                  timeout: float, slowdown: float = 0.0, log: Callable[[str], None] | None = None) -> Profile:
    """Every rank: probe, all-gather, the group's Profile (the same on every rank)."""
    t0 = time.perf_counter()
    if group is None or world == 1:
        return Profile((DeviceProfile(**_tupled(probe_device(adapter, cfg, 0, slowdown))),),
                       probe_s=time.perf_counter() - t0)
    try:
        device = {}

        def run() -> float:
            device.update(probe_device(adapter, cfg, rank, slowdown))
            return 0.0

        probe_in_turn(group, rank, world, run, timeout)
        links = probe_links(group, rank, world, timeout)
        docs = all_gather_bytes(group, world, json.dumps({"device": device, "links": links}).encode(), timeout)
    except RuntimeError as err:
        raise DeviceLost(f"rank {rank}: a rank dropped out while probing the devices and links for --plan auto "
                         f"({str(err).splitlines()[0]}); see that rank's error") from None
    every = [json.loads(d) for d in docs]
    profile = Profile(tuple(DeviceProfile(**_tupled(d["device"])) for d in every),
                      tuple(LinkProfile(**link) for d in every for link in d["links"]), time.perf_counter() - t0)
    if log:
        log(f"plan auto: probed {world} devices and {len(profile.links)} links in {profile.probe_s:.2f} s")
    return profile


def _tupled(d: dict[str, Any]) -> dict[str, Any]:
    return {**d, "probe_ms": tuple(d.get("probe_ms", ()))}
