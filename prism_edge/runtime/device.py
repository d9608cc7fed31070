"""One device's share of a forward pass: the code every device runs, in the simulator and in the runtime.

A layer is two halves around the exchange, so the same code serves an in-process simulator (all
devices step together) and one process per device (torch.distributed in between):

    state, outgoing = dev.send(i, x)        # {dst: (rows, width) tensor}
    incoming = <communicator>(outgoing)     # {src: (rows, width) tensor}
    x = dev.receive(i, state, incoming)

Device `rank` computes Q, K, V for its own rows only, and K, V only for the rows it receives (or
receives them ready-made): no device ever computes K/V for another device's full slice.

Decoding is the same executor's other half (after a prefill with keep_cache): a new position joins the
last device's slice and runs `decode_layer` there; what it sees of the earlier devices' rows is what the
prefill left in the cache, their hand-off (`handoff_message` -> `install_handoff`), or their partial
attention for its query (`answer`), by decode mode (runtime/decode.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..config import RunConfig
from ..models.base import Adapter, Batch, Geometry
from ..partition import masks
from ..partition.plan import Plan
from . import message
from .attention import Partial, expand_kv, importance, merge_heads, partial_attention, split_heads
from .decode import kv_codec, query_wire, shared_mask
from .message import Codec

Ask = Callable[[int, Tensor], list[list[Tensor]]]  # (layer, query) -> every earlier device's [out, lse]


def resolve_payload(cfg: RunConfig, rotary: bool, hidden: int, kv_width: int) -> str:
    """What one exchanged row holds: the normalised attention input ("hidden") or its K and V ("kv").

    Both are exact at CR=1 because K and V are affine in the attention input.  Rotary keys depend on
    the position, so a mean of several positions must be taken after rotation: kv.
    """
    if cfg.scheme != "prism":
        return "hidden"  # Voltage ships activations and every device recomputes K/V (the baseline)
    if cfg.payload == "auto":
        return "kv" if rotary or 2 * kv_width < hidden else "hidden"
    if cfg.payload == "hidden" and rotary and cfg.cr > 1:
        raise ValueError(
            "payload='hidden' cannot carry rotary positions through a segment mean; use payload='kv' or 'auto'"
        )
    return cfg.payload


def exchange_layout(cfg: RunConfig, geo: Geometry, wire: str) -> tuple[str, Codec, int]:
    """(payload, codec, values per row) of what a device exchanges under `cfg` on `wire`: a kv row is a
    position's K and V with an int8 scale per head, a hidden row the attention input with one per row."""
    payload = resolve_payload(cfg, geo.rotary, geo.hidden, geo.kv_width)
    kv = payload == "kv"
    codec = Codec(wire, cfg.grouping, quant_group=geo.head_dim if kv else geo.hidden,
                  cluster_width=geo.kv_width if kv else geo.hidden)
    return payload, codec, 2 * geo.kv_width if kv else geo.hidden


def row_cost(cfg: RunConfig, geo: Geometry, wire: str) -> tuple[float, float]:
    """(bytes of one exchanged row, of one group's int16 size) over the bytes of one Voltage row (the
    float32 attention input), for `cfg`'s payload on `wire`: what a byte budget is measured against."""
    _, codec, width = exchange_layout(cfg, geo, wire)
    voltage = 4 * geo.hidden
    return codec.row_bytes(width) / voltage, 2 / voltage


@dataclass
class LayerCache:
    """One layer's keys and values on a device after prefill: exact for its own rows (and every
    position generated since), and the rows it received from earlier devices, with their mask."""

    k: Tensor  # (B, Hkv, n, hd) own rows (anchor copies first), rotated
    v: Tensor
    own_mask: Tensor  # (B, 1, 1, n) additive: 0 for real own rows
    remote_k: Tensor  # (B, Hkv, M, hd) received rows (means, sinks, window, top-k), rotated
    remote_v: Tensor
    remote_mask: Tensor  # (B, 1, 1, M) additive, count bias included


