"""GPT-2 (pre-LN decoder): GPT2Model, GPT2LMHeadModel."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Geometry, HFModule, TextAdapter


class GPT2Adapter(TextAdapter):
    family = "gpt2"
    kind = "decoder"
    model_types = ("gpt2",)
    classes = {"GPT2Model": "base", "GPT2LMHeadModel": "lm"}

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention is not supported; load it without add_cross_attention")
        self.gpt: HFModule = model if self.head == "base" else model.transformer
        self.d: int = cfg.hidden_size
        self.geometry = Geometry(
            hidden=cfg.hidden_size,
            heads=cfg.num_attention_heads,
            kv_heads=cfg.num_attention_heads,
            head_dim=cfg.hidden_size // cfg.num_attention_heads,
            layers=cfg.num_hidden_layers,
            causal=True,
            rotary=False,
        )

    def embed(self, local: dict[str, Tensor]) -> Tensor:
        x = self.gpt.wte(local["input_ids"]) + self.gpt.wpe(local["positions"])
        if "token_type_ids" in local:
            x = x + self.gpt.wte(local["token_type_ids"])
        return self.gpt.drop(x)

    def layers(self) -> nn.ModuleList:
        return self.gpt.h

    def attn_input(self, layer: HFModule, x: Tensor) -> Tensor:
        return layer.ln_1(x)

    @staticmethod
    def _conv1d(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """HF Conv1D (weight stored (in, out)) on a column block of its weight."""
        out = torch.addmm(bias, h.reshape(-1, h.shape[-1]), weight)
        return out.view(*h.shape[:-1], weight.shape[1])

    def qkv(self, layer: HFModule, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = layer.attn.c_attn(h).split(self.d, dim=2)
        return q, k, v

    def q(self, layer: HFModule, h: Tensor) -> Tensor:
        c = layer.attn.c_attn
        return self._conv1d(h, c.weight[:, : self.d], c.bias[: self.d])

    def kv(self, layer: HFModule, h: Tensor) -> tuple[Tensor, Tensor]:
        c = layer.attn.c_attn  # K and V only: the received rows need no queries
        kv = self._conv1d(h, c.weight[:, self.d :], c.bias[self.d :])
        k, v = kv.split(self.d, dim=-1)
        return k, v

    def scale(self, index: int) -> float:
        s = self.geometry.head_dim**-0.5 if self.config.scale_attn_weights else 1.0
        if self.config.scale_attn_by_inverse_layer_idx:
            s /= float(index + 1)
        return s

    def attn_dropout(self) -> float:
        return self.config.attn_pdrop

    def after_attention(self, layer: HFModule, x: Tensor, h: Tensor, ctx: Tensor) -> Tensor:
        x = x + layer.attn.resid_dropout(layer.attn.c_proj(ctx))
        return x + layer.mlp(layer.ln_2(x))

    def final(self, x: Tensor) -> dict[str, Tensor]:
        x = self.gpt.ln_f(x)
        if self.head == "base":
            return {"last_hidden_state": x}
        return {"logits": self.model.lm_head(x)}

    def head_modules(self) -> list[nn.Module]:
        return [self.gpt.ln_f] + ([] if self.head == "base" else [self.model.lm_head])
