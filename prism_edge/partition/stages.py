"""Pipeline stages of PRISM groups: which devices hold which layers, and which rows cross a stage boundary.

The devices (ranks) are cut into S consecutive stages; stage s holds layers [first, last) of the model and
its devices split the positions among themselves exactly as a PRISM group of that size does (its own Plan).
The first stage also holds the input embeddings and the head (final norm, LM head, pooler, classifier): a
tied LM head is the embedding's own matrix, so it is held once, and the last stage hands its final rows back
to the first (a ring) — where a generated token is embedded anyway.

    stage 0: embed, layers [0, a)  ->  stage 1: layers [a, b)  -> ... ->  stage S-1  ->  stage 0: head

A request's hidden rows cross each boundary once: device p of stage s sends device q of stage s+1 the real
rows q computes (its owned rows and anchor copies) that p owns (`handoff_index`).  Everything here is a pure
function of the config, the model's sizes and the request's plans, so every device derives the same layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .plan import Plan

MIB = 1 << 20


@dataclass(frozen=True)
class Stage:
    index: int
    first_rank: int
    devices: int
    first: int  # layers [first, last)
    last: int

    def __post_init__(self) -> None:
        if self.devices < 1 or not 0 <= self.first < self.last:
            raise ValueError(f"stage {self.index} needs at least one device and one layer, got {self.devices} "
                             f"device(s) and layers [{self.first}, {self.last})")

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.devices)

    @property
    def layers(self) -> range:
        return range(self.first, self.last)

    @property
    def last_rank(self) -> int:
        """The stage's last device: where a generated position joins the stage's slices (it decodes)."""
        return self.first_rank + self.devices - 1


@dataclass(frozen=True)
class Sizes:
    """Bytes of a model's parts: what the first stage holds besides its layers (embeddings, head), and each layer."""

    fixed: int
    layers: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.fixed + sum(self.layers)


@dataclass(frozen=True)
class StageLayout:
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        rank = layer = 0
        for s, st in enumerate(self.stages):
            if st.index != s or st.first_rank != rank or st.first != layer:
                raise ValueError(f"stages must tile the devices and layers in order; stage {s} is {st}")
            rank, layer = rank + st.devices, st.last

    @classmethod
    def single(cls, devices: int, layers: int) -> "StageLayout":
        return cls((Stage(0, 0, devices, 0, layers),))

    @property
    def world(self) -> int:
        return sum(st.devices for st in self.stages)

    @property
    def layers(self) -> int:
        return self.stages[-1].last

    @property
    def staged(self) -> bool:
        return len(self.stages) > 1

    def stage_of(self, rank: int) -> Stage:
        for st in self.stages:
            if rank in st.ranks:
                return st
        raise ValueError(f"rank {rank} is in no stage of a layout of {self.world} devices")

    def holds(self, rank: int) -> tuple[int, int, bool, bool]:
        """(first layer, last layer, embeddings, head) that device `rank` holds."""
        st = self.stage_of(rank)
        return st.first, st.last, st.index == 0, st.index == 0

    def next_stage(self, st: Stage) -> Stage:
        """Where stage `st`'s rows go next: the following stage, or (the last) back to the first for the head."""
        return self.stages[(st.index + 1) % len(self.stages)]

    def held_bytes(self, sizes: Sizes, rank: int) -> int:
        st = self.stage_of(rank)
        return (sizes.fixed if st.index == 0 else 0) + sum(sizes.layers[st.first:st.last])

    def describe(self) -> str:
        if not self.staged:
            return f"1 stage of {self.stages[0].devices} device(s)"
        return " | ".join(f"stage {st.index}: ranks {st.first_rank}-{st.last_rank}, layers {st.first}-{st.last - 1}"
                          for st in self.stages)


def even_devices(devices: int, stages: int) -> tuple[int, ...]:
    base, extra = divmod(devices, stages)
    return tuple(base + (1 if s < extra else 0) for s in range(stages))


def balanced_split(sizes: Sizes, capacities: tuple[float, ...]) -> tuple[int, ...]:
    """Layers per stage (each >= 1, in order) minimising the fullest stage's bytes over its capacity (the first
    stage also carries `sizes.fixed`); ties go to the split with the most even layer counts."""
    n, stages = len(sizes.layers), len(capacities)
    if stages > n:
        raise ValueError(f"{stages} stages need at least {stages} layers, the model has {n}; use stages <= {n}")
    prefix = [0]
    for b in sizes.layers:
        prefix.append(prefix[-1] + b)
    # best[s][j]: (worst load, spread) for the first s stages over the first j layers
    inf = (math.inf, math.inf)
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0.0)
    ideal = n / stages
    for s in range(1, stages + 1):
        for j in range(s, n - (stages - s) + 1):
            for i in range(s - 1, j):
                if best[s - 1][i] == inf:
                    continue
                load = (prefix[j] - prefix[i] + (sizes.fixed if s == 1 else 0)) / capacities[s - 1]
                cand = (max(best[s - 1][i][0], load), best[s - 1][i][1] + abs((j - i) - ideal))
                if cand < best[s][j]:
                    best[s][j], cut[s][j] = cand, i
    counts, j = [], n
    for s in range(stages, 0, -1):
        i = cut[s][j]
        counts.append(j - i)
        j = i
    return tuple(reversed(counts))


