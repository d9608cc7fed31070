"""Pipeline stages of PRISM groups: the layout, CR=1 exactness for every family and layout, generation in every
decode mode, memory budgets, and the device processes against the simulator (outputs and every byte)."""

from __future__ import annotations

import pytest
import torch

from conftest import DECODERS, TEXT, image_batch, text_batch, tiny
from prism_edge import PrismConfig, simulate
from prism_edge.partition.stages import MIB, Sizes, balanced_split, fit_memory, stage_layout
from prism_edge.runtime.generate import generate
from prism_edge.runtime.stages import layout_for, model_sizes
from prism_edge.models import adapter_for

LAYERS = 5  # tiny models deep enough for 4 stages and uneven splits
LAYOUTS = [
    dict(stages=2),  # 2 x 2
    dict(stages=4),  # 4 x 1: a plain pipeline
    dict(stages=2, stage_devices=(1, 3)),
    dict(stages=3, stage_devices=(2, 1, 1), layer_split=(1, 3, 1)),
]
TOL = 1e-4


def _ids(d: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in d.items())


def _inputs(name: str) -> tuple[dict, torch.Tensor | None]:
    if name.startswith("vit"):
        return {"pixel_values": image_batch()}, None
    ids, mask = text_batch(batch=3, length=13, pad_to=[13, 9, 6])
    return {"input_ids": ids, "attention_mask": mask}, mask


def _worst(ref, out, mask) -> float:
    worst, compared = 0.0, 0
    for key in ("last_hidden_state", "pooler_output", "logits"):
        expected = getattr(ref, key, None)
        if expected is None:
            continue
        got = out[key]
        if mask is not None and got.dim() == 3:
            got, expected = got[mask.bool()], expected[mask.bool()]
        worst, compared = max(worst, (got - expected).abs().max().item()), compared + 1
    assert compared
    return worst


# ------------------------------------------------------------------------------------------------ the layout
def test_config_refuses_bad_stage_options():
    cases = [
        (dict(stages=0), "stages must be an integer >= 1"),
        (dict(devices=2, stages=3), "at least one device per stage"),
        (dict(stages=2, layer_split=(3,)), "layer_split has 1 entries but stages=2"),
        (dict(stages=2, stage_devices=(1, 2)), "make them add up"),
        (dict(stages=2, stage_devices=(0, 4)), "stage_devices must be whole numbers >= 1"),
        (dict(memory_budget=(100.0, 100.0)), "one for every device or one per device"),
        (dict(memory_budget=(-1.0,)), "memory_budget must be MiB > 0"),
        (dict(memory_budget=(100.0,), stages=2), "memory_budget chooses the stages"),
    ]
    for kwargs, text in cases:
        with pytest.raises(ValueError, match=text):
            PrismConfig(**kwargs)


def test_layout_refuses_what_the_model_cannot_take():
    run = PrismConfig(devices=4, stages=3).resolve("encoder")
    with pytest.raises(ValueError, match="stages=3 but the model has 2 layers"):
        stage_layout(run, 2)
    split = PrismConfig(devices=4, stages=2, layer_split=(2, 2)).resolve("encoder")
    with pytest.raises(ValueError, match="layer_split 2 \\+ 2 = 4 layers, but the model has 5"):
        stage_layout(split, 5)


def test_default_split_balances_parameter_bytes():
    # SmolLM2's shape: a 113 MB embedding (tied head) and 30 layers of 14.2 MB
    sizes = Sizes(113_246_208, (14_157_312,) * 30)
    assert balanced_split(sizes, (1.0, 1.0)) == (11, 19)  # the first stage carries the embedding: fewer layers
    assert balanced_split(Sizes(0, (1,) * 30), (1.0, 1.0)) == (15, 15)
    assert balanced_split(Sizes(0, (1,) * 7), (1.0,) * 3) in ((2, 3, 2), (3, 2, 2), (2, 2, 3))
    layout = stage_layout(PrismConfig(devices=4, stages=2).resolve("decoder"), 30, sizes)
    per_device = [layout.held_bytes(sizes, r) / sizes.total for r in range(4)]
    assert max(per_device) <= 0.55, per_device


