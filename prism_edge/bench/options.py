"""Each bench's options: one frozen dataclass per bench, whose fields are also its flags.

  prism-edge bench schemes --link wifi --devices 4     SchemesOptions(link=("wifi",), devices=4)
  main(SchemesOptions(...), cache)                     prism_edge.bench.schemes.main, the same run

A bench's defaults live here only: `prism-edge bench NAME` makes its flags from its dataclass
(prism_edge.flags), and each bench's `main(options, cache)` takes the dataclass; every check is in
`__post_init__` (a ValueError naming the flag and a value that works).  Torch-free, so the command
line builds its parser from it without importing torch; for the same reason the scheme spelling of
`bench schemes` (full, voltage, tp, prism:CR[:VARIANT]) lives here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ..config import PrismConfig
from ..eval.variants import variant_config, variant_options
from ..flags import add_dataclass_flags, dataclass_from_args, flag_fields, flag_name, option
from ..runtime.modes import DECODE_MODES

OptionsT = TypeVar("OptionsT", bound="BenchOptions")
CHAT_QUESTIONS = 6  # the generation bench's chat prompts (prism_edge.bench.generation.CHAT)
LINKS = "wifi, slow, lan or RATEmbit[,DELAYms]"
FAULT_KINDS = ("kill", "hang", "sigkill", "duplicate", "world", "missing")  # bench faults' trials


# ---------------------------------------------------------------------- checks (ValueError naming the flag)

def _count(flag: str, value: Any, low: int, example: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}; e.g. {flag} {example}")


def _counts(flag: str, values: Any, low: int, example: int) -> None:
    if not isinstance(values, tuple) or not values:
        raise ValueError(f"{flag} takes one or more integers >= {low} (a tuple from Python), got {values!r}; "
                         f"e.g. {flag} {example}")
    for value in values:
        _count(flag, value, low, example)


def _words(flag: str, values: Any, example: str, empty: bool = False) -> None:
    if not isinstance(values, tuple) or not (values or empty) or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{flag} takes one or more words (a tuple of strings from Python), got {values!r}; "
                         f"e.g. {flag} {example}")


def _model(value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"--model must be an alias, hub name or folder, got {value!r}; e.g. --model minilm")


def _links(values: Any, loopback: bool) -> None:
    from .links import parse_link

    _words("--link", values, "wifi", empty=True)
    for name in values:
        if loopback and name == "loopback":
            continue
        try:
            parse_link(name)
        except ValueError as err:
            raise ValueError(f"--link: {err}" + (" (or loopback)" if loopback else "")) from None


def _variants(values: Any) -> None:
    _words("--variants", values, "defaults sinks+w32+int8")
    for spec in values:
        variant, _, mode = spec.partition("@")
        try:
            variant_options(variant)
        except ValueError as err:
            raise ValueError(f"--variants {spec}: {err}") from None
        if mode and mode not in DECODE_MODES:
            raise ValueError(f"--variants {spec}: unknown decode mode {mode!r} after @; use {', '.join(DECODE_MODES)}")


# ---------------------------------------------------------------------- the options every bench has

@dataclass(frozen=True)
class BenchOptions:
    """Where a bench's results go; each bench's options add their own fields (and checks in `check`)."""

    bench: ClassVar[str] = ""  # prism-edge bench BENCH
    entry: ClassVar[str] = ""  # the module whose main(options, cache) runs the bench
    summary: ClassVar[str] = ""  # one line for `prism-edge bench --help`

    out: Path = option("folder for the results (JSON and Markdown; CSV and PNG where the bench draws them)",
                       default=Path("results"))

    def __post_init__(self) -> None:
        if not isinstance(self.out, (str, Path)) or not str(self.out):
            raise ValueError(f"--out must be a folder, got {self.out!r}; e.g. --out results")
        object.__setattr__(self, "out", Path(self.out))
        self.check()

    def check(self) -> None:
        """The bench's own checks (a ValueError naming the flag and a value that works)."""

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        add_dataclass_flags(parser, cls)

    @classmethod
    def from_args(cls: type[OptionsT], args: argparse.Namespace) -> OptionsT:
        return dataclass_from_args(cls, args)

    @classmethod
    def flag_names(cls) -> list[str]:
        """Every spelling of this bench's flags (--out, --repeats, ...)."""
        return [name for f in flag_fields(cls) for name in (flag_name(f.name), *f.metadata.get("aliases", ()))]


