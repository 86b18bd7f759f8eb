"""
Prediction with DANIE: a trained checkpoint on the user's own images and volumes, and the inference that
evaluate.py scores: the input prepared as in training, segmented, the label map resized back and written where a
viewer opens it.

    python predict.py --ckpt runs/synapse-S/best.pth --input scans/ --out pred/ [--tta]

Inputs: PNG/JPG/BMP/TIFF images (RGB or grayscale, 8 or 16 bits), NIfTI volumes, the benchmarks' preprocessed
.npz/.h5 files. Raw volumes get the intensity rule of the checkpoint's data (data.normalise). Outputs: for an image
<name>_pred.png (the class ids) and an overlay; for a volume a NIfTI in the input's geometry (nnU-Net's
CASE_0000.nii.gz gives CASE.nii.gz, as nnU-Net's predictor names it; other inputs <name>_pred.nii.gz) and PNG
overlays; labels.json.

Offers: device_arg(), number() (argparse types), model_input(), segment(), predict_case(), read_input(),
output_names(), write_prediction().
"""

import argparse
import gzip
import io
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

import data
import model as danie

# ---- constants

BATCH = 16                        # NOTE(impl): slices per forward pass at test time (Sec. 4.2: training only)
FLIPS = ((-1,), (-2,), (-2, -1))  # TTA: horizontal, vertical, both (and the identity)
INPUT_SUFFIXES = data.NIFTI_SUFFIXES + data.ARRAY_SUFFIXES + data.IMAGE_SUFFIXES
OVERLAY_SLICES = 3                # PNG overlays per predicted volume
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 160, 255], [255, 200, 0], [0, 200, 0], [200, 0, 255],
                    [0, 255, 200], [255, 120, 0], [120, 120, 255]], np.uint8)  # class id -> overlay colour

# ---- helpers


def device_arg(text):
    """argparse type of --device: cpu, cuda, cuda:N or mps, if this machine has it; default: the best it has."""
    mps = getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()
    have = [t for t, ok in (('cuda', torch.cuda.is_available()), ('mps', mps), ('cpu', True)) if ok]
    try:
        d = torch.device(text or have[0])
    except RuntimeError:
        d = None
    if d is None or d.type not in have or (d.type == 'cuda' and (d.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device of this machine (it has: {', '.join(have)})")
    return d


def number(kind, low, strict=False):
    """argparse type: a finite int or float above (strict) or at least `low`; a whole float >= 1 as an int."""
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected {kind.__name__}, got {text!r}') from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>' if strict else '>='} {low}, got {text!r}")
        return int(value) if kind is float and value >= 1 and value.is_integer() else value
    return check

# ---- blocks: inference: a batched forward, the argmax and the resize back, on the model's device


def _forward(model, x, tta=False):
    """Class scores of x (n,3,S,S): y of Eq. 12, or with tta the mean softmax over the flips."""
    if not tta:
        return model(x)[0].float()
    # NOTE(impl): --tta averages the softmax of the 4 flips, as nnU-Net v1 (v2 averages logits): one flip with
    # extreme logits cannot outvote the other three, and the mean stays a probability.
    total = model(x)[0].float().softmax(1)
    for dims in FLIPS:
        total += model(x.flip(dims))[0].float().softmax(1).flip(dims)
    return total / (1 + len(FLIPS))


def segment(model, x, device, batch_size=BATCH, amp='none', tta=False):
    """Label maps (N,S,S) uint8 on `device` of the prepared input x (N,3,S,S), batch_size slices per pass."""
    labels = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device, non_blocking=True)  # (n,3,S,S)
            with danie.autocast(device, amp):
                y = _forward(model, xb, tta)
            # NOTE(impl): argmax over the K logits; for K = 2 (ISIC, GlaS) the lineage's softmax threshold of 0.5
            labels.append(y.argmax(1).to(torch.uint8))  # (n,K,S,S) -> (n,S,S)
    return torch.cat(labels)


