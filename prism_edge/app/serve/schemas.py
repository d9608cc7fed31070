"""The request bodies of every POST route, as pydantic models: JSON types checked strictly by the library.

Strict: a bool is not a number, "5" is not an integer and 5.5 is not one either.  Unknown fields are allowed
(OpenAI's clients send fields this server ignores, e.g. "user").  A schema checks types and shapes only; what a
value means (a token id within the vocabulary, a length within the model's) is checked by the handlers, which read
the validated body.  A failure becomes a 400 in OpenAI's error shape whose "param" names the field, e.g.
"messages[0].content" (see `bad_field`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ...runtime.modes import DECODE_MODES, OUTPUT_MODES
from .api import BadField

Ids = list[list[int]]
Fidelity = str | float  # exact | high | balanced | a byte budget: checked by api.request_fidelity


class Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class Budgeted(Body):
    budget: float | None = None  # this request's byte budget (a fraction of Voltage's bytes)
    fidelity: Fidelity | None = None


class Forward(Budgeted):
    texts: list[str] | None = None
    max_length: int | None = None
    input_ids: Ids | None = None
    attention_mask: Ids | None = None
    token_type_ids: Ids | None = None
    pixel_values: list[Any] | None = None  # (B, C, H, W) numbers: its shape is checked as a tensor
    outputs: Literal[OUTPUT_MODES] | None = None  # type: ignore[valid-type]
    top_k: int | None = None
    return_logits: bool | None = None


class Generate(Budgeted):
    prompt: str | None = None
    input_ids: Ids | None = None
    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    chat: bool | None = None
    stop_ids: list[int] | None = None
    decode: Literal[DECODE_MODES] | None = None  # type: ignore[valid-type]


class Sampled(Budgeted):
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    decode: Literal[DECODE_MODES] | None = None  # type: ignore[valid-type]


class Completion(Sampled):
    prompt: str | list[int] | list[str] | Ids | None = None


class TextPart(Body):
    type: str
    text: str | None = None


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class Chat(Sampled):
    messages: list[Message] | None = None


class Embeddings(Budgeted):
    model: str | None = None
    input: str | list[str] | list[int] | Ids | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None


SCHEMAS: dict[str, type[Body]] = {"/v1/forward": Forward, "/v1/generate": Generate, "/v1/completions": Completion,
                                  "/v1/chat/completions": Chat, "/v1/embeddings": Embeddings}
_TYPES = ("str", "int", "float", "bool", "TextPart", "Message")
_TAGS = ("list[", "dict[", "function-", "literal[", "is-instance[", "model[")


def _is_tag(part: Any) -> bool:
    """pydantic names the union member it tried in the location: not a field."""
    return isinstance(part, str) and (part.startswith(_TAGS) or part in _TYPES)


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_tag(part):
            out += ("." if out else "") + str(part)
    return out


def bad_field(err: ValidationError) -> BadField:
    """The first problem of a failed schema as a BadField naming the field (several members of a union that all
    failed on the field itself are listed as what it must be)."""
    errors = err.errors(include_url=False)
    deepest = max(errors, key=lambda e: len([p for p in e["loc"] if not _is_tag(p)]))
    param = _param(tuple(deepest["loc"]))
    same = [e for e in errors if _param(tuple(e["loc"])) == param]
    got = repr(deepest.get("input"))[:60]
    if len(same) > 1:
        kinds = [str(e["loc"][-1]) for e in same if _is_tag(e["loc"][-1])]
        return BadField(param, f'"{param}" must be {" or ".join(kinds)}, got {got}')
    return BadField(param, f'"{param}": {deepest["msg"].lower()}, got {got}')


def check_body(route: str, body: dict[str, Any]) -> None:
    """Validate a POST body against its route's schema (BadField when it does not fit)."""
    schema = SCHEMAS.get(route)
    if schema is None:
        return
    try:
        schema.model_validate(body)
    except ValidationError as err:
        raise bad_field(err) from None