# ---------------------------------------------------------------------- the scheme spelling of bench schemes

@dataclass(frozen=True)
class Scheme:
    name: str  # label in tables and plots
    kind: str  # full | voltage | prism | tp
    cr: int = 1
    variant: str = "defaults"  # PRISM's fidelity options, in `prism-edge eval --variants` spelling

    def config(self, devices: int) -> PrismConfig | None:
        if self.kind == "tp":
            return None
        if self.kind == "full":
            return PrismConfig(devices=1, scheme="full")
        if self.kind == "voltage":
            return PrismConfig(devices=devices, scheme="voltage")
        return variant_config(self.variant, devices, self.cr)


def parse_scheme(text: str) -> Scheme:
    """full | voltage | tp | prism:CR[:VARIANT]: e.g. prism:16 (the defaults), prism:128:plain (pure Segment
    Means), prism:16:fp16 (the defaults on a float16 wire), prism:16:sinks+w8+top8+int8.  A variant that
    does not start with `plain` or `defaults` changes the defaults."""
    kind, _, rest = text.lower().partition(":")
    if kind in ("full", "voltage", "tp") and not rest:
        return Scheme(kind, kind)
    cr, _, variant = rest.partition(":")
    if kind == "prism" and cr.isdigit() and int(cr) >= 1:
        first = variant.split("+")[0]
        variant = variant if first in ("plain", "defaults") else "defaults" + (f"+{variant}" if variant else "")
        try:
            variant_options(variant)
        except ValueError as err:
            raise ValueError(f"unknown option in scheme {text!r}: {err}") from None
        return Scheme(text.lower(), "prism", int(cr), variant)
    raise ValueError(f"unknown scheme {text!r}; use full, voltage, tp or prism:CR[:VARIANT] (e.g. prism:16:int8)")


DEFAULT_SCHEMES = ("full", "voltage", "tp", "prism:16", "prism:64", "prism:16:fp16", "prism:16:plain",
                   "prism:128:plain")


# ---------------------------------------------------------------------- one dataclass per bench

@dataclass(frozen=True)
class SchemesOptions(BenchOptions):
    """PRISM vs Voltage vs tensor parallelism vs one device: real device processes, the same request, on each link."""

    bench, entry = "schemes", "prism_edge.bench.schemes"
    summary = "PRISM vs Voltage vs tensor parallelism vs one device, on loopback or emulated links"

    model: str = option("model alias, hub name or folder (also random:bert-base, random:gpt2)", default="minilm")
    link: tuple[str, ...] = option(f"links to bench on, one table each: loopback or {LINKS} (emulated: needs "
                                   "root, else the bench runs on loopback and says so)", default=("loopback",))
    devices: int = option("device processes of the split schemes (P)", default=2)
    schemes: tuple[str, ...] = option("full, voltage, tp, prism:CR[:VARIANT] (VARIANT as in eval --variants, e.g. "
                                      "prism:128:plain, prism:16:fp16)", default=DEFAULT_SCHEMES)
    repeats: int = option("timed requests per scheme (median; one more warms up)", default=5)
    length: int = option("tokens per sequence of the request (the built-in texts)", default=128)

    def check(self) -> None:
        _model(self.model)
        _links(self.link, loopback=True)
        _count("--devices", self.devices, 1, 2)
        _words("--schemes", self.schemes, "full voltage prism:16")
        for text in self.schemes:
            try:
                parse_scheme(text)
            except ValueError as err:
                raise ValueError(f"--schemes: {err}") from None
        _count("--repeats", self.repeats, 1, 5)
        _count("--length", self.length, 1, 128)


@dataclass(frozen=True)
class RuntimeOptions(BenchOptions):
    """The multi-process runtime's cost on loopback, the wire dtypes, and attention overlap on emulated links."""

    bench, entry = "runtime", "prism_edge.bench.runtime"
    summary = "the multi-process runtime against the simulator; overlap on/off on emulated links"

    model: str = option("model alias, hub name or folder", default="minilm")
    device_counts: tuple[int, ...] = option("device counts on loopback", default=(1, 2, 4))
    cr: int = option("compression rate", default=16)
    repeats: int = option("timed requests per device count and run (median)", default=20)
    length: int = option("tokens per sequence of the request (the built-in texts)", default=128)
    link: tuple[str, ...] = option(f"also measure attention overlap on/off at P=2 on these emulated links: {LINKS} "
                                   "(needs root)", default=())
    rounds: int = option("interleaved overlap on/off runs per link", default=3)

    def check(self) -> None:
        _model(self.model)
        _counts("--device-counts", self.device_counts, 1, 2)
        _count("--cr", self.cr, 1, 16)
        _count("--repeats", self.repeats, 1, 20)
        _count("--length", self.length, 1, 128)
        _links(self.link, loopback=False)
        _count("--rounds", self.rounds, 1, 3)


