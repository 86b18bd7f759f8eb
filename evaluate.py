"""
Evaluation of DANIE (paper Sec. 4.3, Tables 1-4): the metrics, the per-dataset protocol, the outputs.

    python evaluate.py --ckpt runs/synapse-S/best.pth            # the checkpoint names its data, classes and size
    python evaluate.py --ckpt runs/synapse-S/best.pth --legacy   # TransUNet's empty-mask rule, as published tables

Synapse, ACDC (Tables 1-2): volume by volume, per class on the 3-D label map, in voxels (no spacing, as the peers):
Dice, IoU, HD95, ASD; the mean over cases per class, then over classes. ISIC 2017/2018 (Table 3): Dice, SE, SP,
ACC of one confusion matrix pooled over the test images after Azad et al.'s resize of every mask to 256x256
('pooled_256', the table's figures), beside the same pooled at native resolution and per-image means. GlaS
(Table 4): per-image Dice and IoU. The values equal medpy's dc, jc, hd95, assd (>= 0.5) whenever both masks are
non-empty; RULES states what happens when one is empty. Each mean has a 95% percentile-bootstrap interval over the
cases, and the paper's row (PAPER) for the checkpoint's size is printed under ours. Predictions: predict.py.
"""

import argparse
import csv
import io
import json
import math
import sys
import time
import warnings
from dataclasses import replace
from functools import partial, reduce
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage, stats
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import model as danie
import predict

# ---- constants

METRICS, ISIC_METRICS, COUNTS = ('dice', 'iou', 'hd95', 'asd'), ('se', 'sp', 'acc'), ('tp', 'fp', 'fn', 'tn')
TABLE3_SIZE = 256                 # Azad et al. resize every ISIC mask to 256x256 before pooling
SELECTED_ON_TEST = 'best.pth chosen by its Dice on the TEST split (--select-on-test): its test figures are optimistic'
# NOTE(impl): the empty-mask rule. TransUNet's, which most of the field copied, scores Dice 1 for an empty ground
# truth under a non-empty prediction, so absent organs earn free points; ours is below, theirs is --legacy.
RULES = {
    'default': 'both empty: not counted for that class (NaN); one empty: Dice 0, IoU 0, HD95 = ASD = the '
               "array's diagonal in voxels (the worst distance that fits, as BraTS); ASD = one mean over both "
               "surfaces' distances (medpy >= 0.5 assd)",
    'legacy': "TransUNet's calculate_metric_percase: pred non-empty and gt empty: Dice 1, IoU 1, HD95 0, ASD 0; "
              'pred empty: all 0; ASD = the mean of the two directed means (medpy < 0.5 assd)',
}
CI_LEVEL, CI_RESAMPLES, CI_SEED = 0.95, 1000, 0  # the percentile bootstrap over the test cases beside every mean
# The paper's DANIE-S and DANIE-L rows as printed (Dice, IoU, SE, SP, ACC in %; ASD as printed, in no stated unit),
# keyed as summarize()'s figures: the table's headline row, then Dice per class. A figure a table lacks is absent.
PAPER = {
    ('synapse', 'S'): (1, dict(dice=84.21, iou=75.42, asd=3.65, aorta=87.31, gallbladder=73.11, kidney_l=85.29,
                               kidney_r=83.86, liver=95.20, pancreas=70.20, spleen=92.85, stomach=85.90)),
    ('synapse', 'L'): (1, dict(dice=85.47, iou=76.60, asd=2.76, aorta=88.17, gallbladder=77.80, kidney_l=88.59,
                               kidney_r=84.68, liver=94.84, pancreas=71.94, spleen=91.95, stomach=85.82)),
    ('acdc', 'S'): (2, dict(dice=91.96, RV=89.61, Myo=90.37, LV=95.89)),
    ('acdc', 'L'): (2, dict(dice=92.36, RV=90.12, Myo=90.99, LV=96.00)),  # Table 2; Sec. 4.4's text says RV 90.17
    ('isic2017', 'S'): (3, dict(dice=93.84, se=92.92, sp=98.73, acc=97.58)),
    ('isic2017', 'L'): (3, dict(dice=94.25, se=94.10, sp=98.61, acc=97.72)),
    ('isic2018', 'S'): (3, dict(dice=93.32, se=95.34, sp=96.63, acc=96.28)),
    ('isic2018', 'L'): (3, dict(dice=93.47, se=94.17, sp=97.27, acc=96.43)),
    ('glas', 'S'): (4, dict(dice=91.28, iou=84.23)),
    ('glas', 'L'): (4, dict(dice=92.65, iou=86.28)),
}

