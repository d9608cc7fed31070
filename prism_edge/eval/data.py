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
