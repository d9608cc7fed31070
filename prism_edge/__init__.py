"""prism-edge: one Transformer across several edge devices with PRISM (arXiv 2507.12145)."""

from .config import PrismConfig
from .runtime.cluster import Cluster, ClusterError
from .runtime.simulator import PrismOutput, simulate
from .runtime.stats import Stats

__version__ = "0.1.0"

__all__ = ["Cluster", "ClusterError", "PrismConfig", "PrismOutput", "Stats", "simulate", "__version__"]
