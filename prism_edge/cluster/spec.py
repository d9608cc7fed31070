"""LaunchSpec: how device processes run, one frozen dataclass that gives both their flags and their command line.

The way PrismConfig gives the config flags (prism_edge.flags), LaunchSpec gives the runtime flags
(`add_flags`), reads them back (`from_args`), and writes the command line that starts a worker with
the very same settings (`worker_command`), so every runtime default is written once, here.  Torch-free:
the command line builds its parser from it without importing torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import PrismConfig, RunConfig
from ..flags import add_dataclass_flags, config_args, dataclass_args, dataclass_from_args, flag_fields, option
from ..flags import auto_weights as _auto_weights
from .env import SECRET_ENV

FIDELITIES = ("exact", "high", "balanced")


def check_fidelity(value: Any) -> None:
    """exact, high, balanced or a byte budget in (0, 1] (torch-free: the planner reads it as planning.check_fidelity)."""
    try:
        ok = value in FIDELITIES or 0 < float(value) <= 1
    except (TypeError, ValueError):
        ok = False
    if isinstance(value, bool) or not ok:
        raise ValueError(f"fidelity must be one of {', '.join(FIDELITIES)} or a byte budget in (0, 1], got {value!r}")


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class LaunchSpec:
    """Runtime settings every device process of a cluster shares (the PrismConfig says what to compute)."""

    model: str = option("alias (minilm, smollm2), hub name or local folder every rank can load", default="minilm")
    threads: int = option("torch threads per device process", default=1)
    timeout: float = option("seconds a device may stay silent before every other device stops", default=30.0)
    startup_timeout: float = option("seconds to wait for every rank to join and load the model", default=300.0)
    overlap: bool = option("attend to the own positions while the means are in flight", default=True)
    count_flops: bool = option("count FLOPs per device (slower)", default=False)
    device: str = option("where a device process's model runs: cpu, cuda, cuda:N", default="cpu")
    cache_dir: str | None = option("folder for converted weights (default: $PRISM_EDGE_CACHE or "
                                   "~/.cache/prism-edge)", default=None)
    verbose: bool = option("log each worker's shutdown", default=False)
    fetch_weights: bool = option("a worker takes its (pipeline stage's) weights from rank 0 over the cluster link "
                                 "instead of a local copy; checked by hash and cached in --cache-dir, so its next "
                                 "start sends nothing", default=False)
    plan: str = option("auto: probe the devices and links at start-up and run each request on the plan the cost "
                       "model predicts fastest (devices 1..P) at --fidelity; fixed: every request on the config as "
                       "given", default="fixed", choices=("auto", "fixed"))
    fidelity: str = option("what --plan auto may trade for speed: exact (one device or Voltage), high (the config's "
                           "fidelity), balanced (the smallest byte budget whose held-out fidelity meets the planner's "
                           "floors), or a byte budget such as 0.1", default="high")
    # never on a command line nor in a repr: spawned workers get it through their environment (worker_env)
    cluster_secret: str | None = field(default=None, repr=False, metadata={
        "help": "a secret every rank must share: each proves it at start-up by challenge and response (it never "
                "crosses the network); a process without it is refused by name (default: --cluster-secret-file's "
                f"first line, or ${SECRET_ENV}; none: no check)", "metavar": "SECRET"})
    # set by `--weights auto` (a PrismConfig flag), not a flag of its own
    auto_weights: bool = field(default=False, metadata={"flag": False})

    def __post_init__(self) -> None:
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}; pass e.g. threads=1")
        if not (self.timeout > 0 and self.startup_timeout > 0):
            raise ValueError(f"timeouts must be > 0 seconds, got timeout={self.timeout}, "
                             f"startup_timeout={self.startup_timeout}")
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise ValueError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N")
        if self.plan not in ("auto", "fixed"):
            raise ValueError(f"plan must be auto or fixed, got {self.plan!r}")
        check_fidelity(self.fidelity)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be an alias, hub name or folder, got {self.model!r}")
        if self.cluster_secret is not None and not isinstance(self.cluster_secret, str):
            raise ValueError(f"cluster_secret must be a string, got a {type(self.cluster_secret).__name__}")
        if self.cluster_secret == "":
            object.__setattr__(self, "cluster_secret", None)  # empty: no secret, no check

    # ------------------------------------------------------------------ flags
    @staticmethod
    def flag_fields() -> list[dataclasses.Field]:
        return flag_fields(LaunchSpec)

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser, model_default: str | None = None,
                  defaults: Mapping[str, Any] | None = None) -> None:
        """One flag per field; defaults from the dataclass (model_default, defaults: a command's own)."""
        add_dataclass_flags(parser, cls, {**({"model": model_default} if model_default else {}), **(defaults or {})})
        parser.add_argument("--cluster-secret-file", metavar="PATH",
                            help="read the cluster secret from the first line of this file (kept out of `ps`)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LaunchSpec":
        return dataclass_from_args(cls, args, auto_weights=_auto_weights(args))

    @classmethod
    def with_settings(cls, model: str | None, settings: Mapping[str, Any]) -> "LaunchSpec":
        """The spec for `Cluster(model, **settings)`: unknown names are refused, with the known ones listed."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise ValueError(f"unknown Cluster setting(s) {', '.join(unknown)}; choose from {', '.join(names)}")
        values = dict(settings)
        if model is not None:
            values["model"] = model
        return cls(**values)

    def flags(self) -> list[str]:
        """The flags that give this spec back (through add_flags + from_args) in another process, all but the
        cluster secret: a command line is visible to every user of the machine (worker_env carries it)."""
        return dataclass_args(self.replace(cluster_secret=None)) + (["--weights", "auto"] if self.auto_weights else [])

    def worker_env(self) -> dict[str, str]:
        """The environment that gives a spawned worker this spec's cluster secret (empty: none, whatever the
        parent's environment says)."""
        return {SECRET_ENV: self.cluster_secret or ""}

    def worker_command(self, cfg: PrismConfig | RunConfig, rank: int, world: int, master: str,
                       bind: str | None = None, extra: Sequence[str] = ()) -> list[str]:
        """The command line of device process `rank` (`python -m prism_edge.worker ...`) with this spec and cfg
        (its cluster secret: worker_env); extra: request flags for a rank 0 started this way (--repeat, --json, ...)."""
        cmd = [sys.executable, "-m", "prism_edge.worker", "--rank", str(rank), "--world-size", str(world),
               "--master", master, *(["--bind", bind] if bind else []), *self.flags(), *config_args(cfg)]
        return cmd + list(extra)

    # ------------------------------------------------------------------ use
    def torch_device(self) -> Any:
        """The torch device to run on, or a ValueError when this machine cannot (imports torch)."""
        import torch

        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but this torch has no usable CUDA; use --device cpu")
        return dev

    def replace(self, **changes: Any) -> "LaunchSpec":
        return dataclasses.replace(self, **changes)
