"""`prism-edge bench stages`: pipeline stages of PRISM groups against one PRISM group and a plain pipeline.

With P device processes (4 by default layouts): 1x4 is one PRISM group of 4 (every device holds every
layer), 2x2 two stages of 2 devices (each stage a PRISM group holding half the layers, the hidden rows
handed across the boundary), 4x1 a plain pipeline, 1x1 one device (scheme full).  Every PRISM layout has
the same config (`PrismConfig(devices=P, cr=CR, stages=S)`).

Each layout runs as one group of device processes per link (one network namespace each with an emulated
link, see bench/links.py; loopback without root or for `--link loopback`): rank 0 is `python -m
prism_edge.bench.stages --rank0 ...` (a Cluster that joins the others), the others plain `prism-edge
worker` processes.  Rank 0 sends, per prompt length, exactly that many positions (held-out news tiled to
the length, or seeded random ids for a model without a tokenizer) `repeats` + 1 times (the first warms up),
and for a decoder generates --generate tokens after a --generate-prompt prompt (one warm-up generation).

Measured: median prefill latency, parameter bytes and peak RSS per device, bytes per request split into the
per-layer exchange (`total_bytes`) and the stage hand-offs (`stage_bytes`), tokens per second and the stage
hop bytes of the generation.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..runtime.stats import measured
from tqdm import tqdm

from ..cluster.spec import LaunchSpec
from ..config import PrismConfig
from .common import Placement, free_port, rank0_args, run_ranks
from .options import StagesOptions, parse_layout


def layout_config(layout: str, cr: int) -> PrismConfig:
    """1x1: one device (scheme full); SxD: S stages of D devices, each a PRISM group at `cr`."""
    stages, per = parse_layout(layout)
    if stages * per == 1:
        return PrismConfig(devices=1, scheme="full")
    return PrismConfig(devices=stages * per, cr=cr, stages=stages)


def prompt(tokenizer: Any, vocab: int, length: int) -> tuple[torch.Tensor, str]:
    """(1, length) ids, exactly `length` positions: held-out news (tiled when shorter), or seeded random ids."""
    if tokenizer is None or not callable(tokenizer):
        g = torch.Generator().manual_seed(length)
        return torch.randint(3, vocab, (1, length), generator=g), "random ids"
    from ..eval.tasks import heldout_prose

    ids = tokenizer("\n\n".join(heldout_prose("lee")), return_tensors="pt")["input_ids"]
    reps = -(-length // ids.shape[1])
    return ids.repeat(1, reps)[:, :length].contiguous(), "held-out news"


def _limit(model: Any) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 30)


def default_output(cluster: Any) -> str:
    """What `prism-edge launch` returns unless asked (app.serve.native.default_mode): decoders last, classifiers
    pooled, encoders mean."""
    if cluster.adapter.geometry.causal:
        return "last"
    return "pooled" if cluster.adapter.head == "classify" else "mean"


def length_prompts(cluster: Any, lengths: Any) -> Iterator[tuple[int, torch.Tensor | None, str]]:
    """(length, ids, source) per length; ids None and source the reason for a length beyond the model's limit."""
    vocab, limit = cluster.adapter.vocab_size(), _limit(cluster.model)
    for length in lengths:
        if length > limit:
            yield length, None, f"longer than the model takes ({limit})"
            continue
        ids, source = prompt(cluster.tokenizer, vocab, length)
        yield length, ids, source


def _prefill(cluster: Any, mode: str, ids: torch.Tensor, repeats: int) -> dict[str, Any]:
    walls, out = [], None
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        out = cluster(input_ids=ids, attention_mask=torch.ones_like(ids), outputs=mode, budget=None)
        walls.append(time.perf_counter() - t0)
    assert out is not None  # repeats + 1 >= 1 requests ran
    st = measured(out.stats).to_dict()
    return {"wall_s": statistics.median(walls[1:]), "walls_s": walls[1:], "positions": int(ids.shape[1]),
            "exchange_bytes": st["total_bytes"], "stage_bytes": st["stage_bytes"],
            "request_bytes": st["request_bytes"], "param_bytes": st["param_bytes"],
            "peak_rss_mib": st["peak_rss_mib"], "stage_sent": st["stage_sent"]}


def _generation(cluster: Any, ids: torch.Tensor, new: int, link: Any) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for i in range(2):  # a warm-up, then timed
        stamps: list[float] = []
        t0 = time.perf_counter()
        gen = cluster.generate(ids, max_new_tokens=new, decode="auto", link=link,
                               on_token=lambda _: stamps.append(time.perf_counter()))
        if i == 1:
            row = {"gen_prompt": int(ids.shape[1]), "gen_tokens": len(stamps), "ttft_s": stamps[0] - t0,
                   "tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None,
                   "gen_mode": gen.mode, "gen_stage_bytes": gen.stage_bytes,
                   "gen_stage_bytes_per_token": gen.stage_bytes / max(1, len(gen.new_ids)),
                   "gen_bytes_per_token": gen.decode_bytes_per_token}
    return row