# ---- helpers


def _mean(v, w):
    """Weighted means that skip NaN: v (..., N), a value per case, w (B, N), a weight per case -> (..., B); NaN where
    no case counts. w = 1 gives the figures; w = the times each case is drawn, one bootstrap replicate per row."""
    ok = np.isfinite(v)
    num, den = np.where(ok, v, 0.0) @ w.T, ok.astype(w.dtype) @ w.T  # (..., N) @ (N, B) -> (..., B)
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def _bbox(mask, margin=1):
    """Slices of the bounding box of a non-empty boolean mask, grown by `margin` and clipped to the array."""
    box = ndimage.find_objects(mask.view(np.uint8))[0]  # the box of label 1
    return tuple(slice(max(b.start - margin, 0), min(b.stop + margin, n)) for b, n in zip(box, mask.shape))

# ---- blocks: metrics


def _surface_distances(a, b):
    """Distances from a's surface voxels to b's surface and back (medpy's __surface_distances, both ways)."""
    # surface = mask XOR its erosion (connectivity 1); erosion's border_value=0 treats outside as empty, which is
    # also true of the voxels the bounding box cut away, so the crop changes nothing
    footprint = ndimage.generate_binary_structure(a.ndim, 1)
    sa, sb = (m ^ ndimage.binary_erosion(m, structure=footprint) for m in (a, b))
    # the EDT gives each voxel's distance to the nearest zero: to the other mask's nearest surface voxel
    return ndimage.distance_transform_edt(~sb)[sa], ndimage.distance_transform_edt(~sa)[sb]


def _overlap(n_pred, n_gt, inter, legacy=False):
    """Dice and IoU from two masks' sizes and intersection, under RULES."""
    if legacy and (n_pred == 0 or n_gt == 0):
        return dict(dice=float(n_pred > 0), iou=float(n_pred > 0))
    if n_pred == 0 and n_gt == 0:
        return dict(dice=float('nan'), iou=float('nan'))
    # medpy's dc and jc float expressions, so the values agree to the last bits
    return dict(dice=2.0 * inter / float(n_pred + n_gt), iou=float(inter) / float(n_pred + n_gt - inter))


def binary_metrics(pred, gt, legacy=False, distances=True):
    """Dice, IoU, HD95, ASD (symmetric, in voxels) of two boolean masks of any dimension, under RULES;
    distances=False: HD95 = ASD = NaN, for image sets whose tables report overlap only."""
    pred, gt = (np.atleast_1d(np.asarray(m, dtype=bool)) for m in (pred, gt))
    if pred.shape != gt.shape:
        raise ValueError(f'binary_metrics: pred {pred.shape} and gt {gt.shape} differ in shape')
    nan, n_pred, n_gt = float('nan'), int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    if n_pred == 0 or n_gt == 0:
        worst = float(np.sqrt(np.sum(np.square(np.asarray(pred.shape, np.float64)))))  # the array's diagonal
        d = nan if not distances or n_pred == n_gt == 0 and not legacy else 0.0 if legacy else worst
        return dict(_overlap(n_pred, n_gt, 0, legacy), hd95=d, asd=d)
    # everything happens inside the bounding box of the union (+1 voxel): a 512x512x150 CT becomes an organ
    box = _bbox(pred | gt)
    p, g = pred[box], gt[box]
    scores = _overlap(n_pred, n_gt, int(np.count_nonzero(p & g)))
    if not distances:
        return dict(scores, hd95=nan, asd=nan)
    # NOTE(impl): distances in voxels, without spacing, as the peers (the public Synapse/ACDC files carry none).
    d_pg, d_gp = _surface_distances(p, g)
    asd = np.mean((d_pg.mean(), d_gp.mean())) if legacy else np.concatenate((d_pg, d_gp)).mean()
    return dict(scores, hd95=float(np.percentile(np.hstack((d_pg, d_gp)), 95)), asd=float(asd))


