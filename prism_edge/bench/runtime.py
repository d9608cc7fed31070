"""The multi-process runtime's cost: wall time and bytes per request, and what overlap saves on a slow link.

1. Loopback (`loopback`): for each device count, a local Cluster serves the same request `repeats`
   times; reported beside the in-process simulator (same config, one thread) and, at P=1, the
   plain HF forward.  The machine has 2 cores: P=4 processes share them.
2. Emulated link (`overlap`): P device processes, each in its own network namespace behind a `tc tbf`
   link (prism_edge.bench.links), run with attention overlap on and off, interleaved.  Needs root.

Medians over interleaved repeats; compare ratios from one run (the machine is shared and noisy).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .links import EmulatedNetwork, available, parse_link
from ..config import PrismConfig
from ..eval.data import builtin_texts
from ..eval.fidelity import mean_pool
from ..models.loading import load_model
from ..runtime.simulator import simulate
from ..runtime.stats import measured
from ..cluster import Cluster
from ..eval.requests import builtin_request
from ..cluster.spec import LaunchSpec
from .common import Placement, free_port, run_ranks
from .options import RuntimeOptions


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def loopback(model: str, devices: list[int], cr: int, repeats: int, length: int, cache: Path | None) -> list[dict]:
    torch.set_num_threads(1)
    loaded = load_model(model, cache_dir=cache)
    inputs = builtin_request(loaded, length)
    rows = []
    with torch.inference_mode():
        hf = _median_time(lambda: loaded.model(**inputs), repeats)
    for p in tqdm(devices, desc="device counts"):
        cfg = PrismConfig(devices=p, cr=cr)
        with torch.inference_mode():
            sim = _median_time(lambda: simulate(loaded.model, cfg, count_flops=False, **inputs), repeats)
        with Cluster(model, cfg, threads=1, cache_dir=str(cache) if cache else None) as cluster:
            cluster(**inputs, outputs="mean")  # warm-up
            outs = [cluster(**inputs, outputs="mean") for _ in range(repeats)]
        walls = [o.stats.wall_s for o in outs if o.stats is not None and o.stats.wall_s is not None]
        stats = outs[-1].stats
        assert stats is not None and stats.input_bytes is not None and stats.output_bytes is not None
        assert stats.wait_s is not None and stats.compute_s is not None
        rows.append({
            "devices": p, "cr": cr, "runtime_s": statistics.median(walls), "simulator_s": sim, "hf_forward_s": hf,
            "exchange_bytes": stats.total_bytes, "input_bytes": sum(stats.input_bytes),
            "output_bytes": sum(stats.output_bytes), "request_bytes": stats.request_bytes,
            "wait_s": sum(map(sum, stats.wait_s)) / p, "compute_s": sum(map(sum, stats.compute_s)) / p,
        })
    return rows


WIRE_PLANS: tuple[tuple[str, float | None], ...] = (("fixed counts", 0.0), ("the default budget", None))


def wire_precision(model: str, devices: int, cr: int, length: int, cache: Path | None) -> list[dict]:
    """Fidelity cost of a narrower wire dtype (simulated: the runtime sends the very same tensors).  With fixed
    counts every wire sends the same rows, so only the rounding differs; under a byte budget a cheaper wire
    buys more rows for the same budget."""
    loaded = load_model(model, cache_dir=cache)
    inputs = builtin_request(loaded, length)
    mask = inputs["attention_mask"]
    rows = []
    with torch.inference_mode():
        full = loaded.model(**inputs).last_hidden_state
        for plan, budget in WIRE_PLANS:
            base: torch.Tensor | None = None
            for wire in ("float32", "float16", "bfloat16", "int8"):
                cfg = PrismConfig(devices=devices, cr=cr, wire_dtype=wire, budget=budget)
                out = simulate(loaded.model, cfg, count_flops=False, **inputs)
                hidden = out.last_hidden_state
                assert hidden is not None  # an encoder's output
                base = hidden if base is None else base
                valid = mask.bool()
                rows.append({
                    "plan": plan, "wire": wire, "exchange_bytes": measured(out.stats).total_bytes,
                    "cosine_to_full": float((mean_pool(hidden, mask) * mean_pool(full, mask)).sum(-1).mean()),
                    "max_abs_vs_fp32_wire": float((hidden - base)[valid].abs().max()),
                })
    return rows


def _emulated_run(net: EmulatedNetwork, spec: LaunchSpec, cfg: PrismConfig, repeats: int, length: int) -> dict:
    """One cluster, every rank in its own namespace, rank 0 prints its JSON report."""
    place, master = Placement(net), f"{net.address(0)}:{free_port()}"
    request = ["--repeat", str(repeats), "--json", "--max-length", str(length)]
    world = cfg.effective_devices
    commands = [spec.worker_command(cfg, rank, world, master, place.address(rank), request) for rank in range(world)]
    return json.loads(run_ranks(place, commands, timeout=600))


def overlap(model: str, link_name: str, devices: int, cr: int, repeats: int, rounds: int, length: int,
            cache: Path | None = None) -> dict:
    ok, why = available()
    if not ok:
        return {"skipped": f"link emulation unavailable here: {why}"}
    link = parse_link(link_name)
    cfg = PrismConfig(devices=devices, cr=cr)
    spec = LaunchSpec(model=model, cache_dir=str(cache) if cache else None)
    walls: dict[bool, list[float]] = {True: [], False: []}
    waits: dict[bool, list[float]] = {True: [], False: []}
    report: dict[str, Any] = {}
    with EmulatedNetwork(devices, link, allow_no_delay=True) as net:
        before = [net.counters(p) for p in range(devices)]
        for _ in tqdm(range(rounds), desc=f"overlap on/off over {link_name}"):
            for on in (True, False):  # interleaved
                report = _emulated_run(net, spec.replace(overlap=on), cfg, repeats, length)
                walls[on] += report["wall_s"][1:]  # the first request warms up
                waits[on].append(sum(map(sum, report["stats"]["wait_s"])) / devices)
        after = [net.counters(p) for p in range(devices)]
        delay = net.delay_emulated
    wire = sum(a[0] - b[0] for a, b in zip(after, before))
    return {
        "link": link_name, "rate_mbit": link.rate_mbit, "delay_ms": link.delay_ms if delay else 0.0,
        "devices": devices, "cr": cr, "requests_per_run": repeats,
        "overlap_on_s": statistics.median(walls[True]), "overlap_off_s": statistics.median(walls[False]),
        "wait_on_s": statistics.median(waits[True]), "wait_off_s": statistics.median(waits[False]),
        "request_bytes": report["stats"]["request_bytes"],
        "interface_tx_bytes_all_runs": wire,
    }


def main(options: RuntimeOptions, cache: Path | None = None) -> str:
    """`prism-edge bench runtime`: loopback per device count, wire dtypes, overlap per link; writes JSON, Markdown."""
    model, cr, repeats, length = options.model, options.cr, options.repeats, options.length
    rows = loopback(model, list(options.device_counts), cr, repeats, length, cache)
    lines = [f"## Multi-process runtime on loopback — {model}, {len(builtin_texts())} built-in texts (≤ {length} "
             f"tokens), CR={cr}, 1 thread per device, 2 cores, median of {repeats}", "",
             "| P | runtime wall (ms) | simulator, all P devices in 1 process (ms) | runtime ÷ (simulator ÷ P) | "
             "HF forward (ms) | mean wait per device (ms) | exchange bytes | inputs | outputs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['devices']} | {r['runtime_s'] * 1e3:.1f} | {r['simulator_s'] * 1e3:.1f} | "
                     f"{r['runtime_s'] / (r['simulator_s'] / r['devices']):.2f} | {r['hf_forward_s'] * 1e3:.1f} | "
                     f"{r['wait_s'] * 1e3:.1f} | {r['exchange_bytes']:,} | {r['input_bytes']:,} | "
                     f"{r['output_bytes']:,} |")
    wires = wire_precision(model, 4, cr, length, cache)
    lines += ["", f"## Wire precision — {model}, P=4, CR={cr}, same texts", "",
              "| plan | wire dtype | exchange bytes | ÷ fp32 | embedding cosine to full model | max abs diff vs fp32 wire |",
              "|---|---|---|---|---|---|"]
    fp32 = {w["plan"]: w["exchange_bytes"] for w in wires if w["wire"] == "float32"}
    lines += [f"| {w['plan']} | {w['wire']} | {w['exchange_bytes']:,} | {w['exchange_bytes'] / fp32[w['plan']]:.3f} | "
              f"{w['cosine_to_full']:.5f} | {w['max_abs_vs_fp32_wire']:.2e} |" for w in wires]
    overlaps: list[dict[str, Any]] = []
    result = {"model": model, "loopback": rows, "wire_precision": wires, "overlap": overlaps}
    for link in options.link:
        ov = overlap(model, link, 2, cr, repeats, options.rounds, length, cache)
        overlaps.append(ov)
        lines += [""]
        if "skipped" in ov:
            lines.append(f"Overlap on an emulated link ({link}): not measured ({ov['skipped']}).")
            continue
        saved = 1 - ov["overlap_on_s"] / ov["overlap_off_s"]
        lines += [f"## Overlap on an emulated link — {link} ({ov['rate_mbit']:g} Mbit/s, {ov['delay_ms']:g} ms "
                  f"one-way), P=2, CR={cr}, median over {options.rounds} interleaved runs of {repeats} requests", "",
                  "| overlap | wall per request (ms) | mean wait per device (ms) |", "|---|---|---|",
                  f"| on | {ov['overlap_on_s'] * 1e3:.1f} | {ov['wait_on_s'] * 1e3:.1f} |",
                  f"| off | {ov['overlap_off_s'] * 1e3:.1f} | {ov['wait_off_s'] * 1e3:.1f} |", "",
                  f"Overlap changes the wall time by {-100 * saved:+.1f} %. Bytes per request (ledger): "
                  f"{ov['request_bytes']:,}; interface counters over all runs: "
                  f"{ov['interface_tx_bytes_all_runs']:,} B sent (includes start-up and handshakes)."]
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime.json").write_text(json.dumps(result, indent=1))
    table = "\n".join(lines) + "\n"
    (out / "runtime.md").write_text(table)
    return table
