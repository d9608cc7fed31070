"""Fitting the cost model's constants (planning.cost.Constants) to `prism-edge bench plan` results.

    python -m prism_edge.bench.planfit docs/results/plan/plan-minilm.json docs/results/plan/plan-random-bert-base.json \\
        --check docs/results/plan/plan-smollm2.json

The probes measure each device's speed and intercept and each link's latency and rate; what they cannot see (the
work of building and merging messages, the latencies gloo pays per exchange and per request) is one constant each.
The prediction is linear in them: for every measured candidate the model is evaluated with all constants at 0 and
with each at 1 alone (the same plans, the same probed profile), and the constants minimise the squared relative
error by least squares (none below 0).  `--check` files are held out: their error is reported, not fitted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cluster.env import cache_dir
from ..config import PrismConfig
from ..models import adapter_for
from ..models.loading import load_model
from ..partition.stages import StageLayout
from ..planning import Candidate, Constants, ModelCost, Planner, Profile, estimate, speed_weights
from .stages import prompt

ZERO = Constants(**{f.name: 0.0 for f in dataclasses.fields(Constants)})


def features(path: Path) -> list[dict[str, Any]]:
    """One entry per measured candidate of a bench result: measured s, and the model at 0 and at each unit."""
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if "wall_s" in r and r["plan"] != "auto"]
    if not rows:
        return []
    loaded = load_model(rows[0]["model"], cache_dir=cache_dir())
    adapter = adapter_for(loaded.model)
    cost = ModelCost.of(adapter)
    out = []
    for link, info in data["profiles"].items():
        profile = Profile.from_dict(info["profile"])
        cfg = PrismConfig(devices=profile.world).resolve(adapter.kind)
        cfg = cfg.replace(weights=speed_weights(profile))
        planner = Planner(cfg, cost, profile, StageLayout.single(profile.world, adapter.geometry.layers))
        for r in (r for r in rows if r["link"] == link):
            ids, _ = prompt(loaded.tokenizer, adapter.vocab_size(), r["positions"])
            batch = adapter.prepare(input_ids=ids, attention_mask=torch.ones_like(ids))
            cand = Candidate(r["devices"], "full" if r["devices"] == 1 else cfg.scheme)
            run, layout = planner.config_for(cand), planner.layout_for(cand)
            base = estimate(batch, run, cost, profile, layout, r["outputs"], constants=ZERO).seconds
            units = [estimate(batch, run, cost, profile, layout, r["outputs"],
                              constants=dataclasses.replace(ZERO, **{f.name: 1.0})).seconds - base
                     for f in dataclasses.fields(Constants)]
            out.append({"model": r["model"], "link": link, "positions": r["positions"], "plan": r["plan"],
                        "measured": r["wall_s"], "base": base, "units": units})
    return out


def fit(entries: list[dict[str, Any]]) -> Constants:
    """Non-negative least squares on the relative error (a few rounds of clipping)."""
    names = [f.name for f in dataclasses.fields(Constants)]
    a = np.array([[u / e["measured"] for u in e["units"]] for e in entries])
    b = np.array([(e["measured"] - e["base"]) / e["measured"] for e in entries])
    free = list(range(len(names)))
    coef = np.zeros(len(names))
    for _ in range(len(names)):
        sol, *_ = np.linalg.lstsq(a[:, free], b, rcond=None)
        coef[:] = 0
        coef[free] = sol
        if (sol >= 0).all():
            break
        free = [i for i, v in zip(free, sol) if v > 0]
    return Constants(**{n: round(float(v), 3) for n, v in zip(names, coef)})


def errors(entries: list[dict[str, Any]], k: Constants) -> list[float]:
    c = np.array([getattr(k, f.name) for f in dataclasses.fields(Constants)])
    return [abs(e["base"] + float(np.dot(c, e["units"])) - e["measured"]) / e["measured"] for e in entries]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="bench plan JSON files to fit on")
    p.add_argument("--check", nargs="*", type=Path, default=[], help="held-out bench plan JSON files")
    args = p.parse_args(argv)
    fitted = [e for path in args.results for e in features(path)]
    held = [e for path in args.check for e in features(path)]
    k = fit(fitted)
    report = {"constants": dataclasses.asdict(k), "fitted_on": [str(x) for x in args.results],
              "held_out": [str(x) for x in args.check],
              "median_error_fitted": statistics.median(errors(fitted, k)),
              "median_error_held_out": statistics.median(errors(held, k)) if held else None}
    for name, es in (("fitted", fitted), ("held out", held)):
        for link in dict.fromkeys(e["link"] for e in es):
            mine = [e for e in es if e["link"] == link]
            report[f"median_error {name} {link}"] = statistics.median(errors(mine, k))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
