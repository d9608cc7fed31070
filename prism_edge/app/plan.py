"""`prism-edge plan`: start the devices, probe them and their links, and show what the planner would run.

  prism-edge plan --model smollm2 --devices 4                  the probes, then per length every candidate's
                                                               predicted time and the pick
  prism-edge plan --model minilm --devices 4 --measure         ... and each candidate run and timed as well
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from ..cluster import Cluster
from ..flags import config_from
from ..planning import Planner
from .launch import launch_spec, log
from .serve.native import default_mode


def _ids(cluster: Cluster, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(length)
    return torch.randint(3, max(4, min(cluster.adapter.vocab_size(), 30000)), (1, length), generator=g)


def _measure(cluster: Cluster, ids: torch.Tensor, mode: str, plan: Any, repeats: int) -> float:
    walls = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        cluster(input_ids=ids, attention_mask=torch.ones_like(ids), outputs=mode, plan=plan)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls[1:])


def rows_for(cluster: Cluster, planner: Planner, length: int, mode: str, measure: int) -> list[dict[str, Any]]:
    """Every candidate for one request of `length` positions: predicted (and measured) ms; the pick marked."""
    ids = _ids(cluster, length)
    batch = cluster.coordinator.batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    fidelity = cluster.coordinator.fidelity
    pick = planner.choose(batch, mode, fidelity).candidate
    rows = []
    for cand in planner.candidates(fidelity, length):
        if cand.devices > length:
            continue
        est = planner.weigh(batch, cand, mode)
        row = {"positions": length, "plan": cand.label, "pick": cand == pick, **est.to_dict()}
        if measure:
            row["measured_ms"] = round(_measure(cluster, ids, mode, cand, measure) * 1e3, 1)
        rows.append(row)
    return rows


def cmd_plan(args: argparse.Namespace) -> int:
    spec = launch_spec(args).replace(plan="auto")
    cfg = config_from(args, allow_auto=True)
    if any(n < 1 for n in args.lengths) or args.measure < 0:
        raise ValueError("--lengths must be positive position counts and --measure >= 0 (timed runs per candidate)")
    torch.set_num_threads(spec.threads)
    with Cluster(config=cfg, spec=spec, log=log) as cluster:
        planner, profile = cluster.planner, cluster.profile
        assert planner is not None and profile is not None  # plan auto
        mode = args.outputs or default_mode(cluster)
        limit = cluster.adapter.position_limit() or max(args.lengths)
        rows = [r for n in args.lengths if n <= limit for r in rows_for(cluster, planner, n, mode, args.measure)]
        if args.json:
            print(json.dumps({"profile": profile.to_dict(), "startup_s": cluster.startup_s, "outputs": mode,
                              "fidelity": spec.fidelity, "rows": rows}))
            return 0
        print(f"{cluster.world} device(s), {cluster.model_name}, up in {cluster.startup_s:.1f} s; probes took "
              f"{profile.probe_s:.2f} s")
        for line in profile.describe():
            print("  " + line)
        print(f"\nper request of N positions (outputs={mode}, fidelity {spec.fidelity}); * = the planner's pick")
        print(f"{'N':>6}  {'plan':<24} {'predicted ms':>12} {'compute':>9} {'exchange':>9} {'fixed':>7}"
              + (f" {'measured ms':>12}" if args.measure else ""))
        for r in rows:
            mark = "*" if r["pick"] else " "
            print(f"{r['positions']:>6} {mark}{r['plan']:<24} {r['seconds']:>12.1f} {r['compute_s']:>9.1f} "
                  f"{r['exchange_s']:>9.1f} {r['fixed_s']:>7.1f}" + (f" {r['measured_ms']:>12.1f}" if args.measure else ""))
        skipped = [n for n in args.lengths if n > limit]
        if skipped:
            print(f"(lengths {skipped} are beyond the model's {limit} positions: skipped)")
    return 0
