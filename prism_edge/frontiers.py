"""Measured fidelity against bytes, per kind of model and input length, shipped as data.

`prism_edge/data/frontiers.json` holds, for each kind (decoder, encoder, vision), the fidelity that a byte
budget gave at several input lengths on held-out data (P=4, CR=16, training-free; built by
`python -m prism_edge.eval.frontiers` from `prism-edge eval --budget` grids, docs/RESULTS.md §2.10).  A
planner reads it to predict what a budget costs in fidelity before it runs a request:

    predict("encoder", budget=0.1, length=300)  ->  Prediction(metric="cosine", value=0.98..., ...)

Values between measured budgets and lengths are interpolated (linearly in the budget, in log length);
outside the measured range the nearest measured length answers, and a budget below the smallest
measured one has no prediction (None).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

PATH = Path(__file__).parent / "data" / "frontiers.json"


@dataclass(frozen=True)
class Prediction:
    metric: str  # what `value` measures (e.g. cosine to the full model; perplexity_increase, a fraction)
    value: float
    higher_is_better: bool
    lengths: tuple[int, ...]  # the measured lengths it was read from
    data: str  # the data it was measured on, in words


@lru_cache(maxsize=None)
def table(path: str | None = None) -> dict[str, Any]:
    """The frontier tables as shipped (or from `path`)."""
    return json.loads(Path(path or PATH).read_text())


def _at_length(rows: list[dict[str, Any]], budget: float) -> float | None:
    """The value at `budget` among one length's points (mean over sources), interpolated linearly."""
    by_budget: dict[float, list[float]] = {}
    for r in rows:
        by_budget.setdefault(r["budget"], []).append(r["value"])
    curve = sorted((b, sum(v) / len(v)) for b, v in by_budget.items())
    if not curve or budget < curve[0][0]:
        return None
    for (b0, v0), (b1, v1) in zip(curve, curve[1:]):
        if b0 <= budget <= b1:
            return v0 + (v1 - v0) * (budget - b0) / (b1 - b0)
    return curve[-1][1]


def predict(kind: str, budget: float, length: int, path: str | None = None) -> Prediction | None:
    """What the measurements say a `budget` gives a `kind` of model on inputs of `length` positions."""
    if not 0 < budget <= 1 or length < 1:
        raise ValueError(f"budget must be in (0, 1] and length >= 1, got budget={budget!r}, length={length!r}")
    family = table(path)["families"].get(kind)
    if family is None:
        return None
    lengths = sorted({r["length"] for r in family["points"]})
    below = [n for n in lengths if n <= length]
    above = [n for n in lengths if n >= length]
    pair = (below[-1] if below else above[0], above[0] if above else below[-1])
    values = [_at_length([r for r in family["points"] if r["length"] == n], budget) for n in pair]
    if any(v is None for v in values):
        return None
    v0, v1 = float(values[0]), float(values[1])  # type: ignore[arg-type]
    if pair[0] == pair[1]:
        value = v0
    else:
        t = (math.log(length) - math.log(pair[0])) / (math.log(pair[1]) - math.log(pair[0]))
        value = v0 + (v1 - v0) * t
    return Prediction(family["metric"], value, family["higher_is_better"], tuple(sorted(set(pair))), family["data"])
