#!/usr/bin/env bash
# Regenerate docs/results/eval: the accuracy-against-bytes frontiers and fine-tuning runs in docs/RESULTS.md §2.
# Hours of one CPU core in all; the parts are independent (run two at once on two cores):
#   bash scripts/eval_suite.sh encoder    MiniLM: Lee (cosine, Pearson) and polarity frontiers, P 2 and 4
#   bash scripts/eval_suite.sh decoder    SmolLM2 perplexity frontiers: news 512 (two grids), 256, 1024, Wikipedia
#   bash scripts/eval_suite.sh vision     the Fashion-MNIST ViT frontier, P 2 and 4, CR 16 and 64
#   bash scripts/eval_suite.sh budgets    byte-budget sweeps on held-out data at several lengths (P=4, CR=16),
#                                         then the shipped frontier tables (prism_edge/data/frontiers.json)
# Run after scripts/setup.sh (and apt-get install dataset-fashion-mnist).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/results/eval}
FT=${FT:-results/finetuned}
pe() { .venv/bin/prism-edge "$@" --threads 1; }
mkdir -p "$OUT" "$FT"

# Fidelity variants (prism-edge eval --variants spelling; see prism_edge/eval/harness.py):
# sinks, wN (exact window), topN / topfF (exact rows by importance), sim (similarity groups), bias (log count),
# int8 / fp16 (wire), anchorN (recomputed first positions), cheap (exact when summarising does not halve a route).
ENCODER="plain sinks sinks+w8 sinks+w32 sinks+top4 sinks+top8 sinks+w4+top4 sinks+w8+top8 sinks+w16+top16
  sinks+w8+int8 sinks+w32+int8 sinks+w8+top8+int8 sinks+w16+top16+int8 sinks+topf0.25+int8 sinks+w8+topf0.25+int8
  sinks+sim sinks+sim+bias sinks+w8+sim+bias sinks+w8+top8+fp16 defaults"
DECODER_A="plain sinks sinks+w8 sinks+w32 sinks+w64 sinks+w128 sinks+top8 sinks+top16 sinks+top32 sinks+w16+top16
  sinks+w32+top32 sinks+w8+top24 sinks+topf0.125 sinks+w32+topf0.25 sinks+w32+sim sinks+w32+bias sinks+w32+sim+bias
  sinks+w32+top32+fp16 sinks+w32+top32+bf16"
DECODER_B="plain+int8 sinks+w32+int8 sinks+w8+top8+int8 sinks+w16+top16+int8 sinks+w32+top32+int8
  sinks+w64+top64+int8 sinks+top16+int8 sinks+w16+topf0.125+int8 sinks+w32+topf0.25+int8 sinks+w64+topf0.5+int8
  anchor1+w32+top32+int8 anchor16+w16+top16+int8 anchor64+w32+top32+int8"
DECODER_OTHER="plain sinks+w32 sinks+w16+top16+int8 sinks+w32+top32+int8 sinks+w64+top64+int8 sinks+w16+topf0.125+int8
  sinks+w32+topf0.25+int8 sinks+w32+top32+sim+bias+int8"
VISION="plain sinks+bias sinks+sim+bias sinks+top4+sim+bias+int8 sinks+top8+sim+bias+int8 sinks+top16+sim+bias+int8
  sinks+top8+int8 sinks+topf0.125+sim+bias+int8 sinks+w8+top8+sim+bias+int8"

encoder() {
  pe eval --task lee --devices 2 4 --cr 16 64 --variants $ENCODER --out "$OUT"
  pe eval --task polarity --devices 4 --cr 16 --variants plain sinks sinks+w8+top8+int8 sinks+w16+top16+int8 defaults \
    --out "$OUT"
}

decoder() {
  pe eval --task perplexity --limit 4 --devices 4 --cr 16 --variants $DECODER_A --out "$OUT" --name news512-a
  pe eval --task perplexity --limit 4 --devices 4 --cr 16 64 --variants $DECODER_B --out "$OUT" --name news512-b
  pe eval --task perplexity --length 256 --limit 8 --devices 4 --cr 16 --variants $DECODER_OTHER --out "$OUT" --name news256
  pe eval --task perplexity --length 1024 --limit 2 --devices 4 --cr 16 --variants $DECODER_OTHER --out "$OUT" --name news1024
  pe eval --task perplexity --source wiki --limit 4 --devices 4 --cr 16 --variants $DECODER_OTHER --out "$OUT" --name wiki512
  # the shipped defaults, measured after they were chosen from the grids above
  pe eval --task perplexity --limit 4 --devices 4 --cr 16 64 --variants defaults --out "$OUT" --name news512-defaults
  pe eval --task perplexity --length 256 --limit 8 --devices 4 --cr 16 --variants defaults --out "$OUT" --name news256-defaults
  pe eval --task perplexity --length 1024 --limit 2 --devices 4 --cr 16 --variants defaults --out "$OUT" --name news1024-defaults
  pe eval --task perplexity --source wiki --limit 4 --devices 4 --cr 16 --variants defaults --out "$OUT" --name wiki512-defaults
  pe eval --task perplexity --limit 4 --devices 2 --cr 16 --variants plain sinks+w32 sinks+w32+top32+int8 defaults \
    --out "$OUT" --name news512-p2
  pe eval --task cloze --limit 16 --context-chars 600 --devices 4 --cr 16 --variants plain sinks+w32 defaults \
    --no-voltage --out "$OUT"
}

vision() {
  pe eval --task fashion --limit 2000 --devices 2 4 --cr 16 64 --variants $VISION --out "$OUT"
  pe eval --task fashion --limit 2000 --devices 2 4 --cr 16 64 --variants defaults --out "$OUT" --name defaults
  pe eval --task samples --devices 4 --cr 16 64 --variants plain defaults --out "$OUT"
}

if [ $# -eq 0 ]; then set -- encoder decoder vision; fi

budgets() {
  # Held-out data only (the defaults were chosen on the dev split: --split dev).  About 45 min of one core.
  local B="$OUT/../budgets"
  mkdir -p "$B"
  for cell in "lee 50" "lee 100" "lee 200" "wiki 200" "wiki 500"; do
    set -- $cell
    pe eval --task passages --source "$1" --length "$2" --limit 24 --devices 4 --cr 16 \
      --variants defaults sinks+w8+top8+int8+cheap --budget 0.05 0.1 0.15 0.2 0.25 --out "$B" --name "$1$2"
  done
  pe eval --task lee --devices 2 4 --cr 16 64 --variants defaults sinks+w8+top8+int8+cheap --out "$B"
  for cell in "lee 256 8" "lee 512 4" "lee 1024 4" "wiki 512 4"; do
    set -- $cell
    pe eval --task perplexity --source "$1" --length "$2" --limit "$3" --devices 4 --cr 16 \
      --variants defaults defaults+budget0 --budget 0.05 0.1 0.15 0.2 --out "$B" --name "$1$2"
  done
  pe eval --task fashion --limit 1000 --devices 4 --cr 16 --variants defaults --budget 0.05 0.1 0.15 \
    --out "$B" --name budgets
  .venv/bin/python -m prism_edge.eval.frontiers --plots "$B" "$B"/eval-passages-*.json "$B"/eval-perplexity-*.json \
    "$B"/eval-fashion-budgets.json
}

for part in "$@"; do "$part"; done
