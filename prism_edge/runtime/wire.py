"""Every format that crosses a process boundary, in one place (the per-layer rows themselves: message.py).

Every message is a plain tensor of a known dtype and shape; nothing is pickled.  Each travels with a tag
(the j-th tensor of a message with tag + j).  A request:

  header     (18,) int64    op, request number, shapes, output mode, input keys, budget, the plan's devices
                            and scheme                                     -- rank 0 -> every device taking part
  meta, positions, inputs   (below)                                            -- rank 0 -> devices
  layer i    (rows, width)  per route: message.py                              -- device -> device
  outputs    what the output mode needs                                        -- devices -> rank 0
  report     a DeviceReport as one int64 tensor                                -- devices -> rank 0

A generation adds, after the prefill's reports: the decode parameters (float64, rank 0 -> every device),
each new token id (int64, last device -> rank 0), a go-on/stop word every CHUNK tokens (rank 0 -> last),
the hand-off (earlier devices -> last, once) or a query and partial attention per layer per token
(distributed; a word per token tells the earlier devices whether layers follow), then the last device's
byte counts and every worker's status (a line of text, "" when all went well).

A header announces a request's shapes, then rank 0 sends each device only what it needs:

  meta       (B, N) uint8   bit 0: real position, bit 1: attention sink    -- every device, to plan
  positions  (B, N) int64   only when they are not the HF default 0..N-1    -- every device
  inputs     (rows, ...)    the device's own real rows of each per-position input (token ids as
                            int32, image patches as float32)                 -- that device only

and each device sends back only what the request's output mode needs.  The simulator counts the
same tensors, so the two ledgers agree byte for byte.

At start-up, rank 0 may send a worker the weights of its stage (cluster/weights.py, tags TAG_WEIGHTS...):
the manifest's length (int64) and the manifest (uint8 JSON), the worker's answer (int64: cached or not), the
tensors' bytes as uint8 pieces, and the worker's status (a line of text).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.base import Batch
from ..partition.plan import Plan
from .modes import DECODE_MODES, OUTPUT_MODES
from .sampling import Sampling
from .stats import DeviceReport

HEADER_LEN = 18
MAGIC = 0x5052534D  # "PRSM": a desynchronised or foreign peer fails loudly, not silently
PING, FORWARD, SHUTDOWN, GENERATE, PROBE = 1, 2, 3, 4, 5  # GENERATE: a FORWARD (prefill), then the last device decodes;
# PROBE: every device re-runs the start-up probes (cluster/probes.py)
PLAN_SCHEMES = ("prism", "voltage", "full")  # a header's scheme code - 1 (0: the config's)
INPUT_KEYS = ("input_ids", "token_type_ids", "patches")  # position in this tuple is the wire code
MAX_KEYS = 3


@dataclass(frozen=True)
class Header:
    op: int
    request: int = 0
    batch: int = 0
    length: int = 0
    custom_positions: bool = False
    mode: str = "all"
    keys: tuple[tuple[str, int], ...] = ()  # (input name, values per position; 0 = one scalar)
    budget_ppm: int = 0  # the request's own byte budget in millionths of Voltage's bytes (0: the config's)
    devices: int = 0  # the request runs on ranks 0..devices-1 (0: every device); the others sit it out
    scheme: str = ""  # the request's scheme ("": the config's)

    @property
    def budget(self) -> float | None:
        return self.budget_ppm / 1e6 if self.budget_ppm else None

    def encode(self) -> Tensor:
        t = torch.zeros(HEADER_LEN, dtype=torch.int64)
        t[:7] = torch.tensor([MAGIC, self.op, self.request, self.batch, self.length, int(self.custom_positions),
                              OUTPUT_MODES.index(self.mode)])
        t[7] = len(self.keys)
        for i, (name, width) in enumerate(self.keys):
            t[8 + 2 * i], t[9 + 2 * i] = INPUT_KEYS.index(name), width
        t[8 + 2 * MAX_KEYS] = self.budget_ppm
        t[9 + 2 * MAX_KEYS] = self.devices
        t[10 + 2 * MAX_KEYS] = PLAN_SCHEMES.index(self.scheme) + 1 if self.scheme else 0
        return t

    @classmethod
    def decode(cls, t: Tensor) -> "Header":
        v = t.tolist()
        if v[0] != MAGIC:
            raise RuntimeError(f"received a malformed request header (magic {v[0]:#x}); the ranks are out of step")
        keys = tuple((INPUT_KEYS[v[8 + 2 * i]], v[9 + 2 * i]) for i in range(v[7]))
        scheme = v[10 + 2 * MAX_KEYS]
        return cls(v[1], v[2], v[3], v[4], bool(v[5]), OUTPUT_MODES[v[6]], keys, v[8 + 2 * MAX_KEYS],
                   v[9 + 2 * MAX_KEYS], PLAN_SCHEMES[scheme - 1] if scheme else "")


def empty_header() -> Tensor:
    return torch.zeros(HEADER_LEN, dtype=torch.int64)


def _default_positions(batch: int, length: int) -> Tensor:
    return torch.arange(length).expand(batch, -1)


def budget_ppm(budget: float | None) -> int:
    """A request's budget as the header carries it (millionths, at least one; 0: none given)."""
    return 0 if budget is None else max(1, round(budget * 1e6))


