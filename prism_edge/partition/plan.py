"""The partition plan: which positions each device owns and what it sends to whom, as plain data.

Everything here is a pure function of the padding mask and the sink flags, so every device (and the
simulator) derives the same plan from the same few request integers and nothing about the plan has
to travel per layer.  Ranges are half-open [start, end) throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
    """The rows device `rank` owns: row i of sequence b is input position `index[b, i]`."""

    rank: int
    index: Tensor  # (B, n) long; 0 where not valid
    valid: Tensor  # (B, n) bool
    bounds: tuple[tuple[int, int], ...]  # per sequence: [start, end) among that sequence's real positions

    @property
    def rows(self) -> int:
        return self.index.shape[1]


@dataclass(frozen=True)
class Route:
    """What device `src` sends to device `dst` in every layer: rows that are exact positions or means.

    The message is a packed (R, width) tensor: one row per (sequence, summary row), no padding rows.
    """

    src: int
    dst: int
    gather: Tensor  # (L,) flat indices into src's (B * n_src) local rows that enter the message
    row: Tensor  # (L,) message row each gathered position is averaged into
    counts: Tensor  # (R,) positions behind each message row (1 = exact)
    scatter: Tensor  # (R,) flat indices into dst's (B * m) receive buffer for this route
    row_valid: Tensor  # (B, m) bool: receive-buffer rows that hold a message row
    row_count: Tensor  # (B, m) float: positions behind each buffer row (1 where invalid)
    row_index: Tensor  # (B, m) long: input position of a single-position row, -1 for a mean or invalid row

    @property
    def rows(self) -> int:
        return int(self.counts.numel())

    @property
    def width(self) -> int:
        """Receive-buffer rows per sequence (the batch maximum)."""
        return self.row_valid.shape[1]

    def compress(self, x: Tensor) -> Tensor:
        """(B, n_src, w) local rows -> (R, w) message: exact rows copied, others averaged."""
        flat = x.reshape(-1, x.shape[-1])[self.gather]  # (L, w)
        sums = flat.new_zeros(self.rows, flat.shape[-1]).index_add(0, self.row, flat)
        return sums / self.counts.to(flat.dtype).unsqueeze(-1)

    def expand(self, message: Tensor, batch: int) -> Tensor:
        """(R, w) message -> (B, m, w) receive buffer, zeros in invalid rows."""
        buf = message.new_zeros(batch * self.width, message.shape[-1])
        buf = buf.index_put((self.scatter,), message)
        return buf.view(batch, self.width, message.shape[-1])


@dataclass(frozen=True)
class Plan:
    devices: tuple[DeviceSlice, ...]
    routes: tuple[Route, ...]
    causal: bool
    cr: int
    halo: int

    @property
    def world(self) -> int:
        return len(self.devices)

    def routes_from(self, rank: int) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if r.src == rank)

    def routes_to(self, rank: int) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if r.dst == rank)


def _exact_rows(n: int, sink: Tensor, src: int, dst: int, halo: int, causal: bool) -> Tensor:
    """Which of src's n local rows travel to dst uncompressed: sinks plus the halo next to dst."""
    local = torch.arange(n)
    exact = sink.clone()
    if halo > 0 and dst == src + 1:  # dst's slice starts right after ours: our tail is its past
        exact |= local >= n - halo
    if halo > 0 and dst == src - 1 and not causal:  # bidirectional: our head borders dst's tail
        exact |= local < halo
    return exact


