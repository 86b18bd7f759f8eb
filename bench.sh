#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one run (minutes on one GPU): bench.py's tables (training step, evaluation,
# prediction of a CT volume, data loading), a timed real ISIC 2017 run with its validation and checkpoints, and the
# evaluation of its held-out images. Logs and JSON/CSV go to $OUT.
#   ISIC=/path/to/isic2017 OUT=bench-out bash bench.sh
# ISIC: a folder with ISIC-2017_Training_Data/ and ISIC-2017_Training_Part1_GroundTruth/ (the official layout).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-bench-out}
ISIC=${ISIC:-data/isic2017}
mkdir -p "$OUT"
log() { echo "== $* ($(date +%T))" | tee -a "$OUT/bench.log"; }
run() { local t0=$SECONDS; "$@" 2>&1 | tee -a "$OUT/bench.log"; echo "$((SECONDS - t0)) s wall" | tee -a "$OUT/bench.log"; }

python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__,
           torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/bench.log"
log "1. bench.py: train_step (S and L, fp32 and bf16, eager and compiled), evaluation, a 512x512x150 CT predicted"
run python bench.py train eval predict --amp bf16 --out "$OUT"
log "2. data loading of the real ISIC 2017 training set"
run python bench.py data --data isic2017 --root "$ISIC" --workers 8 --out "$OUT"
log "3. the ISIC recipe (batch 8, bf16) for 3 epochs on 1900 training images, 100 held out for validation"
run python train.py --data isic2017 --root "$ISIC" --val-cases 100 --epochs 3 --amp bf16 --no-pretrained \
    --out "$OUT/isic"
log "4. evaluation of the 100 held-out images at full mask resolution (bf16)"
run python evaluate.py --ckpt "$OUT/isic/best.pth" --split val --amp bf16 --no-progress --out "$OUT/isic/eval_val"
log "done: logs in $OUT/bench.log; tables in $OUT/bench-*.json, $OUT/isic/log.csv, $OUT/isic/eval_val/summary.json"
