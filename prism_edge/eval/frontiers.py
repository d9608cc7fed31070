"""Build the shipped frontier tables (prism_edge/data/frontiers.json, read by prism_edge.frontiers) from
`prism-edge eval --budget` grids:

    python -m prism_edge.eval.frontiers docs/results/budgets/eval-*.json [--out prism_edge/data/frontiers.json]

Every `defaults+budgetB` row at P=4 and CR=16 becomes a point (kind, input length, budget, value, bytes ÷
Voltage's).  The value is the task's fidelity to the unpartitioned model: embedding cosine (encoders), the
relative perplexity increase (decoders: 0.01 = +1 %), agreement with the unpartitioned predictions
(vision).  Only held-out data counts (a grid on the dev split is refused).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..frontiers import PATH
from .variants import budget_of

KINDS = {"passages": "encoder", "perplexity": "decoder", "fashion": "vision"}
METRICS = {"encoder": ("cosine", True), "decoder": ("perplexity_increase", False), "vision": ("agreement", True)}
POSITIONS = {"fashion": 197}  # a ViT's positions: 196 patches and the class token


def grid_points(grid: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """(kind, points) of one eval grid's JSON."""
    task = grid["task"]
    if task not in KINDS:
        raise ValueError(f"{task} grids do not make a frontier table; use passages, perplexity or fashion")
    options = grid.get("options", {})
    if options.get("split", "heldout") != "heldout":
        raise ValueError(f"a {task} grid on the {options['split']} split: the shipped tables are held-out data only")
    kind = KINDS[task]
    metric, _ = METRICS[kind]
    length = options.get("length") or POSITIONS.get(task) or {"passages": 200, "perplexity": 512}[task]
    full = next(r for r in grid["rows"] if r["scheme"] == "full")
    out = []
    for r in grid["rows"]:
        budget = budget_of(r["variant"])
        if r["scheme"] != "prism" or not budget or r["devices"] != 4 or r["cr"] != 16:  # budget 0: fixed counts
            continue
        m = r["metrics"]
        value = m["perplexity"] / full["metrics"]["perplexity"] - 1 if kind == "decoder" else m[metric]
        out.append({"length": int(length), "source": options.get("source", task), "budget": budget,
                    "value": round(float(value), 6),
                    "bytes_vs_voltage": round(r["bytes_per_item"] / r["voltage_bytes_per_item"], 6)})
    return kind, out


def build(paths: list[Path]) -> dict[str, Any]:
    families: dict[str, dict[str, Any]] = {}
    for path in paths:
        grid = json.loads(path.read_text())
        kind, pts = grid_points(grid)
        metric, higher = METRICS[kind]
        fam = families.setdefault(kind, {"model": grid["model"], "metric": metric, "higher_is_better": higher,
                                         "data": [], "points": []})
        fam["data"].append(grid["data"])
        fam["points"] += pts
    for fam in families.values():
        fam["data"] = "; ".join(dict.fromkeys(fam["data"]))
        fam["points"].sort(key=lambda p: (p["length"], p["source"], p["budget"]))
    return {"about": "fidelity against a byte budget, P=4, CR=16, training-free, held-out data; built by "
                     "python -m prism_edge.eval.frontiers from prism-edge eval --budget grids (docs/RESULTS.md §2.10)",
            "families": families}


def plot(table: dict[str, Any], folder: Path) -> list[Path]:
    """One PNG per kind: fidelity against bytes ÷ Voltage's, a line per input length (and source), the kind's
    default budget marked on each length it applies to (from `budget_from`)."""
    from ..config import FAMILY_DEFAULTS
    from .plots import _finish, _pyplot

    plt = _pyplot()
    paths = []
    for kind, fam in table["families"].items():
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        default = FAMILY_DEFAULTS[kind]["budget"]
        cells = sorted({(p["length"], p["source"]) for p in fam["points"]})
        for i, (length, source) in enumerate(cells):
            pts = sorted((p for p in fam["points"] if (p["length"], p["source"]) == (length, source)),
                         key=lambda p: p["budget"])
            ax.plot([p["bytes_vs_voltage"] for p in pts], [p["value"] for p in pts], marker="o", color=f"C{i}",
                    label=f"{source}, {length} positions")
            chosen = [p for p in pts if p["budget"] == default and length >= FAMILY_DEFAULTS[kind]["budget_from"]]
            ax.scatter([p["bytes_vs_voltage"] for p in chosen], [p["value"] for p in chosen], marker="*", s=170,
                       color="gold", edgecolor="black", zorder=6)
        budgets = ", ".join(f"{b:g}" for b in sorted({p["budget"] for p in fam["points"]}))
        shown = f" {default:g}" if default else " (fixed counts: not on these lines)"
        ax.set_xlabel(f"bytes exchanged ÷ Voltage's (budgets {budgets}; star: the default{shown})")
        if not fam["higher_is_better"]:
            ax.axhline(0.01, color="grey", linestyle=":", linewidth=1, label="+1 %")
        title = f"{fam['model']}: {fam['metric']} against a byte budget, P=4, CR=16, held-out data"
        paths.append(_finish(fig, ax, fam["metric"], title, folder / f"budgets-{kind}.png", legend_cols=1))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prism_edge.eval.frontiers", description=__doc__.splitlines()[0])
    ap.add_argument("grids", nargs="+", type=Path, help="eval JSON files (prism-edge eval --budget ...)")
    ap.add_argument("--out", type=Path, default=PATH, help="where to write the table (default: the shipped one)")
    ap.add_argument("--plots", type=Path, help="also draw one PNG per kind into this folder")
    args = ap.parse_args(argv)
    table = build(args.grids)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    for path in plot(table, args.plots) if args.plots else []:
        print(f"wrote {path}")
    print(f"wrote {args.out}: " + ", ".join(f"{k} {len(v['points'])} points" for k, v in table["families"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
