"""Building blocks of the fidelity metrics (the tasks themselves live in eval/tasks.py).

Sentence embeddings are mean-pooled and L2-normalised, as sentence-transformers' all-MiniLM-L6-v2
does; language-model text is cut into fixed-length chunks of consecutive tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """(B, N, d), (B, N) -> (B, d) L2-normalised mean over real tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return F.normalize(pooled, dim=-1)


def token_chunks(tokenizer, texts: list[str], length: int, count: int | None) -> Tensor:
    """(count, length) consecutive token chunks of the concatenated texts; count=None: as many as they hold."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + "\n")["input_ids"])
        if count is not None and len(ids) >= length * count:
            break
    if count is None:
        count = len(ids) // length
    if count == 0 or len(ids) < length * count:
        raise ValueError(f"only {len(ids)} tokens of text, need {length * max(count, 1)}; lower the length or count")
    return torch.tensor(ids[: length * count]).view(count, length)
