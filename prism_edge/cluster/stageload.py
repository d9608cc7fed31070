"""What a device process loads: with pipeline stages, only its stage's weights, from its own copy or from rank 0.

Rank 0 and every worker derive the same stage layout from the config and the model's sizes (a skeleton: the
model's config, no weights), so each knows the layers it holds.  A worker started with `--fetch-weights` needs
no copy of the model: rank 0 reads that worker's tensors from its checkpoint and sends them over the cluster
link (cluster/weights.py: hashed, verified, cached in the worker's --cache-dir, so its next start sends nothing).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import AnyConfig, resolve
from ..models import adapter_for
from ..models.loading import Loaded, load_holding, load_model
from ..models.parts import Holding, hf_config_dict, materialize, skeleton, state_for
from ..partition.stages import StageLayout
from ..runtime.stages import layout_for
from . import env
from .spec import LaunchSpec
from .transport import DistCommunicator, all_gather_floats
from .weights import fetch, offer

NOTHING = Holding(0, 0, False, False)  # a skeleton: the model's structure and sizes, no weights read


def staged(cfg: AnyConfig) -> bool:
    return cfg.stages > 1 or cfg.memory_budget is not None


def layout_of(name: str, cache_dir: str | None, cfg: AnyConfig) -> StageLayout:
    """The stage layout `cfg` gives model `name`, from its skeleton (nothing but its config is read)."""
    adapter = adapter_for(load_holding(name, cache_dir, NOTHING, processor=False).model)
    return layout_for(resolve(cfg, adapter.kind, name="config"), adapter)


def holding_of(layout: StageLayout, rank: int) -> Holding:
    first, last, embed, head = layout.holds(rank)
    return Holding(first, last, embed, head)


def load_for_rank(name: str, cache_dir: str | None, cfg: AnyConfig, rank: int) -> Loaded:
    """Device `rank`'s model: the whole model with one stage, else only its stage's tensors (the rest on meta).
    Only rank 0 reads the tokenizer (or image processor): the workers receive token ids."""
    if not staged(cfg):
        return load_model(name, cache_dir=cache_dir, processor=rank == 0)
    return load_holding(name, cache_dir, holding_of(layout_of(name, cache_dir, cfg), rank), processor=rank == 0)


def to_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model on `device` (a stage's model keeps the layers it does not hold on meta: moved only off the CPU)."""
    return model if torch.device(device).type == "cpu" else model.to(device)


def serve_weights(group: dist.ProcessGroup, spec: LaunchSpec, layout: StageLayout, world: int,
                  log: Callable[[str], None]) -> None:
    """Rank 0, at start-up: learn which workers take their weights from here, and send each its stage's tensors
    (nothing to a worker whose cache already holds them).  layout: the group's stages (one: the whole model)."""
    wanted = all_gather_floats(group, world, 0.0, spec.startup_timeout)
    takers = [r for r in range(1, world) if wanted[r] > 0]
    if not takers:
        return
    comm = DistCommunicator(group, 0, world, spec.startup_timeout)
    for r in takers:
        t0 = time.perf_counter()
        holding = holding_of(layout, r)  # with one stage: the whole model
        loaded = (load_holding(spec.model, spec.cache_dir, holding, processor=False) if layout.staged
                  else load_model(spec.model, cache_dir=spec.cache_dir, processor=False))
        sent = offer(comm, r, json.dumps(hf_config_dict(loaded.model)), state_for(loaded.model, holding),
                     timeout=spec.startup_timeout)
        log(f"weights for rank {r}: {sent / 1e6:.1f} MB sent in {time.perf_counter() - t0:.1f} s"
            + (" (it had them cached)" if sent == 0 else ""))


def take_weights(group: dist.ProcessGroup, spec: LaunchSpec, rank: int, world: int, fetching: bool) -> Loaded | None:
    """A worker, at start-up: say whether it takes its weights from rank 0; if so, take them (or find them in its
    cache) and build its model from them.  None: it loads its own copy."""
    wanted = all_gather_floats(group, world, 1.0 if fetching else 0.0, spec.startup_timeout)
    if not wanted[rank]:
        return None
    comm = DistCommunicator(group, rank, world, spec.startup_timeout)
    got = fetch(comm, 0, Path(spec.cache_dir or env.cache_dir()), timeout=spec.startup_timeout)
    from transformers import AutoConfig

    doc = json.loads(got.config_json)
    model = skeleton(AutoConfig.for_model(**doc))
    materialize(model, got.tensors)
    return Loaded(model.eval(), None, spec.model)


__all__ = ["to_device", "holding_of", "layout_of", "load_for_rank", "serve_weights", "staged", "take_weights"]