def request_header(batch: Batch, request: int, mode: str) -> Header:
    if mode not in OUTPUT_MODES:
        raise ValueError(f"unknown output mode {mode!r}; choose one of {', '.join(OUTPUT_MODES)}")
    unknown = set(batch.per_position) - set(INPUT_KEYS)
    if unknown:
        raise ValueError(f"the runtime cannot ship inputs {sorted(unknown)}; supported: {', '.join(INPUT_KEYS)}")
    B, N = batch.valid.shape
    custom = not torch.equal(batch.positions.cpu(), _default_positions(B, N))
    keys = tuple((k, int(t.shape[2]) if t.dim() == 3 else 0) for k, t in sorted(batch.per_position.items()))
    return Header(FORWARD, request, B, N, custom, mode, keys)


def meta_tensors(batch: Batch, header: Header) -> list[Tensor]:
    """What every device needs to derive the plan (and positions, when not the default)."""
    meta = (batch.valid.to(torch.uint8) | (batch.sink.to(torch.uint8) << 1)).cpu()
    return [meta, batch.positions.cpu().contiguous()] if header.custom_positions else [meta]


def meta_buffers(header: Header) -> list[Tensor]:
    shape = (header.batch, header.length)
    meta = [torch.empty(shape, dtype=torch.uint8)]
    return meta + [torch.empty(shape, dtype=torch.int64)] if header.custom_positions else meta


def batch_from_meta(header: Header, received: list[Tensor]) -> Batch:
    """The request as a device that holds no inputs sees it: enough to plan and to place its rows."""
    meta = received[0]
    positions = received[1] if header.custom_positions else _default_positions(header.batch, header.length)
    return Batch(valid=(meta & 1).bool(), positions=positions, sink=(meta & 2).bool())


def input_tensors(batch: Batch, plan: Plan, rank: int) -> list[Tensor]:
    """Device `rank`'s own real rows of every per-position input, in header key order."""
    sl = plan.devices[rank]
    local = batch.gather(sl.index.to(batch.valid.device))
    out = []
    for name in sorted(batch.per_position):
        rows = local[name][sl.valid.to(local[name].device)].cpu()
        out.append(rows.to(torch.int32) if not rows.is_floating_point() else rows.contiguous())
    return out


def input_buffers(header: Header, plan: Plan, rank: int) -> list[Tensor]:
    rows = int(plan.devices[rank].valid.sum())
    out = []
    for name, width in header.keys:
        shape = (rows, width) if width else (rows,)
        out.append(torch.empty(shape, dtype=torch.float32 if name == "patches" else torch.int32))
    return out


def local_inputs(header: Header, batch: Batch, plan: Plan, rank: int, rows: list[Tensor]) -> dict[str, Tensor]:
    """Rebuild the (B, n, ...) local inputs a device embeds from its received real rows."""
    sl = plan.devices[rank]
    B, n = sl.index.shape
    local = {}
    for (name, width), r in zip(header.keys, rows):
        full = r.new_zeros((B, n, width) if width else (B, n))
        full[sl.valid] = r
        local[name] = full.long() if not full.is_floating_point() else full
    local["positions"] = torch.gather(batch.positions, 1, sl.index)
    return local


