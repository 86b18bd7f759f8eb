"""
Evaluation of DANIE (paper Sec. 4.3, Tables 1-4): metrics, the per-dataset protocol, checkpoint loading.

    python evaluate.py --ckpt out/best.pth            # the checkpoint names dataset, root, classes, img size
    python evaluate.py --ckpt out/best.pth --legacy   # TransUNet's empty-mask rule, to compare with the tables
    python evaluate.py --bench                        # metric speed against medpy, inference time per volume

Synapse / ACDC (Tables 1-2): volume by volume, per class on the 3-D label map, in voxels (no spacing, as the
peers): Dice, IoU, HD95, ASD; mean over cases per class, then over classes. ISIC 2017/2018 (Table 3): Dice,
SE, SP, ACC from one confusion matrix pooled over all test pixels, with per-image means beside them. GlaS
(Table 4): per-image Dice and IoU, averaged.

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
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

import data
import model as danie_model

FORMAT = 'danie-ckpt-v1'
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # --amp
METRICS = ('dice', 'iou', 'hd95', 'asd')
ISIC_METRICS = ('se', 'sp', 'acc')
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


# -----------------------------------------------------------------------------
# metrics

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


def binary_metrics(pred, gt, legacy=False, distances=True):
    """Dice, IoU, HD95, ASD (symmetric, in voxels) of two boolean masks of any dimension; see the module's rule.

    distances=False skips HD95/ASD (NaN), for image sets whose tables report overlap only."""
    pred = np.atleast_1d(np.asarray(pred, dtype=bool))
    gt = np.atleast_1d(np.asarray(gt, dtype=bool))
    if pred.shape != gt.shape:
        raise ValueError(f'binary_metrics: pred {pred.shape} and gt {gt.shape} differ in shape')
    nan = float('nan')
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    if legacy and n_pred == 0:
        return dict(dice=0.0, iou=0.0, hd95=0.0 if distances else nan, asd=0.0 if distances else nan)
    if legacy and n_gt == 0:
        return dict(dice=1.0, iou=1.0, hd95=0.0 if distances else nan, asd=0.0 if distances else nan)
    # NOTE(impl): both masks empty -> NaN, case skipped for that class: Dice is 0/0, a free 1 rewards absent organs
    if n_pred == 0 and n_gt == 0:
        return dict(dice=nan, iou=nan, hd95=nan, asd=nan)
    # NOTE(impl): one mask empty -> Dice 0, IoU 0, HD95 = ASD = array diagonal (BraTS): a missed organ is the worst case
    if n_pred == 0 or n_gt == 0:
        worst = float(np.sqrt(np.sum(np.square(np.asarray(pred.shape, dtype=np.float64))))) if distances else nan
        return dict(dice=0.0, iou=0.0, hd95=worst, asd=worst)

    # everything happens inside the bounding box of the union (+1 voxel): a 512x512x150 CT becomes an organ
    box = _bbox(pred | gt, margin=1)
    p, g = pred[box], gt[box]
    inter = int(np.count_nonzero(p & g))
    # same float expressions as medpy's dc, jc, hd95, so the values agree to the last bits
    dice = 2.0 * inter / float(n_pred + n_gt)
    iou = float(inter) / float(n_pred + n_gt - inter)
    if not distances:
        return dict(dice=dice, iou=iou, hd95=nan, asd=nan)
    # NOTE(impl): distances in voxels, no spacing, as the peers (the public Synapse/ACDC files carry no spacing)
    d_pg, d_gp = _surface_distances(p, g)
    hd95 = float(np.percentile(np.hstack((d_pg, d_gp)), 95))
    # NOTE(impl): ASD = one mean over both surfaces' distances (medpy >= 0.5, Heimann 2009); legacy: mean of the 2 means
    if legacy:
        # medpy < 0.5, which TransUNet/CASCADE ran (changed in loli/medpy issues 108 and 131)
        asd = float(np.mean((d_pg.mean(), d_gp.mean())))
    else:
        asd = float(np.concatenate((d_pg, d_gp)).mean())
    return dict(dice=dice, iou=iou, hd95=hd95, asd=asd)


def confusion(pred, gt):
    """(tp, fp, fn, tn) pixel counts of two boolean masks."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    tp = int(np.count_nonzero(pred & gt))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(gt)) - tp
    return tp, fp, fn, pred.size - tp - fp - fn


