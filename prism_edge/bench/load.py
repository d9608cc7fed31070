"""`prism-edge bench load`: the HTTP server under N concurrent clients, as a user would run it.

It starts `prism-edge launch --serve` (an encoder, MiniLM by default, on P local device processes, an API key set
through PRISM_EDGE_API_KEY) and, per level, N client threads in this process, each on its own kept-alive
connection, each sending `POST /v1/embeddings` for one sentence at a time (the bundled documents, cut into
sentences of 4 to 60 words) until the level's seconds or request cap are spent.  Before the levels, every sentence
is embedded once alone: each concurrent answer is compared with that lone answer (max |difference| <= 1e-5).
Measured per level: requests per second (answered 200), latency percentiles, statuses, answers that differ, and
the server's batches (its /metrics); the resident memory of every process (launcher and workers) after the
warm-up and after each level, and every 2 s within a level (growth once warm: after a level's first 1000 requests,
by when its largest batches have been allocated).  With --unbatched the same levels run again on a server with --max-batch 1.
Writes load.json, load.md and load.png.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .common import free_port
from .options import LoadOptions

TOLERANCE = 1e-5
WARM = 1000  # requests of a level before its RSS counts as warm (the largest batches have been allocated)


def sentences() -> list[str]:
    """The bundled documents (prism_edge/data/sentences.txt) cut into sentences of 4 to 60 words."""
    text = resources.files("prism_edge.data").joinpath("sentences.txt").read_text()
    docs = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    out = [s.strip() for d in docs for s in re.split(r"(?<=[.!?])\s+", d)]
    return [s for s in out if 4 <= len(s.split()) <= 60]


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(line for line in f if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


class Served:
    """`prism-edge launch --serve` in a child process: its URL, its processes' pids, and a way to stop it."""

    def __init__(self, options: LoadOptions, key: str, max_batch: int | None = None) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "prism_edge", "launch", "--model", options.model, "--devices",
               str(options.devices), "--serve", f"127.0.0.1:{port}", "--plan", options.plan,
               "--max-queue", str(options.max_queue), "--threads", "1"]
        cmd += ["--max-batch", str(max_batch)] if max_batch else []
        env = {**os.environ, "PRISM_EDGE_API_KEY": key}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.host, self.port, self.key, self.pids = "127.0.0.1", port, key, [self.proc.pid]
        lines: list[str] = []
        for line in self.proc.stderr or ():
            lines.append(line)
            if "pids" in line:
                self.pids += [int(p) for p in line.split("pids")[1].replace(",", " ").split()]
            if "serving on" in line:
                break
        else:
            raise RuntimeError("the server did not start:\n" + "".join(lines[-20:]))
        threading.Thread(target=lambda: [None for _ in self.proc.stderr or ()], daemon=True).start()  # drain

    def request(self, conn: http.client.HTTPConnection, route: str, body: Any = None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        conn.request("POST" if body is not None else "GET", route,
                     json.dumps(body) if body is not None else None, headers)
        reply = conn.getresponse()
        return reply.status, reply.read()

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=120)

    def rss(self) -> dict[int, float | None]:
        return {pid: rss_mib(pid) for pid in self.pids}

    def metric(self, name: str) -> float:
        """A counter or histogram sum of the server's /metrics (summed over labels)."""
        status, text = self.request(self.connect(), "/metrics")
        return sum(float(line.split()[-1]) for line in text.decode().splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def stop(self) -> int:
        self.proc.terminate()  # SIGTERM: graceful
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(30)


def _embedding(raw: bytes) -> list[float]:
    return json.loads(raw)["data"][0]["embedding"]


def lone_answers(served: Served, model: str, texts: list[str]) -> list[list[float]]:
    conn = served.connect()
    out = []
    for text in texts:
        status, raw = served.request(conn, "/v1/embeddings", {"model": model, "input": text})
        if status != 200:
            raise RuntimeError(f"a lone request failed with {status}: {raw[:300]!r}")
        out.append(_embedding(raw))
    return out


def _client(served: Served, model: str, texts: list[str], lone: list[list[float]], start: int, stop_at: float,
            budget: list[int], lock: threading.Lock, rows: list[tuple[int, float, bool]]) -> None:
    conn, i = served.connect(), start
    while time.monotonic() < stop_at:
        with lock:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        k = i % len(texts)
        i += 1
        t0 = time.perf_counter()
        try:
            status, raw = served.request(conn, "/v1/embeddings", {"model": model, "input": texts[k]})
        except (OSError, http.client.HTTPException):
            status, raw = 0, b""  # a reset or refused connection
            conn = served.connect()
        took = time.perf_counter() - t0
        same = status != 200 or max(abs(a - b) for a, b in zip(_embedding(raw), lone[k])) <= TOLERANCE
        rows.append((status, took, same))


def level(served: Served, options: LoadOptions, clients: int, seconds: float, texts: list[str],
          lone: list[list[float]]) -> dict[str, Any]:
    rows: list[tuple[int, float, bool]] = []
    budget, lock = [options.max_requests], threading.Lock()
    before = {n: served.metric(n) for n in ("prism_batch_requests_sum", "prism_batch_requests_count")}
    t0 = time.monotonic()
    threads = [threading.Thread(target=_client, args=(served, options.model, texts, lone, c * 7, t0 + seconds,
                                                      budget, lock, rows)) for c in range(clients)]
    samples: list[tuple[int, dict[int, float | None]]] = []  # (requests so far, RSS per pid) every 2 s
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        samples.append((len(rows), served.rss()))
        threads[0].join(2.0)
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    after = {n: served.metric(n) for n in before}
    ok = sorted(took for status, took, _ in rows if status == 200)
    statuses: dict[str, int] = {}
    for status, _, _ in rows:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    batches = after["prism_batch_requests_count"] - before["prism_batch_requests_count"]
    batched = after["prism_batch_requests_sum"] - before["prism_batch_requests_sum"]
    return {"clients": clients, "seconds": round(wall, 2), "requests": len(rows), "ok": len(ok),
            "throughput_rps": round(len(ok) / wall, 2), "statuses": statuses,
            "differ": sum(1 for s, _, same in rows if s == 200 and not same),
            "p50_ms": _pct(ok, 0.5), "p90_ms": _pct(ok, 0.9), "p99_ms": _pct(ok, 0.99),
            "mean_batch": round(batched / batches, 2) if batches else None, **_steady(samples, served.rss())}


def _steady(samples: list[tuple[int, dict[int, float | None]]], end: dict[int, float | None]) -> dict[str, Any]:
    """RSS growth once warm: from the first sample after WARM requests of the level (every batch size seen) to the
    level's end, and how many requests that covers."""
    warm = next(((n, rss) for n, rss in samples if n >= WARM), None)
    if warm is None:
        return {"steady_requests": 0, "steady_rss_growth_pct": {}}
    total = samples[-1][0] if samples else 0
    return {"steady_requests": total - warm[0], "steady_rss_growth_pct": _growth(warm[1], end)}


def _pct(sorted_s: list[float], q: float) -> float | None:
    if not sorted_s:
        return None
    return round(sorted_s[min(len(sorted_s) - 1, int(q * len(sorted_s)))] * 1e3, 1)


def run_server(options: LoadOptions, batched: bool, texts: list[str]) -> dict[str, Any]:
    key = "sk-load-" + secrets.token_hex(8)
    served = Served(options, key, None if batched else 1)
    try:
        lone = lone_answers(served, options.model, texts)  # also the warm-up
        levels, rss = [], [served.rss()]
        for i, n in enumerate(tqdm(options.clients, desc="batched" if batched else "unbatched", unit="level",
                                   leave=False)):
            levels.append(level(served, options, n, options.level_seconds(i), texts, lone))
            rss.append(served.rss())
    finally:
        code = served.stop()
    return {"batched": batched, "levels": levels, "pids": served.pids,
            "rss_mib": [{str(k): v for k, v in r.items()} for r in rss],  # after the warm-up, then each level
            "rss_growth_pct": _growth(rss[0], rss[-1]), "last_level_rss_growth_pct": _growth(rss[-2], rss[-1]),
            "requests": sum(lv["requests"] for lv in levels), "exit_code": code}


def _growth(before: dict[int, float | None], after: dict[int, float | None]) -> dict[str, float]:
    out = {}
    for pid, b in before.items():
        a = after.get(pid)
        if a is not None and b:
            out[str(pid)] = round(100 * (a - b) / b, 2)
    return out


def table(runs: list[dict[str, Any]], options: LoadOptions) -> str:
    lines = [f"### {options.model} on {options.devices} device processes (plan {options.plan}), POST /v1/embeddings, "
             "loopback",
             "| batching | clients | s | requests | 200/s | p50 ms | p90 ms | p99 ms | statuses | answers differ | "
             "mean batch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for lv in r["levels"]:
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(lv["statuses"].items()))
            lines.append(f"| {'on' if r['batched'] else 'off'} | {lv['clients']} | {lv['seconds']:.0f} | "
                         f"{lv['requests']} | {lv['throughput_rps']:.1f} | {lv['p50_ms']} | {lv['p90_ms']} | "
                         f"{lv['p99_ms']} | {statuses} | {lv['differ']} | {lv['mean_batch']} |")
    for r in runs:
        growth = ", ".join(f"{v:+.1f} %" for v in r["rss_growth_pct"].values())
        last = ", ".join(f"{v:+.1f} %" for v in r["last_level_rss_growth_pct"].values())
        last_level = r["levels"][-1]
        steady = ", ".join(f"{v:+.1f} %" for v in last_level["steady_rss_growth_pct"].values())
        lines.append(f"- batching {'on' if r['batched'] else 'off'}: {r['requests']} requests; RSS growth of every "
                     f"process (launcher, workers) since the warm-up: {growth}; over the last level "
                     f"({last_level['requests']} requests): {last}; over its last {last_level['steady_requests']} "
                     f"requests (after its first {WARM}): {steady}; server exit code {r['exit_code']}")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in runs:
        label = "batching on" if r["batched"] else "batching off"
        xs = [lv["clients"] for lv in r["levels"]]
        a.plot(xs, [lv["throughput_rps"] for lv in r["levels"]], "o-", label=label)
        b.plot(xs, [lv["p50_ms"] for lv in r["levels"]], "o-", label=f"{label}, p50")
        b.plot(xs, [lv["p99_ms"] for lv in r["levels"]], "x--", label=f"{label}, p99")
    a.set(xscale="log", xlabel="concurrent clients", ylabel="answered requests / s", title="throughput")
    b.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="latency")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(options: LoadOptions, cache: Any = None) -> str:
    options.out.mkdir(parents=True, exist_ok=True)
    texts = sentences()
    runs = [run_server(options, True, texts)] + ([run_server(options, False, texts)] if options.unbatched else [])
    (options.out / "load.json").write_text(json.dumps({"options": {k: str(v) for k, v in vars(options).items()},
                                                       "sentences": len(texts), "runs": runs}, indent=1))
    png = plot(runs, options.out / "load.png")
    text = table(runs, options) + f"\n\nplot: {png}\n"
    (options.out / "load.md").write_text(text)
    return text


def ratio(runs: list[dict[str, Any]], clients: int) -> float | None:
    """Batched throughput at `clients` over the one-client throughput (both batched)."""
    levels = {lv["clients"]: lv for lv in runs[0]["levels"]}
    if clients not in levels or 1 not in levels or not levels[1]["throughput_rps"]:
        return None
    return round(levels[clients]["throughput_rps"] / levels[1]["throughput_rps"], 2)

