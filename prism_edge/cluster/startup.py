"""Start-up of a device group: rendezvous, join, handshake and (`--weights auto`) timing the devices.

Rank 0 (a Cluster) hosts the rendezvous store, spawns its local workers if asked, and joins while
watching them; every rank then runs `agree`: the handshake, and the calibration that sets the weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

from ..config import RunConfig
from ..models import Adapter
from .rendezvous import Endpoint, join_group, open_store, take_seat
from .liveness import Liveness
from .calibrate import agree_weights, probe_in_turn, time_forward
from .probes import probe_profile
from ..planning import Profile, speed_weights
from ..runtime.stages import layout_for
from .handshake import check, identity
from .spec import LaunchSpec
from .procs import LocalWorkers


@dataclass(frozen=True)
class Agreement:
    """What every rank agreed on at start-up."""

    cfg: RunConfig  # with the measured weights under --weights auto
    handshake: list[dict]  # every rank's identity document, rank order
    probe_s: tuple[float, ...] | None = None  # every rank's probe forward time (--weights auto)
    profile: Profile | None = None  # every device's speed and memory, every link (--plan auto)


def agree(group: dist.ProcessGroup, rank: int, world: int, model: nn.Module, adapter: Adapter, cfg: RunConfig,
          spec: LaunchSpec, slowdown: float = 0.0, log: Callable[[str], None] | None = None) -> Agreement:
    """The handshake, then (auto weights) time this device and take the weights rank 0 broadcasts, then (plan
    auto) probe every device and link; without weights of their own, the slices follow the probed speeds."""
    docs = check(group, rank, world, identity(model, cfg, spec.model, spec.auto_weights, spec.plan), spec.startup_timeout)
    times = None
    if spec.auto_weights and cfg.effective_devices > 1:
        seconds = probe_in_turn(group, rank, world, lambda: time_forward(adapter, cfg, slowdown), spec.startup_timeout)
        times, weights = agree_weights(group, rank, world, seconds, spec.startup_timeout)
        cfg = cfg.replace(weights=weights)
    profile = None
    if spec.plan == "auto":
        profile = probe_profile(group, rank, world, adapter, cfg, spec.startup_timeout, slowdown, log)
        if cfg.weights is None and cfg.effective_devices > 1 and not layout_for(cfg, adapter).staged:
            cfg = cfg.replace(weights=speed_weights(profile))  # the same on every rank: the same profile
    return Agreement(cfg, docs, times, profile)


def meet(endpoint: Endpoint, rank: int, world: int, spec: LaunchSpec, agent_store: bool = False,
         on_wait: Callable[[], None] | None = None, log: Callable[[str], None] = lambda _: None,
         store: dist.Store | None = None) -> tuple[dist.ProcessGroup, Liveness]:
    """Every rank: the rendezvous store, a seat in the group (a wrong or missing cluster secret, duplicates,
    ranks out of range and a wrong world size refused by name), then the gloo group; all of it by one deadline,
    --startup-timeout from now.  on_wait: called while waiting (rank 0 checks its local workers, so one that dies
    is reported at once).  With the group, this rank's liveness beat in the store (beating from now on; judging
    once told to watch)."""
    deadline = time.monotonic() + spec.startup_timeout
    if store is None:
        store = open_store(endpoint, rank, world, deadline, agent_store=agent_store)
    addresses = take_seat(store, rank, world, endpoint.gloo_address(), deadline, on_wait, log,
                          secret=spec.cluster_secret)
    group = join_group(store, endpoint, rank, world, deadline, spec.startup_timeout, addresses, on_wait)
    return group, Liveness.over(store, rank, world, spec.timeout)


def open_group(spec: LaunchSpec, cfg: RunConfig, endpoint: Endpoint | None, workers: LocalWorkers,
               spawn: bool, worker_env: dict[str, str] | None, log: Callable[[str], None]
               ) -> tuple[dist.ProcessGroup, Liveness]:
    """Rank 0: host the rendezvous, start the local workers (spawn) and join the group with them."""
    world = cfg.effective_devices
    endpoint = endpoint or Endpoint("127.0.0.1", 0, bind="127.0.0.1")
    store = open_store(endpoint, 0, world, time.monotonic() + spec.startup_timeout)
    if spawn:
        master = f"{endpoint.master_addr}:{store.port}"  # port 0 asked for any free port: the store's
        workers.spawn({r: spec.worker_command(cfg, r, world, master, endpoint.bind) for r in range(1, world)},
                      {**spec.worker_env(), **(worker_env or {})})  # the secret in their environment, not in `ps`
        log(f"spawned {world - 1} worker process(es): pids " + ", ".join(map(str, workers.pids.values())))
    return meet(endpoint, 0, world, spec, on_wait=workers.check_started, log=log, store=store)