@dataclass(frozen=True)
class HeteroOptions(BenchOptions):
    """Two devices, one at half speed, on loopback: equal slices against `--weights auto`."""

    bench, entry = "hetero", "prism_edge.bench.hetero"
    summary = "one of two devices at half speed: equal slices vs --weights auto"

    model: str = option("model alias, hub name or folder", default="minilm")
    cr: int = option("compression rate", default=16)
    repeats: int = option("timed requests per set-up and round (median)", default=5)
    length: int = option("tokens per sequence of the request (the built-in texts)", default=128)
    rounds: int = option("interleaved rounds of the three set-ups", default=3)

    def check(self) -> None:
        _model(self.model)
        _count("--cr", self.cr, 1, 16)
        _count("--repeats", self.repeats, 1, 5)
        _count("--length", self.length, 1, 128)
        _count("--rounds", self.rounds, 1, 3)


@dataclass(frozen=True)
class OverheadOptions(BenchOptions):
    """The simulator's time against a plain HF forward, and bytes per device and layer against Voltage."""

    bench, entry = "overhead", "prism_edge.bench.overhead"
    summary = "the simulator's overhead over a plain HF forward; bytes per layer vs Voltage"

    model: str = option("model alias, hub name or folder", default="minilm")
    repeats: int = option("interleaved timed repeats (median)", default=20)
    length: int = option("tokens per sequence of the timed batch (the built-in texts)", default=128)

    def check(self) -> None:
        _model(self.model)
        _count("--repeats", self.repeats, 1, 20)
        _count("--length", self.length, 1, 128)


@dataclass(frozen=True)
class TargetsOptions(BenchOptions):
    """The network-free targets: bytes against 1/CR, FLOPs against a perfect split, accuracy at equal bytes."""

    bench, entry = "targets", "prism_edge.bench.targets"
    summary = "bytes vs 1/CR, FLOPs vs a perfect split, accuracy at equal bytes (fixed models and sizes)"


