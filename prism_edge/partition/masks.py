"""Attention masks for one device, composed from small predicates (cf. HF masking_utils).

A device's keys are [its own rows ; the rows it received].  Predicates return boolean tensors
broadcastable to (B, n_query, n_key); True means "may attend".
"""

from __future__ import annotations

import torch
from torch import Tensor


def key_valid(valid: Tensor) -> Tensor:
    """(B, n) -> (B, 1, n): real rows may be attended to, padding rows never."""
    return valid.unsqueeze(1)


def causal(n: int, device: torch.device | None = None) -> Tensor:
    """(1, n, n): own rows are in position order, so row i sees own rows j <= i."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril().unsqueeze(0)


def and_masks(*masks: Tensor) -> Tensor:
    out = masks[0]
    for m in masks[1:]:
        out = out & m
    return out


def own_mask(valid: Tensor, is_causal: bool) -> Tensor:
    """(B, n, n) visibility among a device's own rows.

    A padding query row sees what its batch's real rows see (never nothing, so no NaN); its output
    is never sent or returned.
    """
    n = valid.shape[1]
    if is_causal:
        return and_masks(key_valid(valid), causal(n, valid.device))
    return key_valid(valid).expand(-1, n, -1)


def remote_mask(row_valid: Tensor, n_query: int) -> Tensor:
    """(B, n_query, m) visibility of received rows.

    Causality is enforced by the plan: a decoder device only receives rows of earlier devices,
    which lie wholly in its past, so every received row is visible to every query.
    """
    return key_valid(row_valid).expand(-1, n_query, -1)


def additive_mask(allowed: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """bool (B, nq, nk) [+ float bias (B, 1, nk)] -> float (B, 1, nq, nk) for scaled_dot_product_attention."""
    neg = torch.finfo(dtype).min
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    if bias is not None:
        out = out + bias.to(dtype)
    return out.masked_fill(~allowed, neg).unsqueeze(1)


__all__ = ["key_valid", "causal", "and_masks", "own_mask", "remote_mask", "additive_mask"]
