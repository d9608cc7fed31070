"""PRISM-aware fine-tuning: a short run through the partitioned forward lowers the training loss, LoRA
merges exactly, the result round-trips through save/load, and the device processes serve it."""

from __future__ import annotations

import json

import pytest
import torch

from prism_edge import PrismConfig, simulate
from prism_edge.config import PLAIN
from prism_edge.models.loading import load_model
from prism_edge.train import RECORD, LoRALinear, TrainConfig, add_lora, fit, lm_loss, merge_lora, save

from conftest import tiny


@pytest.mark.real
def test_fashion_recipe_lowers_loss_and_round_trips(fashion_vit, tmp_path):
    from prism_edge.finetune import finetune

    loaded = load_model("vit-fmnist")  # a private copy: the session fixture stays untouched
    cfg = PrismConfig(devices=2, cr=16, **PLAIN)  # plain means: far from the unpartitioned model, much to learn
    record = finetune("fashion", loaded, cfg, TrainConfig(steps=12, lr=2e-3), out=tmp_path / "ft",
                      batch_size=32, train_limit=64, eval_limit=64, progress=False, log=lambda m: None)
    curve = record["loss_curve"]
    assert sum(curve[-4:]) / 4 < curve[0] * 0.7  # 64 images seen repeatedly: the loss must fall
    saved = json.loads((tmp_path / "ft" / RECORD).read_text())
    assert saved["prism"]["cr"] == 16 and saved["task"] == "fashion" and "accuracy" in saved["scores_after"]["P=2 CR=16"]
    again = load_model(str(tmp_path / "ft"))
    assert type(again.model).__name__ == "ViTForImageClassification"
    px = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        want = simulate(loaded.model, cfg, pixel_values=px, count_flops=False).logits
        got = simulate(again.model, cfg, pixel_values=px, count_flops=False).logits
    assert torch.equal(want, got)
    assert not torch.equal(got, simulate(fashion_vit.model, cfg, pixel_values=px, count_flops=False).logits)


@pytest.mark.slow
def test_lora_through_prism_lowers_loss_merges_exactly_and_round_trips(tmp_path):
    model = tiny("llama-lm")
    base = {n: p.clone() for n, p in model.named_parameters()}
    ids = (torch.arange(24) % 6 + 3).repeat(2, 1)  # a periodic text: attention can learn to copy it
    # a float32 wire: merging moves the float32 sums by an ulp, which a float16 or int8 wire may round to
    # the next step (the default for 24 positions is float16)
    cfg = PrismConfig(devices=3, cr=4, window=2, wire_dtype="float32")
    losses = fit(model, cfg, TrainConfig(steps=30, lr=2e-2, trainable="lora", lora_rank=4),
                 iter(lambda: {"input_ids": ids}, None), lm_loss, progress=False)
    assert sum(losses[-5:]) / 5 < losses[0] * 0.8
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 4 * model.config.num_hidden_layers
    for name, p in model.named_parameters():  # only the low-rank factors moved
        if "lora_" not in name:
            assert torch.equal(p, base[name.replace(".base.", ".")]), name
    with torch.no_grad():
        before = simulate(model, cfg, input_ids=ids, count_flops=False).logits
        assert merge_lora(model) == len(wrapped)
        after = simulate(model, cfg, input_ids=ids, count_flops=False).logits
    assert torch.allclose(before, after, atol=1e-5)
    save(model, tmp_path / "lm")
    again = load_model(str(tmp_path / "lm")).model
    with torch.no_grad():
        assert torch.equal(simulate(again, cfg, input_ids=ids, count_flops=False).logits, after)


def test_add_lora_refuses_models_without_targets():
    with pytest.raises(ValueError, match="no linear layer named"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), 2, 4.0)
    with pytest.raises(ValueError, match="unknown trainable"):
        TrainConfig(trainable="everything")


@pytest.mark.real
def test_polarity_head_starts_from_minilm(minilm):
    from prism_edge.finetune import classifier_from

    clf = classifier_from(minilm)
    assert type(clf).__name__ == "BertForSequenceClassification" and clf.config.num_labels == 2
    for name, p in minilm.model.state_dict().items():
        assert torch.equal(clf.bert.state_dict()[name], p), name


