"""The configuration of a PRISM run: frozen dataclasses validated at construction.

PrismConfig is what a user writes: fidelity options left at None take the default of the model's kind
(decoder, encoder or vision), chosen from the measured accuracy-against-bytes frontiers in
docs/RESULTS.md.  `PrismConfig.resolve(kind)` fills them in, once, at an entry point (simulate,
generate, Cluster, a worker), giving a RunConfig: every option spelled out, none of them None, and the
facts derived from them (the devices and CR in effect, the wire of a request, the plan's Fidelity) as
its properties.  Everything downstream (the planner, every device's executor, the start-up handshake)
takes a RunConfig.  Every option is exact at CR=1 and every byte it costs is counted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SCHEMES = ("prism", "voltage", "full")
PAYLOADS = ("auto", "hidden", "kv")
WIRE_DTYPES = ("float32", "float16", "bfloat16", "int8")
GROUPINGS = ("contiguous", "similarity")
KINDS = ("decoder", "encoder", "vision")

# The fidelity options a kind of model gets unless the user sets them (docs/RESULTS.md §2 has the
# frontiers these were read from, §2.10 the byte budgets).  With a budget (> 0) the count options
# (window, window_frac, topk, topk_frac) are floors and default to 0; `budget=0` brings back the fixed
# counts written here.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # Decoders, a forward (scoring, embedding) of 512+ positions: a budget of 0.10 (SmolLM2, P=4, held-out:
    # +0.33 % perplexity on news at 512, -0.2 % at 1024, +2.9 % on Wikipedia 512; at 256 it cost +4.8 %,
    # hence budget_from 512).  Generation: every earlier row whole (generate_budget 1.0), as the fixed
    # counts below send it.  Decoders feed their outputs back: every route carries its top half exactly and the
    # window before the receiver, so each is at least half exact rows and "exact when cheap" sends it
    # whole — every earlier position's K/V as int8, 0.172 of Voltage's bytes.  SmolLM2, P=4: perplexity
    # +0.0 % at 256-1024 tokens; 32 greedy tokens after 1024-token prompts equal the full model's.
    # Cheaper points of the frontier: topk_frac=0 (+0.2 % at 0.074 for 1024 tokens), window=32, topk=32.
    # Prompts under 256 positions travel as float16 instead: int8 rounding tipped near-ties in 2 of 6 chat
    # answers (agreement 0.839 at P=4; float16 1.000), and a short prompt's bytes are few either way.
    "decoder": dict(sinks=True, window=64, window_frac=0.0, anchor=0, topk=64, topk_frac=0.5,
                    grouping="contiguous", count_bias=False, exact_when_cheap=True, tail=0, wire_dtype="int8",
                    int8_from=256, budget=0.10, generate_budget=1.0, budget_window=0.25, budget_from=512),
    # MiniLM, P=4, CR=16, held-out passages of 50-500 positions: embedding cosine 0.994-0.998 at 0.19-0.20 of
    # Voltage's bytes (the fixed counts below fell from 0.9994 to 0.951 as inputs grew); under 32 positions
    # whole (~20-token sentences: 0.981 at the budget, 0.9991 whole)
    "encoder": dict(sinks=True, window=8, window_frac=0.0, anchor=0, topk=8, topk_frac=0.0,
                    grouping="contiguous", count_bias=False, exact_when_cheap=True, tail=0, wire_dtype="int8",
                    int8_from=0, budget=0.20, generate_budget=0.20, budget_window=0.25, budget_from=32),
    # Fashion-MNIST ViT, P=4, CR=16: 83.3 % (unpartitioned 84.9 %) at 0.107 of Voltage's bytes; alike
    # patches merge well (similarity groups with log-size attention), the top-k carry the rest.  Fixed
    # counts: a budget sits on this frontier, not above it (83.5 % at 0.096, 84.8 % at 0.149)
    "vision": dict(sinks=True, window=0, window_frac=0.0, anchor=0, topk=16, topk_frac=0.0,
                   grouping="similarity", count_bias=True, exact_when_cheap=True, tail=0, wire_dtype="int8",
                   int8_from=0, budget=0.0, generate_budget=0.0, budget_window=0.0, budget_from=0),
}
# Pure Segment Means as the paper describes them: every fidelity option off.
PLAIN: dict[str, Any] = dict(sinks=False, window=0, window_frac=0.0, anchor=0, topk=0, topk_frac=0.0,
                             grouping="contiguous", count_bias=False, exact_when_cheap=False, tail=0,
                             wire_dtype="float32", int8_from=0, budget=0.0, generate_budget=0.0, budget_window=0.5,
                             budget_from=0)
FIDELITY_FIELDS = tuple(PLAIN)
COUNT_FIELDS = ("window", "window_frac", "topk", "topk_frac")  # fixed counts; under a budget, floors


def _check_stages(cfg: Any) -> None:
    """The pipeline-stage options of a config: types and what they can be checked against without the model."""
    def bad(msg: str) -> None:
        raise ValueError(msg)

    if isinstance(cfg.stages, bool) or not isinstance(cfg.stages, int) or cfg.stages < 1:
        bad(f"stages must be an integer >= 1, got {cfg.stages!r}; stages=1 keeps every layer on every device")
    devices = 1 if cfg.scheme == "full" else cfg.devices
    if cfg.stages > devices:
        bad(f"stages={cfg.stages} needs at least one device per stage but there are {devices} devices; "
            f"use stages <= {devices}")
    for name in ("stage_devices", "layer_split"):
        value = getattr(cfg, name)
        if value is None:
            continue
        if not isinstance(value, tuple) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
            bad(f"{name} must be whole numbers >= 1, one per stage, got {value!r}")
        if len(value) != cfg.stages:
            bad(f"{name} has {len(value)} entries but stages={cfg.stages}; give one per stage")
    if cfg.stage_devices is not None and sum(cfg.stage_devices) != devices:
        bad(f"stage_devices {' + '.join(map(str, cfg.stage_devices))} = {sum(cfg.stage_devices)} devices, but "
            f"devices={devices}; make them add up")
    if cfg.memory_budget is not None:
        mb = cfg.memory_budget
        if (not isinstance(mb, tuple) or not mb or len(mb) not in (1, devices)
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
                       for v in mb)):
            bad(f"memory_budget must be MiB > 0, one for every device or one per device ({devices}), got {mb!r}")
        if cfg.stages != 1 or cfg.layer_split is not None or cfg.stage_devices is not None:
            bad("memory_budget chooses the stages and the layer split itself; drop stages / layer_split / "
                "stage_devices, or drop memory_budget")


def _help(text: str, **kw):
    """Attach the CLI help text to a dataclass field (the CLI builds its flags from these)."""
    return field(metadata={"help": text}, **kw)


class _Split:
    """What the user's and the resolved configuration both derive from the scheme, devices and CR."""

    scheme: str
    devices: int
    cr: int

    @property
    def effective_devices(self) -> int:
        """Scheme `full` runs everything on one device, whatever `devices` says."""
        return 1 if self.scheme == "full" else self.devices

    @property
    def effective_cr(self) -> int:
        """Voltage and full are exact: every position travels (or stays) as itself."""
        return self.cr if self.scheme == "prism" else 1


