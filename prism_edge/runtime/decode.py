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

The pieces here know nothing of how tensors travel: the simulator hands them over in process
(`handoff`, `distributed_step`), the device processes over torch.distributed (cluster.generation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..models.base import Geometry
from ..partition.plan import Plan
from .attention import Partial
from .comm import ByteLedger
from .device import DeviceExecutor
from .message import FLOAT_WIRES, Codec, decode, encode
from .modes import DECODE_MODES

MODES = DECODE_MODES


@dataclass(frozen=True)
class Link:
    """What `auto` assumes of the links between devices (the emulated `wifi` by default)."""

    mbit: float = 100.0
    ms: float = 5.0  # one way

    def seconds(self, nbytes: float, trips: int = 1) -> float:
        return nbytes * 8 / (self.mbit * 1e6) + trips * self.ms / 1e3


# --------------------------------------------------------------------------- the decoding device's step
def new_token(dev: DeviceExecutor, index: int, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """The new position's attention input and query (B, H, 1, hd); its K/V join the device's cache."""
    g, layer, c = dev.geo, dev.adapter.layers()[index], dev.cache[index]
    h = dev.adapter.attn_input(layer, x)
    q, k, v = dev.adapter.qkv(layer, h)
    q, k, v = dev._heads(q, g.heads), dev._heads(k, g.kv_heads), dev._heads(v, g.kv_heads)
    if g.rotary:
        rot = dev.adapter.rotary(x, positions)
        assert rot is not None  # a rotary family's adapter returns (cos, sin)
        q, k = apply_rotary_pos_emb(q, k, *rot)
    c.k, c.v = torch.cat([c.k, k], 2), torch.cat([c.v, v], 2)
    c.own_mask = torch.cat([c.own_mask, c.own_mask.new_zeros(c.own_mask.shape[:-1] + (1,))], -1)
    return h, q


def local_step(dev: DeviceExecutor, index: int, x: Tensor, positions: Tensor) -> Tensor:
    """One new position (B, 1, d) on the decoding device: attention over the rows it holds."""
    h, q = new_token(dev, index, x, positions)
    c = dev.cache[index]
    k = torch.cat([c.remote_k, c.k], 2)
    v = torch.cat([c.remote_v, c.v], 2)
    ctx = dev._partial(index, q, k, v, torch.cat([c.remote_mask, c.own_mask], -1)).out
    return finish(dev, index, x, h, ctx)


def own_partial(dev: DeviceExecutor, index: int, q: Tensor) -> Partial:
    """The decoding device's partial attention over its own cache (prompt slice and new tokens)."""
    c = dev.cache[index]
    return dev._partial(index, q, c.k, c.v, c.own_mask)


def finish(dev: DeviceExecutor, index: int, x: Tensor, h: Tensor, ctx: Tensor) -> Tensor:
    return dev.adapter.after_attention(dev.adapter.layers()[index], x, h, dev._flat(ctx))


# --------------------------------------------------------------------------- what earlier devices provide
def shared_mask(plan: Plan, positions: Tensor, src: int) -> Tensor:
    """(B, n_src) the rows of device `src` the decoding (last) device needs: its own slice, less the
    positions the decoding device recomputed itself (anchor copies).  positions: the request's (B, N)."""
    sl, last = plan.devices[src], plan.devices[-1]
    mine = torch.gather(positions, 1, sl.index.to(positions.device))
    first = torch.tensor(last.anchors, device=positions.device).unsqueeze(1)  # (B, 1)
    return sl.owned.to(positions.device) & (mine >= first)


def kv_codec(geo: Geometry, wire: str) -> Codec:
    return Codec(wire, "contiguous", quant_group=geo.head_dim, cluster_width=geo.kv_width)


def handoff_message(dev: DeviceExecutor, index: int, shared: Tensor) -> list[Tensor]:
    """One layer's K/V of the shared rows (generation: B = 1), encoded for the wire: (R, 2 * kv_width)."""
    c, rows = dev.cache[index], shared[0]
    kv = torch.cat([c.k[0, :, rows].transpose(0, 1).flatten(1), c.v[0, :, rows].transpose(0, 1).flatten(1)], dim=-1)
    return encode(kv, kv_codec(dev.geo, dev.codec.wire))


def handoff_shapes(geo: Geometry, wire: str, rows: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of one layer's hand-off message of `rows` rows."""
    width = 2 * geo.kv_width
    if wire == "int8":
        return [((rows, width), torch.int8), ((rows, width // geo.head_dim), torch.float16)]
    return [((rows, width), FLOAT_WIRES[wire])]


def install_handoff(last: DeviceExecutor, index: int, messages: list[list[Tensor]]) -> None:
    """Replace what the last device received at prefill for layer `index` by the handed-off K/V."""
    g, cache = last.geo, last.cache[index]
    rows = [decode(m, kv_codec(g, last.codec.wire), cache.k.dtype).to(cache.k.device) for m in messages]
    k, v = torch.cat(rows).split(g.kv_width, dim=-1)  # (R, kv_width) each
    cache.remote_k = k.view(1, -1, g.kv_heads, g.head_dim).transpose(1, 2)
    cache.remote_v = v.view(1, -1, g.kv_heads, g.head_dim).transpose(1, 2)
    cache.remote_mask = cache.remote_mask.new_zeros(1, 1, 1, cache.remote_k.shape[2])


def query_wire(wire: str) -> torch.dtype:
    """Queries and partial attentions travel as floats (int8 is for K/V rows)."""
    return FLOAT_WIRES.get(wire, torch.float16)


def partial_message(dev: DeviceExecutor, index: int, q: Tensor, shared: Tensor) -> list[Tensor]:
    """An earlier device's answer to a query (B, H, 1, hd): its partial attention over its shared rows."""
    c = dev.cache[index]
    mask = torch.zeros_like(c.own_mask).masked_fill(~shared.view(1, 1, 1, -1), torch.finfo(c.k.dtype).min)
    part = dev._partial(index, q.to(c.k.dtype), c.k, c.v, mask)
    wire = query_wire(dev.codec.wire)
    return [part.out.to(wire), part.lse.to(wire)]


def partial_shapes(geo: Geometry, wire: str) -> list[tuple[tuple[int, ...], torch.dtype]]:
    dtype = query_wire(wire)
    return [((1, geo.heads, 1, geo.head_dim), dtype), ((1, geo.heads, 1, 1), dtype)]


# --------------------------------------------------------------------------- the simulator's hand-overs
def handoff(devs: list[DeviceExecutor], positions: Tensor, ledger: ByteLedger) -> None:
    """Every earlier device's own K/V of every layer replaces what the last device received at prefill
    (counted under the ledger stage "handoff")."""
    last, plan = devs[-1], devs[-1].plan
    shared = [shared_mask(plan, positions, p) for p in range(len(devs) - 1)]
    for i in range(len(last.cache)):
        messages = [handoff_message(dev, i, shared[p]) for p, dev in enumerate(devs[:-1])]
        for p, message in enumerate(messages):
            for t in message:
                ledger.record("handoff", p, last.rank, t)
        install_handoff(last, i, messages)


def distributed_step(devs: list[DeviceExecutor], positions: Tensor, index: int, x: Tensor, pos: Tensor,
                     ledger: ByteLedger) -> Tensor:
    """One new position: the last device's own partial attention, merged with every earlier device's
    partial over its shared rows for the query it was sent (counted under the stage "decode")."""
    last = devs[-1]
    h, q = new_token(last, index, x, pos)
    merged = own_partial(last, index, q)
    sent = q.to(query_wire(last.codec.wire))
    for p, dev in enumerate(devs[:-1]):
        ledger.record("decode", last.rank, p, sent)
        back = partial_message(dev, index, sent, shared_mask(last.plan, positions, p))
        for t in back:
            ledger.record("decode", p, last.rank, t)
        merged = merged.join(Partial(back[0].to(q.dtype), back[1].to(q.dtype)))
    return finish(last, index, x, h, merged.out)


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
