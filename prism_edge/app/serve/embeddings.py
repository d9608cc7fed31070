"""POST /v1/embeddings (OpenAI-compatible) for encoder models: sentence embeddings pooled the way the
model's sentence-transformers configuration says, then L2-normalised.

A sentence-transformers folder names its pooling in `modules.json` -> the Pooling module's folder
(`1_Pooling/config.json`: pooling_mode_mean_tokens, _cls_token, _max_tokens, _mean_sqrt_len_tokens,
_lasttoken; several at once are concatenated in that library's order) and its longest input in
`sentence_bert_config.json` (max_seq_length).  MiniLM ships mean pooling, 256 tokens and a Normalize
module.  A model without that configuration is mean-pooled.  The cluster sends back only what the
pooling needs: per-sequence sums for mean (the `mean` output mode), every position otherwise.
"""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...models.loading import IMAGE_TYPES
from ...cluster import Cluster
from .api import BadField, Ctx, field, request_budget, request_fidelity
from .openai_api import check_model, prism_figures
from ...eval.requests import encode_texts, hf_config

ORDER = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "lasttoken")  # sentence-transformers'
MAX_INPUTS = 2048  # OpenAI's limit per request


@dataclass(frozen=True)
class Pooling:
    modes: tuple[str, ...] = ("mean_tokens",)
    max_length: int = 512

    @classmethod
    @functools.lru_cache(maxsize=8)  # read once per folder: a server asks on every request
    def of(cls, folder: Path | None) -> "Pooling":
        """The pooling a sentence-transformers folder configures (mean over 512 tokens where it says nothing)."""
        if folder is None or not (folder / "modules.json").exists():
            return cls()
        modules = json.loads((folder / "modules.json").read_text())
        path = next((m["path"] for m in modules if m.get("type", "").endswith("Pooling")), "1_Pooling")
        conf = json.loads((folder / path / "config.json").read_text()) if (folder / path / "config.json").exists() \
            else {}
        chosen = tuple(m for m in ORDER if conf.get(f"pooling_mode_{m}"))
        unknown = [k for k, v in conf.items() if k.startswith("pooling_mode_") and v and k[13:] not in ORDER]
        if unknown:
            raise ValueError(f"pooling {', '.join(unknown)} in {folder / path} is not supported; "
                             f"supported: {', '.join(ORDER)}")
        bert = folder / "sentence_bert_config.json"
        length = json.loads(bert.read_text()).get("max_seq_length") if bert.exists() else None
        return cls(chosen or cls.modes, int(length or cls.max_length))

    @property
    def output_mode(self) -> str:
        """What the cluster needs to send back: sums for mean-like pooling, every position otherwise."""
        return "mean" if set(self.modes) <= {"mean_tokens", "mean_sqrt_len_tokens"} else "all"

    def pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """(B, N or 1, d) cluster outputs (per output_mode) and (B, N) mask -> (B, d * modes), L2-normalised."""
        count = mask.sum(1, keepdim=True).to(hidden.dtype)  # (B, 1)
        parts = []
        for mode in self.modes:
            if self.output_mode == "mean":
                mean = hidden[:, 0]  # (B, d): the cluster already averaged
                parts.append(mean * count.sqrt() if mode == "mean_sqrt_len_tokens" else mean)
                continue
            real = mask.bool().unsqueeze(-1)  # (B, N, 1)
            if mode == "cls_token":
                parts.append(hidden[:, 0])
            elif mode == "max_tokens":
                parts.append(hidden.masked_fill(~real, float("-inf")).amax(1))
            elif mode == "lasttoken":
                parts.append(hidden[torch.arange(hidden.shape[0]), mask.sum(1) - 1])
            else:
                mean = (hidden * real).sum(1) / count
                parts.append(mean * count.sqrt() if mode == "mean_sqrt_len_tokens" else mean)
        return F.normalize(torch.cat(parts, dim=-1), dim=-1)


def model_folder(cluster: Cluster) -> Path | None:
    """The local folder the model was loaded from (Hugging Face records it), if it is one."""
    path = Path(getattr(hf_config(cluster.model), "_name_or_path", "") or "")
    return path if str(path) and path.is_dir() else None


def _inputs(cluster: Cluster, body: dict[str, Any], pooling: Pooling) -> dict[str, Tensor]:
    value = body.get("input")
    items = [value] if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)) \
        else value
    if not isinstance(items, list) or not items or len(items) > MAX_INPUTS:
        raise BadField("input", f'"input" must be a string, a list of 1 to {MAX_INPUTS} strings, or token id lists')
    if all(isinstance(t, str) for t in items):
        return encode_texts(cluster.loaded, items, pooling.max_length)
    if not all(isinstance(t, list) and t and all(isinstance(i, int) for i in t) for t in items):
        raise BadField("input", '"input" must hold only strings or only non-empty token id lists')
    width = max(len(t) for t in items)
    ids = torch.tensor([t + [0] * (width - len(t)) for t in items])  # (B, N), right-padded
    mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in items])
    return {"input_ids": ids, "attention_mask": mask}


def handle_embeddings(ctx: Ctx, body: dict[str, Any]) -> dict[str, Any]:
    cluster: Cluster = ctx.cluster
    served = check_model(cluster, body)
    if cluster.adapter.geometry.causal or hf_config(cluster.model).model_type in IMAGE_TYPES:
        raise BadField("model", f"{served!r} is not a text encoder; /v1/embeddings needs one (e.g. minilm)")
    fmt = field(body, "encoding_format", str, "float")
    if fmt not in ("float", "base64"):
        raise BadField("encoding_format", f'"encoding_format" must be float or base64, got {fmt!r}')
    pooling = Pooling.of(model_folder(cluster))
    inputs = _inputs(cluster, body, pooling)
    width = cluster.adapter.geometry.hidden * len(pooling.modes)
    if field(body, "dimensions", int, width) != width:
        raise BadField("dimensions", f"this model's embeddings have {width} dimensions, not {body['dimensions']}")
    budget = request_budget(body)
    out = ctx.forward(inputs, outputs=pooling.output_mode, budget=budget, fidelity=request_fidelity(body))
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    assert out.last_hidden_state is not None  # an encoder's
    vectors = pooling.pool(out.last_hidden_state, mask)  # (B, width)
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.float().numpy().astype("<f4").tobytes()).decode() if fmt == "base64"
             else v.tolist()} for i, v in enumerate(vectors)]
    tokens = int(mask.sum())
    return {"object": "list", "data": data, "model": served, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "prism": {**prism_figures(cluster, out.stats, budget=budget, planned=out.planned), "pooling": list(pooling.modes)}}