# ---------------------------------------------------------------------------------------- outputs
def output_tensors(finals: dict[str, Tensor], plan: Plan, rank: int, mode: str) -> list[Tensor]:
    """What device `rank` returns to the coordinator for `mode`, in sorted output-name order.

    all: its real rows of every output; last: each sequence's last real row (only the last device
    holds those); mean: per-sequence sums over its real rows; pooled: nothing (the pooler reads
    position 0, which lives on rank 0).
    """
    sl = plan.devices[rank]
    if not finals:  # outputs `last`: only the last device runs the head
        return []
    valid = sl.owned.to(next(iter(finals.values())).device)  # anchor copies are answered by their owner
    out = []
    for name in sorted(finals):
        t = finals[name]
        if mode == "all":
            out.append(t[valid])
        elif mode == "last" and rank == plan.world - 1:
            if t.shape[1] == sl.rows:  # every row's outputs (a device that failed sends zeros of this shape)
                t = t[torch.arange(t.shape[0], device=t.device), last_rows(plan, rank).to(t.device)]
            else:  # the head ran on the last rows only (B, 1, ...)
                t = t[:, 0]
            out.append(t)
        elif mode == "mean":
            out.append((t * valid.unsqueeze(-1).to(t.dtype)).sum(1))
    return [o.detach().cpu().contiguous() for o in out]


def last_rows(plan: Plan, rank: int) -> Tensor:
    """(B,) each sequence's last real row on device `rank` (owned rows come after any anchor copies): for
    outputs `last`, the only rows of the last device whose outputs are returned."""
    return plan.devices[rank].valid.sum(1) - 1


Layout = dict[str, tuple[int, torch.dtype]]  # output name -> (width, dtype): cluster.node.output_layout


def zero_finals(layout: Layout, plan: Plan, rank: int) -> dict[str, Tensor]:
    """Device `rank`'s outputs as zeros, (B, n, width) each: what a device that failed inside the request
    sends back, so that the request's exchange stays complete (rank 0 refuses the request)."""
    B, n = plan.devices[rank].index.shape
    return {name: torch.zeros(B, n, width, dtype=dtype) for name, (width, dtype) in layout.items()}


def output_buffers(layout: Layout, plan: Plan, rank: int, mode: str) -> list[Tensor]:
    B = plan.devices[0].index.shape[0]
    rows = {"all": int(plan.devices[rank].owned.sum()), "mean": B,
            "last": B if rank == plan.world - 1 else 0, "pooled": 0}[mode]
    if rows == 0:
        return []
    return [torch.empty(rows, layout[name][0], dtype=layout[name][1]) for name in sorted(layout)]


def assemble(parts: list[list[Tensor]], names: list[str], plan: Plan, mode: str, length: int) -> dict[str, Tensor]:
    """Rank 0 puts every device's returned tensors back together: (B, N, w), or (B, 1, w) for last/mean."""
    B = plan.devices[0].index.shape[0]
    out = {}
    for i, name in enumerate(sorted(names)):
        if mode == "all":
            width = parts[0][i].shape[-1]
            full = parts[0][i].new_zeros(B * length, width)
            for p, sl in enumerate(plan.devices):
                flat = (sl.index + torch.arange(B).unsqueeze(1) * length)[sl.owned]
                full[flat] = parts[p][i]
            out[name] = full.view(B, length, width)
        elif mode == "last":
            out[name] = parts[plan.world - 1][i].unsqueeze(1)
        elif mode == "mean":
            count = torch.stack([sl.owned.sum(1) for sl in plan.devices]).sum(0).clamp(min=1)  # (B,)
            total = torch.stack([part[i] for part in parts]).sum(0)  # (B, w)
            out[name] = (total / count.unsqueeze(-1).to(total.dtype)).unsqueeze(1)
    return out