def _layout(stage_devices: tuple[int, ...], split: tuple[int, ...]) -> StageLayout:
    stages, rank, layer = [], 0, 0
    for s, (p, n) in enumerate(zip(stage_devices, split)):
        stages.append(Stage(s, rank, p, layer, layer + n))
        rank, layer = rank + p, layer + n
    return StageLayout(tuple(stages))


def stage_layout(cfg, layers: int, sizes: Sizes | None = None) -> StageLayout:
    """The layout a resolved config (a RunConfig: stages, stage_devices, layer_split, memory_budget) gives a model
    of `layers` layers whose parts weigh `sizes` (needed for the default split and for a memory budget)."""
    devices = cfg.effective_devices
    if cfg.memory_budget is not None:
        if sizes is None:
            raise ValueError("memory_budget needs the model's sizes to choose the stages")
        return fit_memory(sizes, devices, cfg.memory_budget)
    if cfg.stages == 1:
        return StageLayout.single(devices, layers)
    if cfg.stages > layers:
        raise ValueError(f"stages={cfg.stages} but the model has {layers} layers; use stages <= {layers}")
    per_stage = cfg.stage_devices or even_devices(devices, cfg.stages)
    if cfg.layer_split is not None:
        if sum(cfg.layer_split) != layers:
            raise ValueError(f"layer_split {' + '.join(map(str, cfg.layer_split))} = {sum(cfg.layer_split)} layers, "
                             f"but the model has {layers}; make them add up")
        return _layout(per_stage, cfg.layer_split)
    if sizes is None:
        sizes = Sizes(0, (1,) * layers)  # no sizes known: even layer counts
    if len(sizes.layers) != layers:
        raise ValueError(f"sizes describe {len(sizes.layers)} layers, the model has {layers}")
    return _layout(per_stage, balanced_split(sizes, (1.0,) * cfg.stages))


def fit_memory(sizes: Sizes, devices: int, budget_mib: tuple[float, ...]) -> StageLayout:
    """The fewest stages (devices split evenly among them) whose parameters fit every device's budget; the split
    balances each stage's bytes against its smallest device's budget.  ValueError naming the shortfall."""
    budgets = budget_mib * devices if len(budget_mib) == 1 else budget_mib
    limit = [b * MIB for b in budgets]
    n = len(sizes.layers)
    for stages in range(1, min(devices, n) + 1):
        per_stage = even_devices(devices, stages)
        starts = [sum(per_stage[:s]) for s in range(stages)]
        caps = tuple(min(limit[a:a + p]) for a, p in zip(starts, per_stage))
        split = balanced_split(sizes, caps)
        layout = _layout(per_stage, split)
        if all(layout.held_bytes(sizes, r) <= limit[r] for r in range(devices)):
            return layout
    most = min(devices, n)
    need = sizes.fixed + max(sizes.layers)
    raise ValueError(
        f"the model cannot fit: {sizes.total / MIB:.1f} MiB of parameters over {devices} devices with budgets of "
        f"{', '.join(f'{b:g}' for b in budgets)} MiB; the first stage alone needs {need / MIB:.1f} MiB (embeddings "
        f"and head {sizes.fixed / MIB:.1f} MiB + one layer) and {most} stages are the most {devices} devices can "
        "form; add devices or memory")


# ---------------------------------------------------------------------------------------------- hand-offs
def handoff_index(src_plan: Plan, p: int, dst_plan: Plan, q: int, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(src rows, dst rows): flat indices into device p's (B * n_p) rows under `src_plan` and device q's
    (B * n_q) rows under `dst_plan` of the rows p hands q: every real row q computes (owned or an anchor copy)
    whose position p owns, and (keep, a (B, N) mask of positions) that is kept.  In input order, so both ends
    agree without sending an index."""
    a, b = src_plan.devices[p], dst_plan.devices[q]
    batch, n_a, n_b = a.index.shape[0], a.rows, b.rows
    length = int(max(a.index.max(), b.index.max())) + 1 if a.index.numel() and b.index.numel() else 1
    owner = torch.full((batch, length), -1, dtype=torch.long)
    # p's owned rows at their positions; then q's real rows look up their owner's row
    bi, ri = a.owned.cpu().nonzero(as_tuple=True)
    owner[bi, a.index.cpu()[bi, ri]] = ri
    bj, rj = b.valid.cpu().nonzero(as_tuple=True)
    position = b.index.cpu()[bj, rj]
    src_row = owner[bj, position]
    take = src_row >= 0
    if keep is not None:
        take &= keep.cpu()[bj, position]
    bj, rj, src_row = bj[take], rj[take], src_row[take]
    return bj * n_a + src_row, bj * n_b + rj


def last_positions(valid: Tensor) -> Tensor:
    """(B, N) mask of each sequence's last real position: all the first stage needs back for outputs `last`."""
    n = valid.shape[1]
    last = n - 1 - valid.long().flip(1).argmax(1)
    return torch.zeros_like(valid, dtype=torch.bool).scatter_(1, last.unsqueeze(1), True)


__all__ = ["last_positions", "MIB", "Sizes", "Stage", "StageLayout", "balanced_split", "even_devices", "fit_memory", "handoff_index",
           "stage_layout"]