@pytest.mark.real
def test_runtime_serves_a_finetuned_checkpoint(fashion_vit, tmp_path):
    from prism_edge.cluster import Cluster

    model = load_model("vit-fmnist").model
    cfg = PrismConfig(devices=2, cr=16)
    px = torch.randn(4, 1, 28, 28)
    fit(model, cfg, TrainConfig(steps=2, lr=1e-3), iter(lambda: {"pixel_values": px, "labels": torch.arange(4)}, None),
        lambda m, c, b: torch.nn.functional.cross_entropy(simulate(m, c, pixel_values=b["pixel_values"],
                                                                   count_flops=False).logits, b["labels"]),
        progress=False)
    save(model, tmp_path / "ft")
    with torch.no_grad():
        want = simulate(model, cfg, pixel_values=px, count_flops=False).logits
    with Cluster(str(tmp_path / "ft"), cfg, timeout=30) as cluster:
        got = cluster(pixel_values=px).logits
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_random_splits_distillation_checkpoints_and_resumes(tmp_path):
    """Distillation over a split drawn per step starts at zero loss at P=1 (the student is the teacher),
    and a run resumed from its checkpoint ends where an uninterrupted one does."""
    from prism_edge.train import Checkpoints, Splits, distill_loss

    ids = (torch.arange(24) % 7 + 3).repeat(2, 1)
    splits = Splits(max_devices=3, crs=(2, 4), variants=("plain", "sinks+w2+top1+int8"), seed=5)
    drawn = [splits.draw(torch.Generator().manual_seed(5)) for _ in range(1)]
    assert drawn[0].wire_dtype in ("float32", None)  # int8 is trained as float32
    g = torch.Generator().manual_seed(0)
    seen = {(c.devices, c.cr) for c in (splits.draw(g) for _ in range(40))}
    assert {p for p, _ in seen} == {1, 2, 3} and {cr for _, cr in seen} == {2, 4}

    def batches(stop=None):
        for n in range(10**6):
            if n == stop:
                raise KeyboardInterrupt  # the run dies after `stop` steps
            yield {"input_ids": ids}

    def run(folder, stop=None):
        model = tiny("llama-lm")
        loss = distill_loss(tiny("llama-lm"))
        return fit(model, splits, TrainConfig(steps=6, lr=1e-2, trainable="lora", lora_rank=2), batches(stop),
                   loss, progress=False, checkpoints=Checkpoints(folder, every=3)), model

    whole, model_whole = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop=4)  # dies during step 5; the checkpoint holds step 3
    resumed, model_resumed = run(tmp_path / "b")
    assert resumed == pytest.approx(whole, rel=1e-5)
    for (n, a), (_, b) in zip(model_whole.named_parameters(), model_resumed.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    assert min(whole) >= 0 and max(whole) > 0  # KL: zero only where the split changed nothing
    with pytest.raises(ValueError, match="unknown variant token"):
        Splits(variants=("sinks+w",))


@pytest.mark.real
def test_finetune_command_random_split_flags_record_and_eval(fashion_vit, tmp_path, capsys):
    """`prism-edge finetune` with the random-split flags trains over exactly those splits (the record says
    so), leaves no training state behind once finished, and `prism-edge eval --finetuned` scores such a
    checkpoint at every variant of the grid."""
    from prism_edge.app.cli import main

    out = tmp_path / "ft"
    assert main(["finetune", "--task", "fashion", "--out", str(out), "--steps", "3", "--batch-size", "16",
                 "--train-limit", "64", "--eval-limit", "16", "--max-devices", "2", "--train-cr", "8",
                 "--train-variants", "plain", "--objective", "distill", "--checkpoint-every", "2"]) == 0
    record = json.loads((out / RECORD).read_text())
    assert record["splits"] == {"max_devices": 2, "crs": [8], "variants": ["plain"], "seed": 0}
    assert record["objective"] == "distill" and record["steps"] == 3
    assert not (out / "train-state.pt").exists()
    assert main(["eval", "--task", "fashion", "--limit", "16", "--devices", "2", "--cr", "8", "--variants", "plain",
                 "defaults", "--no-voltage", "--finetuned", str(out), "--out", str(tmp_path / "ev")]) == 0
    table = capsys.readouterr().out
    for variant in ("plain", "defaults"):
        assert f"| ft | prism | {variant}+finetune(splits) | 2 | 8 |" in table, table
