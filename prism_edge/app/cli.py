"""`prism-edge`: the command line.

  prism-edge launch              the bundled default: real MiniLM-L6 across 4 local device processes
  prism-edge launch --serve 127.0.0.1:8000    keep the devices up and serve HTTP (JSON and OpenAI-compatible)
  prism-edge plan --model M --devices P   probe the devices and links; each candidate plan's predicted time
  prism-edge worker --rank R --world-size W --master HOST:PORT    one device of a multi-machine group
  prism-edge run                 the in-process simulator: full vs Voltage vs PRISM on the same input
  prism-edge generate "prompt"   stream text from SmolLM2 split across devices (prefill + KV-cache decode)
  prism-edge eval --task lee      accuracy against compression on real data (grid of P, CR, fidelity options)
  prism-edge finetune --task fashion --out DIR   PRISM-aware fine-tuning through the partitioned forward
  prism-edge bench schemes --link wifi slow   PRISM vs Voltage vs tensor parallelism vs one device
  prism-edge bench hetero        one of two devices at half speed: equal slices vs --weights auto
                                 (every bench a subcommand with its own flags: prism-edge bench --help)

This module holds argument tables only and imports nothing heavy: each command's code (and torch)
loads when the command runs, so `--help` and a mistyped flag answer at once.  Choices that live in
heavy modules (task names, recipes) are checked by the command itself, with a one-line error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import typing

from ..runtime.modes import DECODE_MODES, OUTPUT_MODES
from ..cluster.env import DEBUG_ENV
from ..bench.options import BENCHES, benches_with
from ..flags import add_config_flags
from ..cluster.spec import LaunchSpec
from .serve.options import ServeOptions


class Terminated(Exception):
    """SIGTERM reached a command that stops gracefully (launch --serve): it exits 143 once everything is down."""


# the command line plans each request (the Python API's Cluster runs its config unless asked: plan="auto")
COMMAND_DEFAULTS = {"plan": "auto"}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, non-zero exit
        hint = "" if message.endswith("--help)") else f" (see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")

    def parse_args(self, args: typing.Any = None, namespace: typing.Any = None) -> typing.Any:
        """argparse's, with a flag of another bench named as such (`bench runtime --trials 3`)."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(_unrecognized(parsed, extra))
        return parsed


def _unrecognized(args: argparse.Namespace, extra: list[str]) -> str:
    """argparse's message, and for a bench the benches that do have each flag it does not."""
    text = f"unrecognized arguments: {' '.join(extra)}"
    bench = getattr(args, "bench", None) if getattr(args, "command", None) == "bench" else None
    for flag in dict.fromkeys(a.split("=")[0] for a in extra if a.startswith("--")):
        owners = benches_with(flag)
        if bench and owners:
            names = ", ".join(owners[:-1]) + " and " + owners[-1] if len(owners) > 1 else owners[0]
            text += f"; {flag} is a flag of bench {names}, not of bench {bench}"
    return text + (f" (see prism-edge bench {bench} --help)" if bench else "")


def _command(parser: argparse.ArgumentParser, target: str) -> None:
    """The command's code as "module:function", imported only when it runs."""
    parser.set_defaults(fn=target)


def add_input_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", action="append", help="input text (repeatable); default: built-in texts")
    parser.add_argument("--text-file", help="file with one input text per line (lines starting with # skipped)")
    parser.add_argument("--image", nargs="+", help="image file(s) for ViT models")
    parser.add_argument("--max-length", type=int, default=512, help="truncate inputs to this many tokens")
    parser.add_argument("--show", type=int, default=6, help="result lines to print")


def add_request_flags(parser: argparse.ArgumentParser) -> None:
    add_input_flags(parser)
    parser.add_argument("--outputs", choices=OUTPUT_MODES,
                        help="what comes back to rank 0 (default: mean for encoders, last for LMs, pooled for "
                             "classifiers)")
    parser.add_argument("--repeat", type=int, default=1, help="run the request this many times (median wall time)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--serve", metavar="HOST:PORT", help="serve HTTP (JSON and OpenAI-compatible) instead of "
                        "running one request")
    ServeOptions.add_flags(parser.add_argument_group("serving (with --serve)"))


def _threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def _simulator_commands(sub: typing.Any) -> None:
    run = sub.add_parser("run", help="run a model split across devices (simulator) and compare with Voltage")
    run.add_argument("--model", default="minilm", help="alias (minilm, smollm2), hub name or local folder")
    add_input_flags(run)
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    _threads(run)
    add_config_flags(run)
    _command(run, "prism_edge.app.commands:cmd_run")

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
    gen.add_argument("--decode", default="auto", choices=DECODE_MODES,
                     help="what new tokens see of the earlier devices' positions: local (what the last device received "
                     "at prefill), handoff (their K/V once), distributed (a query per token and layer) or auto (by a "
                     "cost model; runtime/decode.py)")
    gen.add_argument("--launch", action="store_true",
                     help="run on real local device processes (multi-process runtime) instead of the simulator")
    gen.add_argument("--plan", choices=("auto", "fixed"),
                     help="with --launch: auto (the default) probes the devices and runs the prefill on the plan "
                     "predicted fastest; fixed runs the config on every device")
    gen.add_argument("--fidelity", help="with --launch --plan auto: exact, high (default), balanced or a byte budget")
    _threads(gen)
    add_config_flags(gen)
    _command(gen, "prism_edge.app.commands:cmd_generate")


