"""All devices in one process: the reference driver of the per-device code (differentiable, batched)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from ..config import PrismConfig, RunConfig, resolve
from ..models import Adapter, Batch, adapter_for
from ..models.base import Geometry
from ..partition.plan import Plan, make_plan
from .comm import ByteLedger, LocalCommunicator
from .device import DeviceExecutor, row_cost
from .loop import Forward
from .wire import input_tensors, meta_tensors, output_tensors, request_header
from .stats import FlopTally, Stats


@dataclass
class PrismOutput:
    """Same fields and shapes as the Hugging Face model's output, plus the run's `stats` and `plan`.

    Outputs at padding positions are zero (no device owns them).
    """

    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None
    logits: Tensor | None = None
    stats: Stats | None = None
    plan: Plan | None = None

    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


def plan_for(batch: Batch, cfg: RunConfig, geo: Geometry, sizes: tuple[int, ...] | None = None) -> Plan:
    """The plan a resolved config implies for a model of geometry `geo`: Voltage and full are plain exact
    exchanges (CR=1, no extras); under a budget every route is filled to it at this request's wire."""
    sink = batch.sink if (cfg.scheme == "prism" and cfg.sinks) else torch.zeros_like(batch.sink)
    fidelity = cfg.fidelity
    if fidelity.budget:
        row, count = row_cost(cfg, geo, cfg.wire_for(batch.longest))
        fidelity = dataclasses.replace(fidelity, row_cost=row, count_cost=count)
    return make_plan(
        batch.valid,
        sink,
        devices=cfg.effective_devices,
        fidelity=fidelity,
        causal=geo.causal,
        weights=cfg.slice_weights,
        sizes=sizes,
    )


def scatter_rows(parts: list[Tensor], plan: Plan, batch: int, length: int) -> Tensor:
    """Per-device (B, n_p, ...) rows -> (B, N, ...) in input order; zeros at padding positions."""
    tail = parts[0].shape[2:]
    out = parts[0].new_zeros(batch * length, *tail)
    for part, sl in zip(parts, plan.devices):
        flat = (sl.index + torch.arange(batch, device=sl.index.device).unsqueeze(1) * length)[sl.owned]
        out = out.index_put((flat.to(out.device),), part[sl.owned.to(part.device)])
    return out.view(batch, length, *tail)


def simulate(
    model: nn.Module,
    cfg: PrismConfig | RunConfig | None = None,
    *,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    position_ids: Tensor | None = None,
    pixel_values: Tensor | None = None,
    count_flops: bool = True,
    adapter: Adapter | None = None,
    overlap: bool = False,
    sizes: tuple[int, ...] | None = None,
) -> PrismOutput:
    """Run `model` as `cfg.devices` devices would under PRISM, all inside this process.

    Gradients flow through everything (segment means included), so a model can be fine-tuned
    through its partitioned forward.  `count_flops=False` skips the FLOP counter's overhead.
    `overlap=True` runs attention the way the multi-process runtime does (own keys first, received
    keys after, merged by log-sum-exp): same result within float rounding, inference only.

    The ledger also counts what a real coordinator would ship: each device's inputs from rank 0
    and its outputs back (stages "input" and "output", all positions returned).

    cfg: a PrismConfig (resolved here, once, for the model's kind; None: PrismConfig()), or a RunConfig
    resolved for that kind already (e.g. a Cluster's `cfg`).  sizes: explicit slice sizes (every sequence
    split the same way), e.g. to re-run a generated sequence with the prompt's layout.
    """
    adapter = adapter if adapter is not None else adapter_for(model)
    # int8 rounding has no gradient: a forward that will be differentiated trains the default wire on float32
    run = resolve(cfg, adapter.kind, training=model.training and torch.is_grad_enabled())
    out, _ = run_devices(model, run, input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids, position_ids=position_ids, pixel_values=pixel_values,
                         count_flops=count_flops, adapter=adapter, overlap=overlap, sizes=sizes)
    return out


def run_devices(
    model: nn.Module,
    cfg: RunConfig,
    *,
    count_flops: bool = True,
    adapter: Adapter | None = None,
    overlap: bool = False,
    sizes: tuple[int, ...] | None = None,
    keep_cache: bool = False,
    **inputs: Tensor | None,
) -> tuple[PrismOutput, list[DeviceExecutor]]:
    """`simulate` under a config resolved for the model (simulate and generate resolve it), also returning the
    per-device executors; with keep_cache they hold every layer's K/V after the forward, for decoding
    (runtime.generate)."""
    adapter = adapter if adapter is not None else adapter_for(model)
    batch = adapter.prepare(**inputs, sink_token_ids=cfg.sink_token_ids)
    plan = plan_for(batch, cfg, adapter.geometry, sizes)
    device = next(model.parameters()).device
    local_batch = batch.to(device)
    B, N = batch.valid.shape
    ledger, tally = ByteLedger(), FlopTally(count_flops)
    comm = LocalCommunicator(plan.world, ledger)
    devs = [DeviceExecutor(adapter, plan.to(device), p, cfg, local_batch) for p in range(plan.world)]
    for d in devs:
        d.keep_cache = keep_cache
    header = request_header(batch, 0, "all")
    for p in range(1, plan.world):
        for t in meta_tensors(batch, header) + input_tensors(batch, plan, p):
            ledger.record("input", 0, p, t)

    steps = [Forward(d, local_batch.gather(d.slice.index), tally, overlap=overlap) for d in devs]
    for f in steps:
        f.start()
    for i in range(adapter.geometry.layers):
        incoming = comm.exchange(i, [f.send(i) for f in steps])
        for f in steps:
            f.meanwhile(i)
        for f, got in zip(steps, incoming):
            f.receive(i, got)
    finals = [f.finish() for f in steps]
    for p in range(1, plan.world):
        for t in output_tensors(finals[p], plan, p, "all"):
            ledger.record("output", p, 0, t)
    outputs = {name: scatter_rows([f[name] for f in finals], plan, B, N) for name in finals[0]}
    outputs.update(tally.run("head", 0, adapter.pool, outputs))  # the first position lives on device 0
    stats = Stats.collect(plan.world, adapter.geometry.layers, ledger, tally)
    return PrismOutput(**outputs, stats=stats, plan=plan), devs
