"""`--weights auto`: every device times a short forward of its model at start-up, and rank 0 turns the
times into proportional slices that every rank then uses.

A device's speed is what decides its share: a device twice as fast should own twice the positions so
that both finish each layer together.  Each rank runs the same probe (a one-device forward of
PROBE_POSITIONS positions through the runtime's own layer loop, so a testing slowdown counts too),
one rank after the other (devices sharing a machine would otherwise slow each other's probe), the
ranks all-gather the median times, and rank 0 broadcasts the weights, so every rank plans with the
very same numbers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..models import Adapter
from .node import run_device
from ..partition.stages import StageLayout
from ..runtime.stages import plan_for
from .transport import DeviceLost, DistCommunicator, all_gather_floats, barrier, broadcast_floats
from ..models.loading import hf_config

PROBE_POSITIONS = 256  # long enough that the layers, not Python or timer wake-ups, dominate; short enough for a Pi
PROBE_REPEATS = 3  # timed runs (median) after one warm-up


def probe_inputs(adapter: Adapter) -> dict[str, torch.Tensor]:
    """A synthetic one-sequence request of about PROBE_POSITIONS positions for this model."""
    cfg = hf_config(adapter.model)
    if adapter.family in ("vit", "dinov2"):
        # ViT takes exactly its image size; DINOv2 any size: 8 x 8 patches keep its probe short
        size = cfg.image_size if adapter.family == "vit" else cfg.patch_size * 8
        return {"pixel_values": torch.zeros(1, cfg.num_channels, size, size)}
    n = min(PROBE_POSITIONS, adapter.position_limit() or PROBE_POSITIONS)
    return {"input_ids": (torch.arange(n) % cfg.vocab_size).unsqueeze(0)}  # (1, n)


def time_forward(adapter: Adapter, cfg: RunConfig, slowdown: float = 0.0, repeats: int = PROBE_REPEATS) -> float:
    """Median seconds of this process's forward over the probe, as one device (no exchange)."""
    if cfg.stages > 1 or cfg.memory_budget is not None:
        raise ValueError("--weights auto times a whole forward on every device, but with pipeline stages a device "
                         "holds only its layers; give relative speeds instead (--weights 2 1 ...)")
    one = cfg.replace(devices=1, weights=None)
    batch = adapter.prepare(**probe_inputs(adapter))
    plan = plan_for(batch, one, adapter.geometry)
    local = batch.gather(plan.devices[0].index)
    comm = DistCommunicator(None, 0, 1)  # world 1: nothing is ever sent
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        run_device(adapter, one, [plan], StageLayout.single(1, adapter.geometry.layers), batch, local, comm,
                   slowdown=slowdown)
        if i:  # the first run warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def weights_from_times(times: list[float]) -> tuple[float, ...]:
    """Relative speeds (1 / time), the slowest device 1.0, at 3 significant digits (noise below that is moot)."""
    slowest = max(times)
    return tuple(float(f"{slowest / t:.3g}") for t in times)


def probe_in_turn(group: dist.ProcessGroup, rank: int, world: int, probe: Callable[[], float], timeout: float
                  ) -> float:
    """Run `probe` on every rank, one rank at a time (the others wait at a barrier); this rank's result."""
    seconds = 0.0
    try:
        for turn in range(world):
            if turn == rank:
                seconds = probe()
            barrier(group, timeout)
    except RuntimeError as err:
        raise DeviceLost(f"rank {rank}: a rank dropped out while timing the devices for --weights auto "
                         f"({str(err).splitlines()[0]}); see that rank's error") from None
    return seconds


def agree_weights(group: dist.ProcessGroup, rank: int, world: int, seconds: float, timeout: float
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """All-gather every rank's probe time; rank 0 sets the weights and broadcasts them.
    Returns (every rank's seconds, the weights)."""
    try:
        times = all_gather_floats(group, world, seconds, timeout)
        weights = broadcast_floats(group, list(weights_from_times(times)) if rank == 0 else [0.0] * world, timeout)
    except RuntimeError as err:
        raise DeviceLost(f"rank {rank}: a rank dropped out while timing the devices for --weights auto "
                         f"({str(err).splitlines()[0]}); see that rank's error") from None
    return tuple(times), tuple(float(w) for w in weights)
