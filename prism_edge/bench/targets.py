"""The bench's network-free targets, counted by the simulator (whose bytes and FLOPs the runtime reproduces):

1. bytes: pure Segment Means against Voltage (≤ 1.02 / CR with an fp32 wire, about half with fp16),
   and the shipped defaults beside them (MiniLM, one 512-token sequence, P=4);
2. FLOPs: busiest device against a perfect 1/P split and against Voltage, BERT-base shape, N=512, P=4
   (the paper reports 51.24 % fewer FLOPs than Voltage);
3. accuracy at equal bytes: MiniLM embedding cosine to the full model on the 50 Lee documents against
   bytes per sequence, plain means vs the shipped defaults, across CR (PNG plot).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import PLAIN, PrismConfig
from ..eval.data import builtin_texts
from ..models.loading import load_model
from ..runtime.simulator import simulate
from ..runtime.stats import busiest_flops, measured
from .options import TargetsOptions

CRS = (16, 64, 128)


def _one_sequence(loaded: Any, length: int) -> dict[str, Any]:
    enc = loaded.tokenizer(" ".join(builtin_texts() * 4), truncation=True, max_length=length, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@torch.inference_mode()
def byte_ratios(cache: Any, devices: int = 4, length: int = 512) -> list[dict]:
    loaded = load_model("minilm", cache_dir=cache)
    enc = _one_sequence(loaded, length)
    volt = measured(simulate(loaded.model, PrismConfig(devices=devices, scheme="voltage"), count_flops=False,
                             **enc).stats)
    rows = []
    for cr in CRS:
        variants: tuple[tuple[str, dict[str, Any]], ...] = (
            ("plain fp32", dict(PLAIN)), ("plain fp16", dict(PLAIN, wire_dtype="float16")), ("defaults (int8 wire)", {}))
        for label, extra in variants:
            cfg = PrismConfig(devices=devices, cr=cr).replace(**extra)
            st = measured(simulate(loaded.model, cfg, count_flops=False, **enc).stats)
            ratio = st.total_bytes / volt.total_bytes
            rows.append({"cr": cr, "variant": label, "ratio_to_voltage": ratio, "times_cr": ratio * cr,
                         "target": 1.02 / cr if label == "plain fp32" else None})
    return rows


@torch.inference_mode()
def flop_ratios(cache: Any, devices: int = 4, length: int = 512) -> tuple[list[dict], int, int]:
    loaded = load_model("random:bert-base", cache_dir=cache)
    enc = _one_sequence(loaded, length)
    full = busiest_flops(simulate(loaded.model, PrismConfig(devices=1, scheme="full"), **enc).stats)
    volt = busiest_flops(simulate(loaded.model, PrismConfig(devices=devices, scheme="voltage"), **enc).stats)
    rows = [{"scheme": "voltage", "cr": 1, "max_flops": volt, "vs_perfect_split": volt / (full / devices),
             "reduction_vs_voltage": 0.0}]
    for cr in CRS:
        for label, extra in (("prism plain", PLAIN), ("prism defaults", {})):
            mx = busiest_flops(simulate(loaded.model, PrismConfig(devices=devices, cr=cr).replace(**extra), **enc).stats)
            rows.append({"scheme": label, "cr": cr, "max_flops": mx, "vs_perfect_split": mx / (full / devices),
                         "reduction_vs_voltage": 1 - mx / volt})
    return rows, full, int(enc["input_ids"].shape[1])


def accuracy_vs_bytes(cache: Any, devices: int = 4, crs=(4, 16, 64, 128), limit: int = 50) -> list[dict]:
    """MiniLM embedding cosine to the full model against bytes, plain means vs the defaults (eval harness)."""
    from ..eval.harness import grid, make_task
    from ..models.loading import load_model

    task = make_task("lee", load_model("minilm", cache_dir=cache), limit=limit)
    rows = grid(task, "minilm", [devices], list(crs), ["plain", "defaults"], progress=False)
    return [{"variant": "defaults" if r.variant == "defaults" else "plain means", "cr": r.cr,
             "cosine": r.metrics["cosine"], "bytes_per_seq": r.bytes_per_item,
             "voltage_bytes_per_seq": r.voltage_bytes_per_item} for r in rows if r.scheme == "prism"]


def plot_accuracy(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r["bytes_per_seq"], r["cosine"], r["cr"]) for r in rows if r["variant"] == variant)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
        for b, c, cr in pts:
            ax.annotate(f"CR {cr}", (b, c), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_xlabel("bytes exchanged per sequence (all layers, all devices)")
    ax.set_ylabel("embedding cosine to the full model")
    ax.set_title("MiniLM, 50 Lee documents, P=4: accuracy at equal bytes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(options: TargetsOptions, cache: Any = None) -> str:
    """`prism-edge bench targets`: writes targets.json, targets.md and the accuracy plot."""
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=3, desc="targets")
    br = byte_ratios(cache)
    steps.update()
    fr, full, n = flop_ratios(cache)
    steps.update()
    acc = accuracy_vs_bytes(cache)
    steps.update()
    steps.close()
    plot_accuracy(acc, out / "accuracy-vs-bytes-minilm.png")
    lines = ["### Bytes: PRISM ÷ Voltage, MiniLM, one 512-token sequence, P=4", "",
             "| CR | variant | ÷ Voltage | × CR | target (plain fp32: ≤ 1.02 / CR) |", "|---|---|---|---|---|"]
    for r in br:
        target = "n/a" if r["target"] is None else f"{r['target']:.5f} ({'met' if r['ratio_to_voltage'] <= r['target'] else 'MISSED'})"
        lines.append(f"| {r['cr']} | {r['variant']} | {r['ratio_to_voltage']:.5f} | {r['times_cr']:.3f} | {target} |")
    lines += ["", f"### FLOPs: busiest device, BERT-base shape (random weights), one {n}-token sequence, P=4 "
              f"(one device: {full / 1e9:.2f} GFLOPs; perfect split {full / 4e9:.2f})", "",
              "| scheme | CR | busiest device GFLOPs | ÷ perfect split | fewer than Voltage |", "|---|---|---|---|---|"]
    lines += [f"| {r['scheme']} | {r['cr']} | {r['max_flops'] / 1e9:.2f} | {r['vs_perfect_split']:.3f} | "
              f"{100 * r['reduction_vs_voltage']:.2f} % |" for r in fr]
    lines += ["", "### Accuracy at equal bytes: MiniLM embedding cosine to the full model, 50 Lee documents, P=4", "",
              "| variant | CR | cosine | bytes per sequence | ÷ Voltage |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['cr']} | {r['cosine']:.4f} | {r['bytes_per_seq']:,.0f} | "
              f"{r['bytes_per_seq'] / r['voltage_bytes_per_seq']:.4f} |" for r in acc]
    lines += ["", f"plot: {out / 'accuracy-vs-bytes-minilm.png'}"]
    (out / "targets.json").write_text(json.dumps({"bytes": br, "flops": fr, "full_flops": full, "accuracy": acc},
                                                 indent=1))
    text = "\n".join(lines) + "\n"
    (out / "targets.md").write_text(text)
    return text
