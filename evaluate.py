"""
Evaluation of DANIE (paper Sec. 4.3, Tables 1-4): the metrics, the per-dataset protocol, the outputs.

    python evaluate.py --ckpt runs/synapse-S/best.pth            # the checkpoint names its data, classes and size
    python evaluate.py --ckpt runs/synapse-S/best.pth --legacy   # TransUNet's empty-mask rule, as published tables

Synapse, ACDC (Tables 1-2): volume by volume, per class on the 3-D label map, in voxels (no spacing, as the peers):
Dice, IoU, HD95, ASD; the mean over cases per class, then over classes. ISIC 2017/2018 (Table 3): Dice, SE, SP,
ACC of one confusion matrix pooled over the test images after Azad et al.'s resize of every mask to 256x256
('pooled_256', the table's figures), beside the same pooled at native resolution and per-image means. GlaS
(Table 4): per-image Dice and IoU. Surface = mask XOR its erosion (connectivity 1); HD95 = the 95th percentile of
both directed distance sets; ASD = one mean over both surfaces' distances (medpy >= 0.5's assd). The values equal
medpy's dc, jc, hd95, assd whenever both masks are non-empty; RULES states what happens when one is empty.

Offers: evaluate() (train.py validates with it), binary_metrics(), confusion_counts(), table_resize(), case_rows(),
summarize(), format_table(), write_results(), RULES. The model's predictions come from predict.py.
"""

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
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

# ---- helpers


def _nanmean(values):
    """The mean of the finite values; NaN when there are none."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else float('nan')


def _json_safe(obj):
    """NaN -> null, numpy scalars -> Python: summary.json stays strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(obj) else float(obj)
    return int(obj) if isinstance(obj, np.integer) else str(obj) if isinstance(obj, Path) else obj


def _bbox(mask, margin=1):
    """Slices of the bounding box of a non-empty mask, grown by `margin` and clipped to the array."""
    box = []
    for ax in range(mask.ndim):
        nz = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        box.append(slice(max(int(nz[0]) - margin, 0), min(int(nz[-1]) + 1 + margin, mask.shape[ax])))
    return tuple(box)

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
    """Dice, IoU, HD95, ASD (symmetric, in voxels) of two boolean masks of any dimension, under RULES.

    distances=False skips HD95/ASD (NaN), for image sets whose tables report overlap only."""
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
    rows = []
    for c in classes:
        p, g = pred == c, gt == c
        tp, n_p, n_g = (p & g).sum(), p.sum(), g.sum()
        rows.append(torch.stack((tp, n_p - tp, n_g - tp, p.numel() - n_p - n_g + tp)))
    return torch.stack(rows)


def confusion_scores(tp, fp, fn, tn):
    """Dice, SE (recall), SP, ACC of one confusion matrix; NaN where a ratio is 0/0."""
    def ratio(a, b):
        return a / b if b else float('nan')
    return dict(dice=ratio(2 * tp, 2 * tp + fp + fn), se=ratio(tp, tp + fn), sp=ratio(tn, tn + fp),
                acc=ratio(tp + tn, tp + fp + fn + tn))


def table_resize(masks, size=TABLE3_SIZE):
    """Boolean masks (N,H,W) -> (N,size,size) as Azad et al. resize ISIC masks: scipy's imresize(mask, [256, 256],
    'bilinear') of the 0/255 PNG, which is Pillow's bilinear resize, then / 255 > 0.5."""
    m = np.asarray(torch.as_tensor(masks).cpu(), np.uint8) * 255
    return torch.from_numpy(np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BILINEAR)) > 127
                                      for x in m]))


def load_case(item, spec, img_size, keep_image=False):
    """DataLoader collate of evaluate(): a case read and prepared for the model in a worker while the device
    runs. The label travels as a uint8 tensor where the ids fit, the image only when it is written out."""
    case = item.load()
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
        # NOTE(impl): 'pooled_256': prediction and mask (at native size) both get Azad et al.'s mask resize
        p256, g256 = table_resize(torch.stack((pred == c, gt == c)))
        row = {'case': case_id, 'class': spec.class_names[c], **_overlap(n[0] + n[1], n[0] + n[2], n[0], legacy),
               'hd95': float('nan'), 'asd': float('nan')}
        if distances:
            row.update(binary_metrics(*(np.asarray((a == c).cpu()) for a in (pred, gt)), legacy=legacy))
        row.update({k: v for k, v in confusion_scores(*n).items() if k != 'dice'}, **dict(zip(COUNTS, n)))
        n256 = confusion_counts(p256, g256, (True,))[0].tolist()
        rows.append({**row, **{f'{k}_256': v for k, v in zip(COUNTS, n256)}})
    return rows


