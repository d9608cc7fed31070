"""One adapter per model family; `adapter_for` picks it from the loaded model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .base import Adapter, Batch, Geometry
from .bert import BertAdapter
from .dinov2 import Dinov2Adapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .vit import ViTAdapter

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ADAPTERS: tuple[type[Adapter], ...] = (BertAdapter, GPT2Adapter, ViTAdapter, LlamaAdapter, Dinov2Adapter)
# What to build when a checkpoint names no architecture we support: the family's most useful head.
DEFAULT_CLASS = {"bert": "BertModel", "gpt2": "GPT2LMHeadModel", "vit": "ViTModel", "llama": "LlamaForCausalLM",
                 "dinov2": "Dinov2Model"}


def supported() -> str:
    return ", ".join(name for a in ADAPTERS for name in a.classes)


def class_for(config) -> type[PreTrainedModel]:
    """The Hugging Face class to build for a config: its architecture if we support it, else the family's default."""
    import transformers

    model_type = getattr(config, "model_type", None)
    known = {name for a in ADAPTERS for name in a.classes}
    for arch in getattr(config, "architectures", None) or []:
        if arch in known:
            return getattr(transformers, arch)
    if model_type in DEFAULT_CLASS:
        return getattr(transformers, DEFAULT_CLASS[model_type])
    raise ValueError(f"unsupported model type {model_type!r}; supported: {supported()}")


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for an already-loaded Hugging Face model, or a ValueError naming what is supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            if type(model).__name__ not in cls.classes:
                raise ValueError(
                    f"unsupported model class {type(model).__name__} of type {model_type!r}; supported: {supported()}"
                )
            return cls(model)
    raise ValueError(f"unsupported model type {model_type!r} ({type(model).__name__}); supported: {supported()}")


__all__ = ["Adapter", "Batch", "Geometry", "adapter_for", "class_for", "supported", "ADAPTERS", "DEFAULT_CLASS"]
