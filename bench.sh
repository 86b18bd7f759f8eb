#!/usr/bin/env bash
# Every speed figure of the README in one run (about 8 minutes on one H100): the training-step table, a timed
# real ISIC 2017 run with its validation and checkpoints, evaluation of held-out images, the metric and
# inference benchmark, and prediction on a 512x512x150 CT volume. Logs and JSON/CSV go to $OUT.
#   ISIC=/path/to/isic2017 OUT=bench-out bash bench.sh
# ISIC: a folder with ISIC-2017_Training_Data/ and ISIC-2017_Training_Part1_GroundTruth/ (the official layout).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-bench-out}
ISIC=${ISIC:-data/isic2017}
mkdir -p "$OUT"
log() { echo "== $* ($(date +%T))" | tee -a "$OUT/bench.log"; }
run() { local t0=$SECONDS; "$@" 2>&1 | tee -a "$OUT/bench.log"; echo "$((SECONDS - t0)) s wall" | tee -a "$OUT/bench.log"; }

python -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/bench.log"
log "1. train_step table: S and L, fp32 and bf16, eager and graph mode, batch 24 and 8"
run python train.py --bench --out "$OUT"
log "2. the ISIC recipe (batch 8, bf16) for 3 epochs on 1900 training images, 100 held out for validation"
run python train.py --data isic2017 --root "$ISIC" --val-cases 100 --epochs 3 --amp bf16 --no-pretrained \
    --out "$OUT/isic"
log "3. evaluation of the 100 held-out images at full mask resolution (bf16)"
run python evaluate.py --ckpt "$OUT/isic/best.pth" --split val --amp bf16 --no-progress --out "$OUT/isic/eval_val"
log "4. metrics against medpy, inference per volume, ISIC-style images/s"
run python evaluate.py --bench
log "5. prediction on a 512x512x150 CT volume in Hounsfield units (NIfTI)"
python -c "
import nibabel as nib, numpy as np
a = np.random.default_rng(0).uniform(-1000, 1000, (512, 512, 150)).astype(np.float32)
nib.save(nib.Nifti1Image(a, np.diag([0.7, 0.7, 2.5, 1.0])), '$OUT/ct.nii.gz')"
python -c "
import torch, model, evaluate, data, argparse
net = model.danie('S', num_classes=9, img_size=224)
spec = data.SPECS['synapse']
info = dict(name='synapse', root='', label_map='transunet', val_cases=None, seed=0, selected_on='val',
            spec=data.spec_to_dict(spec))
torch.save(evaluate.make_checkpoint(net, info, {}, 'random', 0, 0, None), '$OUT/random-S.pth')"
run python evaluate.py --ckpt "$OUT/random-S.pth" --input "$OUT/ct.nii.gz" --out "$OUT/pred" --amp bf16
log "done: logs in $OUT/bench.log; tables in $OUT/bench.json, $OUT/isic/log.csv, $OUT/isic/eval_val/summary.json"
