"""The tables of docs/RESULTS.md, from the JSON files `prism-edge eval` writes.

    python -m prism_edge.eval.report docs/results/eval/eval-lee.json docs/results/eval/eval-polarity.json
    python -m prism_edge.eval.report --frontier news512.png eval-perplexity-news512-a.json eval-perplexity-news512-b.json
    python -m prism_edge.eval.report --frontier lee.png --metric cosine eval-lee.json

Per file: the ablation (a row per fidelity variant, fine-tuned models last, a column per (P, CR); each
cell the headline metric with the bytes per item as a fraction of Voltage's), then the best variant
under each byte budget (a fraction of Voltage's bytes) per device count.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def ablation_table(path: str | Path, metric: str | None = None) -> str:
    saved = json.loads(Path(path).read_text())
    metric = metric or saved["metric"]
    rows = saved["rows"]
    prism = [r for r in rows if r["scheme"] == "prism" and metric in r["metrics"]]
    cols = sorted({(r["devices"], r["cr"]) for r in prism})
    variants = list(dict.fromkeys((r["model"], r["variant"]) for r in prism))
    cell = {(r["model"], r["variant"], r["devices"], r["cr"]): r for r in prism}
    out = [f"{saved.get('title', path)}: {metric}; in brackets bytes per item ÷ Voltage's at the same P", ""]
    refs = [r for r in rows if r["scheme"] == "full" and metric in r["metrics"]]
    for r in refs:
        out.append(f"- unpartitioned {r['model']}: {metric} {r['metrics'][metric]:.4f} ({r['items']} items)")
    for r in (r for r in rows if r["scheme"] == "voltage" and metric in r["metrics"]):
        out.append(f"- Voltage P={r['devices']}: {metric} {r['metrics'][metric]:.4f}, "
                   f"{r['bytes_per_item']:,.0f} B per item")
    out += ["", "| variant | " + " | ".join(f"P={p} CR={cr}" for p, cr in cols) + " |",
            "|---|" + "---|" * len(cols)]
    for model, variant in variants:
        label = variant if len({m for m, _ in variants}) == 1 else f"{variant} ({model})"
        cells = []
        for p, cr in cols:
            r = cell.get((model, variant, p, cr))
            if r is None:
                cells.append("")
                continue
            ratio = r["bytes_per_item"] / r["voltage_bytes_per_item"] if r.get("voltage_bytes_per_item") else None
            cells.append(f"{r['metrics'][metric]:.4f}" + (f" ({ratio:.3f})" if ratio is not None else ""))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


BUDGETS = (0.03, 0.06, 0.12, 0.25)


def _ratio(r: dict) -> float | None:
    return r["bytes_per_item"] / r["voltage_bytes_per_item"] if r.get("voltage_bytes_per_item") else None


def budget_table(rows: list[dict], metric: str, higher: bool, budgets=BUDGETS) -> str:
    """Markdown: per device count, the best PRISM variant whose bytes stay within each budget."""
    prism = [r for r in rows if r["scheme"] == "prism" and metric in r["metrics"] and _ratio(r) is not None]
    if not prism:
        return ""
    sign = 1 if higher else -1
    out = [f"best {metric} within a byte budget (bytes ÷ Voltage's at the same P):", "",
           "| P | " + " | ".join(f"≤ {b:g}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for p in sorted({r["devices"] for r in prism}):
        cells = []
        for b in budgets:
            fits = [r for r in prism if r["devices"] == p and _ratio(r) <= b]
            if not fits:
                cells.append("none fits")
                continue
            r = max(fits, key=lambda r: sign * r["metrics"][metric])
            cells.append(f"{r['metrics'][metric]:.4f}: {r['variant']} CR{r['cr']} ({_ratio(r):.3f})")
        out.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def merged(paths: Sequence[str | Path]) -> tuple[list[dict], dict]:
    """Rows of several grids of one task (the reference and each Voltage row once) and the first's meta."""
    rows: list[dict] = []
    seen: set[tuple] = set()
    meta: dict[str, Any] = {}
    for path in paths:
        saved = json.loads(Path(path).read_text())
        meta = meta or saved
        for r in saved["rows"]:
            key = (r["scheme"], r["model"], r["variant"], r["devices"], r["cr"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    return rows, meta


def main(argv: list[str] | None = None) -> int:
    """Tables per file; with --frontier PNG, one frontier plot and budget table over all files together."""
    args = argv if argv is not None else sys.argv[1:]
    if not args:
        print(__doc__)
        return 2
    if args[0] == "--frontier":  # --frontier PNG [--metric NAME] FILE...
        from .plots import plot_frontier

        png, files = Path(args[1]), args[2:]
        metric = None
        if files[:1] == ["--metric"]:
            metric, files = files[1], files[2:]
        rows, meta = merged(files)
        metric = metric or meta["metric"]
        higher = meta.get("higher_is_better", True) if metric == meta["metric"] else metric != "kl"
        plot_frontier(rows, metric, higher, png, meta.get("title", png.stem))
        print(budget_table(rows, metric, higher))
        return 0
    for path in args:
        saved = json.loads(Path(path).read_text())
        print(ablation_table(path))
        print(budget_table(saved["rows"], saved["metric"], saved.get("higher_is_better", True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
