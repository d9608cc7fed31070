"""`prism-edge finetune`: PRISM-aware fine-tuning recipes on the real data that ships here.

Each recipe trains *through* the partitioned forward (train.fit) — at one split, or at a split drawn
at random each step (`Splits`: P from 1 to a maximum, CR and fidelity variant from lists) — with the
task's own loss or by distillation (KL to the frozen unpartitioned model, optionally mixed with the
task loss), scores held-out data before and after at every split of an evaluation grid and
unpartitioned, and saves a plain Hugging Face checkpoint (safetensors; LoRA merged) that
`prism-edge eval`, `run`, `launch` and `worker` load with `--model DIR`, with a training record that
says exactly what it was trained on.

  fashion     the bundled Fashion-MNIST ViT, all weights, on the 60 000 training images: distillation
              plus labels over random splits (P 1-4, CR 16/64), so one checkpoint serves every split
  polarity    MiniLM + a 2-way classification head (BertForSequenceClassification), all weights, on
              the 150 training sentences (the other 50 are held out)
  perplexity  SmolLM2, LoRA on the attention projections, on 512-token chunks of the first two
              thirds of the Lee background news (the last third is held out), distilled over random splits
  dino-probe  DINOv2-S, LoRA, distilled over random splits on unlabelled Fashion-MNIST training images;
              scored by a linear probe on its frozen features
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import PrismConfig
from .eval import data
from .eval.harness import make_task
from .eval.tasks import polarity_split, training_prose
from .train import (Checkpoints, Splits, TrainConfig, classification_loss, distill_loss, fit, lm_loss, merge_lora,
                    save, training_record)


OBJECTIVES = ("task", "distill", "distill+task")


@dataclass(frozen=True)
class Recipe:
    task: str  # the eval task that scores it (held-out data)
    model: str  # default model
    train: TrainConfig  # default training settings
    batch_size: int
    eval_limit: int | None  # held-out items scored before and after
    objective: str = "task"  # task | distill | distill+task
    splits: Splits | None = None  # None: train through the one split given


RECIPES: dict[str, Recipe] = {
    # one checkpoint for every split: distillation to the unpartitioned ViT plus the labels, P 1-4, CR 16/64
    "fashion": Recipe("fashion", "vit-fmnist", TrainConfig(steps=1200, lr=2e-4, warmup=30), 64, 2000,
                      "distill+task", Splits(4, (16, 64), ("defaults", "sinks+top8+sim+bias", "sinks+sim+bias"))),
    "polarity": Recipe("polarity", "minilm", TrainConfig(steps=60, lr=1e-4, warmup=6), 16, None),
    # LoRA on the attention projections, distilled over random splits (the previous recipe: task loss at one split)
    "perplexity": Recipe("perplexity", "smollm2", TrainConfig(steps=120, lr=5e-4, warmup=10, trainable="lora"), 1, 4,
                         "distill", Splits(4, (16, 64), ("defaults", "sinks+w16+top16", "sinks+w32+top32"))),
    # DINOv2-S, LoRA, distilled on unlabelled Fashion-MNIST training images; scored by the linear probe
    "dino-probe": Recipe("dino-probe", "dinov2-s", TrainConfig(steps=600, lr=5e-4, warmup=10, trainable="lora"), 8,
                         500, "distill", Splits(4, (16, 64), ("defaults", "sinks+top8+sim+bias", "sinks+sim+bias"))),
}


def fashion_batches(batch_size: int, seed: int, limit: int | None = None, flip: bool = False,
                    shift: int = 0) -> Iterator[dict]:
    """Endless shuffled epochs of Fashion-MNIST training images, optionally with random horizontal
    flips and random shifts of up to `shift` pixels (scripts/train_vit_fmnist.py uses both)."""
    images, labels = data.fashion_mnist("train")
    if limit:
        images, labels = images[:limit], labels[:limit]
    g = torch.Generator().manual_seed(seed)
    for _ in itertools.count():
        order = torch.randperm(len(labels), generator=g)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            x = data.fashion_pixels(images[idx])
            if flip:
                flipped = torch.rand(len(idx), generator=g) < 0.5
                x[flipped] = x[flipped].flip(-1)
            if shift:
                dx, dy = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()
                x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
            yield {"pixel_values": x, "labels": labels[idx]}


def dino_batches(loaded, batch_size: int, seed: int, limit: int | None = None) -> Iterator[dict]:
    """Shuffled Fashion-MNIST training images at the probe's resolution (no labels), taken from the images
    the probe was not fitted on (the probe uses the first 1 000)."""
    from .eval.vision import fashion_rgb

    images, _ = data.fashion_mnist("train")
    images = images[1000 : 1000 + (limit or 8000)]
    g = torch.Generator().manual_seed(seed)
    for _ in itertools.count():
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield {"pixel_values": fashion_rgb(loaded, images[order[i : i + batch_size]])}


def polarity_batches(tokenizer, batch_size: int, seed: int, limit: int | None = None) -> Iterator[dict]:
    texts, labels = data.polarity()
    train, _ = polarity_split(len(texts))
    train = train[:limit] if limit else train
    g = torch.Generator().manual_seed(seed)
    for _ in itertools.count():
        order = [train[i] for i in torch.randperm(len(train), generator=g).tolist()]
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            enc = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=128,
                            return_tensors="pt")
            yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                   "labels": torch.tensor([labels[j] for j in idx])}


def lm_batches(tokenizer, batch_size: int, seed: int, length: int = 512, source: str = "lee",
               limit: int | None = None) -> Iterator[dict]:
    from .eval.fidelity import token_chunks

    chunks = token_chunks(tokenizer, training_prose(source), length, None)  # as many as the text holds
    chunks = chunks[:limit] if limit else chunks
    g = torch.Generator().manual_seed(seed)
    for _ in itertools.count():
        order = torch.randperm(len(chunks), generator=g)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield {"input_ids": chunks[order[i : i + batch_size]]}


def classifier_from(loaded, labels: int = 2):
    """MiniLM (a BertModel) with a fresh classification head on its pooler."""
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(loaded.model.config.__class__(**{**loaded.model.config.to_dict(),
                                                                          "num_labels": labels}))
    missing = model.bert.load_state_dict(loaded.model.state_dict(), strict=False)
    if missing.missing_keys and any("pooler" not in k for k in missing.missing_keys):
        raise ValueError(f"cannot put a classification head on {loaded.name!r}: missing {missing.missing_keys[:3]}")
    model.config.architectures = ["BertForSequenceClassification"]
    return model.eval()


def finetune(task: str, loaded, cfg: "PrismConfig | Splits | None" = None, tcfg: TrainConfig | None = None,
             out: str | Path | None = None, batch_size: int | None = None, train_limit: int | None = None,
             eval_limit: int | None = None, progress: bool = True, log=print, objective: str | None = None,
             alpha: float = 0.5, eval_grid: list[PrismConfig] | None = None, checkpoint_every: int = 0) -> dict:
    """Fine-tune `loaded` for `task` through the forward `cfg` describes (one split, or `Splits`);
    returns a record of what happened.

    objective: task (the task's own loss), distill (KL to the frozen unpartitioned model) or
    distill+task (alpha * distill + (1 - alpha) * task); default: the recipe's.  eval_grid: the splits scored before and
    after (default: `cfg` itself, or for `Splits` every P in {1, 2, 4} x CR in {16, 64} at the defaults).
    checkpoint_every: save the training state to `out` that often and resume from it.
    """
    if task not in RECIPES:
        raise ValueError(f"no fine-tuning recipe for task {task!r}; choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[task]
    cfg = cfg if cfg is not None else (recipe.splits or PrismConfig())
    objective = objective or recipe.objective
    _check_options(objective, alpha, checkpoint_every)
    tcfg = tcfg or recipe.train
    batch_size = batch_size or recipe.batch_size
    eval_limit = eval_limit if eval_limit is not None else recipe.eval_limit
    if task == "polarity" and not type(loaded.model).__name__.endswith("ForSequenceClassification"):
        loaded.model = classifier_from(loaded)
    model = loaded.model
    batches, loss_fn = _data(task, loaded, batch_size, tcfg.seed, train_limit)
    if loss_fn is None and objective != "distill":
        raise ValueError(f"task {task!r} has no labels to train on; use objective='distill'")
    if objective != "task":
        teacher = copy.deepcopy(model)
        loss_fn = distill_loss(teacher, alpha=1.0 if objective == "distill" else alpha,
                               task_loss=loss_fn if objective == "distill+task" else None)
    grid = eval_grid or (default_grid() if isinstance(cfg, Splits) else [cfg])
    evaluator = make_task(task, loaded, limit=eval_limit)
    before = _scores(evaluator, grid)
    log(f"before: {task}: {_fmt_scores(before)}")
    t0 = time.perf_counter()
    checkpoints = Checkpoints(Path(out), checkpoint_every) if out is not None and checkpoint_every else None
    if checkpoints and checkpoints.path.exists():
        log(f"resuming from {checkpoints.path} (delete it to start over)")
    losses = fit(model, cfg, tcfg, batches, loss_fn, progress=progress, checkpoints=checkpoints)
    minutes = (time.perf_counter() - t0) / 60
    merge_lora(model)  # scores below (and the saved weights) are of the merged model
    evaluator.forget_reference()  # the model changed: its unpartitioned reference too
    after = _scores(evaluator, grid)
    first, last = losses[:10], losses[-10:]  # means of 10 steps: one step's split may be easy or hard
    log(f"after:  {task}: {_fmt_scores(after)}; loss {sum(first) / len(first):.4f} (first 10 steps) -> "
        f"{sum(last) / len(last):.4f} (last 10) in {minutes:.1f} min")
    record = training_record(cfg, tcfg, losses, task=task, base_model=loaded.name, batch_size=batch_size,
                             objective=objective, alpha=alpha if objective == "distill+task" else None,
                             train_items=train_limit, scores_before=before, scores_after=after,
                             eval_items=evaluator.describe(), minutes=round(minutes, 2), loss_curve=losses)
    if out is not None:
        tokenizer = loaded.tokenizer if task != "fashion" else None  # the ViT's is Fashion-MNIST's own normalisation
        save(model, out, tokenizer=tokenizer, record=record)
        if checkpoints:
            checkpoints.path.unlink(missing_ok=True)  # finished: the folder is a plain checkpoint again
        log(f"saved to {out} (load it with --model {out})")
    return record


def _check_options(objective: str, alpha: float, checkpoint_every: int) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha (--alpha) must be in [0, 1], got {alpha}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every (--checkpoint-every) must be >= 0, got {checkpoint_every}")


def default_grid(devices=(1, 2, 4), crs=(16, 64)) -> list[PrismConfig]:
    """The splits a split-robust checkpoint is scored at: every P and CR, the model kind's defaults."""
    return [PrismConfig(devices=p, cr=cr) if p > 1 else PrismConfig(devices=1, scheme="full")
            for p in devices for cr in (crs if p > 1 else crs[:1])]


def _data(task: str, loaded, batch_size: int, seed: int, limit: int | None):
    if task == "fashion":
        return fashion_batches(batch_size, seed, limit), classification_loss
    if task == "dino-probe":  # unlabelled images: only distillation has a target
        return dino_batches(loaded, batch_size, seed, limit), None
    if task == "polarity":
        return polarity_batches(loaded.tokenizer, batch_size, seed, limit), classification_loss
    return lm_batches(loaded.tokenizer, batch_size, seed, limit=limit), lm_loss


def _label(cfg: PrismConfig) -> str:
    return "unpartitioned" if cfg.scheme == "full" else f"P={cfg.effective_devices} CR={cfg.effective_cr}"


def _scores(evaluator, grid: list[PrismConfig]) -> dict[str, dict[str, float]]:
    out = {"unpartitioned": evaluator.evaluate(None).metrics}
    for cfg in grid:
        if cfg.scheme != "full":
            out[_label(cfg)] = evaluator.evaluate(cfg).metrics
    return out


def _fmt_scores(scores: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"{label}: {_fmt(m)}" for label, m in scores.items())


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
