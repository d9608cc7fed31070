"""Bad input gets a ValueError that names the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from prism_edge import PrismConfig, simulate

from conftest import text_batch, tiny


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cr=0), "cr .* must be >= 1"),
        (dict(cr=-3), "cr .* must be >= 1"),
        (dict(cr=2.5), "cr must be an integer"),
        (dict(cr=True), "cr must be an integer"),
        (dict(devices=0), "devices must be >= 1"),
        (dict(devices="4"), "devices must be an integer"),
        (dict(scheme="ring"), "unknown scheme 'ring'; choose one of prism, voltage, full"),
        (dict(payload="keys"), "unknown payload"),
        (dict(wire_dtype="int8"), "unknown wire_dtype"),
        (dict(halo=-1), "halo must be >= 0"),
        (dict(devices=2, weights=(1.0,)), "one weight per device"),
        (dict(devices=2, weights=(1.0, 0.0)), "must all be > 0"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrismConfig(**kwargs)


def test_devices_more_than_positions():
    ids, mask = text_batch(batch=1, length=3)
    with pytest.raises(ValueError, match="use devices <= 3"):
        simulate(tiny("bert"), PrismConfig(devices=4), input_ids=ids, attention_mask=mask)


def test_unsupported_model_type_and_class():
    class Toy(nn.Module):
        config = type("C", (), {"model_type": "t5"})()

    with pytest.raises(ValueError, match="unsupported model type 't5'.*supported: BertModel"):
        simulate(Toy(), PrismConfig(), input_ids=torch.ones(1, 8, dtype=torch.long))
    mlm = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="unsupported model class BertForMaskedLM"):
        simulate(mlm, PrismConfig(), input_ids=torch.ones(1, 8, dtype=torch.long))


def test_missing_or_wrong_inputs():
    with pytest.raises(ValueError, match="input_ids is required"):
        simulate(tiny("gpt2-lm"), PrismConfig(devices=2))
    with pytest.raises(ValueError, match="pixel_values is required"):
        simulate(tiny("vit"), PrismConfig(devices=2))
    with pytest.raises(ValueError, match="take input_ids, not pixel_values"):
        simulate(tiny("bert"), PrismConfig(devices=2), pixel_values=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="does not match the model's 32x32"):
        simulate(tiny("vit"), PrismConfig(devices=2), pixel_values=torch.zeros(1, 3, 48, 48))
    ids, _ = text_batch(batch=2, length=8)
    with pytest.raises(ValueError, match="attention_mask shape"):
        simulate(tiny("bert"), PrismConfig(devices=2), input_ids=ids, attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="must be a PrismConfig"):
        simulate(tiny("bert"), {"devices": 2}, input_ids=ids)


def test_hidden_payload_refused_for_rotary_means():
    ids, _ = text_batch(batch=1, length=12)
    with pytest.raises(ValueError, match="payload='kv' or 'auto'"):
        simulate(tiny("llama-lm"), PrismConfig(devices=2, cr=4, payload="hidden"), input_ids=ids)