def rank0(args: argparse.Namespace) -> None:
    """Rank 0 inside its namespace: join the group, run every length, generate, print one JSON line."""
    from ..cluster import Cluster
    from ..cluster.rendezvous import Endpoint
    from ..runtime.decode import Link

    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.config).items()}
    cfg = PrismConfig(**fields)
    spec = LaunchSpec(model=args.model, cache_dir=args.cache_dir, threads=1, timeout=300, startup_timeout=900)
    with Cluster(config=cfg, spec=spec, spawn=cfg.effective_devices == 1,
                 endpoint=Endpoint.parse(args.master, bind=args.bind)) as cluster:
        causal, mode = cluster.adapter.geometry.causal, default_output(cluster)
        vocab = cluster.adapter.vocab_size()
        rows = []
        for length, ids, source in length_prompts(cluster, args.lengths):
            if ids is None:
                rows.append({"positions": length, "error": source})
                continue
            rows.append({**_prefill(cluster, mode, ids, args.repeats), "prompt": source})
        gen = {}
        if causal and args.new > 0:
            gen = _generation(cluster, prompt(cluster.tokenizer, vocab, args.gen_length)[0], args.new,
                              Link(args.mbit, args.ms))
    print(json.dumps({"rows": rows, "generation": gen}))


def run_layout(place: Placement, options: StagesOptions, layout: str, link: Any, cache: Any) -> dict[str, Any]:
    """One group of device processes for one layout: rank 0's JSON."""
    cfg = layout_config(layout, options.cr)
    world = cfg.effective_devices
    master = f"{place.address(0)}:{free_port()}"
    spec = LaunchSpec(model=options.model, cache_dir=str(cache) if cache else None, threads=1, timeout=300,
                      startup_timeout=900)
    head = [sys.executable, "-m", "prism_edge.bench.stages", "--rank0", "--config", json.dumps(dataclasses.asdict(cfg)),
            "--master", master, "--bind", place.address(0), "--model", options.model,
            "--lengths", *map(str, options.lengths), "--repeats", str(options.repeats),
            "--new", str(options.generate), "--gen-length", str(options.generate_prompt),
            "--mbit", str(link.rate_mbit if link else 1e4), "--ms", str(link.delay_ms if link else 0.0)]
    head += ["--cache-dir", str(cache)] if cache else []
    commands = [head] + [spec.worker_command(cfg, r, world, master, place.address(r)) for r in range(1, world)]
    return json.loads(run_ranks(place, commands, timeout=3600))


def run(options: StagesOptions, cache: Any = None) -> list[dict]:
    """Every link, layout and length: one row each (the generation's numbers on each of a layout's rows)."""
    from .links import EmulatedNetwork, available, parse_link

    ok, why = available()
    devices = max(s * d for s, d in map(parse_layout, options.layouts))
    rows = []
    bar = tqdm(total=len(options.link) * len(options.layouts), desc="stages", dynamic_ncols=True)
    for name in options.link:
        emulate = ok and name != "loopback"
        net = EmulatedNetwork(devices, parse_link(name), allow_no_delay=True).open() if emulate else None
        note = name if net is not None or name == "loopback" else f"loopback ({why})"
        try:
            for layout in options.layouts:
                bar.set_postfix_str(f"{note} {layout}")
                report = run_layout(Placement(net), options, layout, net.link if net else None, cache)
                stages, per = parse_layout(layout)
                for r in report["rows"]:
                    rows.append({"model": options.model, "link": note, "layout": layout, "stages": stages,
                                 "devices": stages * per, **r, **report["generation"]})
                bar.update()
        finally:
            if net is not None:
                net.close()
    bar.close()
    _ratios(rows)
    return rows


def _ratios(rows: list[dict]) -> None:
    """Each row's latency against 1x4's on the same link and length."""
    base = {(r["link"], r["positions"]): r["wall_s"] for r in rows if r["layout"] == "1x4" and "wall_s" in r}
    for r in rows:
        b = base.get((r["link"], r["positions"]))
        if b and r.get("wall_s"):
            r["vs_1x4"] = r["wall_s"] / b


COLUMNS = ["model", "link", "layout", "stages", "devices", "positions", "prompt", "wall_s", "vs_1x4",
           "exchange_bytes", "stage_bytes", "request_bytes", "param_bytes", "peak_rss_mib", "gen_prompt",
           "gen_tokens", "ttft_s", "tok_s", "gen_mode", "gen_stage_bytes", "gen_stage_bytes_per_token",
           "gen_bytes_per_token", "walls_s", "error"]


