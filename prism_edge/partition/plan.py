"""The partition plan: which positions each device owns and what it sends to whom, as plain data.

Everything here is a pure function of the padding mask and the sink flags, so every device (and the
simulator) derives the same plan from the same few request integers and nothing about the plan has
to travel per layer.  Ranges are half-open [start, end) throughout.

A route (src -> dst) splits the rows src sends dst into
  exact       rows that travel as themselves: attention sinks, the window of positions just before
              (encoders: and after) dst's slice, or every row when summarising would not pay;
  candidates  the rest, summarised each layer: the top-k by importance travel exactly (chosen by the
              sender at run time) and the others as one mean per group (a contiguous CR-segment, or a
              similarity group of the same count).
The message of one sequence is laid out as [exact | top-k | groups]; the receiver keeps that layout
("slots") in its buffer, so its shape is fixed by the plan whatever the sender picks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from ..config import Fidelity  # the plan's part of a RunConfig, with it in the foundation

OBSERVE = 16  # queries nearest a route's destination that score its rows (SnapKV's observation window)


def split_sizes(length: int, devices: int, weights: tuple[float, ...] | None = None) -> tuple[int, ...]:
    """Sizes of `devices` contiguous slices covering `length` positions, each >= 1.

    Equal weights give sizes that differ by at most one (earlier devices take the extra position);
    weights give slices proportional to them (largest-remainder rounding).
    """
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if length < devices:
        raise ValueError(
            f"cannot split {length} positions across {devices} devices: every device needs at least one "
            f"position; use devices <= {length}"
        )
    if weights is None:
        base, extra = divmod(length, devices)
        return tuple(base + (1 if p < extra else 0) for p in range(devices))
    if len(weights) != devices:
        raise ValueError(f"got {len(weights)} weights for {devices} devices; give one weight per device")
    total = float(sum(weights))
    ideal = [length * w / total for w in weights]
    sizes = [max(1, int(x)) for x in ideal]
    # Hand out (or take back) positions by largest (smallest) remainder until the sizes sum to length.
    while sum(sizes) < length:
        p = max(range(devices), key=lambda i: (ideal[i] - sizes[i], -i))
        sizes[p] += 1
    while sum(sizes) > length:
        p = min((i for i in range(devices) if sizes[i] > 1), key=lambda i: (ideal[i] - sizes[i], i))
        sizes[p] -= 1
    return tuple(sizes)


def slice_bounds(sizes: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Half-open [start, end) ranges of consecutive slices with the given sizes."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return tuple(bounds)


@dataclass(frozen=True)
class DeviceSlice:
    """The rows device `rank` computes: row i of sequence b is input position `index[b, i]`.

    In a decoder with anchor recompute, the first `anchors[b]` rows are copies of the sequence's first
    positions, computed here instead of received; the device answers only for its `owned` rows.
    """

    rank: int
    index: Tensor  # (B, n) long; 0 where not valid
    valid: Tensor  # (B, n) bool: rows computed here (anchor copies and owned rows)
    owned: Tensor  # (B, n) bool: this device's slice
    bounds: tuple[tuple[int, int], ...]  # per sequence: its slice [start, end) among the real positions
    anchors: tuple[int, ...]  # per sequence: leading rows that are anchor copies

    @property
    def rows(self) -> int:
        return self.index.shape[1]

    @property
    def anchor_rows(self) -> Tensor:
        """(B, n) bool: the anchor copies."""
        return self.valid & ~self.owned


@dataclass(frozen=True)
class Route:
    """What device `src` sends device `dst` in every layer (see the module docstring)."""

    src: int
    dst: int
    exact: Tensor  # (B, e) src-local rows sent as themselves
    exact_valid: Tensor  # (B, e)
    cand: Tensor  # (B, c) src-local rows summarised
    cand_valid: Tensor  # (B, c)
    segment: Tensor  # (B, c) contiguous segment of each candidate, 0.. within its sequence (0 where invalid)
    groups: Tensor  # (B,) summary groups per sequence
    topk: Tensor  # (B,) candidates per sequence sent exactly by importance
    observe: Tensor  # (B, o) src-local rows whose queries score the candidates
    observe_valid: Tensor  # (B, o)
    slot_valid: Tensor  # (B, S) receive-buffer slots [exact | top-k | groups] that hold a message row
    slot_count: Tensor  # (B, S) float: positions behind a slot before any top-k pick (1 where invalid)
    slot_index: Tensor  # (B, S) long: input position of an exact slot, -1 elsewhere

    @property
    def rows(self) -> int:
        """Rows in the message (all sequences, no padding)."""
        return int(self.slot_valid.sum())

    @property
    def width(self) -> int:
        """Receive-buffer slots per sequence."""
        return self.slot_valid.shape[1]

    @property
    def k_max(self) -> int:
        """Top-k slots per sequence."""
        return int(self.topk.max()) if self.topk.numel() else 0

    @property
    def g_max(self) -> int:
        """Group slots per sequence."""
        return self.width - self.exact.shape[1] - self.k_max

    @property
    def group_rows(self) -> int:
        """Group-mean rows in the message (all sequences)."""
        return int(self.groups.sum())


@dataclass(frozen=True)
class Plan:
    devices: tuple[DeviceSlice, ...]
    routes: tuple[Route, ...]
    causal: bool
    fidelity: Fidelity

    @property
    def cr(self) -> int:
        return self.fidelity.cr

    @property
    def world(self) -> int:
        return len(self.devices)

    def to(self, device: torch.device) -> "Plan":
        """The plan's index tensors on a model's device (plans are built on the CPU)."""
        if torch.device(device).type == "cpu":
            return self

        def moved(obj):
            return replace(obj, **{f.name: getattr(obj, f.name).to(device) for f in fields(obj)
                                   if isinstance(getattr(obj, f.name), Tensor)})

        return replace(self, devices=tuple(map(moved, self.devices)), routes=tuple(map(moved, self.routes)))

    def routes_from(self, rank: int) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if r.src == rank)

    def routes_to(self, rank: int) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if r.dst == rank)


def make_plan(
    valid: Tensor,
    sink: Tensor,
    *,
    devices: int,
    fidelity: Fidelity | None = None,
    causal: bool = False,
    weights: tuple[float, ...] | None = None,
    sizes: tuple[int, ...] | None = None,
) -> Plan:
    """Partition every sequence's real positions across devices and route summaries between them.

    valid: (B, N) bool, True at real (non-padding) positions.  sink: (B, N) bool, positions to send
    exactly.  Each sequence is split over its own real positions, so padding never enters a slice
    or a mean, and a sequence's plan never depends on the rest of the batch.  In a causal plan a
    device sends only to later devices (earlier ones may not see its positions).
    """
    fid = fidelity or Fidelity()
    if valid.dim() != 2 or sink.shape != valid.shape:
        raise ValueError(f"valid and sink must both be (batch, positions); got {tuple(valid.shape)}, {tuple(sink.shape)}")
    if fid.anchor and not causal:
        raise ValueError("anchor recompute needs a causal model; use anchor=0 for encoders")
    valid, sink = valid.cpu().bool(), sink.cpu().bool()
    batch = valid.shape[0]
    real = [torch.nonzero(valid[b]).flatten() for b in range(batch)]
    tail = fid.tail if causal else 0
    bounds = [_bounds(len(positions), b, devices, weights, sizes, tail) for b, positions in enumerate(real)]
    anchors = [[min(fid.anchor, bounds[b][p][0]) for p in range(devices)] for b in range(batch)]
    slices = tuple(_slice(p, real, bounds, anchors) for p in range(devices))
    pairs = [(src, dst) for src in range(devices) for dst in range(devices)
             if dst != src and not (causal and dst < src)]
    rows = {(src, dst): [_Rows(b, src, dst, real, sink, bounds, anchors, fid, causal) for b in range(batch)]
            for src, dst in pairs}
    shares = None
    if fid.budget:  # every route into a device shares its budget
        shares = {}
        for b in range(batch):
            short = len(real[b]) < fid.budget_from  # a short sequence goes whole (RunConfig.budget_from)
            for dst in range(devices):
                into = [rows[(src, d)][b] for src, d in pairs if d == dst and rows[(src, d)][b].reals]
                shares[(b, dst)] = (0, 1.0) if short else _allocate(fid, into) if into else (0, 0.0)
    routes = []
    for src, dst in pairs:
        route = _route(slices[src], src, dst, real, rows[(src, dst)], anchors, fid, shares)
        if route.rows:
            routes.append(route)
    return Plan(slices, tuple(routes), causal, fid)


def _bounds(length: int, b: int, devices: int, weights, sizes, tail: int = 0) -> tuple[tuple[int, int], ...]:
    if length < devices:
        raise ValueError(
            f"sequence {b} has {length} real positions but devices={devices}: every device needs at "
            f"least one position; use devices <= {length} or give that sequence more tokens"
        )
    if sizes is not None:  # an explicit layout, e.g. a prompt's slices plus generated tokens on the last device
        if len(sizes) != devices or sum(sizes) != length or min(sizes) < 1:
            raise ValueError(f"sizes {sizes} must be {devices} positive slice sizes summing to sequence {b}'s "
                             f"{length} real positions")
        return slice_bounds(tuple(sizes))
    if tail and devices > 1:  # a short last slice: the others split the rest (never fewer than one each)
        last = max(1, min(tail, length - (devices - 1)))
        head = split_sizes(length - last, devices - 1, weights[:-1] if weights else None)
        return slice_bounds((*head, last))
    return slice_bounds(split_sizes(length, devices, weights))


def _pad(rows: list[list[int]], fill: int = 0) -> tuple[Tensor, Tensor]:
    """Ragged per-sequence lists -> (B, max) long tensor and its validity mask."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    ok = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        ok[b, : len(r)] = True
    return out, ok


