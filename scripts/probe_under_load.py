"""The start-up compute probe (cluster/probes.py) on a quiet and on a transiently loaded machine.

    PYTHONPATH=. python scripts/probe_under_load.py [SEED] [REPEATS] [FRACTION]

Probes one device of a MiniLM-shaped random BERT (hidden 384, 6 layers, one torch thread) REPEATS times quietly,
then REPEATS times while two CPU burners (`while 1: pass`, paused with SIGSTOP between uses) run for FRACTION of
the quiet probe's time, starting at a random point of it; prints the fitted speeds, their spread ((max - min) /
median) and how far the worst loaded probe lies from the quiet median.  Point PYTHONPATH at another checkout to
compare versions.
"""

import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time

import torch
from transformers import BertConfig, BertModel

from prism_edge.cluster.probes import probe_device
from prism_edge.config import PrismConfig, resolve
from prism_edge.models import adapter_for


def main() -> None:
    seed, n, frac = (int(sys.argv[1]) if len(sys.argv) > 1 else 0, int(sys.argv[2]) if len(sys.argv) > 2 else 5,
                     float(sys.argv[3]) if len(sys.argv) > 3 else 0.4)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                 intermediate_size=1536, vocab_size=1000, max_position_embeddings=512)).eval()
    adapter = adapter_for(model)
    cfg = resolve(PrismConfig(devices=4, cr=16), adapter.kind, name="config")
    burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(2)]

    def burn(on: bool) -> None:
        for b in burners:
            os.kill(b.pid, signal.SIGCONT if on else signal.SIGSTOP)

    def probe(at: float | None, length: float) -> tuple[float, float, float]:
        driver = None
        if at is not None:
            driver = threading.Thread(target=lambda: (time.sleep(at), burn(True), time.sleep(length), burn(False)))
            driver.start()
        t0 = time.perf_counter()
        found = probe_device(adapter, cfg, 0)
        took = time.perf_counter() - t0
        if driver is not None:
            driver.join()
        return found["flops_per_s"], found["layer_s"], took

    rng = random.Random(seed)
    burn(False)
    try:
        for _ in range(2):
            probe(None, 0.0)  # warm
        quiet = [probe(None, 0.0) for _ in range(n)]
        span = statistics.median(q[2] for q in quiet)
        loaded = [probe(rng.uniform(0.0, max(0.0, 1.0 - frac)) * span, frac * span) for _ in range(n)]
    finally:
        for b in burners:
            b.kill()
    mq, ml = _summary("quiet ", quiet), _summary("loaded", loaded)
    worst = max(abs(r[0] - mq) / mq for r in loaded)
    print(f"loaded vs quiet median: {(ml - mq) / mq * 100:+.0f}%, worst loaded probe off the quiet median by "
          f"{worst * 100:.0f}%")


def _summary(name: str, rows: list[tuple[float, float, float]]) -> float:
    speeds = [r[0] / 1e9 for r in rows]
    med = statistics.median(speeds)
    print(f"{name}: GFLOP/s {', '.join(f'{x:.1f}' for x in speeds)}; median {med:.1f}, spread "
          f"{(max(speeds) - min(speeds)) / med * 100:.0f}%; intercept ms {', '.join(f'{r[1] * 1e3:.2f}' for r in rows)}"
          f"; probe s median {statistics.median(r[2] for r in rows):.3f}, max {max(r[2] for r in rows):.3f}")
    return med * 1e9


if __name__ == "__main__":
    main()
