"""A persistent cluster of device processes, driven from rank 0: the Python API of the runtime.

    with Cluster("minilm", PrismConfig(devices=4, cr=16)) as cluster:   # spawns 3 local workers
        out = cluster(**tokenizer(texts, padding=True, return_tensors="pt"))
        out.last_hidden_state, out.stats.table()

The process that builds the Cluster is rank 0: it holds the request's inputs, computes device 0's
slice, sends every other device only its own slice, and gathers what the output mode needs.  With
`spawn=False` it joins an existing group instead (the other ranks started by `prism-edge worker` or
`torchrun` on other machines).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from ..config import PrismConfig
from ..models import adapter_for
from . import protocol
from .generate import Generation, Sampling, check_prompt, decode_loop, decode_request, encode_request
from .handshake import check, identity
from .node import run_device, stats_tensor
from .simulator import PrismOutput, plan_for
from .stats import Stats
from .transport import (
    TAG_HEADER,
    TAG_INPUT,
    TAG_META,
    TAG_GENERATE,
    TAG_OUTPUT,
    TAG_STATS,
    DeviceLost,
    DistCommunicator,
    Endpoint,
    join_group,
    open_store,
)


def check_device(device: str) -> torch.device:
    """A torch device this process can use, or a ValueError saying what to pass."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but this torch has no usable CUDA; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return dev


class ClusterError(RuntimeError):
    """The cluster lost a device (or never came up); it has been shut down."""


