"""`prism-edge eval`: a task across a grid of device counts, compression rates and fidelity options.

Every grid starts with the unpartitioned model (the reference row, plain Hugging Face forward) and,
per device count, Voltage (exact; its bytes are what PRISM is compared against).  Results go to
CSV, JSON and a Markdown table, with metric-vs-CR and metric-vs-bytes plots (PNG).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import PrismConfig
from .plots import plot_frontier, plot_vs_cr
from .report import budget_table
from .tasks import TASKS, Task
from .variants import VARIANTS, variant_config, variant_options

def finetuned_variant(folder: str | Path) -> tuple[str | None, str]:
    """(variant, row-label suffix) of a `prism-edge finetune` checkpoint: the fidelity options its
    training record names ("defaults" without a record; None when it was trained over random splits,
    so it is scored at every variant of the grid), and whether it was trained through PRISM."""
    from ..train import RECORD

    record = Path(folder) / RECORD
    saved = json.loads(record.read_text()) if record.exists() else {}
    if "splits" in saved:  # trained over random splits: made for any variant
        return None, "+finetune(splits)"
    trained = saved.get("prism", {})
    if "halo" in trained:  # records written before the window replaced the neighbour halo
        trained.setdefault("window", trained.pop("halo"))
    matches = (v for v in VARIANTS if v != "defaults"
               and all(trained.get(k, x) == x for k, x in variant_options(v).items()))
    variant = next(matches, "defaults")
    return variant, "+finetune" if trained.get("scheme", "prism") == "prism" else "+finetune(unpartitioned)"


@dataclass
class Row:
    task: str
    model: str
    scheme: str  # full | voltage | prism
    variant: str
    devices: int
    cr: int
    metrics: dict[str, float]
    bytes_per_item: float
    voltage_bytes_per_item: float | None
    items: int
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def bytes_vs_voltage(self) -> float | None:
        if not self.voltage_bytes_per_item:
            return None
        return self.bytes_per_item / self.voltage_bytes_per_item


def grid(task: Task, model_label: str, devices: list[int], crs: list[int], variants: list[str],
         voltage: bool = True, progress: bool = True, label_suffix: str = "") -> list[Row]:
    """Score `task` unpartitioned, under Voltage per P, and under PRISM for every (P, CR, variant)."""
    from tqdm import tqdm

    jobs: list[tuple[str, str, int, int, PrismConfig | None]] = [("full", "reference", 1, 1, None)]
    for p in devices:
        if voltage:
            jobs.append(("voltage", "exact", p, 1, PrismConfig(devices=p, scheme="voltage")))
        jobs += [("prism", v, p, cr, variant_config(v, p, cr)) for cr in crs for v in variants]
    rows: list[Row] = []
    volt: dict[int, float] = {}
    bar = tqdm(jobs, desc=f"eval {task.name}", disable=not progress, dynamic_ncols=True)
    for scheme, variant, p, cr, cfg in bar:
        bar.set_postfix_str(f"{scheme} {variant} P={p} CR={cr}")
        t0 = time.perf_counter()
        score = task.evaluate(cfg)
        if scheme == "voltage":
            volt[p] = score.bytes_per_item
        rows.append(Row(task.name, model_label, scheme, variant + label_suffix if scheme == "prism" else variant,
                        p, cr, score.metrics, score.bytes_per_item, volt.get(p), score.items,
                        time.perf_counter() - t0))
    return rows


def markdown(rows: list[Row], metric: str) -> str:
    names = list(dict.fromkeys(k for r in rows for k in r.metrics))
    names = [metric] + [n for n in names if n != metric]
    head = ["model", "scheme", "variant", "P", "CR", *names, "bytes/item", "÷ Voltage"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [f"{r.metrics[n]:.4f}" if n in r.metrics else "" for n in names]
        ratio = r.bytes_vs_voltage
        out.append("| " + " | ".join([r.model, r.scheme, r.variant, str(r.devices), str(r.cr), *vals,
                                      f"{r.bytes_per_item:,.0f}", "" if ratio is None else f"{ratio:.4f}"]) + " |")
    return "\n".join(out) + "\n"


def write(rows: list[Row], metric: str, out_dir: Path, stem: str, meta: dict) -> list[Path]:
    """CSV, JSON, Markdown (the grid and the best variant per byte budget) and two PNG plots (metric vs CR,
    and the frontier: metric vs bytes ÷ Voltage's); returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    names = list(dict.fromkeys(k for r in rows for k in r.metrics))
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "model", "scheme", "variant", "devices", "cr", *names, "bytes_per_item",
                    "voltage_bytes_per_item", "bytes_vs_voltage", "items", "seconds"])
        for r in rows:
            w.writerow([r.task, r.model, r.scheme, r.variant, r.devices, r.cr, *[r.metrics.get(n, "") for n in names],
                        f"{r.bytes_per_item:.1f}", "" if r.voltage_bytes_per_item is None else
                        f"{r.voltage_bytes_per_item:.1f}", "" if r.bytes_vs_voltage is None else
                        f"{r.bytes_vs_voltage:.5f}", r.items, f"{r.seconds:.2f}"])
    paths.append(out_dir / f"{stem}.csv")
    (out_dir / f"{stem}.json").write_text(json.dumps({**meta, "metric": metric, "rows": [asdict(r) for r in rows]},
                                                     indent=1))  # report.py reads these back
    paths.append(out_dir / f"{stem}.json")
    dicts = [asdict(r) for r in rows]
    higher = meta.get("higher_is_better", True)
    (out_dir / f"{stem}.md").write_text(markdown(rows, metric) + "\n" + budget_table(dicts, metric, higher))
    paths.append(out_dir / f"{stem}.md")
    title = meta.get("title", stem)
    paths.append(plot_vs_cr(dicts, metric, out_dir / f"{stem}-vs-cr.png", title))
    paths.append(plot_frontier(dicts, metric, higher, out_dir / f"{stem}-frontier.png", title))
    return paths


def check_options(name: str, options: Mapping[str, Any], flags: Mapping[str, str] | None = None) -> None:
    """Refuse (ValueError) the options task `name` does not read: an option it would ignore is a mistake, not a
    no-op.  An option at None was not given.  flags: how to spell each option (the command line's flag names)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    spell = dict(flags or {})
    takes = TASKS[name].takes
    extra = [k for k, v in options.items() if v is not None and k not in takes]
    if not extra:
        return
    where = [f"{spell.get(k, k)} (an option of {', '.join(t for t, c in TASKS.items() if k in c.takes) or 'no task'})"
             for k in extra]
    own = [spell.get(k, k) for k in takes if flags is None or k in spell]
    raise ValueError(f"task {name} does not take {', '.join(where)}; drop {'it' if len(extra) == 1 else 'them'} "
                     f"({name} takes {', '.join(own) if own else 'none of these options'})")


def make_task(name: str, loaded, limit: int | None = None, **options) -> Task:
    check_options(name, options)
    return TASKS[name](loaded, limit=limit, **{k: v for k, v in options.items() if v is not None})