def confusion_counts(pred, gt, classes):
    """(len(classes), 4) int64 tensor of tp, fp, fn, tn of pred == c against gt == c, on pred's device."""
    c = torch.as_tensor(classes, device=pred.device).view(-1, *[1] * pred.ndim)  # (K,1,..,1)
    p, g = (pred == c).flatten(1), (gt == c).flatten(1)  # (K,...) -> (K,P)
    tp, n_p, n_g = (p & g).sum(1), p.sum(1), g.sum(1)  # (K,)
    return torch.stack((tp, n_p - tp, n_g - tp, pred.numel() - n_p - n_g + tp), 1)  # (K,4)


def confusion_scores(tp, fp, fn, tn):
    """Dice, SE (recall), SP, ACC of confusion matrices (numbers or arrays of them); NaN where a ratio is 0/0."""
    def ratio(a, b):
        return a / np.where(b > 0, b, np.nan)
    return dict(dice=ratio(2 * tp, 2 * tp + fp + fn), se=ratio(tp, tp + fn), sp=ratio(tn, tn + fp),
                acc=ratio(tp + tn, tp + fp + fn + tn))


def table_resize(masks, size=TABLE3_SIZE):
    """Boolean masks (N,H,W) -> (N,size,size) as Azad et al. resize ISIC masks: scipy's imresize(mask, [256, 256],
    'bilinear') of the 0/255 PNG, which is Pillow's bilinear resize, then / 255 > 0.5."""
    m = np.asarray(torch.as_tensor(masks).cpu(), np.uint8) * 255
    return torch.from_numpy(np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BILINEAR)) > 127
                                      for x in m]))


def load_case(item, spec, img_size, keep_image=False):
    """DataLoader collate of evaluate(): a case read and prepared in a worker while the device runs. The label travels
    as a uint8 tensor where the ids fit, the image only when it is written out."""
    case = item.load()
    if keep_image and case.files and str(case.files[0]).lower().endswith(data.NIFTI_SUFFIXES):  # kept for --save-pred
        case = replace(case, geometry=data.read_nifti(case.files[0], voxels=False)[1])
    x = predict.model_input(case, spec.kind, img_size)
    label = torch.from_numpy(case.label.astype(np.uint8 if spec.num_classes <= 256 else np.int64))
    return replace(case, image=case.image if keep_image else None, label=label), x

# ---- top level: the protocol


def case_rows(case_id, pred, gt, spec, legacy=False, distances=True):
    """One row per reported class: case, class, dice, iou, hd95, asd; images also se, sp, acc and their confusion
    counts at native size and at 256x256. pred, gt: label maps (numpy or torch, any device)."""
    if spec.kind == 'volume':
        pred, gt = (np.asarray(torch.as_tensor(a).cpu()) for a in (pred, gt))
        return [{'case': case_id, 'class': spec.class_names[c], **binary_metrics(pred == c, gt == c, legacy, distances)}
                for c in spec.report_order]
    pred = torch.as_tensor(pred)
    gt = torch.as_tensor(gt).to(pred.device)
    counts = confusion_counts(pred, gt, spec.report_order).tolist()
    rows = []
    for c, n in zip(spec.report_order, counts):
        row = {'case': case_id, 'class': spec.class_names[c], **_overlap(n[0] + n[1], n[0] + n[2], n[0], legacy),
               'hd95': float('nan'), 'asd': float('nan')}
        if distances:
            row.update(binary_metrics(*(np.asarray((a == c).cpu()) for a in (pred, gt)), legacy=legacy))
        row.update({k: v for k, v in confusion_scores(*n).items() if k != 'dice'}, **dict(zip(COUNTS, n)))
        # NOTE(impl): 'pooled_256': prediction and mask (at native size) both get Azad et al.'s mask resize
        n256 = confusion_counts(*table_resize(torch.stack((pred == c, gt == c))), (True,))[0].tolist()
        rows.append({**row, **{f'{k}_256': v for k, v in zip(COUNTS, n256)}})
    return rows


