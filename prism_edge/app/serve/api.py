"""What every HTTP endpoint shares: errors in OpenAI's shape, checked request fields, streamed replies."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ...cluster import ClusterError, RequestError
from ...runtime.modes import DECODE_MODES as MODES

Emit = Callable[[dict[str, Any]], bool]  # sends one server-sent event; False once the client is gone
_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "list": "a list",
          "dict": "an object"}


class ApiError(Exception):
    """An HTTP error with OpenAI's fields: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers or {}

    @property
    def kind(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class BadField(ValueError):
    """A request field that is missing or wrong: `param` names it (the server answers 400 with it)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """body[name] if present and of the right JSON type (a bool is not a number), else default / BadField."""
    value = body.get(name, default)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(_NAMES[k.__name__] for k in kinds)
        raise BadField(name, f'"{name}" must be {names}, got {value!r}')
    return value


@dataclass
class Ctx:
    """What a handler works with: the cluster (to read), and how to run on it: `forward` (batched with concurrent
    requests by the server) and `generate` (Cluster.generate's arguments, in turn with the others), both timed for
    the server's metrics."""

    cluster: Any  # cluster.Cluster
    forward: Callable[..., Any]  # forward(inputs, outputs=, budget=, fidelity=) -> PrismOutput
    generate: Callable[..., Any]  # generate(ids, **Cluster.generate's keywords) -> Generation


@dataclass(frozen=True)
class Stream:
    """A reply sent as server-sent events: `run(emit)` emits each chunk; `data: [DONE]` follows."""

    run: Callable[[Emit], None]


def request_budget(body: dict[str, Any]) -> float | None:
    """The optional "budget" field: this request's byte budget, a fraction of Voltage's bytes (e.g. 0.05 on a
    slow link); None: the server's configured budget."""
    budget = field(body, "budget", (int, float))
    if budget is not None and not 0 < budget <= 1:
        raise BadField("budget", f'"budget" must be a fraction of Voltage\'s bytes above 0 and at most 1 (e.g. 0.1), '
                                 f"got {budget!r}")
    return None if budget is None else float(budget)


def request_fidelity(body: dict[str, Any]) -> str | float | None:
    """The optional "fidelity" field: what a server planning each request (--plan auto) may trade for speed, exact,
    high, balanced or a byte budget; None: the server's --fidelity."""
    value = body.get("fidelity")
    if value is None:
        return None
    if isinstance(value, bool) or not (value in ("exact", "high", "balanced")
                                       or (isinstance(value, (int, float)) and 0 < value <= 1)):
        raise BadField("fidelity", '"fidelity" must be "exact", "high", "balanced" or a byte budget above 0 and at '
                                   f"most 1, got {value!r:.60}")
    return value if isinstance(value, str) else float(value)


def decode_mode(body: dict[str, Any]) -> str:
    """The optional "decode" field of a generation request (runtime.decode.MODES)."""
    mode = field(body, "decode", str, "auto")
    if mode not in MODES:
        raise BadField("decode", f'"decode" must be one of {", ".join(MODES)}, got {mode!r}')
    return mode


@contextmanager
def as_api_errors() -> Iterator[None]:
    """Turn what a handler raises into the right HTTP error."""
    try:
        yield
    except ApiError:
        raise
    except BadField as err:
        raise ApiError(400, str(err), err.param) from None
    except ValueError as err:
        raise ApiError(400, str(err)) from None
    except ClusterError as err:
        raise ApiError(503, str(err), code="cluster_down") from None
    except RequestError as err:  # a device failed inside this request; the cluster serves the next one
        raise ApiError(500, str(err), code="request_failed") from None
    except Exception as err:  # a bug on rank 0 (the cluster stays up unless the devices were mid-request)
        traceback.print_exc(file=sys.stderr)
        raise ApiError(500, f"internal error: {type(err).__name__}: {err}") from None