def confusion_scores(tp, fp, fn, tn):
    """Dice, SE (recall), SP, ACC of one confusion matrix; NaN where a ratio is 0/0."""
    def ratio(a, b):
        return a / b if b else float('nan')
    return dict(dice=ratio(2 * tp, 2 * tp + fp + fn), se=ratio(tp, tp + fn), sp=ratio(tn, tn + fp),
                acc=ratio(tp + tn, tp + fp + fn + tn))


# -----------------------------------------------------------------------------
# protocol

def predict_case(model, case, spec, img_size, device, batch_size=16, amp='none'):
    """Label map of one case at its original size: slices (or the image) resized to img_size, argmax, back."""
    images = case.image if spec.kind == 'volume' else case.image[None]  # (N,H,W) float or (N,H,W,3) uint8
    out_hw = case.label.shape[-2:]
    preds = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = data.prepare_input(images[i:i + batch_size], img_size).to(device)  # (n,3,S,S)
            with autocast(device, amp):
                y = model(x)
            y = y[0] if isinstance(y, (tuple, list)) else y  # DANIE returns (y, [p1..p4]); y is Eq. 12's sum
            # NOTE(impl): argmax over the K logits; for K = 2 (ISIC, GlaS) it is the lineage's softmax threshold 0.5
            preds.append(y.float().argmax(1).to(torch.uint8).cpu().numpy())  # (n,S,S)
    pred = np.concatenate(preds, axis=0)
    if pred.shape[-2:] != tuple(out_hw):
        # NOTE(impl): the argmax label map is resized back with order 0 (TransUNet's test_single_volume), not the logits
        zoom = (1.0, out_hw[0] / pred.shape[1], out_hw[1] / pred.shape[2])
        # slices were resized by scipy (corner-aligned, as TransUNet), RGB images by PIL (pixel-edge aligned):
        # resize back on the same grid, or image predictions shift by up to half a pixel
        grid = spec.kind == 'image'
        pred = ndimage.zoom(pred, zoom, order=0, grid_mode=grid, mode='nearest' if grid else 'constant')
        if pred.shape[-2:] != tuple(out_hw):
            raise RuntimeError(f'case {case.id}: resized prediction {pred.shape} != label {case.label.shape}')
    return pred if spec.kind == 'volume' else pred[0]



def case_rows(case_id, pred, gt, spec, legacy=False, distances=True):
    """One row per reported class: case, class, dice, iou, hd95, asd (+ se, sp, acc and tp..tn for images)."""
    rows = []
    for c in spec.report_order:
        p, g = pred == c, gt == c
        row = {'case': case_id, 'class': spec.class_names[c],
               **binary_metrics(p, g, legacy=legacy, distances=distances)}
        if spec.kind == 'image':
            tp, fp, fn, tn = confusion(p, g)
            row.update({k: v for k, v in confusion_scores(tp, fp, fn, tn).items() if k != 'dice'})
            row.update(tp=tp, fp=fp, fn=fn, tn=tn)
        rows.append(row)
    return rows


