"""Text generation under PRISM: a distributed prefill, then one new position at a time on the last device.

Layout: the prompt is split across the P devices as in any forward pass (partition-aware causal mask,
Segment Means from earlier to later devices).  Every new token joins the **last** device's slice: in a
decoder no position attends to a later one, so the earlier devices never need the new tokens, and the
last device holds its own exact K/V (prompt slice and generated tokens) and what it received at prefill.
The decode mode (runtime/decode.py) says what else a new token sees of the earlier devices' rows.

`decode_loop` is the one decoding loop: the simulator's `generate` and the device processes
(cluster/generation.py) run it on the last device's executor and differ only in their `Peers`, what
carries the hand-off, the queries and the token stream (here: `LocalPeers`, every tensor through a
LocalCommunicator whose ledger counts it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from ..config import PrismConfig, RunConfig, resolve
from ..models import adapter_for
from ..models.base import check_ids
from .comm import LocalCommunicator
from .decode import Link, choose
from .device import DeviceExecutor
from .sampling import Sampling
from .simulator import run_devices
from .stages import layout_for
from .stats import Stats
from .wire import MAX_STOPS, TOKEN_ID_BYTES, DecodeParams

TokenCallback = Callable[[int], "bool | None"]  # on_token(id) -> True to stop generating


@dataclass
class Generation:
    prompt_ids: Tensor  # (1, N)
    new_ids: list[int] = field(default_factory=list)
    prefill_stats: Stats | None = None
    mode: str = "local"  # how new tokens saw the prompt: local | handoff | distributed (runtime.decode)
    handoff_bytes: int = 0  # sent once after prefill (handoff)
    decode_bytes: int = 0  # sent between devices while decoding (distributed), token ids excluded
    stage_bytes: int = 0  # pipeline stages: each new position's hidden row from stage to stage and back
    stopped_by: str = "max_new_tokens"
    logits: list[Tensor] = field(default_factory=list)  # (V,) per new token, when keep_logits
    planned: dict | None = None  # a cluster's plan for the prefill: which ran, predicted and measured ms

    @property
    def prefill_bytes(self) -> int:
        return self.prefill_stats.total_bytes if self.prefill_stats is not None else 0

    @property
    def decode_bytes_per_token(self) -> float:
        """Bytes between devices per new token, the token id handed to the coordinator included."""
        return (self.decode_bytes + self.stage_bytes) / max(1, len(self.new_ids)) + TOKEN_ID_BYTES

    @property
    def total_bytes(self) -> int:
        """Prefill (its stage hand-offs included), hand-off and decode: every byte between devices for this
        generation."""
        prefill = self.prefill_bytes + (self.prefill_stats.stage_bytes if self.prefill_stats is not None else 0)
        return (prefill + self.handoff_bytes + self.decode_bytes + self.stage_bytes
                + TOKEN_ID_BYTES * len(self.new_ids))

    def phases(self) -> dict[str, float]:
        return {"prefill": self.prefill_bytes, "handoff": self.handoff_bytes, "decode": self.decode_bytes,
                "stage": self.stage_bytes, "per_token": self.decode_bytes_per_token, "total": self.total_bytes}

    @property
    def ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, torch.tensor([self.new_ids], dtype=self.prompt_ids.dtype)], dim=1)


# --------------------------------------------------------------------------- what a request may ask
def check_prompt(adapter, input_ids: Tensor, max_new_tokens: int) -> None:
    """What both the simulator's and the cluster's generate refuse, with what to do instead."""
    model = adapter.model
    if not adapter.geometry.causal or adapter.head != "lm":
        raise ValueError(f"generation needs a causal LM (GPT2LMHeadModel, LlamaForCausalLM), got {type(model).__name__}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError("generate takes one prompt: input_ids of shape (1, length); loop over prompts for more")
    check_ids(input_ids, "input_ids", adapter.vocab_size(), "the model's vocabulary")
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty; give at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    limit = adapter.position_limit()
    if limit and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceed the model's "
                         f"{limit} positions; shorten one of them")


def check_stop_ids(stop_ids: Sequence[int], vocab: int) -> tuple[int, ...]:
    """Stop token ids: at most MAX_STOPS integers in the vocabulary."""
    if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, Sequence):
        raise ValueError(f"stop_ids must be a list of token ids, got {type(stop_ids).__name__}")
    if len(stop_ids) > MAX_STOPS:
        raise ValueError(f"stop_ids takes at most {MAX_STOPS} token ids, got {len(stop_ids)}")
    for tid in stop_ids:
        if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < vocab:
            raise ValueError(f"stop_ids must be token ids in [0, {vocab}), got {tid!r}")
    return tuple(stop_ids)


def check_request(adapter, input_ids: Tensor, max_new_tokens: int, sampling: Sampling | None,
                  stop_ids: Sequence[int], on_token: TokenCallback | None) -> tuple[Sampling, tuple[int, ...]]:
    """Every check of a generation request, before anything runs: (sampling, stop ids) as they will be used."""
    sampling = sampling if sampling is not None else Sampling()
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a Sampling(...), got {type(sampling).__name__}")
    if on_token is not None and not callable(on_token):
        raise ValueError("on_token must be a function of one token id (or None)")
    stops = check_stop_ids(stop_ids, adapter.vocab_size())
    check_prompt(adapter, input_ids, max_new_tokens)
    return sampling, stops


# --------------------------------------------------------------------------- the decoding loop
class Peers(Protocol):
    """The decoding device's view of the other devices while it decodes (what carries the tensors)."""

    def token(self, tid: int) -> bool:
        """A new token was picked (hand it on); True: stop after it."""

    def enter(self, index: int) -> list[list[Tensor]] | None:
        """Layer `index` of a new position begins: every earlier device's hand-off for it, once (handoff)."""

    def ask(self, index: int, query: Tensor) -> list[list[Tensor]]:
        """Distributed: every earlier device's partial attention [out, lse] for this layer's query."""


