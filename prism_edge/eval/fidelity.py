"""Fidelity of a partitioned forward against the unpartitioned model, on real text.

Encoders: sentence-embedding cosine to the full model (mean pooling + L2 norm, as
sentence-transformers' all-MiniLM-L6-v2 does).  Decoders: perplexity, KL(full || PRISM) and
next-token agreement over fixed-length chunks of real prose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PrismConfig
from ..runtime.simulator import simulate


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """(B, N, d), (B, N) -> (B, d) L2-normalised mean over real tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, texts: list[str], cfg: PrismConfig | None,
                        max_length: int = 256, batch_size: int = 16) -> Tensor:
    """Embeddings of `texts` from the full model (cfg=None) or a simulated PRISM run."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        if cfg is None:
            hidden = model(**enc).last_hidden_state
        else:
            hidden = simulate(model, cfg, count_flops=False, **enc).last_hidden_state
        out.append(mean_pool(hidden, enc["attention_mask"]))
    return torch.cat(out)


def embedding_cosine(model: nn.Module, tokenizer, texts: list[str], cfg: PrismConfig,
                     reference: Tensor | None = None) -> float:
    """Mean cosine between PRISM and full-model sentence embeddings."""
    ref = reference if reference is not None else sentence_embeddings(model, tokenizer, texts, None)
    got = sentence_embeddings(model, tokenizer, texts, cfg)
    return float((ref * got).sum(-1).mean())


def token_chunks(tokenizer, texts: list[str], length: int, count: int) -> Tensor:
    """(count, length) consecutive token chunks of the concatenated texts."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + "\n")["input_ids"])
        if len(ids) >= length * count:
            break
    if len(ids) < length * count:
        raise ValueError(f"only {len(ids)} tokens of text, need {length * count}; lower the length or count")
    return torch.tensor(ids[: length * count]).view(count, length)


@dataclass(frozen=True)
class LMScore:
    perplexity: float
    kl: float | None = None  # mean KL(full || this) per predicted token
    agreement: float | None = None  # fraction of positions whose argmax matches the full model's


@torch.no_grad()
def lm_logits(model: nn.Module, chunks: Tensor, cfg: PrismConfig | None, batch_size: int = 4) -> list[Tensor]:
    outs = []
    for i in range(0, len(chunks), batch_size):
        ids = chunks[i : i + batch_size]
        outs.append(model(input_ids=ids).logits if cfg is None else simulate(model, cfg, input_ids=ids, count_flops=False).logits)
    return outs


def lm_score(chunks: Tensor, logits: list[Tensor], reference: list[Tensor] | None = None, batch_size: int = 4) -> LMScore:
    nll, kl, agree, count = 0.0, 0.0, 0.0, 0
    for j, got in enumerate(logits):
        ids = chunks[j * batch_size : (j + 1) * batch_size]
        logp = got[:, :-1].float().log_softmax(-1)  # predict token t+1 from positions <= t
        target = ids[:, 1:]
        nll += float(-logp.gather(-1, target.unsqueeze(-1)).sum())
        count += target.numel()
        if reference is not None:
            ref = reference[j][:, :-1].float().log_softmax(-1)
            kl += float((ref.exp() * (ref - logp)).sum())
            agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
    if reference is None:
        return LMScore(math.exp(nll / count))
    return LMScore(math.exp(nll / count), kl / count, agree / count)
