"""Generation on device processes, both ends: rank 0 prefills with everyone and then receives the tokens
the last device decodes; the last device decodes and streams each token id back (8 bytes per token).

Stopping early: the last device asks rank 0 whether to go on once every CHUNK tokens (a blocking word,
so nothing is left in flight), and rank 0 says stop as soon as its `on_token` callback asked to (e.g.
a stop string appeared in the text).  So the last device never decodes more than CHUNK - 1 tokens past
a stop rank 0 decided; stop token ids and max_new_tokens it knows itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from ...models import Adapter
from ...runtime.generate import MAX_STOPS, Generation, Sampling, decode_loop, decode_request
from ...runtime.node import DeviceRun
from ...runtime.protocol import PING
from ...runtime.transport import TAG_DECODE_CONTROL, TAG_GENERATE, DistCommunicator
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


def run_generation(coord: Coordinator, req: Request, params: Tensor, prompt: Tensor,
                   on_token: TokenCallback | None, ping_every: float) -> Generation:
    """Rank 0: the prefill with every device, then the decode (here when alone, else on the last device)."""
    t0 = time.perf_counter()
    world, last = coord.world, coord.world - 1
    run = coord.start(req, keep_cache=world == 1)
    if world > 1:  # after the prefill: the layer loop flushed its sends, and the last device reads this next
        coord.comm.isend("control", last, [params], TAG_GENERATE, "decode parameters", count=False)
    result = Generation(prompt_ids=prompt.cpu(), prefill_stats=coord.stats(run, coord.worker_reports(), t0))
    listener = _Listener(on_token)
    if world == 1:
        _decode_here(coord.adapter, run, req.batch.valid.shape[1], params, result, listener)
    else:
        _receive(coord, params, result, listener, ping_every)
    return listener.finish(result)


def _decode_here(adapter: Adapter, run: DeviceRun, length: int, params: Tensor, result: Generation,
                 listener: _Listener) -> None:
    max_new, sampling, stops = decode_request(params)

    def give(tid: int) -> None:
        listener.give(tid)
        if listener.stopped:
            raise _Stop

    try:
        with torch.inference_mode():
            decode_loop(adapter, run.executor, run.finals["logits"][:, -1], length, max_new, sampling, stops, result,
                        give)
    except _Stop:
        pass


def _receive(coord: Coordinator, params: Tensor, result: Generation, listener: _Listener, ping_every: float) -> None:
    """Take the last device's tokens until its end marker, answering its questions; keep the idle ones awake."""
    comm, last = coord.comm, coord.world - 1
    max_new, _, stops = decode_request(params)
    count, asked, pinged = 0, 0, time.monotonic()
    while True:
        tid = int(comm.recv("decode", last, [torch.zeros(1, dtype=torch.int64)], TAG_GENERATE + 1 + count,
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
        if time.monotonic() - pinged > ping_every:  # the idle devices wait for their next header
            coord.tell(PING, range(1, last), "heartbeat")
            pinged = time.monotonic()
    comm.flush()


def decode_on_last_device(adapter: Adapter, comm: DistCommunicator, run: DeviceRun, length: int) -> None:
    """The last rank of a GENERATE request: take the decode parameters, stream each new token id to rank 0."""
    params = comm.recv("control", 0, [torch.zeros(8 + MAX_STOPS, dtype=torch.float64)], TAG_GENERATE,
                       "decode parameters", count=False)[0]
    max_new, sampling, stops = decode_request(params)
    sent, asked = 0, 0

    def stream(tid: int) -> None:
        nonlocal sent, asked
        comm.isend("decode", 0, [torch.tensor([tid], dtype=torch.int64)], TAG_GENERATE + 1 + sent, "new token")
        sent += 1
        if _continues(sent, tid, max_new, stops):
            word = comm.recv("control", 0, [torch.zeros(1, dtype=torch.int64)], TAG_DECODE_CONTROL + asked,
                             "go on / stop", count=False)[0]
            asked += 1
            if int(word) == 0:
                raise _Stop

    try:
        with torch.inference_mode():
            decode_loop(adapter, run.executor, run.finals["logits"][:, -1], length, max_new, sampling, stops,
                        Generation(prompt_ids=torch.zeros(1, 0, dtype=torch.long)), stream)
    except _Stop:
        pass
    comm.isend("decode", 0, [torch.tensor([-1], dtype=torch.int64)], TAG_GENERATE + 1 + sent, "end of generation")
    comm.flush()


__all__ = ["CHUNK", "Sampling", "decode_on_last_device", "run_generation"]