def _device_commands(sub: typing.Any) -> None:
    launch = sub.add_parser("launch", help="start one process per device on this machine and run requests")
    add_request_flags(launch)
    LaunchSpec.add_flags(launch, defaults=COMMAND_DEFAULTS)
    add_config_flags(launch)
    _command(launch, "prism_edge.app.launch:cmd_launch")

    plan = sub.add_parser("plan", help="probe the devices and links, and show each candidate plan's predicted time "
                                       "(and with --measure, its measured one) for requests of several lengths")
    plan.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 1024],
                      help="request lengths in positions (beyond the model's limit: skipped)")
    plan.add_argument("--measure", type=int, default=0, metavar="N",
                      help="also run every candidate N times (after a warm-up) and show the median")
    plan.add_argument("--outputs", choices=OUTPUT_MODES, help="output mode of the requests (default: the model's)")
    plan.add_argument("--json", action="store_true", help="print the probes and the rows as JSON")
    LaunchSpec.add_flags(plan, defaults=COMMAND_DEFAULTS)
    add_config_flags(plan)
    _command(plan, "prism_edge.app.plan:cmd_plan")

    worker = sub.add_parser("worker", help="one device process of a group (also: python -m prism_edge.worker)")
    worker.add_argument("--rank", type=int, help="this device's rank (default: $RANK, as set by torchrun)")
    worker.add_argument("--world-size", type=int, help="number of devices (default: $WORLD_SIZE)")
    worker.add_argument("--master", help="rank 0's HOST:PORT (default: $MASTER_ADDR:$MASTER_PORT)")
    worker.add_argument("--bind", help="local address whose interface gloo uses (default: the hostname's)")
    worker.add_argument("--iface", help="network interface gloo uses, e.g. eth0 (like GLOO_SOCKET_IFNAME)")
    add_request_flags(worker)
    LaunchSpec.add_flags(worker, defaults=COMMAND_DEFAULTS)
    add_config_flags(worker)
    worker.set_defaults(devices=None)  # the group's size
    _command(worker, "prism_edge.app.launch:cmd_worker")


def _eval_command(sub: typing.Any) -> None:
    ev = sub.add_parser("eval", help="accuracy against compression: a task over a grid of P, CR and fidelity options")
    ev.add_argument("--task", required=True, help="what to score: lee, polarity, passages, perplexity, cloze, fashion, "
                    "samples, or a data set of the paper (see docs/RESULTS.md)")
    ev.add_argument("--model", help="alias, hub name or folder (default: the task's bundled model)")
    ev.add_argument("--devices", type=int, nargs="+", default=[2, 4], help="device counts of the grid")
    ev.add_argument("--cr", type=int, nargs="+", default=[4, 16, 64, 128], help="compression rates of the grid")
    ev.add_argument("--variants", nargs="+", default=["plain", "sinks", "sinks+w32", "defaults"],
                    help="fidelity options, each a named variant or tokens joined by + (sinks, bias, sim, cheap, "
                    "fp16, bf16, int8, wN, wfF, anchorN, topN, topfF, budgetF; see prism_edge/eval/variants.py); "
                    "defaults = the model kind's defaults")
    ev.add_argument("--budget", type=float, nargs="+", help="also sweep these byte budgets (fractions of Voltage's "
                    "bytes) at the kind's defaults: adds variant defaults+budgetB for each")
    ev.add_argument("--finetuned", action="append", help="a folder from `prism-edge finetune` to score on the same "
                    "grid (repeatable)")
    ev.add_argument("--limit", type=int, help="items to score (documents, chunks, images, questions)")
    ev.add_argument("--length", type=int, help="perplexity: tokens per chunk (default 512); passages: positions "
                    "per passage (default 200)")
    ev.add_argument("--source", choices=["lee", "wiki"], help="perplexity, passages: which prose (default lee, wiki)")
    ev.add_argument("--data-dir", help="local copy of the data set (see eval/datasets.py for the layout)")
    ev.add_argument("--split", help="data set split (default: validation / test); perplexity, passages: heldout "
                    "(default: the last third, to report) or dev (the first two thirds, to tune on)")
    ev.add_argument("--cbt-config", help="cbt: CN, NE, P or V (default CN)")
    ev.add_argument("--context-chars", type=int, help="cloze: longest context, in characters (default 1500)")
    ev.add_argument("--dataset", help="samples: which sample set (imagenet, cifar10, cifar100, fashionMNIST, mnist)")
    ev.add_argument("--batch-size", type=int, help="items per forward")
    ev.add_argument("--voltage", action=argparse.BooleanOptionalAction, default=True,
                    help="also run Voltage per device count (exact; the bytes baseline)")
    ev.add_argument("--name", help="suffix for the output files")
    _threads(ev)
    ev.add_argument("--out", default="results", help="folder for CSV / JSON / Markdown / PNG")
    _command(ev, "prism_edge.app.commands:cmd_eval")


