"""Text generation under PRISM (simulator): distributed prefill, then KV-cache decode on the last device.

Layout: the prompt is split across the P devices as in any forward pass (partition-aware causal
mask, Segment Means from earlier to later devices).  Every new token is appended to the **last**
device's slice.  In a decoder no position ever attends to a later one, so the earlier devices never
need the new tokens, and the last device already holds everything a new token may see: its own
exact K/V (prompt slice + generated tokens) and the rows it received from the earlier devices at
prefill (means, sinks, halo).  Decoding therefore needs **no traffic after prefill** beyond handing
each new token id to whoever prints it (8 bytes), and it is exact for this layout: the same as
re-running the PRISM forward over the grown sequence with the prompt's slices and the new tokens on
the last device (tested).  The cost: decode runs on one device, and the new tokens see the earlier
devices only through the prefill's compressed rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import PrismConfig, RunConfig, resolve
from ..models import adapter_for
from ..models.base import check_ids
from .comm import ByteLedger
from .decode import MODES, Link, choose, distributed_step, handoff, local_step
from .simulator import run_devices
from .stats import Stats

TOKEN_ID_BYTES = 8  # an int64 token id from the last device to the coordinator


@dataclass
class Sampling:
    """Greedy when do_sample is False; otherwise temperature, top-k (0 = off), top-p (1 = off), seed."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        def number(name: str, value) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be true or false, got {self.do_sample!r}")
        if number("temperature", self.temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if not 0 < number("top_p", self.top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}; 1 turns it off")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}; 0 turns it off")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    def pick(self, logits: Tensor, generator: torch.Generator | None) -> Tensor:
        """(B, V) -> (B,) next token ids."""
        if not self.do_sample:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
            drop = probs.cumsum(-1) - probs > self.top_p  # keep the smallest prefix reaching top_p
            logits = logits.scatter(-1, order, logits.gather(-1, order).masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


MAX_STOPS = 8
PARAMS = 10 + MAX_STOPS  # [max_new, do_sample, temperature, top_k, top_p, seed high, seed low, stops, mode, -, stop ids]


def encode_request(max_new_tokens: int, sampling: Sampling, stop_ids: tuple[int, ...], mode: str = "local") -> Tensor:
    """The decode parameters as one float64 tensor (what rank 0 sends every device after the prefill).
    The seed travels as two 32-bit halves, which float64 holds exactly."""
    if len(stop_ids) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop token ids, got {len(stop_ids)}")
    seed = sampling.seed
    t = torch.zeros(PARAMS, dtype=torch.float64)
    t[:10] = torch.tensor([max_new_tokens, float(sampling.do_sample), sampling.temperature, sampling.top_k,
                           sampling.top_p, -1 if seed is None else seed >> 32, 0 if seed is None else seed & 0xFFFFFFFF,
                           len(stop_ids), MODES.index(mode), 0], dtype=torch.float64)
    t[10 : 10 + len(stop_ids)] = torch.tensor(stop_ids, dtype=torch.float64)
    return t


def decode_request(t: Tensor) -> tuple[int, Sampling, tuple[int, ...], str]:
    v = t.tolist()
    seed = None if v[5] < 0 else (int(v[5]) << 32) | int(v[6])
    stops = tuple(int(x) for x in v[10 : 10 + int(v[7])])
    return int(v[0]), Sampling(bool(v[1]), v[2], int(v[3]), v[4], seed), stops, MODES[int(v[8])]


@dataclass
class Generation:
    prompt_ids: Tensor  # (1, N)
    new_ids: list[int] = field(default_factory=list)
    prefill_stats: Stats | None = None
    mode: str = "local"  # how new tokens saw the prompt: local | handoff | distributed (runtime.decode)
    handoff_bytes: int = 0  # sent once after prefill (handoff)
    decode_bytes: int = 0  # sent between devices while decoding (distributed), token ids excluded
    stopped_by: str = "max_new_tokens"
    logits: list[Tensor] = field(default_factory=list)  # (V,) per new token, when keep_logits

    @property
    def prefill_bytes(self) -> int:
        return self.prefill_stats.total_bytes if self.prefill_stats is not None else 0

    @property
    def decode_bytes_per_token(self) -> float:
        """Bytes between devices per new token, the token id handed to the coordinator included."""
        return self.decode_bytes / max(1, len(self.new_ids)) + TOKEN_ID_BYTES

    @property
    def total_bytes(self) -> int:
        """Prefill, hand-off and decode: every byte between devices for this generation."""
        return self.prefill_bytes + self.handoff_bytes + self.decode_bytes + TOKEN_ID_BYTES * len(self.new_ids)

    def phases(self) -> dict[str, float]:
        return {"prefill": self.prefill_bytes, "handoff": self.handoff_bytes, "decode": self.decode_bytes,
                "per_token": self.decode_bytes_per_token, "total": self.total_bytes}

    @property
    def ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, torch.tensor([self.new_ids], dtype=self.prompt_ids.dtype)], dim=1)


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
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceed the model's "
                         f"{limit} positions; shorten one of them")


