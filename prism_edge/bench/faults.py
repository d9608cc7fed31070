"""`prism-edge bench faults`: how fast lost devices are noticed and whether start-up mistakes always end.

Trials, each on a fresh group of P=3 local device processes serving a small random BERT (so the trials
measure the runtime, not model loading):

  kill      rank 1 is SIGKILLed as it reaches a random layer of its first request: time until rank 0's
            Cluster raises, whether rank 2 exits by itself with code 3, and orphans (any worker process
            still alive 5 s after the Cluster closed)
  hang      rank 1 stops answering at a random layer: the same, against --timeout
  sigkill   a random rank > 0 of P=4 is SIGKILLed from outside at a random moment, idle or serving:
            when every surviving rank noticed (bench/kills.py)
  duplicate two processes start as rank 1 of a 2-rank group: one must be refused by name (exit 2)
  world     rank 1 starts with --world-size 3 against rank 0's 2: both must end, refusing it by name
  missing   rank 1 of a 3-rank group never comes: ranks 0 and 2 must end at --startup-timeout, naming it

A start-up "hang" is a process still running 60 s past its start-up timeout.  Writes faults.json / .md.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .common import free_port
from .kills import sigkill_trial, table as sigkill_table
from .options import FaultsOptions

TIMEOUT = 5.0  # --timeout of the kill / hang trials
STARTUP = 8.0  # --startup-timeout of the start-up trials
LAYERS = 4


def _tiny_bert(folder: Path) -> str:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128,
                     vocab_size=97, max_position_embeddings=128)
    BertModel(cfg).eval().save_pretrained(folder)
    return str(folder)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except FileNotFoundError:
        return False


def lost_device(model: str, kind: str, rng: random.Random) -> dict[str, Any]:
    import torch

    from ..config import PrismConfig
    from ..cluster import Cluster, ClusterError

    layer = rng.randrange(LAYERS)
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
    cluster = Cluster(model, PrismConfig(devices=3, cr=4), timeout=TIMEOUT,
                      worker_env={"PRISM_EDGE_FAULT": f"1:{kind}@{layer}"})
    pids = [pid for rank, pid in cluster.pids.items() if rank > 0]
    t0 = time.monotonic()
    noticed, named = None, False
    try:
        cluster(input_ids=ids)
    except ClusterError as err:
        noticed, named = time.monotonic() - t0, "rank 1" in str(err)
    survivor = cluster.workers.procs[2]
    with_code = None
    deadline = time.monotonic() + TIMEOUT + 10
    while survivor.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with_code = survivor.returncode
    cluster.close()
    time.sleep(5)
    orphans = [p for p in pids if _alive(p)]
    for p in orphans:
        os.kill(p, signal.SIGKILL)
    return {"kind": kind, "layer": layer, "detected_s": noticed, "named": named, "survivor_exit": with_code,
            "orphans": len(orphans)}


def _worker(rank: int, world: int, port: int, model: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-X", "faulthandler", "-m", "prism_edge.worker", "--rank", str(rank), "--world-size", str(world),
           "--master", f"127.0.0.1:{port}", "--model", model, "--startup-timeout", str(STARTUP),
           "--devices", str(world), "--max-length", "32", "--text", "a b c d e f g h", *extra]
    # SIGINT at its default, as from a terminal (a shell starts background jobs, this bench too, with it ignored)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _finish(procs: list[subprocess.Popen], limit: float) -> tuple[list[int | None], list[str], bool]:
    """Wait for every process up to `limit` s; (exit codes, stderr, whether any had to be killed: a hang)."""
    deadline, hung = time.monotonic() + limit, False
    errs = []
    for p in procs:
        try:
            errs.append(p.communicate(timeout=max(0.1, deadline - time.monotonic()))[1])
        except subprocess.TimeoutExpired:
            hung = True
            p.kill()
            errs.append(p.communicate()[1])
    return [p.returncode for p in procs], errs, hung


def _wait_healthy(port: int, limit: float) -> bool:
    import urllib.request

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            time.sleep(0.2)
    return False


def startup(model: str, kind: str, rng: random.Random) -> dict[str, Any]:
    port, t0 = free_port(), time.monotonic()
    if kind == "duplicate":
        web = free_port()
        procs = [_worker(0, 2, port, model, "--serve", f"127.0.0.1:{web}"), _worker(1, 2, port, model),
                 _worker(1, 2, port, model)]
        deadline = time.monotonic() + STARTUP + 60
        while all(p.poll() is None for p in procs[1:]) and time.monotonic() < deadline:
            time.sleep(0.1)
        refused = next((p for p in procs[1:] if p.poll() is not None), None)
        took = time.monotonic() - t0
        serving = _wait_healthy(web, STARTUP + 30)  # the group formed with the other rank 1
        procs[0].send_signal(signal.SIGINT)  # Ctrl-C stops the group
        stack = ""
        try:
            procs[0].wait(timeout=30)
        except subprocess.TimeoutExpired:
            procs[0].send_signal(signal.SIGABRT)  # faulthandler prints where it is stuck
            stack = procs[0].communicate()[1][-3000:]
        codes, errs, _ = _finish(procs, STARTUP + 60)
        text = errs[procs.index(refused)] if refused is not None else ""
        ok = refused is not None and refused.returncode == 2 and "taken twice" in text
        return {"kind": kind, "ended_s": took, "hang": refused is None or -9 in codes[1:], "named": ok,
                "codes": codes, "served": serving, "ctrl_c_ignored": bool(stack), "stack": stack}
    if kind == "world":
        procs = [_worker(0, 2, port, model), _worker(1, 3, port, model)]
        codes, errs, hung = _finish(procs, STARTUP + 60)
        named = all("--world-size" in e for e in errs) and codes == [2, 2]
    else:  # missing: rank 1 of 3 never starts
        procs = [_worker(0, 3, port, model), _worker(2, 3, port, model)]
        codes, errs, hung = _finish(procs, STARTUP + 60)
        named = all("rank(s) 1 of 3 did not join" in e for e in errs) and codes == [3, 3]
    return {"kind": kind, "ended_s": time.monotonic() - t0, "hang": hung, "named": named, "codes": codes}


def main(options: FaultsOptions, cache: Any = None) -> str:
    """`prism-edge bench faults` (cache: unused, the trials save their own tiny model); writes faults.json / .md."""
    out, trials = options.out, options.trials
    rng = random.Random(options.seed)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="prism-edge-faults-") as tmp:
        model = _tiny_bert(Path(tmp) / "bert")
        plan: list[tuple[str, Callable[[str, str, random.Random], dict[str, Any]]]] = [
            ("kill", lambda m, k, r: lost_device(m, "die", r)), ("hang", lost_device),
            ("sigkill", lambda m, k, r: sigkill_trial(m, r)), ("duplicate", startup), ("world", startup),
            ("missing", startup)]
        out.mkdir(parents=True, exist_ok=True)
        for kind, fn in [(k, f) for k, f in plan if k in options.kinds]:
            for _ in tqdm(range(trials), desc=f"faults: {kind}"):
                row = fn(model, kind, rng)
                row["kind"] = kind
                rows.append(row)
                (out / "faults.json").write_text(json.dumps(rows, indent=1))  # as it goes
    others = [r for r in rows if r["kind"] != "sigkill"]
    text = _table(others, trials) if others else ""
    if "sigkill" in options.kinds:
        text += ("\n" if text else "") + sigkill_table([r for r in rows if r["kind"] == "sigkill"])
    (out / "faults.md").write_text(text)
    return text


def _table(rows: list[dict[str, Any]], trials: int) -> str:
    lines = [f"### Faults, {trials} trials each (P=3 / 2 local processes, tiny BERT, --timeout {TIMEOUT:g} s, "
             f"--startup-timeout {STARTUP:g} s)", "",
             "| fault | detected / ended (median, max s) | named in the error | other processes ended by themselves "
             "| orphans | hangs | rank 0 ignored Ctrl-C |", "|---|---|---|---|---|---|---|"]
    for kind in ("kill", "hang", "duplicate", "world", "missing"):
        group = [r for r in rows if r["kind"] == kind]
        if not group:
            continue
        times = [r.get("detected_s") or r.get("ended_s") for r in group]
        seen = [t for t in times if t is not None]
        span = f"{statistics.median(seen):.2f}, {max(seen):.2f}" if seen else "never"
        survived = (f"{sum(r['survivor_exit'] == 3 for r in group)}/{len(group)} (exit 3)"
                    if kind in ("kill", "hang") else "n/a")
        orphans = sum(r.get("orphans", 0) for r in group) if kind in ("kill", "hang") else "n/a"
        hangs = sum(bool(r.get("hang")) or r.get("detected_s", 0.0) is None for r in group)
        ignored = sum(bool(r.get("ctrl_c_ignored")) for r in group) if kind == "duplicate" else "n/a"
        lines.append(f"| {kind} | {span} | {sum(bool(r['named']) for r in group)}/{len(group)} | {survived} | "
                     f"{orphans} | {hangs} | {ignored} |")
    return "\n".join(lines) + "\n"
