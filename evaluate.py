"""
Evaluation of DANIE (paper Sec. 4.3, Tables 1-4): metrics, the per-dataset protocol, checkpoints, prediction.

    python evaluate.py --ckpt out/best.pth            # the checkpoint names dataset, root, classes, img size
    python evaluate.py --ckpt out/best.pth --legacy   # TransUNet's empty-mask rule, to compare with the tables
    python evaluate.py --ckpt out/best.pth --input PATH --out DIR [--tta]   # label maps for files without labels
    python evaluate.py --bench                        # metric speed against medpy, inference and ISIC speed

Offers: make_checkpoint / load_checkpoint / model_from_checkpoint (the one home of the checkpoint layout),
evaluate() (train.py validates with it), predict_case(), binary_metrics(), confusion_counts(), table_resize(),
autodetect_device(), autocast(), AMP_DTYPES.

Synapse / ACDC (Tables 1-2): volume by volume, per class on the 3-D label map, in voxels (no spacing, as the
peers): Dice, IoU, HD95, ASD; mean over cases per class, then over classes. ISIC 2017/2018 (Table 3): Dice,
SE, SP, ACC from one confusion matrix pooled over all test images after Azad et al.'s resize of every mask to
256x256 ('pooled_256', the table's figures), with the same pooled at native resolution ('pooled_native') and
per-image means beside them. GlaS (Table 4): per-image Dice and IoU, averaged.

Surface = mask XOR its erosion (connectivity 1); HD95 = 95th percentile of both directed distance sets;
ASD = the symmetric average surface distance: one mean over the distances of both surfaces (medpy >= 0.5's
assd, Heimann et al. 2009). Values equal medpy's dc, jc, hd95, assd whenever both masks are non-empty.

Empty masks, default rule (the peers' code gets this wrong, TransUNet issue 39):
  both empty             -> that case is left out for that class (all four NaN, skipped in the means): Dice is
                            0/0 there, and counting it as 1 would reward classes that are simply absent.
  exactly one empty      -> Dice 0, IoU 0 (the formulas are defined there), HD95 = ASD = the array's diagonal in
                            voxels, the largest distance that fits (BraTS' convention): a missed or hallucinated
                            organ is the worst boundary error, not a case to drop.
legacy=True / --legacy, TransUNet's and CASCADE's calculate_metric_percase, for comparing with published tables:
  pred non-empty, gt empty -> Dice 1, IoU 1, HD95 0, ASD 0;  pred empty -> all 0;  ASD = the mean of the two
  directed means (medpy < 0.5's assd, which those papers ran).
"""

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import model as danie_model

# -----------------------------------------------------------------------------
# constants

FORMAT = 'danie-ckpt-v2'
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # --amp
METRICS = ('dice', 'iou', 'hd95', 'asd')
ISIC_METRICS = ('se', 'sp', 'acc')
COUNTS = ('tp', 'fp', 'fn', 'tn')
TABLE3_SIZE = 256        # Azad et al. resize every ISIC image and mask to 256x256 before pooling
PIL_BITS = 22            # Pillow's fixed-point precision for 8-bit resampling (Resample.c PRECISION_BITS)
FLIPS = ((-1,), (-2,), (-2, -1))  # --tta: horizontal, vertical, both (plus the identity)
RULES = {
    'default': 'both empty: case skipped for that class (NaN); one empty: Dice 0, IoU 0, HD95 = ASD = array '
               'diagonal in voxels; ASD = mean over the union of both surfaces (medpy >= 0.5 assd)',
    'legacy': "TransUNet's calculate_metric_percase: pred non-empty and gt empty: Dice 1, IoU 1, HD95 0, ASD 0; "
              'pred empty: all 0; ASD = mean of the two directed means (medpy < 0.5 assd)',
}


class CheckpointError(Exception):
    """A checkpoint file that is missing, unreadable, or not a DANIE checkpoint of this version."""


# -----------------------------------------------------------------------------
# helpers

def autodetect_device():
    if torch.cuda.is_available():
        return torch.device('cuda')
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        return torch.device('mps')
    return torch.device('cpu')


def default_workers(device):
    """Processes that read cases ahead of the model: 4 on a GPU, none on a CPU (which the model itself keeps busy)."""
    return 4 if device.type == 'cuda' else 0


def autocast(device, amp):
    """Autocast context for --amp {none,bf16,fp16}; train.py and evaluate.py share it."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != 'none')


def _nanmean(values):
    """Mean of the finite values; NaN when there are none (no RuntimeWarning)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    return float(v.mean()) if v.size else float('nan')


