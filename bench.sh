#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one run of under 10 minutes on one GPU: bench.py's tables (training step
# eager for S and L in fp32 and bf16, DANIE-S compiled against eager, a profile of the eager step, a 512x512x150
# CT volume predicted, data loading), then a timed real ISIC 2017 run (the Sec. 4.2 recipe: batch 8, bf16, 224)
# for the minutes left, and the evaluation of its 100 held-out images. Logs and JSON/CSV go to $OUT.
#   ISIC=/path/to/isic2017 OUT=bench-out bash bench.sh
# ISIC: a folder with ISIC-2017_Training_Data/ and ISIC-2017_Training_Part1_GroundTruth/ (the official layout).
# A stage that fails or reaches its time limit is logged and the next one runs; the run ends within TOTAL_S.
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-bench-out}
ISIC=${ISIC:-data/isic2017}
# Seconds per stage: each stage is stopped at its limit; the real ISIC run gets TOTAL_S less the stages before it and
# less EVAL_S, and is skipped below MIN_TRAIN_S. The limits of the other stages sum to 540, under TOTAL_S.
TOTAL_S=${TOTAL_S:-570}
EAGER_S=${EAGER_S:-150} PROFILE_S=${PROFILE_S:-60} COMPILE_S=${COMPILE_S:-180} PREDICT_S=${PREDICT_S:-90}
DATA_S=${DATA_S:-60} EVAL_S=${EVAL_S:-60} MIN_TRAIN_S=${MIN_TRAIN_S:-90}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1  # no progress bars in the logs
if [[ -e $OUT/isic ]]; then
    echo "error: $OUT/isic exists (an earlier run's results); give bench.sh a fresh OUT" >&2
    exit 2
fi
mkdir -p "$OUT"
log() { echo "== $* ($(date +%T), ${SECONDS} s)" | tee -a "$OUT/bench.log"; }
run() {  # run LIMIT_S COMMAND...: the command, stopped (SIGINT) after LIMIT_S seconds; its output in the log
    local t0=$SECONDS limit=$1
    shift
    timeout -s INT -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/bench.log"
    local rc=${PIPESTATUS[0]}
    echo "$((SECONDS - t0)) s wall, exit $rc$( ((rc == 124)) && echo ", stopped at its $limit s limit")" |
        tee -a "$OUT/bench.log"
}

python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__,
           torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/bench.log"
log "1. train_step eager: S and L, fp32 and bf16, batch 24"
run "$EAGER_S" python bench.py train --modes eager --grid S:none:24 S:bf16:24 L:none:24 L:bf16:24 --out "$OUT/eager"
log "2. the eager DANIE-S bf16 step profiled"
run "$PROFILE_S" python bench.py profile --out "$OUT"
log "3. DANIE-S bf16 batch 24 compiled (train.py --compile) against eager; the compiled step should be ready in 120 s"
run "$COMPILE_S" python bench.py train --grid S:bf16:24 --out "$OUT/compiled"
log "4. a 512x512x150 CT volume predicted (bf16); data loading of the real ISIC 2017 training set"
run "$PREDICT_S" python bench.py predict --amp bf16 --out "$OUT"
run "$DATA_S" python bench.py data --data isic2017 --root "$ISIC" --workers 8 --images 60 --out "$OUT"
LEFT=$((TOTAL_S - EVAL_S - SECONDS))
if ((LEFT >= MIN_TRAIN_S)); then
    log "5. the ISIC recipe (batch 8, bf16, from scratch) for $LEFT s on 1900 training images, 100 held out"
    python -c "
import os, sys, time
path, seen = sys.argv[1], None
while True:  # each log.csv write, the end of an epoch's checkpoint: epoch walls for the validation share
    m = os.stat(path).st_mtime_ns if os.path.exists(path) else None
    if m != seen and m is not None:
        print(f'{m / 1e9:.3f}', flush=True)
    seen = m
    time.sleep(0.02)
" "$OUT/isic/log.csv" > "$OUT/isic-log-times.txt" &
    WATCH=$!
    trap 'kill $WATCH 2>/dev/null' EXIT
    run "$LEFT" python train.py --data isic2017 --root "$ISIC" --val-cases 100 --epochs 200 --amp bf16 \
        --no-pretrained --out "$OUT/isic"
else
    log "5. skipped: $LEFT s left for the ISIC run, under MIN_TRAIN_S=$MIN_TRAIN_S"
fi
if [[ -f $OUT/isic/best.pth ]]; then
    log "6. the 100 held-out images evaluated at 256x256 and at full mask resolution (bf16)"
    run "$EVAL_S" python evaluate.py --ckpt "$OUT/isic/best.pth" --split val --amp bf16 --no-progress \
        --out "$OUT/isic/eval_val"
else
    log "6. skipped: no $OUT/isic/best.pth"
fi
log "done: $OUT/bench.log; $OUT/bench-*.json, $OUT/{eager,compiled}/bench-train.json, $OUT/isic/log.csv,
$OUT/isic-log-times.txt, $OUT/isic/eval_val/summary.json"
