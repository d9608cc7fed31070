"""The communicator owns every exchanged tensor and counts its bytes in a ledger.

The simulator's communicator hands tensors from device to device inside one process; the
multi-process runtime swaps in one over torch.distributed.  Both record the same ledger entries.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import Tensor


def nbytes(t: Tensor) -> int:
    """Bytes a tensor occupies on the wire: its elements at the dtype actually sent."""
    return t.numel() * t.element_size()


@dataclass
class ByteLedger:
    """Bytes per (stage, src, dst); a stage is a layer index or a name such as "input"/"output"."""

    entries: dict[tuple[object, int, int], int] = field(default_factory=lambda: defaultdict(int))

    def record(self, stage: object, src: int, dst: int, tensor: Tensor) -> None:
        self.entries[(stage, src, dst)] += nbytes(tensor)

    def sent(self, stage: object, rank: int) -> int:
        return sum(b for (s, src, _), b in self.entries.items() if s == stage and src == rank)

    def received(self, stage: object, rank: int) -> int:
        return sum(b for (s, _, dst), b in self.entries.items() if s == stage and dst == rank)

    def total(self) -> int:
        return sum(self.entries.values())


class LocalCommunicator:
    """All devices in one process: an exchange is a hand-over, recorded in the ledger."""

    def __init__(self, world: int, ledger: ByteLedger | None = None, offset: int = 0) -> None:
        """offset: the global rank of this group's first device (a pipeline stage's devices), for the ledger."""
        self.world, self.offset = world, offset
        self.ledger = ledger if ledger is not None else ByteLedger()

    def exchange(self, stage: object, outgoing: list[dict[int, list[Tensor]]]) -> list[dict[int, list[Tensor]]]:
        """outgoing[src][dst] -> incoming[dst][src]: a message is a list of tensors, every one counted."""
        if len(outgoing) != self.world:
            raise AssertionError(f"expected messages from {self.world} devices, got {len(outgoing)}")
        incoming: list[dict[int, list[Tensor]]] = [{} for _ in range(self.world)]
        for src, messages in enumerate(outgoing):
            for dst, tensors in messages.items():
                for tensor in tensors:
                    self.ledger.record(stage, src + self.offset, dst + self.offset, tensor)
                incoming[dst][src] = tensors
        return incoming