# ---------------------------------------------------------------------------------------- tags
TAG_HEADER, TAG_META, TAG_INPUT, TAG_OUTPUT, TAG_STATS = 32, 64, 96, 128, 160
TAG_STAGE_ROWS = 192  # a request's hidden rows from a device of one pipeline stage to one of the next (or the first)
TAG_STAGE_HOP = 1 << 25  # generation: new position t's [position, hidden row] to the next stage's decoder, tag + 2t
TAG_LAYER = 256  # tensor j of layer i's message travels with tag TAG_LAYER + LAYER_TAGS * i + j
LAYER_TAGS = 4  # tensors per layer message at most: rows, int8 scales, group sizes (one spare)
TAG_GENERATE = 1 << 20  # decode parameters to every device; new token t comes back with tag + 1 + t
TAG_DECODE_CONTROL = 3 << 19  # rank 0 -> last device: go on / stop, the c-th time with tag + c
TAG_HANDOFF = 1 << 22  # earlier device -> last: layer i's K/V with tag + LAYER_TAGS * i + j
TAG_DECODE_WORD = 5 << 20  # last -> earlier devices, before token t's layers: 1 (they follow) or 0 (done), tag + t
TAG_DECODE_BYTES = 7 << 20  # last -> rank 0 at the end: hand-off and decode bytes it exchanged
TAG_DECODE_STATUS = (7 << 20) + 16  # every worker -> rank 0 at the end of a generation: "" or what failed
TAG_DECODE_QUERY = 1 << 23  # last -> earlier device: token t's query of layer i, tag + 4 * (t * layers + i)
TAG_DECODE_ANSWER = 1 << 24  # earlier device -> last: its partial attention for it, tag + 4 * (t * layers + i) + j
# Start-up weight transfer (cluster/weights.py), rank 0 <-> one worker, before any request.  Far above every
# range above (the decode answers would need 2^28 token-layers to reach it) and below gloo's int32 limit.
TAG_WEIGHTS = 1 << 30  # manifest length (int64), then the manifest (uint8 JSON) with tag + 1
TAG_WEIGHTS_ANSWER = TAG_WEIGHTS + 2  # worker -> rank 0: 1 cached, 0 send them, -1 refused
TAG_WEIGHTS_STATUS = TAG_WEIGHTS + 3  # worker -> rank 0 after the data or a refusal: "" or what failed
TAG_WEIGHTS_DATA = TAG_WEIGHTS + 16  # piece k of the tensor data (chunks of at most 16 MiB) with tag + k


def layer_tag(index: int) -> int:
    return TAG_LAYER + LAYER_TAGS * index


def handoff_tag(index: int) -> int:
    return TAG_HANDOFF + LAYER_TAGS * index


def token_tag(count: int) -> int:
    """The count-th new token (0-based) from the last device to rank 0, and the end marker after the last."""
    return TAG_GENERATE + 1 + count


def query_tag(token: int, index: int, layers: int) -> int:
    return TAG_DECODE_QUERY + 4 * (token * layers + index)


def answer_tag(token: int, index: int, layers: int) -> int:
    return TAG_DECODE_ANSWER + 4 * (token * layers + index)


# ---------------------------------------------------------------------------------------- words and text
TOKEN_ID_BYTES = 8  # an int64 token id from the last device to the coordinator
END = -1  # the token id that ends a generation's stream


def word(value: int) -> Tensor:
    """A one-value int64 message: a token id, a go-on/stop or follow/done word."""
    return torch.tensor([value], dtype=torch.int64)


def word_buffer() -> Tensor:
    return torch.zeros(1, dtype=torch.int64)


def pack_text(text: str, cells: int) -> Tensor:
    """One line of text as `cells` int64 values (UTF-8, zero-padded, cut to fit: 8 bytes a cell)."""
    data = text.encode("utf-8", errors="replace")[: cells * 8]
    buf = bytearray(cells * 8)
    buf[: len(data)] = data
    return torch.frombuffer(buf, dtype=torch.int64).clone()


def unpack_text(t: Tensor) -> str:
    """The text `pack_text` packed (a character cut in half at the end is dropped)."""
    raw = t.contiguous().view(torch.uint8).numpy().tobytes().rstrip(b"\0")
    return raw.decode("utf-8", errors="ignore")


STATUS_CELLS = 80  # a worker's end-of-generation status: 640 bytes of text ("" when all went well)


def status_buffer() -> Tensor:
    return torch.zeros(STATUS_CELLS, dtype=torch.int64)


# ---------------------------------------------------------------------------------------- decode parameters
MAX_STOPS = 8
PARAMS = 10 + MAX_STOPS  # [max_new, do_sample, temperature, top_k, top_p, seed high, seed low, stops, mode, -, ids]
ABANDONED = -1  # max_new_tokens in the parameters of a request whose prefill failed somewhere: nobody decodes
CHUNK = 4  # tokens between the last device's "go on?" questions: bounds decoding past a stop, costs a round trip


