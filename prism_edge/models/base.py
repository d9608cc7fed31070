"""What the executor needs to know about a model family: the pieces of a block, nothing about devices.

An adapter wraps an already-loaded Hugging Face model and calls its own submodules (norms,
projections, MLPs); it never forks modeling code.  The executor owns attention and the exchange.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

import torch
from torch import Tensor, nn

# A Hugging Face module or config read through the family's own attribute names (`layer.attention.q_proj`,
# `config.hidden_size`): torch types such attributes `Tensor | Module`, so adapters hold them untyped; the
# exactness tests against the Hugging Face forward check them.
HFModule: TypeAlias = Any


@dataclass(frozen=True)
class Geometry:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    causal: bool
    rotary: bool

    @property
    def kv_width(self) -> int:
        """Values per position of K (or of V) after projection."""
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class Batch:
    """A request as the plan sees it: per-position inputs plus padding, positions and sink flags."""

    valid: Tensor  # (B, N) bool, True at real positions
    positions: Tensor  # (B, N) long position ids (HF default: index in the padded input)
    sink: Tensor  # (B, N) bool, attention-sink positions
    per_position: dict[str, Tensor] = field(default_factory=dict)  # each (B, N, ...)

    @property
    def longest(self) -> int:
        """Real positions of the longest sequence (padding excluded)."""
        return int(self.valid.sum(1).max()) if self.valid.numel() else 0

    def to(self, device: torch.device) -> "Batch":
        """Inputs on a model's device; the sink flags stay on the CPU with the plan that reads them."""
        return Batch(valid=self.valid.to(device), positions=self.positions.to(device), sink=self.sink,
                     per_position={k: v.to(device) for k, v in self.per_position.items()})

    def gather(self, index: Tensor) -> dict[str, Tensor]:
        """Per-position inputs of the rows `index` (B, n): what one device receives to embed."""
        out = {}
        for name, t in self.per_position.items():
            idx = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
            out[name] = torch.gather(t, 1, idx)
        out["positions"] = torch.gather(self.positions, 1, index)
        return out