def _figures(names, values, counts, w):
    """Every figure of summarize() under case weights w (B, N), as {(key, ..., metric): (B,) array}. values:
    {metric: (K, N)} per class and case; counts: {suffix: (K, N, 4)}, image sets' confusion counts."""
    out, ones = {}, np.ones((1, len(names)))
    per = _mean(np.stack(list(values.values())), w)  # the mean over cases per class, skipping NaN: (M, K, B)
    means = _mean(per.swapaxes(1, 2), ones)[..., 0]  # then over classes: (M, B, K) @ (K, 1) -> (M, B)
    for m, per_m, mean in zip(values, per, means):
        out.update({('per_class', n, m): p for n, p in zip(names, per_m)})
        out.update({(f'mean_{m}',): mean} if m in METRICS else {})
        if counts and m not in ('hd95', 'asd'):  # image sets: the per-image means beside the pooled figures
            out['per_image', m] = mean
    for suffix, c in counts.items():  # one confusion matrix per class, pooled over the drawn images
        key = 'pooled_256' if suffix else 'pooled_native'
        for m, per in confusion_scores(*np.einsum('knc,bn->ckb', c, w)).items():  # 4 x (K, B)
            out.update({(f'{key}_per_class', n, m): p for n, p in zip(names, per)})
            out[key, m] = _mean(per.T, ones)[:, 0]
    return out


