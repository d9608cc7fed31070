"""Generation bench: does a split SmolLM2 write what the full model writes, and what does it send?

Prompts: held-out Lee background news and Wikipedia prose cut to 256 and 1024 tokens, and short chat
questions (chat template).  For every scheme (full, Voltage, PRISM variants with a decode mode) and
prompt, greedy decoding of `new` tokens, scored against the full model's own greedy continuation:
  agreement        fraction of positions whose token equals the full model's (position by position,
                   so an early divergence costs the rest)
  first divergence tokens until the first difference (median over prompts; `new` when none)
  teacher-forced   fraction of steps whose next token matches the full model's when both are fed the
                   full model's continuation (how often a single step goes wrong)
  continuation ppl the full model's perplexity of the scheme's continuation, against that of its own
and the bytes per phase (prefill, hand-off, decode per token).  This runs in the simulator (one
process): its tokens and bytes are the device processes' (tested); times on real links are measured
by `prism-edge bench generation --link` (prism_edge.bench).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import PrismConfig
from ..eval.variants import variant_config
from ..eval.tasks import heldout_prose
from ..runtime.generate import Generation, generate

CHAT = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about the sea.",
    "How do I boil an egg?",
    "Why is the sky blue?",
]


@dataclass(frozen=True)
class Case:
    kind: str  # news256, wiki1024, chat, ...
    ids: torch.Tensor  # (1, N)


@dataclass(frozen=True)
class Scheme:
    label: str
    cfg: PrismConfig
    decode: str = "auto"


def prose_prompts(tokenizer, source: str, length: int, count: int) -> list[torch.Tensor]:
    """`count` prompts of `length` tokens: consecutive windows of held-out prose, never overlapping."""
    ids = tokenizer("\n\n".join(heldout_prose(source)), return_tensors="pt")["input_ids"]
    return [ids[:, i * length:(i + 1) * length] for i in range(count)]


def cases(tokenizer, lengths=(256, 1024), per_source: int = 4, chat: int = 6) -> list[Case]:
    out = []
    for length in lengths:
        for source in ("lee", "wiki"):
            kind = f"{'news' if source == 'lee' else 'wiki'}{length}"
            out += [Case(kind, ids) for ids in prose_prompts(tokenizer, source, length, per_source)]
    for question in CHAT[:chat]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        out.append(Case("chat", tokenizer(text, return_tensors="pt")["input_ids"]))
    return out


def schemes(devices: int, cr: int, variants: list[str], modes: list[str]) -> list[Scheme]:
    out = [Scheme("full (1 device)", PrismConfig(devices=1, scheme="full"), "local"),
           Scheme(f"Voltage P={devices}", PrismConfig(devices=devices, scheme="voltage"), "local")]
    for spec in variants:  # "variant" (every mode) or "variant@mode"
        variant, _, only = spec.partition("@")
        cfg = variant_config(variant, devices, cr)
        out += [Scheme(f"{variant} P={devices} CR={cr} {mode}", cfg, mode) for mode in ([only] if only else modes)]
    return out


@torch.no_grad()
def continuation_nll(model, prompt: torch.Tensor, new: list[int]) -> float:
    """Mean negative log-likelihood the full model gives `new` after `prompt`."""
    ids = torch.cat([prompt, torch.tensor([new], dtype=prompt.dtype)], dim=1)
    logits = model(input_ids=ids).logits[0, prompt.shape[1] - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(new)))


def score(model, scheme: Scheme, case: Case, reference: Generation, new: int) -> dict:
    gen = generate(model, scheme.cfg, case.ids, max_new_tokens=new, decode=scheme.decode)
    ref = reference.new_ids
    n = min(len(ref), len(gen.new_ids))
    same = [a == b for a, b in zip(gen.new_ids, ref)]
    forced = generate(model, scheme.cfg, case.ids, max_new_tokens=len(ref), decode=gen.mode, teacher=ref,
                      keep_logits=True)
    tf = [int(lg.argmax()) == t for lg, t in zip(forced.logits, ref)]
    return {"kind": case.kind, "prompt_tokens": case.ids.shape[1], "mode": gen.mode,
            "agreement": sum(same) / max(1, len(ref)), "first_divergence": next((i for i, s in enumerate(same) if not s), n),
            "teacher_forced": sum(tf) / max(1, len(tf)),
            "continuation_ppl": math.exp(continuation_nll(model, case.ids, gen.new_ids)) if gen.new_ids else float("nan"),
            "reference_ppl": math.exp(continuation_nll(model, case.ids, ref)) if ref else float("nan"),
            **{f"bytes_{k}": v for k, v in gen.phases().items()}}


def summarise(results: dict[str, list[dict]], voltage_prefill: dict[str, float]) -> list[dict]:
    rows = []
    for label, runs in results.items():
        vp = statistics.mean(voltage_prefill[r["kind"] + str(r["prompt_tokens"])] or 1 for r in runs)
        rows.append({
            "scheme": label, "prompts": len(runs), "modes": sorted({r["mode"] for r in runs}),
            "agreement": statistics.mean(r["agreement"] for r in runs),
            "median_first_divergence": statistics.median(r["first_divergence"] for r in runs),
            "teacher_forced": statistics.mean(r["teacher_forced"] for r in runs),
            "continuation_ppl_ratio": statistics.mean(r["continuation_ppl"] / r["reference_ppl"] for r in runs),
            "prefill_bytes": statistics.mean(r["bytes_prefill"] for r in runs),
            "handoff_bytes": statistics.mean(r["bytes_handoff"] for r in runs),
            "bytes_per_token": statistics.mean(r["bytes_per_token"] for r in runs),
            "total_vs_voltage_prefill": statistics.mean(r["bytes_total"] for r in runs) / vp,
        })
    return rows


def table(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| scheme | agreement | median first divergence | teacher-forced | continuation "
             "ppl ÷ full's own | prefill bytes | hand-off bytes | bytes per token | all bytes ÷ Voltage prefill |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['agreement']:.3f} | {r['median_first_divergence']:g} | "
                     f"{r['teacher_forced']:.3f} | {r['continuation_ppl_ratio']:.3f} | {r['prefill_bytes']:,.0f} | "
                     f"{r['handoff_bytes']:,.0f} | {r['bytes_per_token']:,.0f} | {r['total_vs_voltage_prefill']:.3f} |")
    return "\n".join(lines) + "\n"


def main(out: Path, cache=None, devices=(4,), cr: int = 16, new: int = 64, lengths=(256, 1024),
         per_source: int = 4, chat: int = 6, variants=("defaults",), modes=("auto",), name: str | None = None) -> str:
    from ..models.loading import load_model

    torch.set_num_threads(1)
    loaded = load_model("smollm2", cache_dir=cache)
    model = loaded.model
    all_cases = cases(loaded.tokenizer, lengths, per_source, chat)
    texts = []
    for p in devices:
        plan = schemes(p, cr, list(variants), list(modes))
        results: dict[str, list[dict]] = {s.label: [] for s in plan}
        voltage_prefill: dict[str, float] = {}
        for case in tqdm(all_cases, desc=f"generation P={p}", dynamic_ncols=True):
            reference = generate(model, plan[0].cfg, case.ids, max_new_tokens=new)
            for s in plan:
                r = score(model, s, case, reference, new)
                results[s.label].append(r)
                if s.label.startswith("Voltage"):
                    voltage_prefill[case.kind + str(case.ids.shape[1])] = r["bytes_prefill"]
        rows = summarise(results, voltage_prefill)
        title = (f"Generation, SmolLM2-135M, P={p}, {len(all_cases)} prompts ({', '.join(sorted({c.kind for c in all_cases}))}), "
                 f"{new} greedy tokens")
        texts.append(table(rows, title))
        out.mkdir(parents=True, exist_ok=True)
        stem = f"generation-p{p}" + (f"-{name}" if name else "")
        (out / f"{stem}.json").write_text(json.dumps({"title": title, "rows": rows, "runs": results}, indent=1))
    text = "\n".join(texts)
    (out / ("generation" + (f"-{name}" if name else "") + ".md")).write_text(text)
    return text