def test_memory_budget_picks_the_fewest_stages_that_fit():
    sizes = Sizes(100 * MIB, (20 * MIB,) * 10)  # 300 MiB in all
    assert len(fit_memory(sizes, 4, (400.0,)).stages) == 1
    two = fit_memory(sizes, 4, (200.0,))
    assert len(two.stages) == 2 and all(two.held_bytes(sizes, r) <= 200 * MIB for r in range(4))
    assert len(fit_memory(sizes, 4, (130.0,)).stages) == 3  # 100 MiB of embeddings + one layer on the first
    per_device = fit_memory(sizes, 4, (250.0, 250.0, 90.0, 90.0))  # small boards take fewer layers
    assert all(per_device.held_bytes(sizes, r) <= b * MIB for r, b in enumerate((250, 250, 90, 90)))
    with pytest.raises(ValueError, match="the model cannot fit.*embeddings and head 100.0 MiB"):
        fit_memory(sizes, 4, (110.0,))


# ------------------------------------------------------------------------------------------- exactness
@pytest.mark.fast_cases(name="llama-lm", layout=LAYOUTS[3])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
@pytest.mark.parametrize("name", TEXT + ["vit", "vit-cls"])
@torch.no_grad()
def test_stages_exact_at_cr1(name, layout):
    model = tiny(name, layers=LAYERS)
    inputs, mask = _inputs(name)
    ref = model(**inputs)
    for extra in (dict(scheme="prism", cr=1), dict(scheme="voltage")):
        out = simulate(model, PrismConfig(devices=4, **extra, **layout), **inputs)
        assert _worst(ref, out, mask) <= TOL
        stats = out.stats
        assert stats.world == 4 and stats.stage_bytes > 0  # the hand-offs are counted, apart from the exchange
        assert stats.request_bytes == (stats.total_bytes + stats.stage_bytes + sum(stats.input_bytes)
                                       + sum(stats.output_bytes))


@torch.no_grad()
def test_stage_handoffs_carry_exactly_the_rows_each_device_needs():
    model = tiny("llama-lm", layers=LAYERS)
    ids, mask = text_batch(batch=2, length=12, pad_to=[12, 7])
    out = simulate(model, PrismConfig(devices=4, cr=1, stages=2, stage_devices=(1, 3), anchor=2),
                   input_ids=ids, attention_mask=mask)
    assert _worst(model(input_ids=ids, attention_mask=mask), out, mask) <= TOL
    real, anchors, d = int(mask.sum()), 2 * 2 * 2, 64  # stage 1's last two devices recompute 2 anchors each
    # stage 0 -> 1: every real row once plus the anchor copies; the ring back: every real row once
    assert out.stats.stage_bytes == 4 * d * (real + anchors) + 4 * d * real


@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=_ids)
@torch.no_grad()
def test_compressed_stages_equal_the_same_group_without_stages(layout):
    """At CR > 1 every stage of P devices plans as a P-device PRISM group does: 2 x 2 is PRISM on 2 devices."""
    model = tiny("llama-lm", layers=LAYERS)
    inputs, mask = _inputs("llama-lm")
    per_stage = 4 // layout["stages"]
    staged = simulate(model, PrismConfig(devices=4, cr=4, budget=0, window=2, topk=1, **layout), **inputs)
    group = simulate(model, PrismConfig(devices=per_stage, cr=4, budget=0, window=2, topk=1), **inputs)
    assert (staged.logits - group.logits)[mask.bool()].abs().max().item() <= TOL
    assert staged.stats.total_bytes == layout["stages"] * 0 + sum(map(sum, staged.stats.sent))
    if per_stage > 1:  # each stage's exchange is the group's, over its own layers
        assert staged.stats.total_bytes == group.stats.total_bytes


