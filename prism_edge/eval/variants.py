"""Fidelity variants by name: the `+`-joined spelling `prism-edge eval --variants`, `bench schemes` and the
fine-tuning split sampler share (e.g. "sinks+w16+top16+int8", "defaults+anchor4")."""

from __future__ import annotations

from ..config import PLAIN, PrismConfig

# Named variants of the ablation; any other "+"-joined spelling is parsed by `variant_options`.
VARIANTS: dict[str, str] = {
    "plain": "plain",
    "plain+bias": "plain+bias",
    "sinks": "sinks",
    "sinks+w8": "sinks+w8",
    "sinks+w32": "sinks+w32",
    "sinks+w32+bias": "sinks+w32+bias",
    "sinks+w64": "sinks+w64",
    "defaults": "defaults",
}
_TOKENS: list[tuple[str, str, type]] = [  # (prefix, field, value type); longest prefixes first
    ("int8from", "int8_from", int), ("budgetw", "budget_window", float), ("budget", "budget", float),
    ("genbudget", "generate_budget", float), ("anchor", "anchor", int), ("topf", "topk_frac", float), ("top", "topk", int),
    ("tail", "tail", int), ("wf", "window_frac", float), ("w", "window", int),
]
_FLAGS: dict[str, dict] = {
    "sinks": dict(sinks=True), "nosinks": dict(sinks=False), "bias": dict(count_bias=True),
    "nobias": dict(count_bias=False), "sim": dict(grouping="similarity"), "contig": dict(grouping="contiguous"),
    "cheap": dict(exact_when_cheap=True), "nocheap": dict(exact_when_cheap=False),
    "fp32": dict(wire_dtype="float32"), "fp16": dict(wire_dtype="float16"), "bf16": dict(wire_dtype="bfloat16"),
    "int8": dict(wire_dtype="int8"),
}


def variant_options(variant: str) -> dict:
    """PrismConfig fields of a variant spelled as "+"-joined tokens.

    It starts from `plain` (every fidelity option off) unless its first token is `defaults` (the model
    kind's defaults).  Tokens: sinks, bias, sim (similarity grouping), cheap (exact when cheap), fp16 |
    bf16 | int8 (wire), int8fromN (int8 only from N positions, float16 below), wN (window N), wfF (window
    fraction F), anchorN, topN (top-k), topfF (top-k fraction), tailN (a short last slice with an exact
    view), budgetF (a byte budget: F of Voltage's bytes into each device; wN/topN set with it are floors),
    budgetwF (the budget's window share), genbudgetF; `no`-prefixed flags turn one off.  E.g. "sinks+w16+top8+int8", "defaults+anchor4".
    """
    tokens = VARIANTS.get(variant, variant).split("+")
    out: dict = {} if tokens[0] == "defaults" else dict(PLAIN)
    for token in tokens[1:] if tokens[0] in ("defaults", "plain") else tokens:
        out.update(_token(token, variant))
    return out


def _token(token: str, variant: str) -> dict:
    if token in _FLAGS:
        return _FLAGS[token]
    for prefix, name, kind in _TOKENS:
        if token.startswith(prefix):
            try:
                return {name: kind(token[len(prefix):])}
            except ValueError:
                break
    raise ValueError(f"unknown variant token {token!r} in {variant!r}; use sinks, bias, sim, cheap, fp16, bf16, int8, "
                     f"int8fromN, wN, wfF, anchorN, topN, topfF, tailN, budgetF, budgetwF, genbudgetF (joined by +), or one of {', '.join(VARIANTS)}")


def budget_of(variant: str) -> float | None:
    """The budget of a `defaults+budgetB` variant (a point of `prism-edge eval --budget`'s sweep), else None."""
    tokens = variant.split("+")
    if len(tokens) == 2 and tokens[0] == "defaults" and tokens[1].startswith("budget") and tokens[1][6:7].isdigit():
        return float(tokens[1][6:])
    return None


def variant_config(variant: str, devices: int, cr: int, **extra) -> PrismConfig:
    return PrismConfig(devices=devices, cr=cr, **{**variant_options(variant), **extra})


