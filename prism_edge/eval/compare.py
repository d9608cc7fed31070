"""One request three ways — the full model, Voltage and PRISM — and what PRISM saves and costs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..config import PrismConfig
from ..models import adapter_for
from ..runtime.simulator import PrismOutput, simulate
from ..runtime.stats import Stats
from .fidelity import mean_pool


@dataclass
class Report:
    family: str
    cfg: PrismConfig
    positions: list[int]  # real positions per sequence
    bytes: dict[str, int]  # scheme -> bytes exchanged for the request
    max_flops: dict[str, int]  # scheme -> FLOPs of the busiest device
    full_flops: int
    quality: dict[str, float] = field(default_factory=dict)  # metric -> value (PRISM against the full model)
    details: list[str] = field(default_factory=list)  # human-readable result lines

    def saved(self, what: dict[str, int]) -> float:
        return 1.0 - what["prism"] / what["voltage"] if what["voltage"] else 0.0


def _pairs(emb: Tensor) -> Tensor:
    return emb @ emb.T


@torch.no_grad()
def compare(model, cfg: PrismConfig, inputs: Mapping[str, Any], labels: list[str] | None = None) -> Report:
    """Run `inputs` (the model's keyword arguments: tensors) unpartitioned, under Voltage and under
    `cfg` (PRISM), in the simulator."""
    adapter = adapter_for(model)
    runs: dict[str, PrismOutput] = {
        "full": simulate(model, cfg.replace(scheme="full"), **inputs),
        "voltage": simulate(model, cfg.replace(scheme="voltage"), **inputs),
        "prism": simulate(model, cfg.replace(scheme="prism"), **inputs),
    }
    stats = {k: _stats(v) for k, v in runs.items()}
    flops = {k: _flops(v) for k, v in stats.items()}  # per device
    mask = inputs.get("attention_mask")
    positions = mask.sum(1).tolist() if mask is not None else [_rows(runs["full"])] * _batch(inputs)
    report = Report(
        family=adapter.family,
        cfg=cfg,
        positions=[int(p) for p in positions],
        bytes={k: v.total_bytes for k, v in stats.items() if k != "full"},
        max_flops={k: max(v) for k, v in flops.items() if k != "full"},
        full_flops=flops["full"][0],
    )
    full, prism = runs["full"], runs["prism"]
    if full.logits is not None:
        assert prism.logits is not None  # the same model under another scheme: the same outputs
        if adapter.geometry.causal:
            _lm_quality(report, inputs["input_ids"], mask, full.logits, prism.logits)
        else:
            agree = (full.logits.argmax(-1) == prism.logits.argmax(-1)).float().mean().item()
            report.quality["top-1 agreement"] = agree
            report.details += [f"{labels[i] if labels else i}: class {int(f)} (full) / {int(p)} (PRISM)"
                               for i, (f, p) in enumerate(zip(full.logits.argmax(-1), prism.logits.argmax(-1)))]
    else:
        assert full.last_hidden_state is not None and prism.last_hidden_state is not None  # an encoder's output
        _embedding_quality(report, full.last_hidden_state, prism.last_hidden_state, mask, labels)
    return report


def _stats(out: PrismOutput) -> Stats:
    assert out.stats is not None  # the simulator always reports its run
    return out.stats


def _flops(stats: Stats) -> tuple[int, ...]:
    assert stats.flops is not None  # compare runs the simulator with its FLOP counter on
    return stats.flops


def _rows(out: PrismOutput) -> int:
    """Positions per sequence (no attention mask: every one is real), from the run's plan."""
    assert out.plan is not None  # the simulator always returns its plan
    return out.plan.devices[0].rows


def _batch(inputs: Mapping[str, Any]) -> int:
    return next(iter(inputs.values())).shape[0]


def _embedding_quality(report: Report, full: Tensor, prism: Tensor, mask: Tensor | None, labels) -> None:
    if mask is None:
        mask = torch.ones(full.shape[:2], dtype=torch.long)
    ef, ep = mean_pool(full, mask), mean_pool(prism, mask)
    cos = (ef * ep).sum(-1)
    report.quality["embedding cosine to full (mean)"] = cos.mean().item()
    report.quality["embedding cosine to full (min)"] = cos.min().item()
    sf, sp = _pairs(ef), _pairs(ep)
    n = len(ef)
    for i in range(n):
        for j in range(i + 1, n):
            name = f"{labels[i][:28]!r} ~ {labels[j][:28]!r}" if labels else f"{i} ~ {j}"
            report.details.append(f"similarity {name}: {sf[i, j]:.3f} full, {sp[i, j]:.3f} PRISM")
    if n > 2:
        iu = torch.triu_indices(n, n, 1)
        a, b = sf[iu[0], iu[1]], sp[iu[0], iu[1]]
        report.quality["pairwise-similarity Pearson to full"] = torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def _lm_quality(report: Report, ids: Tensor, mask: Tensor | None, full: Tensor, prism: Tensor) -> None:
    valid = (mask if mask is not None else torch.ones_like(ids)).bool()
    tgt_ok = valid[:, 1:] & valid[:, :-1]
    lf, lp = full[:, :-1].log_softmax(-1), prism[:, :-1].log_softmax(-1)
    tgt = ids[:, 1:].unsqueeze(-1)
    nll_f = -lf.gather(-1, tgt).squeeze(-1)[tgt_ok].mean()
    nll_p = -lp.gather(-1, tgt).squeeze(-1)[tgt_ok].mean()
    report.quality["perplexity (full)"] = nll_f.exp().item()
    report.quality["perplexity (PRISM)"] = nll_p.exp().item()
    report.quality["next-token agreement"] = (lf.argmax(-1) == lp.argmax(-1))[tgt_ok].float().mean().item()
    report.quality["KL(full || PRISM) per token"] = (lf.exp() * (lf - lp)).sum(-1)[tgt_ok].mean().item()
