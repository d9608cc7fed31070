"""The devices' roles in a generation after the prefill (generation.py runs rank 0's side and dispatches):

  Earlier   a device before the last: sends the last device its K/V once (handoff) or answers its query for
            every layer of every token (distributed); rank 0 plays it too, from inside its token loop
  Last      the decoding device: streams each token id to rank 0 (8 bytes), asks rank 0 every CHUNK tokens
            whether to go on, takes the hand-off or gathers the partial attentions

A failure inside the generation (a bug, out of memory) is contained as in the prefill (cluster.node): the
failing device stops computing but still sends what its peers wait for, zeros of the planned shapes, and
the generation ends early; every worker then tells rank 0 in its status message, and rank 0 raises
RequestError while the cluster stays up.
"""

from __future__ import annotations

import traceback
from typing import Any

import torch
from torch import Tensor

from ..models import Adapter
from ..runtime import decode as modes
from ..runtime.attention import Partial
from ..runtime.generate import Generation, decode_loop, decode_request
from .node import DeviceRun, Fault, describe_error
from .transport import (TAG_DECODE_ANSWER, TAG_DECODE_BYTES, TAG_DECODE_CONTROL, TAG_DECODE_QUERY,
                                  TAG_DECODE_WORD, TAG_GENERATE, TAG_HANDOFF, LAYER_TAGS, DeviceLost,
                                  DistCommunicator)

CHUNK = 4  # tokens between the last device's "go on?" questions: bounds decoding past a stop, costs a round trip


class Stop(Exception):
    """Raised from inside decode_loop's callback to leave it early."""


def continues(count: int, tid: int, max_new: int, stops: tuple[int, ...]) -> bool:
    """Whether the last device asks before its next token: both ends evaluate this the same way."""
    return count % CHUNK == 0 and count < max_new and tid not in stops


class _Role:
    """What both roles share: the first failure inside the generation, remembered (one line and its traceback)."""

    error: str | None = None
    trace: str | None = None

    def failed(self, err: BaseException, where: str) -> None:
        if isinstance(err, DeviceLost):
            raise err
        if self.error is None:
            self.error, self.trace = describe_error(err, where), traceback.format_exc()


class Earlier(_Role):
    """An earlier device's part in a generation: its K/V handed off once, or its partial attention served."""

    def __init__(self, run: DeviceRun, comm: DistCommunicator, plan: Any, positions: Tensor,
                 fault: Fault | None = None) -> None:
        assert run.executor is not None
        self.dev, self.comm, self.last, self.fault = run.executor, comm, comm.world - 1, fault
        self.shared = modes.shared_mask(plan, positions.to(self.dev.positions.device), comm.rank)
        self.layers = self.dev.geo.layers

    def hand_off(self) -> None:
        shapes = modes.handoff_shapes(self.dev.geo, self.dev.codec.wire, int(self.shared.sum()))
        for i in range(self.layers):
            message = None
            if self.error is None:
                try:
                    message = modes.handoff_message(self.dev, i, self.shared)
                except Exception as err:  # noqa: BLE001 - contained: zeros go instead
                    self.failed(err, f"in layer {i}'s hand-off")
            if message is None:
                message = [torch.zeros(s, dtype=d) for s, d in shapes]
            self.comm.isend("handoff", self.last, message, TAG_HANDOFF + LAYER_TAGS * i, f"layer {i} hand-off")
        self.comm.flush()

    def _answer(self, i: int, q: Tensor) -> list[Tensor] | None:
        if self.error is not None:
            return None
        try:
            if self.fault is not None:
                self.fault.strike(i, "decode")
            return modes.partial_message(self.dev, i, q, self.shared)
        except Exception as err:  # noqa: BLE001 - contained: zeros go instead
            self.failed(err, f"answering layer {i}'s decode query")
            return None

    def serve_token(self, t: int) -> bool:
        """Wait for the last device's word before token t's layers; answer each layer's query.  False: done."""
        word = self.comm.recv("control", self.last, [torch.zeros(1, dtype=torch.int64)], TAG_DECODE_WORD + t,
                              "decode word", count=False)[0]
        if int(word) == 0:
            return False
        shapes = modes.partial_shapes(self.dev.geo, self.dev.codec.wire)
        with torch.inference_mode():
            for i in range(self.layers):
                tag = TAG_DECODE_QUERY + 4 * (t * self.layers + i)
                q = self.comm.recv("decode", self.last, [torch.empty(shapes[0][0], dtype=shapes[0][1])], tag,
                                   f"layer {i} query")[0]
                answer = self._answer(i, q) or [torch.zeros(s, dtype=d) for s, d in shapes]
                self.comm.isend("decode", self.last, answer, TAG_DECODE_ANSWER + 4 * (t * self.layers + i),
                                f"layer {i} partial attention")
        self.comm.flush()
        return True

    def serve(self) -> None:
        t = 0
        while self.serve_token(t):
            t += 1


