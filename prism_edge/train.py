"""Training through the partitioned forward (PRISM-aware fine-tuning), and the plain training loop it shares.

The simulator is differentiable end to end: gradients reach every device's weights through the
Segment Means, so a model can adapt to seeing its remote context compressed.  `fit` runs that loop
for any loss; with `PrismConfig(scheme="full")` it is plain (unpartitioned) training, which is how
the bundled Fashion-MNIST ViT was trained from scratch.

LoRA: `add_lora` wraps chosen nn.Linear layers with a low-rank update (the base weight frozen);
`merge_lora` folds the update back into plain nn.Linear weights, so a fine-tuned model saves as an
ordinary Hugging Face checkpoint that every prism-edge path (simulator, runtime, HTTP) loads as is.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import PrismConfig
from .runtime.simulator import simulate

TRAINABLE = ("all", "lora", "head", "attention")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: steps, optimiser and which weights move."""

    steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int = 0  # linear warm-up steps, then cosine decay to 10 % of lr
    grad_clip: float = 1.0
    trainable: str = "all"  # all | lora (low-rank updates of the attention projections) | head | attention
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"unknown trainable {self.trainable!r}; choose one of {', '.join(TRAINABLE)}")
        if self.trainable == "lora" and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps), got {self.warmup} with steps={self.steps}")


# --- LoRA ----------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(x)); B starts at zero, so training starts at the base model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        return self.base


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "c_attn")


def add_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Wrap every nn.Linear whose name is in `targets` (the attention projections); returns how many."""
    wrapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha))
                wrapped += 1
    if wrapped == 0:
        raise ValueError(f"no linear layer named one of {targets} to put LoRA on; use trainable='all'")
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRALinear back into a plain nn.Linear (in place); returns how many."""
    merged = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
                merged += 1
    return merged


def select_trainable(model: nn.Module, tcfg: TrainConfig) -> list[nn.Parameter]:
    """Freeze what `tcfg.trainable` leaves fixed; return the parameters to optimise."""
    if tcfg.trainable == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        add_lora(model, tcfg.lora_rank, tcfg.lora_alpha)
        return [p for n, p in model.named_parameters() if "lora_" in n]
    for name, p in model.named_parameters():
        if tcfg.trainable == "all":
            p.requires_grad_(True)
        elif tcfg.trainable == "head":
            p.requires_grad_(any(k in name for k in ("classifier", "pooler", "lm_head", "score")))
        else:  # attention: the projections the exchanged rows pass through
            p.requires_grad_(any(k in name for k in ("attention", "attn", "classifier")))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"trainable={tcfg.trainable!r} selects no parameter of {type(model).__name__}")
    return params


# --- the loop ------------------------------------------------------------------------------------

def forward(model: nn.Module, cfg: PrismConfig, inputs: dict[str, Tensor]):
    """The partitioned forward (simulator), or the plain HF forward for scheme 'full' (faster, same math)."""
    if cfg.scheme == "full":
        return model(**inputs)
    return simulate(model, cfg, count_flops=False, **inputs)


def classification_loss(model: nn.Module, cfg: PrismConfig, batch: dict[str, Tensor]) -> Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return nn.functional.cross_entropy(forward(model, cfg, inputs).logits, batch["labels"])


def lm_loss(model: nn.Module, cfg: PrismConfig, batch: dict[str, Tensor]) -> Tensor:
    """Next-token cross-entropy over real (unpadded) positions."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    logits = forward(model, cfg, batch).logits[:, :-1]
    target = ids[:, 1:]
    keep = torch.ones_like(target, dtype=torch.bool) if mask is None else (mask[:, 1:] & mask[:, :-1]).bool()
    return nn.functional.cross_entropy(logits[keep], target[keep])


LossFn = Callable[[nn.Module, PrismConfig, dict[str, Tensor]], Tensor]


def fit(model: nn.Module, cfg: PrismConfig, tcfg: TrainConfig, batches: Iterator[dict[str, Tensor]],
        loss_fn: LossFn, progress: bool = True, params: list[nn.Parameter] | None = None) -> list[float]:
    """Train `model` for `tcfg.steps` batches through the forward `cfg` describes; returns the losses.

    `params` defaults to `select_trainable(model, tcfg)` (which may add LoRA; call `merge_lora` after).
    """
    from tqdm import tqdm

    torch.manual_seed(tcfg.seed)
    params = params if params is not None else select_trainable(model, tcfg)
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)

    def schedule(step: int) -> float:
        if step < tcfg.warmup:
            return (step + 1) / (tcfg.warmup + 1)
        t = (step - tcfg.warmup) / max(1, tcfg.steps - tcfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(tcfg.steps), desc=f"train {cfg.scheme} P={cfg.effective_devices} CR={cfg.effective_cr}",
               disable=not progress, dynamic_ncols=True)
    try:
        for _ in bar:
            loss = loss_fn(model, cfg, next(batches))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}; lower the learning rate (--lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    finally:
        model.eval()
    return losses


# --- saving --------------------------------------------------------------------------------------

RECORD = "prism_edge_training.json"


def save(model: nn.Module, folder: str | Path, tokenizer=None, record: dict | None = None) -> Path:
    """Save a (LoRA-merged) model as a plain HF safetensors checkpoint, plus how it was trained."""
    folder = Path(folder)
    merge_lora(model)  # the saved weights are the merged ones
    config = model.config
    quant = getattr(config, "quantization_config", None)
    if quant is not None:  # a GGUF-loaded model: its weights are plain fp32 tensors by now
        del config.quantization_config
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if record is not None:
        (folder / RECORD).write_text(json.dumps(record, indent=1, default=str))
    return folder


def training_record(cfg: PrismConfig, tcfg: TrainConfig, losses: list[float], **extra) -> dict:
    return {"prism": asdict(cfg), "train": asdict(tcfg), "first_loss": losses[0] if losses else None,
            "last_loss": sum(losses[-10:]) / max(1, len(losses[-10:])), "steps": len(losses),
            "date": time.strftime("%Y-%m-%d"), **extra}
