"""The one configuration object of a PRISM run: a frozen dataclass validated at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SCHEMES = ("prism", "voltage", "full")
PAYLOADS = ("auto", "hidden", "kv")
WIRE_DTYPES = ("float32", "float16", "bfloat16")


def _help(text: str, **kw):
    """Attach the CLI help text to a dataclass field (the CLI builds its flags from these)."""
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class PrismConfig:
    """How one forward pass is split across devices and what travels between them.

    Defaults follow the fidelity ablation recorded in docs/RESULTS.md.
    """

    devices: int = _help("number of devices (position slices)", default=4)
    cr: int = _help("compression rate: positions per Segment Mean (1 = exact)", default=16)
    scheme: str = _help("prism | voltage (full exchange, exact) | full (one device)", default="prism")
    sinks: bool = _help("send attention-sink tokens (first token, special tokens) exactly", default=True)
    halo: int = _help("positions next to a neighbour's slice sent exactly (0 = off)", default=32)
    count_bias: bool = _help("add log(count) to a mean key's attention logit", default=False)
    payload: str = _help("auto | hidden (normalised attention input) | kv (keys and values)", default="auto")
    wire_dtype: str = _help("dtype of exchanged tensors: float32 | float16 | bfloat16", default="float32")
    weights: tuple[float, ...] | None = _help(
        "relative device speeds for proportional slices, one per device", default=None
    )
    sink_token_ids: tuple[int, ...] = _help(
        "extra token ids treated as attention sinks (besides the model config's special ids)", default=()
    )

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        for name in ("devices", "cr", "halo"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                bad(f"{name} must be an integer, got {value!r} ({type(value).__name__}); pass e.g. {name}=4")
        if self.devices < 1:
            bad(f"devices must be >= 1, got {self.devices}; use devices=1 for a single device")
        if self.cr < 1:
            bad(f"cr (compression rate) must be >= 1, got {self.cr}; cr=1 is exact, cr=16 sends 1/16 of the positions")
        if self.halo < 0:
            bad(f"halo must be >= 0, got {self.halo}; halo=0 turns the exact boundary halo off")
        if self.scheme not in SCHEMES:
            bad(f"unknown scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.payload not in PAYLOADS:
            bad(f"unknown payload {self.payload!r}; choose one of {', '.join(PAYLOADS)}")
        if self.wire_dtype not in WIRE_DTYPES:
            bad(f"unknown wire_dtype {self.wire_dtype!r}; choose one of {', '.join(WIRE_DTYPES)}")
        if self.weights is not None:
            if len(self.weights) != self.devices:
                bad(f"weights has {len(self.weights)} entries but devices={self.devices}; give one weight per device")
            if any(not (w > 0) for w in self.weights):
                bad(f"weights must all be > 0, got {self.weights}; use relative device speeds such as (2, 1, 1)")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.sink_token_ids):
            bad(f"sink_token_ids must be non-negative token ids, got {self.sink_token_ids!r}")

    @property
    def effective_devices(self) -> int:
        """Scheme `full` runs everything on one device, whatever `devices` says."""
        return 1 if self.scheme == "full" else self.devices

    @property
    def effective_cr(self) -> int:
        """Voltage and full are exact: every position travels (or stays) as itself."""
        return self.cr if self.scheme == "prism" else 1

    def replace(self, **changes) -> "PrismConfig":
        return dataclasses.replace(self, **changes)
