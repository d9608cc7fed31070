"""Rank 0 sends a worker exactly the tensors of its stage, once; the worker verifies and caches them.

A worker may start without the model's files.  Rank 0 (which has them) describes the tensors the worker
needs in a manifest: the model's config.json text and, per tensor, its name, shape, dtype, byte size and
the sha256 of its bytes, plus a digest over all of it.  The worker looks for that digest in its cache
(`cache_dir/weights/<digest>/`: model.safetensors, config.json, manifest.json); a cached copy is verified
tensor by tensor and used (0 bytes of tensor data cross the link), a corrupt one is discarded and fetched
again.  Otherwise rank 0 sends the tensors' bytes in pieces of at most CHUNK_BYTES, the worker checks every
sha256, tells rank 0 the outcome and writes the cache atomically (a temporary folder, then a rename).

On the wire (tags in runtime/wire.py; every tensor counted in the communicator's ledger under "weights"):

  rank 0 -> worker   manifest length (1,) int64                      TAG_WEIGHTS
  rank 0 -> worker   manifest (length,) uint8: JSON, no pickle        TAG_WEIGHTS + 1
  worker -> rank 0   answer (1,) int64: 1 cached, 0 send, -1 refused  TAG_WEIGHTS_ANSWER
  rank 0 -> worker   piece k of the tensor bytes, uint8               TAG_WEIGHTS_DATA + k   (answer 0)
  worker -> rank 0   status: a line of text, "" when all is well     TAG_WEIGHTS_STATUS     (answer 0 or -1)

The manifest comes from the network: its size is bounded (MAX_MANIFEST_BYTES) and every field is checked
before anything is allocated or a path is built from it (the digest, a folder name, is recomputed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..runtime import wire
from ..runtime.wire import TAG_WEIGHTS, TAG_WEIGHTS_ANSWER, TAG_WEIGHTS_DATA, TAG_WEIGHTS_STATUS
from .transport import DistCommunicator

STAGE = "weights"  # the ledger's stage name for every tensor of a transfer
FORMAT = 1  # the manifest's format: a worker refuses any other
CHUNK_BYTES = 16 << 20  # a tensor's bytes travel in pieces of at most this (the progress bar advances per piece)
MAX_CHUNK_BYTES = 1 << 30
MAX_MANIFEST_BYTES = 64 << 20
PROGRESS_BYTES = 32 << 20  # rank 0 shows a progress bar (on a terminal) for transfers at least this big
CACHED, SEND, REFUSED = 1, 0, -1  # the worker's answer to a manifest
WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE = "model.safetensors", "config.json", "manifest.json"

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class ManifestError(ValueError):
    """A weights manifest that cannot be used: too big, not JSON, a field missing or wrong, a digest that differs."""


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"cannot transfer tensors of dtype {dtype}; supported: {', '.join(DTYPES)}")
    return DTYPE_NAMES[dtype]


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ManifestError(f"unknown dtype {name!r} in the weights manifest; supported: {', '.join(DTYPES)}")
    return DTYPES[name]


def tensor_bytes(t: Tensor) -> Tensor:
    """A tensor's bytes as a flat uint8 tensor on the CPU (a view when it already is contiguous there)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def sha256_of(t: Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t).numpy().data).hexdigest()


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


