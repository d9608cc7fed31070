"""Tasks for a pretrained vision backbone (DINOv2-S): no classifier ships with it, so it is scored the way
its users use it.

  dino-embed  embedding cosine to the unpartitioned model: the [CLS] embedding (pooler output) and the
              mean over patches, on real images (foolbox's 20 ImageNet samples at the model's own
              preprocessing, and Fashion-MNIST test images, grey to RGB, upscaled)
  dino-probe  a linear probe on frozen features: a logistic regression fitted on the unpartitioned
              model's features of Fashion-MNIST training images, applied to the partitioned model's
              features of test images (a head trained once, deployed split); accuracy and agreement
              with the unpartitioned probe's predictions
Features are the DINOv2 linear-probe features: [CLS] and the mean patch token, concatenated.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import PrismConfig
from . import data
from .base import Score, Task, logistic_regression, predict, run

FASHION_SIZE = 168  # Fashion-MNIST's 28 pixels upscaled 6x: 12 x 12 patches of 14 (145 positions)


def fashion_rgb(loaded, images: Tensor, size: int = FASHION_SIZE) -> Tensor:
    """(N, 28, 28) uint8 -> the backbone's pixel_values at `size` (its own normalisation)."""
    from PIL import Image

    pil = [Image.fromarray(a.numpy()).convert("RGB") for a in images]
    return loaded.tokenizer(pil, return_tensors="pt", size={"shortest_edge": size},
                            crop_size={"height": size, "width": size})["pixel_values"]


class _Backbone(Task):
    default_model = "dinov2-s"

    def features(self, pixels: Tensor, cfg: PrismConfig | None) -> tuple[Tensor, Tensor, int]:
        """([CLS] embedding, mean patch token, exchange bytes) batch by batch."""
        cls, mean, total = [], [], 0
        with torch.no_grad():
            for i in range(0, len(pixels), self.batch_size):
                out, nbytes = run(self.model, cfg, {"pixel_values": pixels[i : i + self.batch_size]})
                cls.append(out.pooler_output)
                mean.append(out.last_hidden_state[:, 1:].mean(1))
                total += nbytes
        return torch.cat(cls), torch.cat(mean), total


class DinoEmbedTask(_Backbone):
    name, metric = "dino-embed", "cls_cosine"
    data = "foolbox's 20 ImageNet samples (224 px) and Fashion-MNIST test images (168 px)"
    takes: ClassVar[tuple[str, ...]] = ("batch_size", "data_dir")

    def __init__(self, loaded, limit=None, batch_size: int = 8, **kw):
        super().__init__(loaded, limit, batch_size=batch_size, **kw)
        from PIL import Image

        n = limit or 20
        imagenet = [Image.open(p).convert("RGB") for p, _ in data.sample_images("imagenet")[:n]]
        images, _ = data.fashion_mnist("test", self.options.get("data_dir"))
        self.sets = {"imagenet": loaded.tokenizer(imagenet, return_tensors="pt")["pixel_values"],
                     "fashion": fashion_rgb(loaded, images[:n])}
        self.data = f"{len(imagenet)} foolbox ImageNet samples (224 px) and {n} Fashion-MNIST test images (168 px)"

    def outputs(self, cfg):
        return {k: self.features(px, cfg) for k, px in self.sets.items()}, 0

    def evaluate(self, cfg):
        got, ref = self.outputs(cfg)[0], self.reference()
        metrics, total, items = {}, 0, 0
        for k in self.sets:
            (c, m, nbytes), (rc, rm, _) = got[k], ref[k]
            metrics[f"{k}_cls"] = float(F.cosine_similarity(c, rc).mean())
            metrics[f"{k}_mean"] = float(F.cosine_similarity(m, rm).mean())
            total, items = total + nbytes, items + len(c)
        metrics["cls_cosine"] = sum(metrics[f"{k}_cls"] for k in self.sets) / len(self.sets)
        metrics["mean_cosine"] = sum(metrics[f"{k}_mean"] for k in self.sets) / len(self.sets)
        return Score(metrics, total / items, items)


class DinoProbeTask(_Backbone):
    name, metric = "dino-probe", "accuracy"
    data = "Fashion-MNIST: a logistic regression on frozen features of training images, scored on test images"
    takes: ClassVar[tuple[str, ...]] = ("batch_size", "data_dir", "train")

    def __init__(self, loaded, limit=None, batch_size: int = 16, train: int = 1000, **kw):
        super().__init__(loaded, limit, batch_size=batch_size, **kw)
        tr_images, tr_labels = data.fashion_mnist("train", self.options.get("data_dir"))
        te_images, te_labels = data.fashion_mnist("test", self.options.get("data_dir"))
        n = limit or 500
        self.train_pixels, self.train_labels = fashion_rgb(loaded, tr_images[:train]), tr_labels[:train]
        self.pixels, self.labels = fashion_rgb(loaded, te_images[:n]), te_labels[:n]
        self.data = (f"Fashion-MNIST at {FASHION_SIZE} px: probe fitted on {train} unpartitioned training images, "
                     f"scored on {n} test images")
        self._probe: Tensor | None = None

    def forget_reference(self) -> None:
        super().forget_reference()
        self._probe = None  # a changed model needs its probe refitted on its own unpartitioned features

    def probe(self) -> Tensor:
        if self._probe is None:
            c, m, _ = self.features(self.train_pixels, None)
            self._probe = logistic_regression(torch.cat([c, m], 1), self.train_labels, 10, l2=1e-4)
        return self._probe

    def outputs(self, cfg):
        c, m, nbytes = self.features(self.pixels, cfg)
        return predict(self.probe(), torch.cat([c, m], 1)), nbytes

    def evaluate(self, cfg):
        pred, nbytes = self.outputs(cfg) if cfg is not None else (self.reference(), 0)
        n = len(self.labels)
        return Score({"accuracy": float((pred == self.labels).float().mean()),
                      "agreement": float((pred == self.reference()).float().mean())}, nbytes / n, n)


VISION_TASKS = (DinoEmbedTask, DinoProbeTask)
