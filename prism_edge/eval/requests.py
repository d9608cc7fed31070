"""Requests from texts and images: the one place the command line, the benches and the HTTP endpoints
turn user input into model inputs (and the one place a tokenizer gets a pad token).

  build_request(loaded, texts=..., text_file=..., images=..., max_length=...)   `launch` / `run` / `worker`
  builtin_request(loaded, max_length)     the default request (built-in texts), as the benches send it
  encode_texts(loaded, texts, max_length)  a batch of texts, one sequence each (the HTTP endpoints)
  prompt_ids(tokenizer, prompt, chat) / chat_ids(tokenizer, messages)   prompts for generation
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.loading import IMAGE_TYPES, Loaded, hf_config

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DECODERS = ("gpt2", "llama")  # families that read the built-in texts as one document


def ensure_pad_token(tokenizer: Any) -> None:
    """Decoder tokenizers often have no pad token; batching needs one.  The EOS token is safe: padded
    positions are masked out and never reach a result."""
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token


def text_tokenizer(loaded: Loaded) -> Any:
    """The model's tokenizer, or a ValueError when it cannot read text."""
    tok: Any = loaded.tokenizer
    if tok is None or not callable(tok) or hf_config(loaded.model).model_type in IMAGE_TYPES:
        raise ValueError(f"model {loaded.name!r} takes no text (no tokenizer); send input_ids, or pixel_values "
                         "for an image model")
    return tok


def encode_texts(loaded: Loaded, texts: Sequence[str], max_length: int | None = 512) -> dict[str, Tensor]:
    """A batch of texts, one sequence each, right-padded: input_ids, attention_mask (and token_type_ids).
    max_length: truncate each text to that many tokens; None: never truncate (a text longer than the model
    takes is then refused at rank 0, saying so)."""
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise ValueError("texts must be a non-empty list of non-empty strings")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    tok = text_tokenizer(loaded)
    ensure_pad_token(tok)
    enc = tok(list(texts), padding=True, truncation=max_length is not None, max_length=max_length,
              return_tensors="pt")
    return {k: v for k, v in enc.items() if k in TEXT_INPUTS}


def read_texts(texts: Sequence[str] | None, text_file: str | None) -> list[str]:
    """--text values, then the lines of --text-file (blank lines and lines starting with # skipped)."""
    out = list(texts or [])
    if text_file:
        lines = Path(text_file).read_text(encoding="utf-8").splitlines()
        out += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return out


def image_request(loaded: Loaded, images: Sequence[str] | None) -> tuple[dict[str, Tensor], list[str]]:
    """pixel_values of the image files, or the bundled ViT's default request: 8 Fashion-MNIST test images."""
    from .tasks import image_pixels

    cfg = hf_config(loaded.model)
    if not images and getattr(cfg, "num_channels", 3) == 1 and getattr(cfg, "image_size", 0) == 28:
        from .data import FASHION_MNIST_CLASSES, fashion_mnist, fashion_pixels

        pics, labels = fashion_mnist("test")
        return {"pixel_values": fashion_pixels(pics[:8])}, [
            f"test image {i} ({FASHION_MNIST_CLASSES[int(y)]})" for i, y in enumerate(labels[:8])]
    if not images:
        raise ValueError(f"{cfg.model_type} models need an image: pass --image PATH")
    from PIL import Image

    return {"pixel_values": image_pixels(loaded, [Image.open(p) for p in images])}, [Path(p).name for p in images]


def build_request(loaded: Loaded, texts: Sequence[str] | None = None, text_file: str | None = None,
                  images: Sequence[str] | None = None, max_length: int = 512) -> tuple[dict[str, Tensor], list[str]]:
    """The inputs of a `launch` / `run` request and a label per input: the given texts (default: the
    built-in ones; a decoder reads them joined as one document), or images for an image model."""
    from .data import builtin_texts

    family = hf_config(loaded.model).model_type
    if family in IMAGE_TYPES:
        return image_request(loaded, images)
    chosen = read_texts(texts, text_file) or builtin_texts()
    text_tokenizer(loaded)
    if family in DECODERS:
        chosen = ["\n".join(chosen)]
    return encode_texts(loaded, chosen, max_length), chosen


def builtin_request(loaded: Loaded, max_length: int) -> dict[str, Any]:
    """The request `prism-edge launch` / `worker` send by default, for the benches to send the same
    (tensors, typed loosely so that it passes as **keywords)."""
    return build_request(loaded, max_length=max_length)[0]


def prompt_ids(tokenizer: Any, prompt: str, chat: bool = False) -> Tensor:
    """(1, N) token ids of a prompt; chat: wrapped as one user message in the tokenizer's chat template."""
    if chat:
        return chat_ids(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> Tensor:
    """(1, N) token ids of a conversation in the tokenizer's chat template, ready for the assistant's turn
    (a tokenizer without a template: the messages' contents joined by new lines)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in messages)
    # the template already holds the special tokens (BOS, role markers)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def check_ids(ids: Tensor) -> Tensor:
    """A prompt that tokenised to nothing cannot be generated from."""
    if ids.numel() == 0:
        raise ValueError("the prompt tokenised to no tokens; send some text")
    return ids.to(torch.long)