Onward = Callable[[Tensor, Tensor], Tensor]  # (x, positions) after the first stage's layers -> x back from the last


def decode_loop(dev: DeviceExecutor, peers: Peers, params: DecodeParams, logits: Tensor, position: int,
                result: Generation, keep_logits: bool = False, teacher: list[int] | None = None,
                onward: Onward | None = None) -> None:
    """Pick a token from `logits` (B=1, V), hand it on, run it through every layer on `dev` (the last device,
    after a prefill with keep_cache), repeat: until max_new_tokens, a stop token, or `peers` says stop.
    With pipeline stages `dev` is the first stage's last device (it embeds and holds the head) and `onward`
    carries each new position through the later stages and back.
    teacher: feed these tokens instead of the picked ones (keep_logits shows what the model would have said)."""
    device = logits.device
    sampling = params.sampling
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    ask = peers.ask if params.mode == "distributed" else None
    for _ in range(params.max_new_tokens):
        if keep_logits:
            result.logits.append(logits[0].float().cpu())
        token = sampling.pick(logits, generator)  # (1,)
        if teacher is not None:
            token = torch.tensor([teacher[len(result.new_ids)]], device=device)
        tid = int(token)
        result.new_ids.append(tid)
        if peers.token(tid):
            result.stopped_by = "stop"
            break
        if tid in params.stop_ids:
            result.stopped_by = "stop token"
            break
        if len(result.new_ids) == params.max_new_tokens:
            break  # the last token is never fed back: its logits would go unused
        pos = torch.tensor([[position]], device=device)
        x = dev.embed({"input_ids": token.view(1, 1), "positions": pos})
        x = through_layers(dev, peers, x, pos, ask)
        if onward is not None:
            x = onward(x, pos)
        logits = dev.final(x)["logits"][:, -1]
        position += 1


def through_layers(dev: DeviceExecutor, peers: Peers, x: Tensor, pos: Tensor, ask=None) -> Tensor:
    """A new position through the layers `dev` holds, each seeing the earlier devices as the decode mode says."""
    for i in dev.layers:
        handed = peers.enter(i)
        if handed is not None:
            dev.install_handoff(i, handed)
        x = dev.decode_layer(i, x, pos, ask)
    return x


