"""Start-up of a device group: rendezvous, join, handshake and (`--weights auto`) timing the devices.

Rank 0 (a Cluster) hosts the rendezvous store, spawns its local workers if asked, and joins while
watching them; every rank then runs `agree`: the handshake, and the calibration that sets the weights.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import nn

from ...config import PrismConfig
from ...models import Adapter
from ...runtime.transport import Endpoint, join_group, open_store
from ..calibrate import agree_weights, probe_in_turn, time_forward
from ..handshake import check, identity
from ..spec import LaunchSpec
from .procs import LocalWorkers


@dataclass(frozen=True)
class Agreement:
    """What every rank agreed on at start-up."""

    cfg: PrismConfig  # with the measured weights under --weights auto
    handshake: list[dict]  # every rank's identity document, rank order
    probe_s: tuple[float, ...] | None = None  # every rank's probe forward time (--weights auto)


def agree(group: dist.ProcessGroup, rank: int, world: int, model: nn.Module, adapter: Adapter, cfg: PrismConfig,
          spec: LaunchSpec, slowdown: float = 0.0) -> Agreement:
    """The handshake, then (auto weights) time this device and take the weights rank 0 broadcasts."""
    docs = check(group, rank, world, identity(model, cfg, spec.model, spec.auto_weights), spec.startup_timeout)
    if not spec.auto_weights or cfg.effective_devices == 1:
        return Agreement(cfg, docs)
    seconds = probe_in_turn(group, rank, world, lambda: time_forward(adapter, cfg, slowdown), spec.startup_timeout)
    times, weights = agree_weights(group, rank, world, seconds, spec.startup_timeout)
    return Agreement(cfg.replace(weights=weights), docs, times)


def _join_watching(store: dist.Store, endpoint: Endpoint, world: int, timeout: float,
                   workers: LocalWorkers) -> dist.ProcessGroup:
    """Join in a helper thread while watching the local workers: one that dies before joining (bad flags,
    import error) is reported at once instead of after the start-up timeout."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["group"] = join_group(store, endpoint, 0, world, timeout)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        if thread.is_alive():
            workers.check_started()
    if "error" in box:
        raise box["error"]
    return box["group"]


def open_group(spec: LaunchSpec, cfg: PrismConfig, endpoint: Endpoint | None, workers: LocalWorkers,
               spawn: bool, worker_env: dict[str, str] | None, log: Callable[[str], None]) -> dist.ProcessGroup:
    """Rank 0: host the rendezvous, start the local workers (spawn) and join the group with them."""
    world = cfg.effective_devices
    endpoint = endpoint or Endpoint("127.0.0.1", 0, bind="127.0.0.1")
    store = open_store(endpoint, 0, world, spec.startup_timeout)
    if spawn:
        master = f"{endpoint.master_addr}:{store.port}"  # port 0 asked for any free port: the store's
        workers.spawn({r: spec.worker_command(cfg, r, world, master, endpoint.bind) for r in range(1, world)},
                      worker_env)
        log(f"spawned {world - 1} worker process(es): pids " + ", ".join(map(str, workers.pids.values())))
    return _join_watching(store, endpoint, world, spec.startup_timeout, workers)
