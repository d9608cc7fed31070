"""Generation bench: agreement with the full model's greedy continuation, decode speed and bytes.

Real SmolLM2-135M, prompts cut from Lee background news (real prose), greedy decoding of `new`
tokens.  Agreement is the fraction of positions where a scheme's continuation equals the full
model's (position by position, so an early divergence costs the rest).  Decode tokens/s excludes
the prefill; every scheme decodes on one device (the last), so the difference between schemes is
the prefill and what the new tokens see.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import PrismConfig
from ..eval.data import lee_background
from ..models.loading import load_model
from ..runtime.generate import generate


def prompts(tokenizer, count: int, length: int) -> list[torch.Tensor]:
    out = []
    for doc in lee_background():
        ids = tokenizer(doc, return_tensors="pt")["input_ids"]
        if ids.shape[1] >= length:
            out.append(ids[:, :length])
        if len(out) == count:
            break
    return out


def main(out: Path, cache=None, count: int = 3, length: int = 256, new: int = 64, devices: int = 4,
         crs=(4, 16, 64)) -> str:
    torch.set_num_threads(1)
    loaded = load_model("smollm2", cache_dir=cache)
    model = loaded.model
    schemes = {"full (1 device)": PrismConfig(devices=1, scheme="full"),
               f"voltage P={devices}": PrismConfig(devices=devices, scheme="voltage")}
    schemes.update({f"prism P={devices} CR={cr}": PrismConfig(devices=devices, cr=cr) for cr in crs})
    rows = {name: {"agree": [], "tok_s": [], "prefill_bytes": []} for name in schemes}
    for ids in tqdm(prompts(loaded.tokenizer, count, length), desc="prompts"):
        reference = None
        for name, cfg in schemes.items():
            stamps = []
            gen = generate(model, cfg, ids, max_new_tokens=new, on_token=lambda _: stamps.append(time.perf_counter()))
            reference = gen.new_ids if reference is None else reference
            rows[name]["agree"].append(sum(a == b for a, b in zip(gen.new_ids, reference)) / new)
            rows[name]["tok_s"].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
            rows[name]["prefill_bytes"].append(gen.prefill_stats.total_bytes)
    lines = [f"### Generation, SmolLM2-135M, {count} prompts of {length} tokens from Lee background news, {new} new "
             "tokens, greedy, 1 thread", "",
             "| scheme | agreement with the full model's tokens | decode tokens/s | prefill bytes exchanged | bytes per "
             "new token |", "|---|---|---|---|---|"]
    result = []
    for name, r in rows.items():
        row = {"scheme": name, "agreement": statistics.mean(r["agree"]), "agreement_per_prompt": r["agree"],
               "decode_tokens_per_s": statistics.median(r["tok_s"]),
               "prefill_bytes": statistics.mean(r["prefill_bytes"]), "bytes_per_new_token": 8}
        result.append(row)
        lines.append(f"| {name} | {row['agreement']:.3f} ({', '.join(f'{a:.2f}' for a in r['agree'])}) | "
                     f"{row['decode_tokens_per_s']:.1f} | {row['prefill_bytes']:,.0f} | 8 |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation.json").write_text(json.dumps(result, indent=1))
    text = "\n".join(lines) + "\n"
    (out / "generation.md").write_text(text)
    return text
