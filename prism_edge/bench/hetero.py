"""`prism-edge bench hetero`: two devices, one of them at half speed, on loopback.

Three set-ups serve the same request (the built-in texts), interleaved over rounds, each a fresh cluster:

  two equal devices                 both at full speed, equal slices (the reference)
  one at half speed, equal slices   rank 1 sleeps as long as it computed after every layer
  one at half speed, --weights auto the start-up probe sets the slices from the measured speeds

Half speed is the testing slowdown (PRISM_EDGE_SLOW=1:1 in rank 1's environment), so the set-ups
differ only in rank 1's speed and the slices.  With speeds 1 and 1/2 the best any split can do is 4/3
of two equal devices' latency (the pair has 3/4 of their capacity): the table shows both ratios.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import PrismConfig
from ..models.loading import load_model
from ..cluster import env
from ..cluster import Cluster
from ..eval.requests import builtin_request
from .options import HeteroOptions


@dataclass(frozen=True)
class Setup:
    name: str
    slowdown: float  # rank 1's
    auto: bool


SETUPS = (Setup("two equal devices", 0.0, False), Setup("one at half speed, equal slices", 1.0, False),
          Setup("one at half speed, --weights auto", 1.0, True))


def measure(model: str, cfg: PrismConfig, setup: Setup, inputs: dict[str, torch.Tensor], repeats: int,
            cache: Path | None) -> dict[str, Any]:
    """A fresh 2-device cluster in this set-up: the request `repeats` times after a warm-up."""
    worker_env = {env.SLOW_ENV: f"1:{setup.slowdown:g}"} if setup.slowdown else None
    with Cluster(model, cfg, cache_dir=str(cache) if cache else None, auto_weights=setup.auto,
                 worker_env=worker_env) as cluster:
        cluster(**inputs, outputs="mean", budget=None, plan=None, fidelity=None)  # warm-up (the config's budget)
        stats = [cluster(**inputs, outputs="mean", budget=None, plan=None, fidelity=None).stats
                 for _ in range(repeats)]
        weights = cluster.cfg.weights
        probe = cluster.agreement.probe_s
    walls = [s.wall_s for s in stats if s is not None and s.wall_s is not None]
    compute = [[sum(layer[p] for layer in s.compute_s) for p in range(2)] for s in stats if s and s.compute_s]
    return {"walls": walls, "weights": list(weights) if weights else None,
            "probe_ms": [t * 1e3 for t in probe] if probe else None,
            "compute_s": [statistics.median(c[p] for c in compute) for p in range(2)]}


def run(model: str, cr: int, repeats: int, rounds: int, length: int, cache: Path | None) -> list[dict[str, Any]]:
    torch.set_num_threads(1)  # this process is device 0
    loaded = load_model(model, cache_dir=cache)
    inputs = builtin_request(loaded, length)
    cfg = PrismConfig(devices=2, cr=cr)
    results: dict[str, list[dict[str, Any]]] = {s.name: [] for s in SETUPS}
    for _ in tqdm(range(rounds), desc="rounds of the three set-ups"):
        for setup in SETUPS:  # interleaved: drifts in machine load hit all alike
            results[setup.name].append(measure(model, cfg, setup, inputs, repeats, cache))
    rows = []
    for setup in SETUPS:
        runs = results[setup.name]
        rows.append({"setup": setup.name, "slowdown": setup.slowdown, "auto": setup.auto,
                     "latency_s": statistics.median(w for r in runs for w in r["walls"]),
                     "weights": runs[-1]["weights"], "probe_ms": runs[-1]["probe_ms"],
                     "compute_s": [statistics.median(r["compute_s"][p] for r in runs) for p in range(2)]})
    return rows


def table(rows: list[dict[str, Any]], title: str) -> str:
    base = rows[0]["latency_s"]
    lines = [title, "", "| set-up | weights | latency (ms) | ÷ two equal devices | ÷ best possible (4/3 of equal) "
             "| compute per request, rank 0 / rank 1 (ms) |", "|---|---|---|---|---|---|"]
    for r in rows:
        weights = " / ".join(f"{w:g}" for w in r["weights"]) if r["weights"] else "equal"
        compute = " / ".join(f"{c * 1e3:.0f}" for c in r["compute_s"])
        lines.append(f"| {r['setup']} | {weights} | {r['latency_s'] * 1e3:.1f} | {r['latency_s'] / base:.2f} | "
                     f"{r['latency_s'] / (base * 4 / 3):.2f} | {compute} |")
    return "\n".join(lines)


def main(options: HeteroOptions, cache: Path | None = None) -> str:
    """`prism-edge bench hetero`: the three set-ups over interleaved rounds; writes JSON and Markdown."""
    model, cr, repeats, length, rounds, out = (options.model, options.cr, options.repeats, options.length,
                                               options.rounds, options.out)
    rows = run(model, cr, repeats, rounds, length, cache)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hetero.json").write_text(json.dumps(rows, indent=1))
    text = table(rows, f"### {model}, P=2 on loopback, CR={cr}, built-in texts (≤ {length} tokens), median of "
                       f"{rounds} rounds x {repeats} requests") + "\n"
    (out / "hetero.md").write_text(text)
    return text