def _pooled(rows, names, suffix=''):
    """Dice, SE, SP, ACC of the confusion matrix pooled over all rows, per class and averaged over classes."""
    per = {n: confusion_scores(*(sum(r[k + suffix] for r in rows if r['class'] == n) for k in COUNTS)) for n in names}
    return {m: _nanmean(per[n][m] for n in names) for m in ('dice',) + ISIC_METRICS}, per


def summarize(rows, spec, legacy=False):
    """The mean over cases per class, then over classes (skipping NaN); image sets also pooled (Table 3). mean_dice
    is the table's figure, spec.figure: the case mean, or ISIC's Dice pooled at 256x256."""
    names = [spec.class_names[c] for c in spec.report_order]
    per_class = {n: {m: _nanmean(r[m] for r in rows if r['class'] == n) for m in METRICS} for n in names}
    for n in names:  # the cases that count for the class (both-empty ones do not, under RULES' default)
        per_class[n]['n'] = sum(not math.isnan(r['dice']) for r in rows if r['class'] == n)
    out = dict(rule='legacy' if legacy else 'default', rule_text=RULES['legacy' if legacy else 'default'],
               n_cases=len({r['case'] for r in rows}), classes=names, per_class=per_class,
               **{f'mean_{m}': _nanmean(per_class[n][m] for n in names) for m in METRICS})
    if spec.kind == 'image':
        out['pooled_native'], out['pooled_native_per_class'] = _pooled(rows, names)
        out['pooled_256'], out['pooled_256_per_class'] = _pooled(rows, names, '_256')
        per_image = {n: {m: _nanmean(r[m] for r in rows if r['class'] == n) for m in ('dice', 'iou') + ISIC_METRICS}
                     for n in names}
        out['per_image'] = {m: _nanmean(per_image[n][m] for n in names) for m in ('dice', 'iou') + ISIC_METRICS}
    if spec.figure == 'pooled_256':
        out['mean_dice_per_image'], out['mean_dice'] = out['mean_dice'], out['pooled_256']['dice']
    return out


def evaluate(model, cases, spec, img_size, *, device=None, batch_size=predict.BATCH, amp='none', legacy=False,
             save_pred=None, progress=True, distances=None, workers=0):
    """The Sec. 4.3 protocol over `cases` (a Sequence of data.Item); the summary, with its per-case 'cases' rows.

    Prints nothing and restores the model's training mode: train.py validates with it."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # NOTE(impl): HD95/ASD for volumes only by default: Tables 3-4 report none, and full-size ISIC images are slow
    distances = spec.kind == 'volume' if distances is None else distances
    # cases are read and resized ahead, in `workers` processes, while the device predicts
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
                predict.write_prediction(save_pred, case.id, case.image, pred.cpu().numpy(), spec,
                                         label=case.label.numpy())
    finally:
        model.train(was_training)
    n = max(len(items), 1)
    return dict(summarize(rows, spec, legacy), dataset=spec.name, img_size=img_size, amp=amp, device=str(device),
                cases=rows, timing=dict(predict_s=t_pred, metrics_s=t_metric, predict_s_per_case=t_pred / n,
                                        metrics_s_per_case=t_metric / n))

# ---- top level: outputs: the table, per_case.csv and summary.json


def format_table(summary, spec):
    """The paper's layout: per-class rows in its order, then the one-line row of Tables 1-2 or the pooled rows."""
    pct = lambda v: '   -  ' if v is None or math.isnan(v) else f'{100 * v:6.2f}'  # noqa: E731
    dst = lambda v: '    -  ' if v is None or math.isnan(v) else f'{v:7.2f}'  # noqa: E731
    lines = [f"{spec.name} | {summary['n_cases']} cases | rule: {summary['rule']} | Dice/IoU in %, HD95/ASD in voxels",
             f"{'class':<14}{'Dice':>7}{'IoU':>7}{'HD95':>8}{'ASD':>8}{'n':>5}"]
    for name in summary['classes']:
        c = summary['per_class'][name]
        lines.append(f"{name:<14}{pct(c['dice'])} {pct(c['iou'])}{dst(c['hd95'])} {dst(c['asd'])}{c['n']:>5}")
    if spec.kind == 'volume':
        s = summary
        lines.append(f"{'mean':<14}{pct(s['mean_dice'])} {pct(s['mean_iou'])}{dst(s['mean_hd95'])} "
                     f"{dst(s['mean_asd'])}")
        short = ' '.join(f"{n}={pct(s['per_class'][n]['dice']).strip()}" for n in s['classes'])
        lines.append(f"paper row: DICE {pct(s['mean_dice']).strip()}  mIoU {pct(s['mean_iou']).strip()}  ASD "
                     f"{dst(s['mean_asd']).strip()}  HD95 {dst(s['mean_hd95']).strip()}  | {short}")
        return '\n'.join(lines)
    lines.append(f"{'':<14}{'Dice':>7}{'SE':>7}{'SP':>7}{'ACC':>7}{'IoU':>7}")
    for label, key in (('pooled 256', 'pooled_256'), ('pooled native', 'pooled_native'), ('per-image', 'per_image')):
        p = summary[key]
        lines.append(f"{label:<14}" + ' '.join(pct(p[k]) for k in ('dice', 'se', 'sp', 'acc', 'iou') if k in p))
    if spec.figure == 'pooled_256':
        lines.append('the Table 3 figures: pooled 256 (every mask resized to 256x256 as Azad et al., one matrix)')
    return '\n'.join(lines)


