"""`prism-edge finetune`: PRISM-aware fine-tuning recipes on the real data that ships here.

Each recipe trains *through* the partitioned forward at the chosen P and CR (train.fit), scores the
task before and after at that configuration on held-out data, and saves a plain Hugging Face
checkpoint (safetensors; LoRA merged) that `prism-edge eval`, `run`, `launch` and `worker` load
with `--model DIR`.

  fashion     the bundled Fashion-MNIST ViT, all weights, on the 60 000 training images
  polarity    MiniLM + a 2-way classification head (BertForSequenceClassification), all weights, on
              the 150 training sentences (the other 50 are held out)
  perplexity  SmolLM2, LoRA on the attention projections, on 512-token chunks of the first two
              thirds of the Lee background news (the last third is held out for evaluation)
"""

from __future__ import annotations

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
from .train import TrainConfig, classification_loss, fit, lm_loss, merge_lora, save, training_record


@dataclass(frozen=True)
class Recipe:
    task: str
    model: str  # default model
    train: TrainConfig  # default training settings
    batch_size: int
    eval_limit: int | None  # held-out items scored before and after


RECIPES: dict[str, Recipe] = {
    "fashion": Recipe("fashion", "vit-fmnist", TrainConfig(steps=150, lr=3e-4, warmup=10), 64, 2000),
    "polarity": Recipe("polarity", "minilm", TrainConfig(steps=60, lr=1e-4, warmup=6), 16, None),
    "perplexity": Recipe("perplexity", "smollm2", TrainConfig(steps=40, lr=1e-3, warmup=4, trainable="lora"), 1, 4),
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


def finetune(task: str, loaded, cfg: PrismConfig, tcfg: TrainConfig | None = None, out: str | Path | None = None,
             batch_size: int | None = None, train_limit: int | None = None, eval_limit: int | None = None,
             progress: bool = True, log=print) -> dict:
    """Fine-tune `loaded` for `task` through the forward `cfg` describes; returns a record of what happened."""
    if task not in RECIPES:
        raise ValueError(f"no fine-tuning recipe for task {task!r}; choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[task]
    tcfg = tcfg or recipe.train
    batch_size = batch_size or recipe.batch_size
    eval_limit = eval_limit if eval_limit is not None else recipe.eval_limit
    if task == "polarity" and not type(loaded.model).__name__.endswith("ForSequenceClassification"):
        loaded.model = classifier_from(loaded)
    model = loaded.model
    if task == "fashion":
        batches, loss_fn = fashion_batches(batch_size, tcfg.seed, train_limit), classification_loss
    elif task == "polarity":
        batches, loss_fn = polarity_batches(loaded.tokenizer, batch_size, tcfg.seed, train_limit), classification_loss
    else:
        batches, loss_fn = lm_batches(loaded.tokenizer, batch_size, tcfg.seed, limit=train_limit), lm_loss
    evaluator = make_task(task, loaded, limit=eval_limit)
    before = evaluator.evaluate(cfg).metrics
    log(f"before: {task} at P={cfg.effective_devices} CR={cfg.effective_cr}: {_fmt(before)}")
    t0 = time.perf_counter()
    losses = fit(model, cfg, tcfg, batches, loss_fn, progress=progress)
    minutes = (time.perf_counter() - t0) / 60
    merge_lora(model)  # scores below (and the saved weights) are of the merged model
    evaluator.forget_reference()  # the model changed: its unpartitioned reference too
    after = evaluator.evaluate(cfg).metrics
    after_full = evaluator.evaluate(None).metrics
    log(f"after:  {task} at P={cfg.effective_devices} CR={cfg.effective_cr}: {_fmt(after)}; "
        f"unpartitioned: {_fmt(after_full)}; loss {losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f} "
        f"in {minutes:.1f} min")
    record = training_record(cfg, tcfg, losses, task=task, base_model=loaded.name, batch_size=batch_size,
                             metrics_before=before, metrics_after=after, metrics_after_unpartitioned=after_full,
                             eval_items=evaluator.describe(), minutes=round(minutes, 2), loss_curve=losses)
    if out is not None:
        tokenizer = loaded.tokenizer if task != "fashion" else None
        save(model, out, tokenizer=tokenizer, record=record)
        log(f"saved to {out} (load it with --model {out})")
    return record


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
