"""Attention pieces shared by prefill and decoding: head reshapes, grouped-query expansion, and partial
attention over a subset of the keys that merges exactly with another subset's (log-sum-exp)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def split_heads(t: Tensor, heads: int, head_dim: int) -> Tensor:
    b, n, _ = t.shape
    return t.view(b, n, heads, head_dim).transpose(1, 2)  # (B, heads, n, hd)


def merge_heads(t: Tensor) -> Tensor:
    b, _, n, _ = t.shape
    return t.transpose(1, 2).reshape(b, n, -1)  # (B, n, heads * hd)


def expand_kv(k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Grouped-query K/V (B, Hkv, keys, hd) -> one per query head (B, H, keys, hd).

    Expanded explicitly because older torch's FLOP formula (and some kernels) reject enable_gqa's
    mismatched head counts."""
    rep = heads // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


@dataclass
class Partial:
    """Attention over a subset of the keys, mergeable with another subset's (log-sum-exp merge)."""

    out: Tensor  # (B, H, n, hd) softmax-weighted values over this subset of the keys
    lse: Tensor  # (B, H, n, 1) log of the softmax denominator over this subset

    def merge(self, other: "Partial") -> Tensor:
        """Exactly the attention over both key subsets together."""
        top = torch.maximum(self.lse, other.lse)
        a, b = torch.exp(self.lse - top), torch.exp(other.lse - top)
        return (a * self.out + b * other.out) / (a + b)

    def join(self, other: "Partial") -> "Partial":
        """The partial attention over both subsets (to merge a third in later)."""
        top = torch.maximum(self.lse, other.lse)
        a, b = torch.exp(self.lse - top), torch.exp(other.lse - top)
        return Partial((a * self.out + b * other.out) / (a + b), top + torch.log(a + b))


def partial_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Partial:
    """q (B, H, n, hd) over k, v (B, H, keys, hd) with an additive mask (B, 1, n, keys)."""
    if q.device.type == "cpu" and not torch.is_grad_enabled():
        # torch's CPU flash kernel returns the log-sum-exp the merge needs (and is faster than matmuls)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask.to(q.dtype), scale=scale)
        return Partial(out, lse.unsqueeze(-1))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + mask  # (B, H, n, keys)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return Partial(torch.matmul(torch.exp(scores - lse), v), lse)


@torch.no_grad()
def importance(q: Tensor, k: Tensor, observe: Tensor, observe_valid: Tensor, own_mask: Tensor, scale: float) -> Tensor:
    """(B, n) attention the observing queries (rows `observe`, (B, o), of q (B, H, n, hd)) pay each own key
    of k (B, H, n, hd), summed over heads and queries: a sender's local guess at what a receiver beyond
    those queries would attend to (SnapKV's observation window).  own_mask: (B, 1, n, n) additive."""
    b, heads, _, hd = q.shape
    idx = observe.view(b, 1, -1, 1)
    q = torch.gather(q, 2, idx.expand(-1, heads, -1, hd))  # (B, H, o, hd)
    mask = torch.gather(own_mask, 2, idx.expand(-1, 1, -1, own_mask.shape[-1]))  # (B, 1, o, n)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale + mask  # (B, H, o, n)
    weights = logits.float().softmax(-1) * observe_valid.view(b, 1, -1, 1)
    return weights.sum(dim=(1, 2))  # (B, n)
