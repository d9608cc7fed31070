"""Padding never leaks into results; a decoder never sees the future; batching changes nothing."""

from __future__ import annotations

import pytest
import torch

from prism_edge import PrismConfig, simulate
from prism_edge.config import PLAIN
from prism_edge.models import adapter_for

from conftest import DECODERS, TEXT, text_batch, tiny

CRS = [1, 2, 4, 16]
VARIANTS = [PLAIN, dict(), dict(sinks=True, window=2, count_bias=True, topk=1, grouping="similarity",
                              exact_when_cheap=False), dict(window=1, topk_frac=0.3, wire_dtype="int8")]
IDS = ["plain", "defaults", "window-topk-similarity-bias", "int8"]
TOL = 1e-5


def _out(result):
    return result.logits if result.logits is not None else result.last_hidden_state


@pytest.mark.fast_cases(cr=4, name=("bert", "llama-lm"), variant=VARIANTS[1])
@pytest.mark.parametrize("name", TEXT)
@pytest.mark.parametrize("cr", CRS)
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@torch.no_grad()
def test_padding_never_leaks(name, cr, variant):
    model = tiny(name)
    lengths = [14, 9, 6]
    ids, mask = text_batch(batch=3, length=14, pad_to=lengths)
    ids[1, 9:] = 55  # garbage under the padding must not matter either
    cfg = PrismConfig(devices=3, cr=cr, **variant)
    # a float16 wire (decoders' defaults for short requests) rounds at 1e-3 relative: batched and lone float32
    # sums differ in the last bit, which now and then lands a value on the other side of a rounding boundary
    wire = cfg.resolve(adapter_for(model).kind).wire_for(max(lengths))
    tol = 1e-4 if wire in ("float16", "bfloat16") else TOL
    padded = _out(simulate(model, cfg, input_ids=ids, attention_mask=mask))
    for b, n in enumerate(lengths):
        alone = _out(simulate(model, cfg, input_ids=ids[b : b + 1, :n]))
        assert (padded[b, :n] - alone[0]).abs().max().item() <= tol, (b, n)


@pytest.mark.fast_cases(cr=4, devices=3, name="llama-lm", variant=(VARIANTS[1], VARIANTS[2]))
@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("cr", CRS)
@pytest.mark.parametrize("devices", [2, 3, 4])
@pytest.mark.parametrize("variant", VARIANTS + [dict(anchor=3, window=2, topk=1)], ids=IDS + ["anchor"])
@torch.no_grad()
def test_no_output_depends_on_a_later_token(name, cr, devices, variant):
    model = tiny(name)
    ids, _ = text_batch(batch=1, length=13)
    cfg = PrismConfig(devices=devices, cr=cr, **variant)
    base = simulate(model, cfg, input_ids=ids, count_flops=False).logits
    for j in range(1, 13):
        changed = ids.clone()
        changed[0, j] = 3 + (int(ids[0, j]) - 3 + 7) % 90  # another ordinary (non-special) token
        out = simulate(model, cfg, input_ids=changed, count_flops=False).logits
        assert (out[0, :j] - base[0, :j]).abs().max().item() <= 1e-6, j
        assert (out[0, j:] - base[0, j:]).abs().max().item() > 0, j  # the change is seen from j on


@pytest.mark.parametrize("name", ["bert", "llama-lm"])
@torch.no_grad()
def test_compression_changes_outputs(name):
    """Guard against a vacuous engine: CR>1 must differ from the exact run (and from no exchange)."""
    model = tiny(name)
    ids, mask = text_batch(batch=1, length=24)
    exact = _out(simulate(model, PrismConfig(devices=2, cr=1), input_ids=ids))
    approx = _out(simulate(model, PrismConfig(devices=2, cr=8, **PLAIN), input_ids=ids))
    assert (exact - approx).abs().max().item() > 1e-4
