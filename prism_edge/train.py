"""Training through the partitioned forward (PRISM-aware fine-tuning), and the plain training loop it shares.

The simulator is differentiable end to end: gradients reach every device's weights through the
Segment Means, so a model can adapt to seeing its remote context compressed.  `fit` runs that loop
for any loss; with `PrismConfig(scheme="full")` it is plain (unpartitioned) training, which is how
the bundled Fashion-MNIST ViT was trained from scratch.

One split or every split: `fit` takes a fixed PrismConfig, or a `Splits` that draws one per step
(P from 1 to a maximum, CR from a set, fidelity variants from a list), so one checkpoint learns to
work whatever split it is served at.  With `distill_loss` the target is the frozen unpartitioned
model's own output distribution (KL), optionally mixed with the task loss: the model learns to
behave under a split as it did whole, instead of re-learning the task on one split.

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
from typing import Any

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


# --- one split or many ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Splits:
    """A random split per training step: P uniform in 1..max_devices, CR from `crs`, a variant from
    `variants` (`prism-edge eval --variants` spelling).  An int8 wire has no gradient, so it is
    trained as float32 (the rounding is served, not trained)."""

    max_devices: int = 4
    crs: tuple[int, ...] = (16, 64)
    variants: tuple[str, ...] = ("defaults",)
    seed: int = 0

    def __post_init__(self) -> None:
        from .eval.variants import variant_options

        if self.max_devices < 1 or not self.crs or min(self.crs) < 1 or not self.variants:
            raise ValueError(f"need max_devices >= 1, compression rates >= 1 and a variant; got {self}")
        for v in self.variants:
            variant_options(v)  # a bad spelling fails here, not mid-training

    def draw(self, g: torch.Generator) -> PrismConfig:
        from .eval.variants import variant_config

        pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=g))]  # noqa: E731
        devices = int(torch.randint(1, self.max_devices + 1, (1,), generator=g))
        cfg = variant_config(pick(self.variants), devices, pick(self.crs))
        return cfg.replace(wire_dtype="float32") if cfg.wire_dtype == "int8" else cfg

    def describe(self) -> dict:
        return asdict(self)


def distill_loss(teacher: nn.Module, alpha: float = 1.0, temperature: float = 1.0,
                 task_loss: "LossFn | None" = None) -> "LossFn":
    """KL(teacher || student) of the output distributions, the teacher being the frozen unpartitioned
    model (the student's starting point), plus (1 - alpha) times the task loss when one is given.

    Classifiers: over the logits.  LMs: over every real next-token distribution.  Embedding models
    (no logits): 1 - cosine between the student's and the teacher's hidden states at real positions.
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss(model: nn.Module, cfg: PrismConfig, batch: dict[str, Tensor]) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            want = teacher(**inputs)
        got = forward(model, cfg, inputs)
        value = _distance(got, want, inputs.get("attention_mask"), temperature)
        if task_loss is not None and alpha < 1:
            value = alpha * value + (1 - alpha) * task_loss(model, cfg, batch)
        return value

    return loss


def _distance(got, want, mask: Tensor | None, temperature: float) -> Tensor:
    logits = getattr(want, "logits", None)
    if logits is not None:
        s, t = got.logits.float() / temperature, logits.float() / temperature  # (B, [N,] V)
        kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)  # (B[, N])
        if kl.dim() == 2 and mask is not None:
            return (kl * mask).sum() / mask.sum() * temperature**2
        return kl.mean() * temperature**2
    s, t = got.last_hidden_state.float(), want.last_hidden_state.float()  # (B, N, d)
    cos = nn.functional.cosine_similarity(s, t, dim=-1)
    keep = torch.ones_like(cos) if mask is None else mask.to(cos.dtype)
    return ((1 - cos) * keep).sum() / keep.sum()


# --- the loop ------------------------------------------------------------------------------------

def forward(model: nn.Module, cfg: PrismConfig, inputs: dict[str, Any]):
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


