"""PrismConfig <-> command-line flags: every flag is generated from the dataclass, so defaults live there only.

  add_config_flags(parser)   one flag per PrismConfig field (--devices, --cr, --sinks/--no-sinks, ...)
  config_from(args)          the PrismConfig those flags describe
  config_args(cfg)           the flags that rebuild `cfg` in another process (a worker's command line)

Any other frozen dataclass of options (LaunchSpec, each bench's options) gets its flags the same way:
its fields are declared with `option(help text, default=...)`, `add_dataclass_flags(parser, cls)` makes one
flag per field and `dataclass_from_args(cls, args)` builds the instance back, so defaults live in the
dataclass only.

`--weights` also takes the single word `auto` (device processes only): every device times a short
forward at start-up and rank 0 sets proportional slices (prism_edge.cluster.calibrate).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

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
        else:  # a tuple of numbers: sink_token_ids, stage_devices, layer_split, memory_budget
            element = [a for a in typing.get_args(kind) if a is not Ellipsis]
            kw.update(nargs="+", type=element[0] if element else int)
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
    for name in ("weights", "sink_token_ids", "stage_devices", "layer_split", "memory_budget"):
        if values[name] is not None:
            values[name] = tuple(values[name])
    return PrismConfig(**values)


def config_args(cfg: PrismConfig | RunConfig) -> list[str]:
    """The CLI flags that rebuild `cfg` in a worker process (a RunConfig: its options; the worker resolves
    them for the same kind of model)."""
    return dataclass_args(cfg.settings if isinstance(cfg, RunConfig) else cfg)


# ---------------------------------------------------------------------- any options dataclass <-> flags

T = TypeVar("T")


def option(text: str, default: Any, **meta: Any) -> Any:
    """A dataclass field that is also a flag, `text` its help.  meta: aliases (more spellings, e.g.
    ("--device-counts",)), nargs (a tuple field's, default "+"), choices, metavar, flag=False (no flag)."""
    return dataclasses.field(default=default, metadata={"help": text, **meta})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that are flags (every one not marked flag=False)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag", True)]


def _unwrap_optional(hint: Any) -> Any:
    """T of `T | None` (and of Optional[T]); any other hint as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _shown(default: Any) -> str:
    if default is None or default == ():
        return ""
    return f" (default {' '.join(map(str, default)) if isinstance(default, tuple) else default})"


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per field of `cls` (bool: --x / --no-x; tuple[T, ...]: several values), its default the field's
    (defaults: a command's own default for some fields), shown at the end of the help."""
    hints = typing.get_type_hints(cls)
    for f in flag_fields(cls):
        default = (defaults or {}).get(f.name, f.default)
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata["help"] + _shown(default)}
        kind = _unwrap_optional(hints[f.name])
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kw.update(nargs=f.metadata.get("nargs", "+"), type=typing.get_args(kind)[0])
        else:
            kw["type"] = kind
        kw.update({k: f.metadata[k] for k in ("choices", "metavar") if k in f.metadata})
        parser.add_argument(flag_name(f.name), *f.metadata.get("aliases", ()), **kw)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """The `cls` those flags describe (lists become tuples); extra: fields that are not flags."""
    values = {f.name: getattr(args, f.name) for f in flag_fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}, **extra)


def dataclass_args(options: Any) -> list[str]:
    """The flags that give `options` back through add_dataclass_flags + dataclass_from_args."""
    out: list[str] = []
    for f in flag_fields(type(options)):
        value, flag = getattr(options, f.name), flag_name(f.name)
        if value is None or value == ():
            continue
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, *map(str, value)] if isinstance(value, tuple) else [flag, str(value)]
    return out
