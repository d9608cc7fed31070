"""Cluster: rank 0 of a PRISM device group, the Python API of the runtime.

    with Cluster("minilm", PrismConfig(devices=4, cr=16)) as cluster:   # spawns 3 local workers
        out = cluster(**tokenizer(texts, padding=True, return_tensors="pt"))
        out.last_hidden_state, out.stats.table()

The process that builds the Cluster is rank 0: it holds the request's inputs, computes device 0's
slice, sends every other device only its own slice, and gathers what the output mode needs.  With
`spawn=False` it joins an existing group instead (the other ranks started by `prism-edge worker` or
`torchrun` on other machines).  The parts, one job each: procs (local worker processes), startup
(rendezvous, handshake, --weights auto), heartbeat, dispatch (requests), generation.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..config import AnyConfig, PrismConfig, RunConfig, resolve
from ..models import adapter_for
from ..runtime.stages import layout_for
from .stageload import load_for_rank, serve_weights, to_device
from ..runtime import wire
from ..runtime.decode import Link, choose
from ..runtime.generate import Generation, TokenCallback, check_prompt, check_request
from ..runtime.sampling import Sampling
from ..runtime.wire import DecodeParams
from ..runtime.simulator import PrismOutput
from .rendezvous import Endpoint
from .transport import DeviceLost, DistCommunicator
from .spec import LaunchSpec
from .coordinator import Coordinator
from .errors import ClusterError, RequestError
from .generation import run_generation
from .heartbeat import Heartbeat
from .liveness import Liveness, down_when_lost
from .procs import LocalWorkers
from .startup import Agreement, agree, open_group
from .replan import Replanner
from .views import ClusterViews
from ..planning import Candidate


def _quiet(msg: str) -> None:
    pass


def _config(config: AnyConfig | None, devices: int | None, spec: LaunchSpec) -> AnyConfig:
    cfg = config if config is not None else PrismConfig()
    if not isinstance(cfg, (PrismConfig, RunConfig)):
        raise ValueError(f"config must be a PrismConfig, got {type(cfg).__name__}")
    cfg = cfg.replace(devices=devices) if devices is not None else cfg
    if spec.auto_weights and cfg.weights is not None:
        raise ValueError(f"auto_weights=True measures the weights; leave config.weights unset (got {cfg.weights})")
    return cfg


class Cluster(ClusterViews):
    """Rank 0 of a PRISM device group: keeps workers and weights loaded and serves many requests, one at a time.

    model: alias, hub name or folder every rank can load.  config: resolved once, for its kind, into `cfg`.
    settings: any other LaunchSpec field (threads, timeout, startup_timeout, overlap, count_flops, device, cache_dir,
    verbose, fetch_weights, plan, fidelity, cluster_secret, auto_weights), with its defaults (plan "fixed": the
    config on every device; "auto" probes at start-up and plans each request); or the whole LaunchSpec as `spec`.
    spawn: start the other devices as local processes (False: they join through `endpoint`); worker_env: extra
    environment for spawned workers (the cluster secret reaches them through theirs, not their command line).
    This process's own torch threads and exit hooks are the caller's: set_threads=True sets them to
    `threads` until close(), and close_at_exit=True closes the cluster when the interpreter exits.
    """

    def __init__(self, model: str | None = None, config: AnyConfig | None = None, *, devices: int | None = None,
                 spec: LaunchSpec | None = None, spawn: bool = True, endpoint: Endpoint | None = None,
                 log: Callable[[str], None] | None = None, worker_env: dict[str, str] | None = None,
                 set_threads: bool = False, close_at_exit: bool = False, **settings: Any) -> None:
        if spec is not None and (model is not None or settings):
            raise ValueError("pass either spec=LaunchSpec(...) or a model and settings, not both")
        self.spec = spec if spec is not None else LaunchSpec.with_settings(model, settings)
        cfg = _config(config, devices, self.spec)
        self.device = self.spec.torch_device()
        self.log = log or _quiet
        self.world = cfg.effective_devices
        self.workers = LocalWorkers()
        self._lock = threading.RLock()
        self._broken: str | None = None
        self._closed = False
        self._restore_threads = torch.get_num_threads() if set_threads else None
        if set_threads:
            torch.set_num_threads(self.spec.threads)
        self._comm: DistCommunicator | None = None
        self._live: Liveness | None = None  # every rank's beat and watch (cluster/liveness.py)
        t0 = time.perf_counter()
        try:
            self._start(cfg, spawn, endpoint, worker_env)
        except BaseException:
            self._teardown()
            raise
        self.startup_s = time.perf_counter() - t0
        self._heartbeat = Heartbeat(self._lock, self.spec.timeout / 3, self._beat).start()
        self._at_exit = close_at_exit
        if close_at_exit:
            atexit.register(self.close)

    def _start(self, given: AnyConfig, spawn: bool, endpoint: Endpoint | None, worker_env: dict[str, str] | None) -> None:
        # first: workers hit a warm cache.  With pipeline stages, only the first stage's weights
        self.loaded = load_for_rank(self.spec.model, self.spec.cache_dir, given, 0)
        self.model, self.tokenizer = to_device(self.loaded.model, self.device), self.loaded.tokenizer
        self.adapter = adapter_for(self.model)
        cfg = resolve(given, self.adapter.kind, name="config")  # once; workers get every option spelled out
        self._comm = DistCommunicator(None, 0, 1, self.spec.timeout)  # alone: no group
        self.agreement = Agreement(cfg, [])
        if self.world > 1:
            group, self._live = open_group(self.spec, cfg, endpoint, self.workers, spawn, worker_env, self.log)
            # to workers started without the model; the layout from rank 0's own (partial) model, no second skeleton
            serve_weights(group, self.spec, layout_for(cfg, self.adapter), self.world, self.log)
            self._comm = DistCommunicator(group, 0, self.world, self.spec.timeout)
            self.agreement = agree(group, 0, self.world, self.model, self.adapter, cfg, self.spec, log=self.log)
            if self.agreement.probe_s is not None:
                ms = " / ".join(f"{t * 1e3:.1f}" for t in self.agreement.probe_s)
                self.log(f"weights auto: a {self.world}-device probe took {ms} ms per device -> weights "
                         + ", ".join(f"{w:g}" for w in self.agreement.cfg.weights or ()))
        self.cfg = self.agreement.cfg
        self.coordinator = Coordinator(self.adapter, self.cfg, self._comm, overlap=self.spec.overlap,
                                       count_flops=self.spec.count_flops, plan=self.spec.plan,
                                       fidelity=self.spec.fidelity)
        self.replanner = Replanner(self.coordinator, self.adapter, self.cfg, self.spec, self.agreement.profile,
                                   self.log)
        if self._live is not None:  # a lost rank takes the cluster down even between requests
            self._live.watch(down_when_lost(self._lock, lambda: not self.alive, self._fail), self.workers.died)

    # ------------------------------------------------------------------ requests
    def __call__(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                 token_type_ids: Tensor | None = None, position_ids: Tensor | None = None,
                 pixel_values: Tensor | None = None, outputs: str = "all", budget: float | None = None,
                 plan: str | Candidate | None = None, fidelity: str | float | None = None) -> PrismOutput:
        """Run one (batched) request across the devices.

        outputs: "all" (every position, like the model / simulate), "last" (each sequence's last real
        position: logits for the next token), "mean" (mean over real positions: sentence embeddings),
        "pooled" (pooler / classifier outputs only).  last and mean return (B, 1, width) tensors.
        budget: this request's byte budget, a fraction of Voltage's bytes (None: the cluster's config).
        plan, fidelity: Coordinator.prepare's (None: the cluster's --plan, --fidelity).  The output's `planned`
        says which plan ran, with its predicted and measured time."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                      position_ids=position_ids, pixel_values=pixel_values)
        with self._lock:
            self._check_usable()
            req = self.coordinator.prepare(inputs, outputs, budget=budget, plan=plan, fidelity=fidelity)
            with self._guard("request"):
                return self.coordinator.forward(req)

    def generate(self, input_ids: Tensor, *, max_new_tokens: int = 32, sampling: Sampling | None = None,
                 stop_ids: tuple[int, ...] = (), on_token: TokenCallback | None = None, decode: str = "auto",
                 link: Link | None = None, budget: float | None = None, plan: str | Candidate | None = None,
                 fidelity: str | float | None = None) -> Generation:
        """Prefill one prompt (1, N) across the devices, then decode on the last device, which streams each
        new token id back (8 bytes per token).  on_token(id) is called as each arrives; returning True stops
        the generation (the last device stops within a few tokens).  decode: local | handoff | distributed |
        auto (runtime.decode; `link` is what auto assumes).  budget: the prefill's byte budget (None: the
        config's generation budget).  plan, fidelity: the prefill's, as for a forward.  Returns a Generation (its
        `mode` says which, its `planned` the prefill's plan)."""
        sampling, stops = check_request(self.adapter, input_ids, max_new_tokens, sampling, stop_ids, on_token)
        with self._lock:
            self._check_usable()
            req = self.coordinator.prepare({"input_ids": input_ids}, "last", op=wire.GENERATE, budget=budget,
                                           plan=plan, fidelity=fidelity)
            geo, dtype = self.adapter.geometry, req.cfg.wire_for(req.batch.longest)
            mode = choose(decode, req.plan, req.batch.positions, geo, dtype, max_new_tokens, link or Link())
            params = DecodeParams(max_new_tokens, sampling, stops, mode)
            with self._guard("generation"):
                return run_generation(self.coordinator, req, params, input_ids, on_token, self.spec.timeout / 3)

    def check_generate(self, input_ids: Tensor, max_new_tokens: int, budget: float | None = None) -> None:
        """Raise the ValueError `generate` would raise for this prompt, without running anything."""
        check_prompt(self.adapter, input_ids, max_new_tokens)
        self.coordinator.prepare({"input_ids": input_ids}, "last", op=wire.GENERATE, budget=budget)

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """A lost device, or anything that escapes while the devices are mid-exchange (out of step), takes them
        down; an error once the exchange is complete (RequestError: a device failed inside the request; a
        callback's own error) leaves the cluster serving."""
        try:
            yield
        except DeviceLost as err:
            self._fail(str(err))
            raise ClusterError(self._broken) from None
        except BaseException as err:
            if self.coordinator.in_flight:
                self._fail(f"rank 0 failed mid-{what}: {type(err).__name__}: {err}")
            elif isinstance(err, RequestError):
                self.log(f"request failed: {err}")
            raise

    def _check_usable(self) -> None:
        if self._broken:
            raise ClusterError(f"the cluster is down ({self._broken}); create a new Cluster")
        if self._closed:
            raise ClusterError("the cluster is closed; create a new Cluster")

    # ------------------------------------------------------------------ liveness and teardown
    def _beat(self) -> None:
        if self._broken or self._closed or self.world == 1:
            return
        try:
            if self.replanner.due:
                self.replanner.reprobe()
            self.coordinator.tell(wire.PING, range(1, self.world), "heartbeat")
        except DeviceLost as err:
            self._fail(str(err))

    def reprobe(self) -> None:
        """Run the start-up probes again on every device (between requests), and plan with what they find."""
        with self._lock:
            self._check_usable()
            with self._guard("probe"):
                self.replanner.reprobe()

    def _fail(self, reason: str) -> None:
        """A device is lost: tell every rank (the first loss told names the device), note which local process
        died (if one did) and take the rest down."""
        reason = self._live.tell(reason) if self._live is not None else reason
        dead = [d for d in self.workers.crashed() if d not in reason]
        self._broken = reason + (f" [{'; '.join(dead)}]" if dead else "")
        self.log(f"cluster down: {self._broken}")
        self._teardown(grace=2.0)

    def _teardown(self, grace: float = 10.0) -> None:
        if getattr(self, "_heartbeat", None) is not None:
            self._heartbeat.stop()
        if self._live is not None:
            self._live.stop()
        self.workers.stop(grace)
        if self._comm is not None:
            self._comm.close(abort=self._broken is not None)
        if self._restore_threads is not None:
            torch.set_num_threads(self._restore_threads)
            self._restore_threads = None

    def close(self) -> None:
        """Tell every worker to stop, wait for the local ones, and release the group."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._broken and self._live is not None:  # a worker leaving from here on is no loss
                self._live.closing(lambda: self.coordinator.tell(wire.SHUTDOWN, range(1, self.world), "shutdown"))
            self._teardown()
        if self._at_exit:
            atexit.unregister(self.close)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
