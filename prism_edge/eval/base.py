"""What every evaluation task shares: the score record, the forward it runs (plain HF or the simulator),
the metrics helpers, and the Task base class."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import PrismConfig
from ..runtime.simulator import simulate


@dataclass
class Score:
    metrics: dict[str, float]
    bytes_per_item: float  # exchange bytes per item (sequence / image), from the simulator's ledger
    items: int


def run(model, cfg: PrismConfig | None, inputs: Mapping[str, Any]):
    """(outputs, exchange bytes): the plain HF forward for cfg=None, the simulator otherwise.
    `inputs`: the model's keyword arguments (tensors)."""
    if cfg is None:
        return model(**inputs), 0
    out = simulate(model, cfg, count_flops=False, **inputs)
    assert out.stats is not None  # the simulator always reports its run
    return out, out.stats.total_bytes


def pearson(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def logistic_regression(x: Tensor, y: Tensor, classes: int, l2: float = 1e-3, steps: int = 200) -> Tensor:
    """Weights (d+1, classes) of an L2-regularised multinomial logistic regression, fitted by L-BFGS."""
    x1 = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.double)], 1)
    w = torch.zeros(x1.shape[1], classes, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x1 @ w, y) + l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


def predict(w: Tensor, x: Tensor) -> Tensor:
    return (torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.double)], 1) @ w).argmax(-1)


class Task:
    name: ClassVar[str]
    default_model: ClassVar[str]  # the alias of the model it scores unless told otherwise
    metric: ClassVar[str]  # the headline metric
    higher_is_better: ClassVar[bool] = True
    data: str  # what data, in words: a class default, which an instance may refine once it has loaded its data
    # the options its constructor reads besides `limit` (eval.harness.make_task refuses any other)
    takes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, loaded, limit: int | None = None, batch_size: int = 16, **options) -> None:
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.limit, self.batch_size, self.options = limit, batch_size, options
        self._reference = None

    def evaluate(self, cfg: PrismConfig | None) -> Score:
        raise NotImplementedError

    def outputs(self, cfg: PrismConfig | None):
        """(per-item outputs, exchange bytes) of the model under `cfg` (None: unpartitioned)."""
        raise NotImplementedError

    def reference(self):
        """The unpartitioned model's outputs, computed once."""
        if self._reference is None:
            self._reference = self.outputs(None)[0]
        return self._reference

    def forget_reference(self) -> None:
        """Call after changing the model's weights (e.g. fine-tuning)."""
        self._reference = None

    def describe(self) -> str:
        return f"{self.name}: {self.data}"
