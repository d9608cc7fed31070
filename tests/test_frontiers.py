"""The shipped frontier tables (prism_edge/data/frontiers.json) and what reads and builds them."""

from __future__ import annotations

import json

import pytest

from prism_edge import frontiers
from prism_edge.config import FAMILY_DEFAULTS


def test_the_shipped_tables_cover_each_kind_at_several_lengths():
    table = frontiers.table()
    assert {"encoder", "decoder"} <= set(table["families"])
    for kind, fam in table["families"].items():
        lengths = {p["length"] for p in fam["points"]}
        assert len(lengths) >= (3 if kind == "encoder" else 2 if kind == "decoder" else 1), kind
        for p in fam["points"]:
            assert 0 < p["budget"] <= 1 and 0 < p["bytes_vs_voltage"] <= p["budget"] * 1.01 + 1e-9
        if kind != "vision":  # the test set of Fashion-MNIST is held out by construction
            assert "heldout" in fam["data"]


def test_predictions_follow_the_measurements():
    enc = FAMILY_DEFAULTS["encoder"]["budget"]
    for length in (50, 100, 200, 300, 500):  # the encoder's default holds as inputs grow (issue 20's target)
        pred = frontiers.predict("encoder", enc, length)
        assert pred is not None and pred.metric == "cosine" and pred.value >= 0.99, (length, pred)
    at = [frontiers.predict("encoder", b, 200).value for b in (0.05, 0.1, 0.15, 0.2)]
    assert at == sorted(at)  # more bytes, more fidelity
    mid = frontiers.predict("encoder", 0.125, 200).value  # between measured budgets: linear
    assert at[1] <= mid <= at[2]
    dec = frontiers.predict("decoder", FAMILY_DEFAULTS["decoder"]["budget"], 768)
    assert dec is not None and dec.metric == "perplexity_increase" and not dec.higher_is_better
    assert dec.value <= 0.01 and dec.lengths == (512, 1024)
    assert frontiers.predict("encoder", 0.01, 200) is None  # below every measured budget: not predicted
    with pytest.raises(ValueError, match="budget must be"):
        frontiers.predict("encoder", 1.5, 200)


def test_the_builder_refuses_dev_grids(tmp_path):
    from prism_edge.eval.frontiers import build, grid_points

    grid = {"task": "passages", "model": "minilm", "data": "x", "options": {"length": 100, "split": "dev"},
            "rows": [{"scheme": "full", "variant": "reference", "devices": 1, "cr": 1, "metrics": {"cosine": 1.0},
                      "bytes_per_item": 0, "voltage_bytes_per_item": None}]}
    with pytest.raises(ValueError, match="held-out data only"):
        grid_points(grid)
    grid["options"]["split"] = "heldout"
    grid["rows"].append({"scheme": "prism", "variant": "defaults+budget0.1", "devices": 4, "cr": 16,
                         "metrics": {"cosine": 0.97}, "bytes_per_item": 9.0, "voltage_bytes_per_item": 100.0})
    path = tmp_path / "g.json"
    path.write_text(json.dumps(grid))
    built = build([path])
    assert built["families"]["encoder"]["points"] == [
        {"length": 100, "source": "passages", "budget": 0.1, "value": 0.97, "bytes_vs_voltage": 0.09}]
