"""What travels between the coordinator (rank 0) and the devices besides the per-layer exchange.

Every message is a plain tensor of a known dtype and shape; nothing is pickled.  A fixed-size int64
header announces a request's shapes, then rank 0 sends each device only what it needs:

  meta       (B, N) uint8   bit 0: real position, bit 1: attention sink    -- every device, to plan
  positions  (B, N) int64   only when they are not the HF default 0..N-1    -- every device
  inputs     (rows, ...)    the device's own real rows of each per-position input (token ids as
                            int32, image patches as float32)                 -- that device only

and each device sends back only what the request's output mode needs.  The simulator counts the
same tensors, so the two ledgers agree byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.base import Batch
from ..partition.plan import Plan
from .modes import OUTPUT_MODES

HEADER_LEN = 16
MAGIC = 0x5052534D  # "PRSM": a desynchronised or foreign peer fails loudly, not silently
PING, FORWARD, SHUTDOWN, GENERATE = 1, 2, 3, 4  # GENERATE: a FORWARD (prefill), then the last device decodes
INPUT_KEYS = ("input_ids", "token_type_ids", "patches")  # position in this tuple is the wire code
MAX_KEYS = 3


@dataclass(frozen=True)
class Header:
    op: int
    request: int = 0
    batch: int = 0
    length: int = 0
    custom_positions: bool = False
    mode: str = "all"
    keys: tuple[tuple[str, int], ...] = ()  # (input name, values per position; 0 = one scalar)

    def encode(self) -> Tensor:
        t = torch.zeros(HEADER_LEN, dtype=torch.int64)
        t[:7] = torch.tensor([MAGIC, self.op, self.request, self.batch, self.length, int(self.custom_positions),
                              OUTPUT_MODES.index(self.mode)])
        t[7] = len(self.keys)
        for i, (name, width) in enumerate(self.keys):
            t[8 + 2 * i], t[9 + 2 * i] = INPUT_KEYS.index(name), width
        return t

    @classmethod
    def decode(cls, t: Tensor) -> "Header":
        v = t.tolist()
        if v[0] != MAGIC:
            raise RuntimeError(f"received a malformed request header (magic {v[0]:#x}); the ranks are out of step")
        keys = tuple((INPUT_KEYS[v[8 + 2 * i]], v[9 + 2 * i]) for i in range(v[7]))
        return cls(v[1], v[2], v[3], v[4], bool(v[5]), OUTPUT_MODES[v[6]], keys)


def empty_header() -> Tensor:
    return torch.zeros(HEADER_LEN, dtype=torch.int64)


def _default_positions(batch: int, length: int) -> Tensor:
    return torch.arange(length).expand(batch, -1)


def request_header(batch: Batch, request: int, mode: str) -> Header:
    if mode not in OUTPUT_MODES:
        raise ValueError(f"unknown output mode {mode!r}; choose one of {', '.join(OUTPUT_MODES)}")
    unknown = set(batch.per_position) - set(INPUT_KEYS)
    if unknown:
        raise ValueError(f"the runtime cannot ship inputs {sorted(unknown)}; supported: {', '.join(INPUT_KEYS)}")
    B, N = batch.valid.shape
    custom = not torch.equal(batch.positions.cpu(), _default_positions(B, N))
    keys = tuple((k, int(t.shape[2]) if t.dim() == 3 else 0) for k, t in sorted(batch.per_position.items()))
    return Header(FORWARD, request, B, N, custom, mode, keys)


def meta_tensors(batch: Batch, header: Header) -> list[Tensor]:
    """What every device needs to derive the plan (and positions, when not the default)."""
    meta = (batch.valid.to(torch.uint8) | (batch.sink.to(torch.uint8) << 1)).cpu()
    return [meta, batch.positions.cpu().contiguous()] if header.custom_positions else [meta]


def meta_buffers(header: Header) -> list[Tensor]:
    shape = (header.batch, header.length)
    meta = [torch.empty(shape, dtype=torch.uint8)]
    return meta + [torch.empty(shape, dtype=torch.int64)] if header.custom_positions else meta


def batch_from_meta(header: Header, received: list[Tensor]) -> Batch:
    """The request as a device that holds no inputs sees it: enough to plan and to place its rows."""
    meta = received[0]
    positions = received[1] if header.custom_positions else _default_positions(header.batch, header.length)
    return Batch(valid=(meta & 1).bool(), positions=positions, sink=(meta & 2).bool())


def input_tensors(batch: Batch, plan: Plan, rank: int) -> list[Tensor]:
    """Device `rank`'s own real rows of every per-position input, in header key order."""
    sl = plan.devices[rank]
    local = batch.gather(sl.index.to(batch.valid.device))
    out = []
    for name in sorted(batch.per_position):
        rows = local[name][sl.valid.to(local[name].device)].cpu()
        out.append(rows.to(torch.int32) if not rows.is_floating_point() else rows.contiguous())
    return out


