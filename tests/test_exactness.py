"""CR=1 and Voltage reproduce the unpartitioned Hugging Face model, for every family."""

from __future__ import annotations

import pytest
import torch

from prism_edge import PrismConfig, simulate

from conftest import BUILDERS, TEXT, image_batch, text_batch, tiny

TOL = 1e-4  # fp32; the only differences are summation orders (softmax over keys in another order)
OUTPUTS = ("last_hidden_state", "pooler_output", "logits")
EXACT_CONFIGS = [
    dict(scheme="prism", cr=1),
    dict(scheme="prism", cr=1, payload="hidden"),
    dict(scheme="prism", cr=1, payload="kv", count_bias=True),
    dict(scheme="voltage", cr=16),  # voltage ignores cr: always the full exchange
]


def _compare(ref, out, mask=None):
    compared = 0
    for name in OUTPUTS:
        expected = getattr(ref, name, None)
        if expected is None:
            continue
        got = out[name]
        assert got is not None and got.shape == expected.shape, name
        if mask is not None and got.dim() == 3:
            got, expected = got[mask.bool()], expected[mask.bool()]
        assert (got - expected).abs().max().item() <= TOL, name
        compared += 1
    assert compared


@pytest.mark.fast_cases(devices=3, extra=EXACT_CONFIGS[0])
@pytest.mark.parametrize("name", TEXT)
@pytest.mark.parametrize("devices", [1, 2, 3, 4])
@pytest.mark.parametrize("extra", EXACT_CONFIGS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
@torch.no_grad()
def test_text_exact_padded(name, devices, extra):
    model = tiny(name)
    ids, mask = text_batch(batch=3, length=13, pad_to=[13, 9, 6])  # 13, 9, 6: none divisible by 4
    ref = model(input_ids=ids, attention_mask=mask)
    out = simulate(model, PrismConfig(devices=devices, **extra), input_ids=ids, attention_mask=mask)
    _compare(ref, out, mask)


@pytest.mark.fast_cases(devices=3)
@pytest.mark.parametrize("name", ["vit", "vit-cls"])
@pytest.mark.parametrize("devices", [1, 2, 3, 4])
@torch.no_grad()
def test_vit_exact(name, devices):
    model = tiny(name)
    px = image_batch()
    ref = model(pixel_values=px)
    for cfg in (PrismConfig(devices=devices, cr=1), PrismConfig(devices=devices, scheme="voltage")):
        _compare(ref, simulate(model, cfg, pixel_values=px))


@pytest.mark.parametrize("name", ["bert", "llama-lm"])
@torch.no_grad()
def test_weighted_slices_and_full_scheme_exact(name):
    model = tiny(name)
    ids, mask = text_batch(batch=2, length=17, pad_to=[17, 11])
    ref = model(input_ids=ids, attention_mask=mask)
    _compare(ref, simulate(model, PrismConfig(devices=3, cr=1, weights=(3.0, 1.0, 2.0)), input_ids=ids, attention_mask=mask), mask)
    full = simulate(model, PrismConfig(devices=4, scheme="full"), input_ids=ids, attention_mask=mask)
    _compare(ref, full, mask)
    assert full.stats.world == 1 and full.stats.total_bytes == 0


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm"])
@torch.no_grad()
def test_left_padding_matches_hf(name):
    """HF gives left-padded tokens the position ids of their index; so do we (CR=1 == HF exactly)."""
    model = tiny(name)
    ids, _ = text_batch(batch=2, length=12)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ref = model(input_ids=ids, attention_mask=mask)
    out = simulate(model, PrismConfig(devices=3, cr=1), input_ids=ids, attention_mask=mask)
    _compare(ref, out, mask)


@pytest.mark.parametrize("name", TEXT)
@torch.no_grad()
def test_token_type_ids_and_position_ids_pass_through(name):
    model = tiny(name)
    ids, mask = text_batch(batch=2, length=10, pad_to=[10, 7])
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=torch.arange(3, 13).unsqueeze(0))
    if name.startswith("bert"):
        kwargs["token_type_ids"] = (torch.arange(10) >= 5).long().expand(2, -1)
    ref = model(**kwargs)
    _compare(ref, simulate(model, PrismConfig(devices=2, cr=1), **kwargs), mask)


def test_every_family_builds():
    assert set(BUILDERS) >= {"bert", "bert-cls", "gpt2", "gpt2-lm", "vit", "vit-cls", "llama", "llama-lm"}
