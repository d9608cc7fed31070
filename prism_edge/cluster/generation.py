"""Generation on device processes: what carries the tensors of runtime.generate's decoding loop here.

rank 0         prefills with every device, reads every prefill report (a failed prefill is not decoded:
               the parameters say "abandoned"), sends every device the decode parameters, then takes the
               token ids the last device streams back (8 bytes each) and, in distributed mode, answers
               the last device's queries as any earlier device does; alone, it decodes itself.
the last       runs `decode_loop` on its executor with `DistPeers`: each token id to rank 0, a go-on/stop
device         question every CHUNK tokens (rank 0 says stop as soon as its on_token asked to, so the
               last device never decodes more than CHUNK - 1 tokens past it), the hand-off waited for
               layer by layer, or a query per layer per token to the earlier devices.
earlier        `Earlier`: by mode, nothing more (local), their K/V once (handoff), or an answer per layer
devices        per token (distributed; a word from the last device before each token says whether its
               layers follow).

With pipeline stages (partition/stages.py) every stage decodes as above among its own devices: the first
stage's last device embeds each new token, runs its layers and hands the hidden row to the next stage's last
device (a `Relay`), which runs that stage's layers with its own earlier devices and hands it on; the last
stage hands it back to the first stage's last device (the ring), which holds the head and picks the next
token.  A position's row and its id travel as one hop per stage (ledger stage "hop").

Failures inside the generation go through the one containment path (node.Containment): the failing device
computes nothing more but sends what its peers wait for (zeros of the planned shapes) and the generation
ends early; every worker then sends rank 0 a status ("" or what failed) and rank 0 raises RequestError
while the cluster stays up.  The formats and tags are runtime/wire.py's.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..runtime import decode as modes
from ..runtime import wire
from ..runtime.device import DeviceExecutor
from ..models.parts import first_held
from ..partition.stages import Stage, StageLayout
from ..runtime.generate import Generation, TokenCallback, decode_loop, through_layers
from ..runtime.wire import DecodeParams
from .coordinator import Coordinator, Request
from .errors import RequestError
from ..runtime.loop import Containment
from .node import DeviceRun, Fault
from .transport import DistCommunicator


class _Listener:
    """Calls the user's on_token and remembers whether it asked to stop or raised (raised again at the end).
    It is also the peers of a device that is the whole group: nobody to hand off to or ask."""

    def __init__(self, on_token: TokenCallback | None) -> None:
        self.on_token, self.stopped = on_token, False
        self.error: BaseException | None = None

    def token(self, tid: int) -> bool:
        if self.on_token is not None and not self.stopped:
            try:
                self.stopped = bool(self.on_token(tid))
            except Exception as err:  # noqa: BLE001 - the protocol must finish before the error surfaces
                self.stopped, self.error = True, err
        return self.stopped

    def enter(self, index: int) -> list[list[Tensor]] | None:
        return None

    def ask(self, index: int, query: Tensor) -> list[list[Tensor]]:
        return []

    def finish(self, result: Generation) -> Generation:
        if self.stopped and result.stopped_by != "stop token":
            result.stopped_by = "stop"
        if self.error is not None:
            raise self.error
        return result


# --------------------------------------------------------------------------- rank 0
HOP = "hop"  # the ledger's stage for a new position's hidden row from pipeline stage to stage while decoding


def _idle(layout: StageLayout, mode: str) -> list[int]:
    """The workers with nothing to do while a generation decodes (they wait for the next header and must be
    kept awake): every stage's earlier devices, unless they answer queries (distributed)."""
    if mode == "distributed":
        return []
    return [r for st in layout.stages for r in st.ranks if r not in (0, st.last_rank)]