@dataclass(frozen=True)
class PrismConfig(_Split):
    """How one forward pass is split across devices and what travels between them."""

    devices: int = _help("number of devices (position slices)", default=4)
    cr: int = _help("compression rate: positions per Segment Mean (1 = exact)", default=16)
    scheme: str = _help("prism | voltage (full exchange, exact) | full (one device)", default="prism")
    sinks: bool | None = _help("send attention-sink tokens (first token, special tokens) exactly", default=None)
    window: int | None = _help("positions just before (encoders: and after) a device's slice sent exactly, "
                               "whichever device owns them (0 = off)", default=None)
    window_frac: float | None = _help("the window as a fraction of the receiving slice's length "
                                      "(the larger of window and this wins)", default=None)
    anchor: int | None = _help("decoders: the first A positions are recomputed by every device instead of "
                               "sent (0 = off)", default=None)
    topk: int | None = _help("rows per route sent exactly because the sender's own queries attend to them "
                             "most (importance), left out of the means", default=None)
    topk_frac: float | None = _help("top-k as a fraction of the rows a route summarises "
                                    "(the larger of topk and this wins)", default=None)
    grouping: str | None = _help("contiguous (Segment Means) | similarity (k-means on keys, ToMe-style)",
                                 default=None)
    count_bias: bool | None = _help("add log(count) to a mean key's attention logit", default=None)
    exact_when_cheap: bool | None = _help("send a route exactly when summarising it would not halve its rows",
                                          default=None)
    tail: int | None = _help("decoders: the last device owns only the last `tail` positions and receives every "
                             "earlier one exactly: an exact view for the prompt's end (0 = off)", default=None)
    payload: str = _help("auto | hidden (normalised attention input) | kv (keys and values)", default="auto")
    wire_dtype: str | None = _help("dtype of exchanged rows: float32 | float16 | bfloat16 | int8 (per-row "
                                   "scales)", default=None)
    int8_from: int | None = _help("an int8 wire applies to requests whose longest sequence has at least this many "
                                  "positions; shorter ones travel as float16, whose bytes are few there (0 = int8 "
                                  "at any length)",
                                  default=None)
    budget: float | None = _help(
        "bytes the routes into a device may send, as a fraction of Voltage's float32 bytes for the same rows: "
        "filled in order of value (sinks, Segment Means of the rest at the CR, a wider window, the top rows by "
        "the sender's attention); window/topk set alongside are floors (0 = fixed counts, no budget)",
        default=None)
    generate_budget: float | None = _help(
        "the budget of a generation's prefill (default: `budget` when set, else the kind's: decoders send every "
        "earlier position whole, 1.0)", default=None)
    budget_window: float | None = _help(
        "share of a budget's spare rows that widens the window; the rest go to the top rows", default=None)
    budget_from: int | None = _help(
        "a budget applies to sequences of at least this many positions; shorter ones send every route whole "
        "(their bytes are few, and a budget cuts deep into short routes)", default=None)
    weights: tuple[float, ...] | None = _help(
        "relative device speeds for proportional slices, one per device", default=None
    )
    sink_token_ids: tuple[int, ...] = _help(
        "extra token ids treated as attention sinks (besides the model config's special ids)", default=()
    )
    stages: int = _help("pipeline stages: each a PRISM group of devices that holds only its layers (1: every "
                        "device holds the whole model)", default=1)
    stage_devices: tuple[int, ...] | None = _help(
        "devices per stage, in rank order (default: the devices split evenly, earlier stages take the extra)",
        default=None)
    layer_split: tuple[int, ...] | None = _help(
        "layers per stage, e.g. 15 15 (default: parameter bytes per device balanced, the embeddings and head "
        "counted on the first stage)", default=None)
    memory_budget: tuple[float, ...] | None = _help(
        "MiB of parameters a device may hold, one for every device or one per device: picks the fewest stages "
        "whose layers fit (and the layer split), or refuses a model that cannot fit", default=None)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        for name in ("devices", "cr", "window", "anchor", "topk", "tail", "int8_from", "budget_from"):
            value = getattr(self, name)
            if value is None and name not in ("devices", "cr"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                bad(f"{name} must be an integer, got {value!r} ({type(value).__name__}); pass e.g. {name}=4")
        if self.devices < 1:
            bad(f"devices must be >= 1, got {self.devices}; use devices=1 for a single device")
        if self.cr < 1:
            bad(f"cr (compression rate) must be >= 1, got {self.cr}; cr=1 is exact, cr=16 sends 1/16 of the positions")
        for name in ("window", "anchor", "topk", "tail", "int8_from", "budget_from"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}; {name}=0 turns it off")
        for name in ("window_frac", "topk_frac", "budget", "generate_budget", "budget_window"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                bad(f"{name} must be a fraction between 0 and 1, got {value!r}; pass e.g. {name}=0.125"
                    + (" (0 = fixed counts, no budget)" if "budget" in name and name != "budget_window" else ""))
        for name in ("sinks", "count_bias", "exact_when_cheap"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                bad(f"{name} must be True, False or None (the model kind's default), got {getattr(self, name)!r}")
        if self.scheme not in SCHEMES:
            bad(f"unknown scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.payload not in PAYLOADS:
            bad(f"unknown payload {self.payload!r}; choose one of {', '.join(PAYLOADS)}")
        if self.wire_dtype is not None and self.wire_dtype not in WIRE_DTYPES:
            bad(f"unknown wire_dtype {self.wire_dtype!r}; choose one of {', '.join(WIRE_DTYPES)}")
        if self.grouping is not None and self.grouping not in GROUPINGS:
            bad(f"unknown grouping {self.grouping!r}; choose one of {', '.join(GROUPINGS)}")
        if self.weights is not None:
            if len(self.weights) != self.devices:
                bad(f"weights has {len(self.weights)} entries but devices={self.devices}; give one weight per device")
            if any(not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or not w > 0
                   for w in self.weights):
                bad(f"weights must all be finite numbers > 0, got {self.weights}; use relative device speeds "
                    "such as (2, 1, 1)")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.sink_token_ids):
            bad(f"sink_token_ids must be non-negative token ids, got {self.sink_token_ids!r}")
        _check_stages(self)

    def resolve(self, kind: str, *, training: bool = False) -> "RunConfig":
        """This config for a `kind` of model: every unset fidelity option at that kind's default.

        Voltage and full ship everything exactly: their options are those of pure means (off), but a
        wire dtype the user chose still applies; so does CR=1, whose default wire is float32 whatever the
        kind's.  Anchor recompute needs a causal model.  training (a forward that will be differentiated):
        int8 rounding has no gradient, so a default int8 wire becomes float32 (a chosen one stays).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
        if self.scheme != "prism":
            chosen = {**PLAIN, "wire_dtype": self.wire_dtype or "float32"}
        else:
            defaults = dict(FAMILY_DEFAULTS[kind])
            if self.budget is not None:  # the user's budget, for generation too unless given apart, at any length
                defaults["budget"] = defaults["generate_budget"] = self.budget
                defaults["budget_from"] = 0
            elif any(getattr(self, name) is not None for name in COUNT_FIELDS):
                defaults["budget"] = defaults["generate_budget"] = 0.0  # counts given and no budget: fixed counts
            if self.generate_budget is not None:
                defaults["generate_budget"] = self.generate_budget
            if defaults["budget"] or defaults["generate_budget"]:
                defaults.update({name: PLAIN[name] for name in COUNT_FIELDS})  # under a budget counts are floors
            if self.cr == 1:
                defaults["wire_dtype"] = "float32"  # CR=1 asks for exactness: a lossy default wire would break it
            if self.wire_dtype is not None:
                defaults["int8_from"] = 0  # a wire the user chose is the wire, at any length (unless int8_from says)
            elif training and defaults["wire_dtype"] == "int8":
                defaults["wire_dtype"] = "float32"
            chosen = {name: defaults[name] if getattr(self, name) is None else getattr(self, name)
                      for name in FIDELITY_FIELDS}
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return RunConfig(**{**given, **chosen}, kind=kind)

    def resolved(self, kind: str) -> "RunConfig":
        """The earlier name of `resolve` (kept for code that calls it)."""
        return self.resolve(kind)

    def wire_for(self, positions: int) -> str:
        """The wire dtype of a request whose longest sequence has `positions` real positions (padding never
        counts): `wire_dtype`, except that an int8 wire gives way to float16 below `int8_from` positions."""
        wire = self.wire_dtype or "float32"
        return "float16" if wire == "int8" and positions < (self.int8_from or 0) else wire

    def replace(self, **changes) -> "PrismConfig":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line naming the split and every fidelity option (set ones as given, others as `default`)."""
        if self.scheme != "prism":
            return f"scheme {self.scheme}, {self.effective_devices} device(s), wire {self.wire_dtype or 'float32'}"

        def show(name: str) -> str:
            value = getattr(self, name)
            return "default" if value is None else ("on" if value is True else "off" if value is False else str(value))

        budgeted = bool(self.budget or self.generate_budget)
        counts = (f"window {'>= ' if budgeted else ''}{show('window')} (+{show('window_frac')} of a slice), anchor "
                  f"{show('anchor')}, top-k {'>= ' if budgeted else ''}{show('topk')} (+{show('topk_frac')})")
        budget = (f"budget {show('budget')} of Voltage's bytes (generation {show('generate_budget')}, window share "
                  f"{show('budget_window')}, from {show('budget_from')} positions)" if budgeted or self.budget is None
                  else "fixed counts (budget 0)")
        return (f"scheme prism, {self.devices} devices, CR={self.cr}, {budget}, sinks {show('sinks')}, {counts}, "
                f"grouping {show('grouping')}, count bias {show('count_bias')}, exact when cheap "
                f"{show('exact_when_cheap')}, tail {show('tail')}, "
                f"wire {show('wire_dtype')}" + (f" (float16 below {self.int8_from} positions)"
                                                 if self.wire_dtype == "int8" and self.int8_from else ""))


@dataclass(frozen=True)
class Fidelity:
    """What a route sends exactly and how it summarises the rest (a RunConfig's `fidelity`)."""

    cr: int = 1
    window: int = 0
    window_frac: float = 0.0
    anchor: int = 0
    topk: int = 0
    topk_frac: float = 0.0
    exact_when_cheap: bool = False
    tail: int = 0  # decoders: the last device owns the last `tail` positions and receives every earlier one exactly
    budget: float = 0.0  # bytes per route as a fraction of Voltage's (0: the counts above are fixed, not floors)
    budget_window: float = 0.5  # share of a budget's spare rows that widens the window
    budget_from: int = 0  # under a budget, a sequence shorter than this sends every route whole
    row_cost: float = 1.0  # bytes of one exchanged row over one Voltage (float32 activation) row: set per request
    count_cost: float = 0.0  # bytes of one group's size (int16) over one Voltage row

    def window_for(self, receiver_rows: int) -> int:
        return max(self.window, math.ceil(self.window_frac * receiver_rows))

    def topk_for(self, candidates: int) -> int:
        return min(candidates, max(self.topk, math.ceil(self.topk_frac * candidates)))


@dataclass(frozen=True)
class RunConfig(_Split):
    """A PrismConfig resolved for one kind of model (`PrismConfig.resolve(kind)`): every option spelled out,
    none of them None, validated here; what the planner, the executors and every device process take.

    The fields are PrismConfig's (the same meaning; see its help texts), plus the `kind` they were resolved
    for.  `weights` None means equal slices (it is not an option left to a default).
    """

    devices: int
    cr: int
    scheme: str
    sinks: bool
    window: int
    window_frac: float
    anchor: int
    topk: int
    topk_frac: float
    grouping: str
    count_bias: bool
    exact_when_cheap: bool
    tail: int
    payload: str
    wire_dtype: str
    int8_from: int
    budget: float
    generate_budget: float
    budget_window: float
    budget_from: int
    weights: tuple[float, ...] | None
    sink_token_ids: tuple[int, ...]
    stages: int
    stage_devices: tuple[int, ...] | None
    layer_split: tuple[int, ...] | None
    memory_budget: tuple[float, ...] | None
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        unset = [name for name in FIDELITY_FIELDS if getattr(self, name) is None]
        if unset:
            raise ValueError(f"a RunConfig spells out every option, but {', '.join(unset)} is None; build it with "
                             "PrismConfig(...).resolve(kind)")
        _ = self.settings  # the user's checks (types, ranges, choices, weights), on the resolved values
        if self.kind != "decoder" and self.anchor:
            raise ValueError(f"anchor={self.anchor} needs a decoder (causal) model: an encoder's first positions "
                             "depend on every later one; use anchor=0 (or leave it unset)")
        if self.kind != "decoder" and self.tail:
            raise ValueError(f"tail={self.tail} needs a decoder (causal) model: it shapes the prompt for "
                             "generation; use tail=0 (or leave it unset)")

    @property
    def settings(self) -> PrismConfig:
        """These options as a PrismConfig with every one of them set (resolving it again gives this back)."""
        return PrismConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PrismConfig)})

    @property
    def causal(self) -> bool:
        return self.kind == "decoder"

    @property
    def slice_weights(self) -> tuple[float, ...] | None:
        """The relative device speeds the slices follow (None: equal slices; scheme full has one device)."""
        return self.weights if self.scheme != "full" else None

    @property
    def fidelity(self) -> Fidelity:
        """What the plan's routes send exactly and how they summarise: Voltage and full are plain exact
        exchanges (CR=1, no extras)."""
        if self.scheme != "prism":
            return Fidelity()
        return Fidelity(cr=self.cr, window=self.window, window_frac=self.window_frac, anchor=self.anchor,
                        topk=self.topk, topk_frac=self.topk_frac, exact_when_cheap=self.exact_when_cheap,
                        tail=self.tail, budget=self.budget, budget_window=self.budget_window,
                        budget_from=self.budget_from)

    def for_generation(self) -> "RunConfig":
        """This config for a generation's prefill: its budget is `generate_budget`."""
        return self if self.budget == self.generate_budget else dataclasses.replace(self, budget=self.generate_budget)

    def with_budget(self, budget: float | None) -> "RunConfig":
        """This config for one request that carries its own budget (None: the config's), at any length;
        validated here."""
        if budget is None:
            return self
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ValueError(f"budget must be a fraction of Voltage's bytes in (0, 1], got {budget!r}; pass e.g. "
                             "budget=0.1")
        if self.scheme != "prism":
            return self  # Voltage and full send everything exactly: a budget has nothing to choose
        return dataclasses.replace(self, budget=float(budget), generate_budget=float(budget), budget_from=0)

    def wire_for(self, positions: int) -> str:
        """The wire dtype of a request whose longest sequence has `positions` real positions (padding never
        counts): `wire_dtype`, except that an int8 wire gives way to float16 below `int8_from` positions."""
        return "float16" if self.wire_dtype == "int8" and positions < self.int8_from else self.wire_dtype

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line naming the split and every fidelity option."""
        return self.settings.describe()


AnyConfig = PrismConfig | RunConfig  # what an entry point takes: a PrismConfig to resolve, or a RunConfig


def resolve(cfg: AnyConfig | None, kind: str, *, training: bool = False, name: str = "cfg") -> RunConfig:
    """What an entry point (simulate, generate, Cluster, a worker) does with the config it was given, once:
    None is PrismConfig(); a PrismConfig is resolved for `kind`; a RunConfig must be `kind`'s already."""
    cfg = cfg if cfg is not None else PrismConfig()
    if isinstance(cfg, RunConfig):
        if cfg.kind != kind:
            raise ValueError(f"{name} was resolved for kind {cfg.kind!r} but this model's kind is {kind!r}; pass "
                             f"its options instead ({name}.settings, a PrismConfig)")
        return cfg
    if not isinstance(cfg, PrismConfig):
        raise ValueError(f"{name} must be a PrismConfig, got {type(cfg).__name__}; use PrismConfig(devices=4, cr=16)")
    return cfg.resolve(kind, training=training)
