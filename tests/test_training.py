"""The simulator is differentiable: fine-tuning through the partitioned forward works."""

from __future__ import annotations

import pytest
import torch

from prism_edge import PrismConfig, simulate

from conftest import text_batch, tiny


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cr1_gradients_equal_hf_gradients():
    model = tiny("llama-lm")
    ids, mask = text_batch(batch=2, length=12, pad_to=[12, 9])
    model(input_ids=ids, attention_mask=mask).logits[mask.bool()].pow(2).mean().backward()
    ref = _grads(model)
    model.zero_grad()
    simulate(model, PrismConfig(devices=3, cr=1), input_ids=ids, attention_mask=mask, count_flops=False) \
        .logits[mask.bool()].pow(2).mean().backward()
    got = _grads(model)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.allclose(ref[name], got[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.slow  # 40 training steps
def test_gradients_flow_through_segment_means_and_training_lowers_loss():
    model = tiny("bert-cls").train()
    torch.manual_seed(0)  # dropout draws
    ids, mask = text_batch(batch=4, length=16, pad_to=[16, 14, 12, 10])
    labels = torch.tensor([0, 1, 2, 1])
    cfg = PrismConfig(devices=2, cr=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        logits = simulate(model, cfg, input_ids=ids, attention_mask=mask, count_flops=False).logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        if not losses:  # device 1's keys only reach device 0 (the [CLS]) through the means
            key = model.bert.encoder.layer[0].attention.self.key.weight.grad
            assert key is not None and torch.isfinite(key).all() and key.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < losses[0] * 0.3
