"""Llama family (pre-RMSNorm decoder, rotary positions, grouped-query attention): LlamaModel, LlamaForCausalLM."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Geometry, HFModule, TextAdapter


class LlamaAdapter(TextAdapter):
    family = "llama"
    kind = "decoder"
    model_types = ("llama",)
    classes = {"LlamaModel": "base", "LlamaForCausalLM": "lm"}

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        self.llama: HFModule = model if self.head == "base" else model.model
        heads = cfg.num_attention_heads
        self.geometry = Geometry(
            hidden=cfg.hidden_size,
            heads=heads,
            kv_heads=cfg.num_key_value_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            layers=cfg.num_hidden_layers,
            causal=True,
            rotary=True,
        )

    def embed(self, local: dict[str, Tensor]) -> Tensor:
        if "token_type_ids" in local:
            raise ValueError("Llama models take no token_type_ids; drop them from the inputs")
        return self.llama.embed_tokens(local["input_ids"])

    def layers(self) -> nn.ModuleList:
        return self.llama.layers

    def attn_input(self, layer: HFModule, x: Tensor) -> Tensor:
        return layer.input_layernorm(x)

    def q(self, layer: HFModule, h: Tensor) -> Tensor:
        return layer.self_attn.q_proj(h)

    def kv(self, layer: HFModule, h: Tensor) -> tuple[Tensor, Tensor]:
        att = layer.self_attn
        return att.k_proj(h), att.v_proj(h)

    def attn_dropout(self) -> float:
        return float(getattr(self.config, "attention_dropout", 0.0))

    def rotary(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.llama.rotary_emb(x, positions)

    def after_attention(self, layer: HFModule, x: Tensor, h: Tensor, ctx: Tensor) -> Tensor:
        x = x + layer.self_attn.o_proj(ctx)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def final(self, x: Tensor) -> dict[str, Tensor]:
        x = self.llama.norm(x)
        if self.head == "base":
            return {"last_hidden_state": x}
        return {"logits": self.model.lm_head(x)}

    def head_modules(self) -> list[nn.Module]:
        return [self.llama.norm] + ([] if self.head == "base" else [self.model.lm_head])
