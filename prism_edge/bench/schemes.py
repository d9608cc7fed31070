"""Side by side: PRISM (several CR, fp16 wire), Voltage, one device and tensor parallelism, on one link.

Every scheme serves the same request (the built-in texts, as `prism-edge worker` builds it) from
real device processes: the runtime's workers for full / Voltage / PRISM, `prism_edge.bench.tp` for
tensor parallelism.  With an emulated link (root) every device process runs in its own network
namespace behind `tc tbf` (+ a user-space delay), and the interface counters cross-check the
ledger; without one (or without root) the devices talk over loopback.

Measured per scheme: bytes per request and device (ledger; TP: its all-reduces), busiest-device
FLOPs against a perfect 1/P split (torch.utils.flop_counter; the simulator's count, which the
runtime reproduces exactly), end-to-end latency (median), per-layer compute vs wait, thread CPU
time and peak resident memory per device process.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .links import EmulatedNetwork, available, parse_link
from ..config import PrismConfig
from ..models.loading import load_model
from ..runtime.simulator import simulate
from ..runtime.stats import busiest_flops
from ..eval.requests import builtin_request
from ..cluster.spec import LaunchSpec
from .common import Placement, free_port, run_ranks
from .options import Scheme, SchemesOptions, parse_scheme


def run_runtime(place: Placement, model: str, cfg: PrismConfig, repeats: int, length: int,
                spec: LaunchSpec | None = None) -> dict[str, Any]:
    """One group of worker processes (rank 0 runs the built-in request repeats + 1 times, the first to warm up)."""
    world = cfg.effective_devices
    master = f"{place.address(0)}:{free_port()}"
    spec = spec or LaunchSpec(model=model)
    request = ["--repeat", str(repeats + 1), "--json", "--max-length", str(length)]
    commands = [spec.worker_command(cfg, rank, world, master, place.address(rank), request) for rank in range(world)]
    before = place.tx_bytes(world)
    report = json.loads(run_ranks(place, commands))
    after = place.tx_bytes(world)
    st = report["stats"]
    layers = len(st["wait_s"])
    return {
        "wall_s": statistics.median(report["wall_s"][1:]),
        "bytes_sent": [sum(st["bytes_sent"][i][p] for i in range(layers)) + st["output_bytes"][p]
                       + (sum(st["input_bytes"]) if p == 0 else 0) for p in range(world)],
        "exchange_bytes": st["total_bytes"], "request_bytes": st["request_bytes"],
        "compute_per_layer_s": statistics.mean(sum(l) / world for l in st["compute_s"]) if layers else 0.0,
        "wait_per_layer_s": statistics.mean(sum(l) / world for l in st["wait_s"]) if layers else 0.0,
        "cpu_s": max(st["cpu_s"]), "peak_rss_mib": max(st["peak_rss_mib"]),
        "wire_tx_per_request": None if before is None or after is None else (after - before) / (repeats + 1),
    }


def run_tp(place: Placement, model: str, devices: int, repeats: int, length: int) -> dict[str, Any]:
    port = free_port()

    def env(rank: int) -> dict:
        return {"RANK": str(rank), "WORLD_SIZE": str(devices), "LOCAL_RANK": "0", "MASTER_ADDR": place.address(0),
                "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": place.iface(rank)}

    argv = [sys.executable, "-m", "prism_edge.bench.tp", "--model", model, "--repeat", str(repeats),
            "--max-length", str(length)]
    before = place.tx_bytes(devices)
    row = json.loads(run_ranks(place, [argv] * devices, env))
    after = place.tx_bytes(devices)
    if "error" in row:
        return {"error": row["error"]}
    return {
        "wall_s": row["wall_s"], "bytes_sent": [row["exchange_sent_per_device"]] * devices,
        "exchange_bytes": row["exchange_sent_per_device"] * devices,
        "request_bytes": row["exchange_sent_per_device"] * devices + row["input_bytes_per_device"] * (devices - 1),
        "compute_per_layer_s": None, "wait_per_layer_s": None, "cpu_s": row["cpu_s"],
        "peak_rss_mib": row["peak_rss_mib"], "tp_flops_per_device": row["flops_per_device"],
        # the TP run includes an untimed FLOP-counting pass, a warm-up, and `repeats` timed requests
        "wire_tx_per_request": None if before is None or after is None else (after - before) / (repeats + 2),
    }


def flops(model_name: str, schemes: list[Scheme], devices: int, length: int, cache: Any) -> dict[str, dict]:
    """Per-device FLOPs of each scheme on the same request, counted by the simulator."""
    loaded = load_model(model_name, cache_dir=cache)
    enc = builtin_request(loaded, length)
    out = {}
    with torch.inference_mode():
        full = busiest_flops(simulate(loaded.model, PrismConfig(devices=1, scheme="full"), **enc).stats)
        for s in schemes:
            cfg = s.config(devices)
            if cfg is None:  # tp: counted by its own processes
                continue
            busiest = busiest_flops(simulate(loaded.model, cfg, **enc).stats)
            out[s.name] = {"max_flops": busiest, "vs_perfect_split": busiest / (full / cfg.effective_devices)}
    out["_full"] = {"max_flops": full}
    return out


def run(model: str, link: str | None, devices: int, schemes: list[Scheme], repeats: int, length: int,
        cache: Any = None) -> tuple[list[dict], str]:
    note = "loopback"
    net = None
    if link and link != "loopback":
        ok, why = available()
        if ok:
            net = EmulatedNetwork(devices, parse_link(link), allow_no_delay=True).open()
            lk = net.link
            note = f"{link} ({lk.rate_mbit:g} Mbit/s, {lk.delay_ms if net.delay_emulated else 0:g} ms one-way)"
        else:
            print(f"link emulation unavailable ({why}); benching on loopback", file=sys.stderr)
    counted = flops(model, schemes, devices, length, cache)
    full_flops = counted["_full"]["max_flops"]
    rows = []
    try:
        place = Placement(net)
        for s in tqdm(schemes, desc=f"schemes on {note}"):
            if s.kind == "tp":
                r = run_tp(place, model, devices, repeats, length)
            else:
                r = run_runtime(place, model, s.config(devices), repeats, length,
                                LaunchSpec(model=model, cache_dir=str(cache) if cache else None))
            row = {"scheme": s.name, "link": note, "devices": 1 if s.kind == "full" else devices, **r}
            if s.kind == "tp" and "tp_flops_per_device" in r:
                row["max_flops"] = r["tp_flops_per_device"]
                row["flops_vs_perfect_split"] = r["tp_flops_per_device"] / (full_flops / devices)
            elif s.name in counted:
                row["max_flops"] = counted[s.name]["max_flops"]
                row["flops_vs_perfect_split"] = counted[s.name]["vs_perfect_split"]
            rows.append(row)
    finally:
        if net is not None:
            net.close()
    base = next((r["wall_s"] for r in rows if r["scheme"] == "full" and "wall_s" in r), None)
    for r in rows:
        if base and r.get("wall_s"):
            r["speedup_vs_full"] = base / r["wall_s"]
    return rows, note


COLUMNS = ["scheme", "devices", "wall_s", "speedup_vs_full", "request_bytes", "bytes_sent", "wire_tx_per_request",
           "compute_per_layer_s", "wait_per_layer_s", "cpu_s", "peak_rss_mib", "max_flops", "flops_vs_perfect_split"]


def table(rows: list[dict], title: str) -> str:
    def fmt(v, key):
        if v is None:
            return "n/a"
        if key in ("wall_s", "compute_per_layer_s", "wait_per_layer_s", "cpu_s"):
            return f"{v * 1e3:.1f}"
        if key in ("speedup_vs_full", "flops_vs_perfect_split"):
            return f"{v:.2f}"
        if key == "max_flops":
            return f"{v / 1e9:.2f}"
        if key == "peak_rss_mib":
            return f"{v:.0f}"
        if key == "bytes_sent":
            return " / ".join(f"{b:,}" for b in v)
        if isinstance(v, float):
            return f"{v:,.0f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    head = ["scheme", "P", "latency (ms)", "speed-up vs one device", "bytes per request", "bytes sent per device",
            "interface tx per request", "compute / layer (ms)", "wait / layer (ms)", "thread CPU (ms)",
            "peak RSS (MiB)", "busiest device GFLOPs", "÷ perfect split"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['scheme']} | {r['devices']} | not run: {r['error']} |" + " |" * (len(head) - 3))
            continue
        lines.append("| " + " | ".join(fmt(r.get(k), k) for k in COLUMNS) + " |")
    return "\n".join(lines)


def plot(all_rows: list[dict], out: Path, model: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    links = list(dict.fromkeys(r["link"] for r in all_rows))
    schemes = list(dict.fromkeys(r["scheme"] for r in all_rows))
    fig, ax = plt.subplots(figsize=(1.2 * len(schemes) + 3, 4))
    width = 0.8 / max(1, len(links))
    for j, link in enumerate(links):
        vals = [next((r.get("wall_s") or 0 for r in all_rows if r["link"] == link and r["scheme"] == s), 0) * 1e3
                for s in schemes]
        ax.bar([i + j * width for i in range(len(schemes))], vals, width, label=link)
    ax.set_xticks([i + width * (len(links) - 1) / 2 for i in range(len(schemes))], schemes, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("latency per request (ms, log scale)")
    ax.set_title(f"{model}: end-to-end latency by scheme and link")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / f"latency-{model}.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(1.2 * len(schemes) + 3, 4))
    first = [next(r for r in all_rows if r["scheme"] == s) for s in schemes]
    ax.bar(schemes, [max(r.get("request_bytes") or 0, 1) for r in first])
    ax.set_yscale("log")
    ax.set_ylabel("bytes on the wire per request")
    ax.set_title(f"{model}: bytes per request (ledger)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    files.append(out / f"bytes-{model}.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files


def main(options: SchemesOptions, cache: Any = None) -> str:
    """`prism-edge bench schemes`: every scheme on every link, one table each; writes JSON, CSV, Markdown and PNG."""
    model, out, devices, repeats, length = options.model, options.out, options.devices, options.repeats, options.length
    schemes = [parse_scheme(s) for s in options.schemes]
    out.mkdir(parents=True, exist_ok=True)
    all_rows, parts = [], []
    for link in options.link:
        rows, note = run(model, link, devices, schemes, repeats, length, cache)
        all_rows += rows
        parts.append(table(rows, f"### {model} on {note}, P={devices}, median of {repeats} requests"))
    safe = model.replace("/", "_").replace(":", "-")
    stem = f"schemes-{safe}"
    (out / f"{stem}.json").write_text(json.dumps(all_rows, indent=1))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["link", *COLUMNS, "exchange_bytes", "error"], extrasaction="ignore")
        writer.writeheader()
        for r in all_rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()})
    pngs = plot(all_rows, out, safe)
    text = "\n\n".join(parts) + "\n\nplots: " + ", ".join(str(p) for p in pngs) + "\n"
    (out / f"{stem}.md").write_text(text)
    return text
