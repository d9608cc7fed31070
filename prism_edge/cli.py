"""`prism-edge`: the command line.  The only place that reads the environment.

  prism-edge launch              the bundled default: real MiniLM-L6 across 4 local device processes
  prism-edge launch --serve 127.0.0.1:8000    keep the devices up and serve JSON over HTTP
  prism-edge worker --rank R --world-size W --master HOST:PORT    one device of a multi-machine group
  prism-edge run                 the in-process simulator: full vs Voltage vs PRISM on the same input
  prism-edge generate "prompt"   stream text from SmolLM2 split across devices (prefill + KV-cache decode)
  prism-edge run --model smollm2 --cr 4
  prism-edge eval --task lee      accuracy against compression on real data (grid of P, CR, fidelity options)
  prism-edge finetune --task fashion --out DIR   PRISM-aware fine-tuning through the partitioned forward
  prism-edge bench schemes --link wifi slow   PRISM vs Voltage vs tensor parallelism vs one device
  prism-edge bench targets       bytes vs 1/CR, FLOPs vs a perfect split, accuracy at equal bytes (plot)
  prism-edge bench overhead      simulator overhead against a plain HF forward
  prism-edge bench runtime --link wifi   multi-process wall time and bytes; overlap on an emulated link
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from pathlib import Path

from .config import GROUPINGS, PAYLOADS, SCHEMES, WIRE_DTYPES, PrismConfig

CHOICES = {"scheme": SCHEMES, "payload": PAYLOADS, "wire_dtype": WIRE_DTYPES, "grouping": GROUPINGS}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, non-zero exit
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cache_dir() -> Path:
    root = os.environ.get("PRISM_EDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "prism-edge")
    return Path(root)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per PrismConfig field; the defaults live in the dataclass only (None: the model kind's)."""
    hints = typing.get_type_hints(PrismConfig)
    for f in dataclasses.fields(PrismConfig):
        flag, kw = "--" + f.name.replace("_", "-"), {"help": f.metadata.get("help"), "default": f.default}
        hint = hints[f.name]
        base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        kind = base[0]
        if f.default is None and f.name != "weights":
            kw["help"] += " (default: the model kind's, see docs/RESULTS.md)"
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float):
            kw["type"] = kind
        elif kind is str:
            kw["choices"] = CHOICES.get(f.name)
        else:  # tuples: weights (float) and sink_token_ids (int)
            kw.update(nargs="+", type=float if f.name == "weights" else int)
        parser.add_argument(flag, dest=f.name, **kw)


def config_from(args: argparse.Namespace) -> PrismConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PrismConfig)}
    for name in ("weights", "sink_token_ids"):
        if values[name] is not None:
            values[name] = tuple(values[name])
    return PrismConfig(**values)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1000
    return str(n)


def _inputs(loaded, args):
    """Tokenised built-in texts (or --text / --text-file), or an image for ViT."""
    from .eval.data import builtin_texts
    from .models.loading import IMAGE_TYPES

    family = loaded.model.config.model_type
    if family in IMAGE_TYPES:
        from PIL import Image

        from .eval.tasks import image_pixels

        cfg = loaded.model.config
        if not args.image and getattr(cfg, "num_channels", 3) == 1 and getattr(cfg, "image_size", 0) == 28:
            from .eval.data import FASHION_MNIST_CLASSES, fashion_mnist, fashion_pixels

            images, labels = fashion_mnist("test")  # the bundled ViT's default request: 8 test images
            return {"pixel_values": fashion_pixels(images[:8])}, [
                f"test image {i} ({FASHION_MNIST_CLASSES[int(y)]})" for i, y in enumerate(labels[:8])]
        if not args.image:
            raise ValueError(f"{family} models need an image: pass --image PATH")
        images = [Image.open(p) for p in args.image]
        return {"pixel_values": image_pixels(loaded, images)}, [Path(p).name for p in args.image]
    texts = list(args.text or [])
    if args.text_file:
        lines = Path(args.text_file).read_text(encoding="utf-8").splitlines()
        texts += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    texts = texts or builtin_texts()
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(f"model {loaded.name!r} ships no tokenizer, so it cannot read text; use a checkpoint with "
                         "one, or the Python API with input_ids")
    if family in ("gpt2", "llama"):
        texts = ["\n".join(texts)]  # a decoder reads one document: the texts joined
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    enc = tok(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}, texts


