"""ViT (pre-LN encoder over image patches + [CLS]): ViTModel, ViTForImageClassification."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter, Batch, Geometry, HFModule, image_inputs, patch_rows


class ViTAdapter(Adapter):
    family = "vit"
    kind = "vision"
    model_types = ("vit",)
    classes = {"ViTModel": "base", "ViTForImageClassification": "classify"}

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        self.vit: HFModule = model if self.head == "base" else model.vit
        heads = cfg.num_attention_heads
        self.geometry = Geometry(
            hidden=cfg.hidden_size,
            heads=heads,
            kv_heads=heads,
            head_dim=cfg.hidden_size // heads,
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
        pixel_values = image_inputs("vit", pixel_values, input_ids, attention_mask, self.config.num_channels)
        emb = self.vit.embeddings
        batch, _, height, width = pixel_values.shape
        size = tuple(emb.image_size) if isinstance(emb.image_size, (tuple, list)) else (emb.image_size,) * 2
        if (height, width) != size:
            raise ValueError(f"image size {height}x{width} does not match the model's {size[0]}x{size[1]}; resize the "
                             "images with the model's image processor")
        patches = patch_rows(pixel_values, emb.patch_size, emb.patch_size)  # position 0 is [CLS]
        n = patches.shape[1]
        positions = torch.arange(n, device=patches.device).expand(batch, -1)
        valid = torch.ones(batch, n, dtype=torch.bool, device=patches.device)
        sink = positions == 0
        return Batch(valid=valid, positions=positions, sink=sink, per_position={"patches": patches})

    def embed(self, local: dict[str, Tensor]) -> Tensor:
        emb = self.vit.embeddings
        conv = emb.patch_embeddings.projection  # Conv2d with stride == kernel: a linear map per patch
        weight = conv.weight.reshape(conv.weight.shape[0], -1)  # (d, C*p*p)
        positions, patches = local["positions"], local["patches"]
        # [CLS] (position 0) is always the first row of the device that owns it: project real patches only
        has_cls = bool((positions[:, 0] == 0).all())
        x = nn.functional.linear(patches[:, 1:] if has_cls else patches, weight, conv.bias)  # (B, n', d)
        if has_cls:
            x = torch.cat([emb.cls_token.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = x + emb.position_embeddings[0][positions]
        return emb.dropout(x)

    def layers(self) -> nn.ModuleList:
        return self.vit.layers

    def attn_input(self, layer: HFModule, x: Tensor) -> Tensor:
        return layer.layernorm_before(x)

    def q(self, layer: HFModule, h: Tensor) -> Tensor:
        return layer.attention.q_proj(h)

    def kv(self, layer: HFModule, h: Tensor) -> tuple[Tensor, Tensor]:
        att = layer.attention
        return att.k_proj(h), att.v_proj(h)

    def attn_dropout(self) -> float:
        return self.config.attention_probs_dropout_prob

    def after_attention(self, layer: HFModule, x: Tensor, h: Tensor, ctx: Tensor) -> Tensor:
        x = x + layer.dropout(layer.attention.o_proj(ctx))
        return x + layer.dropout(layer.mlp(layer.layernorm_after(x)))

    def final(self, x: Tensor) -> dict[str, Tensor]:
        return {"last_hidden_state": self.vit.layernorm(x)}

    def pool(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        first = outputs["last_hidden_state"][:, :1]
        if self.head == "classify":
            return {"logits": self.model.classifier(first[:, 0])}
        if self.vit.pooler is None:
            return {}
        return {"pooler_output": self.vit.pooler(first)}

    def head_modules(self) -> list[nn.Module]:
        pooler = [] if self.vit.pooler is None else [self.vit.pooler]
        return [self.vit.layernorm] + pooler + ([self.model.classifier] if self.head == "classify" else [])
