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
    from prism_edge.config import COUNT_FIELDS, FAMILY_DEFAULTS, FIDELITY_FIELDS, PLAIN

    for kind, defaults in FAMILY_DEFAULTS.items():
        resolved = PrismConfig().resolve(kind)
        budgeted = defaults["budget"] or defaults["generate_budget"]  # under a budget the counts are floors: 0
        assert all(getattr(resolved, f) == (PLAIN[f] if budgeted and f in COUNT_FIELDS else defaults[f])
                   for f in FIDELITY_FIELDS if f != "wire_dtype")
        fixed = PrismConfig(budget=0).resolve(kind)  # budget 0: the kind's fixed counts
        assert all(getattr(fixed, f) == defaults[f] for f in COUNT_FIELDS) and fixed.budget == 0
    assert PrismConfig(window=3, sinks=False).resolve("encoder").window == 3
    assert not PrismConfig(window=3, sinks=False).resolve("decoder").sinks
    assert PrismConfig(cr=1).resolve("decoder").wire_dtype == "float32"  # CR=1 stays exact
    voltage = PrismConfig(scheme="voltage", wire_dtype="float16").resolve("encoder")
    assert voltage.window == 0 and not voltage.sinks and voltage.wire_dtype == "float16"
    with pytest.raises(ValueError, match="anchor=4 needs a decoder"):
        PrismConfig(anchor=4).resolve("encoder")
    assert PrismConfig(cr=8).resolved("vision") == PrismConfig(cr=8).resolve("vision")  # the earlier name


# kind, PrismConfig options, resolve(training=...), what the RunConfig holds (and `fidelity`, `effective_*`)
DEC, ENC, VIS = "decoder", "encoder", "vision"
RESOLUTION = [
    # decoders: a budget for scoring, every earlier position whole (1.0) for generation; counts are floors (0)
    (DEC, {}, False, dict(sinks=True, window=0, window_frac=0.0, anchor=0, topk=0, topk_frac=0.0,
                          grouping="contiguous", count_bias=False, exact_when_cheap=True, tail=0,
                          wire_dtype="int8", int8_from=256, budget=0.1, generate_budget=1.0, budget_window=0.25,
                          budget_from=512)),
    (ENC, {}, False, dict(sinks=True, window=0, topk=0, topk_frac=0.0, grouping="contiguous", count_bias=False,
                          wire_dtype="int8", int8_from=0, budget=0.2, generate_budget=0.2, budget_from=32)),
    # a budget the user chose applies at any length (unless budget_from says otherwise)
    (DEC, dict(budget=0.05, budget_from=100), False, dict(budget=0.05, budget_from=100)),
    # budget 0: the kind's fixed counts (the defaults before budgets)
    (DEC, dict(budget=0.0), False, dict(window=64, topk=64, topk_frac=0.5, budget=0.0, generate_budget=0.0)),
    (ENC, dict(budget=0.0), False, dict(window=8, topk=8, budget=0.0)),
    # counts given without a budget: fixed counts; with one: floors under it; a generation budget apart
    (ENC, dict(window=16, topk=16), False, dict(window=16, topk=16, budget=0.0, generate_budget=0.0)),
    (ENC, dict(window=16, budget=0.3), False, dict(window=16, topk=0, budget=0.3, generate_budget=0.3)),
    (DEC, dict(budget=0.05), False, dict(budget=0.05, generate_budget=0.05, window=0, budget_from=0)),
    (DEC, dict(generate_budget=0.5), False, dict(budget=0.1, generate_budget=0.5)),
    (VIS, {}, False, dict(sinks=True, window=0, topk=16, grouping="similarity", count_bias=True,
                          wire_dtype="int8", int8_from=0)),
    # CR=1 is exact: float32 wire whatever the kind's (a decoder keeps its int8_from, moot on float32)
    (DEC, dict(cr=1), False, dict(wire_dtype="float32", int8_from=256, window=0)),
    (ENC, dict(cr=1), False, dict(wire_dtype="float32", int8_from=0)),
    # a wire the user chose applies at any length, unless int8_from says otherwise
    (DEC, dict(wire_dtype="int8"), False, dict(wire_dtype="int8", int8_from=0)),
    (DEC, dict(wire_dtype="int8", int8_from=9), False, dict(wire_dtype="int8", int8_from=9)),
    (ENC, dict(wire_dtype="bfloat16"), False, dict(wire_dtype="bfloat16", int8_from=0, window=0)),
    # options the user set stay; the rest take the kind's defaults
    (DEC, dict(window=3, sinks=False, anchor=4, tail=2, topk=0, grouping="similarity"), False,
     dict(window=3, sinks=False, anchor=4, tail=2, topk=0, topk_frac=0.5, grouping="similarity")),
    (VIS, dict(count_bias=False, exact_when_cheap=False, window_frac=0.25), False,
     dict(count_bias=False, exact_when_cheap=False, window_frac=0.25, topk=16)),
    # training: a default int8 wire becomes float32 (no gradient through rounding); a chosen one stays
    (DEC, {}, True, dict(wire_dtype="float32", int8_from=256)),
    (VIS, dict(wire_dtype="int8"), True, dict(wire_dtype="int8", int8_from=0)),
    (ENC, dict(wire_dtype="float16"), True, dict(wire_dtype="float16")),
    # Voltage and full are exact exchanges: every fidelity option off, whatever was set; a chosen wire stays
    (ENC, dict(scheme="voltage", window=3, topk=5, sinks=True), False,
     dict(window=0, topk=0, sinks=False, exact_when_cheap=False, wire_dtype="float32", int8_from=0)),
    (DEC, dict(scheme="voltage", wire_dtype="float16", anchor=4), False, dict(anchor=0, wire_dtype="float16")),
    (VIS, dict(scheme="full", devices=3, cr=8), False, dict(devices=3, cr=8, grouping="contiguous",
                                                            count_bias=False, wire_dtype="float32")),
]


