"""Generation on device processes, every end of it: rank 0 prefills with everyone, chooses the decode mode
and sends every device the decode parameters; the last device decodes and streams each token id back
(8 bytes per token); the earlier devices, by mode (runtime.decode), do nothing more (local), send the
last device their K/V once (handoff), or answer its query for every layer of every token (distributed).

Stopping early: the last device asks rank 0 whether to go on once every CHUNK tokens (a blocking word,
so nothing is left in flight), and rank 0 says stop as soon as its `on_token` callback asked to (e.g.
a stop string appeared in the text).  So the last device never decodes more than CHUNK - 1 tokens past
a stop rank 0 decided; stop token ids and max_new_tokens it knows itself.  In distributed mode the last
device tells the earlier devices before each token's layers whether they follow (1) or it is done (0).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from ...models import Adapter
from ...runtime import decode as modes
from ...runtime.attention import Partial
from ...runtime.generate import PARAMS, Generation, Sampling, decode_loop, decode_request
from ...runtime.node import DeviceRun
from ...runtime.protocol import PING
from ...runtime.transport import (TAG_DECODE_ANSWER, TAG_DECODE_BYTES, TAG_DECODE_CONTROL, TAG_DECODE_QUERY,
                                  TAG_DECODE_WORD, TAG_GENERATE, TAG_HANDOFF, LAYER_TAGS, DistCommunicator)
from .dispatch import Coordinator, Request

CHUNK = 4  # tokens between the last device's "go on?" questions: bounds decoding past a stop, costs a round trip
TokenCallback = Callable[[int], "bool | None"]  # on_token(id) -> True to stop generating


class _Stop(Exception):
    """Raised from inside decode_loop's callback to leave it early."""


class _Listener:
    """Calls the user's on_token and remembers whether it asked to stop or raised (raised again at the end)."""

    def __init__(self, on_token: TokenCallback | None) -> None:
        self.on_token, self.stopped = on_token, False
        self.error: BaseException | None = None

    def give(self, tid: int) -> None:
        if self.on_token is None or self.stopped:
            return
        try:
            self.stopped = bool(self.on_token(tid))
        except Exception as err:  # noqa: BLE001 - the protocol must finish before the error surfaces
            self.stopped, self.error = True, err

    def finish(self, result: Generation) -> Generation:
        if self.stopped and result.stopped_by != "stop token":
            result.stopped_by = "stop"
        if self.error is not None:
            raise self.error
        return result


def _continues(count: int, tid: int, max_new: int, stops: tuple[int, ...]) -> bool:
    """Whether the last device asks before its next token: both ends evaluate this the same way."""
    return count % CHUNK == 0 and count < max_new and tid not in stops


# --------------------------------------------------------------------------- rank 0
def run_generation(coord: Coordinator, req: Request, params: Tensor, prompt: Tensor,
                   on_token: TokenCallback | None, ping_every: float) -> Generation:
    """Rank 0: the prefill with every device, then the decode (here when alone, else on the last device).
    params: `encode_request(...)` with the chosen mode (never "auto" here)."""
    t0 = time.perf_counter()
    world, last = coord.world, coord.world - 1
    run = coord.start(req, keep_cache=True)
    for p in range(1, world):  # after the prefill: the layer loop flushed its sends
        coord.comm.isend("control", p, [params], TAG_GENERATE, "decode parameters", count=False)
    mode = decode_request(params)[3]
    result = Generation(prompt_ids=prompt.cpu(), prefill_stats=coord.stats(run, coord.worker_reports(), t0),
                        mode=mode)
    listener = _Listener(on_token)
    if world == 1:
        _decode_here(coord.adapter, run, req.batch.valid.shape[1], params, result, listener)
        return listener.finish(result)
    earlier = _Earlier(run, coord.comm, req.plan, req.batch.positions)
    if mode == "handoff":
        earlier.hand_off()
    _receive(coord, params, result, listener, ping_every, earlier if mode == "distributed" else None)
    handed, decoded = coord.comm.recv("control", last, [torch.zeros(2, dtype=torch.int64)], TAG_DECODE_BYTES,
                                      "decode byte counts", count=False)[0].tolist()
    result.handoff_bytes, result.decode_bytes = int(handed), int(decoded)
    return listener.finish(result)