def _json_safe(obj):
    """NaN -> null, numpy scalars -> Python: summary.json stays strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(obj) or math.isinf(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _bbox(mask, margin=1):
    """Slices of the bounding box of a non-empty mask, grown by `margin` and clipped to the array."""
    box = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        nz = np.flatnonzero(mask.any(axis=other)) if other else np.flatnonzero(mask)
        box.append(slice(max(int(nz[0]) - margin, 0), min(int(nz[-1]) + 1 + margin, mask.shape[ax])))
    return tuple(box)


def _bare(model):
    """The DANIE inside a DistributedDataParallel and/or torch.compile wrapper."""
    while isinstance(model, DistributedDataParallel) or hasattr(model, '_orig_mod'):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    return model


# -----------------------------------------------------------------------------
# blocks: metrics

def _surface_distances(a, b):
    """Distances from a's surface voxels to b's surface and back (medpy's __surface_distances, both ways)."""
    # surface = mask XOR its erosion with connectivity 1; erosion's border_value=0 treats outside as empty,
    # which is also true of the voxels cut away by the bounding box, so the crop changes nothing
    footprint = ndimage.generate_binary_structure(a.ndim, 1)
    sa = a ^ ndimage.binary_erosion(a, structure=footprint, iterations=1)
    sb = b ^ ndimage.binary_erosion(b, structure=footprint, iterations=1)
    # the EDT gives each voxel's distance to the nearest zero, i.e. to the nearest surface voxel of the
    # other mask; all of those lie inside the crop, so the distances are exact
    d_ab = ndimage.distance_transform_edt(~sb)[sa]
    d_ba = ndimage.distance_transform_edt(~sa)[sb]
    return d_ab, d_ba


def _overlap(n_pred, n_gt, inter, legacy=False):
    """Dice and IoU of two masks from their sizes and intersection, with the module's empty-mask rules."""
    nan = float('nan')
    if legacy and n_pred == 0:
        return dict(dice=0.0, iou=0.0)
    if legacy and n_gt == 0:
        return dict(dice=1.0, iou=1.0)
    # NOTE(impl): both masks empty -> NaN, case skipped for that class: Dice is 0/0, a free 1 rewards absent organs
    if n_pred == 0 and n_gt == 0:
        return dict(dice=nan, iou=nan)
    # same float expressions as medpy's dc and jc, so the values agree to the last bits
    return dict(dice=2.0 * inter / float(n_pred + n_gt), iou=float(inter) / float(n_pred + n_gt - inter))


def binary_metrics(pred, gt, legacy=False, distances=True):
    """Dice, IoU, HD95, ASD (symmetric, in voxels) of two boolean masks of any dimension; see the module's rule.

    distances=False skips HD95/ASD (NaN), for image sets whose tables report overlap only."""
    pred = np.atleast_1d(np.asarray(pred, dtype=bool))
    gt = np.atleast_1d(np.asarray(gt, dtype=bool))
    if pred.shape != gt.shape:
        raise ValueError(f'binary_metrics: pred {pred.shape} and gt {gt.shape} differ in shape')
    nan = float('nan')
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    if legacy and (n_pred == 0 or n_gt == 0):
        return dict(_overlap(n_pred, n_gt, 0, legacy), hd95=0.0 if distances else nan, asd=0.0 if distances else nan)
    if n_pred == 0 or n_gt == 0:
        # NOTE(impl): one mask empty -> Dice 0, IoU 0, HD95 = ASD = array diagonal (BraTS): a missed organ is the worst case
        worst = float(np.sqrt(np.sum(np.square(np.asarray(pred.shape, dtype=np.float64))))) if distances else nan
        both_empty = n_pred == 0 and n_gt == 0
        return dict(_overlap(n_pred, n_gt, 0), hd95=nan if both_empty else worst, asd=nan if both_empty else worst)

    # everything happens inside the bounding box of the union (+1 voxel): a 512x512x150 CT becomes an organ
    box = _bbox(pred | gt, margin=1)
    p, g = pred[box], gt[box]
    scores = _overlap(n_pred, n_gt, int(np.count_nonzero(p & g)))
    if not distances:
        return dict(scores, hd95=nan, asd=nan)
    # NOTE(impl): distances in voxels, no spacing, as the peers (the public Synapse/ACDC files carry no spacing)
    d_pg, d_gp = _surface_distances(p, g)
    hd95 = float(np.percentile(np.hstack((d_pg, d_gp)), 95))
    # NOTE(impl): ASD = one mean over both surfaces' distances (medpy >= 0.5, Heimann 2009); legacy: mean of the 2 means
    if legacy:
        # medpy < 0.5, which TransUNet/CASCADE ran (changed in loli/medpy issues 108 and 131)
        asd = float(np.mean((d_pg.mean(), d_gp.mean())))
    else:
        asd = float(np.concatenate((d_pg, d_gp)).mean())
    return dict(scores, hd95=hd95, asd=asd)


def confusion_counts(pred, gt, classes):
    """(len(classes), 4) int64 tensor of tp, fp, fn, tn of pred == c against gt == c, on pred's device."""
    rows = []
    for c in classes:
        p, g = pred == c, gt == c
        tp = (p & g).sum()
        n_p, n_g = p.sum(), g.sum()
        rows.append(torch.stack((tp, n_p - tp, n_g - tp, p.numel() - n_p - n_g + tp)))
    return torch.stack(rows)  # only these few numbers cross to the host


def confusion_scores(tp, fp, fn, tn):
    """Dice, SE (recall), SP, ACC of one confusion matrix; NaN where a ratio is 0/0."""
    def ratio(a, b):
        return a / b if b else float('nan')
    return dict(dice=ratio(2 * tp, 2 * tp + fp + fn), se=ratio(tp, tp + fn), sp=ratio(tn, tn + fp),
                acc=ratio(tp + tn, tp + fp + fn + tn))


def _pil_weights(n_in, n_out):
    """Pillow's BILINEAR resampling matrix (n_out, n_in) in its 22-bit fixed point (Resample.c precompute_coeffs)."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # the triangle's support of 1 pixel, widened when shrinking (antialiasing)
    centre = (np.arange(n_out) + 0.5) * scale
    w = np.clip(1.0 - np.abs((np.arange(n_in)[None, :] - centre[:, None] + 0.5) * (1.0 / support)), 0.0, None)
    w = w / np.cumsum(w, axis=1)[:, -1:]  # Pillow sums left to right: the same rounding
    return np.floor(0.5 + w * (1 << PIL_BITS))


def table_resize(masks, size=TABLE3_SIZE):
    """Boolean masks (N,H,W) (torch, any device) -> (N,size,size) as Azad et al. resize ISIC masks.

    scipy.misc.imresize(mask, [256, 256], interp='bilinear') on the 0/255 PNG, then /255 > 0.5: Pillow's
    BILINEAR, horizontal pass then vertical, each rounded to uint8, reproduced exactly in float64."""
    h, w = masks.shape[-2:]
    if (h, w) == (size, size):
        return masks.clone()
    x = masks.to(torch.float64) * 255
    for dim, n in ((-1, w), (-2, h)):  # Pillow's order: horizontal first
        k = torch.from_numpy(_pil_weights(n, size)).to(x.device)  # (size,n)
        x = torch.movedim(torch.movedim(x, dim, -1) @ k.T, -1, dim)  # (..,n) @ (n,size) -> (..,size)
        x = torch.clamp(torch.floor((x + (1 << (PIL_BITS - 1))) / (1 << PIL_BITS)), 0, 255)
    return x >= 128  # uint8 / 255 > 0.5


# -----------------------------------------------------------------------------
# blocks: checkpoints

def make_checkpoint(model, data_info, args, init, epoch, step, metric, train_state=None):
    """The checkpoint layout (its one home): what evaluate.py needs, plus train.py's state for last.pth only."""
    net = _bare(model)
    ckpt = {'format': FORMAT, 'config': dataclasses.asdict(net.config), 'model': net.state_dict(),
            'data': dict(data_info), 'args': dict(vars(args) if isinstance(args, argparse.Namespace) else args),
            'init': str(init), 'epoch': epoch, 'step': step, 'metric': metric}
    if train_state is not None:
        ckpt['train'] = train_state
    return ckpt


def load_checkpoint(path, resume=False):
    """Read a checkpoint and check its layout (resume=True: also train.py's state); CheckpointError names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such checkpoint file (train.py writes best.pth / last.pth '
                              'into its --out folder)')
    try:
        # checkpoints hold tensors and plain types only, so the safe unpickler suffices
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle, zip and EOF errors all mean the same thing to the user
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})') from e
    if not isinstance(ckpt, dict) or 'format' not in ckpt:
        what = f'a dict with keys {sorted(map(str, ckpt))[:8]}' if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a DANIE checkpoint (found {what}, no 'format' key; expected "
                              f"format {FORMAT!r} as written by train.py)")
    if ckpt['format'] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format']!r}, this evaluate.py reads {FORMAT!r}")
    missing = [k for k in ('config', 'model', 'data', 'args', 'init', 'epoch', 'step', 'metric') if k not in ckpt]
    if missing:
        raise CheckpointError(f'{path}: {FORMAT} checkpoint without {missing}')
    if not isinstance(ckpt['data'], dict) or not {'name', 'spec'} <= set(ckpt['data']):
        raise CheckpointError(f"{path}: checkpoint 'data' must be a dict naming the dataset ('name') and its "
                              "classes ('spec')")
    if resume and 'train' not in ckpt:
        raise CheckpointError(f"{path}: no training state ('train'): best.pth holds only what evaluation needs; "
                              'resume from last.pth')
    return ckpt


def model_from_checkpoint(ckpt):
    """model.DANIE built from ckpt['config'] with ckpt['model'] loaded strictly (mismatch -> CheckpointError)."""
    fields = {f.name for f in dataclasses.fields(danie_model.DANIEConfig)}
    unknown = sorted(set(ckpt['config']) - fields)
    if unknown:
        raise CheckpointError(f'checkpoint config has fields {unknown} that model.DANIEConfig does not know '
                              '(written by another version of model.py)')
    # tuples may come back as lists from other writers; the frozen config wants hashable values
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt['config'].items()}
    try:
        net = danie_model.DANIE(danie_model.DANIEConfig(**cfg))
    except Exception as e:
        raise CheckpointError(f'cannot build DANIE from the checkpoint config {cfg}: {type(e).__name__}: {e}') from e
    state = ckpt['model']
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        hint = ''
        if isinstance(state, dict) and any(str(k).startswith(('module.', '_orig_mod.')) for k in state):
            hint = " (keys start with 'module.' / '_orig_mod.': a DDP/compiled state_dict; save the bare module)"
        raise CheckpointError('checkpoint weights do not fit the model built from its config: '
                              + ' '.join(str(e).split()) + hint) from e
    return net


# -----------------------------------------------------------------------------
# blocks: prediction, batched forward pass, argmax and the resize back, all on the model's device

def _forward(model, x, tta=False):
    """Class scores of x (n,3,S,S): the logits, or with tta the mean softmax over the flips."""
    def scores(z):
        y = model(z)
        return (y[0] if isinstance(y, (tuple, list)) else y).float()  # DANIE returns (y, [p1..p4]); y is Eq. 12's sum
    if not tta:
        return scores(x)
    # NOTE(impl): --tta = mean softmax over identity, horizontal, vertical and both flips (nnU-Net's 2-D mirroring)
    total = scores(x).softmax(1)
    for dims in FLIPS:
        total += scores(x.flip(dims)).softmax(1).flip(dims)
    return total / (1 + len(FLIPS))


def segment(model, x, device, batch_size=16, amp='none', tta=False):
    """Label maps (N,S,S) uint8 on `device` of the prepared input x (N,3,S,S), batch_size slices per pass."""
    labels = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device, non_blocking=True)
            xb = xb.contiguous(memory_format=danie_model.MEMORY_FORMAT)  # (n,3,S,S)
            with autocast(device, amp):
                y = _forward(model, xb, tta)
            # NOTE(impl): argmax over the K logits; for K = 2 (ISIC, GlaS) it is the lineage's softmax threshold 0.5
            labels.append(y.argmax(1).to(torch.uint8))  # (n,K,S,S) -> (n,S,S)
    return torch.cat(labels)


def _slices(image, kind):
    """A case's image as a stack: volume (D,H,W) float as is, an RGB image (H,W,3) as (1,H,W,3)."""
    return image if kind == 'volume' else image[None]


def load_case(case, spec, img_size, keep_image=False):
    """DataLoader collate for evaluate(): the Case and its model input, made in a worker while the GPU runs.

    The label travels as a tensor (shared memory; uint8 where the ids fit), the image only when it is written."""
    label = torch.from_numpy(case.label.astype(np.uint8 if spec.num_classes <= 256 else np.int64))
    x = data.prepare_input(_slices(case.image, spec.kind), img_size)
    return dataclasses.replace(case, image=case.image if keep_image else None, label=label), x


def predict_case(model, case, spec, img_size, device, batch_size=16, amp='none', x=None):
    """Label map of one case at its label's size, on `device`: resize to img_size, argmax, data.restore_size."""
    x = data.prepare_input(_slices(case.image, spec.kind), img_size) if x is None else x  # (N,3,S,S)
    labels = data.restore_size(segment(model, x, device, batch_size, amp), case.label.shape[-2:], spec.kind)
    return labels if spec.kind == 'volume' else labels[0]  # (D,H,W) / (H,W)


# -----------------------------------------------------------------------------
# top level: the protocol

def _image_rows(case_id, pred, gt, spec, legacy, distances):
    """Rows of an image case from its confusion counts, computed where pred lives: native size and 256x256."""
    classes = spec.report_order
    counts = confusion_counts(pred, gt, classes)
    # NOTE(impl): 'pooled_256': prediction and mask (native size) both get Azad et al.'s mask resize to 256x256
    small = [table_resize(torch.stack((pred == c, gt == c))) for c in classes]  # (2,256,256) each
    counts_256 = torch.stack([confusion_counts(p[None], g[None], (True,))[0] for p, g in small])
    rows = []
    for c, n, n256 in zip(classes, counts.tolist(), counts_256.tolist()):
        tp, fp, fn, tn = n
        row = {'case': case_id, 'class': spec.class_names[c], **_overlap(tp + fp, tp + fn, tp, legacy),
               'hd95': float('nan'), 'asd': float('nan')}
        if distances:
            p, g = (np.asarray(torch.as_tensor(a == c).cpu()) for a in (pred, gt))
            row.update(binary_metrics(p, g, legacy=legacy))
        row.update({k: v for k, v in confusion_scores(*n).items() if k != 'dice'})
        row.update(zip(COUNTS, n))
        row.update(zip((f'{k}_256' for k in COUNTS), n256))
        rows.append(row)
    return rows


def case_rows(case_id, pred, gt, spec, legacy=False, distances=True):
    """One row per reported class: case, class, dice, iou, hd95, asd (+ se, sp, acc and the counts for images).

    pred, gt: label maps (numpy or torch, any device). Volumes go to the exact scipy metrics on the host;
    images are counted on pred's device."""
    if spec.kind == 'image':
        pred = torch.as_tensor(pred)
        return _image_rows(case_id, pred, torch.as_tensor(gt).to(pred.device), spec, legacy, distances)
    pred, gt = (np.asarray(torch.as_tensor(a).cpu()) for a in (pred, gt))
    return [{'case': case_id, 'class': spec.class_names[c],
             **binary_metrics(pred == c, gt == c, legacy=legacy, distances=distances)} for c in spec.report_order]


def _pooled(rows, names, suffix=''):
    """Dice, SE, SP, ACC of the confusion matrix pooled over all rows, per class and averaged over classes."""
    per = {n: confusion_scores(*(sum(r[k + suffix] for r in rows if r['class'] == n) for k in COUNTS)) for n in names}
    return {m: _nanmean(per[n][m] for n in names) for m in ('dice',) + ISIC_METRICS}, per


def summarize(rows, spec, legacy=False):
    """Mean over cases per class, then over classes; image sets also pooled confusion matrices (Table 3)."""
    names = [spec.class_names[c] for c in spec.report_order]
    per_class = {}
    for name in names:
        mine = [r for r in rows if r['class'] == name]
        per_class[name] = {m: _nanmean(r[m] for r in mine) for m in METRICS}
        # cases that count for this class (both-empty cases are skipped under the default rule)
        per_class[name]['n'] = sum(not math.isnan(r['dice']) for r in mine)
    out = dict(rule='legacy' if legacy else 'default', rule_text=RULES['legacy' if legacy else 'default'],
               n_cases=len({r['case'] for r in rows}), classes=names, per_class=per_class)
    # NOTE(impl): class means skip NaN (both-empty) cases; the mean over classes skips classes with no case left
    for m in METRICS:
        out[f'mean_{m}'] = _nanmean(per_class[n][m] for n in names)
    if spec.kind == 'image':
        out['pooled_native'], out['pooled_native_per_class'] = _pooled(rows, names)
        out['pooled_256'], out['pooled_256_per_class'] = _pooled(rows, names, '_256')
        keys = ('dice', 'iou') + ISIC_METRICS
        per_image = {n: {m: _nanmean(r[m] for r in rows if r['class'] == n) for m in keys} for n in names}
        out['per_image'] = {m: _nanmean(per_image[n][m] for n in names) for m in keys}
        if spec.name.startswith('isic'):
            # NOTE(impl): ISIC's mean_dice = Dice pooled at 256x256 (Azad et al.'s code, Table 3's lineage), per-image beside
            out['mean_dice_per_image'] = out['mean_dice']
            out['mean_dice'] = out['pooled_256']['dice']
    return out


def evaluate(model, cases, spec, img_size, *, device=None, batch_size=16, amp='none', legacy=False,
             save_pred=None, progress=True, distances=None, workers=0):
    """Run the Sec. 4.3 protocol over `cases` (a Sequence of data.Case); returns the summary with 'cases' rows.

    Reusable by train.py for validation: prints nothing, restores model.train() state afterwards."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if amp not in AMP_DTYPES:
        raise ValueError(f'amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}')
    # NOTE(impl): HD95/ASD for volumes only by default: Tables 3-4 report none, and full-size ISIC images are slow
    distances = spec.kind == 'volume' if distances is None else distances
    if save_pred is not None:
        Path(save_pred).mkdir(parents=True, exist_ok=True)
    # cases are read and resized for the model ahead, in `workers` processes, while the device predicts
    loader = DataLoader(cases, batch_size=None, num_workers=workers, pin_memory=device.type == 'cuda',
                        collate_fn=partial(load_case, spec=spec, img_size=img_size,
                                           keep_image=save_pred is not None))
    was_training = model.training
    model.eval()
    rows, t_pred, t_metric = [], 0.0, 0.0
    try:
        for case, x in tqdm(loader, desc=f'eval {spec.name}', unit='case', disable=not progress):
            t0 = time.perf_counter()
            pred = predict_case(model, case, spec, img_size, device, batch_size, amp, x=x)
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            rows.extend(case_rows(case.id, pred, case.label, spec, legacy=legacy, distances=distances))
            t_metric += time.perf_counter() - t1
            t_pred += t1 - t0
            if save_pred is not None:  # NIfTI or PNG label maps, with PNG overlays for volumes too
                data.write_prediction(save_pred, case.id, case.image, pred.cpu().numpy(), spec,
                                      label=case.label.numpy())
    finally:
        model.train(was_training)
    out = summarize(rows, spec, legacy=legacy)
    n = max(len(cases), 1)
    out.update(dataset=spec.name, img_size=img_size, amp=amp, device=str(device), cases=rows,
               timing=dict(predict_s=t_pred, metrics_s=t_metric, predict_s_per_case=t_pred / n,
                           metrics_s_per_case=t_metric / n))
    return out


# -----------------------------------------------------------------------------
# top level: outputs, table, CSV, JSON

def format_table(summary, spec):
    """The paper's table layout: per-class rows in report order, then the one-line Table 1/2/3/4 summary."""
    pct = lambda v: '   -  ' if v is None or math.isnan(v) else f'{100 * v:6.2f}'  # noqa: E731
    dst = lambda v: '    -  ' if v is None or math.isnan(v) else f'{v:7.2f}'  # noqa: E731
    lines = [f"{spec.name} | {summary['n_cases']} cases | rule: {summary['rule']} | Dice/IoU in %, "
             'HD95/ASD in voxels',
             f"{'class':<14}{'Dice':>7}{'IoU':>7}{'HD95':>8}{'ASD':>8}{'n':>5}"]
    for name in summary['classes']:
        c = summary['per_class'][name]
        lines.append(f"{name:<14}{pct(c['dice'])} {pct(c['iou'])}{dst(c['hd95'])} {dst(c['asd'])}{c['n']:>5}")
    if spec.kind == 'volume':
        lines.append(f"{'mean':<14}{pct(summary['mean_dice'])} {pct(summary['mean_iou'])}"
                     f"{dst(summary['mean_hd95'])} {dst(summary['mean_asd'])}")
        short = ' '.join(f"{n}={pct(summary['per_class'][n]['dice']).strip()}" for n in summary['classes'])
        lines.append(f"paper row: DICE {pct(summary['mean_dice']).strip()}  mIoU {pct(summary['mean_iou']).strip()}"
                     f"  ASD {dst(summary['mean_asd']).strip()}  HD95 {dst(summary['mean_hd95']).strip()}  | {short}")
        return '\n'.join(lines)
    # the class rows above are per-image means; Table 3's figures are the ones pooled at 256x256
    lines.append(f"{'':<14}{'Dice':>7}{'SE':>7}{'SP':>7}{'ACC':>7}{'IoU':>7}")
    for label, key in (('pooled 256', 'pooled_256'), ('pooled native', 'pooled_native'), ('per-image', 'per_image')):
        p = summary[key]
        lines.append(f"{label:<14}{pct(p['dice'])} {pct(p['se'])} {pct(p['sp'])} {pct(p['acc'])}"
                     + (f" {pct(p['iou'])}" if 'iou' in p else ''))
    if spec.name.startswith('isic'):
        lines.append('Table 3 figures: pooled 256 (every mask resized to 256x256 as Azad et al., one confusion matrix)')
    return '\n'.join(lines)


def write_results(summary, out_dir, extra=None):
    """per_case.csv (case, class, metrics) and summary.json (everything but the rows) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summary['cases']
    cols = ['case', 'class'] + list(METRICS) + [k for k in ISIC_METRICS if rows and k in rows[0]]
    with open(out_dir / 'per_case.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r['case'], r['class']] + [f'{r[k]:.6f}' if isinstance(r[k], float) else r[k]
                                                for k in cols[2:]])
    # NOTE(impl): per-case rows in per_case.csv only; summary.json holds the aggregates, NaN written as null
    js = {k: v for k, v in summary.items() if k != 'cases'}
    js.update(extra or {})
    with open(out_dir / 'summary.json', 'w') as f:
        json.dump(_json_safe(js), f, indent=2)
    return out_dir / 'per_case.csv', out_dir / 'summary.json'


# -----------------------------------------------------------------------------
# top level: prediction on files without labels (--input)

def predict_input(model, inp, spec, img_size, device, batch_size=16, amp='none', tta=False, intensity=None):
    """Label map (numpy, the input's size) of one data.Input: normalised as in training, segmented, resized back."""
    image = inp.image
    if inp.raw and inp.kind == 'volume':  # RGB images are normalised by prepare_input itself
        image = data.normalise(image, intensity or spec.intensity)
    x = data.prepare_input(_slices(image, inp.kind), img_size)  # (N,3,S,S)
    out_hw = image.shape[-2:] if inp.kind == 'volume' else image.shape[:2]
    labels = data.restore_size(segment(model, x, device, batch_size, amp, tta), out_hw, inp.kind)
    return labels.cpu().numpy() if inp.kind == 'volume' else labels[0].cpu().numpy()  # (D,H,W) / (H,W)


def _input_files(src):
    """The file --input names, or the supported files of the folder it names, sorted."""
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise data.DataError(f'{src}: no such file or folder (--input)')
    files = sorted(p for p in src.iterdir() if p.is_file() and p.name.lower().endswith(data.INPUT_SUFFIXES))
    if not files:
        raise data.DataError(f'{src}: no input files (--input expects {", ".join(data.INPUT_SUFFIXES)})')
    return files


def predict_files(args, ckpt, spec, net, device):
    """--input: write a label map per file into --out; a file that fails is named and skipped; exit code 1 then."""
    files, failed = _input_files(args.input), []
    img_size = int(ckpt['config']['img_size'])
    net.eval()
    for path in tqdm(files, desc='predict', unit='file', disable=args.no_progress):
        try:
            inp = data.read_input(path)
            labels = predict_input(net, inp, spec, img_size, device, args.batch_size, args.amp, args.tta,
                                   args.intensity)
            data.write_prediction(args.out, inp.id, inp.image, labels, spec, geometry=inp.geometry, label=inp.label)
        except (data.DataError, ValueError, OSError) as e:
            failed.append(path)
            reason = str(e) if str(path) in str(e) else f'{path}: {e}'  # data.py's errors already name the file
            tqdm.write(f'error: {reason} (skipped)', file=sys.stderr)
    print(f'wrote {len(files) - len(failed)} of {len(files)} label maps and labels.json to {args.out}'
          + (' (flip TTA)' if args.tta else ''))
    if failed:
        print(f'failed ({len(failed)}): ' + ', '.join(str(p) for p in failed), file=sys.stderr)
        return 1
    return 0


# -----------------------------------------------------------------------------
# top level: the benchmark, the real code paths on synthetic data

def _ellipsoid(shape, centre, radii):
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def _bench_metrics():
    """binary_metrics against medpy on Synapse-sized volumes: seconds and largest difference."""
    from medpy.metric import binary as mb
    shape = (150, 512, 512)  # (D,H,W): a Synapse test volume
    organs = {  # two overlapping ellipsoids each: prediction slightly off the ground truth
        'liver-sized': ((75, 260, 200), (30, 80, 100), (78, 266, 195), (28, 84, 96)),
        'kidney-sized': ((70, 300, 360), (18, 30, 25), (72, 303, 357), (17, 31, 27)),
        'pancreas-sized': ((80, 250, 280), (8, 20, 45), (81, 253, 276), (7, 18, 47)),
    }
    print(f'binary_metrics on {shape} volumes (dc, jc, hd95, assd)')
    print(f"{'mask':<16}{'ours s':>9}{'medpy s':>10}{'ratio':>8}{'max |diff|':>12}")
    for name, (c1, r1, c2, r2) in organs.items():
        gt, pred = _ellipsoid(shape, c1, r1), _ellipsoid(shape, c2, r2)
        t0 = time.perf_counter()
        ours = binary_metrics(pred, gt)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = dict(dice=mb.dc(pred, gt), iou=mb.jc(pred, gt), hd95=mb.hd95(pred, gt), asd=mb.assd(pred, gt))
        t_ref = time.perf_counter() - t0
        diff = max(abs(ours[k] - float(ref[k])) for k in METRICS)
        print(f'{name:<16}{t_ours:9.3f}{t_ref:10.2f}{t_ref / t_ours:7.1f}x{diff:12.1e}', flush=True)


def bench(img_size=224, slices=16, images=8, device=None, batch_size=16):
    """Print the metric table, DANIE-S predict_case s/volume and evaluate() images/s on full-size ISIC images."""
    _bench_metrics()
    device = torch.device(device) if device else autodetect_device()
    rng = np.random.default_rng(0)
    net = danie_model.danie('S', num_classes=9, img_size=img_size)
    net = net.to(device, memory_format=danie_model.MEMORY_FORMAT)
    net.eval()
    case = data.Case('bench', rng.random((slices, 512, 512), dtype=np.float32), np.zeros((slices, 512, 512), np.int64))
    predict_case(net, case, data.SPECS['synapse'], img_size, device, batch_size)  # warm-up
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    sync()
    t0 = time.perf_counter()
    predict_case(net, case, data.SPECS['synapse'], img_size, device, batch_size)
    sync()
    dt = time.perf_counter() - t0
    print(f'{"what":<44}{"figure":>16}   ({device}, img {img_size}, batch {batch_size}, '
          f'{torch.get_num_threads()} threads)')
    print(f'{"predict_case, 512x512 slices":<44}{dt / slices * 1e3:12.0f} ms/slice')
    print(f'{"  -> a 150-slice Synapse volume":<44}{dt / slices * 150:14.1f} s')
    # ISIC 2017's test images come from 0.4 to 30 MP; these three sizes are common ones
    sizes = [(767, 1022), (1129, 1504), (2016, 3024)]
    cases = []
    for i in range(images):
        h, w = sizes[i % len(sizes)]
        label = np.zeros((h, w), np.int64)
        label[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
        cases.append(data.Case(f'img{i}', rng.integers(0, 256, (h, w, 3), dtype=np.uint8), label))
    net = danie_model.danie('S', num_classes=2, img_size=img_size)
    net = net.to(device, memory_format=danie_model.MEMORY_FORMAT)
    t0 = time.perf_counter()
    evaluate(net, cases, data.SPECS['isic2017'], img_size, device=device, batch_size=batch_size, progress=False,
             workers=default_workers(device))
    t = time.perf_counter() - t0
    print(f'{f"evaluate(), {images} ISIC-sized images":<44}{images / t:10.1f} images/s')


# -----------------------------------------------------------------------------
# CLI

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Evaluate a DANIE checkpoint with the protocol of Sec. 4.3, '
                                                 'or predict label maps for files (--input).')
    # what to evaluate
    parser.add_argument('--ckpt', type=str, help='checkpoint written by train.py (best.pth / last.pth)')
    parser.add_argument('--root', type=str, default=None, help="dataset folder (default: the checkpoint's)")
    parser.add_argument('--split', choices=('val', 'test'), default='test', help='split to score (Sec. 4.1)')
    parser.add_argument('--limit', type=int, default=None, help='score only the first N cases')
    # protocol
    parser.add_argument('--legacy', action='store_true',
                        help="TransUNet's empty-mask rule and medpy<0.5 ASD, to compare with published tables")
    # NOTE(impl): 16 slices per forward pass at test time: Sec. 4.2 gives only training batch sizes
    parser.add_argument('--batch-size', type=int, default=16, help='slices per forward pass')
    parser.add_argument('--amp', choices=tuple(AMP_DTYPES), default='none', help='autocast dtype')
    parser.add_argument('--device', type=str, default=None, help='cuda / cpu / mps (default: autodetect)')
    parser.add_argument('--workers', type=int, default=None,
                        help='processes reading cases ahead of the model (default: 4 on a GPU, else 0)')
    # prediction on files without labels
    parser.add_argument('--input', type=str, default=None,
                        help='predict on this image/volume file or folder instead of scoring the dataset')
    parser.add_argument('--tta', action='store_true', help='--input: flip test-time augmentation')
    parser.add_argument('--intensity', choices=data.INTENSITIES, default=None,
                        help="--input: normalisation of raw inputs (default: the checkpoint's training data)")
    # outputs
    parser.add_argument('--out', type=str, default=None,
                        help='results folder (default: <ckpt dir>/eval_<split>); with --input: where label maps go')
    parser.add_argument('--save-pred', type=str, default=None,
                        help='also write predictions here: NIfTI volumes or PNG masks + overlays')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    # benchmark
    parser.add_argument('--bench', action='store_true', help='time metrics, inference and ISIC evaluation, then exit')
    parser.add_argument('--img-size', type=int, default=224,
                        help='--bench: model input size (default 224, see data.DatasetSpec)')
    parser.add_argument('--slices', type=int, default=16, help='--bench: slices in the timed volume')
    parser.add_argument('--images', type=int, default=8, help='--bench: synthetic full-resolution ISIC images')
    args = parser.parse_args(argv)
    for flag in ('batch_size', 'limit', 'slices', 'images'):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.workers is not None and args.workers < 0:
        parser.error('--workers must be >= 0')
    if not (args.bench or args.ckpt):
        parser.error('--ckpt is required (or --bench)')
    if args.input and not args.out:
        parser.error('--input needs --out DIR for the label maps')
    return args


def score_dataset(args, ckpt, spec, net, device):
    """Score the checkpoint's dataset split, print the table, write per_case.csv and summary.json."""
    t_start = time.perf_counter()
    info = ckpt['data']
    root = args.root or info.get('root') or data.default_root(spec.name)
    opts = {k: info[k] for k in ('val_cases', 'seed', 'label_map') if info.get(k) is not None}
    try:
        cases = data.eval_cases(info['name'], root, args.split, num_classes=spec.num_classes, **opts)
    except data.DataError as e:
        hint = '' if args.root else ' (the dataset root stored in the checkpoint; --root points elsewhere)'
        raise data.DataError(f'{e}{hint}') from e
    cases = cases[:args.limit] if args.limit else cases
    if len(cases) == 0:
        raise data.DataError(f'{root}: the {args.split} split of {spec.name} has no cases')
    workers = args.workers if args.workers is not None else default_workers(device)
    summary = evaluate(net, cases, spec, int(ckpt['config']['img_size']), device=device, batch_size=args.batch_size,
                       amp=args.amp, legacy=args.legacy, save_pred=args.save_pred, progress=not args.no_progress,
                       workers=workers)
    out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent / f'eval_{args.split}'
    summary['timing']['total_s'] = time.perf_counter() - t_start
    extra = dict(ckpt=str(Path(args.ckpt).resolve()), split=args.split, root=str(root), limit=args.limit,
                 epoch=ckpt.get('epoch'), step=ckpt.get('step'), init=ckpt.get('init'), save_pred=args.save_pred,
                 config=ckpt['config'])
    csv_path, json_path = write_results(summary, out, extra)
    print(format_table(summary, spec))
    print(f'wrote {csv_path} and {json_path}' + (f'; predictions in {args.save_pred}' if args.save_pred else ''))
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.bench:
        bench(img_size=args.img_size, slices=args.slices, images=args.images, device=args.device,
              batch_size=args.batch_size)
        return 0
    try:
        ckpt = load_checkpoint(args.ckpt)
        try:
            spec = data.spec_from_dict(ckpt['data']['spec'])
        except data.DataError as e:
            raise CheckpointError(f'{args.ckpt}: {e}') from e
        device = torch.device(args.device) if args.device else autodetect_device()
        net = model_from_checkpoint(ckpt).to(device, memory_format=danie_model.MEMORY_FORMAT)
        if args.input:
            return predict_files(args, ckpt, spec, net, device)
        return score_dataset(args, ckpt, spec, net, device)
    except (CheckpointError, data.DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
