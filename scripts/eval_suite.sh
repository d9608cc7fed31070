#!/usr/bin/env bash
# Regenerate docs/results/eval: every accuracy-vs-compression grid and fine-tuning run in docs/RESULTS.md §2.
# About 2 hours of one CPU core in all; the parts are independent (run two at once on two cores):
#   bash scripts/eval_suite.sh grids      training-free grids: MiniLM Lee + polarity, SmolLM2 perplexity, ViT
#   bash scripts/eval_suite.sh encoders   fine-tuning the ViT and MiniLM, their grids with the fine-tuned rows
#   bash scripts/eval_suite.sh decoder    fine-tuning SmolLM2, its grid, other lengths and prose, cloze
# Run after scripts/setup.sh (and apt-get install dataset-fashion-mnist).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/results/eval}
FT=${FT:-results/finetuned}
pe() { .venv/bin/prism-edge "$@" --threads 1; }
mkdir -p "$OUT" "$FT"

grids() {  # P in {2, 4}, CR in {4, 16, 64, 128}; plain / sinks / halo 8 / halo 32 / halo 8 + count bias
  pe eval --task lee --out "$OUT"
  pe eval --task polarity --out "$OUT"
  pe eval --task perplexity --limit 4 --out "$OUT"
  pe eval --task perplexity --limit 4 --devices 4 --cr 16 --variants sinks+halo64 sinks+halo128 sinks+halo32+bias \
    --out "$OUT" --name wide-halo
  pe eval --task fashion --limit 2000 --out "$OUT"
}

encoders() {  # PRISM-aware fine-tuning at P=4 (recipes in prism_edge/finetune.py), then the grids again
  pe finetune --task fashion --devices 4 --cr 64 --out "$FT/vit-fmnist-p4-cr64" 2>&1 | tee "$OUT/finetune-fashion.log"
  pe eval --task fashion --devices 2 4 --cr 16 64 --variants defaults --out "$OUT" --name 10k \
    --finetuned "$FT/vit-fmnist-p4-cr64"
  pe eval --task samples --devices 4 --cr 16 64 --variants plain defaults --out "$OUT"
  pe finetune --task polarity --devices 4 --cr 16 --out "$FT/minilm-polarity-p4-cr16" 2>&1 \
    | tee "$OUT/finetune-polarity.log"
  pe finetune --task polarity --scheme full --out "$FT/minilm-polarity-full" 2>&1 | tee "$OUT/finetune-polarity-full.log"
  pe eval --task polarity --devices 2 4 --cr 4 16 64 128 --variants defaults --out "$OUT" --name finetuned \
    --finetuned "$FT/minilm-polarity-p4-cr16" --finetuned "$FT/minilm-polarity-full"
}

decoder() {
  pe finetune --task perplexity --devices 4 --cr 16 --out "$FT/smollm2-lora-p4-cr16" 2>&1 \
    | tee "$OUT/finetune-perplexity.log"
  pe finetune --task perplexity --scheme full --out "$FT/smollm2-lora-full" 2>&1 | tee "$OUT/finetune-perplexity-full.log"
  pe eval --task perplexity --limit 4 --devices 4 --cr 16 64 --variants defaults --no-voltage --out "$OUT" \
    --name finetuned --finetuned "$FT/smollm2-lora-p4-cr16" --finetuned "$FT/smollm2-lora-full"
  for n in 256 1024; do
    pe eval --task perplexity --length "$n" --limit 2 --devices 4 --cr 16 --variants plain sinks+halo8 defaults \
      --out "$OUT" --name "len$n"
  done
  pe eval --task perplexity --source wiki --limit 4 --devices 4 --cr 16 --variants plain sinks+halo8 defaults \
    --out "$OUT" --name wiki
  pe eval --task cloze --limit 16 --context-chars 600 --devices 4 --cr 16 --variants plain defaults --no-voltage --out "$OUT"
}

if [ $# -eq 0 ]; then set -- grids encoders decoder; fi
for part in "$@"; do "$part"; done
