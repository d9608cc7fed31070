"""OpenAI-compatible endpoints over a running cluster: the official `openai` client works against them.

  GET  /v1/models                 the served model
  POST /v1/completions            {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
  POST /v1/chat/completions       {"model", "messages", ... the same ...}: the tokenizer's chat template
  (POST /v1/embeddings: embeddings.py)

temperature 0 decodes greedily, anything above samples (OpenAI's default is 1); top_p is nucleus
sampling.  `stop` (a string or up to 4) ends the text just before the first one, and the last device
stops within a few tokens of it.  Replies carry `usage` and an extra `prism` field with what PRISM did:
devices, compression rate, and the bytes of every phase.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from torch import Tensor

from ...runtime.generate import TOKEN_ID_BYTES, Generation, Sampling
from ...runtime.stats import Stats
from ...cluster import Cluster
from .api import ApiError, BadField, Ctx, Emit, Stream, decode_mode, field, request_budget, request_fidelity
from ...eval.requests import chat_ids, check_ids
from .textstream import TextStream

DEFAULT_MAX_TOKENS = 256
MAX_STOPS = 4  # OpenAI's limit
ROLES = ("system", "developer", "user", "assistant")
STARTED = int(time.time())


def model_id(cluster: Cluster) -> str:
    return str(cluster.model_name)


def check_model(cluster: Cluster, body: dict[str, Any]) -> str:
    """The request's "model" must name the served one (its alias or path, or the folder's name)."""
    name: str | None = field(body, "model", str)
    if not name:
        raise BadField("model", f'"model" is required; this server serves {model_id(cluster)!r}')
    served = model_id(cluster)
    if name not in (served, Path(served).name):
        raise ApiError(404, f"model {name!r} is not served here; this server serves {served!r} (GET /v1/models)",
                       "model", "model_not_found")
    return served


def list_models(ctx: Ctx, body: dict[str, Any]) -> dict[str, Any]:
    cluster: Cluster = ctx.cluster
    card = {"id": model_id(cluster), "object": "model", "created": STARTED, "owned_by": "prism-edge",
            "prism": {"class": type(cluster.model).__name__, "devices": cluster.world, "cr": cluster.cfg.effective_cr}}
    served = model_id(cluster)
    if "id" in body:  # GET /v1/models/ID
        if body["id"] not in (served, Path(served).name):
            raise ApiError(404, f"model {body['id']!r} is not served here; this server serves {served!r}",
                           "model", "model_not_found")
        return card
    return {"object": "list", "data": [card]}


def prism_figures(cluster: Cluster, stats: Stats | None, gen: Generation | None = None,
                  budget: float | None = None, planned: dict[str, Any] | None = None) -> dict[str, Any]:
    """What PRISM did for the request: the split, its byte budget (the request's, else the server's; 0: fixed
    counts), the bytes of every phase (counted from the tensors sent), and the plan that ran (`plan`: which, its
    predicted and measured time)."""
    cfg = cluster.cfg.with_budget(budget)
    cfg = cfg.for_generation() if gen is not None else cfg
    out: dict[str, Any] = {"devices": cluster.world, "scheme": cfg.scheme, "cr": cfg.effective_cr,
                           "weights": list(cfg.weights) if cfg.weights else None,
                           "budget": cfg.budget if cfg.scheme == "prism" else None}
    if planned is not None:
        out["plan"] = planned
        out["devices"] = planned["devices"]
    if stats is not None:
        out["bytes"] = {"inputs": sum(stats.input_bytes or ()), "exchange": stats.total_bytes,
                        "outputs": sum(stats.output_bytes or ())}
        if gen is not None:
            out["bytes"].update(handoff=gen.handoff_bytes, decode=gen.decode_bytes + TOKEN_ID_BYTES * len(gen.new_ids))
            out["decode"] = gen.mode
        out["exchange_per_device"] = {"sent": [stats.bytes_sent(p) for p in range(stats.world)],
                                      "received": [stats.bytes_received(p) for p in range(stats.world)]}
        out["prefill_s" if gen is not None else "wall_s"] = stats.wall_s
    return out


@dataclass(frozen=True)
class Params:
    """The generation options of a completions request."""

    max_tokens: int
    sampling: Sampling
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    decode: str = "auto"  # an extension: how new tokens see the earlier devices (runtime.decode)
    budget: float | None = None  # an extension: the prefill's byte budget (None: the server's)
    fidelity: str | float | None = None  # an extension: what a planning server may trade (None: the server's)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = float(field(body, name, (int, float), default))
    if value < low or value > high or (open_low and value == low):
        raise BadField(name, f'"{name}" must be {"above" if open_low else "at least"} {low:g} and at most {high:g}, '
                             f"got {value:g}")
    return value


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = field(body, "stop", (str, list))
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise BadField("stop", f'"stop" must be a non-empty string or a list of at most {MAX_STOPS} of them')
    return tuple(stops)


def parse_params(body: dict[str, Any]) -> Params:
    for name in ("presence_penalty", "frequency_penalty"):
        if field(body, name, (int, float), 0):
            raise BadField(name, f'"{name}" is not supported; leave it 0')
    if field(body, "n", int, 1) != 1:
        raise BadField("n", '"n" must be 1: one choice per request')
    if body.get("logprobs") or body.get("echo") or body.get("best_of", 1) != 1:
        name = next(k for k in ("logprobs", "echo", "best_of") if body.get(k) not in (None, False, 0, 1))
        raise BadField(name, f'"{name}" is not supported')
    max_tokens = field(body, "max_completion_tokens", int) or field(body, "max_tokens", int, DEFAULT_MAX_TOKENS)
    if max_tokens < 1:
        raise BadField("max_tokens", f'"max_tokens" must be >= 1, got {max_tokens}')
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, open_low=True)
    sampling = Sampling(do_sample=temperature > 0, temperature=temperature or 1.0, top_p=top_p,
                        seed=field(body, "seed", int))
    options = field(body, "stream_options", dict, {})
    return Params(max_tokens, sampling, _stops(body), field(body, "stream", bool, False),
                  bool(options.get("include_usage")), decode_mode(body), request_budget(body), request_fidelity(body))


@dataclass
class Outcome:
    """What one generation produced, in OpenAI's terms."""

    text: str
    finish_reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int
    prism: dict[str, Any]

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def generate(ctx: Ctx, ids: Tensor, params: Params, show: Callable[[str], bool] | None = None) -> Outcome:
    """Generate on the cluster, handing each piece of safe text to `show` (False: the client left, stop)."""
    cluster: Cluster = ctx.cluster
    tok: Any = cluster.tokenizer
    text = TextStream(tok, params.stops)
    gone = False

    def on_token(tid: int) -> bool:
        nonlocal gone
        piece = text.push(tid)
        if piece and show is not None and not show(piece):
            gone = True
        return text.stopped or gone

    eos = getattr(tok, "eos_token_id", None)
    gen: Generation = ctx.generate(ids, max_new_tokens=params.max_tokens, sampling=params.sampling,
                                       stop_ids=(eos,) if isinstance(eos, int) else (), on_token=on_token,
                                       decode=params.decode, budget=params.budget, fidelity=params.fidelity)
    rest = text.flush()
    if rest and show is not None and not gone:
        show(rest)
    finish = "stop" if text.stopped or gen.stopped_by == "stop token" else "length"
    return Outcome(text.text, finish, int(ids.shape[1]), len(gen.new_ids),
                   prism_figures(cluster, gen.prefill_stats, gen, params.budget, gen.planned))


