"""Smoke check on a CUDA device: the simulator on GPU matches the HF model (CR=1) and the CPU run (CR=4).

python scripts/gpu_check.py    (needs a CUDA GPU; prints one line per model and exits non-zero on a mismatch)
"""

from __future__ import annotations

import sys
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
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