def summarize(rows, spec, legacy=False):
    """Mean over cases per class, then over classes; for ISIC also the pooled confusion-matrix figures."""
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
        pooled, per_image = {}, {}
        for name in names:
            mine = [r for r in rows if r['class'] == name]
            pooled[name] = confusion_scores(*(sum(r[k] for r in mine) for k in ('tp', 'fp', 'fn', 'tn')))
            per_image[name] = {m: _nanmean(r[m] for r in mine) for m in ('dice', 'iou') + ISIC_METRICS}
        out['pooled'] = {m: _nanmean(pooled[n][m] for n in names) for m in ('dice',) + ISIC_METRICS}
        out['pooled_per_class'] = pooled
        out['per_image'] = {m: _nanmean(per_image[n][m] for n in names) for m in ('dice', 'iou') + ISIC_METRICS}
        if spec.name.startswith('isic'):
            # NOTE(impl): ISIC's mean_dice is the pooled Dice (Azad et al.'s code, Table 3's lineage), per-image beside
            out['mean_dice_per_image'] = out['mean_dice']
            out['mean_dice'] = out['pooled']['dice']
    return out


def evaluate(model, cases, spec, img_size, *, device=None, batch_size=16, amp='none', legacy=False,
             save_pred=None, progress=True, distances=None):
    """Run the Sec. 4.3 protocol over `cases` (a Sequence of data.Case); returns the summary with 'cases' rows.

    Reusable by train.py for validation: prints nothing, restores model.train() state afterwards."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if amp not in ('none', 'bf16', 'fp16'):
        raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
    # NOTE(impl): HD95/ASD for volumes only by default: Tables 3-4 report none, and full-size ISIC images are slow
    distances = spec.kind == 'volume' if distances is None else distances
    if save_pred is not None:
        save_pred = Path(save_pred)
        save_pred.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    rows, t_pred, t_metric = [], 0.0, 0.0
    try:
        for i in tqdm(range(len(cases)), desc=f'eval {spec.name}', unit='case', disable=not progress):
            case = cases[i]
            t0 = time.perf_counter()
            pred = predict_case(model, case, spec, img_size, device, batch_size, amp)
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            rows.extend(case_rows(case.id, pred, case.label, spec, legacy=legacy, distances=distances))
            t_metric += time.perf_counter() - t1
            t_pred += t1 - t0
            if save_pred is not None:
                save_prediction(save_pred, case, pred, spec)
    finally:
        model.train(was_training)
    out = summarize(rows, spec, legacy=legacy)
    n = max(len(cases), 1)
    out.update(dataset=spec.name, img_size=img_size, amp=amp, device=str(device), cases=rows,
               timing=dict(predict_s=t_pred, metrics_s=t_metric, predict_s_per_case=t_pred / n,
                           metrics_s_per_case=t_metric / n))
    return out


# -----------------------------------------------------------------------------
# outputs: table, CSV, JSON, predictions

PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 160, 255], [255, 200, 0], [0, 200, 0], [200, 0, 255],
                    [0, 255, 200], [255, 120, 0], [120, 120, 255]], dtype=np.uint8)


def save_prediction(folder, case, pred, spec):
    """Volumes: <id>_pred/_img/_gt.nii.gz (ITK-SNAP, 3D Slicer). Images: <id>_pred.png mask + <id>_overlay.png."""
    folder = Path(folder)
    if spec.kind == 'volume':
        try:
            import nibabel as nib  # only needed here: an optional dependency
        except ImportError as e:
            raise ImportError('--save-pred for volumes needs nibabel: pip install nibabel') from e
        # NOTE(impl): identity affine, (D,H,W) written as NIfTI (x,y,z) = (W,H,D): the .h5/.npz files carry no geometry
        # image and ground truth go beside the prediction so a viewer can overlay them (as TransUNet's test_save_path)
        for suffix, arr, dtype in (('pred', pred, np.uint8), ('img', case.image, np.float32),
                                   ('gt', case.label, np.uint8)):
            img = nib.Nifti1Image(np.ascontiguousarray(np.asarray(arr, dtype=dtype).transpose(2, 1, 0)), np.eye(4))
            nib.save(img, str(folder / f'{case.id}_{suffix}.nii.gz'))
        return
    from PIL import Image
    k = max(spec.num_classes - 1, 1)
    Image.fromarray((pred.astype(np.int64) * 255 // k).astype(np.uint8)).save(folder / f'{case.id}_pred.png')
    # overlay: prediction filled at 40% in its class colour, ground-truth outline in green
    base = np.asarray(case.image, dtype=np.float32)
    colour = PALETTE[pred % len(PALETTE)].astype(np.float32)
    alpha = np.where(pred > 0, 0.4, 0.0)[..., None]
    over = base * (1 - alpha) + colour * alpha
    gt = case.label > 0
    outline = gt ^ ndimage.binary_erosion(gt, iterations=2)
    over[outline] = (0, 255, 0)
    Image.fromarray(over.clip(0, 255).astype(np.uint8)).save(folder / f'{case.id}_overlay.png')


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
    if spec.kind == 'volume' or 'pooled' not in summary:
        lines.append(f"{'mean':<14}{pct(summary['mean_dice'])} {pct(summary['mean_iou'])}"
                     f"{dst(summary['mean_hd95'])} {dst(summary['mean_asd'])}")
    if 'pooled' in summary:  # the class rows above are per-image means; Table 3's figures are the pooled ones
        p, q = summary['pooled'], summary['per_image']
        lines.append(f"{'':<14}{'Dice':>7}{'SE':>7}{'SP':>7}{'ACC':>7}{'IoU':>7}")
        lines.append(f"{'pooled':<14}{pct(p['dice'])} {pct(p['se'])} {pct(p['sp'])} {pct(p['acc'])}")
        lines.append(f"{'per-image':<14}{pct(q['dice'])} {pct(q['se'])} {pct(q['sp'])} {pct(q['acc'])} "
                     f"{pct(q['iou'])}")
    if spec.kind == 'volume':
        short = ' '.join(f"{n}={pct(summary['per_class'][n]['dice']).strip()}" for n in summary['classes'])
        lines.append(f"paper row: DICE {pct(summary['mean_dice']).strip()}  mIoU {pct(summary['mean_iou']).strip()}"
                     f"  ASD {dst(summary['mean_asd']).strip()}  HD95 {dst(summary['mean_hd95']).strip()}  | {short}")
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
# checkpoints

def load_checkpoint(path):
    """Read a checkpoint written by train.py and check its format; CheckpointError says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such checkpoint file (train.py writes best.pth / last.pth '
                              'into its --out folder)')
    try:
        # train.py stores RNG states as tensors and plain types, so the safe unpickler suffices
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle, zip and EOF errors all mean the same thing to the user
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})') from e
    if not isinstance(ckpt, dict) or 'format' not in ckpt:
        what = f'a dict with keys {sorted(map(str, ckpt))[:8]}' if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a DANIE checkpoint (found {what}, no 'format' key; expected "
                              f"format {FORMAT!r} as written by train.py)")
    if ckpt['format'] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format']!r}, this evaluate.py reads {FORMAT!r}")
    missing = [k for k in ('config', 'model', 'data') if k not in ckpt]
    if missing:
        raise CheckpointError(f'{path}: {FORMAT} checkpoint without {missing}')
    if not isinstance(ckpt['data'], dict) or 'name' not in ckpt['data']:
        raise CheckpointError(f"{path}: checkpoint 'data' must be a dict naming the dataset ('name')")
    return ckpt