def builtin_request(loaded, max_length: int) -> dict:
    """The request `prism-edge launch` / `worker` build by default (the built-in texts), for benches to reuse."""
    from types import SimpleNamespace

    inputs, _ = _inputs(loaded, SimpleNamespace(text=None, text_file=None, image=None, max_length=max_length))
    return inputs


def cmd_run(args) -> int:
    import torch

    from .eval.compare import compare
    from .models import adapter_for
    from .models.loading import load_model

    cfg = config_from(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    loaded = load_model(args.model, cache_dir=cache_dir())
    adapter_for(loaded.model)  # refuse unsupported models before tokenising
    inputs, labels = _inputs(loaded, args)
    print(f"loaded in {time.perf_counter() - t0:.1f} s; running full, Voltage and PRISM ...", file=sys.stderr, flush=True)
    report = compare(loaded.model, cfg, inputs, labels)
    g = adapter_for(loaded.model).geometry
    if args.json:
        print(json.dumps(dataclasses.asdict(report), default=str, indent=1))
        return 0
    print(f"model    {args.model}: {type(loaded.model).__name__}, {g.layers} layers, hidden {g.hidden}, "
          f"{g.heads} heads ({g.kv_heads} KV)")
    print(f"split    {cfg.resolved(adapter_for(loaded.model).kind).describe()}")
    print(f"input    {len(report.positions)} sequence(s), {min(report.positions)}-{max(report.positions)} positions")
    print("\nresult (PRISM against the unpartitioned model)")
    for line in report.details[: args.show]:
        print("  " + line)
    if len(report.details) > args.show:
        print(f"  ... {len(report.details) - args.show} more (--show N)")
    for name, value in report.quality.items():
        print(f"  {name:<38} {value:.4f}")
    print("\ncost per request            Voltage        PRISM          saved")
    print(f"  bytes between devices   {_fmt_bytes(report.bytes['voltage']):>12}  {_fmt_bytes(report.bytes['prism']):>12}"
          f"  {100 * report.saved(report.bytes):>6.1f} %")
    print(f"  busiest device GFLOPs   {report.max_flops['voltage'] / 1e9:>12.3f}  {report.max_flops['prism'] / 1e9:>12.3f}"
          f"  {100 * report.saved(report.max_flops):>6.1f} %")
    print(f"  (one device alone: {report.full_flops / 1e9:.3f} GFLOPs; perfect {cfg.devices}-way split "
          f"{report.full_flops / cfg.devices / 1e9:.3f})")
    return 0


def cmd_generate(args) -> int:
    import torch

    from .models.loading import load_model
    from .runtime.generate import Sampling, generate

    cfg = config_from(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    sampling = Sampling(args.sample, args.temperature, args.top_k, args.top_p, args.seed)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    loaded = load_model(args.model, cache_dir=cache_dir())
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(f"model {args.model!r} ships no tokenizer; generation needs one")
    prompt = args.prompt
    if args.chat and getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=not args.chat)["input_ids"]
    stops = tuple(i for i in {getattr(tok, "eos_token_id", None), *args.stop_id} if isinstance(i, int))
    shown = ""
    new: list[int] = []

    def stream(tid: int) -> None:  # print each token as it comes (decoding the whole tail keeps UTF-8 whole)
        nonlocal shown
        new.append(tid)
        text = tok.decode(new, skip_special_tokens=True)
        print(text[len(shown):], end="", flush=True)
        shown = text

    if not args.quiet_prompt:
        print(prompt, end="", flush=True)
    t0 = time.perf_counter()
    if args.launch:  # real device processes: prefill over gloo, the last process decodes and streams ids back
        from .runtime.cluster import Cluster

        with Cluster(args.model, cfg, threads=args.threads or 1, cache_dir=cache_dir(),
                     log=lambda m: print(m, file=sys.stderr, flush=True)) as cluster:
            t0 = time.perf_counter()
            gen = cluster.generate(ids, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_ids=stops,
                                   on_token=stream)
    else:
        gen = generate(loaded.model, cfg, ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                       stop_ids=stops, on_token=stream)
    wall = time.perf_counter() - t0
    print()
    st = gen.prefill_stats
    print(f"\n{len(gen.new_ids)} new tokens ({gen.stopped_by}) in {wall:.2f} s, {len(gen.new_ids) / wall:.1f} tokens/s "
          f"including prefill; prompt {ids.shape[1]} tokens over {cfg.effective_devices} devices, CR={cfg.effective_cr}; "
          f"prefill exchanged {_fmt_bytes(st.total_bytes)}; decode: {gen.decode_bytes_per_token} B per token "
          "(new tokens stay on the last device)", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    out = Path(args.out)
    if args.what == "generation":
        from .bench.generation import main as generation

        print(generation(out, cache_dir()))
    elif args.what == "targets":
        from .bench.targets import main as targets

        print(targets(out, cache_dir()))
    elif args.what == "schemes":
        from .bench.schemes import DEFAULT_SCHEMES, main as schemes

        print(schemes(args.model, out, args.link, args.devices or 2, args.schemes or list(DEFAULT_SCHEMES),
                      5 if args.repeats == 20 else args.repeats, args.length, cache_dir()))
    elif args.what == "runtime":
        from .bench.runtime import main as runtime

        print(runtime(args.model, out, args.device_counts, args.cr, args.repeats, args.length, args.link, args.rounds,
                      cache_dir()))
    elif args.what == "overhead":
        from .bench.overhead import main as overhead

        print(overhead(args.model, out, repeats=args.repeats, length=args.length, cache=cache_dir()))
    else:
        raise ValueError(f"unknown bench {args.what!r}")
    print(f"results written to {out}/", file=sys.stderr)
    return 0


def _task_options(args) -> dict:
    return {"length": args.length, "source": args.source, "data_dir": args.data_dir, "split": args.split,
            "config": args.cbt_config, "dataset": args.dataset, "batch_size": args.batch_size,
            "context_chars": args.context_chars}


def cmd_eval(args) -> int:
    import torch

    from .eval.harness import finetuned_variant, grid, make_task, markdown, write
    from .eval.tasks import TASKS
    from .models.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    task_cls = TASKS[args.task]
    model_name = args.model or task_cls.default_model
    if not model_name:
        raise ValueError(f"task {args.task} has no bundled model; pass --model (a classifier for that data set)")
    options = _task_options(args)
    print(f"loading {model_name} ...", file=sys.stderr, flush=True)
    loaded = load_model(model_name, cache_dir=cache_dir())
    task = make_task(args.task, loaded, limit=args.limit, **options)
    print(task.describe(), file=sys.stderr, flush=True)
    rows = grid(task, Path(model_name).name, args.devices, args.cr, args.variants, voltage=args.voltage)
    for folder in args.finetuned or []:
        # at the fidelity options it was trained with, over the same grid of P and CR, with its own
        # Voltage rows: a fine-tuned head may score other items (e.g. the held-out quarter)
        variant, suffix = finetuned_variant(folder)
        ft_task = make_task(args.task, load_model(folder, cache_dir=cache_dir()), limit=args.limit, **options)
        rows += grid(ft_task, Path(folder).name, args.devices, args.cr, [variant], voltage=args.voltage,
                     label_suffix=suffix)
    stem = f"eval-{args.task}" + (f"-{args.name}" if args.name else "")
    meta = {"task": args.task, "model": model_name, "data": task.describe(), "limit": args.limit,
            "command": "prism-edge " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else None,
            "title": f"{args.task} ({task.data}), {Path(model_name).name}", "higher_is_better": task.higher_is_better}
    paths = write(rows, task.metric, Path(args.out), stem, meta)
    print(markdown(rows, task.metric))
    print("written: " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def cmd_finetune(args) -> int:
    import torch

    from .finetune import RECIPES, finetune
    from .models.loading import load_model
    from .train import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from(args)
    recipe = RECIPES[args.task]
    base = recipe.train
    tcfg = TrainConfig(steps=args.steps or base.steps, lr=args.lr or base.lr, warmup=min(base.warmup,
                       (args.steps or base.steps) - 1), trainable=args.trainable or base.trainable,
                       lora_rank=args.lora_rank, seed=args.seed)
    model_name = args.model or recipe.model
    print(f"loading {model_name} ...", file=sys.stderr, flush=True)
    loaded = load_model(model_name, cache_dir=cache_dir())
    finetune(args.task, loaded, cfg, tcfg, out=args.out, batch_size=args.batch_size, train_limit=args.train_limit,
             eval_limit=args.eval_limit, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="prism-edge", description="Run one Transformer across several devices with PRISM.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = sub.add_parser("run", help="run a model split across devices (simulator) and compare with Voltage")
    run.add_argument("--model", default="minilm", help="alias (minilm, smollm2), hub name or local folder")
    run.add_argument("--text", action="append", help="input text (repeatable); default: built-in texts")
    run.add_argument("--text-file", help="file with one input text per line (lines starting with # skipped)")
    run.add_argument("--image", nargs="+", help="image file(s) for ViT models")
    run.add_argument("--max-length", type=int, default=512, help="truncate inputs to this many tokens")
    run.add_argument("--show", type=int, default=6, help="result lines to print")
    run.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    add_config_flags(run)
    run.set_defaults(fn=cmd_run)

    from .launch import add_request_flags, add_runtime_flags, cmd_launch, cmd_worker

    gen = sub.add_parser("generate", help="generate text with a decoder split across devices, streaming")
    gen.add_argument("prompt", nargs="?", default="The river burst its banks after three days of rain, and",
                     help="the prompt (default: a built-in news sentence)")
    gen.add_argument("--model", default="smollm2", help="a causal LM: alias (smollm2), hub name or local folder")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    gen.add_argument("--stop-id", type=int, nargs="*", default=[], help="extra stop token ids (EOS always stops)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--quiet-prompt", action="store_true", help="print only the generated text")
    gen.add_argument("--launch", action="store_true",
                     help="run on real local device processes (multi-process runtime) instead of the simulator")
    gen.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_config_flags(gen)
    gen.set_defaults(fn=cmd_generate)

    launch = sub.add_parser("launch", help="start one process per device on this machine and run requests")
    launch.add_argument("--model", default="minilm", help="alias (minilm, smollm2), hub name or local folder")
    add_request_flags(launch)
    add_runtime_flags(launch)
    add_config_flags(launch)
    launch.set_defaults(fn=cmd_launch)

    worker = sub.add_parser("worker", help="one device process of a group (also: python -m prism_edge.worker)")
    worker.add_argument("--rank", type=int, help="this device's rank (default: $RANK, as set by torchrun)")
    worker.add_argument("--world-size", type=int, help="number of devices (default: $WORLD_SIZE)")
    worker.add_argument("--master", help="rank 0's HOST:PORT (default: $MASTER_ADDR:$MASTER_PORT)")
    worker.add_argument("--bind", help="local address whose interface gloo uses (default: the hostname's)")
    worker.add_argument("--iface", help="network interface gloo uses, e.g. eth0 (like GLOO_SOCKET_IFNAME)")
    worker.add_argument("--model", default="minilm", help="alias (minilm, smollm2), hub name or local folder")
    worker.add_argument("--verbose", action="store_true", help="log each worker's shutdown")
    add_request_flags(worker)
    add_runtime_flags(worker)
    add_config_flags(worker)
    worker.set_defaults(fn=cmd_worker, devices=None)

    from .eval.harness import VARIANTS
    from .eval.tasks import TASKS
    from .finetune import RECIPES
    from .train import TRAINABLE

    ev = sub.add_parser("eval", help="accuracy against compression: a task over a grid of P, CR and fidelity options")
    ev.add_argument("--task", required=True, choices=list(TASKS), help="what to score (see docs/RESULTS.md)")
    ev.add_argument("--model", help="alias, hub name or folder (default: the task's bundled model)")
    ev.add_argument("--devices", type=int, nargs="+", default=[2, 4], help="device counts of the grid")
    ev.add_argument("--cr", type=int, nargs="+", default=[4, 16, 64, 128], help="compression rates of the grid")
    ev.add_argument("--variants", nargs="+", default=["plain", "sinks", "sinks+w32", "defaults"],
                    help="fidelity options, each a named variant (" + ", ".join(VARIANTS) + ") or tokens joined "
                    "by + (sinks, bias, sim, cheap, fp16, bf16, int8, wN, wfF, anchorN, topN, topfF; see "
                    "prism_edge/eval/harness.py); defaults = the model kind's defaults")
    ev.add_argument("--finetuned", action="append", help="a folder from `prism-edge finetune` to score on the same "
                    "grid (repeatable)")
    ev.add_argument("--limit", type=int, help="items to score (documents, chunks, images, questions)")
    ev.add_argument("--length", type=int, help="perplexity: tokens per chunk (default 512)")
    ev.add_argument("--source", choices=["lee", "wiki"], help="perplexity: which prose (default lee)")
    ev.add_argument("--data-dir", help="local copy of the data set (see eval/datasets.py for the layout)")
    ev.add_argument("--split", help="data set split (default: validation / test)")
    ev.add_argument("--cbt-config", help="cbt: CN, NE, P or V (default CN)")
    ev.add_argument("--context-chars", type=int, help="cloze: longest context, in characters (default 1500)")
    ev.add_argument("--dataset", help="samples: which sample set (imagenet, cifar10, cifar100, fashionMNIST, mnist)")
    ev.add_argument("--batch-size", type=int, help="items per forward")
    ev.add_argument("--voltage", action=argparse.BooleanOptionalAction, default=True,
                    help="also run Voltage per device count (exact; the bytes baseline)")
    ev.add_argument("--name", help="suffix for the output files")
    ev.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ev.add_argument("--out", default="results", help="folder for CSV / JSON / Markdown / PNG")
    ev.set_defaults(fn=cmd_eval)

    ft = sub.add_parser("finetune", help="PRISM-aware fine-tuning: train through the partitioned forward")
    ft.add_argument("--task", required=True, choices=list(RECIPES), help="recipe (data, loss, held-out score)")
    ft.add_argument("--model", help="starting model (default: the recipe's)")
    ft.add_argument("--out", required=True, help="folder to save the fine-tuned checkpoint (safetensors)")
    ft.add_argument("--steps", type=int, help="optimiser steps (default: the recipe's)")
    ft.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    ft.add_argument("--batch-size", type=int, help="items per step (default: the recipe's)")
    ft.add_argument("--trainable", choices=TRAINABLE, help="which weights move (default: the recipe's)")
    ft.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA updates (--trainable lora)")
    ft.add_argument("--train-limit", type=int, help="use only this many training items")
    ft.add_argument("--eval-limit", type=int, help="held-out items scored before and after")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_config_flags(ft)
    ft.set_defaults(fn=cmd_finetune)

    bench = sub.add_parser("bench", help="benchmarks that print a table and write results")
    bench.add_argument("what", choices=("schemes", "targets", "generation", "overhead", "runtime"))
    bench.add_argument("--out", default="results", help="folder for the JSON/markdown results")
    bench.add_argument("--model", default="minilm", help="overhead: model alias or path")
    bench.add_argument("--repeats", type=int, default=20, help="overhead: timed repeats per variant")
    bench.add_argument("--length", type=int, default=128, help="tokens per sequence")
    bench.add_argument("--devices", type=int, default=None, help="devices (schemes: 2)")
    bench.add_argument("--schemes", nargs="+",
                       help="schemes: full, voltage, tp, prism:CR[:VARIANT] (VARIANT as in eval --variants, e.g. prism:128:plain, "
                            "prism:16:fp16; default: a standard set)")
    bench.add_argument("--device-counts", type=int, nargs="+", default=[1, 2, 4], help="runtime: device counts")
    bench.add_argument("--cr", type=int, default=16, help="runtime: compression rate")
    bench.add_argument("--link", nargs="*", default=[],
                       help="schemes: links to bench on (loopback, wifi, slow, lan or RATEmbit[,DELAYms]; emulated "
                            "links need root); runtime: also measure overlap on these links")
    bench.add_argument("--rounds", type=int, default=3, help="runtime: interleaved overlap on/off runs")
    bench.set_defaults(fn=cmd_bench)
    return parser


def main(argv: list[str] | None = None, hard_exit: bool | None = None) -> int:
    """The CLI.  hard_exit (default: when reading sys.argv) ends launch/worker processes with os._exit."""
    args = build_parser().parse_args(argv)
    if args.command in ("launch", "worker") and (argv is None if hard_exit is None else hard_exit):
        # device processes leave at once when done: torch's C++ runtime can abort in its static destructors
        # after a distributed run ("terminate called without an active exception"), turning success into 134
        code = _run(args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return _run(args)


def _run(args) -> int:
    from .runtime.cluster import ClusterError
    from .runtime.transport import DeviceLost

    try:
        return args.fn(args)
    except (DeviceLost, ClusterError) as err:
        print(f"prism-edge: error: {err}", file=sys.stderr)
        return 3
    except ValueError as err:
        print(f"prism-edge: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # unreadable --text-file / --image and the like
        print(f"prism-edge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prism-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
