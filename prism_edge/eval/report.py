"""The ablation table of docs/RESULTS.md, from the JSON files `prism-edge eval` writes.

    python -m prism_edge.eval.report docs/results/eval/eval-lee.json docs/results/eval/eval-polarity.json

One table per file: a row per fidelity variant (fine-tuned models last), a column per (P, CR);
each cell is the headline metric with the bytes per item as a fraction of Voltage's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


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


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if not args:
        print(__doc__)
        return 2
    for path in args:
        print(ablation_table(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