def model_from_checkpoint(ckpt):
    """model.DANIE built from ckpt['config'] with ckpt['model'] loaded strictly (mismatch -> CheckpointError)."""
    fields = {f.name for f in dataclasses.fields(danie_model.DANIEConfig)}
    cfg = dict(ckpt['config'])
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise CheckpointError(f'checkpoint config has fields {unknown} that model.DANIEConfig does not know '
                              '(written by another version of model.py)')
    # tuples may come back as lists from other writers; the frozen config wants hashable values
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    try:
        net = danie_model.DANIE(danie_model.DANIEConfig(**cfg))
    except Exception as e:
        raise CheckpointError(f'cannot build DANIE from the checkpoint config {cfg}: {type(e).__name__}: {e}') from e
    state, own = ckpt['model'], net.state_dict()
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint 'model' is a {type(state).__name__}, expected a state_dict")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}' for k in own
              if k in state and hasattr(state[k], 'shape') and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def head(keys):
            return ', '.join(keys[:5]) + (f' ... ({len(keys)} in all)' if len(keys) > 5 else '')
        hint = ''
        if any(k.startswith(('module.', '_orig_mod.')) for k in unexpected):
            hint = " (keys start with 'module.' / '_orig_mod.': a DDP/compiled state_dict; save the bare module)"
        parts = [f'missing: {head(missing)}' if missing else '', f'unexpected: {head(unexpected)}' if unexpected
                 else '', f'shape mismatch: {head(shapes)}' if shapes else '']
        raise CheckpointError('checkpoint weights do not fit the model built from its config; '
                              + '; '.join(p for p in parts if p) + hint)
    net.load_state_dict(state, strict=True)
    return net


