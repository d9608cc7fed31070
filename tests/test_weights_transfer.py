"""Start-up weight transfer (cluster/weights.py): rank 0 sends a worker its stage's tensors once, verified and cached.

The transfers run in a real gloo group of two processes (torch.multiprocessing spawn, a FileStore per group);
each process runs a list of rounds, every round in a new group, and writes what it saw to a JSON file that
the test reads.  The manifest's checks run in this process.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from prism_edge.cluster import weights
from prism_edge.cluster.rendezvous import Endpoint, join_group
from prism_edge.cluster.transport import DistCommunicator
from prism_edge.cluster.weights import Fetched, Manifest, ManifestError, fetch, offer, offer_manifest
from prism_edge.runtime.wire import STATUS_CELLS

CONFIG = json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2})
WORD = 8  # bytes of an int64 length or answer


def stage_tensors(big: bool = False) -> dict[str, torch.Tensor]:
    """A stage's tensors of every dtype the transfer must keep, a 0-dim and an empty one; big adds 20 MiB
    (more than one 16 MiB piece)."""
    g = torch.Generator().manual_seed(0)
    out = {
        "h.0.attn.c_attn.weight": torch.randn(64, 192, generator=g),
        "h.0.ln_1.weight": torch.randn(64, generator=g).to(torch.bfloat16),
        "h.0.mlp.c_fc.weight": torch.randn(64, 128, generator=g).half(),
        "position_ids": torch.arange(64),
        "h.0.attn.bias": torch.tril(torch.ones(8, 8, dtype=torch.bool)),
        "counts": torch.randint(-1000, 1000, (17,), dtype=torch.int32, generator=g),
        "codes": torch.randint(0, 256, (33,), generator=g).to(torch.uint8),
        "scale": torch.tensor(0.5),
        "empty": torch.zeros(0, 4),
    }
    if big:
        out["wte.weight"] = torch.randn(5 << 20, generator=g)
    return out


def tampered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same names, shapes and dtypes, one tensor's values changed: its manifest does not match `tensors`."""
    out = dict(tensors)
    out["h.0.ln_1.weight"] = tensors["h.0.ln_1.weight"] + 1
    return out


class Garbage(Manifest):
    def encode(self, chunk: int = weights.CHUNK_BYTES) -> bytes:
        return b'{"digest": "../../etc", "manifest": '


# ---------------------------------------------------------------------------------------- the two processes
def _rank0(comm: DistCommunicator, kind: str, big: bool) -> dict:
    tensors = stage_tensors(big)
    if kind == "bad-hash":
        return {"sent": offer_manifest(comm, 1, Manifest.build(CONFIG, tampered(tensors)), tensors, progress=False)}
    if kind == "bad-manifest":
        return {"sent": offer_manifest(comm, 1, Garbage.build(CONFIG, tensors), tensors, progress=False)}
    return {"sent": offer(comm, 1, CONFIG, tensors, progress=False)}


def _worker(comm: DistCommunicator, kind: str, root: Path, index: int) -> dict:
    cache = root / "cache"
    if kind == "corrupt":  # flip the last byte of the cached file: inside the last tensor's data
        [path] = (cache / "weights").glob(f"*/{weights.WEIGHTS_FILE}")
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    got: Fetched = fetch(comm, 0, cache)
    save_file({k: v.contiguous() for k, v in got.tensors.items()}, root / f"got-{index}.safetensors")
    return {"received": got.bytes_received, "cached": got.cached, "digest": got.digest, "config": got.config_json}


def _child(rank: int, root: Path, rounds: list[str], big: bool) -> None:
    torch.set_num_threads(1)
    results = []
    for index, kind in enumerate(rounds):
        store = dist.FileStore(str(root / f"store-{index}"), 2)
        group = join_group(store, Endpoint("127.0.0.1", 0, bind="127.0.0.1"), rank, 2, time.monotonic() + 30, 30)
        comm = DistCommunicator(group, rank, 2, timeout=30)
        err = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stderr(err):
                result = _rank0(comm, kind, big) if rank == 0 else _worker(comm, kind, root, index)
        except ValueError as e:
            result = {"error": f"{type(e).__name__}: {e}"}
        except Exception:  # noqa: BLE001 - reported to the test
            result = {"error": traceback.format_exc()}
        result.update(stderr=err.getvalue(), seconds=time.perf_counter() - start,
                      ledger_sent=comm.ledger.sent(weights.STAGE, rank),
                      ledger_received=comm.ledger.received(weights.STAGE, rank))
        results.append(result)
        comm.close()
    (root / f"rank{rank}.json").write_text(json.dumps(results))


def run_pair(root: Path, rounds: list[str], big: bool = False) -> tuple[list[dict], list[dict]]:
    mp.spawn(_child, args=(root, rounds, big), nprocs=2, join=True)
    return tuple(json.loads((root / f"rank{r}.json").read_text()) for r in range(2))  # type: ignore[return-value]


def manifest_bytes(big: bool = False) -> int:
    return len(Manifest.build(CONFIG, stage_tensors(big)).encode())


def assert_same(root: Path, index: int, big: bool = False) -> None:
    got, want = load_file(root / f"got-{index}.safetensors"), stage_tensors(big)
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