def _decode_here(adapter: Adapter, run: DeviceRun, length: int, params: Tensor, result: Generation,
                 listener: _Listener) -> None:
    max_new, sampling, stops, _ = decode_request(params)
    assert run.executor is not None  # generation keeps every device's executor

    def give(tid: int) -> None:
        listener.give(tid)
        if listener.stopped:
            raise _Stop

    try:
        with torch.inference_mode():
            decode_loop(adapter, partial(modes.local_step, run.executor), run.finals["logits"][:, -1], length,
                        max_new, sampling, stops, result, give)
    except _Stop:
        pass


def _receive(coord: Coordinator, params: Tensor, result: Generation, listener: _Listener, ping_every: float,
             serving: "_Earlier | None") -> None:
    """Take the last device's tokens until its end marker, answering its questions (and, distributed,
    its queries); keep the idle ones awake."""
    comm, last = coord.comm, coord.world - 1
    max_new, _, stops, _ = decode_request(params)
    count, asked, pinged = 0, 0, time.monotonic()
    while True:
        tid = int(comm.recv("token", last, [torch.zeros(1, dtype=torch.int64)], TAG_GENERATE + 1 + count,
                            "new token")[0])
        if tid < 0:
            break
        count += 1
        if not listener.stopped:  # tokens decoded after a stop are dropped
            result.new_ids.append(tid)
            listener.give(tid)
            if tid in stops:
                result.stopped_by = "stop token"
        if _continues(count, tid, max_new, stops):
            word = torch.tensor([0 if listener.stopped else 1], dtype=torch.int64)
            comm.isend("control", last, [word], TAG_DECODE_CONTROL + asked, "go on / stop", count=False)
            asked += 1
        if serving is not None:
            serving.serve_token(count - 1)
        elif time.monotonic() - pinged > ping_every:  # the idle devices wait for their next header
            coord.tell(PING, range(1, last), "heartbeat")
            pinged = time.monotonic()
    comm.flush()


# --------------------------------------------------------------------------- the earlier devices
class _Earlier:
    """An earlier device's part in a generation: its K/V handed off once, or its partial attention served."""

    def __init__(self, run: DeviceRun, comm: DistCommunicator, plan, positions: Tensor) -> None:
        assert run.executor is not None
        self.dev, self.comm, self.last = run.executor, comm, comm.world - 1
        self.shared = modes.shared_mask(plan, positions.to(self.dev.positions.device), comm.rank)
        self.layers = self.dev.geo.layers

    def hand_off(self) -> None:
        for i in range(self.layers):
            self.comm.isend("handoff", self.last, modes.handoff_message(self.dev, i, self.shared),
                            TAG_HANDOFF + LAYER_TAGS * i, f"layer {i} hand-off")
        self.comm.flush()

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
                answer = modes.partial_message(self.dev, i, q, self.shared)
                self.comm.isend("decode", self.last, answer, TAG_DECODE_ANSWER + 4 * (t * self.layers + i),
                                f"layer {i} partial attention")
        self.comm.flush()
        return True

    def serve(self) -> None:
        t = 0
        while self.serve_token(t):
            t += 1


def serve_generation(adapter: Adapter, comm: DistCommunicator, run: DeviceRun, plan, positions: Tensor,
                     length: int) -> None:
    """Any rank > 0 after a GENERATE prefill: take the decode parameters and play its part."""
    params = comm.recv("control", 0, [torch.zeros(PARAMS, dtype=torch.float64)], TAG_GENERATE,
                       "decode parameters", count=False)[0]
    if comm.rank == comm.world - 1:
        _Last(adapter, comm, run, plan, positions, params).decode(length)
        return
    mode = decode_request(params)[3]
    if mode == "handoff":
        _Earlier(run, comm, plan, positions).hand_off()
    elif mode == "distributed":
        _Earlier(run, comm, plan, positions).serve()


