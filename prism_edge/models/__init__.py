"""One adapter per model family; `adapter_for` picks it from the loaded model."""

from __future__ import annotations

from torch import nn

from .base import Adapter, Batch, Geometry
from .bert import BertAdapter
from .dinov2 import Dinov2Adapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .vit import ViTAdapter

ADAPTERS: tuple[type[Adapter], ...] = (BertAdapter, GPT2Adapter, ViTAdapter, LlamaAdapter, Dinov2Adapter)


def supported() -> str:
    return ", ".join(name for a in ADAPTERS for name in a.classes)


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


__all__ = ["Adapter", "Batch", "Geometry", "adapter_for", "supported", "ADAPTERS"]