@torch.no_grad()
def test_memory_budget_runs_a_model_no_device_holds():
    model = tiny("llama-lm", layers=LAYERS)
    sizes = model_sizes(adapter_for(model))
    budget = 0.6 * sizes.total / MIB
    cfg = PrismConfig(devices=4, cr=4, budget=0, window=2, memory_budget=(budget,))
    layout = layout_for(cfg.resolve("decoder"), adapter_for(model))
    assert len(layout.stages) == 2 and all(layout.held_bytes(sizes, r) <= budget * MIB for r in range(4))
    inputs, mask = _inputs("llama-lm")
    staged = simulate(model, cfg, **inputs)
    group = simulate(model, PrismConfig(devices=2, cr=4, budget=0, window=2), **inputs)
    assert (staged.logits - group.logits)[mask.bool()].abs().max().item() <= TOL
    with pytest.raises(ValueError, match="the model cannot fit"):
        simulate(model, PrismConfig(devices=4, memory_budget=(0.01,)), **inputs)


# ------------------------------------------------------------------------------------------- generation
@pytest.mark.fast_cases(name="llama-lm", layout=LAYOUTS[3])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
@pytest.mark.parametrize("name", DECODERS)
def test_generation_through_stages_equals_the_full_model(name, layout):
    model = tiny(name, layers=LAYERS)
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(5))
    full = generate(model, PrismConfig(scheme="full"), ids, max_new_tokens=8).new_ids
    for mode in ("local", "handoff", "distributed"):
        got = generate(model, PrismConfig(devices=4, cr=1, **layout), ids, max_new_tokens=8, decode=mode)
        assert got.new_ids == full, mode
        d, later = 64, layout["stages"] - 1
        # per fed-back token: its id and row to every later stage, the row back to the first
        assert got.stage_bytes == 7 * (later * (8 + 4 * d) + 4 * d)
        assert got.prefill_stats is not None and got.prefill_stats.stage_bytes > 0


# ------------------------------------------------------------------------------------------- device processes
@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    paths = {}
    for name in ("llama-lm", "bert"):
        paths[name] = str(root / name)
        tiny(name, layers=LAYERS).save_pretrained(paths[name])
    return paths


@pytest.mark.fast_cases(layout=LAYOUTS[0], name="llama-lm")
@pytest.mark.parametrize("name, layout", [("llama-lm", LAYOUTS[0]), ("llama-lm", LAYOUTS[3]), ("bert", LAYOUTS[0])],
                         ids=lambda v: v if isinstance(v, str) else _ids(v))
def test_device_processes_equal_the_simulator_holding_only_their_stage(deep, name, layout, one_thread):
    from prism_edge.cluster import Cluster
    from prism_edge.models.parts import held_bytes

    model = tiny(name, layers=LAYERS)
    inputs, mask = _inputs(name)
    cfg = PrismConfig(devices=4, cr=4, **layout)
    ref = simulate(model, cfg, **inputs)
    with Cluster(deep[name], cfg, timeout=20) as cluster:
        out = cluster(**inputs)
        key = "logits" if name == "llama-lm" else "last_hidden_state"
        assert (getattr(out, key) - getattr(ref, key))[mask.bool()].abs().max().item() <= 1e-5
        s, r = out.stats, ref.stats
        assert s.sent == r.sent and s.stage_sent == r.stage_sent and s.stage_received == r.stage_received
        assert s.input_bytes == r.input_bytes and s.output_bytes == r.output_bytes
        whole = held_bytes(model)
        assert all(b < whole for b in s.param_bytes), (s.param_bytes, whole)  # no device holds the whole model
        if name == "llama-lm":  # outputs `last`: the ring carries each sequence's last row only, the head runs on it
            last = cluster(**inputs, outputs="last")
            ends = mask.sum(1) - 1
            want = ref.logits[torch.arange(len(ends)), ends]
            assert (last.logits[:, 0] - want).abs().max().item() <= 1e-5
            real, batch, d = int(mask.sum()), mask.shape[0], 64
            assert last.stats.stage_bytes == s.stage_bytes - 4 * d * real + 4 * d * batch  # the ring: one row each
            ids = inputs["input_ids"][:1]
            for mode in ("local", "handoff", "distributed"):
                got = cluster.generate(ids, max_new_tokens=5, decode=mode)
                want = generate(model, cfg, ids, max_new_tokens=5, decode=mode)
                assert got.new_ids == want.new_ids, mode
                assert (got.handoff_bytes, got.decode_bytes, got.stage_bytes) == (
                    want.handoff_bytes, want.decode_bytes, want.stage_bytes), mode


