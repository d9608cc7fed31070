"""`prism-edge bench faults --kinds sigkill`: a device process SIGKILLed from outside, at a random moment.

One trial: a fresh group of P=4 local device processes (a small random BERT, loopback, the default --timeout),
either spawned by rank 0's Cluster or started separately and joined over the rendezvous (as on other machines:
rank 0 has no child process to watch), either idle between requests or serving requests back to back; after a
random delay one random rank > 0 is SIGKILLed.  For every surviving rank it records how long after the kill it noticed: rank 0 (this process)
when its Cluster raised ClusterError (busy) or went down (idle), every other rank when its process exited,
and with which code (3: it stopped by itself; -15: rank 0's teardown had to terminate it; -9: still running
SETTLE s after the kill, killed by the bench).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from typing import Any

DEVICES = 4
SETTLE = 40.0  # seconds a trial may take after the kill before the survivors still running count as hung


class _ExitWatch:
    """Peeks (without reaping) at this process's children every 5 ms: when each exited, with which code."""

    def __init__(self, pids: dict[int, int]) -> None:
        self.pids = dict(pids)
        self.at: dict[int, float] = {}  # rank -> time.monotonic() of its exit
        self.code: dict[int, int | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.005) and len(self.at) < len(self.pids):
            for rank, pid in self.pids.items():
                if rank in self.at:
                    continue
                try:
                    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:  # reaped already (by the Cluster's teardown)
                    info = None
                    self.at[rank] = time.monotonic()
                if info is not None:
                    self.at[rank] = time.monotonic()
                    self.code[rank] = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _requests(cluster: Any, ids: Any, stop: threading.Event, box: dict[str, Any]) -> None:
    """Requests back to back until `stop` or the cluster fails (when and how it failed into box)."""
    from ..cluster import ClusterError

    try:
        while not stop.is_set():
            cluster(input_ids=ids)
            box["served"] = box.get("served", 0) + 1
    except ClusterError as err:
        box["at"], box["error"] = time.monotonic(), str(err)
    except Exception as err:  # noqa: BLE001 - recorded: the trial reports it
        box["at"], box["error"] = time.monotonic(), f"{type(err).__name__}: {err}"


def _rank0_notice(cluster: Any, busy: dict[str, Any] | None, limit: float) -> tuple[float | None, str]:
    """When rank 0 noticed (monotonic) and what it said: the failed request's error, or the cluster going down."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if busy is not None and "at" in busy:
            return busy["at"], busy["error"]
        if busy is None and not cluster.alive:
            return time.monotonic(), cluster.describe()["error"] or ""
        time.sleep(0.005)
    return None, ""


def _start(model: str, joined: bool) -> tuple[Any, dict[int, Any]]:
    """A group of DEVICES: rank 0 here; the others spawned by its Cluster, or (joined) started here as separate
    `prism_edge.worker` processes that join over the rendezvous, as on other machines (rank 0 then has no child
    processes to watch).  Returns the Cluster and the other ranks' Popen objects."""
    import subprocess

    from ..config import PrismConfig
    from ..cluster import Cluster
    from ..cluster.rendezvous import Endpoint
    from ..cluster.spec import LaunchSpec
    from .common import free_port

    cfg, spec = PrismConfig(devices=DEVICES, cr=4), LaunchSpec(model=model)
    if not joined:
        cluster = Cluster(config=cfg, spec=spec)
        return cluster, dict(cluster.workers.procs)
    port = free_port()
    procs = {r: subprocess.Popen(spec.worker_command(cfg, r, DEVICES, f"127.0.0.1:{port}", "127.0.0.1"),
                                 stdin=subprocess.DEVNULL) for r in range(1, DEVICES)}
    try:
        return Cluster(config=cfg, spec=spec, spawn=False, endpoint=Endpoint("127.0.0.1", port, bind="127.0.0.1")), procs
    except BaseException:
        for proc in procs.values():
            proc.kill()
        raise


