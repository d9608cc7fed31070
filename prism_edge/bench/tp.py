"""Tensor parallelism as users run it: PyTorch's own `torch.distributed.tensor.parallel` over gloo.

One process per device (started by torchrun, or by the bench inside emulated-link namespaces) runs
the same HF model with its attention projections column-/row-sharded (Megatron style: Q, K, V and
the MLP's first linear(s) column-wise, the output projections row-wise, so each block costs two
all-reduces of the full (B, N, d) activations).  Rank 0 broadcasts the token ids (counted as input
bytes), every rank ends with the full output.  Prints one JSON line on rank 0.

Bytes: every c10d collective the DTensor layers issue is recorded with its tensor size; gloo's
all-reduce is a ring here, so a device sends 2 (P-1)/P of each all-reduced tensor (cross-checked
against the interface counters in emulated-link mode).  FLOPs: torch.utils.flop_counter sees the
sharded linears at their global shape, so those are counted by hooks and divided by P.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module
from torch.utils._python_dispatch import TorchDispatchMode

from ..models import adapter_for
from ..models.loading import Loaded, load_model
from ..runtime.stats import flop_counter, peak_rss_kib
from ..cluster import env
from ..eval.requests import builtin_request, hf_config

# family -> (per-layer column-wise linears, per-layer row-wise linears), names inside one block
TP_PLANS = {
    "bert": (("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"),
             ("attention.output.dense", "output.dense")),
    "llama": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
              ("self_attn.o_proj", "mlp.down_proj")),
    "vit": (("attention.q_proj", "attention.k_proj", "attention.v_proj", "mlp.fc1"),
            ("attention.o_proj", "mlp.fc2")),
}


class CollectiveBytes(TorchDispatchMode):
    """Records the size of every functional collective issued under it."""

    def __init__(self) -> None:
        super().__init__()
        self.all_reduce: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "_c10d_functional" and func.__name__.startswith("all_reduce"):
            self.all_reduce.append(args[0].numel() * args[0].element_size())
        return func(*args, **(kwargs or {}))


def tp_plan(model: nn.Module, family: str) -> dict[str, ParallelStyle]:
    """The parallelize_module plan for `model`, or a ValueError naming why the family cannot run."""
    if family not in TP_PLANS:
        raise ValueError(f"{family} cannot run under torch tensor parallelism here: its attention uses a fused "
                         "Conv1D (GPT-2's c_attn), which ColwiseParallel/RowwiseParallel do not support")
    adapter = adapter_for(model)
    col, row = TP_PLANS[family]
    layers = adapter.layers()
    prefix = {id(m): n for n, m in model.named_modules()}[id(layers)]
    plan: dict[str, ParallelStyle] = {}
    for i in range(len(layers)):
        plan.update({f"{prefix}.{i}.{name}": ColwiseParallel() for name in col})
        plan.update({f"{prefix}.{i}.{name}": RowwiseParallel() for name in row})
    return plan


def check_divisible(model: nn.Module, devices: int) -> None:
    cfg: Any = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if heads % devices or kv % devices:
        raise ValueError(f"tensor parallelism needs the head counts ({heads} query, {kv} key/value) divisible by "
                         f"P={devices}")


def _timed(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, rank: int, repeat: int
           ) -> tuple[list[float], list[float]]:
    """Wall and thread-CPU seconds of `repeat` + 1 requests (the first warms up); rank 0 broadcasts each."""
    walls, cpus = [], []
    for _ in range(repeat + 1):
        dist.barrier()
        t, c = time.perf_counter(), time.thread_time()
        buf = torch.stack([ids, mask]) if rank == 0 else torch.empty(2, *ids.shape, dtype=ids.dtype)  # (2, B, N)
        dist.broadcast(buf, 0)  # the request enters at rank 0
        model(input_ids=buf[0], attention_mask=buf[1])
        walls.append(time.perf_counter() - t)
        cpus.append(time.thread_time() - c)
    return walls, cpus


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def measure(loaded: Loaded, plan: dict, world: int, rank: int, repeat: int, length: int) -> dict[str, Any]:
    """Shard the model, count one request's FLOPs and collectives, then time `repeat` requests."""
    model = loaded.model
    sharded: list[int] = []

    def count(module: nn.Module, inputs: tuple, output: Any) -> None:  # a sharded linear's global FLOPs, / P below
        sharded.append(2 * inputs[0].numel() // inputs[0].shape[-1] * module.in_features * module.out_features)

    hooks = [model.get_submodule(name).register_forward_hook(count) for name in plan]
    parallelize_module(model, init_device_mesh("cpu", (world,)), plan)
    # the very request `prism-edge worker` builds for the same flags (decoders read the texts as one document)
    enc = builtin_request(loaded, length)
    ids = enc["input_ids"]
    mask = enc.get("attention_mask", torch.ones_like(ids))
    with torch.inference_mode():
        counter, comms = flop_counter(), CollectiveBytes()
        with counter, comms:
            model(input_ids=ids, attention_mask=mask)
        counted, global_linear = counter.get_total_flops(), sum(sharded)
        for h in hooks:
            h.remove()
        walls, cpus = _timed(model, ids, mask, rank, repeat)
    return {
        "scheme": "tp", "devices": world, "family": hf_config(model).model_type, "requests": repeat,
        "wall_s": _max_over_ranks(statistics.median(walls[1:])), "cpu_s": statistics.median(cpus[1:]),
        "all_reduces": len(comms.all_reduce), "all_reduced_bytes": sum(comms.all_reduce),
        "exchange_sent_per_device": int(2 * (world - 1) / world * sum(comms.all_reduce)),  # a ring all-reduce
        "input_bytes_per_device": ids.numel() * ids.element_size() * 2,
        "flops_per_device": int(counted - global_linear + global_linear / world),
        "peak_rss_mib": _max_over_ranks(peak_rss_kib() / 1024),
    }


def main(argv: list[str] | None = None) -> int:
    """One rank (torchrun's environment says which); rank 0 prints one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m prism_edge.bench.tp")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--cache-dir", help="folder for converted weights (default: $PRISM_EDGE_CACHE)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loaded = load_model(args.model, cache_dir=args.cache_dir or env.cache_dir())
    try:
        check_divisible(loaded.model, world)
        plan = tp_plan(loaded.model, hf_config(loaded.model).model_type)
    except ValueError as err:
        row: dict[str, Any] = {"error": str(err)}
    else:
        row = measure(loaded, plan, world, rank, args.repeat, args.max_length)
    if rank == 0:
        print(json.dumps(row))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # leave at once, as the device processes do: torch's C++ runtime can abort in its static destructors after
    # a distributed run ("terminate called without an active exception"), turning success into exit -6
    os._exit(code)
