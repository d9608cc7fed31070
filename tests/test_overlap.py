"""Split attention (own keys while the means travel, then received keys, log-sum-exp merge) == one attention."""

import pytest
import torch

from conftest import BUILDERS, image_batch, text_batch, tiny
from prism_edge import PrismConfig, simulate
from prism_edge.runtime.attention import Partial


@pytest.mark.fast_cases(cr=4, name=("bert", "llama-lm", "vit"))
@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("cr", [1, 4])
@pytest.mark.parametrize("kernel", ["flash", "matmul"])  # inference: torch's CPU flash kernel; with grads: matmuls
def test_overlapped_attention_equals_joint_attention(name, cr, kernel):
    model = tiny(name)
    if name.startswith("vit"):
        inputs = {"pixel_values": image_batch()}
    else:
        ids, mask = text_batch(batch=3, length=13, pad_to=[13, 8, 11])
        inputs = {"input_ids": ids, "attention_mask": mask}
    cfg = PrismConfig(devices=3, cr=cr, window=1, topk=1, grouping="similarity", count_bias=True)
    with torch.set_grad_enabled(kernel == "matmul"):
        joint = simulate(model, cfg, **inputs)
        split = simulate(model, cfg, overlap=True, **inputs)
    for key in joint.keys():
        if key not in ("stats", "plan"):
            torch.testing.assert_close(getattr(split, key).detach(), getattr(joint, key).detach(), atol=1e-5, rtol=1e-5)
    assert split.stats.flops == joint.stats.flops
    assert split.stats.sent == joint.stats.sent


def test_partial_merge_is_exact_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 9, 4), torch.randn(2, 3, 9, 4)
    scores = q @ k.transpose(-1, -2)
    want = scores.softmax(-1) @ v

    def part(sl):
        s = scores[..., sl]
        lse = s.logsumexp(-1, keepdim=True)
        return Partial((s - lse).exp() @ v[..., sl, :], lse)

    torch.testing.assert_close(part(slice(0, 4)).merge(part(slice(4, 9))), want)
