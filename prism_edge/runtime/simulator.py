"""All devices in one process: the reference driver of the per-device code (differentiable, batched)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from ..config import PrismConfig, RunConfig, resolve
from ..models import Adapter, Batch, adapter_for
from ..models.parts import first_held
from ..partition.plan import Plan
from ..partition.stages import Stage, StageLayout
from .comm import ByteLedger, LocalCommunicator
from .device import DeviceExecutor
from .loop import Forward
from .stages import handoff_messages, handoff_rows, layout_for, plan_for, ring_keep, stage_plans
from .wire import input_tensors, meta_tensors, output_tensors, request_header
from .stats import STAGE, FlopTally, Stats


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
    planned: dict | None = None  # a cluster's plan for the request: which ran, predicted and measured ms

    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


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
    outputs: str = "all",
    **inputs: Tensor | None,
) -> tuple[PrismOutput, list[DeviceExecutor]]:
    """`simulate` under a config resolved for the model (simulate and generate resolve it), also returning the
    per-device executors; with keep_cache they hold every layer's K/V after the forward, for decoding
    (runtime.generate).  outputs `last` (a generation's prefill): with pipeline stages only each sequence's
    last row comes back to the first stage, as in the device processes (the other rows' outputs are junk)."""
    adapter = adapter if adapter is not None else adapter_for(model)
    batch = adapter.prepare(**inputs, sink_token_ids=cfg.sink_token_ids)
    layout = layout_for(cfg, adapter)
    plans = stage_plans(batch, cfg, adapter.geometry, layout, sizes)
    plan = plans[0]  # the first stage's: it embeds the inputs and computes the outputs
    device = first_held(model).device
    local_batch = batch.to(device)
    B, N = batch.valid.shape
    ledger, tally = ByteLedger(), FlopTally(count_flops)
    header = request_header(batch, 0, "all")
    for p in range(1, layout.world):
        for t in meta_tensors(batch, header) + (input_tensors(batch, plan, p) if p < plan.world else []):
            ledger.record("input", 0, p, t)

    devs: list[DeviceExecutor] = []
    first: list[Forward] = []
    rows: list[Tensor] = []  # the previous stage's rows, per device
    for st in layout.stages:
        steps = _stage(st, plans, layout, adapter, cfg, local_batch, tally, ledger, rows, overlap, keep_cache)
        devs += [f.dev for f in steps]
        first = first or steps
        rows = [f.x for f in steps]  # type: ignore[misc]
    if layout.staged:  # the ring: the last stage's rows back to the first, where the head is
        keep = ring_keep(batch.valid, outputs)  # outputs `last`: only each sequence's last row comes back
        for f in first:
            f.x = _handed(rows, layout, 0, plans, f.dev, ledger, keep)
    finals = [f.finish() for f in first]
    for p in range(1, plan.world):
        for t in output_tensors(finals[p], plan, p, "all"):
            ledger.record("output", p, 0, t)
    result = {name: scatter_rows([f[name] for f in finals], plan, B, N) for name in finals[0]}
    result.update(tally.run("head", 0, adapter.pool, result))  # the first position lives on device 0
    stats = Stats.collect(layout.world, adapter.geometry.layers, ledger, tally)
    return PrismOutput(**result, stats=stats, plan=plan, planned=None), devs


def _stage(st: Stage, plans: list[Plan], layout: StageLayout, adapter: Adapter, cfg: RunConfig, batch: Batch,
           tally: FlopTally, ledger: ByteLedger, rows: list[Tensor], overlap: bool, keep_cache: bool) -> list[Forward]:
    """One pipeline stage's devices in lockstep over its layers: embedding (the first) or the previous stage's rows."""
    plan_s = plans[st.index]
    comm = LocalCommunicator(st.devices, ledger, offset=st.first_rank)
    devs = [DeviceExecutor(adapter, plan_s.to(batch.valid.device), p, cfg, batch, layers=st.layers)
            for p in range(st.devices)]
    steps = []
    for d in devs:
        d.keep_cache = keep_cache
        f = Forward(d, batch.gather(d.slice.index) if st.index == 0 else {}, tally, overlap=overlap,
                    rank=st.first_rank + d.rank)
        f.start() if st.index == 0 else f.resume(_handed(rows, layout, st.index, plans, d, ledger))
        steps.append(f)
    for i in st.layers:
        incoming = comm.exchange(i, [f.send(i) for f in steps])
        for f in steps:
            f.meanwhile(i)
        for f, got in zip(steps, incoming):
            f.receive(i, got)
    return steps


def _handed(rows: list[Tensor], layout: StageLayout, to: int, plans: list[Plan], dev: DeviceExecutor,
            ledger: ByteLedger, keep: Tensor | None = None) -> Tensor:
    """Device `dev` of stage `to`: the rows the previous stage (for the first stage: the last) hands it, counted."""
    src = layout.stages[to - 1]  # index -1 for the first stage: the ring
    dst = layout.stages[to]
    q = dev.rank
    incoming = {}
    for p, x in enumerate(rows):
        message = handoff_messages(x, plans[src.index], p, plans[to], dst, keep).get(dst.first_rank + q)
        if message is not None:
            for t in message:
                ledger.record(STAGE, src.first_rank + p, dst.first_rank + q, t)
            incoming[src.first_rank + p] = message
    return handoff_rows(incoming, plans[src.index], src, plans[to], q, rows[0], keep)