def _mib(values: Any) -> str:
    return "n/a" if not values else f"{max(values) / 2 ** 20:.0f}" if max(values) > 1e4 else f"{max(values):.0f}"


def table(rows: list[dict], title: str) -> str:
    head = ["link", "layout", "positions", "prefill (ms)", "÷ 1x4", "exchange bytes", "stage bytes",
            "params / device (MiB, max)", "peak RSS (MiB, max)", "tokens/s", "stage hop bytes / token"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['link']} | {r['layout']} | {r['positions']} | not run: {r['error']} |"
                         + " |" * (len(head) - 4))
            continue
        tok = f"{r['tok_s']:.1f}" if r.get("tok_s") else "n/a"
        hop = f"{r['gen_stage_bytes_per_token']:,.0f}" if "gen_stage_bytes_per_token" in r else "n/a"
        lines.append(f"| {r['link']} | {r['layout']} | {r['positions']} | {r['wall_s'] * 1e3:,.0f} | "
                     f"{r.get('vs_1x4', float('nan')):.2f} | {r['exchange_bytes']:,} | {r['stage_bytes']:,} | "
                     f"{_mib(r['param_bytes'])} | {_mib(r['peak_rss_mib'])} | {tok} | {hop} |")
    return "\n".join(lines)


def key_ratios(rows: list[dict]) -> list[str]:
    """Per link and length: 2x2 against 4x1 and against twice 1x4 (where all three ran)."""
    out = []
    for link in dict.fromkeys(r["link"] for r in rows):
        for n in dict.fromkeys(r["positions"] for r in rows):
            w = {r["layout"]: r["wall_s"] for r in rows if r["link"] == link and r["positions"] == n and "wall_s" in r}
            if {"1x4", "2x2", "4x1"} <= set(w):
                out.append(f"- {link}, {n} positions: 2x2 ÷ 4x1 = {w['2x2'] / w['4x1']:.2f}, "
                           f"2x2 ÷ (2 × 1x4) = {w['2x2'] / (2 * w['1x4']):.2f}")
    return out


def plot(rows: list[dict], path: Path, model: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "wall_s" in r]
    layouts = list(dict.fromkeys(r["layout"] for r in ok))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for link in dict.fromkeys(r["link"] for r in ok):
        for n in dict.fromkeys(r["positions"] for r in ok):
            pts = {r["layout"]: r["wall_s"] * 1e3 for r in ok if r["link"] == link and r["positions"] == n}
            xs = [i for i, lay in enumerate(layouts) if lay in pts]
            ax.plot(xs, [pts[layouts[i]] for i in xs], marker="o", label=f"{link}, {n} pos.")
    ax.set_xticks(range(len(layouts)), layouts)
    ax.set_yscale("log")
    ax.set_xlabel("layout (stages x devices per stage)")
    ax.set_ylabel("prefill latency (ms, median, log scale)")
    ax.set_title(f"{model}: prefill latency by layout")
    ax.legend(fontsize=7)
    mine = [[r for r in ok if r["layout"] == lay] for lay in layouts]
    width = 0.4
    bx.bar([i - width / 2 for i in range(len(layouts))], [max(max(r["param_bytes"]) for r in rs) / 2 ** 20
                                                          for rs in mine], width, label="parameters held")
    bx.bar([i + width / 2 for i in range(len(layouts))], [max(max(r["peak_rss_mib"]) for r in rs) for rs in mine],
           width, label="peak RSS (any length)")
    bx.set_xlabel("max over devices and runs")
    bx.set_xticks(range(len(layouts)), layouts)
    bx.set_ylabel("MiB per device")
    bx.set_title(f"{model}: memory per device")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(options: StagesOptions, cache: Any = None) -> str:
    """`prism-edge bench stages`: every layout on every link and length; writes JSON, CSV, Markdown and PNG."""
    options.out.mkdir(parents=True, exist_ok=True)
    rows = run(options, cache)
    stem = "stages-" + options.model.replace("/", "_").replace(":", "-")
    (options.out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    with open(options.out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()})
    png = plot(rows, options.out / f"{stem}.png", options.model)
    title = (f"### {options.model}: pipeline stages, CR={options.cr}, median of {options.repeats} requests"
             + (f", generation of {options.generate} tokens after {options.generate_prompt}" if options.generate else ""))
    text = "\n".join([table(rows, title), "", *key_ratios(rows), "", f"plot: {png}", ""])
    (options.out / f"{stem}.md").write_text(text)
    return text


def _args(argv: list[str]) -> argparse.Namespace:
    """Rank 0's own flags (bench.common.rank0_args)."""
    return rank0_args(argv, ("config", "master", "bind", "model", "cache-dir"), ("repeats", "new", "gen-length"),
                      ("lengths",))


if __name__ == "__main__":
    rank0(_args(sys.argv[1:]))
