"""`prism-edge launch`: start one process per device on this machine and run (or serve) requests.

  prism-edge launch --devices 4                          4 local device processes, the bundled default request
  prism-edge launch --devices 2 --serve 127.0.0.1:8000   keep serving over HTTP (JSON and OpenAI-compatible)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from typing import Any

import torch

from ..cluster import env
from ..runtime.stats import measured
from ..cluster import Cluster, ClusterError
from ..flags import config_from
from .serve.native import default_mode
from .report import describe_result, fmt_bytes
from ..eval.requests import build_request
from ..cluster.follower import Seat, serve_rank
from ..cluster.node import Fault
from ..cluster.procs import steady_heap
from ..cluster.spec import LaunchSpec
from .cli import Terminated


def launch_spec(args: argparse.Namespace) -> LaunchSpec:
    """The LaunchSpec of a device command's flags, with what they leave to the environment: the cluster secret
    (--cluster-secret, --cluster-secret-file or $PRISM_EDGE_CLUSTER_SECRET) and the weights cache."""
    spec = LaunchSpec.from_args(args)
    return spec.replace(cache_dir=spec.cache_dir or str(env.cache_dir()),
                        cluster_secret=env.cluster_secret(spec.cluster_secret, args.cluster_secret_file))


def cmd_worker(args: argparse.Namespace) -> int:
    seat = Seat.from_args(args)
    if args.devices is None:
        args.devices = seat.world
    spec, cfg = launch_spec(args), config_from(args, allow_auto=True)
    if cfg.effective_devices != seat.world:
        raise ValueError(f"the config has devices={cfg.effective_devices} but the group has {seat.world} ranks; "
                         f"pass --devices {seat.world}")
    torch.set_num_threads(spec.threads)  # this process is a device: its threads are ours to set
    steady_heap()
    if seat.rank == 0:
        with Cluster(config=cfg, spec=spec, spawn=False, endpoint=seat.endpoint(), log=log) as cluster:
            return drive(cluster, args)
    fault = env.fault(seat.rank)
    return serve_rank(seat, spec, cfg, fault=Fault(*fault) if fault else None, slowdown=env.slowdown(seat.rank))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_launch(args: argparse.Namespace) -> int:
    spec = launch_spec(args)
    cfg = config_from(args, allow_auto=True)
    torch.set_num_threads(spec.threads)  # this process is device 0
    steady_heap()
    serve_setup(args)  # a bad --serve or key file is refused before any device starts
    log(f"starting {cfg.effective_devices} device process(es) for {spec.model} ...")
    with Cluster(config=cfg, spec=spec, log=log) as cluster:
        return drive(cluster, args)


def _stop_when_down(cluster: Cluster, server: Any) -> None:
    """Stop serving once the cluster is down (a device lost between requests, too: no request has to fail first)."""
    while cluster.alive:
        time.sleep(0.1)
    server.stop()


def serve_setup(args: argparse.Namespace) -> tuple[str, int, Any, tuple[str, ...]] | None:
    """--serve HOST:PORT and the server's flags, checked before any device starts: (host, port, options, keys)."""
    if not getattr(args, "serve", None):
        return None
    from .serve.options import ServeOptions

    host, _, port = args.serve.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--serve must be HOST:PORT (e.g. 127.0.0.1:8000), got {args.serve!r}")
    options = ServeOptions.from_args(args)
    return host or "127.0.0.1", int(port), options, options.keys(os.environ)