@dataclass(frozen=True)
class DecodeParams:
    """What rank 0 sends every device after a generation's prefill: how to decode, and in which mode."""

    max_new_tokens: int
    sampling: Sampling
    stop_ids: tuple[int, ...] = ()
    mode: str = "local"

    def __post_init__(self) -> None:
        if len(self.stop_ids) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop token ids, got {len(self.stop_ids)}")
        if self.mode not in DECODE_MODES[1:]:
            raise ValueError(f"decode mode {self.mode!r} is not one a device runs; choose by decode.choose first")

    @classmethod
    def abandoned(cls) -> "DecodeParams":
        return cls(ABANDONED, Sampling())

    @property
    def is_abandoned(self) -> bool:
        return self.max_new_tokens == ABANDONED

    def continues(self, count: int, tid: int) -> bool:
        """Whether the last device asks rank 0 before its next token: both ends evaluate this the same way."""
        return count % CHUNK == 0 and count < self.max_new_tokens and tid not in self.stop_ids

    def encode(self) -> Tensor:
        """One float64 tensor; the seed travels as two 32-bit halves, which float64 holds exactly."""
        s = self.sampling
        seed = s.seed
        t = torch.zeros(PARAMS, dtype=torch.float64)
        t[:10] = torch.tensor([self.max_new_tokens, float(s.do_sample), s.temperature, s.top_k, s.top_p,
                               -1 if seed is None else seed >> 32, 0 if seed is None else seed & 0xFFFFFFFF,
                               len(self.stop_ids), DECODE_MODES.index(self.mode), 0], dtype=torch.float64)
        t[10 : 10 + len(self.stop_ids)] = torch.tensor(self.stop_ids, dtype=torch.float64)
        return t

    @classmethod
    def decode(cls, t: Tensor) -> "DecodeParams":
        v = t.tolist()
        seed = None if v[5] < 0 else (int(v[5]) << 32) | int(v[6])
        stops = tuple(int(x) for x in v[10 : 10 + int(v[7])])
        return cls(int(v[0]), Sampling(bool(v[1]), v[2], int(v[3]), v[4], seed), stops, DECODE_MODES[int(v[8])])

    @staticmethod
    def buffer() -> Tensor:
        return torch.zeros(PARAMS, dtype=torch.float64)


def byte_counts(handoff: int, decode: int, hops: int = 0) -> Tensor:
    """A decoding device's hand-off and decode bytes and the stage hops it sent, for rank 0 at the end of a
    generation (every stage's decoding device sends its own)."""
    return torch.tensor([handoff, decode, hops], dtype=torch.int64)


def byte_counts_buffer() -> Tensor:
    return torch.zeros(3, dtype=torch.int64)


# ---------------------------------------------------------------------------------------- the device report
ERROR_ROWS = 16  # rows of a report that carry its error text: 16 x 5 cells x 8 bytes = 640 bytes
REPORT_COLUMNS = 5  # layer rows: sent, received, flops, compute ns, wait ns; totals: input, output, flops, cpu ns, rss
# then a row of the pipeline stages': stage hand-off bytes sent, received, parameter bytes held, -, -


def report_buffer(layers: int) -> Tensor:
    """An empty tensor of a report's wire shape, (layers + 2 + ERROR_ROWS, REPORT_COLUMNS): a row per layer,
    two totals rows, then the error text.  Times travel in nanoseconds; a FLOP count of -1 means "not counted"."""
    return torch.zeros(layers + 2 + ERROR_ROWS, REPORT_COLUMNS, dtype=torch.int64)


def report_tensor(r: DeviceReport) -> Tensor:
    layers = len(r.sent)
    t = report_buffer(layers)
    flops = r.layer_flops if r.layer_flops is not None else (-1,) * layers
    for i in range(layers):
        t[i] = torch.tensor([r.sent[i], r.received[i], flops[i], round(r.compute_s[i] * 1e9), round(r.wait_s[i] * 1e9)])
    t[layers] = torch.tensor([r.input_bytes, r.output_bytes, -1 if r.flops is None else r.flops,
                              round(r.cpu_s * 1e9), r.peak_rss_kib])
    t[layers + 1] = torch.tensor([r.stage_sent, r.stage_received, r.param_bytes, 0, 0])
    t[layers + 2:] = pack_text(r.error, ERROR_ROWS * REPORT_COLUMNS).view(ERROR_ROWS, REPORT_COLUMNS)
    return t


def report_from(t: Tensor) -> DeviceReport:
    rows = t[:-ERROR_ROWS].tolist()
    layers, total, staged = rows[:-2], rows[-2], rows[-1]
    counted = total[2] >= 0
    return DeviceReport(
        sent=tuple(r[0] for r in layers), received=tuple(r[1] for r in layers),
        layer_flops=tuple(r[2] for r in layers) if counted else None,
        compute_s=tuple(r[3] * 1e-9 for r in layers), wait_s=tuple(r[4] * 1e-9 for r in layers),
        input_bytes=total[0], output_bytes=total[1], flops=total[2] if counted else None,
        cpu_s=total[3] * 1e-9, peak_rss_kib=total[4], error=unpack_text(t[-ERROR_ROWS:]),
        stage_sent=staged[0], stage_received=staged[1], param_bytes=staged[2],
    )