@pytest.mark.slow
def test_workers_without_the_model_take_it_from_rank_0_once(deep, tmp_path, one_thread):
    from prism_edge.cluster import Cluster

    model = tiny("llama-lm", layers=LAYERS)
    ids, mask = text_batch(batch=2, length=11, pad_to=[11, 8])
    cfg = PrismConfig(devices=3, cr=4, stages=2, stage_devices=(1, 2))
    ref = simulate(model, cfg, input_ids=ids, attention_mask=mask)
    for start in (1, 2):
        logs: list[str] = []
        with Cluster(deep["llama-lm"], cfg, timeout=20, fetch_weights=True, cache_dir=str(tmp_path),
                     log=logs.append) as cluster:
            out = cluster(input_ids=ids, attention_mask=mask)
        assert (out.logits - ref.logits)[mask.bool()].abs().max().item() <= 1e-5
        sent = [line for line in logs if line.startswith("weights for rank")]
        assert len(sent) == 2, logs
        if start == 2:  # every worker found its stage's tensors in its cache
            assert all("0.0 MB sent" in line and "cached" in line for line in sent), sent


@torch.no_grad()
def test_dinov2_stages_exact_at_cr1():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=4,
                                     image_size=28, patch_size=7)).eval()
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.2)  # layer scales and norms away from 1 and 0
    px = torch.randn(2, 3, 28, 35, generator=torch.Generator().manual_seed(1))  # any size: 4 x 5 patches
    ref = model(pixel_values=px)
    for layout in (dict(stages=2), dict(stages=4), dict(stages=2, stage_devices=(3, 1))):
        out = simulate(model, PrismConfig(devices=4, cr=1, **layout), pixel_values=px)
        assert _worst(ref, out, None) <= TOL, layout


@pytest.mark.slow
def test_a_device_failing_in_a_later_stage_fails_only_that_request(deep, one_thread):
    """Rank 3 (the second stage's last device) raises in layer 4 of request 1; rank 2 (the second stage's earlier
    device) while answering a decode query in request 3: each request is refused naming the rank, and every stage
    serves the next one as the simulator does."""
    from prism_edge.cluster import Cluster, RequestError

    model = tiny("llama-lm", layers=LAYERS)
    inputs, mask = _inputs("llama-lm")
    cfg = PrismConfig(devices=4, cr=4, stages=2)
    ref = simulate(model, cfg, **inputs)
    ids = inputs["input_ids"][:1]
    env = {"PRISM_EDGE_FAULT": "3:raise@4#1,2:decode@4#3"}
    with Cluster(deep["llama-lm"], cfg, timeout=20, worker_env=env) as cluster:
        with pytest.raises(RequestError, match="rank 3 failed in layer 4: InjectedFault"):
            cluster(**inputs)
        out = cluster(**inputs)
        assert (out.logits - ref.logits)[mask.bool()].abs().max().item() <= 1e-5
        with pytest.raises(RequestError, match="rank 2 failed answering layer 4's decode query"):
            cluster.generate(ids, max_new_tokens=5, decode="distributed")
        want = generate(model, cfg, ids, max_new_tokens=5, decode="distributed").new_ids
        assert cluster.generate(ids, max_new_tokens=5, decode="distributed").new_ids == want


@pytest.mark.slow
def test_a_lost_device_in_a_later_stage_stops_everyone(deep, one_thread, monkeypatch):
    from prism_edge.cluster import Cluster, ClusterError

    monkeypatch.setenv("PRISM_EDGE_FAULT", "2:die@4")  # a second-stage device dies in its first request
    cluster = Cluster(deep["llama-lm"], PrismConfig(devices=4, cr=4, stages=2), timeout=3)
    try:
        with pytest.raises(ClusterError, match="rank 2"):
            cluster(**_inputs("llama-lm")[0])
        for rank in (1, 3):
            assert cluster.workers.procs[rank].wait(timeout=30) == 3  # they stop on their own, naming the loss
    finally:
        cluster.close()