@torch.inference_mode()
def generate(
    model: nn.Module,
    cfg: PrismConfig | RunConfig,
    input_ids: Tensor,
    *,
    max_new_tokens: int = 32,
    sampling: Sampling | None = None,
    stop_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
    keep_logits: bool = False,
    decode: str = "auto",
    link: Link | None = None,
    teacher: list[int] | None = None,
) -> Generation:
    """Prefill `input_ids` (one prompt, shape (1, N)) across cfg.devices, then decode on the last device.

    decode: local | handoff | distributed | auto (runtime.decode; `link` is what auto assumes).
    teacher: feed these tokens instead of the sampled ones (teacher forcing; keep_logits shows what the
    model would have said at each step)."""
    adapter = adapter_for(model)
    check_prompt(adapter, input_ids, max_new_tokens)
    sampling = sampling or Sampling()
    device = next(model.parameters()).device
    run = resolve(cfg, adapter.kind)  # once, here: the prefill and every decode step read this one
    out, devs = run_devices(model, run, input_ids=input_ids.to(device), count_flops=False, keep_cache=True)
    last, positions = devs[-1], devs[-1].positions.new_tensor(range(input_ids.shape[1])).unsqueeze(0)
    mode = choose(decode, last.plan, positions, last.geo, last.codec.wire, max_new_tokens, link or Link())
    result = Generation(prompt_ids=input_ids.cpu(), prefill_stats=out.stats, mode=mode)
    ledger = ByteLedger()
    if mode == "handoff":
        handoff(devs, positions, ledger)
    if mode == "distributed":
        def step(i, x, pos):
            return distributed_step(devs, positions, i, x, pos, ledger)
    else:
        def step(i, x, pos):
            return local_step(last, i, x, pos)
    assert out.logits is not None  # a causal LM's output (check_prompt)
    decode_loop(adapter, step, out.logits[:, -1], input_ids.shape[1], max_new_tokens, sampling, stop_ids,
                result, on_token, keep_logits, teacher)
    result.handoff_bytes = sum(b for (stage, _, _), b in ledger.entries.items() if stage == "handoff")
    result.decode_bytes = sum(b for (stage, _, _), b in ledger.entries.items() if stage == "decode")
    return result


def decode_loop(adapter, step, logits: Tensor, position: int, max_new_tokens: int, sampling: Sampling,
                stop_ids: tuple[int, ...], result: Generation, on_token=None, keep_logits: bool = False,
                teacher: list[int] | None = None) -> None:
    """Sample, run the new token through every layer with `step(layer, x, positions)`, repeat: the same
    loop in the simulator and the runtime."""
    device = logits.device
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    for _ in range(max_new_tokens):
        if keep_logits:
            result.logits.append(logits[0].float().cpu())
        token = sampling.pick(logits, generator)  # (1,)
        if teacher is not None:
            token = torch.tensor([teacher[len(result.new_ids)]], device=device)
        tid = int(token)
        result.new_ids.append(tid)
        if on_token is not None:
            on_token(tid)
        if tid in stop_ids:
            result.stopped_by = "stop token"
            break
        if len(result.new_ids) == max_new_tokens:
            break  # the last token is never fed back: its logits would go unused
        pos = torch.tensor([[position]], device=device)
        x = adapter.embed({"input_ids": token.view(1, 1), "positions": pos})
        for i in range(adapter.geometry.layers):
            x = step(i, x, pos)
        logits = adapter.final(x)["logits"][:, -1]
        position += 1