@dataclass(frozen=True)
class Entry:
    """One tensor of a manifest."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    sha256: str

    @classmethod
    def of(cls, name: str, t: Tensor) -> "Entry":
        return cls(name, tuple(t.shape), dtype_name(t.dtype), t.numel() * t.element_size(), sha256_of(t))

    def as_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "bytes": self.nbytes,
                "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    """What rank 0 offers: the config text and every tensor (sorted by name), and the digest over both."""

    config_json: str
    entries: tuple[Entry, ...]

    @classmethod
    def build(cls, config_json: str, tensors: dict[str, Tensor]) -> "Manifest":
        return cls(config_json, tuple(Entry.of(name, tensors[name]) for name in sorted(tensors)))

    def body(self) -> dict:
        return {"format": FORMAT, "config": self.config_json, "tensors": [e.as_json() for e in self.entries]}

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(_canonical(self.body())).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def encode(self, chunk: int = CHUNK_BYTES) -> bytes:
        """The wire document: the body, its digest and the piece size the data will travel in."""
        return _canonical({"digest": self.digest, "chunk": chunk, "manifest": self.body()})

    def pieces(self, chunk: int) -> list[tuple[int, int, int]]:
        """(entry index, first byte, end byte) of every piece, in sending order; empty tensors have none."""
        return [(i, start, min(start + chunk, e.nbytes)) for i, e in enumerate(self.entries)
                for start in range(0, e.nbytes, chunk)]

    @classmethod
    def decode(cls, raw: bytes) -> tuple["Manifest", int]:
        """A manifest from the network, every field checked, and its piece size; ManifestError if anything is off."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"weights manifest of {len(raw)} bytes refused (at most {MAX_MANIFEST_BYTES})")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ManifestError(f"malformed weights manifest (not JSON: {err})") from None
        doc = _need(doc, dict, "the manifest document")
        body = _need(doc.get("manifest"), dict, "'manifest'")
        if body.get("format") != FORMAT:
            raise ManifestError(f"weights manifest format {body.get('format')!r}, this version reads {FORMAT}: "
                                "run the same prism-edge version on every rank")
        chunk = _need(doc.get("chunk"), int, "'chunk'")
        if not 0 < chunk <= MAX_CHUNK_BYTES:
            raise ManifestError(f"malformed weights manifest: piece size {chunk} out of range")
        raw_entries = _need(body.get("tensors"), list, "'tensors'")
        manifest = cls(_need(body.get("config"), str, "'config'"), tuple(_entry(e) for e in raw_entries))
        names = [e.name for e in manifest.entries]
        if names != sorted(set(names)):
            raise ManifestError("malformed weights manifest: tensor names repeated or out of order")
        if doc.get("digest") != manifest.digest:
            raise ManifestError(f"weights manifest digest {str(doc.get('digest'))[:80]!r} does not match its "
                                f"contents ({manifest.digest})")
        return manifest, chunk


def _need(value: object, kind: type, what: str):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"malformed weights manifest: {what} should be a JSON {kind.__name__}, got "
                            f"{type(value).__name__}")
    return value


def _entry(raw: object) -> Entry:
    doc = _need(raw, dict, "a tensor entry")
    name = _need(doc.get("name"), str, "a tensor's 'name'")
    where = f"tensor {name[:200]!r}"
    shape = tuple(_need(d, int, f"{where}'s shape") for d in _need(doc.get("shape"), list, f"{where}'s 'shape'"))
    dtype = _need(doc.get("dtype"), str, f"{where}'s 'dtype'")
    nbytes = _need(doc.get("bytes"), int, f"{where}'s 'bytes'")
    digest = _need(doc.get("sha256"), str, f"{where}'s 'sha256'")
    if not name or any(d < 0 for d in shape):
        raise ManifestError(f"malformed weights manifest: {where} has an empty name or a negative dimension")
    if nbytes != math.prod(shape) * dtype_of(dtype).itemsize:
        raise ManifestError(f"malformed weights manifest: {where} of shape {shape} and dtype {dtype} cannot hold "
                            f"{nbytes} bytes")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ManifestError(f"malformed weights manifest: {where}'s sha256 is not 64 hex digits")
    return Entry(name, shape, dtype, nbytes, digest)


def verify(manifest: Manifest, tensors: dict[str, Tensor], source: str) -> None:
    """Every tensor of the manifest, of its dtype and shape, and with its sha256; ValueError naming the first that is not."""
    names = {e.name for e in manifest.entries}
    if set(tensors) != names:
        missing, extra = sorted(names - set(tensors)), sorted(set(tensors) - names)
        raise ValueError(f"{source}: tensors missing {missing[:5]}, unexpected {extra[:5]}")
    for e in manifest.entries:
        t = tensors[e.name]
        if t.dtype != DTYPES[e.dtype] or tuple(t.shape) != e.shape:
            raise ValueError(f"{source}: tensor {e.name!r} is {t.dtype} {tuple(t.shape)}, the manifest says "
                             f"{e.dtype} {e.shape}")
        got = sha256_of(t)
        if got != e.sha256:
            raise ValueError(f"{source}: tensor {e.name!r} does not match its sha256 (got {got[:16]}..., the "
                             f"manifest says {e.sha256[:16]}...)")


@dataclass(frozen=True, eq=False)
class Fetched:
    """What a worker got: the config text and its stage's tensors, and how."""

    config_json: str
    tensors: dict[str, Tensor]
    bytes_received: int  # tensor data over the link (0 from the cache)
    cached: bool
    digest: str


# ---------------------------------------------------------------------------------------- rank 0
def offer(comm: DistCommunicator, dst: int, config_json: str, tensors: dict[str, Tensor], *, progress: bool = True,
          timeout: float | None = None) -> int:
    """Rank 0: offer rank `dst` these tensors; send them unless it has them cached.  Returns the tensor bytes sent.

    timeout: the longest wait for one message (the worker's answer comes after it verified its cache);
    None: the communicator's.  The worker refusing the manifest or the data raises ValueError here too."""
    return offer_manifest(comm, dst, Manifest.build(config_json, tensors), tensors, progress=progress,
                          timeout=timeout)