def input_buffers(header: Header, plan: Plan, rank: int) -> list[Tensor]:
    rows = int(plan.devices[rank].valid.sum())
    out = []
    for name, width in header.keys:
        shape = (rows, width) if width else (rows,)
        out.append(torch.empty(shape, dtype=torch.float32 if name == "patches" else torch.int32))
    return out


def local_inputs(header: Header, batch: Batch, plan: Plan, rank: int, rows: list[Tensor]) -> dict[str, Tensor]:
    """Rebuild the (B, n, ...) local inputs a device embeds from its received real rows."""
    sl = plan.devices[rank]
    B, n = sl.index.shape
    local = {}
    for (name, width), r in zip(header.keys, rows):
        full = r.new_zeros((B, n, width) if width else (B, n))
        full[sl.valid] = r
        local[name] = full.long() if not full.is_floating_point() else full
    local["positions"] = torch.gather(batch.positions, 1, sl.index)
    return local


# ---------------------------------------------------------------------------------------- outputs
def output_tensors(finals: dict[str, Tensor], plan: Plan, rank: int, mode: str) -> list[Tensor]:
    """What device `rank` returns to the coordinator for `mode`, in sorted output-name order.

    all: its real rows of every output; last: each sequence's last real row (only the last device
    holds those); mean: per-sequence sums over its real rows; pooled: nothing (the pooler reads
    position 0, which lives on rank 0).
    """
    sl = plan.devices[rank]
    valid = sl.owned.to(next(iter(finals.values())).device)  # anchor copies are answered by their owner
    out = []
    for name in sorted(finals):
        t = finals[name]
        if mode == "all":
            out.append(t[valid])
        elif mode == "last" and rank == plan.world - 1:
            last = sl.valid.sum(1).to(valid.device) - 1  # owned rows come after any anchor copies
            out.append(t[torch.arange(t.shape[0], device=t.device), last])
        elif mode == "mean":
            out.append((t * valid.unsqueeze(-1).to(t.dtype)).sum(1))
    return [o.detach().cpu().contiguous() for o in out]


Layout = dict[str, tuple[int, torch.dtype]]  # output name -> (width, dtype): cluster.node.output_layout


def zero_finals(layout: Layout, plan: Plan, rank: int) -> dict[str, Tensor]:
    """Device `rank`'s outputs as zeros, (B, n, width) each: what a device that failed inside the request
    sends back, so that the request's exchange stays complete (rank 0 refuses the request)."""
    B, n = plan.devices[rank].index.shape
    return {name: torch.zeros(B, n, width, dtype=dtype) for name, (width, dtype) in layout.items()}


def output_buffers(layout: Layout, plan: Plan, rank: int, mode: str) -> list[Tensor]:
    B = plan.devices[0].index.shape[0]
    rows = {"all": int(plan.devices[rank].owned.sum()), "mean": B,
            "last": B if rank == plan.world - 1 else 0, "pooled": 0}[mode]
    if rows == 0:
        return []
    return [torch.empty(rows, layout[name][0], dtype=layout[name][1]) for name in sorted(layout)]


def assemble(parts: list[list[Tensor]], names: list[str], plan: Plan, mode: str, length: int) -> dict[str, Tensor]:
    """Rank 0 puts every device's returned tensors back together: (B, N, w), or (B, 1, w) for last/mean."""
    B = plan.devices[0].index.shape[0]
    out = {}
    for i, name in enumerate(sorted(names)):
        if mode == "all":
            width = parts[0][i].shape[-1]
            full = parts[0][i].new_zeros(B * length, width)
            for p, sl in enumerate(plan.devices):
                flat = (sl.index + torch.arange(B).unsqueeze(1) * length)[sl.owned]
                full[flat] = parts[p][i]
            out[name] = full.view(B, length, width)
        elif mode == "last":
            out[name] = parts[plan.world - 1][i].unsqueeze(1)
        elif mode == "mean":
            count = torch.stack([sl.owned.sum(1) for sl in plan.devices]).sum(0).clamp(min=1)  # (B,)
            total = torch.stack([part[i] for part in parts]).sum(0)  # (B, w)
            out[name] = (total / count.unsqueeze(-1).to(total.dtype)).unsqueeze(1)
    return out
