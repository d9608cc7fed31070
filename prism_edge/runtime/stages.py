"""Plans of a request under pipeline stages, and the hidden rows that cross a stage boundary.

partition/stages.py says which devices hold which layers; here every stage gets the Plan of its own PRISM
group, and a device's rows are cut into the messages the next stage's devices need (`handoff_messages`) and
put back together on the other side (`handoff_rows`).  The simulator and the device processes use the same
functions, so they send the same tensors and count the same bytes (ledger stage "stage").
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..config import RunConfig
from ..models import Adapter, Batch
from ..models.base import Geometry
from ..models.parts import part_bytes
from ..partition.plan import Plan, make_plan
from ..partition.stages import Sizes, Stage, StageLayout, handoff_index, last_positions, stage_layout
from .device import row_cost


def plan_for(batch: Batch, cfg: RunConfig, geo: Geometry, sizes: tuple[int, ...] | None = None) -> Plan:
    """The plan a resolved config implies for a model of geometry `geo`: Voltage and full are plain exact
    exchanges (CR=1, no extras); under a budget every route is filled to it at this request's wire.
    With pipeline stages this is one stage's plan: pass `stage_config(cfg, stage)`."""
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


def model_sizes(adapter: Adapter) -> Sizes:
    """Bytes of the model's parts as loaded (models.parts.part_bytes): each layer, and what the first stage holds
    besides its layers (embeddings and head, a tied matrix once).  Meta parameters count too, so a model's
    skeleton gives its sizes."""
    parts = part_bytes(adapter.model)
    return Sizes(parts.embed + parts.head, parts.layers)


def layout_for(cfg: RunConfig, adapter: Adapter) -> StageLayout:
    """The pipeline layout a resolved config gives this model (one stage unless the config asks for more)."""
    staged = cfg.stages > 1 or cfg.memory_budget is not None
    return stage_layout(cfg, adapter.geometry.layers, model_sizes(adapter) if staged else None)


def stage_config(cfg: RunConfig, st: Stage) -> RunConfig:
    """The config of one stage's PRISM group: its devices (and their slice weights), one stage."""
    if st.index == 0 and st.devices == cfg.effective_devices:
        return cfg
    weights = cfg.weights[st.first_rank:st.first_rank + st.devices] if cfg.weights is not None else None
    return cfg.replace(devices=st.devices, weights=weights, stages=1, stage_devices=None, layer_split=None,
                       memory_budget=None)


def stage_plans(batch: Batch, cfg: RunConfig, geo: Geometry, layout: StageLayout,
                sizes: tuple[int, ...] | None = None) -> list[Plan]:
    """Every stage's plan for this request (each stage splits the positions among its own devices).  sizes:
    explicit slice sizes, for the stages of that many devices."""
    return [plan_for(batch, stage_config(cfg, st), geo, sizes if sizes is not None and len(sizes) == st.devices else None)
            for st in layout.stages]


# --------------------------------------------------------------------------------------------- hand-offs
def ring_keep(valid: Tensor, outputs: str) -> Tensor | None:
    """The positions the last stage hands back to the first (where the head is): each sequence's last real
    one for outputs `last`, else every position (None)."""
    return last_positions(valid) if outputs == "last" else None


def handoff_messages(x: Tensor, src_plan: Plan, p: int, dst_plan: Plan, dst: Stage,
                     keep: Tensor | None = None) -> dict[int, list[Tensor]]:
    """Device p's rows x (B, n_p, d) cut for the devices of stage `dst`: {global rank: [(k, d) rows]}.
    keep: only these positions (B, N) (the ring back to the first stage, for outputs `last`)."""
    flat = x.reshape(-1, x.shape[-1])
    out = {}
    for q in range(dst.devices):
        src_rows, _ = handoff_index(src_plan, p, dst_plan, q, keep)
        if src_rows.numel():
            out[dst.first_rank + q] = [flat[src_rows.to(flat.device)].detach().contiguous()]
    return out


def handoff_expected(src_plan: Plan, src: Stage, dst_plan: Plan, q: int, width: int, dtype: torch.dtype,
                     keep: Tensor | None = None) -> dict[int, list[tuple[tuple[int, ...], torch.dtype]]]:
    """{global rank of a sender in stage `src`: [(shape, dtype)]} of what device q of the next stage receives."""
    out: dict[int, list[tuple[tuple[int, ...], torch.dtype]]] = {}
    for p in range(src.devices):
        _, dst_rows = handoff_index(src_plan, p, dst_plan, q, keep)
        if dst_rows.numel():
            out[src.first_rank + p] = [((int(dst_rows.numel()), width), dtype)]
    return out


def handoff_rows(incoming: dict[int, list[Tensor]], src_plan: Plan, src: Stage, dst_plan: Plan, q: int,
                 like: Tensor, keep: Tensor | None = None) -> Tensor:
    """Device q's rows (B, n_q, d) from what the devices of stage `src` handed it (zeros at padding rows and at
    positions not kept).  like: a tensor of the model's dtype and device."""
    sl = dst_plan.devices[q]
    batch, n = sl.index.shape
    x = like.new_zeros(batch * n, like.shape[-1])
    for g, tensors in incoming.items():
        _, dst_rows = handoff_index(src_plan, g - src.first_rank, dst_plan, q, keep)
        x[dst_rows.to(x.device)] = tensors[0].to(x.device, x.dtype)
    return x.view(batch, n, -1)


__all__ = ["ring_keep", "handoff_expected", "handoff_messages", "handoff_rows", "layout_for", "model_sizes", "plan_for",
           "stage_config", "stage_plans"]