def run_generation(coord: Coordinator, req: Request, params: DecodeParams, prompt: Tensor,
                   on_token: TokenCallback | None, ping_every: float) -> Generation:
    """Rank 0: the prefill with every device, then the decode (here when rank 0 is the first stage's last
    device, else on that device)."""
    t0 = time.perf_counter()
    comm, world, layout = coord.comm, req.world, req.layout
    run = coord.start(req, keep_cache=True)
    workers = coord.worker_reports(req)  # before the parameters: a failed prefill is not decoded
    failures = coord.failures(run, workers)
    for p in range(1, world):
        sent = DecodeParams.abandoned() if failures else params
        comm.isend("control", p, [sent.encode()], wire.TAG_GENERATE, "decode parameters", count=False)
    if failures:
        comm.flush()
        coord.in_flight = False
        raise RequestError(failures, trace=run.trace)
    result = Generation(prompt_ids=prompt.cpu(), prefill_stats=coord.stats(run, workers, t0), mode=params.mode)
    listener = _Listener(on_token)
    assert run.executor is not None  # generation keeps every device's executor
    decoder = layout.stages[0].last_rank
    counters = [st.last_rank for st in layout.stages if st.last_rank != 0]  # who reports decode byte counts
    statuses = {p: comm.irecv(p, [wire.status_buffer()], wire.TAG_DECODE_STATUS, "decode status")
                for p in range(1, world)}
    idle = _idle(layout, params.mode) + coord.sitting_out(req)
    own: Containment
    if decoder == 0:  # rank 0 is the first stage (alone): it decodes, the later stages relay
        if world == 1:
            coord.in_flight = False
        hops = StageHops(comm, layout) if layout.staged else None
        own = Containment()
        pinging = _Pinging(coord, listener, idle, ping_every)
        with torch.inference_mode():
            own.attempt("while decoding", decode_loop, run.executor, pinging, params,
                        run.finals["logits"][:, -1], req.batch.valid.shape[1], result, False, None, hops)
        if hops is not None:
            hops.end()
            result.stage_bytes += comm.ledger.sent(HOP, 0)
        comm.flush()
    else:
        own = earlier = Earlier(run.executor, comm, decoder)
        if params.mode == "handoff":
            earlier.hand_off()
        _receive(coord, params, result, listener, ping_every, earlier if params.mode == "distributed" else None,
                 decoder, idle)
    for p in counters:
        counts = comm.recv("control", p, [wire.byte_counts_buffer()], wire.TAG_DECODE_BYTES,
                           "decode byte counts", count=False)[0].tolist()
        result.handoff_bytes += int(counts[0])
        result.decode_bytes += int(counts[1])
        result.stage_bytes += int(counts[2])
    failures = [(0, own.error)] if own.error else []
    for p, works in statuses.items():
        comm.wait_recv("control", p, works, "decode status", count=False)
        text = wire.unpack_text(works[0][1])
        failures += [(p, text)] if text else []
    coord.in_flight = False
    if failures:
        raise RequestError(failures, trace=own.trace)
    result.planned = coord.planned(req, result.prefill_stats)
    return listener.finish(result)


class _Pinging:
    """Rank 0 decoding itself: the listener's peers, keeping the idle workers awake between tokens."""

    def __init__(self, coord: Coordinator, listener: _Listener, idle: list[int], every: float) -> None:
        self.coord, self.listener, self.idle, self.every = coord, listener, idle, every
        self.pinged = time.monotonic()

    def token(self, tid: int) -> bool:
        if self.idle and time.monotonic() - self.pinged > self.every:
            self.coord.tell(wire.PING, self.idle, "heartbeat")
            self.pinged = time.monotonic()
        return self.listener.token(tid)

    def enter(self, index: int) -> list[list[Tensor]] | None:
        return None

    def ask(self, index: int, query: Tensor) -> list[list[Tensor]]:
        return []


def _receive(coord: Coordinator, params: DecodeParams, result: Generation, listener: _Listener, ping_every: float,
             serving: "Earlier | None", last: int, idle: list[int]) -> None:
    """Take the decoding device's (`last`) tokens until its end marker, answering its questions (and,
    distributed, its queries); keep the idle ones awake."""
    comm = coord.comm
    count, asked, pinged = 0, 0, time.monotonic()
    while True:
        tid = int(comm.recv("token", last, [wire.word_buffer()], wire.token_tag(count), "new token")[0])
        if tid == wire.END:
            break
        count += 1
        if not listener.stopped:  # tokens decoded after a stop are dropped
            result.new_ids.append(tid)
            listener.token(tid)
            if tid in params.stop_ids:
                result.stopped_by = "stop token"
        if params.continues(count, tid):
            comm.isend("control", last, [wire.word(0 if listener.stopped else 1)], wire.TAG_DECODE_CONTROL + asked,
                       "go on / stop", count=False)
            asked += 1
        if serving is not None:
            serving.serve_token(count - 1)
        elif idle and time.monotonic() - pinged > ping_every:  # the idle devices wait for their next header
            coord.tell(wire.PING, idle, "heartbeat")
            pinged = time.monotonic()
    comm.flush()