def _slice(p: int, real: list[Tensor], bounds, anchors) -> DeviceSlice:
    rows, owned = [], []
    for b, positions in enumerate(real):
        s, e = bounds[b][p]
        a = anchors[b][p]
        rows.append(positions[:a].tolist() + positions[s:e].tolist())
        owned.append([False] * a + [True] * (e - s))
    index, ok = _pad(rows)
    own = torch.zeros_like(ok)
    for b, flags in enumerate(owned):
        own[b, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
    return DeviceSlice(p, index, ok, own, tuple(bounds[b][p] for b in range(len(real))),
                       tuple(anchors[b][p] for b in range(len(real))))


class _Rows:
    """The rows route src -> dst may carry for sequence b, and how a window of w positions splits them into
    (exact, candidates, segment keys).  Real-position indices (into the sequence's real positions)."""

    def __init__(self, b: int, src: int, dst: int, real, sink: Tensor, bounds, anchors, fid: Fidelity,
                 causal: bool) -> None:
        (self.s, self.e), (self.ds, self.de) = bounds[b][src], bounds[b][dst]
        first = max(self.s, anchors[b][dst])  # dst recomputes its anchors itself
        self.reals = list(range(first, self.e))
        self.flags = sink[b, real[b][self.reals]].tolist() if self.reals else []
        self.everything = fid.cr == 1 or (causal and fid.tail > 0 and dst == len(bounds[b]) - 1)
        self.cr, self.causal = fid.cr, causal
        self._splits: dict[int, tuple[list[int], list[int], list[int]]] = {}

    def split(self, w: int) -> tuple[list[int], list[int], list[int]]:
        """Computed once per window: a budget's allocation and the route itself ask for the same ones."""
        if w not in self._splits:
            ds, de = self.ds, self.de
            is_exact = [self.everything or f or ds - w <= r < ds or (not self.causal and de <= r < de + w)
                        for r, f in zip(self.reals, self.flags)]
            ex = [r for r, x in zip(self.reals, is_exact) if x]
            cd = [r for r, x in zip(self.reals, is_exact) if not x]
            self._splits[w] = (ex, cd, sorted({(r - self.s) // self.cr for r in cd}))
        return self._splits[w]


def _allocate(fid: Fidelity, rows: list[_Rows]) -> tuple[int, float]:
    """A byte budget shared by every route into one device (one sequence): (window, top-k fraction).

    The rows they may send (Voltage's bytes for their rows x budget, at `row_cost` each) go in order of
    value: the sinks and the floors (window, top-k) first, with every other row's Segment Mean (the floor
    of any summary: a budget too small even for them is overspent by that much); then `budget_window` of
    the spare rows widen the window (the positions next to the receiver, whichever route holds them);
    the rest go to the top rows, the same fraction of every route's candidates.  Pooled rather than per
    route: the window lies in the adjacent routes only, and it is worth more than a far route's rows
    (SmolLM2, P=4, 512 dev tokens at a budget of 0.10: +1.02 % perplexity with a budget per route, +0.43 %
    pooled; docs/RESULTS.md §2.10).
    """
    n = sum(len(r.reals) for r in rows)
    budget_rows = fid.budget * n / fid.row_cost
    group = 1 + fid.count_cost / fid.row_cost  # a group row also carries its size
    w = fid.window_for(rows[0].de - rows[0].ds)

    def cost(w: int) -> tuple[float, int]:
        """(rows sent before any top-k, candidates) at window w."""
        used, cands = 0.0, 0
        for r in rows:
            ex, cd, keys = r.split(w)
            used += len(ex) + fid.topk_for(len(cd)) + len(keys) * group
            cands += len(cd)
        return used, cands

    if budget_rows >= n:
        return w, 1.0  # the whole of every route fits
    used, _ = cost(w)
    if used >= budget_rows:
        return w, 0.0  # the floors (and the means) alone spend it
    sides = max(1, sum(1 for r in rows if r.e == r.ds or r.s == r.de))  # routes next to the receiver
    w += int((budget_rows - used) * fid.budget_window / sides)
    used, cands = cost(w)
    return w, max(0.0, budget_rows - used) / cands if cands else 0.0


def _route(sl: DeviceSlice, src: int, dst: int, real, rows: list[_Rows], anchors, fid: Fidelity,
           shares: dict[tuple[int, int], tuple[int, float]] | None = None) -> Route:
    """The route src -> dst for every sequence (`rows`, one `_Rows` each): exact rows, candidates, segments,
    top-k, observers.  shares: under a budget, each (sequence, dst)'s window and top-k fraction (`_allocate`)."""
    exact, cand, segment, groups, topk, observe = [], [], [], [], [], []
    counts, index = [], []
    for b, positions in enumerate(real):
        rr = rows[b]
        s, e, ds, de, a_src, reals = rr.s, rr.e, rr.ds, rr.de, anchors[b][src], rr.reals
        if shares is not None:
            w, frac = shares[(b, dst)]
            ex, cd, keys = rr.split(w)
            k = min(len(cd), max(fid.topk_for(len(cd)), int(frac * len(cd))))
            if cd and len(ex) + k + len(keys) >= len(reals):
                ex, cd, keys, k = reals, [], [], 0  # summarising would not save bytes: the route goes whole
        else:
            ex, cd, keys = rr.split(fid.window_for(de - ds))
            k = fid.topk_for(len(cd))
            if fid.exact_when_cheap and cd and 2 * (len(ex) + k + len(keys)) >= len(reals):
                ex, cd, keys, k = reals, [], [], 0  # summarising would not halve the rows: send them as they are
        renumber = {key: i for i, key in enumerate(keys)}
        local = lambda r: a_src + (r - s)  # noqa: E731 - real index -> src-local row
        exact.append([local(r) for r in ex])
        cand.append([local(r) for r in cd])
        segment.append([renumber[(r - s) // fid.cr] for r in cd])
        groups.append(len(keys))
        topk.append(k)
        sizes = [0] * len(keys)
        for r in cd:
            sizes[renumber[(r - s) // fid.cr]] += 1
        counts.append(sizes)
        index.append([int(positions[r]) for r in ex])
        own = list(range(a_src, a_src + (e - s)))
        observe.append(own[-OBSERVE:] if dst > src else own[:OBSERVE])
    ex_t, ex_ok = _pad(exact)
    cd_t, cd_ok = _pad(cand)
    seg_t, _ = _pad(segment)
    obs_t, obs_ok = _pad(observe)
    groups_t, topk_t = torch.tensor(groups, dtype=torch.long), torch.tensor(topk, dtype=torch.long)
    slot_valid, slot_count, slot_index = _slots(ex_ok, topk_t, groups_t, counts, index)
    return Route(src, dst, ex_t, ex_ok, cd_t, cd_ok, seg_t, groups_t, topk_t, obs_t, obs_ok,
                 slot_valid, slot_count, slot_index)


def _slots(ex_ok: Tensor, topk: Tensor, groups: Tensor, counts: list[list[int]], index: list[list[int]]):
    """Receive-buffer layout per sequence: [exact (e) | top-k (k_max) | groups (g_max)]."""
    batch, e = ex_ok.shape
    k_max = int(topk.max()) if len(topk) else 0
    g_max = int(groups.max()) if len(groups) else 0
    ks, gs = torch.arange(k_max), torch.arange(g_max)
    slot_valid = torch.cat([ex_ok, ks < topk.unsqueeze(1), gs < groups.unsqueeze(1)], dim=1)
    slot_count = torch.ones(batch, e + k_max + g_max)
    slot_index = torch.full((batch, e + k_max + g_max), -1, dtype=torch.long)
    for b in range(batch):
        slot_count[b, e + k_max : e + k_max + len(counts[b])] = torch.tensor(counts[b], dtype=torch.float)
        slot_index[b, : len(index[b])] = torch.tensor(index[b], dtype=torch.long)
    return slot_valid, slot_count, slot_index