# --------------------------------------------------------------------------- the last device
class _Last:
    """The decoding device: streams token ids to rank 0; takes the hand-off or gathers partial attentions."""

    def __init__(self, adapter: Adapter, comm: DistCommunicator, run: DeviceRun, plan, positions: Tensor,
                 params: Tensor) -> None:
        assert run.executor is not None
        self.adapter, self.comm, self.run, self.dev = adapter, comm, run, run.executor
        self.max_new, self.sampling, self.stops, self.mode = decode_request(params)
        self.earlier = range(comm.world - 1)
        self.sent = self.asked = 0
        self.told = False  # distributed: the earlier devices heard that no more layers follow
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
        except _Stop:
            pass
        if self.mode == "distributed" and not self.told:  # no token at all: ranks 1.. still wait for a word
            for p in self.earlier[1:]:
                self.comm.isend("control", p, [torch.zeros(1, dtype=torch.int64)], TAG_DECODE_WORD, "decode word",
                                count=False)
        self.comm.isend("token", 0, [torch.tensor([-1], dtype=torch.int64)], TAG_GENERATE + 1 + self.sent,
                        "end of generation")
        ledger, me = self.comm.ledger, self.comm.rank
        counts = [ledger.received("handoff", me), ledger.sent("decode", me) + ledger.received("decode", me)]
        self.comm.isend("control", 0, [torch.tensor(counts, dtype=torch.int64)], TAG_DECODE_BYTES,
                        "decode byte counts", count=False)
        self.comm.flush()

    def stream(self, tid: int) -> None:
        self.comm.isend("token", 0, [torch.tensor([tid], dtype=torch.int64)], TAG_GENERATE + 1 + self.sent,
                        "new token")
        self.sent += 1
        stopped = False
        if _continues(self.sent, tid, self.max_new, self.stops):
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
        if stopped:
            raise _Stop

    def step(self, index: int, x: Tensor, pos: Tensor) -> Tensor:
        if self.mode == "handoff" and index in self.pending:
            messages = []
            for p, works in enumerate(self.pending.pop(index)):
                self.comm.wait_recv("handoff", p, works, f"layer {index} hand-off")
                messages.append([buf for _, buf in works])
            modes.install_handoff(self.dev, index, messages)
        if self.mode != "distributed":
            return modes.local_step(self.dev, index, x, pos)
        return self._distributed(index, x, pos)

    def _distributed(self, index: int, x: Tensor, pos: Tensor) -> Tensor:
        h, q = modes.new_token(self.dev, index, x, pos)
        merged = modes.own_partial(self.dev, index, q)
        tag = 4 * ((self.sent - 1) * self.dev.geo.layers + index)
        sent = q.to(modes.query_wire(self.dev.codec.wire)).contiguous()
        shapes = modes.partial_shapes(self.dev.geo, self.dev.codec.wire)
        posted = {p: self.comm.irecv(p, [torch.empty(s, dtype=d) for s, d in shapes], TAG_DECODE_ANSWER + tag,
                                     f"layer {index} partial attention") for p in self.earlier}
        for p in self.earlier:
            self.comm.isend("decode", p, [sent], TAG_DECODE_QUERY + tag, f"layer {index} query")
        for p, works in posted.items():
            self.comm.wait_recv("decode", p, works, f"layer {index} partial attention")
            out, lse = (buf for _, buf in works)
            merged = merged.join(Partial(out.to(q.dtype), lse.to(q.dtype)))
        return modes.finish(self.dev, index, x, h, merged.out)


__all__ = ["CHUNK", "Sampling", "run_generation", "serve_generation"]