@dataclass(frozen=True)
class Checkpoints:
    """Where and how often `fit` saves its state (trainable weights, optimiser, schedule, step, the split
    sampler's random state), so a long run can resume after an interruption."""

    folder: Path
    every: int = 50

    @property
    def path(self) -> Path:
        return Path(self.folder) / "train-state.pt"

    def save(self, step: int, model: nn.Module, opt, sched, losses: list[float], g: torch.Generator) -> None:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        state = {"step": step, "weights": weights, "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                 "losses": losses, "generator": g.get_state()}
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)  # a run killed mid-save keeps the previous checkpoint

    def load(self, model: nn.Module, opt, sched, g: torch.Generator) -> tuple[int, list[float]]:
        if not self.path.exists():
            return 0, []
        state = torch.load(self.path, weights_only=True)  # our own file, still never unpickled blindly
        params = dict(model.named_parameters())
        missing = [n for n in state["weights"] if n not in params]
        if missing:
            raise ValueError(f"checkpoint {self.path} does not fit this model (e.g. {missing[0]}); use another --out")
        with torch.no_grad():
            for n, w in state["weights"].items():
                params[n].copy_(w)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        g.set_state(state["generator"])
        return int(state["step"]), list(state["losses"])


def fit(model: nn.Module, cfg: "PrismConfig | Splits", tcfg: TrainConfig, batches: Iterator[dict[str, Tensor]],
        loss_fn: LossFn, progress: bool = True, params: list[nn.Parameter] | None = None,
        checkpoints: Checkpoints | None = None) -> list[float]:
    """Train `model` for `tcfg.steps` batches through the forward `cfg` describes (or a split drawn from
    `cfg` each step); returns the losses.  With `checkpoints` it saves its state every so often and
    resumes from the last save (the batches it already used are skipped, so a resumed run draws what
    an uninterrupted one would have).

    `params` defaults to `select_trainable(model, tcfg)` (which may add LoRA; call `merge_lora` after).
    """
    from tqdm import tqdm

    torch.manual_seed(tcfg.seed)
    params = params if params is not None else select_trainable(model, tcfg)
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(tcfg))
    g = torch.Generator().manual_seed(cfg.seed if isinstance(cfg, Splits) else tcfg.seed)
    start, losses = checkpoints.load(model, opt, sched, g) if checkpoints else (0, [])
    for _ in range(start):
        next(batches)
    model.train()
    label = "random splits" if isinstance(cfg, Splits) else f"{cfg.scheme} P={cfg.effective_devices} CR={cfg.effective_cr}"
    bar = tqdm(range(start, tcfg.steps), desc=f"train {label}", disable=not progress, dynamic_ncols=True,
               initial=start, total=tcfg.steps)
    try:
        for step in bar:
            split = cfg.draw(g) if isinstance(cfg, Splits) else cfg
            loss = loss_fn(model, split, next(batches))
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
            if checkpoints and ((step + 1) % checkpoints.every == 0 or step + 1 == tcfg.steps):
                checkpoints.save(step + 1, model, opt, sched, losses, g)
    finally:
        model.eval()
    return losses


def _schedule(tcfg: TrainConfig):
    def factor(step: int) -> float:
        if step < tcfg.warmup:
            return (step + 1) / (tcfg.warmup + 1)
        t = (step - tcfg.warmup) / max(1, tcfg.steps - tcfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return factor


# --- saving --------------------------------------------------------------------------------------

RECORD = "prism_edge_training.json"


def save(model: nn.Module, folder: str | Path, tokenizer=None, record: dict | None = None) -> Path:
    """Save a (LoRA-merged) model as a plain HF safetensors checkpoint, plus how it was trained."""
    folder = Path(folder)
    merge_lora(model)  # the saved weights are the merged ones
    hf: Any = model  # a Hugging Face PreTrainedModel (nn.Module's typing cannot see config / save_pretrained)
    config = hf.config
    quant = getattr(config, "quantization_config", None)
    if quant is not None:  # a GGUF-loaded model: its weights are plain fp32 tensors by now
        del config.quantization_config
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if record is not None:
        (folder / RECORD).write_text(json.dumps(record, indent=1, default=str))
    return folder


def training_record(cfg: "PrismConfig | Splits", tcfg: TrainConfig, losses: list[float], **extra) -> dict:
    """What a checkpoint was trained on: the split (or the distribution of splits), the settings, the loss."""
    split = {"splits": cfg.describe()} if isinstance(cfg, Splits) else {"prism": asdict(cfg)}
    return {**split, "train": asdict(tcfg), "first_loss": losses[0] if losses else None,
            "last_loss": sum(losses[-10:]) / max(1, len(losses[-10:])), "steps": len(losses),
            "date": time.strftime("%Y-%m-%d"), **extra}
