"""Evaluation tasks on real data.  Each scores one model unpartitioned (cfg=None: the plain Hugging Face
forward) or split under a PrismConfig (the simulator), and reports the exchange bytes per item that
the simulator's ledger counted.

Tasks on data that ships here (see docs/RESULTS.md for the sources):
  lee        MiniLM: Pearson of embedding cosine similarities against the human scores (50 news docs),
             plus embedding cosine to the unpartitioned model
  polarity   MiniLM: movie-review polarity (200 sentences) — a logistic regression on the unpartitioned
             model's embeddings, 5-fold cross-validated, applied to the partitioned model's; a
             fine-tuned classifier is scored on the held-out quarter
  perplexity SmolLM2: perplexity, KL and next-token agreement to the unpartitioned model on chunks of
             held-out prose (Lee background news or Wikipedia)
  cloze      SmolLM2: CBT-style cloze built from Wikipedia articles (10 candidates, chance = 0.10)
  fashion    the bundled ViT: accuracy on the Fashion-MNIST test set (10 000 images)
  samples    a ViT classifier on the 20 real sample images of its data set (smoke test of the image path)
Tasks on the paper's data sets (need `--data-dir` or internet, see eval/datasets.py):
  sst2, mrpc (sequence classifiers), stsb (embedding model), cifar10, cifar100, imagenet (image
  classifiers), cbt (language models).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from ..config import PrismConfig
from . import data
from .base import Score, Task, logistic_regression, pearson, predict, run
from .fidelity import mean_pool
from .vision import VISION_TASKS


# --- encoders ------------------------------------------------------------------------------------

class _Embeddings(Task):
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2's pooling) of `self.texts`."""

    texts: list[str]
    max_length = 256
    takes: ClassVar[tuple[str, ...]] = ("batch_size",)

    def batches(self):
        for i in range(0, len(self.texts), self.batch_size):
            enc = self.tokenizer(self.texts[i : i + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            yield {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    @torch.no_grad()
    def outputs(self, cfg: PrismConfig | None) -> tuple[Tensor, int]:
        out, total = [], 0
        for enc in self.batches():
            res, nbytes = run(self.model, cfg, enc)
            out.append(mean_pool(res.last_hidden_state, enc["attention_mask"]))
            total += nbytes
        return torch.cat(out), total


class LeeTask(_Embeddings):
    name, default_model, metric = "lee", "minilm", "pearson"
    data = "Lee corpus: 50 news documents, Pearson of pairwise embedding cosines against mean human similarity"

    def __init__(self, loaded, limit=None, **kw):
        super().__init__(loaded, limit, **kw)
        docs, human = data.lee_documents(), torch.tensor(data.lee_similarities())
        n = min(limit or len(docs), len(docs))
        self.texts, self.human = docs[:n], human[:n, :n]

    def evaluate(self, cfg):
        emb, nbytes = self.outputs(cfg)
        iu = torch.triu_indices(len(emb), len(emb), 1)
        sims = emb @ emb.T
        cos = float((emb * self.reference()).sum(-1).mean())
        return Score({"pearson": pearson(sims[iu[0], iu[1]], self.human[iu[0], iu[1]]), "cosine": cos},
                     nbytes / len(emb), len(emb))


def polarity_split(n: int) -> tuple[list[int], list[int]]:
    """Every 4th sentence is held out (balanced: negatives come first, then positives)."""
    test = [i for i in range(n) if i % 4 == 3]
    return [i for i in range(n) if i % 4 != 3], test


class PolarityTask(_Embeddings):
    name, default_model, metric = "polarity", "minilm", "accuracy"
    data = "Pang & Lee movie-review polarity: 200 sentences (100 pos / 100 neg)"
    max_length = 128
    takes: ClassVar[tuple[str, ...]] = ("batch_size", "folds")

    def __init__(self, loaded, limit=None, folds: int = 5, **kw):
        super().__init__(loaded, limit, **kw)
        texts, labels = data.polarity()
        if limit is not None and limit < len(texts):  # keep both classes: take from each end
            keep = list(range(limit // 2)) + list(range(len(texts) - (limit - limit // 2), len(texts)))
            texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
        self.texts, self.labels, self.folds = texts, torch.tensor(labels), folds
        self.classifier = type(self.model).__name__.endswith("ForSequenceClassification")

    def evaluate(self, cfg):
        if self.classifier:  # a fine-tuned head: score the held-out quarter
            _, test = polarity_split(len(self.texts))
            correct, total = 0, 0
            for i in range(0, len(test), self.batch_size):
                idx = test[i : i + self.batch_size]
                enc = self.tokenizer([self.texts[j] for j in idx], padding=True, return_tensors="pt")
                with torch.no_grad():
                    res, nbytes = run(self.model, cfg, {k: v for k, v in enc.items() if k != "token_type_ids"})
                correct += int((res.logits.argmax(-1) == self.labels[idx]).sum())
                total += nbytes
            return Score({"accuracy": correct / len(test)}, total / len(test), len(test))
        emb, nbytes = self.outputs(cfg)
        ref = self.reference()
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(emb), generator=g)
        correct = 0
        for k in range(self.folds):
            test = order[k :: self.folds]
            train = torch.tensor(sorted(set(order.tolist()) - set(test.tolist())))
            w = logistic_regression(ref[train], self.labels[train], 2)  # fitted on the unpartitioned model
            correct += int((predict(w, emb[test]) == self.labels[test]).sum())
        cos = float((emb * ref).sum(-1).mean())
        return Score({"accuracy": correct / len(emb), "cosine": cos}, nbytes / len(emb), len(emb))


def heldout_prose(source: str) -> list[str]:
    """The last third of a prose source: never used for fine-tuning or for choosing a default (see
    `training_prose`)."""
    docs = data.prose(source)
    return docs[2 * len(docs) // 3 :]


def training_prose(source: str) -> list[str]:
    """The first two thirds of a prose source: fine-tuning and choosing defaults ("dev")."""
    docs = data.prose(source)
    return docs[: 2 * len(docs) // 3]


SPLITS = ("heldout", "dev")


def prose_split(source: str, split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose heldout (the last third: report) or dev (the first two "
                         "thirds: tune)")
    return heldout_prose(source) if split == "heldout" else training_prose(source)


class PassagesTask(_Embeddings):
    """Embeddings of passages of exactly `length` positions ([CLS] + text + [SEP]): how fidelity holds as inputs
    grow.  Each passage is the start of a document (news) or a consecutive piece of one (Wikipedia articles are
    long: several pieces per article, round robin), so no passage joins two documents."""

    name, default_model, metric = "passages", "minilm", "cosine"
    data = "passages of a fixed length from prose (Lee background news or Wikipedia), embedding cosine to the full model"
    takes: ClassVar[tuple[str, ...]] = ("batch_size", "length", "source", "split")

    def __init__(self, loaded, limit=None, length: int = 200, source: str = "wiki", split: str = "heldout",
                 batch_size: int = 8, **kw):
        super().__init__(loaded, limit, batch_size=batch_size, **kw)
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        if length < 3 or cls is None or sep is None:
            raise ValueError(f"length must be >= 3 for a [CLS] ... [SEP] passage, got {length}")
        body, want = length - 2, limit or 24
        pieces = [self.tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in prose_split(source, split)]
        per_doc = [[ids[i : i + body] for i in range(0, len(ids) - body + 1, body)][: 1 if source == "lee" else 8]
                   for ids in pieces]
        chosen: list[list[int]] = []
        for turn in range(8):
            chosen += [p[turn] for p in per_doc if len(p) > turn][: want - len(chosen)]
        if not chosen:
            raise ValueError(f"no {source} document of the {split} split holds {length} tokens; lower --length")
        self.ids = torch.tensor([[cls, *p, sep] for p in chosen])
        self.length, self.source = length, source
        self.data = f"{len(chosen)} {split} passages of {length} positions from {source} prose"

    def batches(self):
        for i in range(0, len(self.ids), self.batch_size):
            ids = self.ids[i : i + self.batch_size]
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

    def evaluate(self, cfg):
        emb, nbytes = self.outputs(cfg)
        cos = (emb * self.reference()).sum(-1)
        return Score({"cosine": float(cos.mean()), "min_cosine": float(cos.min())}, nbytes / len(emb), len(emb))


# --- decoders ------------------------------------------------------------------------------------


class PerplexityTask(Task):
    name, default_model, metric, higher_is_better = "perplexity", "smollm2", "perplexity", False
    data = "held-out prose (last third of Lee background news, or of the Wikipedia sample) in fixed-length chunks"
    takes: ClassVar[tuple[str, ...]] = ("batch_size", "length", "source", "split")

    def __init__(self, loaded, limit=None, length: int = 512, source: str = "lee", batch_size: int = 2,
                 split: str = "heldout", **kw):
        super().__init__(loaded, limit, batch_size=batch_size, **kw)
        from .fidelity import token_chunks

        self.length, self.source = length, source
        self.chunks = token_chunks(self.tokenizer, prose_split(source, split), length, limit or 8)
        self.data = f"{source} prose, {len(self.chunks)} {split} chunks of {length} tokens"

    @torch.no_grad()
    def outputs(self, cfg) -> tuple[list[Tensor], int]:
        out, total = [], 0
        for i in range(0, len(self.chunks), self.batch_size):
            res, nbytes = run(self.model, cfg, {"input_ids": self.chunks[i : i + self.batch_size]})
            out.append(res.logits[:, :-1].float().log_softmax(-1))
            total += nbytes
        return out, total

    def evaluate(self, cfg):
        got, nbytes = self.outputs(cfg) if cfg is not None else (self.reference(), 0)
        nll = kl = agree = 0.0
        count = 0
        for j, (lp, ref) in enumerate(zip(got, self.reference())):
            target = self.chunks[j * self.batch_size : (j + 1) * self.batch_size, 1:]
            nll += float(-lp.gather(-1, target.unsqueeze(-1)).sum())
            kl += float((ref.exp() * (ref - lp)).sum())
            agree += float((ref.argmax(-1) == lp.argmax(-1)).sum())
            count += target.numel()
        return Score({"perplexity": math.exp(nll / count), "kl": kl / count, "agreement": agree / count},
                     nbytes / len(self.chunks), len(self.chunks))


class ClozeTask(Task):
    name, default_model, metric = "cloze", "smollm2", "accuracy"
    data = "CBT-style cloze built from held-out Wikipedia articles: 20 sentences of context, 10 candidates"
    # no batch_size: each item is one batch (its candidates)
    takes: ClassVar[tuple[str, ...]] = ("context_chars", "items")

    def __init__(self, loaded, limit=None, items: list[dict] | None = None, context_chars: int = 1500, **kw):
        super().__init__(loaded, limit, **kw)
        from .cloze import build_items

        # every item costs 10 forwards of context + question: keep the context modest on a CPU
        self.items = items if items is not None else build_items(heldout_prose("wiki"), limit or 40,
                                                                 max_context_chars=context_chars)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def evaluate(self, cfg):
        from .cloze import score_item

        correct, total = 0, 0
        for item in self.items:
            choice, nbytes = score_item(self.model, self.tokenizer, item, cfg)
            correct += item["options"][choice] == item["answer"]
            total += nbytes
        return Score({"accuracy": correct / len(self.items)}, total / len(self.items), len(self.items))


# --- images --------------------------------------------------------------------------------------

class _Images(Task):
    """Accuracy (and agreement with the unpartitioned model's predictions) of an image classifier."""

    pixels: Tensor | None = None  # (N, C, H, W) ready for the model, or produced batch by batch
    labels: Tensor
    takes: ClassVar[tuple[str, ...]] = ("batch_size",)

    def pixel_batches(self):
        for i in range(0, len(self.labels), self.batch_size):
            yield self.pixels[i : i + self.batch_size]

    @torch.no_grad()
    def outputs(self, cfg) -> tuple[Tensor, int]:
        preds, total = [], 0
        for px in self.pixel_batches():
            res, nbytes = run(self.model, cfg, {"pixel_values": px})
            preds.append(res.logits.argmax(-1))
            total += nbytes
        return torch.cat(preds), total

    def evaluate(self, cfg):
        pred, nbytes = self.outputs(cfg) if cfg is not None else (self.reference(), 0)
        n = len(self.labels)
        return Score({"accuracy": float((pred == self.labels).float().mean()),
                      "agreement": float((pred == self.reference()).float().mean())}, nbytes / n, n)


class FashionTask(_Images):
    name, default_model, metric = "fashion", "vit-fmnist", "accuracy"
    data = "Fashion-MNIST test set (Debian dataset-fashion-mnist), 10 000 real 28x28 images"
    takes: ClassVar[tuple[str, ...]] = ("batch_size", "data_dir")

    def __init__(self, loaded, limit=None, batch_size: int = 250, **kw):
        super().__init__(loaded, limit, batch_size=batch_size, **kw)
        images, labels = data.fashion_mnist("test", self.options.get("data_dir"))
        n = min(limit or len(labels), len(labels))
        self.pixels, self.labels = data.fashion_pixels(images[:n]), labels[:n]
        self.data = f"Fashion-MNIST test set, {n} real images"


def image_pixels(loaded, images) -> Tensor:
    """PIL images -> the model's pixel_values: its image processor, or the Fashion-MNIST normalisation
    for the bundled 1-channel 28x28 ViT."""
    cfg = loaded.model.config
    if getattr(cfg, "num_channels", 3) == 1 and getattr(cfg, "image_size", 0) == 28:
        import numpy as np

        arr = torch.from_numpy(np.stack([np.asarray(im.convert("L").resize((28, 28))) for im in images]))
        return data.fashion_pixels(arr)
    if loaded.tokenizer is None:
        raise ValueError(f"model {loaded.name!r} ships no image processor; cannot prepare images for it")
    return loaded.tokenizer([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]


class SamplesTask(_Images):
    name, default_model, metric = "samples", "vit-fmnist", "accuracy"
    data = "the 20 real sample images foolbox ships for the model's data set"
    takes: ClassVar[tuple[str, ...]] = ("batch_size", "dataset")

    def __init__(self, loaded, limit=None, dataset: str | None = None, **kw):
        super().__init__(loaded, limit, **kw)
        from PIL import Image

        cfg = loaded.model.config
        dataset = dataset or ("fashionMNIST" if getattr(cfg, "num_channels", 3) == 1 else "imagenet")
        found = data.sample_images(dataset)[:limit]
        self.pixels = image_pixels(loaded, [Image.open(p) for p, _ in found])
        self.labels = torch.tensor([label for _, label in found])
        self.data = f"{len(found)} real {dataset} sample images (foolbox)"


TASKS: dict[str, type[Task]] = {t.name: t for t in (LeeTask, PolarityTask, PassagesTask, PerplexityTask, ClozeTask, FashionTask,
                                                    SamplesTask, *VISION_TASKS)}


# --- the paper's data sets (eval/datasets.py: HF datasets from the hub, or a local copy) ----------

class _DataDirTask(Task):
    split = "validation"
    takes: ClassVar[tuple[str, ...]] = ("batch_size", "data_dir", "split")

    def __init__(self, loaded, limit=None, data_dir=None, split: str | None = None, **kw):
        super().__init__(loaded, limit, **kw)
        self.data_dir, self.split = data_dir, split or self.split


class GlueTask(_DataDirTask):
    """SST-2 / MRPC: a sequence classifier's accuracy on the validation split (labels as in GLUE)."""

    metric, default_model = "accuracy", "minilm"
    glue: ClassVar[str]

    def __init__(self, loaded, limit=None, **kw):
        super().__init__(loaded, limit, **kw)
        from .datasets import load_glue

        if not type(self.model).__name__.endswith("ForSequenceClassification"):
            raise ValueError(f"task {self.name} needs a sequence classifier fine-tuned on it (e.g. a "
                             f"BertForSequenceClassification checkpoint); {self.loaded.name!r} is "
                             f"{type(self.model).__name__}")
        self.rows = load_glue(self.glue, self.split, self.data_dir, limit)
        self.data = f"GLUE {self.glue.upper()} {self.split}, {len(self.rows)} examples"

    def encode(self, rows):
        if "text" in rows[0]:
            return self.tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=256,
                                  return_tensors="pt")
        return self.tokenizer([r["text_a"] for r in rows], [r["text_b"] for r in rows], padding=True,
                              truncation=True, max_length=256, return_tensors="pt")

    @torch.no_grad()
    def evaluate(self, cfg):
        correct, total = 0, 0
        for i in range(0, len(self.rows), self.batch_size):
            rows = self.rows[i : i + self.batch_size]
            enc = self.encode(rows)
            res, nbytes = run(self.model, cfg, {k: v for k, v in enc.items()
                                                if k in ("input_ids", "attention_mask", "token_type_ids")})
            correct += int((res.logits.argmax(-1) == torch.tensor([r["label"] for r in rows])).sum())
            total += nbytes
        return Score({"accuracy": correct / len(self.rows)}, total / len(self.rows), len(self.rows))


class SST2Task(GlueTask):
    name, glue = "sst2", "sst2"
    data = "GLUE SST-2 validation"


class MRPCTask(GlueTask):
    name, glue = "mrpc", "mrpc"
    data = "GLUE MRPC validation"


class STSBTask(_DataDirTask, _Embeddings):
    """STS-B with a sentence-embedding model: Pearson of embedding cosine against the gold scores."""

    name, default_model, metric = "stsb", "minilm", "pearson"
    data = "GLUE STS-B validation"
    takes: ClassVar[tuple[str, ...]] = ("batch_size", "data_dir", "split")

    def __init__(self, loaded, limit=None, **kw):
        super().__init__(loaded, limit, **kw)
        from .datasets import load_glue

        rows = load_glue("stsb", self.split, self.data_dir, limit)
        self.texts = [r["text_a"] for r in rows] + [r["text_b"] for r in rows]
        self.gold = torch.tensor([r["score"] for r in rows])
        self.data = f"GLUE STS-B {self.split}, {len(rows)} pairs"

    def evaluate(self, cfg):
        emb, nbytes = self.outputs(cfg)
        n = len(self.gold)
        cos = (emb[:n] * emb[n:]).sum(-1)
        return Score({"pearson": pearson(cos, self.gold),
                      "cosine": float((emb * self.reference()).sum(-1).mean())}, nbytes / n, n)


class _ImageSetTask(_DataDirTask, _Images):
    """An image classifier's accuracy on a labelled image set, preprocessed batch by batch."""

    split = "test"

    def __init__(self, loaded, limit=None, batch_size: int = 32, **kw):
        super().__init__(loaded, limit, batch_size=batch_size, **kw)
        self.images, self.labels = self.load()

    def load(self) -> tuple[Tensor, Tensor]:
        """(images (N, H, W, 3) uint8, labels (N,)) of the set: each set reads its own."""
        raise NotImplementedError

    def pixel_batches(self):
        from PIL import Image

        for i in range(0, len(self.labels), self.batch_size):
            arrs = self.images[i : i + self.batch_size].numpy()
            yield image_pixels(self.loaded, [Image.fromarray(a) for a in arrs])


class Cifar10Task(_ImageSetTask):
    name, default_model, metric = "cifar10", "", "accuracy"
    data = "CIFAR-10 test set"
    classes = 10

    def load(self):
        from .datasets import load_cifar

        images, labels, _ = load_cifar(self.classes, self.split, self.data_dir, self.limit)
        self.data = f"CIFAR-{self.classes} {self.split}, {len(labels)} images"
        return images, labels


class Cifar100Task(Cifar10Task):
    name, classes = "cifar100", 100
    data = "CIFAR-100 test set (fine labels)"


class ImageNetTask(_ImageSetTask):
    name, default_model, metric = "imagenet", "", "accuracy"
    data = "ImageNet-1k validation set"
    split = "validation"

    def load(self):
        from .datasets import load_imagenet

        images, labels, _ = load_imagenet(self.split, self.data_dir, self.limit)
        self.data = f"ImageNet-1k {self.split}, {len(labels)} images"
        return images, labels


class CBTTask(_DataDirTask, ClozeTask):
    """The Children's Book Test (CN by default): the cloze scorer on the real CBT rows."""

    name, default_model, metric = "cbt", "smollm2", "accuracy"
    data = "Children's Book Test"
    split = "test"
    # the cloze scorer on CBT's own items: no batch_size, no context_chars
    takes: ClassVar[tuple[str, ...]] = ("data_dir", "split", "config")

    def __init__(self, loaded, limit=None, config: str = "CN", data_dir=None, split=None, **kw):
        from .datasets import load_cbt

        rows = load_cbt(config, split or self.split, data_dir, limit or 100)
        super().__init__(loaded, limit, items=rows, data_dir=data_dir, split=split, **kw)
        self.data = f"CBT-{config} {self.split}, {len(rows)} questions"


for _task in (SST2Task, MRPCTask, STSBTask, Cifar10Task, Cifar100Task, ImageNetTask, CBTTask):
    TASKS[_task.name] = _task