def model_input(case, kind, img_size):
    """A case's image as the model's input (N,3,S,S): a volume's slices, an image as a batch of one."""
    return data.prepare_input(case.image if kind == 'volume' else case.image[None], img_size)


def predict_case(model, case, spec, img_size, device, batch_size=BATCH, amp='none', x=None, tta=False):
    """The label map of one case (a data.Item) at its label's size, or its image's, on `device`:
    model_input (unless x is given), segment, data.restore_size."""
    x = model_input(case, spec.kind, img_size) if x is None else x  # (N,3,S,S)
    hw = case.label.shape[-2:] if case.label is not None else case.image.shape[-2:] if spec.kind == 'volume' \
        else case.image.shape[:2]
    labels = data.restore_size(segment(model, x, device, batch_size, amp, tta), hw, spec.kind)
    return labels if spec.kind == 'volume' else labels[0]  # (D,H,W) / (H,W)

# ---- blocks: the user's files in, label maps and overlays out


def read_input(path, num_classes=None):
    """An image, a raw NIfTI volume (its geometry kept, sliced as in training) or a preprocessed .npz/.h5 file, whose
    label, if any, is checked against num_classes."""
    path = Path(path)
    suffix = next((x for x in INPUT_SUFFIXES if path.name.lower().endswith(x)), None)
    if suffix is None:
        raise data.DataError(f'{path}: unsupported file type; expected one of {", ".join(INPUT_SUFFIXES)}')
    item = data.Item(path.name[:-len(suffix)], files=(path,))
    if suffix in data.IMAGE_SUFFIXES:  # RGB or grayscale, 8 or 16 bits -> uint8 RGB
        return replace(item, image=data.read_image(path))
    if suffix in data.NIFTI_SUFFIXES:
        a, img = data.read_nifti(path)
        return replace(item, image=data.voxel_order(a.astype(np.float32)), geometry=img)
    arrays = data.read_arrays(path)
    key = next((k for k in ('image', 'img') if k in arrays and arrays[k].ndim in (2, 3)), None)
    if key is None:
        raise data.DataError(f'{path}: expected a 2-D or 3-D array image (or img), found {list(arrays)}')
    image, label = np.asarray(arrays[key], np.float32), arrays.get('label')
    label = data.class_ids(label, path, num_classes) if label is not None and np.shape(label) == image.shape \
        else None
    if image.ndim == 2:  # one slice: a volume of depth 1
        image, label = image[None], None if label is None else label[None]
    return replace(item, image=image, label=label)


def output_names(files):
    """{file: (name, label map's name)}: nnU-Net's CASE_0000.nii.gz gives (CASE, CASE), another file (<stem>,
    <stem>_pred). Inputs of one stem (scan.jpg, scan.png) keep their endings (scan_jpg): none is written twice."""
    def parts(f):  # (name, whether nnU-Net's naming applies)
        stem = next(f.name[:-len(x)] for x in INPUT_SUFFIXES if f.name.lower().endswith(x))
        nnunet = stem.endswith('_0000') and f.name.lower().endswith(data.NIFTI_SUFFIXES)
        return (stem[:-5], True) if nnunet else (stem, False)
    stems, names = [parts(f)[0] for f in files], {}
    for f, stem in zip(files, stems):
        n, nnunet = (f.name.replace('.', '_'), False) if stems.count(stem) > 1 else parts(f)
        names[f] = (n, n if nnunet else f'{n}_pred')
    taken = [n for n, _ in names.values()]
    twice = [f for f in files if taken.count(names[f][0]) > 1]
    if twice:
        raise data.DataError(f'{twice[0]} and {twice[1]} would be written to one output name; rename one')
    return names


