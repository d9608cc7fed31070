"""`prism-edge bench generation`: a decoder split across devices, against one device and Voltage.

Both paths take the same GenerationOptions (bench/options.py), so they have the same defaults; each
runs one device, Voltage and every PRISM variant (at --cr, in each decode mode) per device count P.

Without --link: fidelity and bytes, in the simulator (one process; its tokens and bytes are the device
processes', tested).  Prompts: held-out Lee background news and Wikipedia prose cut to each length, and
short chat questions (chat template).  For every scheme and prompt, greedy decoding of `new` tokens,
scored against the full model's own greedy continuation:
  agreement        fraction of positions whose token equals the full model's (position by position,
                   so an early divergence costs the rest)
  first divergence tokens until the first difference (median over prompts; `new` when none)
  teacher-forced   fraction of steps whose next token matches the full model's when both are fed the
                   full model's continuation (how often a single step goes wrong)
  continuation ppl the full model's perplexity of the scheme's continuation, against that of its own
and the bytes per phase (prefill, hand-off, decode per token).

With --link: time to first token and tokens per second of real device processes on each link.  Every
scheme runs as P processes (one network namespace each with an emulated link, see bench/links.py;
loopback without root or for `--link loopback`): rank 0 is `python -m prism_edge.bench.generation
--rank0 ...` (a Cluster that joins the others and times its generations), the others are plain
`prism-edge worker` processes.  Prompts are held-out news cut to each length; greedy decoding; the
first generation of a group warms it up and is not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from ..config import PrismConfig
from ..cluster.spec import LaunchSpec
from ..eval.variants import variant_config
from ..eval.tasks import heldout_prose
from ..runtime.generate import Generation, generate
from .common import Placement, free_port, rank0_args, run_ranks
from .options import GenerationOptions

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


def cases(tokenizer, lengths: tuple[int, ...], per_source: int, chat: int) -> list[Case]:
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
    """One device, Voltage, then each variant at `cr` in each decode mode ("variant@mode": that mode only)."""
    out = [Scheme("full (1 device)", PrismConfig(devices=1, scheme="full"), "local"),
           Scheme(f"Voltage P={devices}", PrismConfig(devices=devices, scheme="voltage"), "local")]
    for spec in variants:  # "variant" (every mode) or "variant@mode"
        variant, _, only = spec.partition("@")
        cfg = variant_config(variant, devices, cr)
        out += [Scheme(f"{variant} P={devices} CR={cr} {mode}", cfg, mode) for mode in ([only] if only else modes)]
    return out


# ---------------------------------------------------------------------- without --link: fidelity in the simulator

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


def fidelity_table(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| scheme | agreement | median first divergence | teacher-forced | continuation "
             "ppl ÷ full's own | prefill bytes | hand-off bytes | bytes per token | all bytes ÷ Voltage prefill |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['agreement']:.3f} | {r['median_first_divergence']:g} | "
                     f"{r['teacher_forced']:.3f} | {r['continuation_ppl_ratio']:.3f} | {r['prefill_bytes']:,.0f} | "
                     f"{r['handoff_bytes']:,.0f} | {r['bytes_per_token']:,.0f} | {r['total_vs_voltage_prefill']:.3f} |")
    return "\n".join(lines) + "\n"


def fidelity(options: GenerationOptions, cache: Any = None) -> str:
    """Without --link: tokens and bytes of every scheme against the full model's, in the simulator."""
    from ..models.loading import load_model

    torch.set_num_threads(1)
    loaded = load_model(options.model, cache_dir=cache)
    model, new, suffix = loaded.model, options.new_tokens, _suffix(options)
    all_cases = cases(loaded.tokenizer, options.prompt_lengths, options.prompts, options.chat_prompts)
    texts = []
    for p in options.devices:
        plan = schemes(p, options.cr, list(options.variants), list(options.modes))
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
        title = (f"Generation, {options.model}, P={p}, {len(all_cases)} prompts "
                 f"({', '.join(sorted({c.kind for c in all_cases}))}), {new} greedy tokens")
        texts.append(fidelity_table(rows, title))
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / f"generation-p{p}{suffix}.json").write_text(
            json.dumps({"title": title, "rows": rows, "runs": results}, indent=1))
    text = "\n".join(texts)
    (options.out / f"generation{suffix}.md").write_text(text)
    return text


def _suffix(options: GenerationOptions) -> str:
    return f"-{options.name}" if options.name else ""


# ---------------------------------------------------------------------- with --link: real device processes

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