def write_results(summary, out_dir, extra=None):
    """per_case.csv (case, class, metrics) and summary.json (the aggregates, NaN as null) into out_dir."""
    out_dir, rows = Path(out_dir), summary['cases']
    cols = ['case', 'class'] + list(METRICS) + [k for k in ISIC_METRICS if rows and k in rows[0]]
    with open(out_dir / 'per_case.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows([r[k] if k in ('case', 'class') else f'{r[k]:.6f}' for k in cols] for r in rows)
    js = {**{k: v for k, v in summary.items() if k != 'cases'}, **(extra or {})}
    (out_dir / 'summary.json').write_text(json.dumps(_json_safe(js), indent=2))
    return out_dir / 'per_case.csv', out_dir / 'summary.json'


# ---- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Score a DANIE checkpoint with the protocol of Sec. 4.3 '
                                            '(own files: predict.py).')
    p.add_argument('--ckpt', required=True, help='a checkpoint of train.py (best.pth or last.pth)')
    p.add_argument('--root', help="the dataset folder (default: the checkpoint's)")
    p.add_argument('--split', choices=('val', 'test'), default='test', help='the split to score (Sec. 4.1)')
    p.add_argument('--limit', type=int, help='score only the first N cases')
    p.add_argument('--legacy', action='store_true', help="TransUNet's empty-mask rule and medpy < 0.5's ASD, as the "
                                                         'published tables (evaluate.RULES)')
    p.add_argument('--batch-size', type=int, default=predict.BATCH, help='slices per forward pass')
    p.add_argument('--amp', choices=tuple(danie.AMP_DTYPES), default='none', help='autocast dtype')
    p.add_argument('--device', type=predict.device_arg, help='cuda, cuda:N, mps or cpu (default: the best there is)')
    p.add_argument('--workers', type=int, help='processes reading cases ahead (default: 4 on a GPU, else 0)')
    p.add_argument('--out', help='results folder (default: <ckpt folder>/eval_<split>)')
    p.add_argument('--save-pred', help='also write the predictions here: NIfTI volumes or PNG masks, with overlays')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    args = p.parse_args(argv)
    for flag in ('batch_size', 'limit', 'workers'):
        if getattr(args, flag) is not None and getattr(args, flag) < (0 if flag == 'workers' else 1):
            p.error(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'workers' else 1}")
    args.device = args.device or predict.device_arg(None)
    args.workers = (4 if args.device.type == 'cuda' else 0) if args.workers is None else args.workers
    return args


def main(argv=None):
    args, t_start = parse_args(argv), time.perf_counter()
    try:
        ckpt = danie.load_checkpoint(args.ckpt)
        try:
            spec = data.spec_from_dict(ckpt['data']['spec'])
        except data.DataError as e:
            raise danie.CheckpointError(f'{args.ckpt}: {e}') from None
        info = ckpt['data']
        root = args.root or info.get('root') or data.default_root(spec.name)
        out = data.output_dir(args.out or Path(args.ckpt).resolve().parent / f'eval_{args.split}', '--out', [root])
        save = args.save_pred and data.output_dir(args.save_pred, '--save-pred', [root])
        if info.get('selected_on') == 'test' and args.split == 'test':
            print(f'WARNING: {SELECTED_ON_TEST}', file=sys.stderr)
        net = danie.from_checkpoint(ckpt, args.ckpt).to(args.device, memory_format=danie.MEMORY_FORMAT)
        opts = {k: info[k] for k in ('val_cases', 'seed', 'label_map') if info.get(k) is not None}
        try:
            cases = data.eval_cases(info['name'], root, args.split, num_classes=spec.num_classes, **opts)
        except data.DataError as e:
            raise data.DataError(f"{e}{'' if args.root else ' (the root the checkpoint records; --root sets another)'}")
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


if __name__ == '__main__':
    sys.exit(main())
