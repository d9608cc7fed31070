"""`prism-edge bench stages`: layout parsing and flag checks, and one short run on a tiny saved model."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import saved_models
from prism_edge import PrismConfig
from prism_edge.app.cli import main
from prism_edge.bench.options import StagesOptions, parse_layout


def test_layouts_parse_into_configs():
    from prism_edge.bench.stages import layout_config

    assert [parse_layout(t) for t in ("1x4", "2x2", "4X1", "1x1")] == [(1, 4), (2, 2), (4, 1), (1, 1)]
    assert layout_config("2x2", 16) == PrismConfig(devices=4, cr=16, stages=2)
    assert layout_config("1x4", 16) == PrismConfig(devices=4, cr=16)
    assert layout_config("1x1", 16) == PrismConfig(devices=1, scheme="full")
    for bad in ("2", "x2", "2x", "0x4", "2x0", "axb", "2x2x2"):
        with pytest.raises(ValueError, match=r"--layouts: bad layout"):
            parse_layout(bad)
    with pytest.raises(ValueError, match="--lengths takes one or more integers"):
        StagesOptions(lengths=())


@pytest.mark.parametrize("argv, match", [
    (["--layouts", "1x4", "2by2"], "--layouts: bad layout '2by2'; use STAGESxDEVICES"),
    (["--lengths", "0"], "--lengths must be an integer >= 1, got 0"),
    (["--link", "moon"], "--link: bad link 'moon'"),
    (["--generate", "-1"], "--generate must be an integer >= 0"),
])
def test_bad_values_are_refused_with_one_line(argv, match, capsys):
    assert main(["bench", "stages", *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_short_bench_on_loopback(tmp_path):
    from prism_edge.bench.stages import COLUMNS
    from prism_edge.bench.stages import main as bench

    model = saved_models(tmp_path, ["llama-lm"])["llama-lm"]
    out = tmp_path / "out"
    text = bench(StagesOptions(out=out, model=model, layouts=("1x4", "2x2"), lengths=(32,), link=("loopback",),
                               repeats=1, generate=3, generate_prompt=16))
    stem = "stages-" + model.replace("/", "_").replace(":", "-")
    rows = {r["layout"]: r for r in json.loads((out / f"{stem}.json").read_text())}
    assert set(rows) == {"1x4", "2x2"} and "| loopback | 2x2 | 32 |" in text
    for r in rows.values():
        assert r["positions"] == 32 and r["wall_s"] > 0 and r["exchange_bytes"] > 0
        assert len(r["param_bytes"]) == 4 and len(r["peak_rss_mib"]) == 4 and min(r["peak_rss_mib"]) > 50
        assert r["gen_tokens"] == 3 and r["tok_s"] > 0
    assert rows["1x4"]["stage_bytes"] == 0 and rows["1x4"]["gen_stage_bytes"] == 0
    assert rows["2x2"]["stage_bytes"] > 0 and rows["2x2"]["gen_stage_bytes"] > 0
    assert rows["2x2"]["vs_1x4"] == pytest.approx(rows["2x2"]["wall_s"] / rows["1x4"]["wall_s"])
    with open(out / f"{stem}.csv") as f:
        assert next(csv.reader(f)) == COLUMNS
    assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.md").exists()
