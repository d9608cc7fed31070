"""How the server's handlers run on the cluster: forwards through the batcher, generations in turn, all timed.

A handler gets a Ctx (api.py) whose `forward` and `generate` come from here.  The cluster runs one request at a
time; `turn` (a lock) orders the generations and the batches, so the time a request waited for it is its queue
time (prism_queue_seconds).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ...runtime.simulator import PrismOutput
from .api import ApiError, Ctx
from .batching import Batcher, Job, batch_key
from .metrics import Metrics
from .options import ServeOptions


class Runner:
    def __init__(self, cluster: Any, options: ServeOptions, metrics: Metrics) -> None:
        self.cluster, self.metrics = cluster, metrics
        self.turn = threading.Lock()
        self._reading = 0  # forward requests whose handler runs and has not queued its job yet
        self._count = threading.Lock()
        self._local = threading.local()
        self.batcher = Batcher(self._run, options.max_batch, options.batch_wait_ms / 1e3, busy=lambda: self._reading,
                               on_batch=self._on_batch)

    def context(self, route: str, t0: float) -> Ctx:
        return Ctx(self.cluster, lambda inputs, **kw: self.forward(route, t0, inputs, **kw),
                   lambda ids, **kw: self.generate(route, t0, ids, **kw))

    def call(self, handler: Callable[[Ctx, dict[str, Any]], Any], ctx: Ctx, body: dict[str, Any],
             batched: bool = False) -> Any:
        """Run a handler (in a server thread).  A batched route's request counts as being read until it queues its
        job, so that a batch about to start waits a moment for it."""
        if not batched:
            return handler(ctx, body)
        with self._count:
            self._reading += 1
        self._local.reading = True
        try:
            return handler(ctx, body)
        finally:
            self._unread()

    def _unread(self) -> None:
        if getattr(self._local, "reading", False):
            self._local.reading = False
            with self._count:
                self._reading -= 1

    # ------------------------------------------------------------------ forward: batched
    def forward(self, route: str, t0: float, inputs: dict[str, Tensor], outputs: str = "all",
                budget: float | None = None, fidelity: str | float | None = None) -> PrismOutput:
        if "input_ids" in inputs and "attention_mask" not in inputs:
            inputs = {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}
        choice, cand = self.cluster.resolve(inputs, outputs, budget=budget, fidelity=fidelity)  # ValueError: 400
        if cand is None:
            exact = self.cluster.world == 1 or self.cluster.cfg.scheme == "voltage"
        else:
            exact = cand.devices == 1 or cand.scheme in ("full", "voltage")
        key = batch_key(inputs, outputs, budget, fidelity, cand, exact)
        job = Job(key, inputs, outputs, budget, cand, fidelity, exact=exact)
        self._unread()  # queued now: the batcher need not wait for it any more
        out = self.batcher.submit(job)
        self.metrics.queue.labels(route).observe(job.started - t0)
        return out

    def _run(self, inputs: dict[str, Tensor], job: Job, jobs: int) -> PrismOutput:
        """One batch on the cluster: a lone job as its request said; several that each would run exact, on the
        fastest exact plan for the batch (one device or Voltage: the same answers); others on the plan each would
        run alone."""
        with self.turn:
            job.started = time.monotonic()
            if jobs == 1:
                out = self.cluster(**inputs, outputs=job.outputs, budget=job.budget, plan=None, fidelity=job.fidelity)
            elif job.exact and self.cluster.planner is not None:
                out = self.cluster(**inputs, outputs=job.outputs, plan="auto", fidelity="exact")
            else:
                out = self.cluster(**inputs, outputs=job.outputs, budget=job.budget, plan=job.plan or "fixed")
        self.metrics.observe_stats(out.stats)
        return out

    def _on_batch(self, jobs: int, rows: int) -> None:
        self.metrics.batch_requests.observe(jobs)
        self.metrics.batch_rows.observe(rows)

    # ------------------------------------------------------------------ generate: in turn
    def generate(self, route: str, t0: float, ids: Tensor, on_token: Callable[[int], bool] | None = None,
                 **kw: Any) -> Any:
        last: list[float] = []

        def timed(tid: int) -> bool:
            now = time.monotonic()
            if last:
                self.metrics.per_token.observe(now - last[0])
            else:
                self.metrics.first_token.observe(now - t0)
            last[:] = [now]
            return bool(on_token(tid)) if on_token is not None else False

        with self.turn:
            self.metrics.queue.labels(route).observe(time.monotonic() - t0)
            gen = self.cluster.generate(ids, on_token=timed, **kw)
        if gen.prefill_stats is not None:
            self.metrics.observe_stats(gen.prefill_stats)
            self.metrics.prefill.observe(gen.prefill_stats.wall_s or 0.0)
        self.metrics.tokens.labels("prompt").inc(int(ids.shape[1]))
        self.metrics.tokens.labels("completion").inc(len(gen.new_ids))
        return gen

    def close(self, err: ApiError) -> None:
        self.batcher.close(err)
