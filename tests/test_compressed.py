"""Every compressed option against an independent dense reference (tests/dense_reference.py).

The reference builds, for one unpadded sequence, each simulated device's whole score matrix from the
option's definition, without the executor, the plan or the codec.  `simulate` runs padded batches;
each sequence must match its own reference run.
"""

from __future__ import annotations

import pytest
import torch

from prism_edge import PrismConfig, simulate
from prism_edge.config import PLAIN

from conftest import image_batch, text_batch, tiny
from dense_reference import Dense

OPTIONS = {
    "exact": dict(cr=1),
    "voltage": dict(scheme="voltage"),
    "plain": dict(PLAIN, cr=4),
    "sinks+window": dict(PLAIN, cr=4, sinks=True, window=3),
    "window-frac+cheap": dict(PLAIN, cr=4, window_frac=0.25, exact_when_cheap=True),
    "topk": dict(PLAIN, cr=3, topk=2),
    "topk-frac+window+cheap": dict(PLAIN, cr=3, window=2, topk_frac=0.3, exact_when_cheap=True),
    "similarity+bias": dict(PLAIN, cr=4, grouping="similarity", count_bias=True),
    "topk+similarity+int8": dict(PLAIN, cr=4, sinks=True, window=2, topk=1, grouping="similarity", wire_dtype="int8"),
    "topk+float16": dict(PLAIN, cr=4, window=2, topk=1, wire_dtype="float16"),
    "budget": dict(PLAIN, cr=4, sinks=True, budget=0.7, budget_window=0.5),  # pooled per receiver, float32 rows
    "budget+floors+int8": dict(PLAIN, cr=3, window=2, topk=1, budget=0.2, budget_window=0.25, wire_dtype="int8"),
    "budget+similarity+fp16": dict(PLAIN, cr=4, budget=0.35, grouping="similarity", count_bias=True,
                                   wire_dtype="float16"),
    "budget-whole": dict(PLAIN, cr=4, budget=1.0),  # every route fits: whole, so exact
    "defaults": dict(cr=4),
    "defaults+int8-from-30": dict(cr=4, int8_from=30),  # text: the 29-token sequence goes int8 with its 40-token mate
}
DECODER_OPTIONS = {
    "anchor": dict(PLAIN, cr=4, anchor=3, window=2, topk=1),
    "anchor-exact": dict(cr=1, anchor=5),
    "anchor+bias+int8": dict(PLAIN, cr=2, anchor=2, count_bias=True, wire_dtype="int8"),
    "tail": dict(PLAIN, cr=4, sinks=True, window=2, tail=5),
    "tail+topk+int8": dict(PLAIN, cr=4, tail=7, topk=2, wire_dtype="int8"),
}
TOL = 5e-5  # float32 sums in another order; int8 rows round identically (same scales)


def _text_case(name: str, cfg: PrismConfig):
    model = tiny(name)
    lengths = [40, 29]
    ids, mask = text_batch(batch=2, length=40, pad_to=lengths)
    key = "logits" if name.endswith("lm") else "last_hidden_state"
    got = simulate(model, cfg, input_ids=ids, attention_mask=mask)[key]
    for b, n in enumerate(lengths):
        want = Dense(model, cfg, longest=max(lengths))(input_ids=ids[b : b + 1, :n])[key]
        torch.testing.assert_close(got[b : b + 1, :n], want, atol=TOL, rtol=TOL)


@pytest.mark.fast_cases(name="llama-lm",
                         option=("topk+similarity+int8", "topk-frac+window+cheap", "similarity+bias", "defaults"))
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", ["bert", "gpt2-lm", "llama-lm"])
@torch.no_grad()
def test_text_models_match_the_dense_reference(name, option):
    _text_case(name, PrismConfig(devices=3, **OPTIONS[option]))


@pytest.mark.fast_cases(name="llama-lm", option=("anchor+bias+int8", "tail+topk+int8"))
@pytest.mark.parametrize("option", list(DECODER_OPTIONS))
@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm"])
@torch.no_grad()
def test_decoder_options_match_the_dense_reference(name, option):
    _text_case(name, PrismConfig(devices=3, **DECODER_OPTIONS[option]))


@pytest.mark.fast_cases(option="topk+similarity+int8")
@pytest.mark.parametrize("option", list(OPTIONS))
@torch.no_grad()
def test_vit_matches_the_dense_reference(option):
    model = tiny("vit-cls")
    pixels = image_batch(2)
    cfg = PrismConfig(devices=3, **OPTIONS[option])
    got = simulate(model, cfg, pixel_values=pixels)
    for b in range(2):
        want = Dense(model, cfg)(pixel_values=pixels[b : b + 1])
        torch.testing.assert_close(got.logits[b : b + 1], want["logits"], atol=TOL, rtol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 4])
@torch.no_grad()
def test_more_devices_match_the_dense_reference(devices):
    cfg = PrismConfig(devices=devices, cr=4, **{**PLAIN, "sinks": True, "window": 5, "topk": 2})
    _text_case("llama-lm", cfg)


@torch.no_grad()
def test_the_reference_is_not_vacuous():
    """The options really change the result: a reference that ignored them would fail above."""
    model = tiny("llama-lm")
    ids = text_batch(batch=1, length=40)[0]
    outs = [Dense(model, PrismConfig(devices=3, **opts))(input_ids=ids)["logits"]
            for opts in (OPTIONS["exact"], OPTIONS["plain"], OPTIONS["topk"], OPTIONS["similarity+bias"])]
    for a in range(len(outs)):
        for b in range(a + 1, len(outs)):
            assert (outs[a] - outs[b]).abs().max() > 1e-4, (a, b)
