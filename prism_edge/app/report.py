"""What the command line prints about a result: byte counts, and the cluster's answer against the unpartitioned model's."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..runtime.simulator import PrismOutput


def fmt_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as link speeds are quoted)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1000
    return str(n)


def reference(model: nn.Module, inputs: dict[str, Tensor], mode: str) -> dict[str, Tensor]:
    """The unpartitioned HF model's answer for the same request, reduced like the cluster's outputs."""
    with torch.inference_mode():
        out = model(**inputs)
    valid = inputs.get("attention_mask")
    result = {}
    for name in ("last_hidden_state", "logits", "pooler_output"):
        t = getattr(out, name, None)
        if t is None:
            continue
        if mode == "mean" and t.dim() == 3:
            m = (valid if valid is not None else torch.ones(t.shape[:2])).unsqueeze(-1).to(t.dtype)  # (B, N, 1)
            result[name] = (t * m).sum(1) / m.sum(1)
        elif mode == "last" and t.dim() == 3:
            last = (valid.sum(1) - 1) if valid is not None else torch.full((t.shape[0],), t.shape[1] - 1)
            result[name] = t[torch.arange(t.shape[0]), last]
        elif mode in ("pooled", "all") and t.dim() == (2 if mode == "pooled" else 3):
            result[name] = t
    return result


def _next_tokens(tok: Any, got: Tensor, want: Tensor) -> list[str]:
    got, want = got.softmax(-1), want.softmax(-1)
    lines = []
    for b in range(got.shape[0]):
        g, w = int(got[b].argmax()), int(want[b].argmax())
        lines.append(f"next token: {tok.decode([g])!r} (p={float(got[b, g]):.3f}); unpartitioned model: "
                     f"{tok.decode([w])!r} (p={float(want[b, w]):.3f})")
    return lines


def _pooled(out: PrismOutput, ref: dict[str, Tensor]) -> list[str]:
    lines = []
    for name, value in ref.items():
        mine = getattr(out, name)
        if name == "logits":
            agree = (mine.argmax(-1) == value.argmax(-1)).float().mean()
            lines.append(f"predicted class agrees with the unpartitioned model on {100 * float(agree):.0f} % "
                         f"of {mine.shape[0]} input(s)")
        cos = torch.nn.functional.cosine_similarity(mine.reshape(mine.shape[0], -1), value, dim=-1)
        lines.append(f"{name}: cosine to the unpartitioned model {float(cos.mean()):.4f}")
    return lines


def describe_result(model: nn.Module, tokenizer: Any, inputs: dict[str, Tensor], out: PrismOutput,
                    mode: str) -> list[str]:
    """A few lines comparing the cluster's answer with the unpartitioned model's."""
    ref = reference(model, inputs, mode)
    if mode == "last" and out.logits is not None:
        return _next_tokens(tokenizer, out.logits[:, 0], ref["logits"])
    if mode == "pooled":
        return _pooled(out, ref)
    name = "last_hidden_state" if "last_hidden_state" in ref else next(iter(ref))
    mine, want = getattr(out, name), ref[name]
    if mode == "all":
        valid = inputs.get("attention_mask")
        keep = valid.bool() if valid is not None else torch.ones(mine.shape[:2], dtype=torch.bool)
        mine, want = mine[keep], want[keep]  # (rows, width): real positions only
    else:
        mine = mine[:, 0]  # (B, 1, w) -> (B, w)
    cos = torch.nn.functional.cosine_similarity(mine, want, dim=-1)
    what = "embedding (mean over positions)" if mode == "mean" else name
    return [f"{what}: cosine to the unpartitioned model mean {float(cos.mean()):.4f}, min {float(cos.min()):.4f}"]