class Adapter:
    """One model family.  Subclasses name the pieces; shapes: x (B, n, d), q/k/v (B, n, heads*head_dim)."""

    family: ClassVar[str]
    kind: ClassVar[str]  # decoder | encoder | vision: picks the fidelity defaults (config.FAMILY_DEFAULTS)
    model_types: ClassVar[tuple[str, ...]]
    classes: ClassVar[dict[str, str]]  # HF class name -> its head: base | lm | classify

    def __init__(self, model: nn.Module) -> None:
        self.model: HFModule = model
        self.head = self.classes[type(model).__name__]
        self.config: HFModule = model.config

    # --- inputs -------------------------------------------------------------------------------
    def prepare(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        # a tuple[int, ...] (as the subclasses declare); Any here because callers spread a dict of input
        # tensors into these keywords (cluster/calibrate.py), which mypy would also match against this one
        sink_token_ids: Any = (),
    ) -> Batch:
        raise NotImplementedError

    def embed(self, local: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    # --- one block ----------------------------------------------------------------------------
    geometry: Geometry

    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def attn_input(self, layer: HFModule, x: Tensor) -> Tensor:
        """The (normalised) input of the attention's projections."""
        raise NotImplementedError

    def qkv(self, layer: HFModule, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.q(layer, h), *self.kv(layer, h)

    def q(self, layer: HFModule, h: Tensor) -> Tensor:
        raise NotImplementedError

    def kv(self, layer: HFModule, h: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def scale(self, index: int) -> float:
        return self.geometry.head_dim**-0.5

    def attn_dropout(self) -> float:
        return 0.0

    def rotary(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor] | None:
        """(cos, sin), each (B, n, head_dim), for rotary models; None otherwise."""
        return None

    def after_attention(self, layer: HFModule, x: Tensor, h: Tensor, ctx: Tensor) -> Tensor:
        """Output projection, residual, MLP: everything of the block after attention."""
        raise NotImplementedError

    # --- outputs ------------------------------------------------------------------------------
    def final(self, x: Tensor) -> dict[str, Tensor]:
        """Position-wise outputs of one device's rows: final norm, LM head."""
        raise NotImplementedError

    def pool(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Outputs computed from the first position (pooler, classifier): runs where position 0 lives."""
        return {}

    def head_modules(self) -> list[nn.Module]:
        """The modules `final` and `pool` use (final norm, LM head, pooler, classifier): a pipeline's last stage
        holds them (models/parts.py).  Everything that is neither a layer nor in here belongs to the embedding."""
        raise NotImplementedError

    # --- shared helpers -----------------------------------------------------------------------
    def vocab_size(self) -> int:
        return int(getattr(self.config, "vocab_size", None) or 2**31)

    def position_limit(self) -> int | None:
        """The most positions a text model takes: its position table, or the context a rotary model was built
        for (max_position_embeddings); None for image models (their positions come from the image size).
        The one place this is read: requests, prompts and the start-up probe all ask here."""
        return getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", None)

    def special_ids(self) -> set[int]:
        ids = set()
        for name in ("bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
            value = getattr(self.config, name, None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        return ids


def check_ids(t, name: str, bound: int, what: str, shape: tuple[int, ...] | None = None) -> None:
    """An integer tensor of (batch, length) with every value in [0, bound), or a ValueError naming the field."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}; use return_tensors='pt'")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got {t.dtype}; pass token ids as a LongTensor")
    if t.dim() != 2 or (shape is not None and tuple(t.shape) != shape):
        want = f"shape {shape}" if shape is not None else "(batch, length)"
        raise ValueError(f"{name} must be {want}, got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
        raise ValueError(f"{name} values must lie in [0, {bound}) ({what}); got {int(t.min())}..{int(t.max())}")


def check_pixels(pixel_values, channels: int) -> None:
    """A finite float (batch, channels, height, width) tensor, or a ValueError naming the field."""
    if not isinstance(pixel_values, Tensor) or not pixel_values.dtype.is_floating_point:
        raise ValueError(f"pixel_values must be a float tensor, got {getattr(pixel_values, 'dtype', type(pixel_values))}"
                         "; use the model's image processor")
    if pixel_values.dim() != 4 or 0 in pixel_values.shape:
        raise ValueError(f"pixel_values must be (batch, channels, height, width), got {tuple(pixel_values.shape)}")
    if pixel_values.shape[1] != channels:
        raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels but the model takes {channels}; "
                         "convert the images (e.g. .convert('RGB') or 'L')")
    if not bool(torch.isfinite(pixel_values).all()):
        raise ValueError("pixel_values holds NaN or infinite values")


def image_inputs(family: str, pixel_values, input_ids, attention_mask, channels: int) -> Tensor:
    """An image model's request: checked pixel_values, and nothing of a text model's."""
    if pixel_values is None:
        raise ValueError(f"pixel_values is required for {family} models; pass "
                         "pixel_values=image_processor(images)['pixel_values']")
    if input_ids is not None or attention_mask is not None:
        raise ValueError(f"{family} models take pixel_values only; drop input_ids / attention_mask")
    check_pixels(pixel_values, channels)
    return pixel_values


def patch_rows(pixels: Tensor, ph: int, pw: int) -> Tensor:
    """(B, C, H, W) -> (B, 1 + H/ph * W/pw, C*ph*pw): the patches in the order of the HF patch conv (which,
    as unfold does, drops the pixels past the last whole patch), after a row of zeros that stands in for
    [CLS]'s absent patch."""
    batch, channels = pixels.shape[:2]
    patches = pixels.unfold(2, ph, ph).unfold(3, pw, pw)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, -1, channels * ph * pw)
    return torch.cat([patches.new_zeros(batch, 1, patches.shape[-1]), patches], dim=1)


def _require(value, name: str, family: str, hint: str):
    if value is None:
        raise ValueError(f"{name} is required for {family} models; {hint}")
    return value


class TextAdapter(Adapter):
    """Token-sequence families (BERT, GPT-2, Llama): inputs are input_ids + attention_mask."""

    def prepare(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        sink_token_ids: tuple[int, ...] = (),
    ) -> Batch:
        if pixel_values is not None:
            raise ValueError(f"{self.family} models take input_ids, not pixel_values; tokenize the text first")
        ids = _require(input_ids, "input_ids", self.family, "pass input_ids=tokenizer(texts)['input_ids']")
        check_ids(ids, "input_ids", self.vocab_size(), "the model's vocabulary")
        batch, length = ids.shape
        if length == 0:
            raise ValueError("input_ids is empty (length 0); give every sequence at least one token")
        limit = self.position_limit()
        if limit and length > limit:
            raise ValueError(f"input_ids has {length} positions but the model takes at most {limit}; shorten the "
                             "text or tokenize with truncation=True, max_length=" + str(limit))
        if attention_mask is None:
            valid = torch.ones(batch, length, dtype=torch.bool, device=ids.device)
        else:
            if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(ids.shape):
                raise ValueError(f"attention_mask shape {tuple(getattr(attention_mask, 'shape', ()))} does not match "
                                 f"input_ids {tuple(ids.shape)}; pass the mask the tokenizer returned with these ids")
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (a real token)")
            valid = attention_mask.bool()
            if not bool(valid.any(1).all()):
                raise ValueError("attention_mask leaves a sequence with no real token; drop empty sequences")
        if position_ids is None:
            positions = torch.arange(length, device=ids.device).expand(batch, -1)
        else:
            check_ids(position_ids, "position_ids", limit or 2**31, "the model's positions", shape=None)
            if position_ids.shape[-1] != length or position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch):
                raise ValueError(f"position_ids shape {tuple(position_ids.shape)} does not fit input_ids "
                                 f"{tuple(ids.shape)}; pass (batch, length) or (1, length)")
            positions = position_ids.expand(batch, -1)
        if token_type_ids is not None:
            types = getattr(self.config, "type_vocab_size", None)
            if not types:
                raise ValueError(f"{self.family} models take no token_type_ids; drop them")
            check_ids(token_type_ids, "token_type_ids", types, "the model's token types", shape=tuple(ids.shape))
        first = valid & (valid.long().cumsum(1) == 1)  # the first real token: BOS / [CLS]
        special = torch.tensor(sorted(self.special_ids() | set(sink_token_ids)), dtype=ids.dtype)
        sink = first | (torch.isin(ids, special.to(ids.device)) & valid)
        per_position = {"input_ids": ids}
        if token_type_ids is not None:
            per_position["token_type_ids"] = token_type_ids.expand(batch, -1)
        return Batch(valid=valid, positions=positions, sink=sink, per_position=per_position)