def sigkill_trial(model: str, rng: random.Random) -> dict[str, Any]:
    """One trial at random (see the module doc); the row of faults.json."""
    busy, joined, victim = rng.random() < 0.5, rng.random() < 0.5, rng.randrange(1, DEVICES)
    return kill_one(model, busy=busy, joined=joined, victim=victim, delay=rng.uniform(0.3, 3.0),
                    seed=rng.randrange(1 << 30))


def kill_one(model: str, *, busy: bool, joined: bool, victim: int, delay: float, seed: int = 0) -> dict[str, Any]:
    """Start a group (joined: its workers apart), serve requests back to back (busy) or not, SIGKILL rank `victim`
    after `delay` s and see every other rank notice (the module doc); the row of faults.json."""
    import torch

    ids = torch.randint(3, 97, (4, 96), generator=torch.Generator().manual_seed(seed))
    cluster, procs = _start(model, joined)
    watch = _ExitWatch({r: p.pid for r, p in procs.items()})
    stop, box = threading.Event(), dict[str, Any]()
    runner = threading.Thread(target=_requests, args=(cluster, ids, stop, box), daemon=True) if busy else None
    try:
        if runner is not None:
            runner.start()
        time.sleep(delay)
        mid = runner is not None and "at" not in box
        t_kill = time.monotonic()
        os.kill(procs[victim].pid, signal.SIGKILL)
        at0, said = _rank0_notice(cluster, box if busy else None, SETTLE)
        deadline = time.monotonic() + SETTLE
        while len(watch.at) < DEVICES - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        watch.stop()
        cluster.close()
        for proc in procs.values():  # joined ones still running: hung (counted as never noticed)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    for rank, proc in procs.items():  # reaped by the teardown before the watch saw it
        watch.code.setdefault(rank, proc.returncode)
    survivors = [r for r in range(DEVICES) if r != victim]
    noticed = {0: None if at0 is None else at0 - t_kill, **{r: watch.at[r] - t_kill for r in survivors if r in watch.at}}
    codes = {r: watch.code.get(r) for r in survivors if r > 0}
    times = [noticed.get(r) for r in survivors]
    return {"kind": "sigkill", "victim": victim, "busy": busy, "joined": joined, "mid_request": mid,
            "delay_s": round(delay, 3), "served": box.get("served", 0),
            "noticed_s": {str(r): noticed.get(r) for r in survivors}, "codes": {str(r): c for r, c in codes.items()},
            "rank0_error": said, "named": f"rank {victim}" in said,
            "detected_s": None if None in times else max(t for t in times if t is not None),
            "by_themselves": all(c == 3 for c in codes.values())}


def table(rows: list[dict[str, Any]]) -> str:
    """The sigkill trials: every survivor's notice time, by whether a request was in flight."""
    lines = [f"### SIGKILL of a random rank > 0 at a random moment ({len(rows)} trials, P={DEVICES} local processes, "
             "tiny BERT, default --timeout)", "",
             "| when | trials | slowest survivor (median, max s) | all ranks (median s) | ≤ 3 s | rank 0 named it "
             "| the others exited 3 by themselves |", "|---|---|---|---|---|---|---|"]
    groups = [(f"{how}, {when}", [r for r in rows if r.get("joined", False) == joined and r["mid_request"] == mid])
              for how, joined in (("spawned", False), ("joined", True))
              for when, mid in (("requests in flight", True), ("idle", False))] + [("all", rows)]
    for label, group in groups:
        if not group:
            continue
        worst = [r["detected_s"] for r in group if r["detected_s"] is not None]
        every = sorted(t for r in group for t in r["noticed_s"].values() if t is not None)
        span = f"{sorted(worst)[len(worst) // 2]:.2f}, {max(worst):.2f}" if worst else "never"
        within = sum(r["detected_s"] is not None and r["detected_s"] <= 3.0 for r in group)
        lines.append(f"| {label} | {len(group)} | {span} | {every[len(every) // 2] if every else float('nan'):.2f} | "
                     f"{within}/{len(group)} | {sum(r['named'] for r in group)}/{len(group)} | "
                     f"{sum(r['by_themselves'] for r in group)}/{len(group)} |")
    return "\n".join(lines) + "\n"