# --------------------------------------------------------------------------- the workers
def serve_generation(comm: DistCommunicator, run: DeviceRun, layout: StageLayout,
                     fault: Fault | None = None) -> Containment:
    """Any rank > 0 after a GENERATE prefill: take the decode parameters, play its part (its stage's decoding
    device, a later stage's relay, or an earlier device of its stage), report its status."""
    params = DecodeParams.decode(comm.recv("control", 0, [DecodeParams.buffer()], wire.TAG_GENERATE,
                                           "decode parameters", count=False)[0])
    assert run.executor is not None
    role: Containment
    if params.is_abandoned:  # a device failed in the prefill: rank 0 refused the request
        return Containment()
    st = layout.stage_of(comm.rank)
    if comm.rank == st.last_rank and st.index == 0:
        role = DistPeers(run.executor, comm, params, st, fault, StageHops(comm, layout) if layout.staged else None)
        role.decode(run.finals)
    elif comm.rank == st.last_rank:
        role = Relay(run.executor, comm, params, st, layout, fault)
        role.relay()
    else:
        role = Earlier(run.executor, comm, st.last_rank, fault)
        if params.mode == "handoff":
            role.hand_off()
        elif params.mode == "distributed":
            role.serve()
    comm.isend("control", 0, [wire.pack_text(role.error or "", wire.STATUS_CELLS)], wire.TAG_DECODE_STATUS,
               "decode status", count=False)
    comm.flush()
    return role


class Earlier(Containment):
    """An earlier device's part: its K/V handed off once, or its partial attention for every query.
    Rank 0 plays it too, from inside its token loop."""

    def __init__(self, dev: DeviceExecutor, comm: DistCommunicator, last: int, fault: Fault | None = None) -> None:
        """last: the global rank of this device's stage's decoding device."""
        super().__init__()
        self.dev, self.comm, self.last, self.fault = dev, comm, last, fault
        self.layers = dev.geo.layers  # every layer of the model: the tags count them all

    def hand_off(self) -> None:
        shapes = modes.handoff_shapes(self.dev.geo, self.dev.codec.wire, int(self.dev.shared_rows().sum()))
        for i in self.dev.layers:
            message = self.attempt(f"in layer {i}'s hand-off", self.dev.handoff_message, i)
            self.comm.isend("handoff", self.last, message or [torch.zeros(s, dtype=d) for s, d in shapes],
                            wire.handoff_tag(i), f"layer {i} hand-off")
        self.comm.flush()

    def _answer(self, i: int, q: Tensor) -> list[Tensor] | None:
        def answer() -> list[Tensor]:
            if self.fault is not None:
                self.fault.strike(i, "decode")
            return self.dev.answer(i, q)

        return self.attempt(f"answering layer {i}'s decode query", answer)

    def serve_token(self, t: int) -> bool:
        """Wait for the last device's word before token t's layers; answer each layer's query.  False: done."""
        follows = self.comm.recv("control", self.last, [wire.word_buffer()], wire.TAG_DECODE_WORD + t,
                                 "decode word", count=False)[0]
        if int(follows) == 0:
            return False
        shapes = modes.partial_shapes(self.dev.geo, self.dev.codec.wire)
        with torch.inference_mode():
            for i in self.dev.layers:
                q = self.comm.recv("decode", self.last, [torch.empty(shapes[0][0], dtype=shapes[0][1])],
                                   wire.query_tag(t, i, self.layers), f"layer {i} query")[0]
                answer = self._answer(i, q) or [torch.zeros(s, dtype=d) for s, d in shapes]
                self.comm.isend("decode", self.last, answer, wire.answer_tag(t, i, self.layers),
                                f"layer {i} partial attention")
        self.comm.flush()
        return True

    def serve(self) -> None:
        t = 0
        while self.serve_token(t):
            t += 1


