"""`prism-edge launch` and `prism-edge worker`: the multi-process runtime from the command line.

  prism-edge launch --devices 4                    4 local device processes, the bundled default request
  prism-edge launch --devices 2 --serve 127.0.0.1:8000   keep serving JSON over HTTP
  prism-edge worker --rank R --world-size W --master HOST:PORT ...   one device of a multi-machine group
  torchrun --nnodes 2 --node-rank K --master-addr HOST --master-port 29500 -m prism_edge.worker ...
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch

from .cli import _fmt_bytes, _inputs, cache_dir, config_from


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _endpoint(args):
    from .runtime.transport import Endpoint

    master = args.master or f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '29500')}"
    return Endpoint.parse(master, args.bind, args.iface)


def _reference(model, inputs: dict, mode: str, adapter) -> dict[str, torch.Tensor]:
    """The unpartitioned HF model's answer for the same request, reduced like the cluster's outputs."""
    with torch.inference_mode():
        out = model(**inputs)
    valid = inputs.get("attention_mask")
    result = {}
    for name in ("last_hidden_state", "logits", "pooler_output"):
        t = getattr(out, name, None)
        if t is None:
            continue
        if mode == "mean" and t.dim() == 3:
            m = (valid if valid is not None else torch.ones(t.shape[:2])).unsqueeze(-1).to(t.dtype)
            result[name] = (t * m).sum(1) / m.sum(1)
        elif mode == "last" and t.dim() == 3:
            last = (valid.sum(1) - 1) if valid is not None else torch.full((t.shape[0],), t.shape[1] - 1)
            result[name] = t[torch.arange(t.shape[0]), last]
        elif mode == "pooled" and t.dim() == 2:
            result[name] = t
    return result


def describe_result(cluster, inputs: dict, labels: list[str], out, mode: str) -> list[str]:
    """A few lines comparing the cluster's answer with the unpartitioned model's."""
    ref = _reference(cluster.model, inputs, mode, cluster.adapter)
    lines = []
    if mode == "last" and out.logits is not None:
        tok = cluster.tokenizer
        got, want = out.logits[:, 0].softmax(-1), ref["logits"].softmax(-1)
        for b in range(got.shape[0]):
            g, w = int(got[b].argmax()), int(want[b].argmax())
            lines.append(f"next token: {tok.decode([g])!r} (p={float(got[b, g]):.3f}); unpartitioned model: "
                         f"{tok.decode([w])!r} (p={float(want[b, w]):.3f})")
        return lines
    if mode == "pooled":
        for name, value in ref.items():
            mine = getattr(out, name)
            if name == "logits":
                agree = (mine.argmax(-1) == value.argmax(-1)).float().mean()
                lines.append(f"predicted class agrees with the unpartitioned model on {100 * float(agree):.0f} % "
                             f"of {mine.shape[0]} input(s)")
            cos = torch.nn.functional.cosine_similarity(mine.reshape(mine.shape[0], -1), value, dim=-1)
            lines.append(f"{name}: cosine to the unpartitioned model {float(cos.mean()):.4f}")
        return lines
    name = "last_hidden_state" if "last_hidden_state" in ref else next(iter(ref))
    mine = getattr(out, name)[:, 0] if mode != "all" else getattr(out, name)
    want = ref[name]
    if mode == "all":
        mine, want = mine.reshape(-1, mine.shape[-1]), want.reshape(-1, want.shape[-1])
    cos = torch.nn.functional.cosine_similarity(mine, want, dim=-1)
    what = "embedding (mean over positions)" if mode == "mean" else name
    lines.append(f"{what}: cosine to the unpartitioned model mean {float(cos.mean()):.4f}, min {float(cos.min()):.4f}")
    return lines


def drive(cluster, args) -> int:
    """Rank 0's work once the cluster is up: serve HTTP, or run the request(s) and print the result."""
    from .runtime.http import default_mode, make_server

    if args.serve:
        host, _, port = args.serve.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"--serve must be HOST:PORT (e.g. 127.0.0.1:8000), got {args.serve!r}")
        server = make_server(cluster, host or "127.0.0.1", int(port))
        h, p = server.server_address[:2]
        _log(f"serving on http://{h}:{p}  (POST /v1/forward, GET /health); Ctrl-C stops every device")
        try:
            server.serve_forever()
        finally:
            server.server_close()
        return 0 if cluster.alive else 1

    inputs, labels = _inputs(cluster.loaded, args)
    mode = args.outputs or default_mode(cluster)
    walls, out = [], None
    for _ in range(max(1, args.repeat)):
        out = cluster(**inputs, outputs=mode)
        walls.append(out.stats.wall_s)
    stats = out.stats
    if args.json:
        print(json.dumps({"cluster": cluster.describe(), "mode": mode, "wall_s": walls, "stats": stats.to_dict()}))
        return 0
    g, cfg = cluster.adapter.geometry, cluster.cfg
    valid = inputs.get("attention_mask")
    lengths = valid.sum(1).tolist() if valid is not None else [next(iter(inputs.values())).shape[-1]]
    where = (f"pids {', '.join(map(str, cluster.pids.values()))}" if len(cluster.pids) == cluster.world
             else f"rank 0 is pid {os.getpid()}, the others joined over the network")
    print(f"cluster  {cluster.world} device processes ({where}), gloo, {cluster.threads} thread(s) each, "
          f"up in {cluster.startup_s:.1f} s")
    print(f"model    {cluster.model_name}: {type(cluster.model).__name__}, {g.layers} layers, hidden {g.hidden}; "
          f"{cfg.describe()}, overlap {'on' if cluster.overlap else 'off'}")
    print(f"request  {len(lengths)} input(s), {min(lengths)}-{max(lengths)} positions, outputs={mode}: "
          f"{statistics.median(walls) * 1e3:.1f} ms wall" + (f" (median of {len(walls)})" if len(walls) > 1 else ""))
    for line in describe_result(cluster, inputs, labels, out, mode)[: args.show]:
        print("result   " + line)
    print("\nper device, one request (bytes counted from the tensors sent):")
    print(stats.table())
    print(f"\non the wire: {_fmt_bytes(stats.request_bytes)} = exchange {_fmt_bytes(stats.total_bytes)} + inputs "
          f"{_fmt_bytes(sum(stats.input_bytes))} + outputs {_fmt_bytes(sum(stats.output_bytes))}")
    return 0