def offer_manifest(comm: DistCommunicator, dst: int, manifest: Manifest, tensors: dict[str, Tensor], *,
                   progress: bool = True, timeout: float | None = None) -> int:
    """`offer` with a manifest built already (tests build one that does not match the tensors)."""
    for e in manifest.entries:
        t = tensors.get(e.name)
        if t is None or t.numel() * t.element_size() != e.nbytes:
            raise ValueError(f"tensor {e.name!r} of the manifest is missing or of another size")
    raw = manifest.encode()
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ValueError(f"the weights manifest is {len(raw)} bytes, more than a worker accepts "
                         f"({MAX_MANIFEST_BYTES}): too many tensors for one transfer")
    comm.isend(STAGE, dst, [wire.word(len(raw))], TAG_WEIGHTS, "weights manifest")
    comm.isend(STAGE, dst, [torch.frombuffer(bytearray(raw), dtype=torch.uint8)], TAG_WEIGHTS + 1, "weights manifest")
    answer = int(comm.recv(STAGE, dst, [wire.word_buffer()], TAG_WEIGHTS_ANSWER, "answer to the weights manifest",
                           timeout)[0])
    if answer == CACHED:
        comm.flush(timeout=timeout)
        return 0
    if answer == REFUSED:
        raise ValueError(f"rank {dst} refused the weights manifest: {_status(comm, dst, timeout)}")
    if answer != SEND:
        raise ValueError(f"rank {dst} answered the weights manifest with {answer}; the ranks are out of step")
    sent = _send_pieces(comm, dst, manifest, tensors, progress, timeout)
    status = _status(comm, dst, timeout)
    if status:
        raise ValueError(f"rank {dst} refused the weights rank {comm.rank} sent: {status}")
    return sent


def _send_pieces(comm: DistCommunicator, dst: int, manifest: Manifest, tensors: dict[str, Tensor], progress: bool,
                 timeout: float | None) -> int:
    """Every piece in order, one in flight while the next is posted; the bar advances as pieces go out."""
    from tqdm import tqdm

    total = manifest.total_bytes
    show = progress and total >= PROGRESS_BYTES and sys.stderr.isatty()
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"weights to rank {dst}",
               file=sys.stderr, disable=not show, dynamic_ncols=True)
    sent, current, flat = 0, -1, torch.empty(0, dtype=torch.uint8)
    try:
        for k, (i, start, end) in enumerate(manifest.pieces(CHUNK_BYTES)):
            if i != current:  # one tensor's CPU bytes at a time (a copy only for GPU or strided tensors)
                current, flat = i, tensor_bytes(tensors[manifest.entries[i].name])
            comm.isend(STAGE, dst, [flat[start:end]], TAG_WEIGHTS_DATA + k, "weights")
            comm.flush(keep=1, timeout=timeout)
            bar.update(sent - bar.n)  # every piece before this one is out
            sent += end - start
        comm.flush(timeout=timeout)
        bar.update(sent - bar.n)
    finally:
        bar.close()
    return sent


def _status(comm: DistCommunicator, src: int, timeout: float | None) -> str:
    return wire.unpack_text(comm.recv(STAGE, src, [wire.status_buffer()], TAG_WEIGHTS_STATUS, "weights status",
                                      timeout)[0])


# ---------------------------------------------------------------------------------------- worker
def cache_folder(cache_dir: str | Path, digest: str) -> Path:
    return Path(cache_dir) / "weights" / digest


def fetch(comm: DistCommunicator, src: int, cache_dir: str | Path, *, timeout: float | None = None) -> Fetched:
    """A worker: take the tensors rank `src` offers, from the cache when it holds them, verified either way.

    timeout: the longest wait for one message (the manifest comes after rank 0 hashed every tensor);
    None: the communicator's.  A manifest that cannot be used raises ManifestError (a ValueError), received
    data that does not match it a ValueError naming the tensor; rank `src` is told either way."""
    try:
        raw = _recv_manifest(comm, src, timeout)
        manifest, chunk = Manifest.decode(raw)
    except ManifestError as err:
        _answer(comm, src, REFUSED, str(err), timeout)
        raise ManifestError(f"rank {comm.rank}: {err}") from None
    folder = cache_folder(cache_dir, manifest.digest)
    tensors = _load_cache(folder, manifest, comm.rank)
    if tensors is not None:
        _answer(comm, src, CACHED, None, timeout)
        return Fetched(manifest.config_json, tensors, 0, True, manifest.digest)
    tensors, received = _recv_pieces(comm, src, manifest, chunk, timeout)
    try:
        verify(manifest, tensors, f"rank {comm.rank}: the weights received from rank {src}")
    except ValueError as err:
        _answer(comm, src, None, str(err), timeout)
        raise
    _answer(comm, src, None, "", timeout)
    _write_cache(folder, manifest, raw, tensors, comm.rank)
    return Fetched(manifest.config_json, tensors, received, False, manifest.digest)