class DistPeers(Containment):
    """The last device's peers over torch.distributed: streams token ids to rank 0 and asks it every CHUNK
    tokens whether to go on; takes the hand-off layer by layer; sends the earlier devices each query."""

    def __init__(self, dev: DeviceExecutor, comm: DistCommunicator, params: DecodeParams, stage: Stage,
                 fault: Fault | None = None, hops: "StageHops | None" = None) -> None:
        """stage: this device's (it is the stage's last device); hops: the later pipeline stages, if any."""
        super().__init__()
        self.dev, self.comm, self.params, self.fault, self.hops = dev, comm, params, fault, hops
        self.earlier = range(stage.first_rank, stage.last_rank)
        self.sent = self.asked = 0
        self.told = False  # distributed: the earlier devices heard that no more layers follow
        self.open: int | None = None  # distributed: the next layer of the current token still to exchange
        self.pending: dict[int, list] = {}
        if params.mode == "handoff" and self.earlier:  # posted now, waited for layer by layer in the first token's forward
            first = stage.first_rank
            rows = [int(modes.shared_mask(dev.plan, dev.request_positions, p - first).sum()) for p in self.earlier]
            shapes = [modes.handoff_shapes(dev.geo, dev.codec.wire, r) for r in rows]
            self.pending = {i: [comm.irecv(p, [torch.empty(s, dtype=d) for s, d in shapes[p - first]],
                                           wire.handoff_tag(i), f"layer {i} hand-off") for p in self.earlier]
                            for i in dev.layers}

    def decode(self, finals: dict[str, Tensor]) -> None:
        """The whole decode on this device, then the end marker and the byte counts to rank 0."""
        with torch.inference_mode():
            self.attempt("while decoding", decode_loop, self.dev, self, self.params, finals["logits"][:, -1],
                         self.dev.request_positions.shape[1], Generation(prompt_ids=torch.zeros(1, 0, dtype=torch.long)),
                         False, None, self.hops)
        if self.error is not None:  # finish what the peers wait for, end early
            self._settle()
        if self.hops is not None:
            self.hops.end()
        if self.params.mode == "distributed" and not self.told:  # ranks 1.. wait for the next token's word; rank 0
            for p in self.earlier[1:]:  # learns of the end from the end marker
                self.comm.isend("control", p, [wire.word(0)], wire.TAG_DECODE_WORD + self.sent, "decode word",
                                count=False)
        self.comm.isend("token", 0, [wire.word(wire.END)], wire.token_tag(self.sent), "end of generation")
        ledger, me = self.comm.ledger, self.comm.rank
        counts = wire.byte_counts(ledger.received("handoff", me), ledger.sent("decode", me) + ledger.received("decode", me),
                                  ledger.sent(HOP, me))
        self.comm.isend("control", 0, [counts], wire.TAG_DECODE_BYTES, "decode byte counts", count=False)
        self.comm.flush()

    def _settle(self) -> None:
        """After a failure: take the hand-off still in flight and finish the current token's exchanges with
        zero queries, so that every earlier device is where the end of the generation expects it."""
        for index in sorted(self.pending):
            for p, works in zip(self.earlier, self.pending.pop(index)):
                self.comm.wait_recv("handoff", p, works, f"layer {index} hand-off")
        if self.params.mode == "distributed" and self.open is not None:
            shapes = modes.partial_shapes(self.dev.geo, self.dev.codec.wire)
            for i in range(self.open, self.dev.layers.stop):
                self._exchange(i, torch.zeros(shapes[0][0], dtype=shapes[0][1]))

    def token(self, tid: int) -> bool:
        self.comm.isend("token", 0, [wire.word(tid)], wire.token_tag(self.sent), "new token")
        self.sent += 1
        stopped = False
        if self.params.continues(self.sent, tid):
            answer = self.comm.recv("control", 0, [wire.word_buffer()], wire.TAG_DECODE_CONTROL + self.asked,
                                    "go on / stop", count=False)[0]
            self.asked += 1
            stopped = int(answer) == 0
        if self.params.mode == "distributed":  # the earlier devices learn whether this token's layers follow
            follows = not stopped and tid not in self.params.stop_ids and self.sent < self.params.max_new_tokens
            for p in self.earlier:
                self.comm.isend("control", p, [wire.word(int(follows))], wire.TAG_DECODE_WORD + self.sent - 1,
                                "decode word", count=False)
            self.told = not follows
            self.open = self.dev.layers.start if follows else None
        return stopped

    def enter(self, index: int) -> list[list[Tensor]] | None:
        if self.fault is not None:
            self.fault.strike(index, "decode")
        if index not in self.pending:
            return None
        messages = []
        for p, works in zip(self.earlier, self.pending.pop(index)):
            self.comm.wait_recv("handoff", p, works, f"layer {index} hand-off")
            messages.append([buf for _, buf in works])
        return messages

    def ask(self, index: int, query: Tensor) -> list[list[Tensor]]:
        return list(self._exchange(index, query).values())

    def _exchange(self, index: int, query: Tensor) -> dict[int, list[Tensor]]:
        """Layer `index` of the current token: the query to every earlier device, their partial attentions back."""
        token, layers = self.sent - 1, self.dev.geo.layers
        shapes = modes.partial_shapes(self.dev.geo, self.dev.codec.wire)
        posted = {p: self.comm.irecv(p, [torch.empty(s, dtype=d) for s, d in shapes], wire.answer_tag(token, index, layers),
                                     f"layer {index} partial attention") for p in self.earlier}
        for p in self.earlier:
            self.comm.isend("decode", p, [query], wire.query_tag(token, index, layers), f"layer {index} query")
        out = {}
        for p, works in posted.items():
            self.comm.wait_recv("decode", p, works, f"layer {index} partial attention")
            out[p] = [buf for _, buf in works]
        self.open = index + 1 if index + 1 < self.dev.layers.stop else None
        return out


