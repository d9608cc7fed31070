"""The commands that run in this one process: run, generate, eval, finetune, bench.

Each imports only what it needs when it runs (the command line itself stays light).  Environment
reads happen here, at the edge (env.cache_dir()), and are handed down as arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..models.loading import load_model
from ..cluster import env
from ..flags import config_from
from .report import fmt_bytes


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def cmd_run(args: argparse.Namespace) -> int:
    from ..eval.compare import compare
    from ..models import adapter_for
    from ..eval.requests import build_request

    cfg = config_from(args)
    _threads(args)
    _log(f"loading {args.model} ...")
    t0 = time.perf_counter()
    loaded = load_model(args.model, cache_dir=env.cache_dir())
    adapter = adapter_for(loaded.model)  # refuse unsupported models before tokenising
    inputs, labels = build_request(loaded, args.text, args.text_file, args.image, args.max_length)
    _log(f"loaded in {time.perf_counter() - t0:.1f} s; running full, Voltage and PRISM ...")
    report = compare(loaded.model, cfg, inputs, labels)
    if args.json:
        print(json.dumps(dataclasses.asdict(report), default=str, indent=1))
        return 0
    g = adapter.geometry
    print(f"model    {args.model}: {type(loaded.model).__name__}, {g.layers} layers, hidden {g.hidden}, "
          f"{g.heads} heads ({g.kv_heads} KV)")
    print(f"split    {cfg.resolve(adapter.kind).describe()}")
    print(f"input    {len(report.positions)} sequence(s), {min(report.positions)}-{max(report.positions)} positions")
    print("\nresult (PRISM against the unpartitioned model)")
    for line in report.details[: args.show]:
        print("  " + line)
    if len(report.details) > args.show:
        print(f"  ... {len(report.details) - args.show} more (--show N)")
    for name, value in report.quality.items():
        print(f"  {name:<38} {value:.4f}")
    print("\ncost per request            Voltage        PRISM          saved")
    print(f"  bytes between devices   {fmt_bytes(report.bytes['voltage']):>12}  {fmt_bytes(report.bytes['prism']):>12}"
          f"  {100 * report.saved(report.bytes):>6.1f} %")
    print(f"  busiest device GFLOPs   {report.max_flops['voltage'] / 1e9:>12.3f}  {report.max_flops['prism'] / 1e9:>12.3f}"
          f"  {100 * report.saved(report.max_flops):>6.1f} %")
    print(f"  (one device alone: {report.full_flops / 1e9:.3f} GFLOPs; perfect {cfg.devices}-way split "
          f"{report.full_flops / cfg.devices / 1e9:.3f})")
    return 0


class _Printer:
    """Prints each new token as it comes (decoding the whole tail keeps multi-byte characters whole)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, tid: int) -> None:
        self.ids.append(tid)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        print(text[len(self.shown):], end="", flush=True)
        self.shown = text


def cmd_generate(args: argparse.Namespace) -> int:
    from ..runtime.generate import Sampling, generate
    from ..eval.requests import check_ids, prompt_ids

    cfg = config_from(args, allow_auto=args.launch)
    if not args.launch and (args.plan or args.fidelity):
        raise ValueError("--plan and --fidelity choose among device processes: add --launch")
    _threads(args)
    sampling = Sampling(args.sample, args.temperature, args.top_k, args.top_p, args.seed)
    if args.max_new_tokens < 0:  # before loading a model: the prompt and the model are checked after
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.prompt.strip():
        raise ValueError("the prompt is empty; give some text to continue")
    _log(f"loading {args.model} ...")
    loaded = load_model(args.model, cache_dir=env.cache_dir())
    tok: Any = loaded.tokenizer
    if tok is None:
        raise ValueError(f"model {args.model!r} ships no tokenizer; generation needs one")
    ids = check_ids(prompt_ids(tok, args.prompt, chat=args.chat))
    stops = tuple(i for i in {getattr(tok, "eos_token_id", None), *args.stop_id} if isinstance(i, int))
    if not args.quiet_prompt:
        print(tok.decode(ids[0], skip_special_tokens=False) if args.chat else args.prompt, end="", flush=True)
    printer = _Printer(tok)
    t0 = time.perf_counter()
    if args.launch:  # real device processes: prefill over gloo, the last process decodes and streams ids back
        gen = _generate_on_cluster(args, cfg, ids, sampling, stops, printer)
    else:
        gen = generate(loaded.model, cfg, ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                       stop_ids=stops, on_token=printer, decode=args.decode)
    wall = time.perf_counter() - t0
    print()
    st = gen.prefill_stats
    _log(f"\n{len(gen.new_ids)} new tokens ({gen.stopped_by}) in {wall:.2f} s, {len(gen.new_ids) / wall:.1f} tokens/s "
         f"including prefill; prompt {ids.shape[1]} tokens on {_devices(gen, cfg)}, CR={cfg.effective_cr}; "
         f"prefill exchanged {fmt_bytes(st.total_bytes if st else 0)}; decode mode {gen.mode}: hand-off "
         f"{fmt_bytes(gen.handoff_bytes)}, {gen.decode_bytes_per_token:,.0f} B per token (new tokens join the last device)")
    return 0


def _devices(gen: Any, cfg: Any) -> str:
    """The devices the prefill ran on: the plan's (and which plan, when the planner chose it)."""
    planned = getattr(gen, "planned", None)
    devices = planned["devices"] if planned else cfg.effective_devices
    text = f"{devices} device{'s' if devices > 1 else ''}"
    if planned and planned.get("predicted_ms") is not None:
        text += f" (planned: predicted {planned['predicted_ms']:,.0f} ms, measured {planned['measured_ms']:,.0f})"
    return text


