"""The Cluster API: rank 0 of a device group (rank0.py), built from parts with one job each."""

from .errors import ClusterError, RequestError
from .rank0 import Cluster

__all__ = ["Cluster", "ClusterError", "RequestError"]