def cmd_launch(args) -> int:
    from .runtime.cluster import Cluster

    cfg = config_from(args)
    _log(f"starting {cfg.effective_devices} device process(es) for {args.model} ...")
    with Cluster(args.model, cfg, threads=args.threads, timeout=args.timeout, startup_timeout=args.startup_timeout,
                 overlap=args.overlap, count_flops=args.count_flops, cache_dir=cache_dir(), device=args.device,
                 log=_log) as cluster:
        return drive(cluster, args)


def cmd_worker(args) -> int:
    """One rank of a group.  Rank 0 is the coordinator (and device 0); the others serve it."""
    from .runtime.transport import DeviceLost, DistCommunicator, join_group, open_store

    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "-1"))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "0"))
    if rank < 0 or world < 1 or rank >= world:
        raise ValueError(f"need 0 <= --rank < --world-size (or torchrun's RANK/WORLD_SIZE); got rank {rank}, "
                         f"world size {world}")
    if args.devices is None:
        args.devices = world
    cfg = config_from(args)
    if cfg.effective_devices != world:
        raise ValueError(f"the config has devices={cfg.effective_devices} but the group has {world} ranks; "
                         f"pass --devices {world}")
    endpoint = _endpoint(args)
    torch.set_num_threads(args.threads)
    if rank == 0:
        from .runtime.cluster import Cluster

        with Cluster(args.model, cfg, threads=args.threads, timeout=args.timeout,
                     startup_timeout=args.startup_timeout, overlap=args.overlap, count_flops=args.count_flops,
                     cache_dir=cache_dir(), device=args.device, spawn=False, endpoint=endpoint, log=_log) as cluster:
            return drive(cluster, args)

    from transformers.utils import logging as hf_logging

    from .models import adapter_for
    from .models.loading import load_model
    from .runtime.cluster import check_device
    from .runtime.handshake import check, identity

    hf_logging.disable_progress_bar()  # one "Loading weights" bar (rank 0's) is enough
    from .runtime.node import serve_worker

    store = open_store(endpoint, rank, world, args.startup_timeout)
    group = join_group(store, endpoint, rank, world, args.startup_timeout)
    try:
        loaded = load_model(args.model, cache_dir=cache_dir())
        loaded.model.to(check_device(args.device))
    except BaseException:
        group.shutdown()
        raise
    adapter = adapter_for(loaded.model)
    cfg = cfg.resolved(adapter.kind)  # as rank 0 does: the handshake compares resolved configs
    check(group, rank, world, identity(loaded.model, cfg, args.model), args.startup_timeout)
    comm = DistCommunicator(group, rank, world, args.timeout)
    try:
        serve_worker(adapter, cfg, comm, overlap=args.overlap, count_flops=args.count_flops,
                     log=_log if args.verbose else None)
    except DeviceLost as err:
        # the group is broken and may hold stuck operations: report and leave at once, never hang on exit
        print(f"prism-edge: error: {err}", file=sys.stderr, flush=True)
        os._exit(3)
    except Exception:  # a bug or a resource error mid-request: the peers see a closed connection
        import traceback

        traceback.print_exc()
        print(f"prism-edge: error: rank {rank} failed (traceback above); stopping", file=sys.stderr, flush=True)
        os._exit(1)
    comm.close()
    return 0


def add_runtime_flags(parser) -> None:
    import argparse

    parser.add_argument("--threads", type=int, default=1, help="torch threads per device process (default 1)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds a device may stay silent before every other device stops (default 30)")
    parser.add_argument("--startup-timeout", type=float, default=300.0,
                        help="seconds to wait for every rank to join and load the model (default 300)")
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                        help="attend to the own positions while the means are in flight (default on)")
    parser.add_argument("--count-flops", action="store_true", help="count FLOPs per device (slower)")
    parser.add_argument("--device", default="cpu", help="where this process's model runs: cpu, cuda, cuda:N")


def add_request_flags(parser) -> None:
    from .runtime.protocol import OUTPUT_MODES

    parser.add_argument("--text", action="append", help="input text (repeatable); default: built-in texts")
    parser.add_argument("--text-file", help="file with one input text per line (lines starting with # skipped)")
    parser.add_argument("--image", nargs="+", help="image file(s) for ViT models")
    parser.add_argument("--max-length", type=int, default=512, help="truncate inputs to this many tokens")
    parser.add_argument("--outputs", choices=OUTPUT_MODES,
                        help="what comes back to rank 0 (default: mean for encoders, last for LMs, pooled for "
                             "classifiers)")
    parser.add_argument("--repeat", type=int, default=1, help="run the request this many times (median wall time)")
    parser.add_argument("--show", type=int, default=6, help="result lines to print")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--serve", metavar="HOST:PORT", help="serve JSON over HTTP instead of running one request")