def _generate_on_cluster(args: argparse.Namespace, cfg: Any, ids: torch.Tensor, sampling: Any, stops: tuple[int, ...],
                         printer: _Printer) -> Any:
    from ..cluster import Cluster
    from ..flags import auto_weights

    with Cluster(args.model, cfg, threads=args.threads or 1, cache_dir=str(env.cache_dir()),
                 auto_weights=auto_weights(args), log=_log, plan=args.plan or "auto",
                 fidelity=args.fidelity or "high") as cluster:
        return cluster.generate(ids, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_ids=stops,
                                on_token=printer, decode=args.decode)


# the task options of `eval`, by the name a task's constructor reads them under
EVAL_FLAGS = {"length": "--length", "source": "--source", "data_dir": "--data-dir", "split": "--split",
              "config": "--cbt-config", "dataset": "--dataset", "batch_size": "--batch-size",
              "context_chars": "--context-chars"}


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval.harness import check_options, finetuned_variant, grid, make_task, markdown, write
    from ..eval.tasks import TASKS

    _threads(args)
    options = {name: getattr(args, flag[2:].replace("-", "_")) for name, flag in EVAL_FLAGS.items()}
    check_options(args.task, options, EVAL_FLAGS)  # before loading anything: unknown tasks, ignored options
    if any(not 0 < b <= 1 for b in args.budget or ()):
        raise ValueError(f"--budget takes fractions of Voltage's bytes above 0 and at most 1, got {args.budget}")
    model_name = args.model or TASKS[args.task].default_model
    if not model_name:
        raise ValueError(f"task {args.task} has no bundled model; pass --model (a classifier for that data set)")
    _log(f"loading {model_name} ...")
    task = make_task(args.task, load_model(model_name, cache_dir=env.cache_dir()), limit=args.limit, **options)
    _log(task.describe())
    args.variants = list(dict.fromkeys([*args.variants, *(f"defaults+budget{b:g}" for b in args.budget or ())]))
    rows = grid(task, Path(model_name).name, args.devices, args.cr, args.variants, voltage=args.voltage)
    for folder in args.finetuned or []:
        # at the fidelity options it was trained with (every variant of the grid if it was trained over random
        # splits), over the same grid of P and CR, with its own Voltage rows: a fine-tuned head may score
        # other items (e.g. the held-out quarter)
        variant, suffix = finetuned_variant(folder)
        variants = args.variants if variant is None else [variant]
        ft_task = make_task(args.task, load_model(folder, cache_dir=env.cache_dir()), limit=args.limit, **options)
        rows += grid(ft_task, Path(folder).name, args.devices, args.cr, variants, voltage=args.voltage,
                     label_suffix=suffix)
    stem = f"eval-{args.task}" + (f"-{args.name}" if args.name else "")
    meta = {"task": args.task, "model": model_name, "data": task.describe(), "limit": args.limit,
            "options": {k: v for k, v in options.items() if v is not None},
            "command": "prism-edge " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else None,
            "title": f"{args.task} ({task.data}), {Path(model_name).name}", "higher_is_better": task.higher_is_better}
    paths = write(rows, task.metric, Path(args.out), stem, meta)
    print(markdown(rows, task.metric))
    _log("written: " + ", ".join(str(p) for p in paths))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..config import PrismConfig
    from ..finetune import RECIPES, finetune
    from ..train import TRAINABLE, Splits, TrainConfig

    _threads(args)
    if args.task not in RECIPES:
        raise ValueError(f"no fine-tuning recipe for task {args.task!r}; choose one of {', '.join(RECIPES)}")
    if args.trainable is not None and args.trainable not in TRAINABLE:
        raise ValueError(f"--trainable must be one of {', '.join(TRAINABLE)}, got {args.trainable!r}")
    given = config_from(args)
    cfg: PrismConfig | Splits | None = None if given == PrismConfig() else given  # None: the recipe's own splits
    recipe = RECIPES[args.task]
    drawn = {"max_devices": args.max_devices, "crs": tuple(args.train_cr or ()) or None,
             "variants": tuple(args.train_variants or ()) or None}
    drawn = {k: v for k, v in drawn.items() if v is not None}
    if drawn:
        if cfg is not None:
            raise ValueError("give either one split (--devices / --cr / ...) or random splits (--max-devices / "
                             "--train-cr / --train-variants), not both")
        cfg = dataclasses.replace(recipe.splits or Splits(), **drawn)
    base = recipe.train
    steps = args.steps or base.steps
    tcfg = TrainConfig(steps=steps, lr=args.lr or base.lr, warmup=min(base.warmup, steps - 1),
                       trainable=args.trainable or base.trainable, lora_rank=args.lora_rank, seed=args.seed)
    model_name = args.model or recipe.model
    _log(f"loading {model_name} ...")
    loaded = load_model(model_name, cache_dir=env.cache_dir())
    finetune(args.task, loaded, cfg, tcfg, out=args.out, batch_size=args.batch_size, train_limit=args.train_limit,
             eval_limit=args.eval_limit, log=_log, objective=args.objective, alpha=args.alpha,
             checkpoint_every=args.checkpoint_every)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """`prism-edge bench BENCH`: the bench's options from its flags, then its main(options, cache)."""
    from ..bench.options import BENCHES

    options = BENCHES[args.bench].from_args(args)
    text = importlib.import_module(options.entry).main(options, cache=env.cache_dir())
    print(text)
    _log(f"results written to {options.out}/")
    return 0
