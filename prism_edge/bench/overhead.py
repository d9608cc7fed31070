"""Simulator overhead against a plain HF forward, and bytes per device per layer against Voltage.

Timings are medians over interleaved repeats in one process (the machine is shared and noisy:
compare the ratios, not the absolute times).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import PLAIN, PrismConfig
from ..eval.data import builtin_texts
from ..models.loading import load_model
from ..runtime.simulator import simulate
from ..runtime.stats import measured
from .options import OverheadOptions


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@torch.no_grad()
def overhead(model, inputs: dict, repeats: int) -> dict[str, float]:
    variants = {
        "hf forward": lambda: model(**inputs),
        "simulate P=1 CR=1": lambda: simulate(model, PrismConfig(devices=1, cr=1), count_flops=False, **inputs),
        "simulate P=1 CR=1 + FLOP counter": lambda: simulate(model, PrismConfig(devices=1, cr=1), **inputs),
        "simulate P=4 CR=16": lambda: simulate(model, PrismConfig(devices=4, cr=16), count_flops=False, **inputs),
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in tqdm(range(repeats), desc="overhead repeats"):
        for name, fn in variants.items():  # interleaved, so drifts in machine load hit all alike
            times[name].append(_timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def bytes_per_layer(model, inputs: dict, devices: int, crs: list[int]) -> list[dict]:
    rows = []
    volt = measured(simulate(model, PrismConfig(devices=devices, scheme="voltage"), count_flops=False, **inputs).stats)
    for cr in crs:
        for label, extra in (("plain means", PLAIN), ("defaults", {})):
            cfg = PrismConfig(devices=devices, cr=cr).replace(**extra)
            st = measured(simulate(model, cfg, count_flops=False, **inputs).stats)
            rows.append({
                "cr": cr, "variant": label,
                "received_per_layer": list(st.received[0]), "voltage_received_per_layer": list(volt.received[0]),
                "ratio": st.total_bytes / volt.total_bytes,
            })
    return rows


def main(options: OverheadOptions, cache: Path | None = None) -> str:
    """`prism-edge bench overhead`: writes overhead.json and overhead.md."""
    model_name, out, repeats, length = options.model, options.out, options.repeats, options.length
    torch.set_num_threads(1)
    loaded = load_model(model_name, cache_dir=cache)
    tok: Any = loaded.tokenizer
    enc = tok(builtin_texts(), padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    times = overhead(loaded.model, inputs, repeats)
    base = times["hf forward"]
    lines = [f"## Simulator overhead — {model_name}, batch {inputs['input_ids'].shape[0]} x {length} tokens, "
             f"1 thread, median of {repeats}", "", "| run | time (ms) | ÷ HF forward |", "|---|---|---|"]
    lines += [f"| {k} | {v * 1e3:.1f} | {v / base:.2f} |" for k, v in times.items()]
    long = tok(" ".join(builtin_texts()), truncation=True, max_length=512, return_tensors="pt")
    n_long = long["input_ids"].shape[1]
    rows = bytes_per_layer(loaded.model, {"input_ids": long["input_ids"]}, 4, [4, 16, 64, 128])
    lines += ["", f"## Bytes received per device per layer, P=4, one sequence of {n_long} tokens", "",
              "| CR | variant | device 0..3 | Voltage device 0..3 | total ÷ Voltage |", "|---|---|---|---|---|"]
    lines += [f"| {r['cr']} | {r['variant']} | {', '.join(f'{b:,}' for b in r['received_per_layer'])} | "
              f"{', '.join(f'{b:,}' for b in r['voltage_received_per_layer'])} | {r['ratio']:.4f} |" for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps({"model": model_name, "length": length, "times_s": times,
                                                  "bytes": rows}, indent=1))
    table = "\n".join(lines) + "\n"
    (out / "overhead.md").write_text(table)
    return table