def _finetune_command(sub: typing.Any) -> None:
    ft = sub.add_parser("finetune", help="PRISM-aware fine-tuning: train through the partitioned forward")
    ft.add_argument("--task", required=True, help="recipe (data, loss, held-out score, the splits it trains through): "
                    "fashion, polarity, perplexity, dino-probe; the split flags below replace its random splits")
    ft.add_argument("--model", help="starting model (default: the recipe's)")
    ft.add_argument("--out", required=True, help="folder to save the fine-tuned checkpoint (safetensors)")
    ft.add_argument("--steps", type=int, help="optimiser steps (default: the recipe's)")
    ft.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    ft.add_argument("--batch-size", type=int, help="items per step (default: the recipe's)")
    ft.add_argument("--trainable", help="which weights move: all, lora, head, attention (default: the recipe's)")
    ft.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA updates (--trainable lora)")
    ft.add_argument("--train-limit", type=int, help="use only this many training items")
    ft.add_argument("--eval-limit", type=int, help="held-out items scored before and after")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--objective", choices=["task", "distill", "distill+task"],
                    help="task (the task's own loss), distill (KL to the frozen unpartitioned model) or distill+task "
                    "(default: the recipe's)")
    ft.add_argument("--alpha", type=float, default=0.5, help="distill+task: weight of the distillation term")
    ft.add_argument("--max-devices", type=int, help="random splits: P drawn from 1..N each step (default: the recipe's)")
    ft.add_argument("--train-cr", type=int, nargs="+", help="random splits: compression rates to draw from")
    ft.add_argument("--train-variants", nargs="+", help="random splits: fidelity variants to draw from "
                    "(`prism-edge eval --variants` spelling)")
    ft.add_argument("--checkpoint-every", type=int, default=50,
                    help="save the training state to --out every N steps and resume from it (0: never)")
    _threads(ft)
    add_config_flags(ft)
    _command(ft, "prism_edge.app.commands:cmd_finetune")


def _bench_command(sub: typing.Any) -> None:
    """`prism-edge bench BENCH`: one subcommand per bench, its flags from its options dataclass (bench/options.py)."""
    bench = sub.add_parser("bench", help="benchmarks that print a table and write results",
                           description="Benchmarks that print a table and write results; `prism-edge bench BENCH "
                           "--help` lists a bench's flags.")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH", parser_class=Parser)
    for name, options in BENCHES.items():
        one = benches.add_parser(name, help=options.summary, description=options.__doc__)
        options.add_flags(one)
        _command(one, "prism_edge.app.commands:cmd_bench")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="prism-edge", description="Run one Transformer across several devices with PRISM.")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an unexpected error (also PRISM_EDGE_DEBUG=1; workers inherit it)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _simulator_commands(sub)
    _device_commands(sub)
    _eval_command(sub)
    _finetune_command(sub)
    _bench_command(sub)
    return parser


def main(argv: list[str] | None = None, hard_exit: bool | None = None) -> int:
    """The CLI.  hard_exit (default: when reading sys.argv) ends launch/worker processes with os._exit."""
    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"  # spawned workers inherit it
    if args.command in ("launch", "worker") and (argv is None if hard_exit is None else hard_exit):
        # device processes leave at once when done: torch's C++ runtime can abort in its static destructors
        # after a distributed run ("terminate called without an active exception"), turning success into 134
        code = _run(args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    module, _, name = args.fn.partition(":")
    try:
        return getattr(importlib.import_module(module), name)(args)
    except ValueError as err:
        print(f"prism-edge: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # unreadable --text-file / --image and the like
        print(f"prism-edge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prism-edge: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("prism-edge: terminated (SIGTERM); every device stopped", file=sys.stderr)
        return 143
    except Exception as err:  # anything else: one line (the traceback with --debug)
        from ..cluster.transport import DeviceLost
        from ..cluster.errors import ClusterError

        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        lost = isinstance(err, (DeviceLost, ClusterError))
        text = " ".join(str(err).split()) or "(no message)"
        hint = "" if lost or os.environ.get(DEBUG_ENV) else " (run with --debug for the traceback)"
        print(f"prism-edge: error: {text if lost else f'{type(err).__name__}: {text}'}{hint}", file=sys.stderr)
        return 3 if lost else 1


if __name__ == "__main__":
    sys.exit(main())