class Last(_Role):
    """The decoding device: streams token ids to rank 0; takes the hand-off or gathers partial attentions."""

    def __init__(self, adapter: Adapter, comm: DistCommunicator, run: DeviceRun, plan: Any, positions: Tensor,
                 params: Tensor, fault: Fault | None = None) -> None:
        assert run.executor is not None
        self.adapter, self.comm, self.run, self.dev, self.fault = adapter, comm, run, run.executor, fault
        self.max_new, self.sampling, self.stops, self.mode = decode_request(params)
        self.earlier = range(comm.world - 1)
        self.sent = self.asked = 0
        self.told = False  # distributed: the earlier devices heard that no more layers follow
        self.open: int | None = None  # distributed: the next layer of the current token still to exchange
        self.pending: dict[int, list] = {}
        if self.mode == "handoff":  # posted now, waited for layer by layer in the first token's forward
            shared = [modes.shared_mask(plan, positions, p) for p in self.earlier]
            shapes = [modes.handoff_shapes(self.dev.geo, self.dev.codec.wire, int(m.sum())) for m in shared]
            self.pending = {i: [comm.irecv(p, [torch.empty(s, dtype=d) for s, d in shapes[p]],
                                           TAG_HANDOFF + LAYER_TAGS * i, f"layer {i} hand-off")
                                for p in self.earlier] for i in range(self.dev.geo.layers)}

    def decode(self, length: int) -> None:
        try:
            with torch.inference_mode():
                decode_loop(self.adapter, self.step, self.run.finals["logits"][:, -1], length, self.max_new,
                            self.sampling, self.stops, Generation(prompt_ids=torch.zeros(1, 0, dtype=torch.long)),
                            self.stream)
        except Stop:
            pass
        except Exception as err:  # noqa: BLE001 - contained: finish what the peers wait for, end early
            self.failed(err, "while decoding")
            self._settle()
        if self.mode == "distributed" and not self.told:  # ranks 1.. wait for the next token's word; rank 0
            for p in self.earlier[1:]:  # learns of the end from the end marker
                self.comm.isend("control", p, [torch.zeros(1, dtype=torch.int64)], TAG_DECODE_WORD + self.sent,
                                "decode word", count=False)
        self.comm.isend("token", 0, [torch.tensor([-1], dtype=torch.int64)], TAG_GENERATE + 1 + self.sent,
                        "end of generation")
        ledger, me = self.comm.ledger, self.comm.rank
        counts = [ledger.received("handoff", me), ledger.sent("decode", me) + ledger.received("decode", me)]
        self.comm.isend("control", 0, [torch.tensor(counts, dtype=torch.int64)], TAG_DECODE_BYTES,
                        "decode byte counts", count=False)
        self.comm.flush()

    def _settle(self) -> None:
        """After a failure: take the hand-off still in flight and finish the current token's exchanges with
        zero queries, so that every earlier device is where the end of the generation expects it."""
        for index in sorted(self.pending):
            for p, works in enumerate(self.pending.pop(index)):
                self.comm.wait_recv("handoff", p, works, f"layer {index} hand-off")
        if self.mode == "distributed" and self.open is not None:
            shapes = modes.partial_shapes(self.dev.geo, self.dev.codec.wire)
            for i in range(self.open, self.dev.geo.layers):
                self._exchange(i, torch.zeros(shapes[0][0], dtype=shapes[0][1]))

    def stream(self, tid: int) -> None:
        self.comm.isend("token", 0, [torch.tensor([tid], dtype=torch.int64)], TAG_GENERATE + 1 + self.sent,
                        "new token")
        self.sent += 1
        stopped = False
        if continues(self.sent, tid, self.max_new, self.stops):
            word = self.comm.recv("control", 0, [torch.zeros(1, dtype=torch.int64)], TAG_DECODE_CONTROL + self.asked,
                                  "go on / stop", count=False)[0]
            self.asked += 1
            stopped = int(word) == 0
        if self.mode == "distributed":  # the earlier devices learn whether this token's layers follow
            follows = not stopped and tid not in self.stops and self.sent < self.max_new
            for p in self.earlier:
                self.comm.isend("control", p, [torch.tensor([int(follows)], dtype=torch.int64)],
                                TAG_DECODE_WORD + self.sent - 1, "decode word", count=False)
            self.told = not follows
            self.open = 0 if follows else None
        if stopped:
            raise Stop

    def step(self, index: int, x: Tensor, pos: Tensor) -> Tensor:
        if self.fault is not None:
            self.fault.strike(index, "decode")
        if self.mode == "handoff" and index in self.pending:
            messages = []
            for p, works in enumerate(self.pending.pop(index)):
                self.comm.wait_recv("handoff", p, works, f"layer {index} hand-off")
                messages.append([buf for _, buf in works])
            modes.install_handoff(self.dev, index, messages)
        if self.mode != "distributed":
            return modes.local_step(self.dev, index, x, pos)
        return self._distributed(index, x, pos)

    def _exchange(self, index: int, sent: Tensor) -> dict[int, list[Tensor]]:
        """Layer `index` of the current token: the query to every earlier device, their partial attentions back."""
        tag = 4 * ((self.sent - 1) * self.dev.geo.layers + index)
        shapes = modes.partial_shapes(self.dev.geo, self.dev.codec.wire)
        posted = {p: self.comm.irecv(p, [torch.empty(s, dtype=d) for s, d in shapes], TAG_DECODE_ANSWER + tag,
                                     f"layer {index} partial attention") for p in self.earlier}
        for p in self.earlier:
            self.comm.isend("decode", p, [sent], TAG_DECODE_QUERY + tag, f"layer {index} query")
        out = {}
        for p, works in posted.items():
            self.comm.wait_recv("decode", p, works, f"layer {index} partial attention")
            out[p] = [buf for _, buf in works]
        self.open = index + 1 if index + 1 < self.dev.geo.layers else None
        return out

    def _distributed(self, index: int, x: Tensor, pos: Tensor) -> Tensor:
        h, q = modes.new_token(self.dev, index, x, pos)
        merged = modes.own_partial(self.dev, index, q)
        answers = self._exchange(index, q.to(modes.query_wire(self.dev.codec.wire)).contiguous())
        for out, lse in answers.values():
            merged = merged.join(Partial(out.to(q.dtype), lse.to(q.dtype)))
        return modes.finish(self.dev, index, x, h, merged.out)
