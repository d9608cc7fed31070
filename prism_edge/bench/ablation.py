"""Fidelity ablation on real weights: plain Segment Means vs sinks / halo / log-count bias.

MiniLM (BERT): embedding cosine to the full model on the 50 Lee documents.
SmolLM2 (Llama): perplexity, KL and next-token agreement on chunks of Lee background news.
Every row also reports the bytes exchanged per sequence, counted by the simulator's ledger.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import PrismConfig
from ..eval import data
from ..eval.harness import VARIANTS
from ..eval.fidelity import lm_logits, lm_score, mean_pool, sentence_embeddings, token_chunks
from ..models.loading import load_model
from ..runtime.simulator import simulate



@dataclass
class Row:
    model: str
    variant: str
    devices: int
    cr: int
    metric: str
    value: float
    kl: float | None
    agreement: float | None
    bytes_per_seq: float
    voltage_bytes_per_seq: float


@torch.no_grad()
def _bytes_per_seq(model, cfg, batches) -> float:
    total, seqs = 0, 0
    for enc in batches:
        out = simulate(model, cfg, count_flops=False, **enc)
        total += out.stats.total_bytes
        seqs += enc["input_ids"].shape[0]
    return total / seqs


@torch.no_grad()
def ablate_minilm(devices: int, crs: list[int], variants: list[str], limit: int = 50) -> list[Row]:
    loaded = load_model("minilm")
    model, tok = loaded.model, loaded.tokenizer
    docs = data.lee_documents()[:limit]
    ref = sentence_embeddings(model, tok, docs, None)
    enc = [tok(docs[i : i + 16], padding=True, truncation=True, max_length=256, return_tensors="pt")
           for i in range(0, len(docs), 16)]
    volt = _bytes_per_seq(model, PrismConfig(devices=devices, scheme="voltage"), enc)
    rows = []
    for cr in tqdm(crs, desc="minilm CR"):
        for name in variants:
            cfg = PrismConfig(devices=devices, cr=cr, **VARIANTS[name])
            got, nbytes = [], 0
            for e in enc:
                out = simulate(model, cfg, count_flops=False, **e)
                got.append(mean_pool(out.last_hidden_state, e["attention_mask"]))
                nbytes += out.stats.total_bytes
            cos = float((torch.cat(got) * ref).sum(-1).mean())
            rows.append(Row("minilm", name, devices, cr, "cosine", cos, None, None, nbytes / len(docs), volt))
    return rows


@torch.no_grad()
def ablate_smollm2(devices: int, crs: list[int], variants: list[str], length: int = 512, chunks: int = 8,
                   cache_dir: Path | None = None) -> tuple[float, list[Row]]:
    loaded = load_model("smollm2", cache_dir=cache_dir)
    model, tok = loaded.model, loaded.tokenizer
    ids = token_chunks(tok, data.lee_background(), length, chunks)
    ref = lm_logits(model, ids, None)
    full = lm_score(ids, ref).perplexity
    enc = [{"input_ids": ids[:1]}]
    volt = _bytes_per_seq(model, PrismConfig(devices=devices, scheme="voltage"), enc)
    rows = []
    for cr in tqdm(crs, desc="smollm2 CR"):
        for name in variants:
            cfg = PrismConfig(devices=devices, cr=cr, **VARIANTS[name])
            s = lm_score(ids, lm_logits(model, ids, cfg), ref)
            rows.append(Row("smollm2", name, devices, cr, "perplexity", s.perplexity, s.kl, s.agreement,
                            _bytes_per_seq(model, cfg, enc), volt))
    return full, rows


def markdown(rows: list[Row], reference: dict[str, float]) -> str:
    out = ["| model | variant | P | CR | metric | value | KL | top-1 agree | bytes/seq | ÷ Voltage |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = "" if r.kl is None else f"{r.kl:.3f}"
        ag = "" if r.agreement is None else f"{r.agreement:.3f}"
        out.append(f"| {r.model} | {r.variant} | {r.devices} | {r.cr} | {r.metric} | {r.value:.4f} | {kl} | {ag} | "
                   f"{r.bytes_per_seq:,.0f} | {r.bytes_per_seq / r.voltage_bytes_per_seq:.4f} |")
    refs = ", ".join(f"{k}: {v:.4f}" for k, v in reference.items())
    return "\n".join(out) + f"\n\nFull-model reference — {refs}\n"


def main(models: list[str], devices: int, crs: list[int], variants: list[str], out_dir: Path,
         cache_dir: Path | None = None, length: int = 512, chunks: int = 8) -> str:
    rows: list[Row] = []
    reference: dict[str, float] = {}
    if "minilm" in models:
        reference["minilm cosine"] = 1.0
        rows += ablate_minilm(devices, crs, variants)
    if "smollm2" in models:
        ppl, r = ablate_smollm2(devices, crs, variants, length=length, chunks=chunks, cache_dir=cache_dir)
        reference["smollm2 perplexity"] = ppl
        rows += r
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(json.dumps({"reference": reference, "rows": [asdict(r) for r in rows]}, indent=1))
    table = markdown(rows, reference)
    (out_dir / "ablation.md").write_text(table)
    return table
