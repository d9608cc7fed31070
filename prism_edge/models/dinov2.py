"""DINOv2 (pre-LN encoder with layer scale over image patches + [CLS], any image size): Dinov2Model.

Like ViT, every position's input is its flattened patch ([CLS] gets a row of zeros), so a device
embeds only its own rows.  Unlike ViT, DINOv2 accepts any image size: its position table is
bicubically resized to the image's patch grid.  A device holding a few rows cannot know that grid,
so every row carries the image's pixel height and width in two extra columns (8 bytes per position,
0.3 % of a 14x14 RGB patch): "patches" stays one opaque float tensor and the runtime ships it as is.

Dinov2ForImageClassification is not supported: its classifier reads the mean of *all* patch tokens,
which the runtime's "pooled" mode (rank 0's rows only) cannot provide.  Register tokens live in a
separate class (Dinov2WithRegistersModel), not in Dinov2Model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter, Batch, Geometry, HFModule, image_inputs, patch_rows

SIZE_COLUMNS = 2  # (height, width) of the image in pixels, appended to every patch row


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class Dinov2Adapter(Adapter):
    family = "dinov2"
    kind = "vision"
    model_types = ("dinov2",)
    classes = {"Dinov2Model": "base"}

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        self.dinov2: HFModule = model
        heads = cfg.num_attention_heads
        self.geometry = Geometry(
            hidden=cfg.hidden_size,
            heads=heads,
            kv_heads=heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            layers=cfg.num_hidden_layers,
            causal=False,
            rotary=False,
        )

    def prepare(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        sink_token_ids: tuple[int, ...] = (),
    ) -> Batch:
        pixel_values = image_inputs("dinov2", pixel_values, input_ids, attention_mask, self.config.num_channels)
        batch, _, height, width = pixel_values.shape
        ph, pw = _pair(self.dinov2.embeddings.patch_embeddings.patch_size)
        if height < ph or width < pw:
            raise ValueError(f"image {height}x{width} is smaller than one {ph}x{pw} patch; resize it")
        patches = patch_rows(pixel_values.float(), ph, pw)  # position 0 is [CLS]; float32 keeps the sizes exact
        n = patches.shape[1]
        size = patches.new_tensor([height, width]).expand(batch, n, SIZE_COLUMNS)
        positions = torch.arange(n, device=patches.device).expand(batch, -1)
        valid = torch.ones(batch, n, dtype=torch.bool, device=patches.device)
        return Batch(valid=valid, positions=positions, sink=positions == 0,
                     per_position={"patches": torch.cat([patches, size], dim=-1)})

    def position_table(self, height: int, width: int) -> Tensor:
        """(N, d) position embeddings for an image of height x width pixels: HF's own interpolation."""
        emb = self.dinov2.embeddings
        ph, pw = _pair(emb.patch_embeddings.patch_size)
        d = emb.position_embeddings.shape[-1]
        # interpolate_pos_encoding reads only the shape of its first argument: (1, 1 + patches, d)
        shape_of = emb.position_embeddings.new_empty(1, 1, d).expand(1, 1 + (height // ph) * (width // pw), d)
        return emb.interpolate_pos_encoding(shape_of, height, width)[0]

    def embed(self, local: dict[str, Tensor]) -> Tensor:
        emb = self.dinov2.embeddings
        conv = emb.patch_embeddings.projection  # Conv2d with stride == kernel: a linear map per patch
        weight = conv.weight.reshape(conv.weight.shape[0], -1)  # (d, C*ph*pw)
        positions, rows = local["positions"], local["patches"]
        pixels = rows[..., :-SIZE_COLUMNS].to(weight.dtype)
        # every row of a request carries the same size; max() also skips any all-zero padding row
        height, width = (int(v) for v in rows[..., -SIZE_COLUMNS:].amax(dim=(0, 1)).tolist())
        # [CLS] (position 0) is always the first row of the device that owns it: project real patches only
        has_cls = bool((positions[:, 0] == 0).all())
        x = nn.functional.linear(pixels[:, 1:] if has_cls else pixels, weight, conv.bias)  # (B, n', d)
        if has_cls:
            x = torch.cat([emb.cls_token.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.position_table(height, width)[positions]
        return emb.dropout(x)

    def layers(self) -> nn.ModuleList:
        return self.dinov2.encoder.layer

    def attn_input(self, layer: HFModule, x: Tensor) -> Tensor:
        return layer.norm1(x)

    def q(self, layer: HFModule, h: Tensor) -> Tensor:
        return layer.attention.q_proj(h)

    def kv(self, layer: HFModule, h: Tensor) -> tuple[Tensor, Tensor]:
        att = layer.attention
        return att.k_proj(h), att.v_proj(h)

    def scale(self, index: int) -> float:
        layer: HFModule = self.layers()[index]
        return layer.attention.scaling

    def attn_dropout(self) -> float:
        return self.config.attention_probs_dropout_prob

    def after_attention(self, layer: HFModule, x: Tensor, h: Tensor, ctx: Tensor) -> Tensor:
        # drop_path is identity at eval; in training each device draws its own per-sample mask
        x = layer.drop_path(layer.layer_scale1(layer.attention.o_proj(ctx))) + x
        return layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x)))) + x

    def final(self, x: Tensor) -> dict[str, Tensor]:
        return {"last_hidden_state": self.dinov2.layernorm(x)}

    def pool(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        # HF Dinov2Model: pooler_output is the normed [CLS] row, no extra layer
        return {"pooler_output": outputs["last_hidden_state"][:, 0]}

    def head_modules(self) -> list[nn.Module]:
        return [self.dinov2.layernorm]