class StageHops:
    """The first stage's decoding device, with later pipeline stages: each new position's id and hidden row to
    the next stage's decoding device, its row back from the last stage's (the ring); the end marker at the end."""

    def __init__(self, comm: DistCommunicator, layout: StageLayout) -> None:
        self.comm, self.layout = comm, layout
        self.next, self.back = layout.stages[1].last_rank, layout.stages[-1].last_rank
        self.hops = 0
        self.wait_s = comm.timeout * len(layout.stages)  # the whole pipeline runs before the row comes back

    def __call__(self, x: Tensor, positions: Tensor) -> Tensor:
        tag = wire.TAG_STAGE_HOP + 2 * self.hops
        self.comm.isend(HOP, self.next, [wire.word(int(positions.reshape(-1)[0])), x.detach().reshape(-1)], tag,
                        "a new position's row to the next stage")
        back = self.comm.recv(HOP, self.back, [torch.empty(x.shape[-1], dtype=x.dtype)], tag,
                              "a new position's row back from the last stage", timeout=self.wait_s)[0]
        self.hops += 1
        return back.view_as(x).to(x.device)

    def end(self) -> None:
        self.comm.isend("control", self.next, [wire.word(wire.END)], wire.TAG_STAGE_HOP + 2 * self.hops,
                        "end of generation", count=False)
        self.comm.flush()


class Relay(DistPeers):
    """A later pipeline stage's decoding device (its last): takes each new position's row from the previous stage,
    runs its stage's layers on it (its earlier devices as the decode mode says) and hands it on — to the next
    stage, or from the last stage back to the first.  Ends at the end marker."""

    def __init__(self, dev: DeviceExecutor, comm: DistCommunicator, params: DecodeParams, stage: Stage,
                 layout: StageLayout, fault: Fault | None = None) -> None:
        super().__init__(dev, comm, params, stage, fault)
        self.prev = layout.stages[stage.index - 1].last_rank
        self.next = layout.next_stage(stage).last_rank
        self.to_first = stage.index == len(layout.stages) - 1
        self.wait_s = comm.timeout * len(layout.stages)
        self.dtype = first_held(dev.adapter.model).dtype

    def relay(self) -> None:
        width, distributed = self.dev.geo.hidden, self.params.mode == "distributed"
        t = 0
        while True:
            tag = wire.TAG_STAGE_HOP + 2 * t
            pos = int(self.comm.recv(HOP, self.prev, [wire.word_buffer()], tag, "a new position from the previous "
                                     "stage", timeout=self.wait_s)[0])
            if pos == wire.END:
                break
            x = self.comm.recv(HOP, self.prev, [torch.empty(width, dtype=self.dtype)], tag + 1,
                               "a new position's row from the previous stage")[0].view(1, 1, width)
            self.sent = t + 1  # the token the query tags count
            if distributed:
                for p in self.earlier:
                    self.comm.isend("control", p, [wire.word(1)], wire.TAG_DECODE_WORD + t, "decode word", count=False)
                self.open = self.dev.layers.start
            with torch.inference_mode():
                out = self.attempt("while decoding", through_layers, self.dev, self, x, torch.tensor([[pos]]),
                                   self.ask if distributed else None)
            if out is None:  # failed (now or before): finish the token's exchanges, hand on zeros
                self._settle()
                out = torch.zeros(1, 1, width, dtype=self.dtype)
            row = out.detach().reshape(-1).cpu()
            self.comm.isend(HOP, self.next, [row] if self.to_first else [wire.word(pos), row], tag,
                            "a new position's row to the next stage")
            t += 1
        if not self.to_first:
            self.comm.isend("control", self.next, [wire.word(wire.END)], wire.TAG_STAGE_HOP + 2 * t,
                            "end of generation", count=False)
        if distributed:
            for p in self.earlier:
                self.comm.isend("control", p, [wire.word(0)], wire.TAG_DECODE_WORD + t, "decode word", count=False)
        self.open = None
        self._settle()  # a hand-off no token took
        ledger, me = self.comm.ledger, self.comm.rank
        counts = wire.byte_counts(ledger.received("handoff", me), ledger.sent("decode", me) + ledger.received("decode", me),
                                  ledger.sent(HOP, me))
        self.comm.isend("control", 0, [counts], wire.TAG_DECODE_BYTES, "decode byte counts", count=False)
        self.comm.flush()
