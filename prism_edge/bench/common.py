"""What the process-running benches share: free ports, where device processes run, and running a group to the end."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
from collections.abc import Callable, Sequence
from typing import Any


def rank0_args(argv: Sequence[str], strings: Sequence[str], ints: Sequence[str] = (),
               int_lists: Sequence[str] = ()) -> argparse.Namespace:
    """The flags a bench passes to its own rank-0 process (`python -m prism_edge.bench.X --rank0 ...`): the
    config, master, bind and model as strings, counts as integers, the emulated link's --mbit / --ms."""
    p = argparse.ArgumentParser()
    p.add_argument("--rank0", action="store_true")
    for name in strings:
        p.add_argument("--" + name)
    for name in ints:
        p.add_argument("--" + name, type=int)
    for name in int_lists:
        p.add_argument("--" + name, type=int, nargs="+")
    p.add_argument("--mbit", type=float)
    p.add_argument("--ms", type=float)
    return p.parse_args(list(argv))


def free_port() -> int:
    """A TCP port free on this machine right now (for a rendezvous master)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Placement:
    """Where device processes run: loopback, or one network namespace each (an EmulatedNetwork)."""

    def __init__(self, net: Any = None) -> None:
        self.net = net

    def wrap(self, rank: int, argv: list[str]) -> list[str]:
        return self.net.wrap(rank, argv) if self.net else argv

    def address(self, rank: int) -> str:
        return self.net.address(rank) if self.net else "127.0.0.1"

    def iface(self, rank: int) -> str:
        return self.net.interface(rank) if self.net else "lo"

    def tx_bytes(self, ranks: int) -> int | None:
        return sum(self.net.counters(p)[0] for p in range(ranks)) if self.net else None


def run_ranks(place: Placement, commands: Sequence[list[str]], env_for: Callable[[int], dict[str, str]] | None = None,
              timeout: float = 900) -> str:
    """Run one process per rank to the end (one torch thread each); return rank 0's last line of output."""
    procs = []
    for rank, argv in enumerate(commands):
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_for(rank) if env_for else {})}
        procs.append(subprocess.Popen(place.wrap(rank, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"a device process failed (exit {p.returncode}): {err.strip()[-1200:]}")
    return outs[0][0].strip().splitlines()[-1]