def _checked(cluster: Cluster, ids: Tensor, params: Params) -> Tensor:
    """Refuse what generate would refuse, while a status code can still say so."""
    if not cluster.adapter.geometry.causal or cluster.adapter.head != "lm":
        raise BadField("model", f"{model_id(cluster)!r} is not a causal LM; completions need one (e.g. smollm2)")
    cluster.check_generate(ids, params.max_tokens, params.budget)
    return ids


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = field(body, "messages", list)
    if not messages:
        raise BadField("messages", '"messages" must be a non-empty list of {"role", "content"} objects')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadField(f"messages[{i}]", f"messages[{i}] needs a role among {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadField(f"messages[{i}].content", "only text content parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise BadField(f"messages[{i}].content", f"messages[{i}].content must be a string")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _prompt(cluster: Cluster, body: dict[str, Any]) -> Tensor:
    import torch

    prompt, tok = body.get("prompt"), cast(Any, cluster.tokenizer)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return check_ids(tok(prompt, return_tensors="pt")["input_ids"])
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return torch.tensor([prompt], dtype=torch.long)
    raise BadField("prompt", '"prompt" must be a non-empty string or token id list (one prompt per request)')


def handle_completions(ctx: Ctx, body: dict[str, Any]) -> dict[str, Any] | Stream:
    cluster: Cluster = ctx.cluster
    served, params = check_model(cluster, body), parse_params(body)
    ids = _checked(cluster, _prompt(cluster, body), params)
    return _reply(ctx, served, ids, params, chat=False)


def handle_chat(ctx: Ctx, body: dict[str, Any]) -> dict[str, Any] | Stream:
    cluster: Cluster = ctx.cluster
    served, params, messages = check_model(cluster, body), parse_params(body), _messages(body)
    if cluster.tokenizer is None:
        raise BadField("model", f"{served!r} has no tokenizer; chat needs one")
    ids = _checked(cluster, check_ids(chat_ids(cluster.tokenizer, messages)), params)
    return _reply(ctx, served, ids, params, chat=True)


def _reply(ctx: Ctx, served: str, ids: Tensor, params: Params, chat: bool) -> dict[str, Any] | Stream:
    head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
            "model": served}
    if params.stream:
        return Stream(lambda emit: _stream(ctx, ids, params, chat, head, emit))
    done = generate(ctx, ids, params)
    choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason, "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": done.text}} if chat else {"text": done.text})
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": done.usage, "prism": done.prism}


def _stream(ctx: Ctx, ids: Tensor, params: Params, chat: bool, head: dict[str, Any], emit: Emit) -> None:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        if chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": piece} if piece is not None else {})
            body: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            body = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return {**head, "object": kind, "choices": [body]}

    if chat and not emit(chunk("", role=True)):
        return
    done = generate(ctx, ids, params, lambda piece: emit(chunk(piece)))
    last = chunk(None if chat else "", done.finish_reason)
    if emit({**last, "prism": done.prism}) and params.include_usage:
        emit({**head, "object": kind, "choices": [], "usage": done.usage})