# ---------------------------------------------------------------------------------------- transfers
def test_first_start_transfers_everything_the_next_nothing_a_corrupt_cache_again(tmp_path):
    zero, one = run_pair(tmp_path, ["plain", "plain", "corrupt"], big=True)
    total = Manifest.build(CONFIG, stage_tensors(True)).total_bytes
    overhead = WORD + manifest_bytes(True)
    first0, first1 = zero[0], one[0]
    assert "error" not in first0 and "error" not in first1, (first0, first1)
    assert first0["sent"] == total == first1["received"] and not first1["cached"]
    assert first1["config"] == CONFIG
    # the ledger on both sides: every byte, the manifest and the answers included
    assert first0["ledger_sent"] == first1["ledger_received"] == overhead + total
    assert first1["ledger_sent"] == first0["ledger_received"] == WORD + STATUS_CELLS * 8
    assert_same(tmp_path, 0, big=True)

    second0, second1 = zero[1], one[1]
    assert "error" not in second0 and "error" not in second1, (second0, second1)
    assert second0["sent"] == 0 == second1["received"] and second1["cached"]
    assert second0["ledger_sent"] == second1["ledger_received"] == overhead  # no tensor data
    assert second1["ledger_sent"] == second0["ledger_received"] == WORD
    assert second1["digest"] == first1["digest"] and second1["config"] == CONFIG
    assert_same(tmp_path, 1, big=True)
    assert (tmp_path / "cache" / "weights" / first1["digest"] / weights.CONFIG_FILE).read_text() == CONFIG
    print(f"\nfirst transfer {first1['seconds']:.2f} s ({total / 2**20:.1f} MiB), cached {second1['seconds']:.2f} s")

    # a corrupt cached file: said in one line, discarded, fetched again whole and cached again
    again0, again1 = zero[2], one[2]
    assert "error" not in again0 and "error" not in again1, (again0, again1)
    assert again0["sent"] == total == again1["received"] and not again1["cached"]
    lines = again1["stderr"].splitlines()
    assert len(lines) == 1 and "corrupt" in lines[0] and "fetching them again" in lines[0], lines
    assert_same(tmp_path, 2, big=True)
    folder = tmp_path / "cache" / "weights" / again1["digest"]
    weights.verify(Manifest.build(CONFIG, stage_tensors(True)), load_file(folder / weights.WEIGHTS_FILE), "cache")


@pytest.mark.slow
def test_data_that_does_not_match_its_hash_or_a_bad_manifest_is_refused(tmp_path):
    zero, one = run_pair(tmp_path, ["bad-hash", "bad-manifest"])
    bad0, bad1 = zero[0], one[0]
    assert bad1["error"].startswith("ValueError") and "'h.0.ln_1.weight'" in bad1["error"], bad1
    assert "sha256" in bad1["error"]
    assert bad0["error"].startswith("ValueError") and "rank 1 refused the weights" in bad0["error"], bad0
    assert "'h.0.ln_1.weight'" in bad0["error"]
    assert not list((tmp_path / "cache" / "weights").glob("*/" + weights.WEIGHTS_FILE)), "cached bad data"
    junk0, junk1 = zero[1], one[1]
    assert junk1["error"].startswith("ManifestError") and "not JSON" in junk1["error"], junk1
    assert "refused the weights manifest" in junk0["error"] and "not JSON" in junk0["error"], junk0
    assert not (tmp_path / "etc").exists()


# ---------------------------------------------------------------------------------------- the manifest, in process
def test_manifest_round_trip_and_refusals():
    tensors = stage_tensors()
    m = Manifest.build(CONFIG, tensors)
    back, chunk = Manifest.decode(m.encode())
    assert back == m and back.digest == m.digest and chunk == weights.CHUNK_BYTES
    assert [e.name for e in m.entries] == sorted(tensors)
    assert {e.name: e.dtype for e in m.entries}["h.0.ln_1.weight"] == "bfloat16"
    assert Manifest.build(CONFIG + " ", tensors).digest != m.digest  # the config is part of the digest

    doc = json.loads(m.encode())
    cases = {
        b"\xff\xfe": "not JSON",
        b"[1, 2]": "should be a JSON dict",
        b"x" * (weights.MAX_MANIFEST_BYTES + 1): "refused",
    }
    for change, why in [(("digest", "0" * 64), "does not match"), (("chunk", 0), "piece size"),
                        (("dtype", "complex64"), "unknown dtype 'complex64'"), (("bytes", 3), "cannot hold"),
                        (("sha256", "../x"), "64 hex"), (("shape", [-1]), "negative"), (("format", 2), "format 2")]:
        bad = json.loads(json.dumps(doc))
        key, value = change
        if key in ("digest", "chunk"):
            bad[key] = value
        elif key == "format":
            bad["manifest"]["format"] = value
        else:
            bad["manifest"]["tensors"][0][key] = value
        cases[json.dumps(bad).encode()] = why
    for raw, why in cases.items():
        with pytest.raises(ManifestError, match=why):
            Manifest.decode(raw)
    with pytest.raises(ValueError, match="complex64"):
        Manifest.build(CONFIG, {"z": torch.zeros(2, dtype=torch.complex64)})


def test_verify_names_the_tensor_and_the_cache_survives_only_whole(tmp_path, capsys):
    tensors = stage_tensors()
    m = Manifest.build(CONFIG, tensors)
    with pytest.raises(ValueError, match="'codes' does not match its sha256"):
        weights.verify(m, {**tensors, "codes": tensors["codes"] ^ 1}, "test")
    with pytest.raises(ValueError, match="missing"):
        weights.verify(m, {k: v for k, v in tensors.items() if k != "scale"}, "test")
    folder = weights.cache_folder(tmp_path, m.digest)
    weights._write_cache(folder, m, m.encode(), tensors, 1)
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [m.digest]  # no temporary folder left
    loaded = weights._load_cache(folder, m, 1)
    assert loaded is not None and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    (folder / weights.CONFIG_FILE).write_text("{}")
    assert weights._load_cache(folder, m, 1) is None and not folder.exists()
    assert "corrupt" in capsys.readouterr().err
