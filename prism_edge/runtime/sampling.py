"""How the next token is picked from the logits: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Sampling:
    """Greedy when do_sample is False; otherwise temperature, top-k (0 = off), top-p (1 = off), seed."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        def number(name: str, value) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be true or false, got {self.do_sample!r}")
        if number("temperature", self.temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if not 0 < number("top_p", self.top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}; 1 turns it off")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}; 0 turns it off")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    def pick(self, logits: Tensor, generator: torch.Generator | None) -> Tensor:
        """(B, V) -> (B,) next token ids."""
        if not self.do_sample:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
            drop = probs.cumsum(-1) - probs > self.top_p  # keep the smallest prefix reaching top_p
            logits = logits.scatter(-1, order, logits.gather(-1, order).masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