@pytest.mark.parametrize("kind, given, training, expected", RESOLUTION)
def test_resolution_table(kind, given, training, expected):
    """Every (kind, scheme, CR, options the user set) resolves to a RunConfig with no option left None."""
    import dataclasses

    from prism_edge.config import PLAIN, Fidelity, RunConfig

    cfg = PrismConfig(**given)
    run = cfg.resolve(kind, training=training)
    assert isinstance(run, RunConfig) and run.kind == kind
    optional = ("weights", "stage_devices", "layer_split", "memory_budget")  # None: not asked for
    assert all(getattr(run, f.name) is not None for f in dataclasses.fields(run) if f.name not in optional)
    assert {name: getattr(run, name) for name in expected} == expected
    for name in ("devices", "cr", "scheme", "payload", "weights", "sink_token_ids"):  # never resolved: as given
        assert getattr(run, name) == getattr(cfg, name)
    prism = cfg.scheme == "prism"
    assert run.effective_devices == (1 if cfg.scheme == "full" else cfg.devices)
    assert run.effective_cr == (cfg.cr if prism else 1) == run.fidelity.cr
    if prism:
        assert run.fidelity == Fidelity(cr=run.cr, window=run.window, window_frac=run.window_frac,
                                        anchor=run.anchor, topk=run.topk, topk_frac=run.topk_frac,
                                        exact_when_cheap=run.exact_when_cheap, tail=run.tail, budget=run.budget,
                                        budget_window=run.budget_window, budget_from=run.budget_from)
    else:
        assert run.fidelity == Fidelity()
        assert all(getattr(run, name) == value for name, value in PLAIN.items() if name != "wire_dtype")
    assert run.settings.resolve(kind) == run  # resolving the spelled-out options gives the same run back
    assert run.describe() == run.settings.describe() and "default" not in run.describe()


def test_run_config_is_validated_at_construction():
    from prism_edge.config import RunConfig, resolve

    run = PrismConfig(devices=2).resolve("encoder")
    with pytest.raises(ValueError, match="window is None"):
        run.replace(window=None)
    with pytest.raises(ValueError, match="devices must be >= 1"):
        run.replace(devices=0)
    with pytest.raises(ValueError, match="unknown grouping"):
        run.replace(grouping="kmeans")
    with pytest.raises(ValueError, match="tail=3 needs a decoder"):
        run.replace(tail=3)
    with pytest.raises(ValueError, match="unknown model kind 'audio'"):
        run.replace(kind="audio")
    with pytest.raises(ValueError, match="unknown model kind 'audio'"):
        PrismConfig().resolve("audio")
    assert run.replace(weights=(2.0, 1.0)).slice_weights == (2.0, 1.0)
    assert PrismConfig(scheme="full", devices=2, weights=(2.0, 1.0)).resolve("encoder").slice_weights is None
    # the entry points' resolve: None is the default config, a RunConfig must be of the model's kind
    assert resolve(None, "vision") == PrismConfig().resolve("vision")
    assert resolve(run, "encoder") is run
    with pytest.raises(ValueError, match="resolved for kind 'encoder' but this model's kind is 'decoder'"):
        resolve(run, "decoder")
    with pytest.raises(ValueError, match="cfg must be a PrismConfig, got dict"):
        resolve({"devices": 2}, "decoder")
    assert isinstance(run, RunConfig)


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

    decoder = PrismConfig().resolve("decoder")
    assert decoder.int8_from == FAMILY_DEFAULTS["decoder"]["int8_from"] > 0
    assert decoder.wire_for(decoder.int8_from - 1) == "float16" and decoder.wire_for(decoder.int8_from) == "int8"
    assert PrismConfig().resolve("encoder").wire_for(3) == "int8"
    assert PrismConfig(wire_dtype="float32", int8_from=100).wire_for(3) == "float32"
    assert PrismConfig(wire_dtype="int8").resolve("decoder").wire_for(3) == "int8"  # chosen: int8 at any length
    assert PrismConfig(wire_dtype="int8", int8_from=9).resolve("decoder").wire_for(3) == "float16"
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