@dataclass(frozen=True)
class FaultsOptions(BenchOptions):
    """Lost devices and start-up mistakes on local device processes: detection time, orphans, hangs."""

    bench, entry = "faults", "prism_edge.bench.faults"
    summary = "lost devices and start-up mistakes, N trials each: detection time, orphans, hangs"

    trials: int = option("trials per kind of fault", default=20)
    seed: int = option("seed of the random layers and inputs", default=0)
    kinds: tuple[str, ...] = option(f"the kinds of fault to try, of {', '.join(FAULT_KINDS)}", default=FAULT_KINDS)

    def check(self) -> None:
        _count("--trials", self.trials, 1, 20)
        _words("--kinds", self.kinds, "sigkill")
        unknown = [k for k in self.kinds if k not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"--kinds: unknown {', '.join(unknown)}; choose from {', '.join(FAULT_KINDS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"--seed must be an integer, got {self.seed!r}; e.g. --seed 0")


@dataclass(frozen=True)
class GenerationOptions(BenchOptions):
    """Generation with a decoder split across devices: fidelity in the simulator, or times with --link."""

    bench, entry = "generation", "prism_edge.bench.generation"
    summary = "generation: fidelity and bytes in the simulator; with --link, times of real device processes"

    model: str = option("a causal LM: alias, hub name or folder", default="smollm2")
    link: tuple[str, ...] = option(f"time real device processes on these links instead (loopback or {LINKS}; "
                                   "emulated: needs root, else loopback); without it: fidelity in the simulator",
                                   default=())
    devices: tuple[int, ...] = option("device counts P, each against one device and Voltage",
                                      default=(4,), aliases=("--device-counts",))
    cr: int = option("compression rate of the PRISM variants", default=16)
    prompt_lengths: tuple[int, ...] = option("prompt lengths in tokens (held-out news; in the simulator also "
                                             "Wikipedia prose)", default=(256, 1024))
    prompts: int = option("prompts per source and length", default=4)
    chat_prompts: int = option(f"short chat questions, at most {CHAT_QUESTIONS} (simulator only)",
                               default=CHAT_QUESTIONS)
    new_tokens: int = option("greedy tokens per prompt", default=64)
    variants: tuple[str, ...] = option("PRISM fidelity variants (eval --variants spelling); VARIANT@MODE runs that "
                                       "decode mode only", default=("defaults", "sinks+w32+top32+int8"))
    modes: tuple[str, ...] = option("decode modes of each variant", default=("auto",), choices=DECODE_MODES)
    name: str | None = option("suffix for the output files", default=None)

    def check(self) -> None:
        _model(self.model)
        _links(self.link, loopback=True)
        _counts("--devices", self.devices, 1, 4)
        if 1 in self.devices:
            raise ValueError("--devices: one device is every table's first row already; give device counts >= 2, "
                             "e.g. --devices 4")
        _count("--cr", self.cr, 1, 16)
        _counts("--prompt-lengths", self.prompt_lengths, 1, 256)
        _count("--prompts", self.prompts, 1, 4)
        _count("--chat-prompts", self.chat_prompts, 0, CHAT_QUESTIONS)
        if self.chat_prompts > CHAT_QUESTIONS:
            raise ValueError(f"--chat-prompts: there are {CHAT_QUESTIONS} chat questions, got {self.chat_prompts}; "
                             f"e.g. --chat-prompts {CHAT_QUESTIONS}")
        _count("--new-tokens", self.new_tokens, 1, 64)
        _variants(self.variants)
        _words("--modes", self.modes, "auto")
        if unknown := [m for m in self.modes if m not in DECODE_MODES]:
            raise ValueError(f"--modes: unknown decode mode {unknown[0]!r}; use {', '.join(DECODE_MODES)}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name or "/" in self.name):
            raise ValueError(f"--name is a suffix for file names, got {self.name!r}; e.g. --name short")


def parse_layout(text: Any) -> tuple[int, int]:
    """STAGESxDEVICES (devices per stage): 1x4 one PRISM group of 4, 2x2 two stages of 2, 4x1 a plain
    pipeline, 1x1 one device (scheme full)."""
    stages, sep, per = str(text).lower().partition("x")
    if not sep or not stages.isdigit() or not per.isdigit() or int(stages) < 1 or int(per) < 1:
        raise ValueError(f"--layouts: bad layout {text!r}; use STAGESxDEVICES (devices per stage), e.g. 2x2")
    return int(stages), int(per)


@dataclass(frozen=True)
class StagesOptions(BenchOptions):
    """Pipeline stages of PRISM groups: 1x4 vs 2x2 vs 4x1 vs one device, per link and prompt length."""

    bench, entry = "stages", "prism_edge.bench.stages"
    summary = "pipeline stages: 1x4 vs 2x2 vs 4x1 vs one device: latency, bytes, parameters and RSS per device"

    model: str = option("model alias, hub name or folder (also random:bert-base, random:gpt2)", default="smollm2")
    layouts: tuple[str, ...] = option("STAGESxDEVICES layouts (devices per stage): 1x4 one PRISM group, 2x2 two "
                                      "stages of 2, 4x1 a plain pipeline, 1x1 one device", default=("1x4", "2x2",
                                                                                                     "4x1", "1x1"))
    lengths: tuple[int, ...] = option("prompt lengths in positions (exactly that many; longer than the model "
                                      "takes: skipped)", default=(128, 512, 1024))
    link: tuple[str, ...] = option(f"links: loopback or {LINKS} (emulated: needs root, else loopback)",
                                   default=("loopback",))
    repeats: int = option("timed requests per layout, link and length (median; one more warms up)", default=3)
    generate: int = option("decoders: tokens to generate after a --generate-prompt prompt (tokens/s, stage hop "
                           "bytes); 0: none", default=16)
    generate_prompt: int = option("prompt length in positions of the generation", default=128)
    cr: int = option("PRISM compression rate, the same in every layout", default=16)

    def check(self) -> None:
        _model(self.model)
        _words("--layouts", self.layouts, "1x4 2x2 4x1 1x1")
        for text in self.layouts:
            parse_layout(text)
        _counts("--lengths", self.lengths, 1, 512)
        _links(self.link, loopback=True)
        _count("--repeats", self.repeats, 1, 3)
        _count("--generate", self.generate, 0, 16)
        _count("--generate-prompt", self.generate_prompt, 1, 128)
        _count("--cr", self.cr, 1, 16)


@dataclass(frozen=True)
class PlanOptions(BenchOptions):
    """The planner: every candidate plan measured and predicted, and the planner's pick, per link and length."""

    bench, entry = "plan", "prism_edge.bench.plan"
    summary = "the planner: every candidate plan measured against the cost model, and the pick against the best"

    model: str = option("model alias, hub name or folder (also random:bert-base, random:gpt2)", default="minilm")
    devices: int = option("device processes (candidates: the first 1..devices of them)", default=4)
    lengths: tuple[int, ...] = option("request lengths in positions (beyond the model's limit: skipped)",
                                      default=(16, 64, 256, 1024))
    link: tuple[str, ...] = option(f"links: loopback or {LINKS} (emulated: needs root, else loopback)",
                                   default=("loopback",))
    repeats: int = option("timed requests per candidate (median; one more warms up)", default=3)
    fidelity: str = option("the planner's fidelity: exact, high, balanced or a byte budget", default="high")
    outputs: str = option("output mode of the requests: auto (decoders last, encoders mean), all, last, mean, "
                          "pooled", default="auto")
    default_job: bool = option("also the request `prism-edge launch` sends by default (its built-in texts)",
                               default=True)

    def check(self) -> None:
        from ..cluster.spec import check_fidelity

        _model(self.model)
        _count("--devices", self.devices, 1, 4)
        _counts("--lengths", self.lengths, 1, 256)
        _links(self.link, loopback=True)
        _count("--repeats", self.repeats, 1, 3)
        check_fidelity(self.fidelity)
        if self.outputs not in ("auto", "all", "last", "mean", "pooled"):
            raise ValueError(f"--outputs must be auto, all, last, mean or pooled, got {self.outputs!r}")


@dataclass(frozen=True)
class LoadOptions(BenchOptions):
    """The HTTP server under concurrent clients (loopback only)."""

    bench, entry = "load", "prism_edge.bench.load"
    summary = "the HTTP server under N concurrent clients: throughput, latency percentiles, statuses, RSS"

    model: str = option("model alias, hub name or folder (an encoder: the clients ask for embeddings)",
                        default="minilm")
    devices: int = option("device processes behind the server", default=2)
    clients: tuple[int, ...] = option("concurrent clients, one level after another", default=(1, 16, 64))
    seconds: tuple[float, ...] = option("seconds per level (one value for every level, or one per level)",
                                        default=(20.0, 20.0, 60.0))
    max_requests: int = option("requests per level at most", default=20000)
    max_queue: int = option("the server's --max-queue", default=64)
    unbatched: bool = option("also run every level with dynamic batching off (--max-batch 1), to compare",
                             default=True)
    plan: str = option("the server's --plan (auto or fixed)", default="auto", choices=("auto", "fixed"))

    def check(self) -> None:
        _model(self.model)
        _count("--devices", self.devices, 1, 2)
        _counts("--clients", self.clients, 1, 16)
        if max(self.clients) > 256:
            raise ValueError(f"--clients: at most 256 clients, got {max(self.clients)}; e.g. --clients 1 16 64")
        if not (isinstance(self.seconds, tuple) and len(self.seconds) in (1, len(self.clients))
                and all(isinstance(x, (int, float)) and 0 < x <= 600 for x in self.seconds)):
            raise ValueError(f"--seconds takes one value or one per level ({len(self.clients)}), each above 0 and at "
                             f"most 600, got {self.seconds!r}; e.g. --seconds 20")
        _count("--max-requests", self.max_requests, 1, 10000)
        _count("--max-queue", self.max_queue, 1, 64)

    def level_seconds(self, i: int) -> float:
        return float(self.seconds[i] if len(self.seconds) > 1 else self.seconds[0])


BENCHES: dict[str, type[BenchOptions]] = {o.bench: o for o in (
    SchemesOptions, TargetsOptions, GenerationOptions, OverheadOptions, RuntimeOptions, HeteroOptions, FaultsOptions,
    StagesOptions, PlanOptions, LoadOptions)}


def benches_with(flag: str) -> list[str]:
    """The benches that have `flag` (for the error when another bench is given it)."""
    return [name for name, options in BENCHES.items() if flag in options.flag_names()]
