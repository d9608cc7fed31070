"""The offline data readers: Fashion-MNIST IDX files, polarity, Wikipedia text, sample images, cloze items."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from prism_edge.eval import data
from prism_edge.eval.cloze import BLANK, build_items

from conftest import _real


def _idx(path, array: np.ndarray) -> None:
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_reads_idx_files_and_normalises(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 3]))
    x, y = data.fashion_mnist("test", tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (3, 28, 28) and torch.equal(x, torch.from_numpy(images).byte())
    assert y.tolist() == [9, 0, 3]
    px = data.fashion_pixels(x)
    assert px.shape == (3, 1, 28, 28)
    assert torch.allclose(px[0, 0, 0, 0], torch.tensor((0 / 255 - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD))


def test_fashion_mnist_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist("test", tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        data.fashion_mnist("valid", tmp_path)
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3))
    with pytest.raises(ValueError, match="2 images but"):
        data.fashion_mnist("test", tmp_path)


def test_real_fashion_mnist_when_installed():
    from conftest import _fashion_data

    _fashion_data()
    x, y = data.fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and torch.bincount(y).tolist() == [1000] * 10


def test_polarity_and_wikipedia_text():
    _real("gensim")
    texts, labels = data.polarity()
    assert len(texts) == 200 and sum(labels) == 100 and labels[:100] == [0] * 100
    articles = data.wikipedia_articles(limit=5)
    assert len(articles) == 5 and all(len(a) > 1000 for a in articles)
    for marker in ("{{", "}}", "[[", "<ref", "'''", "&amp;"):
        assert not any(marker in a for a in articles), marker


def test_sample_images_carry_labels_from_file_names():
    _real("foolbox")
    found = data.sample_images("imagenet")
    assert len(found) == 20 and found[0][0].name == "imagenet_00_243.jpg" and found[0][1] == 243
    with pytest.raises(ValueError, match="choose one of"):
        data.sample_images("svhn")


def test_cloze_items_are_cbt_shaped_and_deterministic():
    words = ["river", "castle", "garden", "window", "lantern", "harbour", "meadow", "forest", "bridge", "valley",
             "tower", "market"]
    doc = " ".join(f"The {w} was quiet at dawn near the old {words[(i + 3) % len(words)]}." for i, w in
                   enumerate(words * 3))
    items = build_items([doc], 2, context_sentences=12, seed=1)
    assert items == build_items([doc], 2, context_sentences=12, seed=1)
    for item in items:
        assert len(item["context"]) == 12 and BLANK in item["question"]
        assert item["answer"] in item["options"] and len(set(item["options"])) == 10
        assert item["question"].replace(BLANK, item["answer"]) in doc
    with pytest.raises(ValueError, match="lower --limit"):
        build_items([doc], 50, context_sentences=12)
