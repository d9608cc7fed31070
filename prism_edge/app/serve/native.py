"""prism-edge's own JSON endpoints (besides the OpenAI-compatible ones):

  POST /v1/forward   {"texts": ["...", ...]}  or  {"input_ids": [[...]], "attention_mask": [[...]]}
                     or {"pixel_values": [[[[...]]]]};  optional "outputs": all | last | mean | pooled,
                     "max_length": N (truncate texts to N tokens; without it a text longer than the model
                     takes is refused with 400), "top_k": 5, "return_logits": false, "budget": 0.1 (this
                     request's byte budget, a fraction of Voltage's bytes; also on /v1/generate)
                     -> {"mode", "outputs": {name: nested lists}, "next_tokens": [...] (LM, last), "stats": {...}}
  POST /v1/generate  {"prompt": "...", "max_new_tokens": 32, "do_sample": false, "temperature": 1.0,
                     "top_k": 0, "top_p": 1.0, "seed": null, "chat": false, "stop_ids": []}  or  {"input_ids": [[...]]}
                     -> {"text", "token_ids", "stopped_by", "prefill_stats": {...}, "decode_bytes_per_token"}
"""

from __future__ import annotations

from typing import Any

import torch

from ...runtime.generate import Sampling
from .api import BadField, Ctx, decode_mode, field, request_budget, request_fidelity
from ...cluster import Cluster
from ...eval.requests import check_ids, encode_texts, prompt_ids


def default_mode(cluster: Cluster) -> str:
    """What a request returns unless it asks: LM -> next-token (last), classifier -> pooled, else mean."""
    if cluster.adapter.geometry.causal:
        return "last"
    return "pooled" if cluster.adapter.head == "classify" else "mean"


def tensor(value: Any, name: str, dtype: torch.dtype, dims: int) -> torch.Tensor:
    """A JSON nested list as a tensor: integers for integer inputs (a 101.5 is refused, never truncated),
    numbers for float ones; rectangular, `dims` dimensions, every number finite and within int64."""
    try:
        t = torch.tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise BadField(name, f'"{name}" must be a rectangular nested list of numbers ({err})') from None
    if t.dim() != dims:
        raise BadField(name, f'"{name}" must have {dims} dimensions, got {t.dim()}')
    if t.dtype == torch.bool:
        raise BadField(name, f'"{name}" must hold numbers, not true/false')
    if not dtype.is_floating_point and t.is_floating_point():
        raise BadField(name, f'"{name}" must hold integers, got a number with a fraction or exponent')
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise BadField(name, f'"{name}" must hold finite numbers')
    return t.to(dtype)


def _forward_inputs(cluster: Cluster, body: dict[str, Any]) -> dict[str, torch.Tensor]:
    if "texts" in body:
        texts = field(body, "texts", list)
        return encode_texts(cluster.loaded, texts, field(body, "max_length", int))  # truncated only if asked
    if "input_ids" in body:
        inputs = {"input_ids": tensor(body["input_ids"], "input_ids", torch.long, 2)}
        for key in ("attention_mask", "token_type_ids"):
            if key in body:
                inputs[key] = tensor(body[key], key, torch.long, 2)
        return inputs
    if "pixel_values" in body:
        return {"pixel_values": tensor(body["pixel_values"], "pixel_values", torch.float32, 4)}
    raise BadField(None, 'send "texts", "input_ids" (with optional "attention_mask") or "pixel_values"')


def handle_forward(ctx: Ctx, body: dict[str, Any]) -> dict[str, Any]:
    cluster: Cluster = ctx.cluster
    mode = field(body, "outputs", str) or default_mode(cluster)
    inputs = _forward_inputs(cluster, body)
    out = ctx.forward(inputs, outputs=mode, budget=request_budget(body), fidelity=request_fidelity(body))
    assert out.stats is not None
    reply: dict[str, Any] = {"mode": mode, "outputs": {}, "stats": out.stats.to_dict()}
    for name in out.keys():
        if name in ("stats", "plan", "planned"):
            continue
        value = getattr(out, name)
        if name == "logits" and mode == "last":
            probs = torch.softmax(value[:, 0].float(), dim=-1)  # (B, V)
            k = field(body, "top_k", int, 5)
            if not 1 <= k <= probs.shape[-1]:
                raise BadField("top_k", f'"top_k" must be between 1 and {probs.shape[-1]}, got {k}')
            top = probs.topk(k, dim=-1)
            tok: Any = cluster.tokenizer
            reply["next_tokens"] = [
                [{"id": int(i), "token": tok.decode([int(i)]) if tok is not None else None, "prob": round(float(p), 6)}
                 for p, i in zip(ps, ids)]
                for ps, ids in zip(top.values, top.indices)
            ]
            if not field(body, "return_logits", bool, False):
                continue
        reply["outputs"][name] = value.tolist()
    reply["prism"] = out.planned  # which plan ran, its predicted and measured time
    if "input_ids" in inputs:
        reply["tokens"] = [int(m.sum()) for m in inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))]
    return reply


def handle_generate(ctx: Ctx, body: dict[str, Any]) -> dict[str, Any]:
    cluster: Cluster = ctx.cluster
    tok: Any = cluster.tokenizer
    if "prompt" in body:
        prompt = field(body, "prompt", str)
        if tok is None or not prompt:
            raise BadField("prompt", '"prompt" must be a non-empty string (and the model needs a tokenizer)')
        ids = check_ids(prompt_ids(tok, prompt, chat=field(body, "chat", bool, False)))
    elif "input_ids" in body:
        ids = tensor(body["input_ids"], "input_ids", torch.long, 2)
    else:
        raise BadField(None, 'send "prompt" (text) or "input_ids" ([[...]]) to /v1/generate')
    sampling = Sampling(field(body, "do_sample", bool, False), float(field(body, "temperature", (int, float), 1.0)),
                        field(body, "top_k", int, 0), float(field(body, "top_p", (int, float), 1.0)),
                        field(body, "seed", int))
    eos = getattr(tok, "eos_token_id", None) if tok is not None else None
    stop_ids = field(body, "stop_ids", list, [])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in stop_ids):
        raise BadField("stop_ids", f'"stop_ids" must be a list of token ids (integers), got {stop_ids!r:.80}')
    stops = tuple(stop_ids) + ((eos,) if isinstance(eos, int) else ())
    gen = ctx.generate(ids, max_new_tokens=field(body, "max_new_tokens", int, 32), sampling=sampling,
                       stop_ids=stops, decode=decode_mode(body), budget=request_budget(body),
                       fidelity=request_fidelity(body))
    text = tok.decode(gen.new_ids, skip_special_tokens=True) if tok is not None else None
    assert gen.prefill_stats is not None
    return {"text": text, "token_ids": gen.new_ids, "stopped_by": gen.stopped_by, "decode": gen.mode,
            "prefill_stats": gen.prefill_stats.to_dict(), "bytes": gen.phases(),
            "decode_bytes_per_token": gen.decode_bytes_per_token, "prism": gen.planned}

