"""Dynamic batching: concurrent forward / embeddings requests run as one batch, each answered as if alone.

A request's answer must not depend on its neighbours.  Padding never changes a result, but PRISM cuts the
*padded* width into the devices' slices and the planner picks a plan by the request's shape, so requests are
grouped by a key (`batch_key`):
  - the plan the request would run on alone (the planner's pick, or the fixed plan), which the batch then runs on;
  - the outputs and byte budget it asks for;
  - for a compressed plan (more than one device under PRISM), also its width and every row's length: only
    requests of the same shape share a batch (their slices, means and kept tokens are those of the lone run).
    An exact plan (one device, Voltage) pads any widths together.
One thread runs the batches, so the cluster sees one request at a time.  It takes the oldest request and every
queued one with its key and a width within WIDTH_RATIO of its own (up to `max_rows` sequences); while other
requests are still being read it waits up to `wait_s` for them.  A batch that fails is retried request by request, so one bad request fails alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...runtime.simulator import PrismOutput

FIELDS = ("last_hidden_state", "pooler_output", "logits")
WIDTH_RATIO = 1.5  # requests batched together differ in width by at most this factor


@dataclass(eq=False)
class Job:
    """One request waiting for its answer."""

    key: Hashable
    inputs: dict[str, Tensor]
    outputs: str
    budget: float | None
    plan: Any  # the Candidate it runs on alone (None: the fixed plan); a lone job runs as the request said
    fidelity: str | float | None
    started: float = 0.0  # when its batch took the cluster
    exact: bool = False  # its plan alone is exact (one device, Voltage): any exact plan gives its answer
    result: PrismOutput | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    @property
    def width(self) -> int:
        t = self.inputs.get("input_ids")
        return int(t.shape[1]) if t is not None else 0


def batch_key(inputs: dict[str, Tensor], outputs: str, budget: float | None, fidelity: Any, candidate: Any,
              exact: bool) -> Hashable:
    """Requests with equal keys may share a batch (see the module's docstring)."""
    shape: Hashable = None
    if "pixel_values" in inputs:
        shape = tuple(inputs["pixel_values"].shape[1:])
    elif not exact:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        shape = (int(ids.shape[1]), tuple(mask.sum(1).tolist()) if mask is not None else None)
    return outputs, budget, fidelity, candidate, tuple(sorted(inputs)), shape


def merge(jobs: list[Job]) -> dict[str, Tensor]:
    """The jobs' inputs as one batch: text right-padded to the widest (attention_mask 0 on the padding)."""
    if "pixel_values" in jobs[0].inputs:
        return {"pixel_values": torch.cat([j.inputs["pixel_values"] for j in jobs])}
    width = max(j.width for j in jobs)
    out: dict[str, list[Tensor]] = {}
    for job in jobs:
        given = dict(job.inputs)
        given.setdefault("attention_mask", torch.ones_like(given["input_ids"]))
        for name, t in given.items():
            out.setdefault(name, []).append(torch.nn.functional.pad(t, (0, width - t.shape[1])))
    return {name: torch.cat(parts) for name, parts in out.items()}


def split(out: PrismOutput, jobs: list[Job], extra: dict[str, Any]) -> list[PrismOutput]:
    """Each job's rows of the batch's output (positions cut back to its own width); `planned` gains `extra`."""
    parts, start = [], 0
    for job in jobs:
        rows = slice(start, start + job.rows)
        start += job.rows
        values: dict[str, Tensor | None] = {}
        for name in FIELDS:
            t = getattr(out, name)
            if t is not None:
                t = t[rows]
                if job.outputs == "all" and job.width and t.dim() > 2:
                    t = t[:, :job.width]
            values[name] = t
        parts.append(PrismOutput(**values, stats=out.stats, plan=out.plan,
                                 planned={**(out.planned or {}), **extra}))
    return parts


def _close(width: int, other: int) -> bool:
    return max(width, other) <= WIDTH_RATIO * max(1, min(width, other))


class Batcher:
    """Runs jobs on `run(inputs, job)` (the cluster), grouping jobs with equal keys."""

    def __init__(self, run: Callable[[dict[str, Tensor], Job, int], PrismOutput], max_rows: int, wait_s: float,
                 busy: Callable[[], int], on_batch: Callable[[int, int], None] = lambda jobs, rows: None) -> None:
        """run(inputs, first job, jobs in the batch); busy(): requests being read that will queue here (worth a
        moment's wait); on_batch(jobs, rows): told of every batch run."""
        self._run, self.max_rows, self.wait_s, self._busy, self._on_batch = run, max_rows, wait_s, busy, on_batch
        self._jobs: list[Job] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="prism-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> PrismOutput:
        """Queue the job and wait for its answer (its error re-raised here)."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._jobs.append(job)
            self._cv.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self, error: BaseException) -> None:
        """Stop taking jobs; the queued ones fail with `error`."""
        with self._cv:
            self._closed = True
            left, self._jobs = self._jobs, []
            self._cv.notify_all()
        for job in left:
            job.error = error
            job.done.set()

    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._jobs and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            group = self._group()
            deadline = time.monotonic() + self.wait_s
            while (sum(j.rows for j in group) < self.max_rows and self._busy() > 0
                   and (left := deadline - time.monotonic()) > 0):
                self._cv.wait(left)  # others are being read: a moment for them to join
                group = self._group()
            for job in group:
                self._jobs.remove(job)
            return group

    def _group(self) -> list[Job]:
        """The oldest job and the queued jobs with its key, closest in width first, none more than WIDTH_RATIO
        wider or narrower (padding is computed like any position: a 10-token request padded to 60 costs 6×)."""
        first = self._jobs[0]
        near = sorted((j for j in self._jobs[1:] if j.key == first.key and _close(j.width, first.width)),
                      key=lambda j: abs(j.width - first.width))
        group, rows = [first], first.rows
        for job in near:
            if rows + job.rows <= self.max_rows:
                group.append(job)
                rows += job.rows
        return group

    def _loop(self) -> None:
        while (group := self._take()) is not None:
            self._on_batch(len(group), sum(j.rows for j in group))
            try:
                self._answer(group)
            except BaseException as err:  # noqa: BLE001 - handed to the waiting requests
                for job in group:
                    job.error = err
            for job in group:
                job.done.set()

    def _answer(self, group: list[Job]) -> None:
        if len(group) == 1:
            group[0].result = self._run(group[0].inputs, group[0], 1)
            return
        try:
            out = self._run(merge(group), group[0], len(group))
        except ValueError:  # one request the checks let through but the batch refused: each on its own
            for job in group:
                try:
                    job.result = self._run(job.inputs, job, 1)
                except Exception as err:  # noqa: BLE001 - its own error
                    job.error = err
            return
        extra = {"batch": {"requests": len(group), "sequences": sum(j.rows for j in group)}}
        for job, part in zip(group, split(out, group, extra)):
            job.result = part