def _recv_manifest(comm: DistCommunicator, src: int, timeout: float | None) -> bytes:
    length = int(comm.recv(STAGE, src, [wire.word_buffer()], TAG_WEIGHTS, "weights manifest", timeout)[0])
    if not 0 < length <= MAX_MANIFEST_BYTES:
        raise ManifestError(f"weights manifest of {length} bytes refused (at most {MAX_MANIFEST_BYTES})")
    buf = comm.recv(STAGE, src, [torch.empty(length, dtype=torch.uint8)], TAG_WEIGHTS + 1, "weights manifest",
                    timeout)[0]
    return buf.numpy().tobytes()


def _answer(comm: DistCommunicator, dst: int, answer: int | None, status: str | None, timeout: float | None) -> None:
    """The answer to the manifest and/or the status line, sent and flushed."""
    if answer is not None:
        comm.isend(STAGE, dst, [wire.word(answer)], TAG_WEIGHTS_ANSWER, "answer to the weights manifest")
    if status is not None:
        comm.isend(STAGE, dst, [wire.pack_text(status, wire.STATUS_CELLS)], TAG_WEIGHTS_STATUS, "weights status")
    comm.flush(timeout=timeout)


def _recv_pieces(comm: DistCommunicator, src: int, manifest: Manifest, chunk: int,
                 timeout: float | None) -> tuple[dict[str, Tensor], int]:
    """Every piece received in place: all are posted before the answer goes out, each waited for in turn."""
    tensors = {e.name: torch.empty(e.shape, dtype=DTYPES[e.dtype]) for e in manifest.entries}
    flats = [tensor_bytes(tensors[e.name]) for e in manifest.entries]  # views: the data lands in the tensors
    posted = comm.irecv(src, [flats[i][start:end] for i, start, end in manifest.pieces(chunk)], TAG_WEIGHTS_DATA,
                        "weights")
    comm.isend(STAGE, src, [wire.word(SEND)], TAG_WEIGHTS_ANSWER, "answer to the weights manifest")
    received = 0
    wait = comm.timeout if timeout is None else timeout
    for piece in posted:  # (work, buffer): a deadline per piece, so a big transfer is not cut short
        comm.wait_recv(STAGE, src, [piece], "weights", time.monotonic() + wait)
        received += piece[1].numel()
    comm.flush(timeout=timeout)
    return tensors, received


def _load_cache(folder: Path, manifest: Manifest, rank: int) -> dict[str, Tensor] | None:
    """The cached tensors, verified; None when there are none, or (said in one line) they were corrupt."""
    if not folder.exists():
        return None
    try:
        stored = (folder / MANIFEST_FILE).read_bytes()
        stored_manifest, _ = Manifest.decode(stored)
        if stored_manifest != manifest:
            raise ValueError("its manifest differs")
        if (folder / CONFIG_FILE).read_text(encoding="utf-8") != manifest.config_json:
            raise ValueError(f"its {CONFIG_FILE} differs from the manifest's")
        tensors = load_file(folder / WEIGHTS_FILE)
        verify(manifest, tensors, WEIGHTS_FILE)
        return tensors
    except Exception as err:  # noqa: BLE001 - a cache that cannot be read is as good as none
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"prism-edge: rank {rank}: the cached weights in {folder} are corrupt ({why}); discarding them and "
              "fetching them again", file=sys.stderr, flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _write_cache(folder: Path, manifest: Manifest, raw: bytes, tensors: dict[str, Tensor], rank: int) -> None:
    """The cache, written whole into a temporary folder and renamed into place; a failure only costs the next
    start a transfer (said in one line).  Another process that cached the same digest first wins."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{manifest.digest[:16]}-", dir=folder.parent))
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"digest": manifest.digest})
        (tmp / CONFIG_FILE).write_text(manifest.config_json, encoding="utf-8")
        (tmp / MANIFEST_FILE).write_bytes(raw)
        if not folder.exists():
            os.rename(tmp, folder)
    except OSError as err:
        if not folder.exists():
            print(f"prism-edge: rank {rank}: could not cache the weights in {folder} ({err}); the next start "
                  "fetches them again", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