def run_scheme(place: Placement, model: str, cfg: PrismConfig, decode: str, link: Any, length: int, count: int,
               new: int, cache: Any) -> dict:
    """One group of P processes (rank 0 times `count` prompts after a warm-up): medians and mean bytes."""
    world = cfg.effective_devices
    master = f"{place.address(0)}:{free_port()}"
    spec = LaunchSpec(model=model, cache_dir=str(cache) if cache else None, threads=1, timeout=120,
                      startup_timeout=600)
    config = json.dumps(dataclasses.asdict(cfg))
    head = [sys.executable, "-m", "prism_edge.bench.generation", "--rank0", "--config", config, "--master", master,
            "--bind", place.address(0), "--model", model, "--length", str(length), "--count", str(count),
            "--new", str(new), "--decode", decode, "--mbit", str(link.rate_mbit if link else 1e4),
            "--ms", str(link.delay_ms if link else 0.0)] + (["--cache-dir", str(cache)] if cache else [])
    commands = [head] + [spec.worker_command(cfg, r, world, master, place.address(r)) for r in range(1, world)]
    rows = json.loads(run_ranks(place, commands, timeout=3600))
    return {"ttft_s": statistics.median(r["ttft_s"] for r in rows), "tok_s": statistics.median(r["tok_s"] for r in rows),
            "mode": rows[0]["mode"], "prefill_bytes": statistics.mean(r["bytes"]["prefill"] for r in rows),
            "handoff_bytes": statistics.mean(r["bytes"]["handoff"] for r in rows),
            "bytes_per_token": statistics.mean(r["bytes"]["per_token"] for r in rows)}


def timed(options: GenerationOptions, cache: Any = None) -> str:
    """With --link: time to first token and tokens per second of device processes, per link, P and length."""
    from .links import EmulatedNetwork, available, parse_link

    ok, why = available()
    texts, result = [], []
    for name in options.link:
        emulate = ok and name != "loopback"
        net = EmulatedNetwork(max(options.devices), parse_link(name), allow_no_delay=True).open() if emulate else None
        note = name if net is not None or name == "loopback" else f"loopback ({why})"
        try:
            for p in options.devices:
                for length in options.prompt_lengths:
                    rows = _timed_rows(options, Placement(net), net.link if net else None, note, p, length, cache)
                    result += rows
                    texts.append(_timed_table(rows, f"Generation on {note}, {options.model}, P={p}, {length}-token "
                                                    f"prompts, {options.new_tokens} greedy tokens, median of "
                                                    f"{options.prompts} prompts"))
        finally:
            if net is not None:
                net.close()
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / f"generation-timed{_suffix(options)}.json").write_text(json.dumps(result, indent=1))
    text = "\n".join(texts)
    (options.out / f"generation-timed{_suffix(options)}.md").write_text(text)
    return text


def _timed_rows(options: GenerationOptions, place: Placement, link: Any, note: str, devices: int, length: int,
                cache: Any) -> list[dict]:
    rows = []
    for s in tqdm(schemes(devices, options.cr, list(options.variants), list(options.modes)),
                  desc=f"{note} P={devices} {length}"):
        r = run_scheme(place, options.model, s.cfg, s.decode, link, length, options.prompts, options.new_tokens,
                       cache)
        rows.append({"scheme": s.label, "link": note, "devices": devices, "prompt_tokens": length, **r})
    return rows


def _timed_table(rows: list[dict], title: str) -> str:
    base = rows[0]  # one device
    lines = [f"### {title}", "", "| scheme | decode | time to first token | vs one device | tokens/s | prefill bytes | "
             "hand-off bytes | bytes per token |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['mode']} | {r['ttft_s'] * 1e3:.0f} ms | {base['ttft_s'] / r['ttft_s']:.2f}x | "
                     f"{r['tok_s']:.1f} | {r['prefill_bytes']:,.0f} | {r['handoff_bytes']:,.0f} | "
                     f"{r['bytes_per_token']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(options: GenerationOptions, cache: Any = None) -> str:
    """`prism-edge bench generation`: times on device processes with --link, else fidelity in the simulator."""
    return timed(options, cache) if options.link else fidelity(options, cache)


def _args(argv: list[str]) -> argparse.Namespace:
    """Rank 0's own flags (bench.common.rank0_args)."""
    return rank0_args(argv, ("config", "master", "bind", "model", "decode", "cache-dir"), ("length", "count", "new"))


if __name__ == "__main__":
    rank0(_args(sys.argv[1:]))