@dataclass
class LayerState:
    """One layer in flight on one device.  Q (and K, V for a hidden payload) are computed only after
    the message is out (see DeviceExecutor.project), so that work overlaps the exchange."""

    index: int
    x: Tensor  # (B, n, d) residual stream entering the layer
    h: Tensor  # (B, n, d) attention input
    q: Tensor | None = None  # (B, H, n, hd)
    k: Tensor | None = None  # (B, Hkv, n, hd)
    v: Tensor | None = None  # (B, Hkv, n, hd)

    def projected(self) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V of the own rows, once DeviceExecutor.project has computed them."""
        assert self.q is not None and self.k is not None and self.v is not None, "project the layer first"
        return self.q, self.k, self.v


class _Heads:
    """What the prefill and the decode halves share: head reshapes and attention over a subset of the keys."""

    adapter: Adapter
    geo: Geometry

    def _heads(self, t: Tensor, heads: int) -> Tensor:
        return split_heads(t, heads, self.geo.head_dim)  # (B, heads, n, hd)

    def _flat(self, t: Tensor) -> Tensor:
        return merge_heads(t)  # (B, n, heads * hd)

    def _expand_kv(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return expand_kv(k, v, self.geo.heads)

    def _partial(self, index: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Partial:
        k, v = self._expand_kv(k, v)
        return partial_attention(q, k, v, mask, self.adapter.scale(index))


class _DecodeHalf(_Heads):
    """The executor's decode half: one new position at a time, after a prefill that kept its cache."""

    plan: Plan
    rank: int
    codec: Codec
    cache: list[LayerCache]
    layers: range  # the model layers this device holds (its pipeline stage's)
    request_positions: Tensor
    _shared: Tensor | None

    def cached(self, index: int) -> LayerCache:
        """Model layer `index`'s cache (the cache holds this device's layers only)."""
        return self.cache[index - self.layers.start]

    def decode_layer(self, index: int, x: Tensor, positions: Tensor, ask: Ask | None = None) -> Tensor:
        """One new position (B, 1, d) through layer `index` on the decoding (last) device; its K/V join the
        cache.  ask None: attention over the rows this device holds (its cache and what it received at
        prefill, or was handed off).  Else the own cache's partial attention, merged exactly with every
        earlier device's answer to `ask(index, query)` (their partials over the rows they own)."""
        g, layer, c = self.geo, self.adapter.layers()[index], self.cached(index)
        h = self.adapter.attn_input(layer, x)
        q, k, v = self.adapter.qkv(layer, h)
        q, k, v = self._heads(q, g.heads), self._heads(k, g.kv_heads), self._heads(v, g.kv_heads)
        if g.rotary:
            rot = self.adapter.rotary(x, positions)
            assert rot is not None  # a rotary family's adapter returns (cos, sin)
            q, k = apply_rotary_pos_emb(q, k, *rot)
        c.k, c.v = torch.cat([c.k, k], 2), torch.cat([c.v, v], 2)
        c.own_mask = torch.cat([c.own_mask, c.own_mask.new_zeros(c.own_mask.shape[:-1] + (1,))], -1)
        if ask is None:
            mask = torch.cat([c.remote_mask, c.own_mask], -1)
            ctx = self._partial(index, q, torch.cat([c.remote_k, c.k], 2), torch.cat([c.remote_v, c.v], 2), mask).out
        else:
            merged = self._partial(index, q, c.k, c.v, c.own_mask)
            for out, lse in ask(index, q.to(query_wire(self.codec.wire)).contiguous()):
                merged = merged.join(Partial(out.to(q.dtype), lse.to(q.dtype)))
            ctx = merged.out
        return self.adapter.after_attention(layer, x, h, self._flat(ctx))

    def shared_rows(self) -> Tensor:
        """(B, n) the own rows the decoding device needs from this (earlier) device."""
        if self._shared is None:
            self._shared = shared_mask(self.plan, self.request_positions, self.rank)
        return self._shared

    def answer(self, index: int, query: Tensor) -> list[Tensor]:
        """An earlier device's answer to the decoding device's query (B, H, 1, hd): its partial attention
        (output and log-sum-exp, at the query's wire dtype) over its shared rows of layer `index`."""
        c = self.cached(index)
        mask = torch.zeros_like(c.own_mask).masked_fill(~self.shared_rows().view(1, 1, 1, -1), torch.finfo(c.k.dtype).min)
        part = self._partial(index, query.to(c.k.dtype), c.k, c.v, mask)
        wire = query_wire(self.codec.wire)
        return [part.out.to(wire), part.lse.to(wire)]

    def handoff_message(self, index: int) -> list[Tensor]:
        """An earlier device's K/V of its shared rows of layer `index` (generation: B = 1), encoded for the
        wire: (R, 2 * kv_width)."""
        c, rows = self.cached(index), self.shared_rows()[0]
        kv = torch.cat([c.k[0, :, rows].transpose(0, 1).flatten(1), c.v[0, :, rows].transpose(0, 1).flatten(1)], -1)
        return message.encode(kv, kv_codec(self.geo, self.codec.wire))

    def install_handoff(self, index: int, messages: list[list[Tensor]]) -> None:
        """The decoding device: every earlier device's handed-off K/V replace what it received at prefill."""
        g, cache = self.geo, self.cached(index)
        codec = kv_codec(g, self.codec.wire)
        rows = [message.decode(m, codec, cache.k.dtype).to(cache.k.device) for m in messages]
        k, v = torch.cat(rows).split(g.kv_width, dim=-1)  # (R, kv_width) each
        cache.remote_k = k.view(1, -1, g.kv_heads, g.head_dim).transpose(1, 2)  # (1, Hkv, R, hd)
        cache.remote_v = v.view(1, -1, g.kv_heads, g.head_dim).transpose(1, 2)
        cache.remote_mask = cache.remote_mask.new_zeros(1, 1, 1, cache.remote_k.shape[2])