class _Head:
    """The first n items of a Sequence, without loading the others (--limit)."""

    def __init__(self, seq, n):
        self.seq, self.n = seq, min(n, len(seq))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.seq[i]


# -----------------------------------------------------------------------------
# benchmark

def _ellipsoid(shape, centre, radii):
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def bench(img_size=224, slices=16, device=None, batch_size=16):
    """Print binary_metrics against medpy on Synapse-sized volumes, and DANIE-S inference time per volume."""
    shape = (150, 512, 512)  # (D,H,W): a Synapse test volume
    organs = {  # two overlapping ellipsoids each: prediction slightly off the ground truth
        'liver-sized': ((75, 260, 200), (30, 80, 100), (78, 266, 195), (28, 84, 96)),
        'kidney-sized': ((70, 300, 360), (18, 30, 25), (72, 303, 357), (17, 31, 27)),
        'pancreas-sized': ((80, 250, 280), (8, 20, 45), (81, 253, 276), (7, 18, 47)),
    }
    try:
        from medpy.metric import binary as mb
    except ImportError:
        mb = None
        print('medpy not installed: timing binary_metrics alone')
    print(f'binary_metrics on {shape} volumes (dc, jc, hd95, assd)')
    print(f"{'mask':<16}{'ours s':>9}{'medpy s':>10}{'ratio':>8}{'max |diff|':>12}")
    for name, (c1, r1, c2, r2) in organs.items():
        gt, pred = _ellipsoid(shape, c1, r1), _ellipsoid(shape, c2, r2)
        t0 = time.perf_counter()
        ours = binary_metrics(pred, gt)
        t_ours = time.perf_counter() - t0
        if mb is None:
            print(f'{name:<16}{t_ours:9.3f}')
            continue
        t0 = time.perf_counter()
        ref = dict(dice=mb.dc(pred, gt), iou=mb.jc(pred, gt), hd95=mb.hd95(pred, gt), asd=mb.assd(pred, gt))
        t_ref = time.perf_counter() - t0
        diff = max(abs(ours[k] - float(ref[k])) for k in METRICS)
        print(f'{name:<16}{t_ours:9.3f}{t_ref:10.2f}{t_ref / t_ours:7.1f}x{diff:12.1e}', flush=True)

    device = torch.device(device) if device else autodetect_device()
    net = danie_model.danie('S', num_classes=9, img_size=img_size).to(device).eval()
    spec = data.SPECS['synapse']
    rng = np.random.default_rng(0)
    case = data.Case(id='bench', image=rng.random((slices, 512, 512), dtype=np.float32),
                     label=np.zeros((slices, 512, 512), dtype=np.int64))
    predict_case(net, data.Case(id='warm', image=case.image[:2], label=case.label[:2]), spec, img_size, device,
                 batch_size)
    t0 = time.perf_counter()
    predict_case(net, case, spec, img_size, device, batch_size)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    print(f'DANIE-S inference ({device}, img {img_size}, batch {batch_size}, {torch.get_num_threads()} threads): '
          f'{dt:.2f} s for {slices} slices of 512x512 = {dt / slices * 1e3:.0f} ms/slice, '
          f'about {dt / slices * 150:.0f} s for a 150-slice Synapse volume')


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = argparse.ArgumentParser(description='Evaluate a DANIE checkpoint with the protocol of Sec. 4.3.')
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
    parser.add_argument('--amp', choices=('none', 'bf16', 'fp16'), default='none', help='autocast dtype')
    parser.add_argument('--device', type=str, default=None, help='cuda / cpu / mps (default: autodetect)')
    # outputs
    parser.add_argument('--out', type=str, default=None, help='results folder (default: <ckpt dir>/eval_<split>)')
    parser.add_argument('--save-pred', type=str, default=None,
                        help='also write predictions here: NIfTI volumes or PNG masks + overlays')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    # benchmark
    parser.add_argument('--bench', action='store_true', help='time metrics against medpy and inference, then exit')
    parser.add_argument('--img-size', type=int, default=224, help='--bench: model input size (Sec. 4.2: 224)')
    parser.add_argument('--slices', type=int, default=16, help='--bench: slices in the timed volume')
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error('--batch-size must be >= 1')
    if args.limit is not None and args.limit < 1:
        parser.error('--limit must be >= 1')
    if args.bench:
        bench(img_size=args.img_size, slices=args.slices, device=args.device, batch_size=args.batch_size)
        return 0
    if not args.ckpt:
        parser.error('--ckpt is required (or --bench)')

    try:
        t_start = time.perf_counter()
        ckpt = load_checkpoint(args.ckpt)
        info = ckpt['data']
        if info['name'] not in data.SPECS:
            raise CheckpointError(f"{args.ckpt}: dataset {info['name']!r} is not one of {sorted(data.SPECS)}")
        spec = data.SPECS[info['name']]
        img_size = int(ckpt['config']['img_size'])
        root = args.root or info.get('root') or data.default_root(spec.name)
        if args.save_pred and spec.kind == 'volume':
            try:
                import nibabel  # noqa: F401  (fail now, not after the whole test set)
            except ImportError:
                print('error: --save-pred writes NIfTI volumes and needs nibabel: pip install nibabel', file=sys.stderr)
                return 2
        device = torch.device(args.device) if args.device else autodetect_device()
        net = model_from_checkpoint(ckpt).to(device)
        opts = {k: info[k] for k in ('val_cases', 'seed', 'label_map') if info.get(k) is not None}
        cases = data.eval_cases(spec.name, root, args.split, **opts)
        if args.limit:
            cases = _Head(cases, args.limit)
        if len(cases) == 0:
            raise data.DataError(f'{root}: the {args.split} split of {spec.name} has no cases')
        summary = evaluate(net, cases, spec, img_size, device=device, batch_size=args.batch_size, amp=args.amp,
                           legacy=args.legacy, save_pred=args.save_pred, progress=not args.no_progress)
    except CheckpointError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except data.DataError as e:
        hint = '' if args.root else " (the dataset root stored in the checkpoint; --root points elsewhere)"
        print(f'error: {e}{hint}', file=sys.stderr)
        return 2

    out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent / f'eval_{args.split}'
    summary['timing']['total_s'] = time.perf_counter() - t_start
    extra = dict(ckpt=str(Path(args.ckpt).resolve()), split=args.split, root=str(root), limit=args.limit,
                 epoch=ckpt.get('epoch'), step=ckpt.get('step'), save_pred=args.save_pred, config=ckpt['config'])
    csv_path, json_path = write_results(summary, out, extra)
    print(format_table(summary, spec))
    print(f'wrote {csv_path} and {json_path}' + (f'; predictions in {args.save_pred}' if args.save_pred else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
