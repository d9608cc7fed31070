"""Pipeline stages: a device holds a contiguous range of the model's layers, plus the embeddings and/or the head.

A stage's model is the Hugging Face model built on the `meta` device (`skeleton`: no weight is allocated,
buffers such as rotary frequencies are real) with only the tensors its `Holding` owns put in
(`materialize`): any use of an unowned weight fails loudly on meta.  The tensors come from a checkpoint,
read one tensor at a time (`read_safetensors`, `read_gguf`; loading.load_holding picks the file), or over
the network from a device that has them (`state_for` on the sender, `materialize` on the receiver).

Which parameter belongs where is decided by module identity, never by name prefixes: layer i is
`adapter.layers()[i]`, the head is `adapter.head_modules()` (what `final` and `pool` use), and every other
parameter (embeddings, and anything unused by the executor) belongs to the embedding part.  A tied LM head
(the embedding's own Parameter) belongs to both: it is held when either is, and stored and counted once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from . import adapter_for, class_for
from .base import Adapter

SAFE_INDEX = "model.safetensors.index.json"  # sharded safetensors
Part = Union[int, str]  # a layer's index, "embed" or "head"


@dataclass(frozen=True)
class Holding:
    """What one stage keeps: layers [first, last), the embedding part, the head part."""

    first: int
    last: int
    embed: bool
    head: bool

    def __post_init__(self) -> None:
        for name in ("first", "last"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"Holding.{name} must be an int, got {value!r}")
        for name in ("embed", "head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Holding.{name} must be True or False, got {getattr(self, name)!r}")
        if self.first < 0:
            raise ValueError(f"Holding.first must be >= 0, got {self.first}")
        if self.last < self.first:
            raise ValueError(f"Holding.last ({self.last}) must be >= Holding.first ({self.first})")

    @classmethod
    def whole(cls, layers: int) -> "Holding":
        return cls(0, layers, True, True)

    def holds(self, part: Part) -> bool:
        if part == "embed":
            return self.embed
        if part == "head":
            return self.head
        return isinstance(part, int) and self.first <= part < self.last


@dataclass(frozen=True)
class PartSizes:
    """Bytes of each part at the loaded dtype: embed (with a tied LM head), per layer, head (without it)."""

    embed: int
    layers: tuple[int, ...]
    head: int
    total: int


@dataclass
class _Entry:
    """One parameter or buffer (tied aliases together): its names, the parts that use it, the tensor."""

    names: list[str]
    parts: set[Part]
    tensor: Tensor
    parameter: bool

    def part(self) -> Part:
        """Where its bytes count: the embedding part for a tied LM head."""
        if "embed" in self.parts:
            return "embed"
        if "head" in self.parts:
            return "head"
        return min(p for p in self.parts if isinstance(p, int))


def _entries(adapter: Adapter) -> list[_Entry]:
    """Every parameter and buffer of the adapter's model, tied ones once, with the parts that own it."""
    model = adapter.model
    owner: dict[int, Part] = {id(m): "head" for m in adapter.head_modules()}
    owner.update({id(layer): i for i, layer in enumerate(adapter.layers())})
    prefixes = [(name + ".", owner[id(m)]) for name, m in model.named_modules(remove_duplicate=False)
                if id(m) in owner]

    def part_of(name: str) -> Part:
        return next((part for prefix, part in prefixes if name.startswith(prefix)), "embed")

    by_id: dict[int, _Entry] = {}
    for parameter, named in ((True, model.named_parameters(remove_duplicate=False)),
                             (False, model.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            entry = by_id.setdefault(id(tensor), _Entry([], set(), tensor, parameter))
            entry.names.append(name)
            entry.parts.add(part_of(name))
    return list(by_id.values())


def _check_fits(adapter: Adapter, holding: Holding) -> None:
    layers = len(adapter.layers())
    if holding.last > layers:
        raise ValueError(f"Holding.last ({holding.last}) is past the model's {layers} layers")


def _owned(adapter: Adapter, holding: Holding) -> list[_Entry]:
    _check_fits(adapter, holding)
    return [e for e in _entries(adapter) if e.parameter and any(holding.holds(p) for p in e.parts)]


def owned_names(adapter: Adapter, holding: Holding) -> set[str]:
    """The state_dict names of the parameters `holding` keeps (a tied parameter under every one of its names)."""
    return {name for entry in _owned(adapter, holding) for name in entry.names}


def skeleton(config: Any) -> nn.Module:
    """The config's Hugging Face model in eval mode with every parameter on `meta` (nothing allocated) and every
    buffer real (as the class's __init__ computes it: rotary inv_freq, position_ids), tied weights tied."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = class_for(config)(config)
    model.tie_weights()  # from_pretrained ties after loading; a skeleton must share the Parameter up front
    return model.eval()


def _storage_key(t: Tensor) -> tuple[int, int]:
    return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()


def first_held(model: nn.Module) -> Tensor:
    """The first parameter this process holds (not on meta): where a stage's model runs, and at what dtype."""
    return next(p for p in model.parameters() if not p.is_meta)


def held_bytes(model: nn.Module) -> int:
    """Bytes of the materialised (not meta) parameters and buffers, each storage counted once."""
    seen: dict[tuple[int, int], int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if not t.is_meta:
            key = _storage_key(t)
            seen[key] = key[1]
    return sum(seen.values())


def part_bytes(config_or_model: Any) -> PartSizes:
    """Bytes of each part of a model (or of a config's model, built as a skeleton: no weight is read), at the
    dtype its parameters have (float32 as loaded); buffers count with the part whose module holds them."""
    model = config_or_model if isinstance(config_or_model, nn.Module) else skeleton(config_or_model)
    adapter = adapter_for(model)
    sizes: dict[Part, int] = {"embed": 0, "head": 0}
    seen: set[tuple[int, int]] = set()
    for entry in _entries(adapter):
        t = entry.tensor
        if not t.is_meta:  # buffers (and real parameters) may share a storage: count it once
            if _storage_key(t) in seen:
                continue
            seen.add(_storage_key(t))
        size = t.untyped_storage().nbytes() if not t.is_meta else t.numel() * t.element_size()
        sizes[entry.part()] = sizes.get(entry.part(), 0) + size
    layers = tuple(sizes.get(i, 0) for i in range(len(adapter.layers())))
    return PartSizes(embed=sizes["embed"], layers=layers, head=sizes["head"],
                     total=sizes["embed"] + sum(layers) + sizes["head"])


def state_for(model: nn.Module, holding: Holding) -> dict[str, Tensor]:
    """The tensors `holding` owns, by state_dict name (a tied parameter once, under its first name): what a
    device ships to one that builds the stage with skeleton + materialize."""
    out = {}
    for entry in _owned(adapter_for(model), holding):
        if entry.tensor.is_meta:
            raise ValueError(f"{entry.names[0]} is not held by this model (it is on meta); "
                             "send the stage's tensors from a model that holds them")
        out[entry.names[0]] = entry.tensor.detach()
    return out


def _parameter_slots(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    modules = dict(model.named_modules(remove_duplicate=False))
    slots = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        slots[name] = (modules[owner], attr)
    return slots


def materialize(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Put `tensors` (state_dict name -> tensor) into a skeleton's parameters, tied aliases too; a name that is
    not a parameter, a tied parameter given twice, or a wrong shape or dtype is refused with a ValueError."""
    entries = {name: e for e in _entries(adapter_for(model)) for name in e.names}
    slots = _parameter_slots(model)
    done: dict[int, str] = {}
    for name, value in tensors.items():
        entry = entries.get(name)
        if entry is None or not entry.parameter:
            what = "a buffer (skeleton builds buffers)" if entry is not None else "not a parameter"
            raise ValueError(f"{name!r} is {what} of {type(model).__name__}; pass parameter names of its state_dict")
        if id(entry) in done:
            raise ValueError(f"{name!r} is tied to {done[id(entry)]!r}, which is given too; give a tied weight once")
        done[id(entry)] = name
        old = entry.tensor
        if not isinstance(value, Tensor) or value.is_meta:
            raise ValueError(f"{name!r} must be a real tensor, got {type(value).__name__}"
                             f"{' on meta' if isinstance(value, Tensor) else ''}")
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(f"{name!r} has shape {tuple(value.shape)} but the model's is {tuple(old.shape)}")
        if value.dtype != old.dtype:
            raise ValueError(f"{name!r} has dtype {value.dtype} but the model's is {old.dtype}")
        new = nn.Parameter(value, requires_grad=old.requires_grad)
        for alias in entry.names:
            module, attr = slots[alias]
            setattr(module, attr, new)
        entry.tensor = new


def _wanted(model: nn.Module, names: Iterable[str]) -> list[_Entry]:
    """The parameters named (any alias of a tied one names it), each once."""
    wanted = set(names)
    entries = [e for e in _entries(adapter_for(model)) if e.parameter and wanted & set(e.names)]
    unknown = wanted - {n for e in entries for n in e.names}
    if unknown:
        raise ValueError(f"not parameters of {type(model).__name__}: {sorted(unknown)[:5]}")
    return entries


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards its index names, or its model.safetensors."""
    index = folder / SAFE_INDEX
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    raise ValueError(f"no model.safetensors or {SAFE_INDEX} in {folder}")


def _renamer(model: Any):
    """Checkpoint key -> (the model's state_dict key, the converter it needs or None), as from_pretrained renames:
    the model's conversion mapping (e.g. ViT's encoder.layer -> layers), the legacy LayerNorm gamma/beta, and
    the base-model prefix added or removed (a BertModel file read into BertForSequenceClassification)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")

    def rename(key: str) -> tuple[str, str | None]:
        renamed, converter = rename_source_key(key, renamings, converters, prefix, meta_state)
        if renamed not in meta_state and key in meta_state:  # as from_pretrained: the key may need no renaming
            renamed, converter = rename_source_key(key, [], [], prefix, meta_state)
        return renamed, converter

    return rename


def read_safetensors(folder: Path, model: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """Only the named parameters of `model` from the checkpoint in `folder`, one tensor at a time (safetensors
    memory-maps the file), at the model's dtypes; keyed by the model's names, a tied weight once."""
    from safetensors import safe_open

    rename = _renamer(model)
    where: dict[str, tuple[Path, str, str | None]] = {}  # model key -> (file, checkpoint key, converter)
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                renamed, converter = rename(key)
                where.setdefault(renamed, (file, key, converter))
    out: dict[str, Tensor] = {}
    handles: dict[Path, Any] = {}
    for entry in _wanted(model, names):
        found = next((n for n in entry.names if n in where), None)
        if found is None:
            raise ValueError(f"the checkpoint in {folder} has no tensor for {' / '.join(entry.names)}")
        file, key, converter = where[found]
        if converter is not None:
            raise ValueError(f"{key} in {file} needs Hugging Face's conversion {converter!r}, which a partial load "
                             "does not apply; load the whole model (holding=None)")
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt")
        tensor = handles[file].get_tensor(key)
        if tuple(tensor.shape) != tuple(entry.tensor.shape):
            raise ValueError(f"{key} in {file} has shape {tuple(tensor.shape)}, the model's {entry.names[0]} "
                             f"{tuple(entry.tensor.shape)}")
        out[entry.names[0]] = tensor.to(entry.tensor.dtype)
    return out


def read_gguf(path: Path, model: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """Only the named parameters of `model` from a GGUF file, de-quantised one tensor at a time, named and
    permuted exactly as transformers' GGUF loader does (load_gguf_checkpoint: gguf-py's tensor-name map over the
    model's state_dict, then the architecture's TensorProcessor, e.g. Llama's Q/K rotary un-permutation)."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    reader = GGUFReader(str(path))
    arch_field = reader.fields["general.architecture"]
    architecture = bytes(arch_field.parts[arch_field.data[0]]).decode()
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=hf_config_dict(model))
    to_hf = get_gguf_hf_weights_map(model, processor)
    tensors = {t.name: t for t in reader.tensors}
    where = {hf: gguf_name for gguf_name, hf in to_hf.items() if gguf_name in tensors}
    out: dict[str, Tensor] = {}
    for entry in _wanted(model, names):
        found = next((n for n in entry.names if n in where), None)
        if found is None:
            raise ValueError(f"the GGUF file {path} has no tensor for {' / '.join(entry.names)}")
        gguf_tensor = tensors[where[found]]
        weights = dequantize(gguf_tensor.data, gguf_tensor.tensor_type)
        weights = processor.process(weights=weights, name=gguf_tensor.name, tensor_key_mapping=to_hf,
                                    parsed_parameters={}).weights
        if not weights.flags.writeable:  # an unquantised (F32) tensor comes back as a view of the memory map
            weights = np.array(weights)
        tensor = torch.from_numpy(np.ascontiguousarray(weights)).to(entry.tensor.dtype)
        if tuple(tensor.shape) != tuple(entry.tensor.shape):
            raise ValueError(f"{gguf_tensor.name} in {path} has shape {tuple(tensor.shape)}, the model's "
                             f"{entry.names[0]} {tuple(entry.tensor.shape)}")
        out[entry.names[0]] = tensor
    return out


def hf_config_dict(model: nn.Module) -> dict[str, Any]:
    return getattr(model, "config").to_dict()
