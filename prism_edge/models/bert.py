"""BERT (post-LN encoder): BertModel, BertForSequenceClassification."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Geometry, HFModule, TextAdapter


class BertAdapter(TextAdapter):
    family = "bert"
    kind = "encoder"
    model_types = ("bert",)
    classes = {"BertModel": "base", "BertForSequenceClassification": "classify"}

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
            raise ValueError("BERT as a decoder / with cross-attention is not supported; load it as an encoder")
        pet = getattr(cfg, "position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise ValueError(f"BERT position_embedding_type={pet!r} is not supported; only 'absolute'")
        self.bert: HFModule = model if self.head == "base" else model.bert
        self.geometry = Geometry(
            hidden=cfg.hidden_size,
            heads=cfg.num_attention_heads,
            kv_heads=cfg.num_attention_heads,
            head_dim=cfg.hidden_size // cfg.num_attention_heads,
            layers=cfg.num_hidden_layers,
            causal=False,
            rotary=False,
        )

    def embed(self, local: dict[str, Tensor]) -> Tensor:
        return self.bert.embeddings(
            input_ids=local["input_ids"],
            token_type_ids=local.get("token_type_ids"),
            position_ids=local["positions"],
        )

    def layers(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    def attn_input(self, layer: HFModule, x: Tensor) -> Tensor:
        return x  # post-LN: attention reads the residual stream itself

    def q(self, layer: HFModule, h: Tensor) -> Tensor:
        return layer.attention.self.query(h)

    def kv(self, layer: HFModule, h: Tensor) -> tuple[Tensor, Tensor]:
        att = layer.attention.self
        return att.key(h), att.value(h)

    def attn_dropout(self) -> float:
        return self.config.attention_probs_dropout_prob

    def after_attention(self, layer: HFModule, x: Tensor, h: Tensor, ctx: Tensor) -> Tensor:
        a = layer.attention.output(ctx, x)  # dense, dropout, LayerNorm(. + x)
        return layer.output(layer.intermediate(a), a)

    def final(self, x: Tensor) -> dict[str, Tensor]:
        return {"last_hidden_state": x}

    def pool(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.bert.pooler is None:
            return {}
        pooled = self.bert.pooler(outputs["last_hidden_state"][:, :1])  # pooler reads position 0 only
        if self.head == "base":
            return {"pooler_output": pooled}
        return {"logits": self.model.classifier(self.model.dropout(pooled))}

    def head_modules(self) -> list[nn.Module]:
        pooler = [] if self.bert.pooler is None else [self.bert.pooler]
        return pooler + ([self.model.classifier] if self.head == "classify" else [])
