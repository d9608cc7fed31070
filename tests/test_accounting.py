"""Bytes are counted from the exchanged tensors and match the analytic count; FLOPs match torch's counter."""

from __future__ import annotations

import pytest
import torch

from prism_edge import PrismConfig, simulate
from prism_edge.config import PLAIN
from prism_edge.partition.plan import split_sizes
from prism_edge.runtime.stats import flop_counter

from conftest import image_batch, text_batch, tiny

LENGTHS = [23, 17, 12]
D = 64  # hidden size of the tiny models
KV = 2 * 2 * 16  # llama tiny: K and V, 2 kv heads of 16


def _run(name, **cfg):
    ids, mask = text_batch(batch=3, length=23, pad_to=LENGTHS)
    return simulate(tiny(name), PrismConfig(**cfg), input_ids=ids, attention_mask=mask)


def _analytic(devices, cr, width, causal, bytes_per_value=4, exact_fn=None):
    """Per-layer bytes received by each device, from first principles (exact_fn(src, dst, n, sizes))."""
    """Per-layer bytes received by each device, from first principles."""
    received = [0] * devices
    for length in LENGTHS:
        sizes = split_sizes(length, devices)
        for dst in range(devices):
            for src in range(devices):
                if src == dst or (causal and src > dst):
                    continue
                n = sizes[src]
                exact = exact_fn(src, dst, n, sizes) if exact_fn else set()
                segments = {i // cr for i in range(n) if i not in exact}
                received[dst] += (len(exact) + len(segments)) * width * bytes_per_value
    return received


@pytest.mark.parametrize("devices", [2, 3, 4])
def test_voltage_bytes_are_the_full_exchange(devices):
    out = _run("bert", devices=devices, scheme="voltage")
    expected = [sum((n - split_sizes(n, devices)[p]) * D * 4 for n in LENGTHS) for p in range(devices)]
    for layer in range(out.stats.layers):
        assert list(out.stats.received[layer]) == expected
    assert out.stats.total_bytes == sum(expected) * out.stats.layers


@pytest.mark.fast_cases(cr=4)
@pytest.mark.parametrize("name, width, causal", [("bert", D, False), ("gpt2-lm", D, True), ("llama-lm", KV, True)])
@pytest.mark.parametrize("cr", [1, 4, 16])
def test_segment_mean_bytes_match_analytic(name, width, causal, cr):
    out = _run(name, devices=3, cr=cr, **PLAIN)
    expected = _analytic(3, cr, width, causal)
    assert all(list(layer) == expected for layer in out.stats.received)
    assert sum(map(sum, out.stats.sent)) == sum(map(sum, out.stats.received))


@pytest.mark.parametrize("window", [2, 5])
def test_sinks_and_window_bytes_match_analytic(window):
    ids, mask = text_batch(batch=3, length=23, pad_to=LENGTHS)

    def exact(src, dst, n, sizes):
        rows = {0} if src == 0 else set()  # the first token is the only sink in these ids
        start = sum(sizes[:src])
        ds, de = sum(sizes[:dst]), sum(sizes[: dst + 1])
        # the window: positions just before and just after dst's slice, whichever device owns them
        rows |= {i for i in range(n) if ds - window <= start + i < ds or de <= start + i < de + window}
        return rows

    cfg = PrismConfig(devices=3, cr=4, **{**PLAIN, "sinks": True, "window": window})
    out = simulate(tiny("bert"), cfg, input_ids=ids, attention_mask=mask)
    assert list(out.stats.received[0]) == _analytic(3, 4, D, False, exact_fn=exact)


def test_topk_int8_and_group_sizes_bytes_match_analytic():
    """Top-k rows, int8 rows with one float16 scale per head (kv payload), and int16 group sizes."""
    ids, mask = text_batch(batch=3, length=23, pad_to=LENGTHS)
    cfg = PrismConfig(devices=3, cr=4, **{**PLAIN, "topk": 1, "wire_dtype": "int8"})
    out = simulate(tiny("llama-lm"), cfg, input_ids=ids, attention_mask=mask)
    heads = 2 * 2  # K and V of 2 kv heads, one scale each
    received = [0] * 3
    for length in LENGTHS:
        sizes = split_sizes(length, 3)
        for src in range(3):
            for dst in range(src + 1, 3):
                n = sizes[src]
                groups = len({i // 4 for i in range(n)})
                rows = min(1, n) + groups  # one top-k row, and every segment's mean
                received[dst] += rows * (KV + 2 * heads) + 2 * groups
    assert list(out.stats.received[0]) == received


def test_wire_dtype_halves_bytes():
    # fixed counts (budget 0): the same rows at half the bytes (under a budget a cheaper wire buys more rows)
    full = _run("bert", devices=2, cr=4, wire_dtype="float32", budget=0.0)
    half = _run("bert", devices=2, cr=4, wire_dtype="float16", budget=0.0)
    bf = _run("bert", devices=2, cr=4, wire_dtype="bfloat16", budget=0.0)
    assert half.stats.total_bytes * 2 == full.stats.total_bytes == bf.stats.total_bytes * 2
    assert (half.last_hidden_state - full.last_hidden_state).abs().max() < 5e-2


def test_pure_segment_means_traffic_ratio():
    """Plain means send ~1/CR of Voltage's bytes (last segments are shorter, so a little more)."""
    ids = text_batch(batch=1, length=64)[0]
    model = tiny("bert")
    volt = simulate(model, PrismConfig(devices=2, scheme="voltage"), input_ids=ids).stats.total_bytes
    for cr in (4, 8, 32):
        prism = simulate(model, PrismConfig(devices=2, cr=cr, **PLAIN), input_ids=ids).stats.total_bytes
        assert prism / volt == pytest.approx(1 / cr)


@pytest.mark.parametrize("name", ["bert", "gpt2-lm", "llama-lm", "vit-cls"])
@torch.no_grad()
def test_one_device_flops_equal_the_hf_model(name):
    model = tiny(name)
    kw = dict(pixel_values=image_batch(1)) if name.startswith("vit") else dict(input_ids=text_batch(1, 32)[0])
    with flop_counter() as counter:
        model(**kw)
    assert simulate(model, PrismConfig(devices=1, cr=1), **kw).stats.flops == (counter.get_total_flops(),)


@torch.no_grad()
def test_prism_cuts_per_device_flops_against_voltage():
    model = tiny("bert")
    ids = text_batch(batch=1, length=64)[0]
    volt = simulate(model, PrismConfig(devices=4, scheme="voltage"), input_ids=ids).stats
    prism = simulate(model, PrismConfig(devices=4, cr=16, **PLAIN), input_ids=ids).stats
    full = simulate(model, PrismConfig(devices=4, scheme="full"), input_ids=ids).stats
    assert prism.max_flops < volt.max_flops
    # Voltage recomputes every K/V on every device; PRISM only its own plus a few means
    assert sum(prism.flops) < sum(volt.flops)
    # no redundant K/V: the busiest device does no more than a perfect 1/P split of the full model
    assert prism.max_flops <= full.flops[0] / 4 * 1.01
    assert volt.max_flops > full.flops[0] / 4 * 1.1
    assert sum(map(sum, prism.layer_flops)) < sum(prism.flops)  # embeddings and head counted on top


@pytest.mark.parametrize("name, wire, share", [("bert", "int8", 0.5), ("bert", "float16", 0.7),
                                               ("llama-lm", "int8", 0.6), ("gpt2-lm", "float32", 0.4)])
def test_a_budget_caps_the_bytes_each_device_receives(name, wire, share):
    """Under a byte budget every device receives at most `budget` x Voltage's float32 bytes for the same rows (its
    routes pooled), unless even the floors (sinks, one mean per segment) cost more; a larger budget sends more
    and a budget of 1 sends every route whole, which is exact at a float32 wire."""
    from prism_edge.config import PLAIN

    ids, mask = text_batch(batch=2, length=44, pad_to=[44, 36])

    def _run(name, **cfg):
        return simulate(tiny(name), PrismConfig(**cfg), input_ids=ids, attention_mask=mask)

    opts = dict(PLAIN, devices=3, cr=4, sinks=True, wire_dtype=wire)
    row = {"int8": 0.27, "float16": 0.5, "float32": 1.0}[wire]  # about what a row costs against a Voltage row
    budget = share * row  # enough for more than the floors, not for every row
    got = _run(name, **{**opts, "budget": budget})
    volt = _run(name, devices=3, cr=4, scheme="voltage")
    floors = _run(name, **opts)  # sinks and means only: what any budget must spend
    for p in range(3):
        cap = max(budget * volt.stats.bytes_received(p), floors.stats.bytes_received(p))
        assert (got.stats.bytes_received(p) > 0) == (volt.stats.bytes_received(p) > 0)  # a decoder's first: none
        assert got.stats.bytes_received(p) <= cap * 1.0001, (p, got.stats.bytes_received(p), cap)
    more = _run(name, **{**opts, "budget": (share + 0.25) * row})
    assert more.stats.total_bytes > got.stats.total_bytes
    whole = _run(name, **{**opts, "wire_dtype": "float32", "budget": 1.0})
    exact = _run(name, devices=3, cr=1)
    key = "logits" if name.endswith("lm") else "last_hidden_state"
    torch.testing.assert_close(whole[key], exact[key], atol=1e-5, rtol=1e-5)
