"""Decoding after a PRISM prefill: every new token joins the last device's slice.

In a decoder nothing ever attends to a later position, so the earlier devices never need the new
tokens; the question is only what the new tokens see of the prompt positions the earlier devices own:

  local        what the last device received at prefill (summaries, unless the prefill gave it an
               exact view with `tail`); no traffic while decoding.
  handoff      once, after prefill, the earlier devices send the last device the K/V they computed for
               their own positions (every layer, at the wire dtype); then decoding is local.
  distributed  every device keeps its own K/V; per new token and layer the query goes to the earlier
               devices and each returns its partial attention (output and log-sum-exp), merged exactly
               (Star Attention's phase 2, Tree Attention).
Handoff and distributed give every new token exact attention over the K/V the devices computed at
prefill (at a float32 wire: the same tokens).  `auto` picks by a cost model (see `choose`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .attention import Partial, partial_attention
from .comm import ByteLedger
from .device import DeviceExecutor
from .message import FLOAT_WIRES, Codec, decode, encode

MODES = ("auto", "local", "handoff", "distributed")


@dataclass(frozen=True)
class Link:
    """What `auto` assumes of the links between devices (the emulated `wifi` by default)."""

    mbit: float = 100.0
    ms: float = 5.0  # one way

    def seconds(self, nbytes: float, trips: int = 1) -> float:
        return nbytes * 8 / (self.mbit * 1e6) + trips * self.ms / 1e3


def new_token(dev: DeviceExecutor, index: int, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """The new position's attention input and query (B, H, 1, hd); its K/V join the device's cache."""
    g, layer, c = dev.geo, dev.adapter.layers()[index], dev.cache[index]
    h = dev.adapter.attn_input(layer, x)
    q, k, v = dev.adapter.qkv(layer, h)
    q, k, v = dev._heads(q, g.heads), dev._heads(k, g.kv_heads), dev._heads(v, g.kv_heads)
    if g.rotary:
        cos, sin = dev.adapter.rotary(x, positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
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
    return dev.adapter.after_attention(dev.adapter.layers()[index], x, h, dev._flat(ctx))


def shared_rows(dev: DeviceExecutor, last: DeviceExecutor) -> Tensor:
    """(B, n) the rows of `dev` the decoding device needs from it: its own slice, less the positions
    the decoding device recomputed itself (anchor copies)."""
    first = torch.tensor(last.slice.anchors, device=dev.positions.device).unsqueeze(1)  # (B, 1)
    return dev.slice.owned.to(dev.positions.device) & (dev.positions >= first)


def handoff(devs: list[DeviceExecutor], ledger: ByteLedger) -> None:
    """The earlier devices' own K/V of every layer, at the wire dtype, replace what the last device
    received at prefill (counted under the ledger stage "handoff")."""
    last = devs[-1]
    g = last.geo
    codec = Codec(last.codec.wire, "contiguous", quant_group=g.head_dim, cluster_width=g.kv_width)
    for i, cache in enumerate(last.cache):
        keys, values = [], []
        for p, dev in enumerate(devs[:-1]):
            rows = shared_rows(dev, last)[0]  # generation runs one prompt (B = 1)
            c = dev.cache[i]
            kv = torch.cat([c.k[0, :, rows].transpose(0, 1).flatten(1), c.v[0, :, rows].transpose(0, 1).flatten(1)],
                           dim=-1)  # (R, 2 * kv_width)
            sent = encode(kv, codec)
            for t in sent:
                ledger.record("handoff", p, last.rank, t)
            k, v = decode(sent, codec, c.k.dtype).split(g.kv_width, dim=-1)
            keys.append(k.view(1, -1, g.kv_heads, g.head_dim).transpose(1, 2))
            values.append(v.view(1, -1, g.kv_heads, g.head_dim).transpose(1, 2))
        cache.remote_k, cache.remote_v = torch.cat(keys, 2), torch.cat(values, 2)
        cache.remote_mask = cache.remote_mask.new_zeros(1, 1, 1, cache.remote_k.shape[2])


def distributed_step(devs: list[DeviceExecutor], index: int, x: Tensor, positions: Tensor,
                     ledger: ByteLedger) -> Tensor:
    """One new position: the last device's own partial attention, merged with every earlier device's
    partial over its own cached K/V for the query it was sent (counted under the stage "decode")."""
    last = devs[-1]
    h, q = new_token(last, index, x, positions)
    c = last.cache[index]
    merged = last._partial(index, q, c.k, c.v, c.own_mask)
    wire = FLOAT_WIRES.get(last.codec.wire, torch.float16)  # queries and partials travel as floats
    for p, dev in enumerate(devs[:-1]):
        sent = q.to(wire)
        ledger.record("decode", last.rank, p, sent)
        theirs = dev.cache[index]
        allowed = shared_rows(dev, last).view(1, 1, 1, -1)
        mask = torch.zeros_like(theirs.own_mask).masked_fill(~allowed, torch.finfo(q.dtype).min)
        part = dev._partial(index, sent.to(q.dtype), theirs.k, theirs.v, mask)
        back = [part.out.to(wire), part.lse.to(wire)]
        for t in back:
            ledger.record("decode", p, last.rank, t)
        merged = merged.join(Partial(back[0].to(q.dtype), back[1].to(q.dtype)))
    return last.adapter.after_attention(last.adapter.layers()[index], x, h, last._flat(merged.out))


def handoff_bytes(devs: list[DeviceExecutor]) -> int:
    """What a handoff would send: every earlier device's shared rows, every layer, 2 * kv_width values."""
    last = devs[-1]
    g = last.geo
    rows = sum(int(shared_rows(d, last).sum()) for d in devs[:-1])
    per_value = 1 if last.codec.wire == "int8" else FLOAT_WIRES[last.codec.wire].itemsize
    scales = 2 * 2 * g.kv_heads if last.codec.wire == "int8" else 0  # one float16 scale per head of K and of V
    return g.layers * rows * (2 * g.kv_width * per_value + scales)


def distributed_bytes_per_token(devs: list[DeviceExecutor]) -> int:
    g = devs[-1].geo
    itemsize = FLOAT_WIRES.get(devs[-1].codec.wire, torch.float16).itemsize
    return g.layers * (len(devs) - 1) * (2 * g.heads * g.head_dim + g.heads) * itemsize


def exact_view(last: DeviceExecutor) -> bool:
    """Did the prefill send the decoding device every earlier position as itself (one device, a `tail`
    layout, or routes that summarising would not have halved)?"""
    return all(not bool(r.cand_valid.any()) for r in last.in_routes)


def choose(mode: str, devs: list[DeviceExecutor], new_tokens: int, link: Link) -> str:
    """`auto`: local when the prefill already gave the last device every earlier position as itself
    (`exact_view`); otherwise whichever of handoff (one transfer, overlapped with the first tokens) and
    distributed (a round trip per layer per token) costs less time on `link`."""
    if mode not in MODES:
        raise ValueError(f"unknown decode mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if exact_view(devs[-1]):
        return "local"
    layers = devs[-1].geo.layers
    hand = link.seconds(handoff_bytes(devs))
    dist = new_tokens * (link.seconds(distributed_bytes_per_token(devs), trips=2 * layers))
    return "handoff" if hand <= dist else "distributed"
