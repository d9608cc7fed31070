"""Decoding after a PRISM prefill: every new token joins the last device's slice.

In a decoder nothing ever attends to a later position, so the earlier devices never need the new
tokens; the question is only what the new tokens see of the prompt positions the earlier devices own:

  local        what the last device received at prefill (summaries, unless the prefill gave it an
               exact view); no traffic while decoding.
  handoff      once, after prefill, the earlier devices send the last device the K/V they computed for
               their own positions (every layer, at the wire dtype); then decoding is local.
  distributed  every device keeps its own K/V; per new token and layer the query goes to the earlier
               devices and each returns its partial attention (output and log-sum-exp), merged exactly
               (Star Attention's phase 2, Tree Attention).
Handoff and distributed give every new token exact attention over the K/V the devices computed at
prefill (at a float32 wire: the same tokens).  `auto` picks by a cost model (see `choose`).

Here: the modes, the shapes of what they send, and the cost model `auto` chooses by.  The computation is
the executor's (runtime/device.py: decode_layer, answer, handoff_message, install_handoff), the loop that
drives it runtime/generate.py's `decode`; the simulator and the device processes differ only in what
carries the tensors (generate.LocalPeers, cluster.generation.DistPeers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.base import Geometry
from ..partition.plan import Plan
from .message import FLOAT_WIRES, Codec
from .modes import DECODE_MODES

MODES = DECODE_MODES


@dataclass(frozen=True)
class Link:
    """What `auto` assumes of the links between devices (the emulated `wifi` by default)."""

    mbit: float = 100.0
    ms: float = 5.0  # one way

    def seconds(self, nbytes: float, trips: int = 1) -> float:
        return nbytes * 8 / (self.mbit * 1e6) + trips * self.ms / 1e3


# --------------------------------------------------------------------------- what travels
def shared_mask(plan: Plan, positions: Tensor, src: int) -> Tensor:
    """(B, n_src) the rows of device `src` the decoding (last) device needs: its own slice, less the
    positions the decoding device recomputed itself (anchor copies).  positions: the request's (B, N)."""
    sl, last = plan.devices[src], plan.devices[-1]
    mine = torch.gather(positions, 1, sl.index.to(positions.device))
    first = torch.tensor(last.anchors, device=positions.device).unsqueeze(1)  # (B, 1)
    return sl.owned.to(positions.device) & (mine >= first)


def kv_codec(geo: Geometry, wire: str) -> Codec:
    return Codec(wire, "contiguous", quant_group=geo.head_dim, cluster_width=geo.kv_width)


def handoff_shapes(geo: Geometry, wire: str, rows: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of one layer's hand-off message of `rows` rows."""
    width = 2 * geo.kv_width
    if wire == "int8":
        return [((rows, width), torch.int8), ((rows, width // geo.head_dim), torch.float16)]
    return [((rows, width), FLOAT_WIRES[wire])]


def query_wire(wire: str) -> torch.dtype:
    """Queries and partial attentions travel as floats (int8 is for K/V rows)."""
    return FLOAT_WIRES.get(wire, torch.float16)


def partial_shapes(geo: Geometry, wire: str) -> list[tuple[tuple[int, ...], torch.dtype]]:
    dtype = query_wire(wire)
    return [((1, geo.heads, 1, geo.head_dim), dtype), ((1, geo.heads, 1, 1), dtype)]


# --------------------------------------------------------------------------- choosing a mode
def exact_view(plan: Plan) -> bool:
    """Did the prefill send the decoding device every earlier position as itself (one device, a `tail`
    layout, or routes that summarising would not have halved)?"""
    return all(not bool(r.cand_valid.any()) for r in plan.routes_to(plan.world - 1))


def handoff_bytes(plan: Plan, positions: Tensor, geo: Geometry, wire: str) -> int:
    """What a handoff sends: every earlier device's shared rows, every layer, K and V."""
    rows = sum(int(shared_mask(plan, positions, p).sum()) for p in range(plan.world - 1))
    return geo.layers * sum(torch.Size(s).numel() * d.itemsize for s, d in handoff_shapes(geo, wire, rows))


def distributed_bytes_per_token(plan: Plan, geo: Geometry, wire: str) -> int:
    query = geo.heads * geo.head_dim * query_wire(wire).itemsize
    answer = sum(torch.Size(s).numel() * d.itemsize for s, d in partial_shapes(geo, wire))
    return geo.layers * (plan.world - 1) * (query + answer)


def choose(mode: str, plan: Plan, positions: Tensor, geo: Geometry, wire: str, new_tokens: int, link: Link) -> str:
    """`auto`: local when the prefill already gave the last device every earlier position as itself
    (`exact_view`); otherwise whichever of handoff (one transfer, overlapped with the first tokens) and
    distributed (a round trip per layer per token) costs less time on `link`."""
    if mode not in MODES:
        raise ValueError(f"unknown decode mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if exact_view(plan):
        return "local"
    hand = link.seconds(handoff_bytes(plan, positions, geo, wire))
    dist = new_tokens * link.seconds(distributed_bytes_per_token(plan, geo, wire), trips=2 * geo.layers)
    return "handoff" if hand <= dist else "distributed"