class DeviceExecutor(_DecodeHalf):
    """One device's share of every layer: the prefill half here, the decode half inherited."""

    def __init__(self, adapter: Adapter, plan: Plan, rank: int, cfg: RunConfig, batch: Batch,
                 layers: range | None = None) -> None:
        """rank: this device's place in `plan` (its stage's PRISM group); layers: the model layers it runs (its
        pipeline stage's; default every layer)."""
        self.adapter, self.plan, self.rank, self.cfg = adapter, plan, rank, cfg
        self.geo = g = adapter.geometry
        self.layers = layers if layers is not None else range(g.layers)
        self.slice = plan.devices[rank]
        self.out_routes = plan.routes_from(rank)
        self.in_routes = plan.routes_to(rank)
        self.payload, self.codec, self._width = exchange_layout(cfg, g, cfg.wire_for(batch.longest))
        self.request_positions = batch.positions  # (B, N)
        self.positions = torch.gather(batch.positions, 1, self.slice.index)  # (B, n)
        self.remote_positions = [
            torch.gather(batch.positions, 1, r.slot_index.clamp(min=0)) for r in self.in_routes
        ]  # (B, S) per incoming route; only exact slots' entries are meaningful
        self._own_mask: Tensor | None = None
        self._rope: tuple | None = None
        self._shared: Tensor | None = None
        self.keep_cache = False  # keep each layer's K/V after the forward, for decoding on this device
        self.cache: list[LayerCache] = []

    # ------------------------------------------------------------------ set-up per request
    def own_mask(self, dtype: torch.dtype) -> Tensor:
        """(B, 1, n, n) additive mask over the own rows (anchor copies included), built once per request."""
        if self._own_mask is None or self._own_mask.dtype != dtype:
            allowed = masks.own_mask(self.slice.valid, self.geo.causal)
            self._own_mask = masks.additive_mask(allowed, None, dtype)
        return self._own_mask

    def remote_mask(self, slots: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> Tensor:
        """(B, 1, n, M) additive mask over the received slots of this layer: (validity, count) per route."""
        n = self.slice.rows
        if not slots:
            return torch.zeros(self.slice.valid.shape[0], 1, n, 0, dtype=dtype, device=self.slice.valid.device)
        valid = torch.cat([v for v, _ in slots], dim=1)
        # anchor copies are the sequence's first positions: everything received lies in their future
        allowed = masks.and_masks(masks.remote_mask(valid, n), ~self.slice.anchor_rows.unsqueeze(-1))
        bias = None
        if self.cfg.count_bias and self.cfg.scheme == "prism":
            bias = torch.cat([c for _, c in slots], dim=1).log().unsqueeze(1)  # (B, 1, M)
        return masks.additive_mask(allowed, bias, dtype)

    def rope(self, x: Tensor):
        """(own cos/sin, [cos/sin per incoming route]) for rotary models, computed once per request."""
        if self._rope is None:
            own = self.adapter.rotary(x, self.positions)
            # received K arrive rotated with a kv payload; only hidden rows need rotating here
            remote = [self.adapter.rotary(x, pos) for pos in self.remote_positions] if self.payload == "hidden" else []
            self._rope = (own, remote)
        return self._rope

    def expected(self) -> dict[int, list[tuple[tuple[int, ...], torch.dtype]]]:
        """(shape, dtype) of every tensor of the message from every device that sends to this one."""
        width = self.wire_width()
        return {r.src: self.codec.expected(r, width) for r in self.in_routes}

    def wire_width(self) -> int:
        return self._width

    # ------------------------------------------------------------------ the layer
    def embed(self, local: dict[str, Tensor]) -> Tensor:
        return self.adapter.embed(local)

    def send(self, index: int, x: Tensor) -> tuple[LayerState, dict[int, list[Tensor]]]:
        """Only what the outgoing messages need: the attention input (and K, V for a kv payload; Q and
        K when top-k rows are chosen by the attention the own queries pay them)."""
        layer = self.adapter.layers()[index]
        if self.codec.wire == "int8" and self.adapter.model.training and torch.is_grad_enabled():
            raise ValueError("the int8 wire has no gradient (rounding); fine-tune with wire_dtype float16 or "
                             "bfloat16, then serve with int8")
        state = LayerState(index, x, self.adapter.attn_input(layer, x))
        if self.payload == "kv":
            g = self.geo
            k, v = self.adapter.kv(layer, state.h)
            state.k, state.v = self._heads(k, g.kv_heads), self._heads(v, g.kv_heads)
            if g.rotary:
                (cos, sin), _ = self.rope(x)
                state.k = apply_rotary_pos_emb(state.k, state.k, cos, sin)[0]
            source = torch.cat([self._flat(state.k), self._flat(state.v)], dim=-1)
        else:
            source = state.h
        scores: dict[bool, Tensor] = {}
        if any(r.k_max for r in self.out_routes):
            self.project(state)
        outgoing = {}
        for r in self.out_routes:
            side = r.dst > self.rank
            if r.k_max and side not in scores:
                q, k, v = state.projected()
                k, _ = self._expand_kv(k, v)  # (B, H, n, hd)
                scores[side] = importance(q, k, r.observe, r.observe_valid, self.own_mask(k.dtype),
                                          self.adapter.scale(index))
            outgoing[r.dst] = message.pack(r, source, scores.get(side), self.codec)
        return state, outgoing

    def project(self, state: LayerState) -> LayerState:
        """The own rows' Q (and K, V where send did not need them): runs while the messages travel."""
        if state.q is not None:
            return state
        g, layer = self.geo, self.adapter.layers()[state.index]
        if state.k is None:
            q, k, v = self.adapter.qkv(layer, state.h)
            q, state.k, state.v = self._heads(q, g.heads), self._heads(k, g.kv_heads), self._heads(v, g.kv_heads)
            if g.rotary:
                (cos, sin), _ = self.rope(state.x)
                q, state.k = apply_rotary_pos_emb(q, state.k, cos, sin)
        else:
            q = self._heads(self.adapter.q(layer, state.h), g.heads)
            if g.rotary:
                (cos, sin), _ = self.rope(state.x)
                q = apply_rotary_pos_emb(q, q, cos, sin)[0]
        state.q = q
        return state

    def _remote_kv(self, layer, incoming: dict[int, list[Tensor]], like: Tensor
                   ) -> tuple[list[Tensor], list[Tensor], list[tuple[Tensor, Tensor]]]:
        g = self.geo
        keys, values, slots = [], [], []
        for j, route in enumerate(self.in_routes):
            rows, valid, count = message.unpack(route, incoming[route.src], self.codec, like.shape[0], like)
            if self.payload == "kv":
                k, v = rows.split(g.kv_width, dim=-1)
                k, v = self._heads(k, g.kv_heads), self._heads(v, g.kv_heads)
            else:
                k, v = self.adapter.kv(layer, rows)
                k, v = self._heads(k, g.kv_heads), self._heads(v, g.kv_heads)
                if g.rotary:  # exact rows only (resolve_payload refuses hidden means on rotary models)
                    cos, sin = self.rope(like)[1][j]
                    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
            keys.append(k)
            values.append(v)
            slots.append((valid, count))
        return keys, values, slots

    def attend_own(self, index: int, state: LayerState) -> Partial:
        """Attention over this device's own keys only: what can run while the exchange is in flight."""
        if self.adapter.model.training and self.adapter.attn_dropout() > 0:
            raise ValueError("split (overlapped) attention is for inference; call model.eval() or use receive() alone")
        q, k, v = self.project(state).projected()
        return self._partial(index, q, k, v, self.own_mask(q.dtype))

    def receive(self, index: int, state: LayerState, incoming: dict[int, list[Tensor]],
                own: Partial | None = None) -> Tensor:
        """Finish the layer once the messages are in.

        Without `own`: one attention over [own keys ; received keys].  With `own` (from attend_own,
        computed while the messages travelled): attention over the received keys only, merged
        exactly with `own` by log-sum-exp.
        """
        layer = self.adapter.layers()[index]
        q, own_k, own_v = self.project(state).projected()
        keys, values, slots = self._remote_kv(layer, incoming, state.x)
        remote_mask = self.remote_mask(slots, q.dtype)
        if self.keep_cache:
            self.cache.append(layer_cache(state, self.slice.valid, keys, values, remote_mask))
        if own is not None:
            if keys:
                remote = self._partial(index, q, torch.cat(keys, dim=2), torch.cat(values, dim=2), remote_mask)
                ctx = own.merge(remote)
            else:
                ctx = own.out
            return self.adapter.after_attention(layer, state.x, state.h, self._flat(ctx))
        k, v = self._expand_kv(torch.cat([own_k, *keys], dim=2), torch.cat([own_v, *values], dim=2))
        dropout = self.adapter.attn_dropout() if self.adapter.model.training else 0.0
        ctx = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=torch.cat([self.own_mask(q.dtype), remote_mask], dim=-1),
            dropout_p=dropout,
            scale=self.adapter.scale(index),
        )  # (B, H, n, hd)
        return self.adapter.after_attention(layer, state.x, state.h, self._flat(ctx))

    def final(self, x: Tensor) -> dict[str, Tensor]:
        return self.adapter.final(x)


def layer_cache(state: LayerState, valid: Tensor, keys: list[Tensor], values: list[Tensor],
                remote_mask: Tensor) -> LayerCache:
    """What a device keeps of one layer for decoding: its own K/V and what it received, with masks."""
    q, k, v = state.projected()
    n, dtype = valid.shape[1], q.dtype
    empty = k[:, :, :0]
    own = torch.zeros(remote_mask.shape[0], 1, 1, n, dtype=dtype, device=remote_mask.device)
    own = own.masked_fill(~valid.view(-1, 1, 1, n).to(own.device), torch.finfo(dtype).min)
    # in a decoder every owned row sees the same received rows: the last row's mask serves new tokens
    return LayerCache(k, v, own, torch.cat(keys, 2) if keys else empty,
                      torch.cat(values, 2) if values else empty, remote_mask[:, :, -1:, :])
