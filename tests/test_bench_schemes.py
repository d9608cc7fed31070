"""`prism-edge bench schemes`: scheme parsing, and one short real run checked against analytic bytes and FLOP ratios."""

from __future__ import annotations

import csv
import json

import pytest

from prism_edge import PrismConfig
from prism_edge.bench.schemes import COLUMNS, Scheme, parse_scheme


def test_parse_scheme():
    assert parse_scheme("full") == Scheme("full", "full")
    assert parse_scheme("prism:16") == Scheme("prism:16", "prism", 16, "defaults")
    s = parse_scheme("prism:128:plain+fp16")
    assert (s.cr, s.variant) == (128, "plain+fp16")
    cfg = s.config(4)
    assert (cfg.cr, cfg.sinks, cfg.window, cfg.topk, cfg.wire_dtype) == (128, False, 0, 0, "float16")
    assert parse_scheme("prism:16:int8").config(2) == PrismConfig(devices=2, cr=16, wire_dtype="int8")
    assert parse_scheme("tp").config(2) is None
    assert parse_scheme("full").config(4).effective_devices == 1
    for bad in ("prism", "prism:x", "prism:0", "prism:4:fp8", "pipeline", "full:2", "prism:4:w"):
        with pytest.raises(ValueError, match="scheme"):
            parse_scheme(bad)


@pytest.mark.real
def test_short_bench_on_loopback(minilm, tmp_path):
    from prism_edge.bench.options import SchemesOptions
    from prism_edge.bench.schemes import main
    from prism_edge.eval.requests import builtin_request

    length, layers, hidden = 32, 6, 384
    text = main(SchemesOptions(out=tmp_path, link=("loopback",), devices=2,
                               schemes=("full", "voltage", "tp", "prism:4:plain"), repeats=1, length=length))
    rows = {r["scheme"]: r for r in json.loads((tmp_path / "schemes-minilm.json").read_text())}
    for col in ("latency (ms)", "bytes per request", "busiest device GFLOPs", "÷ perfect split", "peak RSS (MiB)"):
        assert col in text
    with open(tmp_path / "schemes-minilm.csv") as f:
        assert set(COLUMNS) <= set(next(csv.reader(f)))
    assert (tmp_path / "latency-minilm.png").stat().st_size > 0 and (tmp_path / "bytes-minilm.png").exists()

    # ledger against analytic bytes: every real row of a device goes to the other device every layer (Voltage);
    # plain Segment Means send ceil(rows / CR) means per sequence instead
    enc = builtin_request(minilm, length)
    lengths = enc["attention_mask"].sum(1).tolist()
    halves = [((n + 1) // 2, n // 2) for n in lengths]
    assert rows["voltage"]["exchange_bytes"] == layers * sum(lengths) * hidden * 4
    means = sum(-(-a // 4) + -(-b // 4) for a, b in halves)
    assert rows["prism:4:plain"]["exchange_bytes"] == layers * means * hidden * 4
    assert rows["full"]["exchange_bytes"] == 0 and rows["full"]["flops_vs_perfect_split"] == pytest.approx(1.0)
    assert rows["voltage"]["flops_vs_perfect_split"] > 1.0  # every device recomputes all K/V
    assert 0.9 < rows["prism:4:plain"]["flops_vs_perfect_split"] < rows["voltage"]["flops_vs_perfect_split"]
    # tensor parallelism: two all-reduces of the full activations per layer
    batch, padded = enc["input_ids"].shape  # TP computes padded positions too
    assert rows["tp"]["exchange_bytes"] == 2 * (2 * layers * batch * padded * hidden * 4)  # P=2: ring sends 1x
    assert 0.95 < rows["tp"]["flops_vs_perfect_split"] < 1.1
    for r in rows.values():
        assert r["wall_s"] > 0 and r["peak_rss_mib"] > 50 and r["cpu_s"] > 0
