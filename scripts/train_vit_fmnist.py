"""Train the bundled Fashion-MNIST ViT from scratch (plain, unpartitioned training) and save it as safetensors.

    .venv/bin/python scripts/train_vit_fmnist.py --epochs 3 --out prism_edge/data/vit-fashion-mnist

A ViT-Tiny-like classifier: 28x28 grey images cut into 2x2 patches, so 196 patches + [CLS] = 197
positions per image — the sequence length of ViT-B/16 at 224x224, which keeps CR meaningful when the
patches are split across devices.  Data: Debian's dataset-fashion-mnist (60 000 train / 10 000 test).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import ViTConfig, ViTForImageClassification

from prism_edge.config import PrismConfig
from prism_edge.eval.data import FASHION_MNIST_CLASSES, fashion_mnist, fashion_pixels
from prism_edge.finetune import fashion_batches
from prism_edge.train import TrainConfig, classification_loss, fit, save, training_record


@torch.no_grad()
def accuracy(model, images, labels, batch_size: int = 500) -> float:
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(pixel_values=fashion_pixels(images[i : i + batch_size])).logits
        correct += int((logits.argmax(-1) == labels[i : i + batch_size]).sum())
    return correct / len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="prism_edge/data/vit-fashion-mnist")
    ap.add_argument("--init", help="continue from this checkpoint (its training record is kept as an earlier stage)")
    ap.add_argument("--shift", type=int, default=2, help="random shift augmentation, pixels (0 = off)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ViTConfig(image_size=28, patch_size=2, num_channels=1, hidden_size=args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       intermediate_size=2 * args.hidden, num_labels=10,
                       id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
                       label2id={c: i for i, c in enumerate(FASHION_MNIST_CLASSES)})
    model = ViTForImageClassification(config)
    earlier = []
    if args.init:
        from pathlib import Path

        model = ViTForImageClassification.from_pretrained(args.init)
        record_file = Path(args.init) / "prism_edge_training.json"
        if record_file.exists():
            old = json.loads(record_file.read_text())
            earlier = old.pop("earlier_stages", []) + [old]
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    steps = int(args.epochs * len(x_train) / args.batch_size)
    tcfg = TrainConfig(steps=steps, lr=args.lr, weight_decay=0.05, warmup=steps // 20, trainable="all")
    cfg = PrismConfig(scheme="full")
    t0 = time.time()
    batches = fashion_batches(args.batch_size, seed=len(earlier), flip=True, shift=args.shift)
    losses = fit(model, cfg, tcfg, batches, classification_loss)
    minutes = (time.time() - t0) / 60
    acc = accuracy(model, x_test, y_test)
    params = sum(p.numel() for p in model.parameters())
    print(f"test accuracy {acc:.4f} on 10 000 Fashion-MNIST test images; {params:,} params; {minutes:.1f} min")
    record = training_record(cfg, tcfg, losses, data="Fashion-MNIST (Debian dataset-fashion-mnist), 60 000 train",
                             test_accuracy=acc, test_images=len(x_test), params=params, minutes=round(minutes, 1),
                             epochs=args.epochs, batch_size=args.batch_size, earlier_stages=earlier,
                             command="python scripts/train_vit_fmnist.py " + " ".join(
                                 f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "threads" and v is not None))
    save(model, args.out, record=record)
    print(json.dumps({k: record[k] for k in ("test_accuracy", "first_loss", "last_loss", "steps")}))


if __name__ == "__main__":
    main()