class LocalPeers:
    """The simulator's peers: every device in this process, every tensor through one LocalCommunicator (its
    ledger counts the hand-off and the decode traffic, as the device processes' communicators do)."""

    def __init__(self, devs: list[DeviceExecutor], mode: str, on_token: TokenCallback | None = None) -> None:
        self.devs, self.on_token, self.last, self.mode = devs, on_token, len(devs) - 1, mode
        self.comm = LocalCommunicator(len(devs))
        self.handed: dict[int, list[list[Tensor]]] = {}
        if mode == "handoff" and self.last > 0:  # once, right after the prefill (the device processes overlap it with decoding)
            for i in devs[-1].layers:
                got = self.comm.exchange("handoff", [{self.last: d.handoff_message(i)} for d in devs[:-1]] + [{}])
                self.handed[i] = [got[self.last][p] for p in range(self.last)]

    def token(self, tid: int) -> bool:
        return bool(self.on_token(tid)) if self.on_token is not None else False

    def enter(self, index: int) -> list[list[Tensor]] | None:
        return self.handed.pop(index, None)

    def ask(self, index: int, query: Tensor) -> list[list[Tensor]]:
        earlier = range(self.last)
        asked = self.comm.exchange("decode", [{} for _ in earlier] + [{p: [query] for p in earlier}])
        answers = [{self.last: self.devs[p].answer(index, asked[p][self.last][0])} for p in earlier]
        got = self.comm.exchange("decode", answers + [{}])
        return [got[self.last][p] for p in earlier]

    def bytes(self, stage: str) -> int:
        return sum(b for (s, _, _), b in self.comm.ledger.entries.items() if s == stage)


@torch.inference_mode()
def generate(
    model: nn.Module,
    cfg: PrismConfig | RunConfig,
    input_ids: Tensor,
    *,
    max_new_tokens: int = 32,
    sampling: Sampling | None = None,
    stop_ids: Sequence[int] = (),
    on_token: TokenCallback | None = None,
    keep_logits: bool = False,
    decode: str = "auto",
    link: Link | None = None,
    teacher: list[int] | None = None,
) -> Generation:
    """Prefill `input_ids` (one prompt, shape (1, N)) across cfg.devices, then decode on the last device.

    on_token(id) is called for each new token; returning True stops the generation.
    decode: local | handoff | distributed | auto (runtime.decode; `link` is what auto assumes).
    teacher: feed these tokens instead of the sampled ones (teacher forcing; keep_logits shows what the
    model would have said at each step)."""
    adapter = adapter_for(model)
    sampling, stops = check_request(adapter, input_ids, max_new_tokens, sampling, stop_ids, on_token)
    device = next(model.parameters()).device
    run = resolve(cfg, adapter.kind).for_generation()  # once, here: the prefill and every decode step read this one
    out, devs = run_devices(model, run, input_ids=input_ids.to(device), count_flops=False, keep_cache=True,
                            outputs="last")  # as the device processes' prefill: only the last row's logits matter
    groups = [devs[st.first_rank:st.first_rank + st.devices] for st in layout_for(run, adapter).stages]
    last = groups[0][-1]
    mode = choose(decode, last.plan, last.request_positions, last.geo, last.codec.wire, max_new_tokens,
                  link or Link())
    result = Generation(prompt_ids=input_ids.cpu(), prefill_stats=out.stats, mode=mode)
    peers = LocalPeers(groups[0], mode, on_token)
    later = LocalStages(groups[1:], mode) if len(groups) > 1 else None
    assert out.logits is not None  # a causal LM's output (check_prompt)
    decode_loop(last, peers, DecodeParams(max_new_tokens, sampling, stops, mode), out.logits[:, -1],
                input_ids.shape[1], result, keep_logits, teacher, onward=later)
    every = [peers] + (later.peers if later is not None else [])
    result.handoff_bytes = sum(p.bytes("handoff") for p in every)
    result.decode_bytes = sum(p.bytes("decode") for p in every)
    result.stage_bytes = later.hops if later is not None else 0
    return result


class LocalStages:
    """The simulator's later pipeline stages while decoding: a new position's hidden row goes to each stage's last
    device, through its layers (that stage's peers as the decode mode says), and back to the first stage."""

    def __init__(self, groups: list[list[DeviceExecutor]], mode: str) -> None:
        self.groups = groups
        self.peers = [LocalPeers(devs, mode) for devs in groups]
        self.hops = 0  # bytes of hidden rows between the stages' decoding devices

    def __call__(self, x: Tensor, pos: Tensor) -> Tensor:
        for devs, peers in zip(self.groups, self.peers):
            self.hops += TOKEN_ID_BYTES + x.numel() * x.element_size()  # its position and row, to this stage's decoder
            x = through_layers(devs[-1], peers, x, pos, peers.ask if peers.mode == "distributed" else None)
        self.hops += x.numel() * x.element_size()  # back to the first stage's
        return x
