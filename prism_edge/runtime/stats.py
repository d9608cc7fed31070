"""Per-device, per-layer traffic and compute of one forward pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .comm import ByteLedger

STAGE = "stage"  # the ledger's stage name for hidden rows handed across a pipeline-stage boundary

_aten = torch.ops.aten
# torch's counter knows the CUDA attention kernels but not the CPU one that
# scaled_dot_product_attention dispatches to here; count it with torch's own SDPA formula.
def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def flop_counter() -> FlopCounterMode:
    """torch.utils.flop_counter with CPU attention counted (matmuls, convolutions and attention)."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


class FlopTally:
    """FLOPs per (stage, device), counted by torch.utils.flop_counter around each device's work."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.counts: dict[tuple[object, int], int] = {}

    def run(self, stage: object, rank: int, fn: Callable[..., Any], *args: Any) -> Any:
        if not self.enabled:
            return fn(*args)
        with flop_counter() as counter:
            out = fn(*args)
        key = (stage, rank)
        self.counts[key] = self.counts.get(key, 0) + counter.get_total_flops()
        return out


@dataclass(frozen=True)
class Stats:
    """sent[l][p] / received[l][p]: bytes device p sent / received in layer l's exchange.

    layer_flops[l][p]: FLOPs of device p in layer l; flops[p]: its total including embedding and
    head (None when FLOP counting was off).

    input_bytes[p] / output_bytes[p]: bytes the coordinator (rank 0) sent device p with the request
    and device p sent back (0 for rank 0 itself).  The multi-process runtime also fills the timings:
    compute_s[l][p] / wait_s[l][p], seconds device p computed / waited on the exchange in layer l, and
    wall_s, the request's wall time at rank 0.
    """

    world: int
    sent: tuple[tuple[int, ...], ...]
    received: tuple[tuple[int, ...], ...]
    layer_flops: tuple[tuple[int, ...], ...] | None
    flops: tuple[int, ...] | None
    input_bytes: tuple[int, ...] | None = None
    output_bytes: tuple[int, ...] | None = None
    compute_s: tuple[tuple[float, ...], ...] | None = None
    wait_s: tuple[tuple[float, ...], ...] | None = None
    wall_s: float | None = None
    cpu_s: tuple[float, ...] | None = None  # runtime: each device thread's CPU time for the request
    peak_rss_mib: tuple[float, ...] | None = None  # runtime: each device process's peak resident memory
    # pipeline stages: hidden rows each device handed across a stage boundary (sent / received); not in `sent`
    stage_sent: tuple[int, ...] | None = None
    stage_received: tuple[int, ...] | None = None
    param_bytes: tuple[int, ...] | None = None  # bytes of parameters each device holds

    @classmethod
    def collect(cls, world: int, layers: int, ledger: ByteLedger, tally: FlopTally,
                param_bytes: tuple[int, ...] | None = None) -> "Stats":
        sent = tuple(tuple(ledger.sent(i, p) for p in range(world)) for i in range(layers))
        received = tuple(tuple(ledger.received(i, p) for p in range(world)) for i in range(layers))
        inputs = tuple(ledger.received("input", p) for p in range(world))
        outputs = tuple(ledger.sent("output", p) for p in range(world))
        stage_sent = tuple(ledger.sent(STAGE, p) for p in range(world))
        stage_received = tuple(ledger.received(STAGE, p) for p in range(world))
        layer_flops = flops = None
        if tally.enabled:
            layer_flops = tuple(tuple(tally.counts.get((i, p), 0) for p in range(world)) for i in range(layers))
            flops = tuple(sum(v for (_, r), v in tally.counts.items() if r == p) for p in range(world))
        return cls(world, sent, received, layer_flops, flops, input_bytes=inputs, output_bytes=outputs,
                   stage_sent=stage_sent, stage_received=stage_received, param_bytes=param_bytes)

    @classmethod
    def from_reports(cls, reports: Sequence["DeviceReport"], wall_s: float) -> "Stats":
        """The multi-process runtime's statistics: one report per device (rank order) and rank 0's wall time."""
        layers = len(reports[0].sent)
        per = lambda name: tuple(tuple(getattr(r, name)[i] for r in reports) for i in range(layers))  # noqa: E731
        counted = all(r.flops is not None for r in reports)
        return cls(
            world=len(reports), sent=per("sent"), received=per("received"),
            layer_flops=per("layer_flops") if counted else None,
            flops=tuple(int(r.flops or 0) for r in reports) if counted else None,
            input_bytes=tuple(r.input_bytes for r in reports), output_bytes=tuple(r.output_bytes for r in reports),
            compute_s=per("compute_s"), wait_s=per("wait_s"), wall_s=wall_s,
            cpu_s=tuple(r.cpu_s for r in reports), peak_rss_mib=tuple(r.peak_rss_kib / 1024 for r in reports),
            stage_sent=tuple(r.stage_sent for r in reports), stage_received=tuple(r.stage_received for r in reports),
            param_bytes=tuple(r.param_bytes for r in reports),
        )

    @property
    def layers(self) -> int:
        return len(self.sent)

    @property
    def total_bytes(self) -> int:
        """Bytes exchanged between devices in all layers (each message counted once)."""
        return sum(map(sum, self.sent))

    @property
    def stage_bytes(self) -> int:
        """Bytes of hidden rows handed across pipeline-stage boundaries (0 with one stage)."""
        return sum(self.stage_sent or ())

    @property
    def request_bytes(self) -> int:
        """Everything on the wire for the request: the exchange, the stage hand-offs, inputs out and outputs back."""
        return self.total_bytes + self.stage_bytes + sum(self.input_bytes or ()) + sum(self.output_bytes or ())

    def bytes_sent(self, rank: int) -> int:
        return sum(layer[rank] for layer in self.sent)

    def bytes_received(self, rank: int) -> int:
        return sum(layer[rank] for layer in self.received)

    @property
    def max_flops(self) -> int | None:
        """FLOPs of the busiest device: what bounds the wall time of a balanced split."""
        return max(self.flops) if self.flops else None

    def to_dict(self) -> dict:
        return {
            "world": self.world,
            "bytes_sent": [list(x) for x in self.sent],
            "bytes_received": [list(x) for x in self.received],
            "layer_flops": None if self.layer_flops is None else [list(x) for x in self.layer_flops],
            "flops": None if self.flops is None else list(self.flops),
            "total_bytes": self.total_bytes,
            "input_bytes": None if self.input_bytes is None else list(self.input_bytes),
            "output_bytes": None if self.output_bytes is None else list(self.output_bytes),
            "request_bytes": self.request_bytes,
            "compute_s": None if self.compute_s is None else [list(x) for x in self.compute_s],
            "wait_s": None if self.wait_s is None else [list(x) for x in self.wait_s],
            "wall_s": self.wall_s,
            "cpu_s": None if self.cpu_s is None else list(self.cpu_s),
            "peak_rss_mib": None if self.peak_rss_mib is None else list(self.peak_rss_mib),
            "stage_sent": None if self.stage_sent is None else list(self.stage_sent),
            "stage_received": None if self.stage_received is None else list(self.stage_received),
            "stage_bytes": self.stage_bytes,
            "param_bytes": None if self.param_bytes is None else list(self.param_bytes),
        }

    def table(self) -> str:
        """Per device: exchange bytes, request input/output bytes, FLOPs and (runtime) compute/wait time."""
        compute, wait = self.compute_s, self.wait_s
        timed = compute is not None and wait is not None
        staged = self.stage_bytes > 0
        head = "device  exchange sent  exchange recv" + ("  stage sent  stage recv" if staged else "")
        head += "  input recv  output sent  GFLOPs"
        rows = [head + ("  compute s  wait s" if timed else "")]
        for p in range(self.world):
            gf = "n/a" if self.flops is None else f"{self.flops[p] / 1e9:.3f}"
            inp = "n/a" if self.input_bytes is None else f"{self.input_bytes[p]:,}"
            out = "n/a" if self.output_bytes is None else f"{self.output_bytes[p]:,}"
            row = f"{p:>6}  {self.bytes_sent(p):>13,}  {self.bytes_received(p):>13,}"
            if staged and self.stage_sent is not None and self.stage_received is not None:
                row += f"  {self.stage_sent[p]:>10,}  {self.stage_received[p]:>10,}"
            row += f"  {inp:>10}  {out:>11}  {gf:>6}"
            if compute is not None and wait is not None:
                row += f"  {sum(layer[p] for layer in compute):>9.3f}  {sum(layer[p] for layer in wait):>6.3f}"
            rows.append(row)
        return "\n".join(rows)


def peak_rss_kib() -> int:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB); -1 where unknown."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    except (ImportError, OSError):
        return -1


@dataclass(frozen=True)
class DeviceReport:
    """One device's own numbers for one request, as a worker reports them to rank 0.

    Per layer: bytes sent / received in the exchange, FLOPs (None when not counted), seconds of compute and
    of waiting for the exchange.  Per request: input bytes received from rank 0, output bytes sent back,
    all FLOPs, the device thread's CPU time and the process's peak resident memory.

    error: empty when the device did its share; else what went wrong inside the request (a bug, out of
    memory), as one line: the device then finished the request's exchange with zeros, and rank 0 refuses
    the request (RequestError) while the group stays usable.

    It travels as one int64 tensor (runtime/wire.py: report_tensor / report_from).
    """

    sent: tuple[int, ...]
    received: tuple[int, ...]
    layer_flops: tuple[int, ...] | None
    compute_s: tuple[float, ...]
    wait_s: tuple[float, ...]
    input_bytes: int
    output_bytes: int
    flops: int | None
    cpu_s: float
    peak_rss_kib: int
    error: str = ""
    stage_sent: int = 0  # pipeline stages: hidden rows handed to the next stage (or back to the first)
    stage_received: int = 0
    param_bytes: int = 0  # bytes of the parameters this device holds (its stage's)


def measured(stats: Stats | None) -> Stats:
    """The statistics of a result that has them (the simulator and the runtime always fill them in)."""
    if stats is None:
        raise AssertionError("this result carries no statistics")
    return stats


def busiest_flops(stats: Stats | None) -> int:
    """FLOPs of the busiest device of a run that counted them."""
    flops = measured(stats).max_flops
    if flops is None:
        raise AssertionError("FLOPs were not counted (count_flops=False)")
    return flops