def serve(cluster: Cluster, setup: tuple[str, int, Any, tuple[str, ...]]) -> int:
    """Serve HTTP until SIGTERM / Ctrl-C (in-flight requests finish first) or a lost device."""
    from .serve.server import Server

    host, port, options, keys = setup
    server = Server(cluster, host, port, options, keys)
    for line in server.warnings():
        log(line)
    signal.signal(signal.SIGTERM, _terminated)  # uvicorn re-raises it once shut down: leave through the finally's
    threading.Thread(target=_stop_when_down, args=(cluster, server), name="prism-edge-serve-watch",
                     daemon=True).start()
    server.run(lambda url: log(
        f"serving on {url}  (GET /health, /metrics, /v1/models; POST /v1/forward, /v1/generate, /v1/completions, "
        f"/v1/chat/completions, /v1/embeddings){'; API key required' if keys else ''}; Ctrl-C or SIGTERM stops "
        "every device"))
    down = cluster.describe()["error"]
    if down:
        raise ClusterError(f"stopped serving: the cluster is down ({down})")
    return 0 if cluster.alive else 1


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def drive(cluster: Cluster, args: argparse.Namespace) -> int:
    """Rank 0's work once the cluster is up: serve HTTP, or run the request `repeat` times and print the result."""
    if args.serve:
        return serve(cluster, serve_setup(args) or ("127.0.0.1", 8000, None, ()))
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    inputs, _ = build_request(cluster.loaded, args.text, args.text_file, args.image, args.max_length)
    mode = args.outputs or default_mode(cluster)
    # the config's budget; the cluster's --plan and --fidelity
    outs = [cluster(**inputs, outputs=mode, budget=None, plan=None, fidelity=None) for _ in range(args.repeat)]
    stats = measured(outs[-1].stats)
    walls = [measured(o.stats).wall_s or 0.0 for o in outs]
    if args.json:
        print(json.dumps({"cluster": cluster.describe(), "mode": mode, "wall_s": walls, "stats": stats.to_dict(),
                          "planned": outs[-1].planned}))
        return 0
    for line in _summary(cluster, inputs, mode, walls) + _plan_lines(outs[-1].planned):
        print(line)
    stages = cluster.coordinator.stages
    if stages.staged:  # rank 0 holds only its stage: no unpartitioned model here to compare with
        print(f"stages   {stages.describe()}; parameters held per device: "
              + ", ".join(fmt_bytes(b) for b in stats.param_bytes or ()))
        print("result   not compared with the unpartitioned model: rank 0 holds only its stage's layers "
              "(run with --stages 1 to compare)")
    else:
        for line in describe_result(cluster.model, cluster.tokenizer, inputs, outs[-1], mode)[: args.show]:
            print("result   " + line)
    print("\nper device, one request (bytes counted from the tensors sent):")
    print(stats.table())
    staged = f" + stage hand-offs {fmt_bytes(stats.stage_bytes)}" if stats.stage_bytes else ""
    print(f"\non the wire: {fmt_bytes(stats.request_bytes)} = exchange {fmt_bytes(stats.total_bytes)}{staged} + inputs "
          f"{fmt_bytes(sum(stats.input_bytes or ()))} + outputs {fmt_bytes(sum(stats.output_bytes or ()))}")
    return 0


def _plan_lines(planned: dict | None) -> list[str]:
    """The plan that ran: the planner's pick with its predicted and measured time, and what it weighed."""
    if not planned or planned.get("predicted_ms") is None:
        return []
    weighed = ", ".join(f"{label} {ms:,.0f}" for label, ms in planned.get("candidates", {}).items())
    return [f"plan     auto (fidelity {planned['fidelity']}): {planned['plan']}, predicted {planned['predicted_ms']:,.1f} "
            f"ms, measured {planned['measured_ms']:,.1f} ms; predicted ms of the candidates weighed: {weighed}"]


def _summary(cluster: Cluster, inputs: dict[str, torch.Tensor], mode: str, walls: list[float]) -> list[str]:
    g, cfg = cluster.adapter.geometry, cluster.cfg
    valid = inputs.get("attention_mask")
    lengths = valid.sum(1).tolist() if valid is not None else [next(iter(inputs.values())).shape[-1]]
    pids = cluster.pids
    where = (f"pids {', '.join(map(str, pids.values()))}" if len(pids) == cluster.world
             else f"rank 0 is pid {os.getpid()}, the others joined over the network")
    repeat = f" (median of {len(walls)})" if len(walls) > 1 else ""
    return [f"cluster  {cluster.world} device processes ({where}), gloo, {cluster.threads} thread(s) each, "
            f"up in {cluster.startup_s:.1f} s",
            f"model    {cluster.model_name}: {type(cluster.model).__name__}, {g.layers} layers, hidden {g.hidden}; "
            f"{cfg.describe()}, overlap {'on' if cluster.overlap else 'off'}",
            f"request  {len(lengths)} input(s), {min(lengths)}-{max(lengths)} positions, outputs={mode}: "
            f"{statistics.median(walls) * 1e3:.1f} ms wall{repeat}"]