def bootstrap_ci(statistic, n):
    """(F, 2): the CI_LEVEL percentile-bootstrap interval of statistic(w) -> (F, B), w (B, n) the times each of n cases
    is drawn in each of CI_RESAMPLES seeded resamples (scipy's); NaN below two cases. NOTE(impl): a replicate whose
    figure is NaN (no drawn case counts for its class) is left out, as the mean leaves such cases out."""
    def drawn(i, axis=-1):  # scipy draws case indices i (B, n); w[b, j] = how often case j is in resample b
        w = np.bincount((i + n * np.arange(len(i))[:, None]).ravel(), minlength=i.size).reshape(i.shape)
        return statistic(w.astype(np.float64))
    if n < 2:
        return np.full((len(statistic(np.ones((1, n)))), 2), np.nan)
    with warnings.catch_warnings():  # scipy's and numpy's warnings on NaN replicates, which are handled here
        warnings.simplefilter('ignore')
        res = stats.bootstrap((np.arange(n),), drawn, n_resamples=CI_RESAMPLES, method='percentile',
                              vectorized=True, random_state=np.random.default_rng(CI_SEED))
        return np.nanquantile(res.bootstrap_distribution, ((1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2), axis=-1).T


def summarize(rows, spec, legacy=False):
    """The mean over cases per class, then over classes (skipping NaN); image sets also pooled (Table 3). Each figure
    has its bootstrap interval over the cases beside it, '<name>_ci'. mean_dice is the table's figure, spec.figure:
    the case mean, or ISIC's Dice pooled at 256x256."""
    names, cases = [spec.class_names[c] for c in spec.report_order], list(dict.fromkeys(r['case'] for r in rows))
    at = {(r['case'], r['class']): r for r in rows}

    def grid(key):  # (K, N): a row per class, a column per case
        return np.array([[at[c, n][key] for c in cases] for n in names], float).reshape(len(names), -1)
    values = {m: grid(m) for m in METRICS + (ISIC_METRICS if spec.kind == 'image' else ())}
    counts = {s: np.stack([grid(k + s) for k in COUNTS], -1) for s in ('', '_256')} if spec.kind == 'image' else {}
    figures = _figures(names, values, counts, np.ones((1, len(cases))))
    ci = bootstrap_ci(lambda w: np.stack(list(_figures(names, values, counts, w).values())), len(cases))
    out = dict(rule='legacy' if legacy else 'default', rule_text=RULES['legacy' if legacy else 'default'],
               ci=f'{CI_LEVEL:.0%} percentile bootstrap over the cases, {CI_RESAMPLES} resamples, seed {CI_SEED}',
               n_cases=len(cases), classes=names)
    for ((*path, m), v), lo_hi in zip(figures.items(), ci.tolist()):  # ('per_class', name, m) -> out['per_class'][name]
        reduce(lambda d, key: d.setdefault(key, {}), path, out).update({m: float(v[0]), f'{m}_ci': lo_hi})
    for n, v in zip(names, values['dice']):  # the cases that count for the class (under RULES' default, not both-empty)
        out['per_class'][n]['n'] = int(np.isfinite(v).sum())
    if spec.figure == 'pooled_256':
        for k in ('mean_dice', 'mean_dice_ci'):
            out[k.replace('dice', 'dice_per_image')], out[k] = out[k], out['pooled_256'][k.removeprefix('mean_')]
    return out


def evaluate(model, cases, spec, img_size, *, device=None, batch_size=predict.BATCH, amp='none', legacy=False,
             save_pred=None, progress=True, distances=None, workers=0):
    """The Sec. 4.3 protocol over `cases` (a Sequence of data.Item); the summary, with its per-case 'cases' rows.
    Prints nothing and restores the model's training mode: train.py validates with it."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # NOTE(impl): HD95/ASD for volumes only by default: Tables 3-4 report none, and full-size ISIC images are slow
    distances = spec.kind == 'volume' if distances is None else distances
    items = getattr(cases, 'items', cases)
    loader = DataLoader(items, batch_size=None, num_workers=workers, pin_memory=device.type == 'cuda',
                        collate_fn=partial(load_case, spec=spec, img_size=img_size, keep_image=save_pred is not None))
    was_training, rows, t_pred, t_metric = model.training, [], 0.0, 0.0
    model.eval()
    try:
        for case, x in tqdm(loader, desc=f'eval {spec.name}', unit='case', disable=not progress):
            t0 = time.perf_counter()
            pred = predict.predict_case(model, case, spec, img_size, device, batch_size, amp, x=x)
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            rows += case_rows(case.id, pred, case.label, spec, legacy=legacy, distances=distances)
            t_pred, t_metric = t_pred + t1 - t0, t_metric + time.perf_counter() - t1
            if save_pred is not None:
                predict.write_prediction(save_pred, case.id, case.image, pred.cpu().numpy(), spec, case.geometry,
                                         label=case.label.numpy())
    finally:
        model.train(was_training)
    return dict(summarize(rows, spec, legacy), dataset=spec.name, img_size=img_size, amp=amp, device=str(device),
                cases=rows, timing=dict(predict_s=t_pred, metrics_s=t_metric))

# ---- top level: outputs: the table, per_case.csv and summary.json


def paper_row(dataset, size):
    """The paper's row for DANIE-<size> on a benchmark, in summarize()'s units; None for any other data."""
    table, figures = PAPER.get((dataset, size), (None, None))
    return figures and dict(model=f'DANIE-{size}', table=table,
                            **{k: v if k == 'asd' else v / 100 for k, v in figures.items()})  # % -> fractions


def format_table(summary, spec):
    """The paper's layout: per-class rows in its order, then the one-line row of Tables 1-2 or the pooled rows. Each
    figure has its interval beside it; summary['paper'] (paper_row()), where given, is printed under ours."""
    def num(v, k):  # Dice and the other ratios in %, distances as they are
        return '-' if v is None or math.isnan(v) else f"{v * (1 if k.endswith(('hd95', 'asd')) else 100):.2f}"

    def cells(label, d, keys):  # figures and their intervals under the columns' names: ' 86.40 [83.10, 89.00]'
        line = f'{label:<14}'
        for k in keys:  # d None: the names themselves
            lo, hi = (d or {}).get(f'{k}_ci') or (math.nan, math.nan)
            ci = '' if math.isnan(lo) else f' [{num(lo, k)}, {num(hi, k)}]'
            line += f'{k if d is None else num(d.get(k), k):>6}{ci}'.ljust(21) + ' '
        return line
    s, paper = summary, summary.get('paper')
    ref = paper and f"{paper['model']} (T{paper['table']})"
    lines = [f"{spec.name} | {s['n_cases']} cases | rule: {s['rule']} | Dice/IoU in %, HD95/ASD in voxels | "
             f"[{CI_LEVEL:.0%} CI] over the cases, seed {CI_SEED}", cells('class', None, ('Dice', 'IoU', 'HD95', 'ASD'))
             + 'n']
    lines += [cells(n, s['per_class'][n], METRICS) + str(s['per_class'][n]['n']) for n in s['classes']]
    if spec.kind == 'volume':  # the mean, then the row as Tables 1-2 print it: ours and, for a benchmark, the paper's
        lines.append(cells('mean', s, [f'mean_{k}' for k in METRICS]))
        keys, cols = ['dice', 'iou', 'asd', 'hd95'] + s['classes'], ['DICE', 'mIoU', 'ASD', 'HD95'] + s['classes']
        ours = {**{k: s[f'mean_{k}'] for k in METRICS}, **{n: s['per_class'][n]['dice'] for n in s['classes']}}
        width = [max(len(k), 6) + 1 for k in cols]
        row = lambda label, vals: f'{label:<14}' + ''.join(f'{v:>{w}}' for v, w in zip(vals, width))  # noqa: E731
        lines.append(row('paper row', cols))
        lines += [row(label, [num(d.get(k), k) for k in keys]) for label, d in (('ours', ours), (ref, paper)) if d]
        return '\n'.join(line.rstrip() for line in lines)
    lines.append(cells('', None, ('Dice', 'SE', 'SP', 'ACC', 'IoU')))
    for label, key in (('pooled 256', 'pooled_256'), ('pooled native', 'pooled_native'), ('per-image', 'per_image')):
        lines.append(cells(label, s[key], [k for k in ('dice', 'se', 'sp', 'acc', 'iou') if k in s[key]]))
        if paper and key == ('pooled_256' if spec.figure == 'pooled_256' else 'per_image'):  # the table's figures
            lines.append(cells(ref, paper, ('dice', 'se', 'sp', 'acc', 'iou')))
    if spec.figure == 'pooled_256':
        lines.append('the Table 3 figures: pooled 256 (every mask resized to 256x256 as Azad et al., one matrix)')
    return '\n'.join(line.rstrip() for line in lines)


def write_results(summary, out_dir, extra=None):
    """per_case.csv (case, class, metrics) and summary.json (the aggregates, NaN as null) into out_dir."""
    out_dir, rows = Path(out_dir), summary['cases']
    cols = ['case', 'class'] + list(METRICS) + [k for k in ISIC_METRICS if rows and k in rows[0]]
    table = [cols] + [[r[k] if k in ('case', 'class') else f'{r[k]:.6f}' for k in cols] for r in rows]
    csv.writer(text := io.StringIO(newline='')).writerows(table)
    js = json.dumps({**{k: v for k, v in summary.items() if k != 'cases'}, **(extra or {})},
                    default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    js = json.dumps(json.loads(js, parse_constant=lambda nan: None), indent=2)  # NaN -> null: strict JSON
    return (data.write_atomic(out_dir / 'per_case.csv', text.getvalue()),
            data.write_atomic(out_dir / 'summary.json', js))

# ---- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Score a DANIE checkpoint by Sec. 4.3's protocol (own files: predict.py)")
    p.add_argument('--ckpt', required=True, help='a checkpoint of train.py (best.pth or last.pth)')
    p.add_argument('--root', help="the dataset folder (default: the checkpoint's)")
    p.add_argument('--split', choices=('val', 'test'), default='test', help='the split to score (Sec. 4.1)')
    p.add_argument('--limit', type=predict.number(int, 1), help='score only the first N cases')
    p.add_argument('--legacy', action='store_true', help="RULES' legacy rule, as the published tables")
    p.add_argument('--batch-size', type=predict.number(int, 1), default=predict.BATCH, help='slices per forward pass')
    p.add_argument('--amp', choices=tuple(danie.AMP_DTYPES), default='none', help='autocast dtype')
    p.add_argument('--device', type=predict.device_arg, help='cuda, cuda:N, mps or cpu (default: the best there is)')
    p.add_argument('--workers', type=predict.number(int, 0), help='case readers (default: 4 on a GPU, else 0)')
    p.add_argument('--out', help='results folder (default: <ckpt folder>/eval_<split>)')
    p.add_argument('--save-pred', help='also write the predictions here: NIfTI volumes or PNG masks, with overlays')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    args = p.parse_args(argv)
    args.device = args.device or predict.device_arg(None)
    args.workers = (4 if args.device.type == 'cuda' else 0) if args.workers is None else args.workers
    return args


def unseen(cases, info, split, ckpt_path):
    """cases, if none is a case the checkpoint trained on (or, for the test split, validated on): a split carved
    from another copy of the data, or from a folder that has changed, can hold them."""
    if 'trained' not in info:
        print(f'WARNING: {ckpt_path} records no training cases: not checked that the {split} cases are unseen',
              file=sys.stderr)
        return cases
    seen = {k: set(info[k]) & set(cases.ids) for k in ('trained', 'validated') if k == 'trained' or split == 'test'}
    if shared := sorted(set().union(*seen.values())):
        how = ', '.join(f'{len(v)} {k} on' for k, v in seen.items() if v)
        raise data.DataError(f'the {split} split shares {len(shared)} of its {len(cases)} cases with those {ckpt_path} '
                             f"saw ({how}: {', '.join(shared[:5])}{', ...' if len(shared) > 5 else ''}): its "
                             'scores would not be of unseen cases; evaluate on the data the run was split from')
    return cases


def run(args):
    """The evaluation of main(), from the parsed arguments; the exit code."""
    t_start = time.perf_counter()
    try:
        ckpt = danie.load_checkpoint(args.ckpt)
        try:
            spec = data.spec_from_dict(ckpt['data']['spec'])
        except data.DataError as e:
            raise danie.CheckpointError(f'{args.ckpt}: {e}') from None
        info = ckpt['data']
        root = args.root or info.get('root') or data.default_root(spec.name)
        roots = {root: '--root' if args.root else 'the dataset root the checkpoint records'}
        out = data.output_dir(args.out or Path(args.ckpt).resolve().parent / f'eval_{args.split}',
                              '--out' if args.out else 'the results folder beside --ckpt; --out sets another',
                              roots=roots)
        save = args.save_pred and data.output_dir(args.save_pred, '--save-pred', roots=roots)
        if info.get('selected_on') == 'test' and args.split == 'test':
            print(f'WARNING: {SELECTED_ON_TEST}', file=sys.stderr)
        net = danie.from_checkpoint(ckpt, args.ckpt).to(args.device)
        opts = {k: info[k] for k in ('val_cases', 'label_map') if info.get(k) is not None}
        try:
            data.get_spec(info['name'], root, spec.num_classes, given=f'{args.ckpt} (the classes it learnt)')
            cases = data.eval_cases(info['name'], root, args.split, num_classes=spec.num_classes, **opts)
        except data.DataError as e:
            raise data.DataError(f"{e}{'' if args.root else ' (the root the checkpoint records; --root sets another)'}")
        cases = unseen(cases, info, args.split, args.ckpt)
        cases = cases[:args.limit] if args.limit else cases
        if not len(cases):
            raise data.DataError(f'{root}: the {args.split} split of {spec.name} has no cases')
        summary = evaluate(net, cases, spec, ckpt['config']['img_size'], device=args.device, batch_size=args.batch_size,
                           amp=args.amp, legacy=args.legacy, save_pred=save, progress=not args.no_progress,
                           workers=args.workers)
    except (danie.CheckpointError, data.DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except OSError as e:  # a --save-pred write that failed after the checks
        print(f'error: {e.filename}: {e.strerror}', file=sys.stderr)
        return 1
    summary['paper'] = paper_row(spec.name, ckpt['config']['size'])  # None off the paper's benchmarks
    print(format_table(summary, spec))
    summary['timing']['total_s'] = time.perf_counter() - t_start
    extra = dict(ckpt=str(Path(args.ckpt).resolve()), split=args.split, root=str(root), limit=args.limit,
                 epoch=ckpt['epoch'], step=ckpt['step'], init=ckpt['init'], save_pred=args.save_pred,
                 config=ckpt['config'], selected_on=info.get('selected_on'))
    try:
        paths = write_results(summary, out, extra)
    except OSError as e:
        print(f'error: {out}: cannot write the results ({e.strerror or e})', file=sys.stderr)
        return 1
    print(f'wrote {paths[0]} and {paths[1]}' + (f'; predictions in {args.save_pred}' if args.save_pred else ''))
    return 0


def main(argv=None):
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:
        print('\ninterrupted: no results written', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
