"""Rank 0's side of one request: check it, send every device its slice, run device 0, gather the answer.

Everything that can be wrong with a request is found in `prepare`, before any device hears of it, so
a bad request fails with a ValueError and leaves the cluster as it was.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ...config import PrismConfig
from ...models import Adapter
from ...models.base import Batch
from ...partition.plan import Plan
from ...runtime import protocol
from ...runtime.node import DeviceRun, device_report, run_device
from ...runtime.simulator import PrismOutput, plan_for
from ...runtime.stats import DeviceReport, Stats
from ...runtime.transport import TAG_HEADER, TAG_INPUT, TAG_META, TAG_OUTPUT, TAG_STATS, DistCommunicator


@dataclass(frozen=True)
class Request:
    batch: Batch
    plan: Plan
    header: protocol.Header


def _check_ids(input_ids: Tensor | None, vocab: int | None) -> None:
    if input_ids is None:
        return
    if not isinstance(input_ids, Tensor) or input_ids.is_floating_point():
        raise ValueError("input_ids must be an integer tensor of shape (batch, length)")
    if input_ids.numel() and vocab and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(f"token ids must lie in 0..{vocab - 1} for this model; got "
                         f"{int(input_ids.min())}..{int(input_ids.max())}")


class Coordinator:
    """Runs requests on a group whose rank 0 is this process (comm); one at a time (the caller locks)."""

    def __init__(self, adapter: Adapter, cfg: PrismConfig, comm: DistCommunicator, *, overlap: bool,
                 count_flops: bool) -> None:
        self.adapter, self.cfg, self.comm = adapter, cfg, comm
        self.overlap, self.count_flops = overlap, count_flops
        self.requests = 0

    @property
    def world(self) -> int:
        return self.comm.world

    def prepare(self, inputs: dict[str, Tensor | None], outputs: str, op: int = protocol.FORWARD) -> Request:
        """Validate a request on rank 0 and plan it (ValueError: nothing was sent)."""
        if outputs not in protocol.OUTPUT_MODES:
            raise ValueError(f"unknown outputs {outputs!r}; choose one of {', '.join(protocol.OUTPUT_MODES)}")
        config = self.adapter.model.config
        _check_ids(inputs.get("input_ids"), getattr(config, "vocab_size", None))
        if inputs.get("pixel_values") is not None and not isinstance(inputs["pixel_values"], Tensor):
            raise ValueError("pixel_values must be a float tensor of shape (batch, channels, height, width)")
        batch = self.adapter.prepare(**inputs, sink_token_ids=self.cfg.sink_token_ids)
        n_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if n_pos and self.adapter.family != "vit" and int(batch.positions.max()) >= n_pos:
            raise ValueError(f"position {int(batch.positions.max())} is beyond the model's {n_pos} positions; "
                             f"truncate the input to {n_pos} tokens")
        plan = plan_for(batch, self.cfg, self.adapter.geometry.causal)
        header = dataclasses.replace(protocol.request_header(batch, 0, outputs), op=op)  # numbered when sent
        return Request(batch, plan, header)

    def start(self, req: Request, keep_cache: bool = False) -> DeviceRun:
        """Send every other device its header, plan data and slice; then run device 0's share."""
        self.comm.reset()
        self.requests += 1
        header = dataclasses.replace(req.header, request=self.requests)
        for p in range(1, self.world):
            self.comm.isend("control", p, [header.encode()], TAG_HEADER, "request header", count=False)
            self.comm.isend("input", p, protocol.meta_tensors(req.batch, req.header), TAG_META, "request plan data")
            self.comm.isend("input", p, protocol.input_tensors(req.batch, req.plan, p), TAG_INPUT, "request inputs")
        local = req.batch.gather(req.plan.devices[0].index)
        return run_device(self.adapter, self.cfg, req.plan, req.batch, local, self.comm, overlap=self.overlap,
                          count_flops=self.count_flops, keep_cache=keep_cache)

    def worker_reports(self) -> list[DeviceReport]:
        """Every worker's own numbers for the request, rank order."""
        layers = self.adapter.geometry.layers
        raw = [self.comm.recv("control", p, [DeviceReport.buffer(layers)], TAG_STATS, "statistics", count=False)[0]
               for p in range(1, self.world)]
        return [DeviceReport.from_tensor(t) for t in raw]

    def stats(self, run: DeviceRun, workers: list[DeviceReport], t0: float) -> Stats:
        """Rank 0's report (taken last: it includes the pooler's FLOPs) and the workers', as the request's Stats."""
        own = device_report(self.comm, run, self.adapter.geometry.layers)
        return Stats.from_reports([own, *workers], time.perf_counter() - t0)

    def forward(self, req: Request) -> PrismOutput:
        t0 = time.perf_counter()
        run = self.start(req)
        mode = req.header.mode
        names = sorted(run.finals)
        widths = {k: v.shape[-1] for k, v in run.finals.items()}
        dtype = run.finals[names[0]].dtype
        own_mode = "all" if mode == "pooled" else mode  # the pooler reads rank 0's rows
        parts = [protocol.output_tensors(run.finals, req.plan, 0, own_mode)]
        for p in range(1, self.world):
            bufs = protocol.output_buffers(widths, req.plan, p, mode, dtype)
            parts.append(self.comm.recv("output", p, bufs, TAG_OUTPUT, "outputs"))
        workers = self.worker_reports()
        self.comm.flush()
        result = self._outputs(parts, names, req, run)
        return PrismOutput(**result, stats=self.stats(run, workers, t0), plan=req.plan)

    def _outputs(self, parts: list[list[Tensor]], names: list[str], req: Request, run: DeviceRun) -> dict[str, Tensor]:
        mode, plan, length = req.header.mode, req.plan, req.batch.valid.shape[1]
        if mode not in ("all", "pooled"):
            return protocol.assemble(parts, names, plan, mode, length)
        if mode == "pooled":  # only rank 0's rows are here, and the pooler reads position 0 (rank 0's)
            parts = [parts[0]] + [[t.new_zeros(int(sl.owned.sum()), t.shape[-1]) for t in parts[0]]
                                  for sl in plan.devices[1:]]
        full = protocol.assemble(parts, names, plan, "all", length)
        device = next(self.adapter.model.parameters()).device
        assert run.tally is not None
        with torch.inference_mode():  # rank 0's work, counted as in simulate
            pooled = run.tally.run("head", 0, self.adapter.pool, {k: v.to(device) for k, v in full.items()})
        pooled = {k: v.cpu() for k, v in pooled.items()}
        return pooled if mode == "pooled" else {**full, **pooled}

    def tell(self, op: int, ranks: range, what: str) -> None:
        """Send a bare control header (heartbeat, shutdown) to `ranks` and wait until it has gone out."""
        for p in ranks:
            self.comm.isend("control", p, [protocol.Header(op).encode()], TAG_HEADER, what, count=False)
        self.comm.flush()
