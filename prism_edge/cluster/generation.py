"""Generation on device processes, every end of it: rank 0 prefills with everyone, chooses the decode mode
and sends every device the decode parameters; the last device decodes and streams each token id back
(8 bytes per token); the earlier devices, by mode (runtime.decode), do nothing more (local), send the
last device their K/V once (handoff), or answer its query for every layer of every token (distributed).
The devices' roles are in decoders.py.

Stopping early: the last device asks rank 0 whether to go on once every CHUNK tokens (a blocking word,
so nothing is left in flight), and rank 0 says stop as soon as its `on_token` callback asked to (e.g.
a stop string appeared in the text).  So the last device never decodes more than CHUNK - 1 tokens past
a stop rank 0 decided; stop token ids and max_new_tokens it knows itself.  In distributed mode the last
device tells the earlier devices before each token's layers whether they follow (1) or it is done (0).

Failures inside the request: rank 0 reads every prefill report before it sends the decode parameters;
if a device failed in the prefill, the parameters say "abandoned" and nobody decodes.  After decoding,
every worker sends rank 0 a status ("" or what failed); rank 0 then raises RequestError if one failed.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from ..models import Adapter
from ..runtime import decode as modes
from ..runtime.generate import MAX_STOPS, PARAMS, Generation, Sampling, decode_loop, decode_request, encode_request
from .node import DeviceRun, Fault, describe_error
from ..runtime.wire import PING
from ..runtime.stats import pack_text, unpack_text
from .transport import TAG_DECODE_BYTES, TAG_DECODE_CONTROL, TAG_DECODE_STATUS, TAG_GENERATE, DistCommunicator
from .decoders import CHUNK, Earlier, Last, Stop, continues
from .coordinator import Coordinator, Request
from .errors import RequestError

TokenCallback = Callable[[int], "bool | None"]  # on_token(id) -> True to stop generating
ABANDONED = -1  # max_new_tokens in the decode parameters of a request whose prefill failed somewhere
STATUS_CELLS = 80  # a worker's end-of-generation status: 640 bytes of text ("" when all went well)


def check_stop_ids(stop_ids: Sequence[int], vocab: int) -> tuple[int, ...]:
    """Stop token ids: at most MAX_STOPS integers in the vocabulary."""
    if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, Sequence):
        raise ValueError(f"stop_ids must be a list of token ids, got {type(stop_ids).__name__}")
    if len(stop_ids) > MAX_STOPS:
        raise ValueError(f"stop_ids takes at most {MAX_STOPS} token ids, got {len(stop_ids)}")
    for tid in stop_ids:
        if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < vocab:
            raise ValueError(f"stop_ids must be token ids in [0, {vocab}), got {tid!r}")
    return tuple(stop_ids)


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


# --------------------------------------------------------------------------- rank 0
def run_generation(coord: Coordinator, req: Request, params: Tensor, prompt: Tensor,
                   on_token: TokenCallback | None, ping_every: float) -> Generation:
    """Rank 0: the prefill with every device, then the decode (here when alone, else on the last device).
    params: `encode_request(...)` with the chosen mode (never "auto" here)."""
    t0 = time.perf_counter()
    world = coord.world
    run = coord.start(req, keep_cache=True)
    workers = coord.worker_reports()  # before the parameters: a failed prefill is not decoded
    failures = coord.failures(run, workers)
    if failures:
        abandoned = encode_request(0, Sampling(), ())
        abandoned[0] = ABANDONED
        for p in range(1, world):
            coord.comm.isend("control", p, [abandoned], TAG_GENERATE, "decode parameters", count=False)
        coord.comm.flush()
        coord.in_flight = False
        raise RequestError(failures, trace=run.trace)
    for p in range(1, world):
        coord.comm.isend("control", p, [params], TAG_GENERATE, "decode parameters", count=False)
    mode = decode_request(params)[3]
    result = Generation(prompt_ids=prompt.cpu(), prefill_stats=coord.stats(run, workers, t0), mode=mode)
    listener = _Listener(on_token)
    if world == 1:
        coord.in_flight = False
        _decode_here(coord.adapter, run, req.batch.valid.shape[1], params, result, listener)
        return listener.finish(result)
    statuses = {p: coord.comm.irecv(p, [torch.zeros(STATUS_CELLS, dtype=torch.int64)], TAG_DECODE_STATUS,
                                    "decode status") for p in range(1, world)}
    earlier = Earlier(run, coord.comm, req.plan, req.batch.positions)
    if mode == "handoff":
        earlier.hand_off()
    _receive(coord, params, result, listener, ping_every, earlier if mode == "distributed" else None)
    handed, decoded = coord.comm.recv("control", world - 1, [torch.zeros(2, dtype=torch.int64)], TAG_DECODE_BYTES,
                                      "decode byte counts", count=False)[0].tolist()
    result.handoff_bytes, result.decode_bytes = int(handed), int(decoded)
    failures = [(0, earlier.error)] if earlier.error else []
    for p, works in statuses.items():
        coord.comm.wait_recv("control", p, works, "decode status", count=False)
        text = unpack_text(works[0][1])
        failures += [(p, text)] if text else []
    coord.in_flight = False
    if failures:
        raise RequestError(failures, trace=earlier.trace)
    return listener.finish(result)


def _decode_here(adapter: Adapter, run: DeviceRun, length: int, params: Tensor, result: Generation,
                 listener: _Listener) -> None:
    max_new, sampling, stops, _ = decode_request(params)
    assert run.executor is not None  # generation keeps every device's executor

    def give(tid: int) -> None:
        listener.give(tid)
        if listener.stopped:
            raise Stop

    try:
        with torch.inference_mode():
            decode_loop(adapter, partial(modes.local_step, run.executor), run.finals["logits"][:, -1], length,
                        max_new, sampling, stops, result, give)
    except Stop:
        pass
    except Exception as err:  # one device, nothing in flight: only this request fails
        raise RequestError([(0, describe_error(err, "while decoding"))], trace=traceback.format_exc()) from None


def _receive(coord: Coordinator, params: Tensor, result: Generation, listener: _Listener, ping_every: float,
             serving: Earlier | None) -> None:
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
        if continues(count, tid, max_new, stops):
            word = torch.tensor([0 if listener.stopped else 1], dtype=torch.int64)
            comm.isend("control", last, [word], TAG_DECODE_CONTROL + asked, "go on / stop", count=False)
            asked += 1
        if serving is not None:
            serving.serve_token(count - 1)
        elif time.monotonic() - pinged > ping_every:  # the idle devices wait for their next header
            coord.tell(PING, range(1, last), "heartbeat")
            pinged = time.monotonic()
    comm.flush()


# --------------------------------------------------------------------------- the workers
def serve_generation(adapter: Adapter, comm: DistCommunicator, run: DeviceRun, plan, positions: Tensor,
                     length: int, fault: Fault | None = None) -> tuple[str | None, str | None]:
    """Any rank > 0 after a GENERATE prefill: take the decode parameters, play its part, report its status.
    Returns (what failed here, its traceback), or (None, None)."""
    params = comm.recv("control", 0, [torch.zeros(PARAMS, dtype=torch.float64)], TAG_GENERATE,
                       "decode parameters", count=False)[0]
    if int(params[0]) == ABANDONED:  # a device failed in the prefill: rank 0 refused the request
        return None, None
    role: Last | Earlier
    if comm.rank == comm.world - 1:
        role = Last(adapter, comm, run, plan, positions, params, fault)
        role.decode(length)
    else:
        role = Earlier(run, comm, plan, positions, fault)
        mode = decode_request(params)[3]
        if mode == "handoff":
            role.hand_off()
        elif mode == "distributed":
            role.serve()
    comm.isend("control", 0, [pack_text(role.error or "", STATUS_CELLS)], TAG_DECODE_STATUS, "decode status",
               count=False)
    comm.flush()
    return role.error, role.trace


__all__ = ["CHUNK", "Sampling", "check_stop_ids", "run_generation", "serve_generation"]
