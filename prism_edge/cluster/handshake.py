"""Start-up handshake: every rank must run the same package version, config and model weights.

Each rank describes itself as a small JSON document (version, config, a fingerprint of the
weights); all ranks all-gather the documents as uint8 tensors and compare them with rank 0's.  A
difference stops every rank with a message naming the rank and the field.

What it does not protect against: it is not authentication.  That is the cluster secret's job, and only at
the rendezvous (--cluster-secret, secret.py): before a process takes a seat it and rank 0 prove by challenge
and response that they share the secret, so a process without it (a stray or misconfigured worker, another
cluster's) is refused by name.  After the rendezvous nothing is authenticated or encrypted: gloo's traffic
(every tensor) is in clear, and a party that can reach the store or the gloo ports and speaks their
protocols can still read, inject or disrupt.  On an untrusted network run the cluster inside WireGuard or
another VPN / tunnel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch
import torch.distributed as dist
from torch import nn

from ..config import RunConfig
from .transport import DeviceLost, all_gather_bytes
from ..version import __version__


class HandshakeError(ValueError):
    """The ranks disagree on version, config or model: refused before any request."""


def _digest(name: str, t) -> str:
    flat = t.detach().reshape(-1).cpu()
    step = max(1, flat.numel() // 64)
    h = hashlib.sha256(f"{name}|{tuple(t.shape)}|{t.dtype}|{flat.to(torch.float64).sum().item():.10e}|".encode())
    h.update(flat[::step][:64].to(torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(model: nn.Module) -> tuple[str, dict[str, str]]:
    """(structure, values): a hash of the model class and every parameter's name, shape and dtype (held or not:
    equal on every rank), and per tensor this rank holds (a pipeline stage holds only its own; the others are
    on the meta device) a hash of its values and a sample of them."""
    h = hashlib.sha256(type(model).__name__.encode())
    values = {}
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            if t.device.type != "meta":
                values[name] = _digest(name, t)
    return h.hexdigest()[:32], values


def identity(model: nn.Module, cfg: RunConfig, model_name: str, auto_weights: bool = False, plan: str = "fixed") -> dict:
    """What a rank is: versions, config (weights "auto" when they are still to be measured; plan: whether every rank
    takes part in the start-up probes), model fingerprint."""
    import transformers

    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    if auto_weights:  # every rank must take part in timing the devices, or the start-up would hang
        config["weights"] = "auto"
    config["plan"] = plan  # every rank must take part in the probes, or the start-up would hang
    structure, values = fingerprint(model)
    return {
        "prism_edge": __version__,
        "config": config,
        "model": {"class": type(model).__name__, "fingerprint": structure,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "values": values,  # per tensor this rank holds: ranks compare the ones they both hold
        "model_name": model_name,  # informative only: the same weights may live at different paths
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def differences(reference: dict, other: dict) -> list[str]:
    """Human-readable differences that make two ranks incompatible (`other` against rank 0's)."""
    out = []
    if other["prism_edge"] != reference["prism_edge"]:
        out.append(f"prism-edge version {other['prism_edge']} vs {reference['prism_edge']}")
    for key, value in reference["config"].items():
        theirs = other["config"].get(key)
        if theirs != value:
            out.append(f"config {key}={theirs!r} vs {value!r}")
    a, b = other["model"], reference["model"]
    if a != b:
        if a["class"] != b["class"]:
            out.append(f"model class {a['class']} vs {b['class']}")
        else:
            out.append(f"model weights differ (structure {a['fingerprint']} from {other['model_name']!r} vs "
                       f"{b['fingerprint']} from {reference['model_name']!r})")
        return out
    mine, theirs = other.get("values", {}), reference.get("values", {})
    differ = sorted(name for name in set(mine) & set(theirs) if mine[name] != theirs[name])
    if differ:
        out.append(f"model weights differ ({len(differ)} tensor(s), e.g. {differ[0]}: {mine[differ[0]]} from "
                   f"{other['model_name']!r} vs {theirs[differ[0]]} from {reference['model_name']!r})")
    return out


def check(group: dist.ProcessGroup, rank: int, world: int, ident: dict, timeout: float) -> list[dict]:
    """All-gather every rank's identity; raise HandshakeError on any rank if one differs from rank 0."""
    try:
        raw = all_gather_bytes(group, world, json.dumps(ident, sort_keys=True).encode(), timeout)
    except RuntimeError as err:
        raise DeviceLost(f"rank {rank}: a rank dropped out during the start-up handshake "
                         f"({str(err).splitlines()[0]}); see that rank's error") from None
    docs = [json.loads(d) for d in raw]
    problems = []
    for r in range(1, world):
        diff = differences(docs[0], docs[r])
        for earlier in range(1, r):  # pipeline stages: the tensors two workers both hold, rank 0 may not
            if not diff:
                diff = [d + f" (against rank {earlier})" for d in differences(docs[earlier], docs[r])]
        if diff:
            problems.append(f"rank {r} has " + ", ".join(diff))
    if problems:
        raise HandshakeError(f"handshake refused (rank {rank} reporting): " + "; ".join(problems)
                             + " (left: that rank, right: rank 0); start every rank with the same version, "
                               "model and flags")
    return docs
