"""The multi-process runtime: device processes joined by torch.distributed, driven by rank 0.

  cluster.py      Cluster, the Python API of rank 0 (built from the parts below)
  coordinator.py  rank 0's side of one request: check, send every device its slice, gather
  generation.py   generation across device processes (rank 0 and the workers)
  follower.py     a device process of rank > 0: join, load, agree, serve rank 0's requests
  node.py         one device's layer loop for one request, over the DistCommunicator
  transport.py    DistCommunicator: every torch.distributed send and receive, every byte counted
  rendezvous.py   how a group meets;  startup.py: rendezvous + handshake + --weights auto
  handshake.py    start-up checks;  calibrate.py: `--weights auto`;  secret.py: the cluster secret's challenge and response
  spec.py         LaunchSpec: the frozen runtime settings that give both the flags and the worker command line
  procs.py        local worker processes;  heartbeat.py;  errors.py;  env.py: every environment variable read
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import ClusterError, RequestError

if TYPE_CHECKING:
    from .cluster import Cluster


def __getattr__(name: str) -> Any:
    """Cluster loads on first use, so that the command line reads spec.py without importing torch."""
    if name != "Cluster":
        raise AttributeError(f"module 'prism_edge.cluster' has no attribute {name!r}")
    value = importlib.import_module("prism_edge.cluster.cluster").Cluster
    globals()[name] = value
    return value


__all__ = ["Cluster", "ClusterError", "RequestError"]
