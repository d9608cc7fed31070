"""PrismConfig <-> command-line flags: every flag is generated from the dataclass, so defaults live there only.

  add_config_flags(parser)   one flag per PrismConfig field (--devices, --cr, --sinks/--no-sinks, ...)
  config_from(args)          the PrismConfig those flags describe
  config_args(cfg)           the flags that rebuild `cfg` in another process (a worker's command line)

`--weights` also takes the single word `auto` (device processes only): every device times a short
forward at start-up and rank 0 sets proportional slices (prism_edge.cluster.calibrate).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from .config import GROUPINGS, PAYLOADS, SCHEMES, WIRE_DTYPES, PrismConfig, RunConfig

CHOICES = {"scheme": SCHEMES, "payload": PAYLOADS, "wire_dtype": WIRE_DTYPES, "grouping": GROUPINGS}
AUTO = "auto"


def weight(text: str) -> float | str:
    """One --weights value: a relative speed, or `auto` (argparse names this function in its error)."""
    return AUTO if text == AUTO else float(text)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per PrismConfig field; the defaults live in the dataclass only (None: the model kind's)."""
    hints = typing.get_type_hints(PrismConfig)
    for f in dataclasses.fields(PrismConfig):
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"help": str(f.metadata["help"]), "default": f.default}
        hint = hints[f.name]
        kind = ([a for a in typing.get_args(hint) if a is not type(None)] or [hint])[0]
        if f.default is None and f.name != "weights":
            kw["help"] += " (default: the model kind's, see docs/RESULTS.md)"
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float):
            kw["type"] = kind
        elif kind is str:
            kw["choices"] = CHOICES.get(f.name)
        elif f.name == "weights":
            kw.update(nargs="+", type=weight)
            kw["help"] += "; or `auto` (launch / worker): every device times a forward at start-up"
        else:  # sink_token_ids
            kw.update(nargs="+", type=int)
        parser.add_argument(flag, dest=f.name, **kw)


def auto_weights(args: argparse.Namespace) -> bool:
    """Whether `--weights auto` was given (it must stand alone)."""
    weights = getattr(args, "weights", None) or []
    if AUTO in weights and len(weights) > 1:
        raise ValueError(f"--weights takes numbers (relative device speeds) or the single word auto, got "
                         f"{' '.join(map(str, weights))}")
    return weights == [AUTO]


def config_from(args: argparse.Namespace, allow_auto: bool = False) -> PrismConfig:
    """The PrismConfig of the parsed flags.  `--weights auto` leaves weights unset (device processes set them)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PrismConfig)}
    if auto_weights(args):
        if not allow_auto:
            raise ValueError("--weights auto needs device processes (prism-edge launch / worker, or generate "
                             "--launch); in one process pass relative speeds, e.g. --weights 2 1")
        values["weights"] = None
    for name in ("weights", "sink_token_ids"):
        if values[name] is not None:
            values[name] = tuple(values[name])
    return PrismConfig(**values)


def config_args(cfg: PrismConfig | RunConfig) -> list[str]:
    """The CLI flags that rebuild `cfg` in a worker process (a RunConfig: its options; the worker resolves
    them for the same kind of model)."""
    args: list[str] = []
    for f in dataclasses.fields(PrismConfig):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if value is None or value == ():
            continue
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args
