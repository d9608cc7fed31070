"""The plots `prism-edge eval` writes: the metric against CR per variant, and the accuracy-against-bytes
frontier (every variant and CR as a point at its bytes ÷ Voltage's, the Pareto front drawn per P)."""

from __future__ import annotations

from pathlib import Path

from .variants import budget_of


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_vs_cr(rows: list[dict], metric: str, path: Path, title: str) -> Path:
    plt = _pyplot()
    prism = [r for r in rows if r["scheme"] == "prism" and metric in r["metrics"]]
    series: dict[tuple[str, str, int], list[dict]] = {}
    for r in prism:
        series.setdefault((r["model"], r["variant"], r["devices"]), []).append(r)
    ps = [k[2] for k in series]
    one_model = len({k[0] for k in series}) == 1
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for (model, variant, p), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["cr"])
        ax.plot([r["cr"] for r in rs], [r["metrics"][metric] for r in rs], marker="o" if p == min(ps) else "s",
                linestyle="-" if p == max(ps) else "--", label=f"{variant} P={p}" + ("" if one_model else f" ({model})"))
    for r in (r for r in rows if r["scheme"] == "full" and metric in r["metrics"]):
        ax.axhline(r["metrics"][metric], color="black", linestyle=":", linewidth=1, label=f"unpartitioned ({r['model']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression rate (CR)")
    return _finish(fig, ax, metric, title, path, legend_cols=2)


def plot_frontier(rows: list[dict], metric: str, higher: bool, path: Path, title: str) -> Path:
    """Every PRISM row at (bytes ÷ Voltage, metric), one marker per P, the Pareto front joined per P and
    its points labelled; the unpartitioned model as a horizontal line."""
    plt = _pyplot()
    prism = [r for r in rows if r["scheme"] == "prism" and metric in r["metrics"] and r.get("voltage_bytes_per_item")]
    fig, ax = plt.subplots(figsize=(8.5, 5.4))
    markers = "osD^v"
    for i, p in enumerate(sorted({r["devices"] for r in prism})):
        mine = [r for r in prism if r["devices"] == p]
        ax.scatter([_ratio(r) for r in mine], [r["metrics"][metric] for r in mine], marker=markers[i % 5], s=18,
                   alpha=0.45, color=f"C{i}", label=f"every variant, P={p}")
        front = sorted(pareto(mine, metric, higher), key=_ratio)
        ax.plot([_ratio(r) for r in front], [r["metrics"][metric] for r in front], marker=markers[i % 5],
                color=f"C{i}", linewidth=1.3, label=f"frontier, P={p}")
        for r in front:
            ax.annotate(f"{r['variant']} CR{r['cr']}", (_ratio(r), r["metrics"][metric]), fontsize=5.5,
                        xytext=(3, 3), textcoords="offset points", rotation=20)
    for i, p in enumerate(sorted({r["devices"] for r in prism})):
        old = sorted(pareto([r for r in prism if r["devices"] == p and _old_style(r["variant"])], metric, higher),
                     key=_ratio)
        if old:
            ax.plot([_ratio(r) for r in old], [r["metrics"][metric] for r in old], color=f"C{i}", linestyle=":",
                    linewidth=1.2, label=f"plain means, sinks and fixed windows only (fp32), P={p}")
    for i, p in enumerate(sorted({r["devices"] for r in prism})):
        swept = sorted((r for r in prism if r["devices"] == p and budget_of(r["variant"]) is not None), key=_ratio)
        if swept:
            ax.plot([_ratio(r) for r in swept], [r["metrics"][metric] for r in swept], color=f"C{i}", linestyle="--",
                    marker="|", markersize=9, linewidth=1.1, label=f"byte budget sweep (the kind's defaults), P={p}")
            for r in swept:
                ax.annotate(f"b={budget_of(r['variant']):g}", (_ratio(r), r["metrics"][metric]), fontsize=6,
                            xytext=(0, -9), textcoords="offset points", ha="center")
    shipped = [r for r in prism if r["variant"] == "defaults"]
    if shipped:
        ax.scatter([_ratio(r) for r in shipped], [r["metrics"][metric] for r in shipped], marker="*", s=160,
                   color="gold", edgecolor="black", zorder=6, label="shipped defaults (the kind's budget)")
    for r in (r for r in rows if r["scheme"] == "full" and metric in r["metrics"]):
        ax.axhline(r["metrics"][metric], color="black", linestyle=":", linewidth=1, label="unpartitioned")
    ax.set_xscale("log")
    if not higher:
        ax.set_yscale("log")
    ax.set_xlabel("bytes exchanged ÷ Voltage's (log)")
    return _finish(fig, ax, metric, title, path, legend_cols=1)


def pareto(rows: list[dict], metric: str, higher: bool) -> list[dict]:
    """The rows no other row beats on both bytes and the metric (ties on bytes keep the better metric)."""
    sign = 1 if higher else -1
    ranked = sorted((r for r in rows if _ratio(r) is not None),
                    key=lambda r: (_ratio(r), -sign * r["metrics"][metric]))
    front, best = [], None
    for r in ranked:
        if best is None or sign * r["metrics"][metric] > sign * best:
            front.append(r)
            best = r["metrics"][metric]
    return front


def _old_style(variant: str) -> bool:
    """Variants made only of what existed before importance, grouping and int8: means, sinks, windows."""
    return all(t in ("plain", "sinks", "bias") or (t.startswith("w") and t[1:].isdigit()) for t in variant.split("+"))


def _ratio(r: dict) -> float:
    return r["bytes_per_item"] / r["voltage_bytes_per_item"]


def _finish(fig, ax, metric: str, title: str, path: Path, legend_cols: int) -> Path:
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6.5, ncol=legend_cols)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