def _overlay(base, pred, gt=None):
    """The prediction filled at 40% in its class colours over an RGB image; the ground truth's outline in green."""
    alpha = np.where(pred > 0, 0.4, 0.0)[..., None]
    over = np.asarray(base, np.float32) * (1 - alpha) + PALETTE[pred % len(PALETTE)] * alpha
    if gt is not None:
        fg = np.asarray(gt) > 0
        over[fg ^ ndimage.binary_erosion(fg, iterations=2)] = (0, 255, 0)
    return over.clip(0, 255).astype(np.uint8)


def _png(a):
    """An image array as the bytes of a PNG file."""
    Image.fromarray(a).save(buf := io.BytesIO(), format='PNG')
    return buf.getbuffer()


def write_prediction(out, name, image, labels, spec, geometry=None, label=None, label_name=None):
    """A label map where a viewer opens it, as <label_name> (default <name>_pred): a volume (D,H,W) as .nii.gz in
    the input's geometry (without one: beside <name>_img/_gt.nii.gz), an image (H,W) as .png of the class ids; PNG
    overlays <name>_overlay*.png, and labels.json. Returns the paths."""
    out, labels, label_name = Path(out), np.asarray(labels), label_name or f'{name}_pred'
    data.write_atomic(out / 'labels.json', json.dumps(dict(enumerate(spec.class_names)), indent=1) + '\n')
    if labels.ndim == 2:  # NOTE(impl): the .png holds class ids, not ids scaled for viewing: it stays a label map
        if image.shape[:2] != labels.shape:  # an image stored smaller than its mask (ISIC): the mask's size
            image = np.array(Image.fromarray(image).resize(labels.shape[::-1], Image.BILINEAR))
        return [data.write_atomic(out / f'{label_name}.png', _png(labels.astype(np.uint8))),
                data.write_atomic(out / f'{name}_overlay.png', _png(_overlay(image, labels, label)))]
    arrays = [(label_name, labels, np.uint8), (f'{name}_img', image, np.float32), (f'{name}_gt', label, np.uint8)]
    arrays = [a for a in arrays if a[1] is not None and (geometry is None or a[0] == label_name)]
    for n, a, dtype in arrays:
        if geometry is not None:  # the input's shape, affine and header: it overlays the input in ITK-SNAP, Slicer
            header = geometry.header.copy()
            header.set_data_dtype(np.uint8)
            header.set_slope_inter(1, 0)  # class ids, never rescaled
            a = data.voxel_order(a.astype(np.uint8)).reshape(geometry.shape)  # (D,H,W) -> (X,Y,Z)
            img = type(geometry)(a, geometry.affine, header)
        else:  # NOTE(impl): .h5/.npz files carry no geometry: identity affine, (D,H,W) written as NIfTI (W,H,D)
            img = nib.Nifti1Image(data.voxel_order(np.asarray(a, dtype)), np.eye(4))
        data.write_atomic(out / f'{n}.nii.gz', gzip.compress(img.to_bytes(), compresslevel=1))  # nibabel's level
    paths = [out / f'{n}.nii.gz' for n, _, _ in arrays]
    ids, counts = np.unique(labels[labels > 0], return_counts=True)  # overlays: where the largest structures are
    picks = list(dict.fromkeys(int((labels == c).sum(axis=(1, 2)).argmax()) for c in ids[np.argsort(-counts)]))
    lo, hi = np.percentile(image, (0.5, 99.5))
    for k in sorted(picks[:OVERLAY_SLICES]) or [len(labels) // 2]:
        gray = (np.clip(image[k], lo, hi) - lo) / max(float(hi - lo), 1e-8) * 255  # (H,W) in [0, 255]
        paths.append(data.write_atomic(out / f'{name}_overlay_z{k:03d}.png', _png(_overlay(
            np.repeat(gray[..., None], 3, 2), labels[k], None if label is None else label[k]))))
    return paths

# ---- top level: one file, then the command line


def predict_file(model, path, spec, img_size, args):
    """Read one file, segment it (a raw volume normalised as the checkpoint's data), return (item, label map)."""
    item = read_input(path, spec.num_classes)  # a preprocessed file's labels are written beside the prediction
    kind = 'image' if item.image.dtype == np.uint8 else 'volume'
    if item.geometry is not None:  # a raw NIfTI volume; RGB images are normalised by data.prepare_input
        rule = args.intensity or spec.intensity
        if rule == 'rgb':
            raise data.DataError(f'{path}: a volume, but the checkpoint learnt RGB images: choose --intensity')
        item = replace(item, image=data.normalise(item.image, rule))
    labels = predict_case(model, replace(item, label=None), replace(spec, kind=kind), img_size, args.device,
                          args.batch_size, args.amp, tta=args.tta)
    return item, labels.cpu().numpy()


def _input_files(src):
    """The file --input names, or the supported files of the folder it names, sorted."""
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise data.DataError(f'{src}: no such file or folder (--input)')
    files = sorted(p for p in src.iterdir() if p.is_file() and p.name.lower().endswith(INPUT_SUFFIXES))
    if not files:
        raise data.DataError(f'{src}: no input files (--input expects {", ".join(INPUT_SUFFIXES)})')
    return files


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Segment your own images and volumes with a DANIE checkpoint.')
    p.add_argument('--ckpt', required=True, help='a checkpoint of train.py (best.pth or last.pth)')
    p.add_argument('--input', required=True, help='an image or volume file, or a folder of them')
    p.add_argument('--out', required=True, help='the folder the label maps go to (not the input folder)')
    p.add_argument('--tta', action='store_true', help='flip test-time augmentation (mean softmax of 4 flips)')
    p.add_argument('--intensity', choices=data.INTENSITIES,
                   help="the normalisation of raw volumes (default: the checkpoint's data's)")
    p.add_argument('--batch-size', type=number(int, 1), default=BATCH, help='slices per forward pass')
    p.add_argument('--amp', choices=tuple(danie.AMP_DTYPES), default='none', help='autocast dtype')
    p.add_argument('--device', type=device_arg, help='cuda, cuda:N, mps or cpu (default: the best there is)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    args = p.parse_args(argv)
    args.device = args.device or device_arg(None)
    return args


def run(args):
    """Every file is tried; one that fails is named and skipped, and the exit code is then 1."""
    failed = []
    try:  # everything that can fail for all files fails here, before any work
        ckpt = danie.load_checkpoint(args.ckpt)
        spec, files = data.spec_from_dict(ckpt['data']['spec']), _input_files(args.input)
        names = output_names(files)
        out = data.output_dir(args.out, '--out', inputs=[f.parent for f in files],
                              roots={args.input: '--input'} if Path(args.input).is_dir() else None)
        net = danie.from_checkpoint(ckpt, args.ckpt).to(args.device).eval()
    except (danie.CheckpointError, data.DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    for path in tqdm(files, desc='predict', unit='file', disable=args.no_progress):
        try:
            item, labels = predict_file(net, path, spec, ckpt['config']['img_size'], args)
            name, label_name = names[path]
            write_prediction(out, name, item.image, labels, spec, item.geometry, item.label, label_name)
        except (data.DataError, ValueError) as e:
            failed.append(path)
            tqdm.write(f'error: {e if str(path) in str(e) else f"{path}: {e}"} (skipped)', file=sys.stderr)
        except OSError as e:  # the output folder, checked above, failed since: nothing more can be written
            print(f'error: {out}: cannot write ({e.strerror or e})', file=sys.stderr)
            return 1
    done = len(files) - len(failed)
    print(f'wrote {done} of {len(files)} label maps' + (' and labels.json' if done else '') + f' to {out}'
          + (' (flip TTA)' if args.tta else ''))
    if failed:
        print(f'failed ({len(failed)}): ' + ', '.join(map(str, failed)), file=sys.stderr)
    return 1 if failed else 0


def main(argv=None):
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:
        print('\ninterrupted: the label maps written so far are whole; run it again for the rest', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
