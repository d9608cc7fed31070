"""`prism-edge bench generation --link wifi`: time to first token and tokens per second of real device
processes on an emulated link, against one device and Voltage.

Every scheme runs as P processes (one network namespace each with a link, see bench/links.py): rank 0
is `python -m prism_edge.bench.generation_link --rank0 ...` (a Cluster that joins the others and times
its generations), the others are plain `prism-edge worker` processes.  Prompts are held-out news cut to
each length; greedy decoding; the first generation of a group warms it up and is not timed.
Fidelity (agreement with the full model) is the simulator bench's job (bench/generation.py): the
device processes produce the simulator's tokens (tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .generation import prose_prompts
from .generation import schemes as generation_schemes
from ..config import PrismConfig
from ..cluster.spec import LaunchSpec
from .common import Placement, free_port, run_ranks


def rank0(args: argparse.Namespace) -> None:
    """Rank 0 inside its namespace: join the group, generate, print one JSON line of timings."""
    from ..runtime.decode import Link
    from ..cluster.rendezvous import Endpoint
    from ..cluster import Cluster

    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.config).items()}
    cfg = PrismConfig(**fields)
    spec = LaunchSpec(model=args.model, cache_dir=args.cache_dir, threads=1, timeout=120, startup_timeout=600)
    link = Link(args.mbit, args.ms)
    with Cluster(config=cfg, spec=spec, spawn=cfg.effective_devices == 1,
                 endpoint=Endpoint.parse(args.master, bind=args.bind)) as cluster:
        rows = []
        news = prose_prompts(cluster.tokenizer, "lee", args.length, args.count)
        for i, ids in enumerate([news[0], *news]):  # the first one twice: a warm-up, then timed
            stamps: list[float] = []
            t0 = time.perf_counter()
            gen = cluster.generate(ids, max_new_tokens=args.new, decode=args.decode, link=link,
                                   on_token=lambda _: stamps.append(time.perf_counter()))
            if i == 0:
                continue  # warm-up
            rows.append({"ttft_s": stamps[0] - t0, "tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                         "mode": gen.mode, "bytes": gen.phases()})
    print(json.dumps(rows))


def run_scheme(place: Placement, cfg: PrismConfig, decode: str, link: Any, length: int, count: int, new: int,
               cache: Any) -> dict:
    world = cfg.effective_devices
    master = f"{place.address(0)}:{free_port()}"
    spec = LaunchSpec(model="smollm2", cache_dir=str(cache) if cache else None, threads=1, timeout=120,
                      startup_timeout=600)
    config = json.dumps(dataclasses.asdict(cfg))
    head = [sys.executable, "-m", "prism_edge.bench.generation_link", "--rank0", "--config", config, "--master", master,
            "--bind", place.address(0), "--model", "smollm2", "--length", str(length), "--count", str(count),
            "--new", str(new), "--decode", decode, "--mbit", str(link.rate_mbit if link else 1e4),
            "--ms", str(link.delay_ms if link else 0.0)] + (["--cache-dir", str(cache)] if cache else [])
    commands = [head] + [spec.worker_command(cfg, r, world, master, place.address(r)) for r in range(1, world)]
    rows = json.loads(run_ranks(place, commands, timeout=3600))
    return {"ttft_s": statistics.median(r["ttft_s"] for r in rows), "tok_s": statistics.median(r["tok_s"] for r in rows),
            "mode": rows[0]["mode"], "prefill_bytes": statistics.mean(r["bytes"]["prefill"] for r in rows),
            "handoff_bytes": statistics.mean(r["bytes"]["handoff"] for r in rows),
            "bytes_per_token": statistics.mean(r["bytes"]["per_token"] for r in rows)}


def schemes(devices: int, variants: list[str], modes: list[str]) -> list[tuple[str, PrismConfig, str]]:
    """One device, Voltage, then each variant (at CR=16) in each decode mode, as the simulator bench has them."""
    return [(s.label, s.cfg, s.decode) for s in generation_schemes(devices, 16, variants, modes)]


def main(out: Path, links: list[str], devices: int = 2, lengths=(1024,), prompts: int = 3, new: int = 32,
         variants=("defaults",), modes=("auto",), cache: Any = None) -> str:
    from .links import EmulatedNetwork, available, parse_link

    ok, why = available()
    texts, result = [], []
    for name in links:
        net = EmulatedNetwork(devices, parse_link(name), allow_no_delay=True).open() if ok else None
        note = name if net is not None else f"loopback ({why})"
        try:
            place = Placement(net)
            for length in lengths:
                rows = []
                for label, cfg, decode in tqdm(schemes(devices, list(variants), list(modes)), desc=f"{note} {length}"):
                    r = run_scheme(place, cfg, decode, net.link if net else None, length, prompts, new, cache)
                    rows.append({"scheme": label, "link": note, "prompt_tokens": length, **r})
                result += rows
                texts.append(_table(rows, f"Generation on {note}, SmolLM2, {length}-token prompts, {new} greedy tokens, "
                                          f"median of {prompts} prompts"))
        finally:
            if net is not None:
                net.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation-timed.json").write_text(json.dumps(result, indent=1))
    text = "\n".join(texts)
    (out / "generation-timed.md").write_text(text)
    return text


def _table(rows: list[dict], title: str) -> str:
    base = rows[0]  # one device
    lines = [f"### {title}", "", "| scheme | decode | time to first token | vs one device | tokens/s | prefill bytes | "
             "hand-off bytes | bytes per token |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['mode']} | {r['ttft_s'] * 1e3:.0f} ms | {base['ttft_s'] / r['ttft_s']:.2f}x | "
                     f"{r['tok_s']:.1f} | {r['prefill_bytes']:,.0f} | {r['handoff_bytes']:,.0f} | "
                     f"{r['bytes_per_token']:,.0f} |")
    return "\n".join(lines) + "\n"


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--rank0", action="store_true")
    for name in ("config", "master", "bind", "model", "decode", "cache-dir"):
        p.add_argument("--" + name)
    for name in ("length", "count", "new"):
        p.add_argument("--" + name, type=int)
    p.add_argument("--mbit", type=float)
    p.add_argument("--ms", type=float)
    return p.parse_args(argv)


if __name__ == "__main__":
    rank0(_args(sys.argv[1:]))
