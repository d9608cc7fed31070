"""`prism-edge eval`: a task across a grid of device counts, compression rates and fidelity options.

Every grid starts with the unpartitioned model (the reference row, plain Hugging Face forward) and,
per device count, Voltage (exact; its bytes are what PRISM is compared against).  Results go to
CSV, JSON and a Markdown table, with metric-vs-CR and metric-vs-bytes plots (PNG).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import PrismConfig
from .tasks import TASKS, Task

# Fidelity options compared in the ablation; "defaults" is whatever PrismConfig ships.
VARIANTS: dict[str, dict] = {
    "plain": dict(sinks=False, halo=0, count_bias=False),
    "plain+bias": dict(sinks=False, halo=0, count_bias=True),
    "sinks": dict(sinks=True, halo=0, count_bias=False),
    "sinks+halo8": dict(sinks=True, halo=8, count_bias=False),
    "sinks+halo32": dict(sinks=True, halo=32, count_bias=False),
    "sinks+halo8+bias": dict(sinks=True, halo=8, count_bias=True),
    "sinks+halo32+bias": dict(sinks=True, halo=32, count_bias=True),
    "sinks+halo64": dict(sinks=True, halo=64, count_bias=False),
    "sinks+halo128": dict(sinks=True, halo=128, count_bias=False),
    "defaults": {},
}


def variant_config(variant: str, devices: int, cr: int, **extra) -> PrismConfig:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return PrismConfig(devices=devices, cr=cr, **{**VARIANTS[variant], **extra})


def finetuned_variant(folder: str | Path) -> tuple[str, str]:
    """(variant, row-label suffix) of a `prism-edge finetune` checkpoint: the fidelity options its
    training record names ("defaults" without a record), and whether it was trained through PRISM."""
    from ..train import RECORD

    record = Path(folder) / RECORD
    trained = json.loads(record.read_text())["prism"] if record.exists() else {}
    variant = next((v for v, o in VARIANTS.items() if o and all(trained.get(k) == x for k, x in o.items())),
                   "defaults")
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
    """CSV, JSON, Markdown and two PNG plots; returns the paths written."""
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
                                                     indent=1))
    paths.append(out_dir / f"{stem}.json")
    (out_dir / f"{stem}.md").write_text(markdown(rows, metric))
    paths.append(out_dir / f"{stem}.md")
    paths += plot(rows, metric, out_dir, stem, meta.get("title", stem))
    return paths


def plot(rows: list[Row], metric: str, out_dir: Path, stem: str, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prism = [r for r in rows if r.scheme == "prism" and metric in r.metrics]
    refs = [r for r in rows if r.scheme == "full" and metric in r.metrics]
    volts = [r for r in rows if r.scheme == "voltage" and metric in r.metrics]
    series: dict[tuple[str, str, int], list[Row]] = {}
    for r in prism:
        series.setdefault((r.model, r.variant, r.devices), []).append(r)
    p_min, p_max = min((k[2] for k in series), default=0), max((k[2] for k in series), default=0)
    one_model = len({k[0] for k in series}) == 1
    paths = []
    for kind in ("cr", "bytes"):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for (model, variant, p), rs in sorted(series.items()):
            rs = sorted(rs, key=lambda r: r.cr)
            xs = [r.cr if kind == "cr" else r.bytes_per_item for r in rs]
            ax.plot(xs, [r.metrics[metric] for r in rs], marker="o" if p == p_min else "s",
                    linestyle="-" if p == p_max else "--",
                    label=f"{variant} P={p}" + ("" if one_model else f" ({model})"))
        for r in refs:
            ax.axhline(r.metrics[metric], color="black", linestyle=":", linewidth=1,
                       label=f"unpartitioned ({r.model})")
        if kind == "bytes":
            for r in volts:
                ax.scatter([r.bytes_per_item], [r.metrics[metric]], marker="*", s=120, color="black", zorder=5)
                ax.annotate(f"Voltage P={r.devices}", (r.bytes_per_item, r.metrics[metric]), fontsize=7,
                            xytext=(4, -10), textcoords="offset points")
        ax.set_xscale("log", base=2 if kind == "cr" else 10)
        ax.set_xlabel("compression rate (CR)" if kind == "cr" else "bytes exchanged per item (log)")
        ax.set_ylabel(metric)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6.5, ncol=2)
        fig.tight_layout()
        path = out_dir / f"{stem}-vs-{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def make_task(name: str, loaded, limit: int | None = None, **options) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name](loaded, limit=limit, **{k: v for k, v in options.items() if v is not None})
