"""One route's message in one layer: how the sender builds it and how the receiver reads it back.

The sender lays every sequence out as the plan's slots [exact | top-k | groups] and drops the unused
slots, so what travels is (R, width) rows with no padding, plus, when they are not implied by the
plan, the sizes of the groups (int16).  On an int8 wire every row also carries one float16 scale per
`quant_group` values.  Nothing else travels: kv payloads arrive with their keys already rotated, so
the receiver needs no positions, and the plan fixes every shape in advance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..partition.plan import Route

FLOAT_WIRES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KMEANS_ROUNDS = 6  # rounds of k-means for similarity grouping (converged in the prototypes by 4-6)
MIN_SCALE = 2.0**-14  # smallest int8 scale: float16's smallest normal number


@dataclass(frozen=True)
class Codec:
    """How a device encodes the rows it sends: wire dtype, grouping, int8 scale groups."""

    wire: str  # float32 | float16 | bfloat16 | int8
    grouping: str  # contiguous | similarity
    quant_group: int  # values per int8 scale: a head's width for kv payloads, the whole row otherwise
    cluster_width: int  # leading columns similarity grouping compares: the keys of a kv payload

    def counts_travel(self, route: Route) -> bool:
        """Group sizes are implied by the plan unless top-k picks or similarity grouping change them."""
        return route.group_rows > 0 and (route.k_max > 0 or self.grouping == "similarity")

    def row_bytes(self, width: int) -> int:
        """Bytes of one travelling row of `width` values (on an int8 wire with its float16 scales)."""
        if self.wire == "int8":
            return width + 2 * (width // self.quant_group)
        return width * FLOAT_WIRES[self.wire].itemsize

    def expected(self, route: Route, width: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of every tensor of the route's message, in order."""
        rows = route.rows
        out: list[tuple[tuple[int, ...], torch.dtype]]
        if self.wire == "int8":
            out = [((rows, width), torch.int8), ((rows, width // self.quant_group), torch.float16)]
        else:
            out = [((rows, width), FLOAT_WIRES[self.wire])]
        if self.counts_travel(route):
            out.append(((route.group_rows,), torch.int16))
        return out


def take(x: Tensor, index: Tensor) -> Tensor:
    """(B, n, w) rows at (B, m) indices -> (B, m, w)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def group_means(rows: Tensor, live: Tensor, assign: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Mean of the live rows of each group: (B, c, w), (B, c), (B, c) -> (B, g, w), counts (B, g)."""
    batch, c, w = rows.shape
    flat = (assign + torch.arange(batch, device=rows.device).unsqueeze(1) * groups)[live]  # (L,)
    sums = rows.new_zeros(batch * groups, w).index_add(0, flat, rows[live])
    counts = torch.zeros(batch * groups, device=rows.device, dtype=torch.long).index_add(
        0, flat, torch.ones_like(flat))
    means = sums / counts.clamp(min=1).to(rows.dtype).unsqueeze(-1)
    return means.view(batch, groups, w), counts.view(batch, groups)


@torch.no_grad()
def similarity_groups(x: Tensor, live: Tensor, assign: Tensor, groups: Tensor, rounds: int = KMEANS_ROUNDS) -> Tensor:
    """k-means on cosine similarity, started from the contiguous segments: the same number of groups,
    but each row joins the group whose members it resembles (ToMe's observation: alike rows merge
    with little loss).  x: (B, c, w), groups: (B,) -> new assignment (B, c)."""
    g_max = int(groups.max())
    xn = F.normalize(x.float(), dim=-1)
    allowed = torch.arange(g_max, device=x.device) < groups.to(x.device).unsqueeze(1)  # (B, g)
    for _ in range(rounds):
        centroids, _ = group_means(xn, live, assign, g_max)
        sim = xn @ F.normalize(centroids, dim=-1).transpose(1, 2)  # (B, c, g)
        assign = sim.masked_fill(~allowed.unsqueeze(1), float("-inf")).argmax(-1)
    return assign


def summarise(route: Route, source: Tensor, scores: Tensor | None, codec: Codec) -> tuple[Tensor, Tensor]:
    """The route's rows in slot order, packed: (R, w) rows and (G,) group sizes."""
    parts = [take(source, route.exact)]  # (B, e, w)
    cand = take(source, route.cand)  # (B, c, w)
    live = route.cand_valid
    k = route.k_max
    if k:
        assert scores is not None, "a route with top-k picks needs the sender's importance scores"
        ranked = torch.gather(scores, 1, route.cand).masked_fill(~live, float("-inf"))
        pick = ranked.topk(k, dim=1).indices  # (B, k) best first
        chosen = torch.arange(k, device=source.device) < route.topk.unsqueeze(1)
        parts.append(take(cand, pick))
        live = live & ~torch.zeros_like(live).scatter(1, pick, chosen)
    assign = route.segment
    if codec.grouping == "similarity" and route.g_max:
        assign = similarity_groups(cand[..., : codec.cluster_width], live, assign, route.groups)
    means, counts = group_means(cand, live, assign, route.g_max)  # (B, g, w), (B, g)
    parts.append(means)
    rows = torch.cat(parts, dim=1)[route.slot_valid]  # (R, w)
    group_slots = route.slot_valid[:, route.width - route.g_max :]
    return rows, counts[group_slots]


def encode(rows: Tensor, codec: Codec) -> list[Tensor]:
    """(R, w) rows -> the tensors that travel: the rows at the wire dtype, or int8 rows and scales
    (rounding has no gradient: the executor refuses an int8 wire while training)."""
    if codec.wire != "int8":
        return [rows.to(FLOAT_WIRES[codec.wire])]
    r, w = rows.shape
    grouped = rows.detach().float().view(r, w // codec.quant_group, codec.quant_group)
    scale = (grouped.abs().amax(-1) / 127).clamp(min=MIN_SCALE).to(torch.float16)  # (R, w / group)
    q = torch.round(grouped / scale.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return [q.view(r, w), scale]


def decode(tensors: list[Tensor], codec: Codec, dtype: torch.dtype) -> Tensor:
    """The travelling tensors -> (R, w) rows at the compute dtype."""
    if codec.wire != "int8":
        return tensors[0].to(dtype)
    q, scale = tensors[0], tensors[1]
    r, w = q.shape
    rows = q.float().view(r, scale.shape[1], -1) * scale.float().unsqueeze(-1)
    return rows.view(r, w).to(dtype)


def pack(route: Route, source: Tensor, scores: Tensor | None, codec: Codec) -> list[Tensor]:
    """Sender: (B, n, w) local rows (and (B, n) importance scores for top-k) -> the message."""
    rows, counts = summarise(route, source, scores, codec)
    out = encode(rows, codec)
    if codec.counts_travel(route):
        out.append(counts.to(torch.int16))
    return out


def unpack(route: Route, tensors: list[Tensor], codec: Codec, batch: int, like: Tensor
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Receiver: the message -> buffer (B, S, w), slot validity (B, S) and positions behind each slot."""
    tensors = [t.to(like.device) for t in tensors]  # gloo delivers to host memory
    rows = decode(tensors, codec, like.dtype)  # (R, w)
    buf = rows.new_zeros(batch, route.width, rows.shape[-1])
    buf = buf.index_put((route.slot_valid,), rows)
    valid, count = route.slot_valid, route.slot_count
    if codec.counts_travel(route):
        group_slots = route.slot_valid.clone()
        group_slots[:, : route.width - route.g_max] = False
        count = count.index_put((group_slots,), tensors[-1].to(count.dtype))
        valid = valid & (count > 0)  # a group emptied by top-k picks holds nothing
    return buf, valid, count.clamp(min=1)