def _summary_rows(n: int, cr: int, exact: Tensor) -> tuple[Tensor, Tensor]:
    """Group n local rows into message rows: each exact row alone, the rest by CR-segment.

    Returns (message row of each local row, sort key of each message row).
    """
    local = torch.arange(n)
    n_seg = (n + cr - 1) // cr
    key = torch.where(exact, n_seg + local, local // cr)
    keys, inverse = torch.unique(key, sorted=True, return_inverse=True)
    return inverse, keys


def make_plan(
    valid: Tensor,
    sink: Tensor,
    *,
    devices: int,
    cr: int,
    halo: int = 0,
    causal: bool = False,
    weights: tuple[float, ...] | None = None,
    sizes: tuple[int, ...] | None = None,
) -> Plan:
    """Partition every sequence's real positions across devices and route Segment Means between them.

    valid: (B, N) bool, True at real (non-padding) positions.  sink: (B, N) bool, positions to send
    exactly.  Each sequence is split over its own real positions, so padding never enters a slice
    or a mean, and a sequence's plan never depends on the rest of the batch.  In a causal plan a
    device sends only to later devices (earlier ones may not see its positions).
    """
    if valid.dim() != 2 or sink.shape != valid.shape:
        raise ValueError(f"valid and sink must both be (batch, positions); got {tuple(valid.shape)}, {tuple(sink.shape)}")
    valid, sink = valid.cpu().bool(), sink.cpu().bool()
    batch = valid.shape[0]
    real = [torch.nonzero(valid[b]).flatten() for b in range(batch)]
    bounds = []
    for b, positions in enumerate(real):
        if len(positions) < devices:
            raise ValueError(
                f"sequence {b} has {len(positions)} real positions but devices={devices}: every device needs at "
                f"least one position; use devices <= {len(positions)} or give that sequence more tokens"
            )
        if sizes is not None:  # an explicit layout, e.g. a prompt's slices plus generated tokens on the last device
            if len(sizes) != devices or sum(sizes) != len(positions) or min(sizes) < 1:
                raise ValueError(f"sizes {sizes} must be {devices} positive slice sizes summing to sequence {b}'s "
                                 f"{len(positions)} real positions")
            bounds.append(slice_bounds(tuple(sizes)))
            continue
        bounds.append(slice_bounds(split_sizes(len(positions), devices, weights)))

    slices = []
    for p in range(devices):
        n_max = max(bounds[b][p][1] - bounds[b][p][0] for b in range(batch))
        index = torch.zeros(batch, n_max, dtype=torch.long)
        ok = torch.zeros(batch, n_max, dtype=torch.bool)
        for b in range(batch):
            s, e = bounds[b][p]
            index[b, : e - s] = real[b][s:e]
            ok[b, : e - s] = True
        slices.append(DeviceSlice(p, index, ok, tuple(bounds[b][p] for b in range(batch))))

    routes = []
    for src in range(devices):
        for dst in range(devices):
            if dst == src or (causal and dst < src):
                continue
            routes.append(_route(slices[src], src, dst, sink, cr, halo, causal))
    return Plan(tuple(slices), tuple(routes), causal, cr, halo)


def _route(sl: DeviceSlice, src: int, dst: int, sink: Tensor, cr: int, halo: int, causal: bool) -> Route:
    batch, n_max = sl.index.shape
    gather, row, counts, per_seq = [], [], [], []
    offset = 0
    for b in range(batch):
        n = int(sl.valid[b].sum())
        positions = sl.index[b, :n]
        exact = _exact_rows(n, sink[b, positions], src, dst, halo, causal)
        inverse, keys = _summary_rows(n, cr, exact)
        gather.append(b * n_max + torch.arange(n))
        row.append(offset + inverse)
        counts.append(torch.bincount(inverse, minlength=len(keys)))
        # a row standing for a single position (exact, or a segment of one) keeps that position
        first = torch.full((len(keys),), n, dtype=torch.long).scatter_reduce(0, inverse, torch.arange(n), "amin")
        row_index = torch.where(counts[-1] == 1, positions[first.clamp(max=n - 1)], -1)
        per_seq.append((counts[-1], row_index))
        offset += len(keys)
    m = max(len(c) for c, _ in per_seq)
    row_valid = torch.zeros(batch, m, dtype=torch.bool)
    row_count = torch.ones(batch, m)
    row_index = torch.full((batch, m), -1, dtype=torch.long)
    scatter = []
    for b, (c, idx) in enumerate(per_seq):
        r = len(c)
        row_valid[b, :r] = True
        row_count[b, :r] = c.float()
        row_index[b, :r] = idx
        scatter.append(b * m + torch.arange(r))
    return Route(
        src=src,
        dst=dst,
        gather=torch.cat(gather),
        row=torch.cat(row),
        counts=torch.cat(counts),
        scatter=torch.cat(scatter),
        row_valid=row_valid,
        row_count=row_count,
        row_index=row_index,
    )
