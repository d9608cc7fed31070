"""prism-edge: one Transformer across several edge devices with PRISM (arXiv 2507.12145).

The names below load on first use (PEP 562), so `import prism_edge` -- and the command line, which
lives in prism_edge.app -- start without importing torch, and nothing here imports the application layer
before it is asked for: `Cluster` comes from prism_edge.cluster.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import PrismConfig, RunConfig
from .version import __version__

if TYPE_CHECKING:  # what the lazy names are, for type checkers
    from .cluster import Cluster, ClusterError
    from .runtime.simulator import PrismOutput, simulate
    from .runtime.stats import Stats

_LAZY = {
    "Cluster": "prism_edge.cluster",
    "ClusterError": "prism_edge.cluster",
    "PrismOutput": "prism_edge.runtime.simulator",
    "simulate": "prism_edge.runtime.simulator",
    "Stats": "prism_edge.runtime.stats",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'prism_edge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


__all__ = ["Cluster", "ClusterError", "PrismConfig", "PrismOutput", "RunConfig", "Stats", "simulate", "__version__"]