def config_args(cfg: PrismConfig) -> list[str]:
    """The CLI flags that rebuild `cfg` in a worker process."""
    args = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if value is None or value == ():
            continue
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: a worker gets SIGTERM when the process that spawned it dies, whatever the cause."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Cluster:
    """Rank 0 of a PRISM device group: keeps workers and weights loaded and serves many requests.

    model: an alias (minilm, smollm2), hub name or local folder that every rank can load.
    threads: torch threads per device process.  timeout: seconds any device may stay silent before
    the others give up on it (also the heartbeat bound while idle).  overlap: attention over the own
    keys while the means travel.  device: where rank 0's (and spawned workers') model runs, "cpu"
    or "cuda[:i]" (messages stage through host memory; ranks may use different devices).  spawn:
    start the other devices as local processes (False: they join from elsewhere through `endpoint`).
    """

    def __init__(
        self,
        model: str = "minilm",
        config: PrismConfig | None = None,
        *,
        devices: int | None = None,
        threads: int = 1,
        timeout: float = 30.0,
        startup_timeout: float = 300.0,
        overlap: bool = True,
        count_flops: bool = False,
        cache_dir: str | Path | None = None,
        device: str = "cpu",
        spawn: bool = True,
        endpoint: Endpoint | None = None,
        log=None,
    ) -> None:
        from ..models.loading import load_model

        cfg = config if config is not None else PrismConfig()
        if not isinstance(cfg, PrismConfig):
            raise ValueError(f"config must be a PrismConfig, got {type(cfg).__name__}")
        if devices is not None:
            cfg = cfg.replace(devices=devices)
        if timeout <= 0 or startup_timeout <= 0:
            raise ValueError(f"timeouts must be > 0 seconds, got timeout={timeout}, startup_timeout={startup_timeout}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.device = check_device(device)
        self.cfg, self.model_name, self.threads, self.timeout = cfg, str(model), threads, timeout
        self.overlap, self.count_flops = overlap, count_flops
        self.world = cfg.effective_devices
        self.log = log or (lambda msg: None)
        self._procs: dict[int, subprocess.Popen] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._broken: str | None = None
        self._closed = False
        self._requests = 0
        self._old_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        try:
            self.loaded = load_model(self.model_name, cache_dir=cache_dir)  # first, so workers hit a warm cache
            self.model, self.tokenizer = self.loaded.model.to(self.device), self.loaded.tokenizer
            self.adapter = adapter_for(self.model)
            self.cfg = self.cfg.resolved(self.adapter.kind)  # workers get every option spelled out
            self.comm = DistCommunicator(None, 0, 1, timeout)
            if self.world > 1:
                self._start_group(endpoint, spawn, startup_timeout, cache_dir)
        except BaseException:
            self._teardown()
            raise
        self.startup_s = time.perf_counter() - t0
        self._heartbeat = threading.Thread(target=self._beat, name="prism-edge-heartbeat", daemon=True)
        self._heartbeat.start()
        atexit.register(self.close)

    # ------------------------------------------------------------------ start-up
    def _start_group(self, endpoint: Endpoint | None, spawn: bool, startup: float, cache_dir) -> None:
        endpoint = endpoint or Endpoint("127.0.0.1", 0, bind="127.0.0.1")
        store = open_store(endpoint, 0, self.world, startup)
        if spawn:
            self._spawn(endpoint, store.port, startup, cache_dir)
        group = self._join(store, endpoint, startup)
        self.comm = DistCommunicator(group, 0, self.world, self.timeout)
        self.handshake = check(group, 0, self.world, identity(self.model, self.cfg, self.model_name), startup)

    def _spawn(self, endpoint: Endpoint, port: int, startup: float, cache_dir) -> None:
        env = dict(os.environ)
        if cache_dir is not None:
            env["PRISM_EDGE_CACHE"] = str(cache_dir)
        for rank in range(1, self.world):
            cmd = [sys.executable, "-m", "prism_edge.worker", "--rank", str(rank), "--world-size", str(self.world),
                   "--master", f"{endpoint.master_addr}:{port}", "--model", self.model_name,
                   "--threads", str(self.threads), "--timeout", str(self.timeout), "--startup-timeout", str(startup),
                   "--device", str(self.device)]
            if endpoint.bind:
                cmd += ["--bind", endpoint.bind]
            cmd += ["--overlap" if self.overlap else "--no-overlap"] + (["--count-flops"] if self.count_flops else [])
            cmd += config_args(self.cfg)
            self._procs[rank] = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent,
                                                 stdin=subprocess.DEVNULL)
        self.log(f"spawned {self.world - 1} worker process(es): pids "
                 + ", ".join(str(p.pid) for p in self._procs.values()))

    def _join(self, store, endpoint: Endpoint, startup: float):
        """Join the group in a helper thread while watching the local workers: one that dies before
        joining (bad flags, import error) is reported at once instead of after the start-up timeout."""
        box: dict = {}

        def target():
            try:
                box["group"] = join_group(store, endpoint, 0, self.world, startup)
            except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
                box["error"] = err

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            for rank, proc in self._procs.items():
                code = proc.poll()
                if code is not None and thread.is_alive():
                    raise ClusterError(f"worker rank {rank} (pid {proc.pid}) {_exit_reason(code)} during start-up; "
                                       "see its error above")
        if "error" in box:
            raise box["error"]
        return box["group"]

    # ------------------------------------------------------------------ requests
    def __call__(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        outputs: str = "all",
    ) -> PrismOutput:
        """Run one (batched) request across the devices.

        outputs: "all" (every position, like the model / simulate), "last" (each sequence's last real
        position: logits for the next token), "mean" (mean over real positions: sentence embeddings),
        "pooled" (pooler / classifier outputs only).  last and mean return (B, 1, width) tensors.
        """
        with self._lock:
            self._check_usable()
            batch, plan, header = self._prepare(input_ids, attention_mask, token_type_ids, position_ids,
                                                pixel_values, outputs)
            try:
                return self._run(batch, plan, header)
            except DeviceLost as err:
                self._fail(str(err))
                raise ClusterError(self._broken) from None
            except BaseException as err:  # anything mid-request leaves the workers out of step
                self._fail(f"rank 0 failed mid-request: {type(err).__name__}: {err}")
                raise

    def _check_usable(self) -> None:
        if self._broken:
            raise ClusterError(f"the cluster is down ({self._broken}); create a new Cluster")
        if self._closed:
            raise ClusterError("the cluster is closed; create a new Cluster")

    def _prepare(self, input_ids, attention_mask, token_type_ids, position_ids, pixel_values, outputs):
        """Validate everything on rank 0 before any device hears of the request: a bad request fails
        here with a ValueError and leaves the cluster as it was."""
        if outputs not in protocol.OUTPUT_MODES:
            raise ValueError(f"unknown outputs {outputs!r}; choose one of {', '.join(protocol.OUTPUT_MODES)}")
        if input_ids is not None:
            vocab = getattr(self.model.config, "vocab_size", None)
            if not isinstance(input_ids, Tensor) or input_ids.is_floating_point():
                raise ValueError("input_ids must be an integer tensor of shape (batch, length)")
            if input_ids.numel() and vocab and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
                raise ValueError(f"token ids must lie in 0..{vocab - 1} for this model; got "
                                 f"{int(input_ids.min())}..{int(input_ids.max())}")
        if pixel_values is not None and not isinstance(pixel_values, Tensor):
            raise ValueError("pixel_values must be a float tensor of shape (batch, channels, height, width)")
        batch = self.adapter.prepare(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                     position_ids=position_ids, pixel_values=pixel_values,
                                     sink_token_ids=self.cfg.sink_token_ids)
        n_pos = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", None)
        if n_pos and self.adapter.family != "vit" and int(batch.positions.max()) >= n_pos:
            raise ValueError(f"position {int(batch.positions.max())} is beyond the model's {n_pos} positions; "
                             f"truncate the input to {n_pos} tokens")
        plan = plan_for(batch, self.cfg, self.adapter.geometry.causal)
        self._requests += 1
        return batch, plan, protocol.request_header(batch, self._requests, outputs)

    def _dispatch(self, batch, plan, header) -> None:
        self.comm.reset()
        for p in range(1, self.world):
            self.comm.isend("control", p, [header.encode()], TAG_HEADER, "request header", count=False)
            self.comm.isend("input", p, protocol.meta_tensors(batch, header), TAG_META, "request plan data")
            self.comm.isend("input", p, protocol.input_tensors(batch, plan, p), TAG_INPUT, "request inputs")

    def _worker_stats(self, layers: int) -> list[Tensor]:
        return [self.comm.recv("control", p, [torch.zeros(layers + 1, 5, dtype=torch.int64)], TAG_STATS, "statistics",
                               count=False)[0] for p in range(1, self.world)]

    def generate(self, input_ids: Tensor, *, max_new_tokens: int = 32, sampling=None, stop_ids: tuple[int, ...] = (),
                 on_token=None):
        """Prefill one prompt (1, N) across the devices, then decode on the last device, which streams each
        new token id back (8 bytes per token); on_token(id) is called as each arrives.  Returns a Generation."""
        sampling = sampling or Sampling()
        check_prompt(self.adapter, input_ids, max_new_tokens)
        params = encode_request(max_new_tokens, sampling, tuple(stop_ids))
        with self._lock:
            self._check_usable()
            batch, plan, header = self._prepare(input_ids, None, None, None, None, "last")
            header = dataclasses.replace(header, op=protocol.GENERATE)
            try:
                return self._generate(batch, plan, header, params, input_ids, on_token)
            except DeviceLost as err:
                self._fail(str(err))
                raise ClusterError(self._broken) from None
            except BaseException as err:
                self._fail(f"rank 0 failed mid-generation: {type(err).__name__}: {err}")
                raise

    def _generate(self, batch, plan, header, params, input_ids, on_token) -> Generation:
        t0 = time.perf_counter()
        world, layers, last = self.world, self.adapter.geometry.layers, self.world - 1
        self._dispatch(batch, plan, header)
        local = batch.gather(plan.devices[0].index)
        run = run_device(self.adapter, self.cfg, plan, batch, local, self.comm, overlap=self.overlap,
                         count_flops=self.count_flops, keep_cache=world == 1)
        if world > 1:  # after the prefill: the layer loop flushes pending sends, and the last device reads this later
            self.comm.isend("control", last, [params], TAG_GENERATE, "decode parameters", count=False)
        stats = self._stats([stats_tensor(self.comm, run, layers)] + self._worker_stats(layers), layers,
                            time.perf_counter() - t0)
        result = Generation(prompt_ids=input_ids.cpu(), prefill_stats=stats)
        max_new, sampling, stops = decode_request(params)
        if world == 1:
            with torch.inference_mode():
                decode_loop(self.adapter, run.executor, run.finals["logits"][:, -1], batch.valid.shape[1], max_new,
                            sampling, stops, result, on_token)
            return result
        pinged = time.monotonic()
        for t in range(max_new + 1):
            tid = int(self.comm.recv("decode", last, [torch.zeros(1, dtype=torch.int64)], TAG_GENERATE + 1 + t,
                                     "new token")[0])
            if tid < 0:
                break
            result.new_ids.append(tid)
            if on_token is not None:
                on_token(tid)
            if tid in stops:
                result.stopped_by = "stop token"
            if time.monotonic() - pinged > self.timeout / 3:  # the idle devices wait for their next header
                self._tell(protocol.PING, range(1, last), "heartbeat")
                pinged = time.monotonic()
        self.comm.flush()
        return result

    def _run(self, batch, plan, header) -> PrismOutput:
        t0 = time.perf_counter()
        comm, world, layers = self.comm, self.world, self.adapter.geometry.layers
        self._dispatch(batch, plan, header)
        local = batch.gather(plan.devices[0].index)
        run = run_device(self.adapter, self.cfg, plan, batch, local, comm, overlap=self.overlap,
                         count_flops=self.count_flops)
        names = sorted(run.finals)
        widths = {k: v.shape[-1] for k, v in run.finals.items()}
        dtype = run.finals[names[0]].dtype
        own_mode = "all" if header.mode == "pooled" else header.mode  # the pooler reads rank 0's rows
        parts = [protocol.output_tensors(run.finals, plan, 0, own_mode)]
        for p in range(1, world):
            bufs = protocol.output_buffers(widths, plan, p, header.mode, dtype)
            parts.append(comm.recv("output", p, bufs, TAG_OUTPUT, "outputs"))
        worker_stats = self._worker_stats(layers)
        comm.flush()
        result = self._outputs(parts, names, plan, header, batch.valid.shape[1], run.tally)
        stats = self._stats([stats_tensor(comm, run, layers)] + worker_stats, layers, time.perf_counter() - t0)
        return PrismOutput(**result, stats=stats, plan=plan)

    def _outputs(self, parts, names, plan, header, length, tally) -> dict[str, Tensor]:
        if header.mode not in ("all", "pooled"):
            return protocol.assemble(parts, names, plan, header.mode, length)
        if header.mode == "pooled":  # only rank 0's rows are here, and the pooler reads position 0 (rank 0's)
            parts = [parts[0]] + [[t.new_zeros(int(sl.owned.sum()), t.shape[-1]) for t in parts[0]]
                                  for sl in plan.devices[1:]]
        full = protocol.assemble(parts, names, plan, "all", length)
        device = next(self.model.parameters()).device
        with torch.inference_mode():  # rank 0's work, counted as in simulate
            pooled = tally.run("head", 0, self.adapter.pool, {k: v.to(device) for k, v in full.items()})
        pooled = {k: v.cpu() for k, v in pooled.items()}
        return pooled if header.mode == "pooled" else {**full, **pooled}

    def _stats(self, tables: list[Tensor], layers: int, wall: float) -> Stats:
        flops_known = all(int(t[layers, 2]) >= 0 for t in tables)
        per = lambda col, scale=1: tuple(tuple(t[i, col].item() * scale for t in tables) for i in range(layers))  # noqa: E731
        return Stats(
            world=self.world,
            sent=per(0),
            received=per(1),
            layer_flops=per(2) if flops_known else None,
            flops=tuple(int(t[layers, 2]) for t in tables) if flops_known else None,
            input_bytes=tuple(int(t[layers, 0]) for t in tables),
            output_bytes=tuple(int(t[layers, 1]) for t in tables),
            compute_s=per(3, 1e-9),
            wait_s=per(4, 1e-9),
            wall_s=wall,
            cpu_s=tuple(int(t[layers, 3]) * 1e-9 for t in tables),
            peak_rss_mib=tuple(int(t[layers, 4]) / 1024 for t in tables),
        )

    # ------------------------------------------------------------------ liveness and teardown
    def _tell(self, op: int, ranks, what: str) -> None:
        """Send a bare control header (heartbeat, shutdown) to `ranks` and wait until it has gone out."""
        for p in ranks:
            self.comm.isend("control", p, [protocol.Header(op).encode()], TAG_HEADER, what, count=False)
        self.comm.flush()

    def _beat(self) -> None:
        """While idle, tell every worker rank 0 is alive (they give up after `timeout` s of silence)."""
        interval = self.timeout / 3
        while not self._stop.wait(interval):
            if not self._lock.acquire(timeout=interval):
                continue
            try:
                if self._broken or self._closed or self.world == 1:
                    continue
                self._tell(protocol.PING, range(1, self.world), "heartbeat")
            except DeviceLost as err:
                self._fail(str(err))
            finally:
                self._lock.release()

    def _fail(self, reason: str) -> None:
        """A device is lost: note which local process died (if one did) and take the rest down."""
        time.sleep(0.2)  # let a crashed worker's exit status settle
        dead = [f"rank {r} (pid {p.pid}) {_exit_reason(p.returncode)}" for r, p in self._procs.items()
                if p.poll() is not None and p.returncode != 0]
        self._broken = reason + (f" [{'; '.join(dead)}]" if dead else "")
        self.log(f"cluster down: {self._broken}")
        self._teardown(grace=2.0)

    def _teardown(self, grace: float = 10.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + grace
        for proc in self._procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if getattr(self, "comm", None) is not None:
            self.comm.close(abort=self._broken is not None)
        torch.set_num_threads(self._old_threads)

    def close(self) -> None:
        """Tell every worker to stop, wait for the local ones, and release the group."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._broken and self.world > 1:
                try:
                    self._tell(protocol.SHUTDOWN, range(1, self.world), "shutdown")
                except DeviceLost:
                    pass
            self._teardown()
        atexit.unregister(self.close)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ conveniences
    @property
    def pids(self) -> dict[int, int]:
        return {0: os.getpid(), **{r: p.pid for r, p in self._procs.items()}}

    @property
    def alive(self) -> bool:
        return not (self._broken or self._closed)

    @property
    def requests(self) -> int:
        return self._requests

    def describe(self) -> dict:
        g = self.adapter.geometry
        return {"model": self.model_name, "class": type(self.model).__name__, "devices": self.world,
                "layers": g.layers, "hidden": g.hidden, "config": dataclasses.asdict(self.cfg),
                "threads": self.threads, "timeout_s": self.timeout, "overlap": self.overlap, "device": str(self.device),
                "requests": self._requests, "alive": self.alive, "error": self._broken}
