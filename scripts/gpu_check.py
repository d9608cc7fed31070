"""Smoke check on a CUDA device: the simulator on GPU matches the HF model (CR=1) and the CPU run (CR=4),
and the multi-process runtime with its device processes on the GPU matches the CPU simulator.

python scripts/gpu_check.py    (needs a CUDA GPU; prints one line per model and exits non-zero on a mismatch)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parents[1]), str(Path(__file__).parents[1] / "tests")]
from conftest import BUILDERS, image_batch, text_batch, tiny  # noqa: E402

from prism_edge import PrismConfig, simulate  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(torch.__version__, torch.cuda.get_device_name(), __import__("transformers").__version__)
    bad = 0
    for name in BUILDERS:
        cpu = tiny(name)
        gpu = tiny(name).cuda()
        if name.startswith("vit"):
            kw = dict(pixel_values=image_batch())
            mask = None
        else:
            ids, mask = text_batch(batch=3, length=21, pad_to=[21, 15, 9])
            kw = dict(input_ids=ids, attention_mask=mask)
        kw_gpu = {k: v.cuda() for k, v in kw.items()}
        with torch.no_grad():
            ref = gpu(**kw_gpu)
            ref = ref.logits if getattr(ref, "logits", None) is not None else ref.last_hidden_state
            exact = simulate(gpu, PrismConfig(devices=3, cr=1), **kw_gpu)
            exact = exact.logits if exact.logits is not None else exact.last_hidden_state
            approx_gpu = simulate(gpu, PrismConfig(devices=3, cr=4), **kw_gpu)
            approx_cpu = simulate(cpu, PrismConfig(devices=3, cr=4), **kw)
        pick = (lambda t: t[mask.bool().cuda()]) if mask is not None and ref.dim() == 3 else (lambda t: t)
        d_exact = (pick(exact) - pick(ref)).abs().max().item()
        a_gpu = approx_gpu.logits if approx_gpu.logits is not None else approx_gpu.last_hidden_state
        a_cpu = approx_cpu.logits if approx_cpu.logits is not None else approx_cpu.last_hidden_state
        d_cpu = (pick(a_gpu).cpu() - pick(a_cpu.cuda()).cpu()).abs().max().item()
        same_bytes = approx_gpu.stats.total_bytes == approx_cpu.stats.total_bytes
        ok = d_exact <= 1e-3 and d_cpu <= 1e-3 and same_bytes  # TF32 may be on for GPU matmuls
        bad += not ok
        print(f"{name:9s} CR=1 vs HF {d_exact:.2e}  CR=4 GPU vs CPU {d_cpu:.2e}  bytes equal {same_bytes}  "
              f"{'ok' if ok else 'MISMATCH'}")
    return 1 if bad + runtime_on_gpu() else 0


def runtime_on_gpu() -> int:
    """Two device processes (sharing the GPU, gloo through host memory) against the CPU simulator."""
    from prism_edge.cluster import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    bad = 0
    with tempfile.TemporaryDirectory() as root:
        for name in ("bert", "gpt2-lm", "llama-lm", "vit-cls"):
            path = os.path.join(root, name)
            model = tiny(name)
            model.save_pretrained(path)
            kw = dict(pixel_values=image_batch()) if name.startswith("vit") else dict(
                zip(("input_ids", "attention_mask"), text_batch(batch=3, length=21, pad_to=[21, 15, 9])))
            cfg = PrismConfig(devices=2, cr=4, window=1)
            with Cluster(path, cfg, device="cuda", timeout=60) as cluster:
                out = cluster(**kw)
            ref = simulate(model, cfg, **kw, count_flops=False)
            diff = max((getattr(out, k) - getattr(ref, k)).abs().max().item() for k in ref.keys()
                       if k not in ("stats", "plan"))
            same = out.stats.sent == ref.stats.sent and out.stats.input_bytes == ref.stats.input_bytes
            ok = diff <= 1e-3 and same
            bad += not ok
            print(f"runtime {name:9s} 2 GPU device processes vs CPU simulator {diff:.2e}  bytes equal {same}  "
                  f"{'ok' if ok else 'MISMATCH'}")
    return bad


if __name__ == "__main__":
    sys.exit(main())
