"""Every environment variable prism-edge reads, in one place; only the entry points (CLI, worker) call these.

Library code takes what these return as arguments: nothing below the application layer reads the
environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

DEBUG_ENV = "PRISM_EDGE_DEBUG"  # set by --debug: tracebacks of unexpected errors (workers inherit it)
CACHE_ENV = "PRISM_EDGE_CACHE"  # folder for converted weights (default: $XDG_CACHE_HOME/prism-edge)
FAULT_ENV = "PRISM_EDGE_FAULT"  # testing: "RANK:KIND@LAYER[#REQUEST]", KIND die|hang|raise|late|decode (cluster.node.Fault)
API_KEY_ENV = "PRISM_EDGE_API_KEY"  # a key the HTTP endpoint accepts (app/serve/options.py: also --api-key(-file))
SLOW_ENV = "PRISM_EDGE_SLOW"  # testing: "RANK:FACTOR", e.g. "1:1": rank 1 sleeps as long as it computed (half speed)
SECRET_ENV = "PRISM_EDGE_CLUSTER_SECRET"  # the cluster secret, when neither --cluster-secret nor its -file is given


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    root = environ.get(CACHE_ENV) or os.path.join(
        environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "prism-edge")
    return Path(root)


def cluster_secret(given: str | None, path: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The cluster secret: --cluster-secret, else the first line of --cluster-secret-file, else
    PRISM_EDGE_CLUSTER_SECRET; None (no check) when all are absent or empty."""
    if given and path:
        raise ValueError("give the cluster secret once: --cluster-secret or --cluster-secret-file, not both")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                line = f.readline().strip()
        except (OSError, UnicodeError) as err:
            raise ValueError(f"--cluster-secret-file {path}: cannot read it ({err})") from None
        if not line:
            raise ValueError(f"--cluster-secret-file {path}: its first line is empty; write the secret there")
        return line
    return given or environ.get(SECRET_ENV) or None


def torchrun_seat(environ: Mapping[str, str] = os.environ) -> tuple[int | None, int | None, str, bool]:
    """Rank, world size, master HOST:PORT and whether torchrun's agent hosts the store, as torchrun sets them."""
    rank, world = environ.get("RANK"), environ.get("WORLD_SIZE")
    master = f"{environ.get('MASTER_ADDR', '127.0.0.1')}:{environ.get('MASTER_PORT', '29500')}"
    return (int(rank) if rank else None, int(world) if world else None, master,
            environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def _for_rank(name: str, rank: int, environ: Mapping[str, str]) -> str | None:
    """The part after "RANK:" of a testing variable's entry for this rank (entries separated by commas)."""
    for entry in environ.get(name, "").split(","):
        who, _, what = entry.strip().partition(":")
        if who.isdigit() and int(who) == rank:
            return what
    return None


def fault(rank: int, environ: Mapping[str, str] = os.environ) -> tuple[str, int, int] | None:
    """(kind, layer, request) of the fault this rank should simulate, from PRISM_EDGE_FAULT
    (RANK:KIND@LAYER[#REQUEST], cluster.node.Fault); None when none."""
    from .node import FAULTS

    what = _for_rank(FAULT_ENV, rank, environ)
    if what is None:
        return None
    kind, _, rest = what.partition("@")
    layer, _, request = rest.partition("#")
    if kind not in FAULTS or not layer.isdigit() or not (request or "1").isdigit():
        return None
    return kind, int(layer), int(request or "1")


def slowdown(rank: int, environ: Mapping[str, str] = os.environ) -> float:
    """How much slower this rank should run, from PRISM_EDGE_SLOW (0: full speed, 1: half speed)."""
    what = _for_rank(SLOW_ENV, rank, environ)
    if what is None:
        return 0.0
    try:
        factor = float(what)
    except ValueError:
        raise ValueError(f"{SLOW_ENV} must be RANK:FACTOR with FACTOR >= 0 (e.g. 1:1), got {what!r}") from None
    if not factor >= 0:
        raise ValueError(f"{SLOW_ENV} must be RANK:FACTOR with FACTOR >= 0 (e.g. 1:1), got {what!r}")
    return factor


def api_key(environ: Mapping[str, str] = os.environ) -> str | None:
    """The API key the HTTP endpoint accepts from PRISM_EDGE_API_KEY (None: unset or blank)."""
    return environ.get(API_KEY_ENV, "").strip() or None
