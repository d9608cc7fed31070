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
        (dict(wire_dtype="int4"), "unknown wire_dtype"),
        (dict(window=-1), "window must be >= 0"),
        (dict(window=2.5), "window must be an integer"),
        (dict(topk=-2), "topk must be >= 0"),
        (dict(anchor=-1), "anchor must be >= 0"),
        (dict(window_frac=1.5), "window_frac must be a fraction between 0 and 1"),
        (dict(topk_frac=-0.1), "topk_frac must be a fraction"),
        (dict(topk_frac="a"), "topk_frac must be a fraction"),
        (dict(grouping="kmeans"), "unknown grouping 'kmeans'; choose one of contiguous, similarity"),
        (dict(sinks=1), "sinks must be True, False or None"),
        (dict(devices=2, weights=(1.0,)), "one weight per device"),
        (dict(devices=2, weights=(1.0, 0.0)), "must all be finite numbers > 0"),
        (dict(devices=2, weights=(float("inf"), 1.0)), "must all be finite numbers > 0"),
        (dict(devices=2, weights=(float("nan"), 1.0)), "must all be finite numbers > 0"),
        (dict(int8_from=-1), "int8_from must be >= 0"),
        (dict(int8_from=0.5), "int8_from must be an integer"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrismConfig(**kwargs)


def test_unset_options_resolve_per_kind_and_set_ones_stay():
    from prism_edge.config import FAMILY_DEFAULTS, FIDELITY_FIELDS

    for kind, defaults in FAMILY_DEFAULTS.items():
        resolved = PrismConfig().resolved(kind)
        assert resolved.is_resolved and all(getattr(resolved, f) == defaults[f] for f in FIDELITY_FIELDS
                                            if f != "wire_dtype")
    assert PrismConfig(window=3, sinks=False).resolved("encoder").window == 3
    assert not PrismConfig(window=3, sinks=False).resolved("decoder").sinks
    assert PrismConfig(cr=1).resolved("decoder").wire_dtype == "float32"  # CR=1 stays exact
    voltage = PrismConfig(scheme="voltage", wire_dtype="float16").resolved("encoder")
    assert voltage.window == 0 and not voltage.sinks and voltage.wire_dtype == "float16"
    with pytest.raises(ValueError, match="anchor=4 needs a decoder"):
        PrismConfig(anchor=4).resolved("encoder")


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


def test_short_requests_give_the_int8_wire_up_for_float16():
    """Decoders: under `int8_from` positions the rows travel as float16 — the same outputs and bytes as an
    explicit float16 wire — and from there on as int8; encoders keep int8 at any length."""
    from prism_edge.config import FAMILY_DEFAULTS

    decoder = PrismConfig().resolved("decoder")
    assert decoder.int8_from == FAMILY_DEFAULTS["decoder"]["int8_from"] > 0
    assert decoder.wire_for(decoder.int8_from - 1) == "float16" and decoder.wire_for(decoder.int8_from) == "int8"
    assert PrismConfig().resolved("encoder").wire_for(3) == "int8"
    assert PrismConfig(wire_dtype="float32", int8_from=100).wire_for(3) == "float32"
    assert PrismConfig(wire_dtype="int8").resolved("decoder").wire_for(3) == "int8"  # chosen: int8 at any length
    assert PrismConfig(wire_dtype="int8", int8_from=9).resolved("decoder").wire_for(3) == "float16"
    assert "float16 below 256 positions" in decoder.describe()
    model = tiny("llama-lm")
    ids = (torch.arange(24) * 7 % 50 + 3).unsqueeze(0)
    base = dict(devices=3, cr=4, sinks=True, window=2, topk=1, wire_dtype="int8")

    def run(**kw):
        with torch.no_grad():
            return simulate(model, PrismConfig(**base, **kw), input_ids=ids)

    short, int8 = run(int8_from=25), run(int8_from=24)  # 24 positions: below 25, not below 24
    with torch.no_grad():
        fp16 = simulate(model, PrismConfig(**{**base, "wire_dtype": "float16"}), input_ids=ids)
    assert short.stats.total_bytes == fp16.stats.total_bytes > int8.stats.total_bytes
    assert torch.equal(short.logits, fp16.logits) and not torch.equal(short.logits, int8.logits)
    assert int8.stats.total_bytes == run(int8_from=0).stats.total_bytes
