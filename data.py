"""
The data of DANIE (Sec. 4.1-4.2): the five benchmarks as downloaded and the user's own (image folders, nnU-Net
v2's raw layout), each read by one build function naming its folders and files, with Sec. 4.2 recipes (SPECS);
train_set -> TrainSet ((epoch, index) -> image (3,S,S), label (S,S)), TransUNet-augmented; eval_cases -> Cases
(whole cases as stored); prepare_input, restore_size: the resize to the model's input and back; make_demo: a
synthetic demo set.
"""

import argparse
import io
import itertools
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

# ---- constants: the datasets' Sec. 4.2 recipes (SPECS), their splits

# NOTE(impl): timm's maxvit_*_tf_224 mean/std (ImageNet's).
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ROT_DEGREES = 20.0                 # TransUNet: rotations in [-20, 20] deg
VAL_FRACTION = 0.1                 # NOTE(impl): validation held out: 10% of training cases (paper: none)
TEST_FRACTION = 0.2                # NOTE(impl): without a test list, 20% of the user's cases are the test split
SPLIT_SEED = 0                     # NOTE(impl): held-out cases are drawn with this seed, whatever --seed
ISIC2018_SPLIT = (1815, 259, 520)  # the paper's train/val/test (Azad et al.) of the 2594 images
ISIC_FG = 128                      # NOTE(impl): ISIC masks are 0/255: foreground >= 128, as resampled masks
CT_WINDOW = (-125.0, 275.0)        # Synapse/TransUNet: clip HU to this window, scale to [0, 1]
INTENSITIES = ('ct', 'mri', 'zscore', 'rgb', 'none')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')
NIFTI_SUFFIXES, ARRAY_SUFFIXES = ('.nii.gz', '.nii'), ('.npy.h5', '.h5', '.npz')
CACHE_MAX_BYTES = 8 << 30          # the largest cache of RGB pairs
SYNAPSE_CLASSES = ('background', 'spleen', 'kidney_r', 'kidney_l', 'gallbladder', 'liver', 'stomach', 'aorta',
                   'pancreas')     # the ids of TransUNet's files
SYNAPSE_TABLE1 = (7, 4, 3, 2, 5, 8, 1, 6)  # Table 1: Aorta, GB, KL, KR, Liver, PC, SP, SM
# CASCADE's files: BTCV's 13 labels (5 esophagus, 6 liver, 7 stomach, 8 aorta, 9-10 veins, 11 pancreas, 12-13 adrenals)
CASCADE_LUT = np.array([0, 1, 2, 3, 4, 0, 5, 6, 7, 0, 0, 8, 0, 0], np.int64)  # NOTE(impl): 'cascade' -> TransUNet's ids
LABEL_MAPS = ('transunet', 'cascade')
MAX_CLASSES = 256                  # class ids travel as uint8: resized labels, PNG and NIfTI outputs


class DataError(Exception):
    """A dataset on disk is missing, incomplete or in an unexpected format."""

    def __str__(self):  # from a loader worker it comes with the worker's traceback: keep its last line
        return super().__str__().splitlines()[-1].removeprefix(f'{__name__}.DataError: ')


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: classes, table order, Sec. 4.2 recipe, where it is published (its files: BUILDS[name].__doc__)."""
    name: str
    num_classes: int
    class_names: tuple     # by label id; 'background' at 0
    kind: str              # 'volume' (scored whole) or 'image'
    report_order: tuple    # class ids in the paper's table order
    epochs: int            # Sec. 4.2
    batch_size: int        # Sec. 4.2
    where: str
    img_size: int = 224    # NOTE(impl): not in the paper: ImageNet MaxViT's and the peers' size
    lr: float = 1e-4       # AdamW (Sec. 4.2)
    weight_decay: float = 1e-4  # AdamW (Sec. 4.2)
    intensity: str = 'none'  # normalise()'s rule for raw inputs
    figure: str = 'mean'   # the table's figure, which picks best.pth: case means or 'pooled_256' (Table 3)


_ISIC = dict(num_classes=2, class_names=('background', 'lesion'), kind='image', report_order=(1,), epochs=200,
             batch_size=8, where='challenge.isic-archive.com', intensity='rgb', figure='pooled_256')
SPECS = {
    'synapse': DatasetSpec('synapse', 9, SYNAPSE_CLASSES, 'volume', SYNAPSE_TABLE1, 300, 24,
                           'github.com/Beckschen/TransUNet', intensity='ct'),
    'acdc': DatasetSpec('acdc', 4, ('background', 'RV', 'Myo', 'LV'), 'volume', (1, 2, 3), 400, 12,
                        'MT-UNet and SSL4MIS on GitHub', intensity='mri'),
    'isic2017': DatasetSpec('isic2017', **_ISIC),
    'isic2018': DatasetSpec('isic2018', **_ISIC),
    # NOTE(impl): GlaS batch 8, as the other 2-D sets: Sec. 4.2 gives only epochs.
    'glas': DatasetSpec('glas', 2, ('background', 'gland'), 'image', (1,), 100, 8, 'warwick.ac.uk (GlaS)',
                        intensity='rgb'),
}
SPECS['demo'] = replace(SPECS['synapse'], name='demo', epochs=10, batch_size=4, where='python data.py --make-demo',
                        img_size=64, lr=3e-4)  # NOTE(impl): the demo's recipe is ours, for a 2-core CPU.
DATASETS = tuple(SPECS) + ('folder', 'nnunet')  # --data: the fixed sets, then the user's own

# ---- helpers: a reader per kind of file (arrays, image + mask, NIfTI), normalise; failures name the file


def _fail(path, what, e):
    return DataError(f'{path}: file not found' if isinstance(e, FileNotFoundError) else
                     f'{path}: unreadable or corrupt {what} ({type(e).__name__}: {str(e).split(". ")[0]})')


def _finite(a, path, what='values'):
    """a, if every value is a finite number: NaN or Inf in an input would be learnt or predicted as a number."""
    if np.asarray(a).dtype.kind in 'fc' and not np.isfinite(a).all():
        bad = np.asarray(a)[~np.isfinite(a)]
        raise DataError(f'{path}: {bad.size} of {np.size(a)} {what} are NaN or Inf (first: {bad.flat[0]}); '
                        'expected finite numbers')
    return a


def read_arrays(path, keys=None):
    """The named arrays of an .npz or .h5 file; keys=None: all, as a dict. Non-finite values are refused."""
    h5 = not str(path).endswith('.npz')
    try:
        with (h5py.File(path, 'r') if h5 else np.load(path)) as f:
            have = list(f.keys()) if h5 else f.files
            if keys is None or all(k in have for k in keys):
                arrays = {k: f[k][()] for k in (have if keys is None else keys)}
    except Exception as e:  # zip, pickle, HDF5, OS errors: a corrupt file
        raise _fail(path, 'h5' if h5 else 'npz', e) from None
    if keys is not None and not all(k in have for k in keys):
        raise DataError(f'{path}: expected {"datasets" if h5 else "arrays"} {list(keys)}, found {have}')
    for k, a in arrays.items():
        _finite(a, path, f"values of '{k}'")
    return arrays if keys is None else [arrays[k] for k in keys]


def _read_pil(path, palette=False):
    """An image's pixels as a viewer shows them: EXIF orientation applied; one page only."""
    try:
        with Image.open(path) as im:  # as stored, else RGB; palette: its indices (class ids)
            pages = getattr(im, 'n_frames', 1)
            if pages == 1 and im.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                im = ImageOps.exif_transpose(im)
            keep = im.mode in ('1', 'L', 'I', 'I;16', 'I;16B', 'F') or palette and im.mode == 'P'
            a = np.array(im if keep else im.convert('RGB'))
    except Exception as e:
        raise _fail(path, 'image', e) from None
    if pages > 1:
        raise DataError(f'{path}: {pages} pages (frames); expected one image per file')
    return a


def read_image(path):
    """An image -> uint8 RGB (H,W,3): 16-bit by full range (img_as_ubyte), float from [0, 1]; others refused."""
    a = _finite(_read_pil(path), path, 'pixels')
    if a.ndim == 2 and a.dtype not in (np.uint8, bool):
        hi = 1 if a.dtype.kind == 'f' else 65535
        if a.min() < 0 or a.max() > hi:
            raise DataError(f'{path}: {a.dtype} image with values in [{a.min()}, {a.max()}]; expected [0, {hi}]')
        a = np.rint(a * 255.0) if hi == 1 else a.astype(np.int64) >> 8  # (H,W) in 0..255
    return np.repeat(a.astype(np.uint8)[..., None] * (255 if a.dtype == bool else 1), 3, axis=2) if a.ndim == 2 else a


def _check_cascade(labels, name):
    """Refuses label_map='cascade' on 9-class files (liver would be background)."""
    if np.asarray(labels).max() <= 8:
        raise DataError(f'{name}: label_map=cascade expects 13 BTCV labels, but no label above 8 in the whole case; '
                        'use --label-map transunet')


def class_ids(a, path, num_classes=None, lut=None):
    """Stored labels (often float) -> int64 class ids; non-integer, negative and unknown ids are refused."""
    a = np.asarray(a)
    if a.dtype.kind not in 'biuf':
        raise DataError(f'{path}: {a.dtype} labels; expected integer class ids')
    if a.dtype.kind == 'f' and not np.array_equal(a, np.round(a)):  # NaN also fails here
        raise DataError(f'{path}: labels must be integers, found {a[a != np.round(a)].flat[0]}')
    if not a.size:
        raise DataError(f'{path}: empty label array')
    a = a.astype(np.int64)
    if lut is not None:
        if a.min() < 0 or a.max() >= len(lut):
            raise DataError(f'{path}: raw label {a.min() if a.min() < 0 else a.max()} outside the 13 BTCV labels '
                            'of label_map=cascade')
        if a.ndim == 3:
            _check_cascade(a, path)
        a = lut[a]
    if num_classes is None and a.min() < 0:
        raise DataError(f'{path}: label {a.min()}; expected class ids 0, 1, ...')
    if num_classes is not None and (a.min() < 0 or a.max() >= num_classes):
        hint = "; 13-label (CASCADE) files need label_map='cascade'" if num_classes == 9 and a.max() <= 13 else ''
        raise DataError(f'{path}: label {a.min() if a.min() < 0 else a.max()} outside the {num_classes} classes '
                        f'0..{num_classes - 1}{hint}')
    return a


def _arrays_pair(path, keys, num_classes, lut=None):
    """An .npz/.h5 slice or volume -> (image float32, label int64) of one 2-D or 3-D shape."""
    img, lab = (np.asarray(a) for a in read_arrays(path, keys))
    if img.shape != lab.shape or img.ndim not in (2, 3):
        raise DataError(f'{path}: image {img.shape} and label {lab.shape} must be equal 2-D or 3-D shapes')
    return img.astype(np.float32), class_ids(lab, path, num_classes, lut)


def _image_pair(img_path, mask_path, fg, num_classes, aspect):
    """An RGB image as stored, and its labels at the mask's size: binary (>= fg) or class ids."""
    if not fg and mask_path.suffix.lower() in ('.jpg', '.jpeg'):
        raise DataError(f'{mask_path}: a JPEG mask; lossy compression changes class ids at edges: save masks as PNG')
    image, mask = read_image(img_path), _read_pil(mask_path, palette=not fg)
    mask = mask * 255 if mask.dtype == bool else mask.max(axis=2) if mask.ndim == 3 else mask  # 1-bit, RGB
    (hi, wi), (hm, wm) = image.shape[:2], mask.shape
    if aspect and abs(hi * wm - hm * wi) > max(hi, wi, hm, wm):  # beyond a pixel of rounding
        raise DataError(f'{mask_path}: a {hm}x{wm} mask of the {hi}x{wi} image {img_path}: another aspect ratio')
    if fg:
        return image, (mask >= fg).astype(np.int64)
    return image, class_ids(np.where(mask == 255, 1, mask) if num_classes == 2 else mask, mask_path, num_classes)


def read_nifti(path, voxels=True):
    """A NIfTI file -> (its voxels squeezed to (X,Y,Z), or their shape if voxels=False; the nibabel image)."""
    try:
        img = nib.load(str(path))
        shape = tuple(img.shape[:3]) + tuple(d for d in img.shape[3:] if d != 1)  # (X,Y,Z,1) -> (X,Y,Z)
        shape += (1,) * (3 - len(shape))
        a = np.asanyarray(img.dataobj).reshape(shape) if voxels and len(shape) == 3 else shape
    except Exception as e:
        raise _fail(path, 'NIfTI', e) from None
    if len(shape) > 3:
        raise DataError(f'{path}: expected a 3-D volume, found shape {img.shape}')
    if voxels and a.dtype.kind not in 'biuf':  # RGB or complex voxels: no intensity a viewer shows as one
        raise DataError(f'{path}: {img.get_data_dtype()} voxels; expected one number per voxel')
    return _finite(a, path, 'voxels') if voxels else a, img


# NOTE(impl): slices on voxel axis 3, rows on 2, not reoriented, as the SAMed (Synapse) and SSL4MIS (ACDC) conversions.
def voxel_order(a):
    """(X,Y,Z) voxels <-> (Z,Y,X) slices; the transpose is its own inverse."""
    return np.ascontiguousarray(np.transpose(a, (2, 1, 0)))


def normalise(image, intensity):
    """A raw input -> the values training slices hold ('rgb', 'none': as given)."""
    if intensity not in INTENSITIES:
        raise DataError(f"intensity {intensity!r} (--intensity): expected one of {', '.join(INTENSITIES)}")
    if intensity in ('rgb', 'none'):
        return image
    a = np.asarray(image, dtype=np.float32)
    if intensity == 'ct':
        return (np.clip(a, *CT_WINDOW) - CT_WINDOW[0]) / np.float32(CT_WINDOW[1] - CT_WINDOW[0])
    if intensity == 'mri':  # NOTE(impl): per-volume min-max, as SSL4MIS wrote ACDC's h5 files.
        return (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
    return (a - a.mean()) / max(float(a.std()), 1e-8)  # NOTE(impl): 'zscore': nnU-Net's non-CT rule, per volume


def _nifti_pair(img_path, lab_path, intensity, num_classes):
    """A raw NIfTI volume and its labels -> (normalised image float32, label int64), (D,H,W) each."""
    (img, img_nib), (lab, lab_nib) = read_nifti(img_path), read_nifti(lab_path)
    if img.shape != lab.shape:
        raise DataError(f'{lab_path}: label shape {lab.shape} differs from its image {img_path} {img.shape}')
    if not np.allclose(img_nib.affine, lab_nib.affine, rtol=1e-4, atol=1e-4):  # as nnU-Net's integrity check
        raise DataError(f'{lab_path}: its affine differs from that of its image {img_path}: a viewer would not '
                        'overlay them as the voxels pair them')
    return normalise(voxel_order(img), intensity), class_ids(voxel_order(lab), lab_path, num_classes)


def _stack(reads, name):
    """A volume (D,H,W) from its slices' readers."""
    images, labels = zip(*(read() for read in reads))
    if len({a.shape for a in images}) != 1:
        raise DataError(f'volume {name}: its slices have different shapes {sorted({a.shape for a in images})}')
    return np.stack(images), np.stack(labels)


def _remove_if_owner(path, pid):
    if os.getpid() == pid:  # not in a forked loader worker
        shutil.rmtree(path, ignore_errors=True)


class DiskCache:
    """Arrays decoded once, by the first process to need them, into .npy files the workers share."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix='danie-cache-')
        weakref.finalize(self, _remove_if_owner, self.dir, os.getpid())

    def get(self, key, make):
        paths = [os.path.join(self.dir, f'{key}.{i}.npy') for i in (0, 1)]
        if not os.path.exists(paths[1]):  # written last: no reader sees half a pair
            for path, a in zip(paths, make()):  # racing workers write whole files
                np.save(f'{path}.{os.getpid()}.npy', a)
                os.replace(f'{path}.{os.getpid()}.npy', path)
        return [np.load(p, mmap_mode='r') for p in paths]


def _cached_slice(cache, key, read, k):
    """Slice k of a volume decoded once into the cache -> (image float32, label int64), (H,W) each."""
    img, lab = cache.get(key, lambda: [a.astype(np.uint8) if i else a for i, a in enumerate(read())])
    return np.array(img[k]), lab[k].astype(np.int64)


# ---- blocks: a dataset's files as Items: a build function per dataset names its folders and files, and returns its
# parts on disk ('train', 'val', 'test': each a function that lists its Items); _split makes the splits from them


@dataclass
class Item:
    """A training slice or image, or an evaluation case (volume or image), and how to read it."""
    id: str                   # the volume or image, as evaluation reports it
    image: np.ndarray = None  # once read: float32 (D,H,W) or RGB uint8 (H,W,3), as stored
    label: np.ndarray = None  # int64 (D,H,W) or (H,W), scored at this size; None: no labels
    read: object = None       # () -> (image, label): a partial (pickles into workers)
    case: str = None          # the patient: the unit of the validation split
    index: int = None         # a slice's position in its volume
    files: tuple = ()
    geometry: object = None   # a NIfTI input's nibabel image (affine, header)

    def load(self):
        """This item with its image and label read."""
        return self if self.read is None else replace(self, read=None, **dict(zip(('image', 'label'), self.read())))


class Cases(Sequence):
    """Evaluation cases, each read when indexed (volumes are large)."""

    def __init__(self, items):
        self.items, self.ids = list(items), [it.id for it in items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return Cases(self.items[i]) if isinstance(i, slice) else self.items[i].load()


def _found(root, spec, *marks):
    """The dataset's folder: ROOT, or the first subfolder of ROOT (downloads unpack into one) holding one of marks."""
    root = Path(root)
    how = f'write it with `python data.py --make-demo {root}`' if spec.name == 'demo' else f'see {spec.where}'
    if not root.is_dir():
        raise DataError(f"dataset root '{root}' not found: expected {_layout(spec.name)}; {how}")
    for folder in [root] + sorted(d for d in root.iterdir() if d.is_dir()):
        if any((folder / m).exists() for m in marks):
            return folder
    what = 'neither ACDC layout' if spec.name == 'acdc' else f'no {spec.name} files'
    raise DataError(f'{root}: {what} found; expected {_layout(spec.name)}; {how}')


def _folder(spec, path):
    """Refuses a missing folder of the dataset, naming it."""
    if not path.is_dir():
        raise DataError(f'{path}: folder not found; expected {_layout(spec.name)}; {spec.name}: {spec.where}')


def _stem(path, suffixes):
    """A file name less the first of suffixes it ends with (in any case); '' if none."""
    return next((path.name[:-len(x)] for x in suffixes if path.name.lower().endswith(x)), '')


def _natural(path):  # 'train_2' before 'train_10'
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', path.name)]


def _files(spec, folder, suffixes, listing=None, keep=bool):
    """[(stem, file)]: the files a listing names, in its order; without one, those whose stem (the name less one of
    suffixes) keep(stem) accepts, in natural order."""
    _folder(spec, folder)
    if listing is None or not listing.is_file():
        files = sorted((p for p in folder.iterdir() if keep(_stem(p, suffixes))), key=_natural)
        if not files:
            raise DataError(f'no samples found: {folder} has no *{"|*".join(suffixes)} files of its layout '
                            f'(it holds {", ".join(sorted(os.listdir(folder))[:3]) or "nothing"})')
        return [(_stem(p, suffixes), p) for p in files]
    files = []
    for n in listing.read_text().split():  # a name with its suffix or without
        found = [p for p in [folder / n] + [folder / (n + x) for x in suffixes] if p.is_file() and _stem(p, suffixes)]
        if not found:
            raise DataError(f'list {listing} names {n}, but {folder / (n + suffixes[0])} does not exist')
        files.append((_stem(found[0], suffixes), found[0]))
    return files


def _numbered(text, *prefixes):
    """Whether text is one of prefixes followed by a plain number ('ISIC_0000000' for 'ISIC_', 'patient001' for
    'patient'; not 'train_3_anno', '+3' or '1_2')."""
    return any(text.startswith(p) and text[len(p):].isascii() and text[len(p):].isdigit() for p in prefixes)


def _number(text):
    """A slice number as file names write it ('012'); anything else is a name the layout does not use."""
    if not _numbered(text, ''):
        raise ValueError(f'not a slice number: {text!r}')
    return int(text)


def _arrays(spec, read, folder, suffix, listing, slice_of=None):
    """An Item per .npz/.h5 file: slice_of(stem) -> (volume, case, slice number) for a slice; else the file is a
    volume (and a case) of its own."""
    items = []
    for stem, f in _files(spec, folder, (suffix,), listing):
        try:
            volume, case, k = slice_of(stem) if slice_of else (stem, stem, None)
        except ValueError:  # the name does not split as the layout's names do
            raise DataError(f'{f}: a name that {spec.name} does not use; expected {_layout(spec.name)}') from None
        items.append(Item(volume, read=partial(read, f), case=case, index=k, files=(f,)))
    return items


def _pairs(spec, read, images, suffixes, masks, endings, listing=None, keep=bool):
    """An Item per image and its mask: the first of masks/<the image's stem><ending> that exists."""
    for folder in (images, masks):
        _folder(spec, folder)
    items = []
    for stem, f in _files(spec, images, suffixes, listing, keep):
        mask = next((masks / (stem + x) for x in endings if (masks / (stem + x)).is_file()), None)
        if mask is None:
            raise DataError(f'{f}: no mask {masks / (stem + endings[0])} (image without mask)')
        items.append(Item(stem, read=partial(read, f, mask), case=stem, files=(f, mask)))
    return items


def isic2018_split(names):
    """The paper's ISIC 2018 split (Azad et al.): the first 1815 / next 259 / last 520 of the SORTED names."""
    # NOTE(impl): sorted (Azad et al.: an unsorted glob); other counts split in the same proportions.
    names, total = sorted(names), sum(ISIC2018_SPLIT)
    if len(names) != total:
        warnings.warn(f'ISIC 2018: {len(names)} images, not {total}; split as {ISIC2018_SPLIT}')
    n_train, n_val = (round(len(names) * n / total) for n in ISIC2018_SPLIT[:2])
    return names[:n_train], names[n_train:n_train + n_val], names[n_train + n_val:]


def _hold_out(items, n, what):
    """(held, kept): n of the items' cases (a count, or a fraction rounded half up), drawn by a permutation of the
    sorted case ids with SPLIT_SEED: the same cases for any --seed."""
    cases = sorted({it.case for it in items})
    k = max(1, int(n * len(cases) + 0.5)) if 0 < n < 1 else int(n)
    if k >= len(cases):
        raise DataError(f'{what} holds out {k} of the {len(cases)} training cases; none would be left')
    held = {cases[i] for i in np.random.default_rng(SPLIT_SEED).permutation(len(cases))[:k]}
    return [it for it in items if it.case in held], [it for it in items if it.case not in held]


def _user_splits(root, parts):
    """The user's own data: val and test lists pick from the training files; without a test split, TEST_FRACTION
    of the training cases is held out as one."""
    def rest():  # the training files less those listed for val or test
        taken = {it.id for k in ('val', 'test') if k in parts for it in parts[k]()}
        return [it for it in parts['train']() if it.id not in taken]

    def carved(i):  # 0: the test cases, 1: the rest
        return _hold_out(rest(), TEST_FRACTION, f'{root}: the test split')[i]
    if 'test' in parts:
        return parts | {'train': rest}
    return parts | {'train': partial(carved, 1), 'test': partial(carved, 0)}


def build_synapse(root, spec, lut):
    """TransUNet's Synapse files (the demo's too): slices ROOT/train_npz/<case>_slice<k>.npz, volumes
    ROOT/test_vol_h5/<case>.npy.h5, each in the order of ROOT/lists_Synapse/{train,test_vol}.txt, else by name."""
    root = _found(root, spec, 'train_npz', 'test_vol_h5')
    read = partial(_arrays_pair, keys=('image', 'label'), num_classes=spec.num_classes, lut=lut)
    lists = root / 'lists_Synapse'

    def slice_of(stem):  # case0005_slice012: slice 12 of case0005
        case, k = stem.rsplit('_slice', 1)
        if not case:
            raise ValueError(stem)
        return case, case, _number(k)
    return {'train': partial(_arrays, spec, read, root / 'train_npz', '.npz', lists / 'train.txt', slice_of),
            'test': partial(_arrays, spec, read, root / 'test_vol_h5', '.npy.h5', lists / 'test_vol.txt')}


def build_acdc(root, spec, lut):
    """ACDC as MT-UNet wrote it (slices ROOT/{train,valid}/case_<p>_slice{ED,ES}_<k>.npz, volumes ROOT/test/*.npz,
    in the order of ROOT/lists_ACDC/{train,valid,test}.txt) or as SSL4MIS did (slices
    ROOT/data/slices/<patient>_<frame>_slice_<k>.h5 in ROOT/train_slices.list, volumes ROOT/data/<patient>_<frame>.h5
    in ROOT/val.list, ROOT/test.list)."""
    # NOTE(impl): validation cases are held out by patient (ED with ES).
    root = _found(root, spec, 'data', 'train', 'test')
    if (root / 'data').is_dir():  # SSL4MIS
        read = partial(_arrays_pair, keys=('image', 'label'), num_classes=spec.num_classes)

        def ssl4mis_slice(stem):  # patient001_frame01_slice_3: slice 3 of patient001_frame01, patient patient001
            volume, k = stem.rsplit('_slice_', 1)
            patient, frame = volume.split('_')
            if not (_numbered(patient, 'patient') and _numbered(frame, 'frame')):
                raise ValueError(stem)
            return volume, patient, _number(k)
        lists = {k: root / f'{k}.list' for k in ('val', 'test') if (root / f'{k}.list').is_file()}
        return {'train': partial(_arrays, spec, read, root / 'data/slices', '.h5', root / 'train_slices.list',
                                 ssl4mis_slice),
                **{k: partial(_arrays, spec, read, root / 'data', '.h5', f) for k, f in lists.items()}}
    read, lists = partial(_arrays_pair, keys=('img', 'label'), num_classes=spec.num_classes), root / 'lists_ACDC'

    def mtunet_slice(stem):  # case_001_sliceED_3: slice 3 of case_001_volume_ED, patient case_001
        case, phase_k = stem.rsplit('_slice', 1)
        phase, k = phase_k.split('_')
        if phase not in ('ED', 'ES') or not _numbered(case, 'case_'):
            raise ValueError(stem)
        return f'{case}_volume_{phase}', case, _number(k)
    return {'train': partial(_arrays, spec, read, root / 'train', '.npz', lists / 'train.txt', mtunet_slice),
            'val': partial(_arrays, spec, read, root / 'valid', '.npz', lists / 'valid.txt', mtunet_slice),
            'test': partial(_arrays, spec, read, root / 'test', '.npz', lists / 'test.txt')}


def build_isic2017(root, spec, lut):
    """ISIC 2017's official folders ROOT/ISIC-2017_{Training,Validation,Test_v2}_Data/ISIC_<n>.jpg with masks
    ROOT/ISIC-2017_{...}_Part1_GroundTruth/ISIC_<n>_segmentation.png (0/255); *_superpixels.png are not images."""
    root = _found(root, spec, 'ISIC-2017_Training_Data', 'ISIC-2017_Test_v2_Data')
    read = partial(_image_pair, fg=ISIC_FG, num_classes=spec.num_classes, aspect=False)  # 256x256 copies

    def part(k):
        return _pairs(spec, read, root / f'ISIC-2017_{k}_Data', ('.jpg', '.jpeg', '.png'),
                      root / f'ISIC-2017_{k}_Part1_GroundTruth', ('_segmentation.png',),
                      keep=lambda stem: _numbered(stem, 'ISIC_'))
    return {'train': partial(part, 'Training'), 'val': partial(part, 'Validation'), 'test': partial(part, 'Test_v2')}


def build_isic2018(root, spec, lut):
    """ISIC 2018 Task 1's training folders, ROOT/ISIC2018_Task1-2_Training_Input/ISIC_<n>.jpg with masks
    ROOT/ISIC2018_Task1_Training_GroundTruth/ISIC_<n>_segmentation.png, split as the paper (isic2018_split)."""
    root = _found(root, spec, 'ISIC2018_Task1-2_Training_Input')
    read = partial(_image_pair, fg=ISIC_FG, num_classes=spec.num_classes, aspect=False)

    def part(k):  # 0 train, 1 val, 2 test
        items = _pairs(spec, read, root / 'ISIC2018_Task1-2_Training_Input', ('.jpg', '.jpeg'),
                       root / 'ISIC2018_Task1_Training_GroundTruth', ('_segmentation.png',),
                       keep=lambda stem: _numbered(stem, 'ISIC_'))
        ids = set(isic2018_split([it.id for it in items])[k])
        return [it for it in items if it.id in ids]
    return {'train': partial(part, 0), 'val': partial(part, 1), 'test': partial(part, 2)}


def build_glas(root, spec, lut):
    """GlaS (Warwick QU), one folder: ROOT/train_<n>.bmp; the test split ROOT/testA_<n>.bmp then testB_<n>.bmp;
    masks <name>_anno.bmp beside them, of instance ids (foreground: id > 0)."""
    # NOTE(impl): validation images are held out one by one (GlaS names no patients).
    root = _found(root, spec, 'train_1.bmp', 'testA_1.bmp')
    read = partial(_image_pair, fg=1, num_classes=spec.num_classes, aspect=True)
    part = partial(_pairs, spec, read, root, ('.bmp',), root, ('_anno.bmp',))
    return {'train': partial(part, keep=lambda stem: _numbered(stem, 'train_')),
            'test': partial(part, keep=lambda stem: _numbered(stem, 'testA_', 'testB_'))}


def build_folder(root, spec, lut):
    """ROOT/images/<stem>.* with ROOT/masks/<stem>.* of class ids, named in ROOT/classes.txt (or --num-classes);
    lists ROOT/train.txt, val.txt, test.txt (optional) of stems pick each split's images."""
    root = _found(root, spec, 'images')
    read = partial(_image_pair, fg=0, num_classes=spec.num_classes, aspect=True)
    endings = IMAGE_SUFFIXES + tuple(map(str.upper, IMAGE_SUFFIXES))
    part = partial(_pairs, spec, read, root / 'images', IMAGE_SUFFIXES, root / 'masks', endings)
    lists = {k: root / f'{k}.txt' for k in ('train', 'val', 'test')}
    return _user_splits(root, {k: partial(part, f) for k, f in lists.items() if k == 'train' or f.is_file()})


def _nnunet(root):
    """An nnU-Net v2 dataset.json -> (class names by id, channel names, file_ending)."""
    path = Path(root) / 'dataset.json'
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f'{path}: not found; expected {_layout("nnunet")}' if isinstance(e, FileNotFoundError) else
                        f'{path}: not valid JSON ({e})') from None
    if missing := [k for k in ('channel_names', 'labels', 'file_ending') if k not in meta]:
        raise DataError(f'{path}: missing key(s) {missing}')
    ending, labels, channels = meta['file_ending'], meta['labels'], meta['channel_names']
    if ending not in NIFTI_SUFFIXES + ('.png',):
        raise DataError(f'{path}: file_ending {ending!r} is not supported; expected .nii.gz, .nii or .png')
    if not isinstance(labels, dict) or sorted(labels.values()) != list(range(max(2, len(labels)))):
        raise DataError(f'{path}: label ids must be 0..K-1, background 0, K >= 2 (no region-based labels): {labels}')
    channels = [channels[k] for k in sorted(channels, key=int)]
    if len(channels) > 1:  # NOTE(impl): DANIE takes one channel (or RGB): channel 0.
        warnings.warn(f'{path}: {len(channels)} channels {channels}; DANIE reads channel 0 ({channels[0]}) only')
    return tuple(sorted(labels, key=labels.get)), channels, ending


def build_nnunet(root, spec, lut):
    """nnU-Net v2's raw layout: ROOT/dataset.json, ROOT/imagesTr/<case>_0000<ending> (channel 0) with
    ROOT/labelsTr/<case><ending>; ROOT/imagesTs/ with labelsTs/ (optional): the test split."""
    ending = _nnunet(root)[2]
    root = _found(root, spec, 'imagesTr', 'imagesTs')
    read = (partial(_nifti_pair, intensity=spec.intensity, num_classes=spec.num_classes) if ending in NIFTI_SUFFIXES
            else partial(_image_pair, fg=0, num_classes=spec.num_classes, aspect=True))

    def part(k):  # 'Tr' or 'Ts'
        return _pairs(spec, read, root / f'images{k}', ('_0000' + ending,), root / f'labels{k}', (ending,))
    test = (root / 'imagesTs').is_dir() and (root / 'labelsTs').is_dir()
    return _user_splits(root, {'train': partial(part, 'Tr')} | ({'test': partial(part, 'Ts')} if test else {}))


def _layout(name):
    """The files of dataset `name` as its build function's docstring names them: error messages quote it."""
    return ' '.join(BUILDS[name].__doc__.split()).rstrip('.')


BUILDS = {'synapse': build_synapse, 'demo': build_synapse, 'acdc': build_acdc, 'isic2017': build_isic2017,
          'isic2018': build_isic2018, 'glas': build_glas, 'folder': build_folder, 'nnunet': build_nnunet}


def _volumes(items):
    """A split's Items as evaluation cases: slices stacked into volumes."""
    vols = {}
    for it in sorted(items, key=lambda it: (it.id, it.index or 0)):
        vols.setdefault(it.id, []).append(it)
    stacked = [Item(v, read=partial(_stack, [s.read for s in ss], v), case=ss[0].case,
                    files=sum((s.files for s in ss), ())) for v, ss in vols.items()]
    return stacked if any(it.index is not None for it in items) else items


def _split(spec, root, split, val_cases, label_map):
    """A split's Items as the build function finds them (None: not on disk): 'test' as stored; 'val' as stored, or
    val_cases training cases held out (default: VAL_FRACTION where none are stored); 'train' the training cases less
    those held out."""
    if label_map not in LABEL_MAPS or label_map == 'cascade' and spec.name != 'synapse':
        raise DataError(f"--label-map {label_map}: expected {' or '.join(LABEL_MAPS)}; label_map='cascade' is for "
                        "Synapse's 13-label files")
    parts = BUILDS[spec.name](root, spec, CASCADE_LUT if label_map == 'cascade' else None)
    if split == 'test':
        return parts['test']() if 'test' in parts else None
    if split == 'val' and val_cases is None and 'val' in parts:
        try:
            return parts['val']()
        except DataError as e:
            raise DataError(f'{e}; or hold out training cases instead: val_cases=N (--val-cases N)') from None
    # NOTE(impl): an explicit val_cases holds cases out even beside an official val split.
    n = val_cases if val_cases is not None else 0 if 'val' in parts else VAL_FRACTION
    held, kept = _hold_out(parts['train'](), n, f'val_cases={n}')
    return held if split == 'val' else kept

# ---- blocks: resize and augmentation (for training and evaluation); the training set


def _zoom(a, size, order):
    """A slice (H,W) to (size,size), scipy's spline: order 3 images, 0 labels, as TransUNet."""
    return a if a.shape == (size, size) else ndimage.zoom(a, (size / a.shape[0], size / a.shape[1]), order=order)


def _pil_resize(a, size, resample):
    """An RGB image (H,W,3) or label map (H,W) of bytes to (size,size), on PIL's pixel-centre grid."""
    if a.shape[:2] == (size, size):
        return a
    # NOTE(impl): PIL bicubic with reducing_gap=3 (box pre-reduction): fast on megapixel ISIC images.
    return np.array(Image.fromarray(a).resize((size, size), resample, reducing_gap=3.0))


def _augment(img, lab, rng):
    """TransUNet's RandomGenerator: p=0.5 rot90 (k in 0..3) + flip; else p=0.5 a rotation in [-20, 20] deg."""
    if rng.random() < 0.5:
        k, axis = int(rng.integers(4)), int(rng.integers(2))
        img, lab = np.flip(np.rot90(img, k), axis), np.flip(np.rot90(lab, k), axis)
    elif rng.random() < 0.5:
        # NOTE(impl): angle uniform in [-20, 20], the image bilinear (TransUNet: integer angle, nearest for both).
        angle = float(rng.uniform(-ROT_DEGREES, ROT_DEGREES))  # PIL: one centre for 'F', 'L', RGB; fills with 0
        img, lab = (np.array(Image.fromarray(np.ascontiguousarray(a)).rotate(angle, resample=r))
                    for a, r in ((img, Image.BILINEAR), (lab, Image.NEAREST)))
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)


def _to_input(x):
    """A resized slice (S,S) float or RGB (S,S,3) uint8 -> normalised float32 tensor (3,S,S)."""
    if x.ndim == 2:
        x = x[None].astype(np.float32, copy=False)  # (1,S,S): a gray slice feeds all 3 inputs
    else:
        x = x.transpose(2, 0, 1).astype(np.float32) / np.float32(255)  # (H,W,3) -> (3,S,S) in [0,1]
    m, s = (np.asarray(v, np.float32)[:, None, None] for v in (MEAN, STD))
    return torch.from_numpy((x - m) / s)  # broadcast to (3,S,S)


def prepare_input(images, img_size):
    """Slices (N,H,W) float or RGB images (N,H,W,3) uint8 -> the model's input (N,3,S,S), as training's."""
    a = np.asarray(images)
    if a.ndim == 3 and a.dtype != np.uint8:
        return torch.stack([_to_input(_zoom(x.astype(np.float32), img_size, 3)) for x in a])
    if a.ndim == 4 and a.shape[-1] == 3 and a.dtype == np.uint8:
        return torch.stack([_to_input(_pil_resize(x, img_size, Image.BICUBIC)) for x in a])
    raise ValueError(f'prepare_input: expected float slices (N,H,W) or uint8 RGB (N,H,W,3), got {a.dtype} {a.shape}')


def _nearest_index(n_in, n_out, grid):
    """Each output pixel's source index in a nearest resize along an axis, in float64 as scipy's."""
    if grid:  # pixel-centre grid (PIL's): centres map onto centres
        c = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    else:  # corner-aligned grid (scipy's zoom): first and last pixels align
        c = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 1.0)
    return np.clip(np.floor(c + 0.5), 0, n_in - 1).astype(np.int64)


def restore_size(labels, out_hw, kind):
    """Label maps (N,S,S), an integer tensor -> (N,H,W), nearest, on prepare_input's grid: its inverse."""
    if kind not in ('volume', 'image'):
        raise ValueError(f"restore_size: kind must be 'volume' or 'image', got {kind!r}")
    if tuple(labels.shape[-2:]) == tuple(out_hw):
        return labels
    # NOTE(impl): the argmax labels are resized back, not the logits (TransUNet's test_single_volume).
    iy, ix = (torch.from_numpy(_nearest_index(n, m, kind == 'image')).to(labels.device)
              for n, m in zip(labels.shape[-2:], out_hw))
    return labels.index_select(-2, iy).index_select(-1, ix)  # (N,S,S) -> (N,H,S) -> (N,H,W)


class TrainSet(Dataset):
    """Training samples -> (image float32 (3,S,S) normalised, label int64 (S,S)), TransUNet-augmented."""

    def __init__(self, samples, spec, img_size, *, seed=0, augment=True, cache=None):
        self.samples, self.spec, self.img_size, self.seed, self.augment = samples, spec, img_size, seed, augment
        self.cache, self.cases = cache, sorted({s.case for s in samples})

    def __len__(self):
        return len(self.samples)

    def _resized(self, i):
        img, lab = self.samples[i].read()
        size = self.img_size
        return [_pil_resize(img, size, Image.BICUBIC), _pil_resize(lab.astype(np.uint8), size, Image.NEAREST)]

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)  # a plain index is epoch 0
        # NOTE(impl): a generator per (seed, epoch, index): the same for any workers, exact on resume.
        rng = np.random.default_rng([self.seed, int(epoch), int(i)])
        if self.spec.kind == 'image':
            # NOTE(impl): RGB pairs are resized once (cached), then augmented at S (TransUNet: at native size).
            pair = self.cache.get(f'rgb{i}', partial(self._resized, i)) if self.cache else self._resized(i)
            img, lab = _augment(*pair, rng) if self.augment else pair
        else:
            img, lab = self.samples[i].read()
            lab = lab.astype(np.uint8)  # faster in PIL and zoom
            if self.augment:  # TransUNet: augment at native size, then resize
                img, lab = _augment(img, lab, rng)
            img, lab = _zoom(img.astype(np.float32), self.img_size, 3), _zoom(lab, self.img_size, 0)
        return _to_input(np.asarray(img)), torch.from_numpy(lab.astype(np.int64))


class EpochSampler(Sampler):
    """This rank's every world-th index of a (seed, epoch) shuffle, from sample `skip` on, as (epoch, index) keys:
    the ranks' k-th batches form one global batch for any number of GPUs."""

    def __init__(self, dataset, seed, rank, world):
        self.order, self.epoch, self.skip = DistributedSampler(dataset, world, rank, seed=seed, drop_last=True), 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip
        self.order.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in itertools.islice(iter(self.order), self.skip, None))

    def __len__(self):
        return len(self.order) - self.skip

# ---- top level: specs, training set, evaluation cases, loader; the demo set and the CLI


def default_root(name):
    return os.path.join('data', name)


def _class_names(path):
    """classes.txt: a class name per line, background on line 1, at least one class besides."""
    try:
        names = tuple(n.strip() for n in path.read_text().splitlines() if n.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f'{path}: unreadable ({getattr(e, "strerror", None) or e})') from None
    if len(names) < 2:
        raise DataError(f'{path}: {len(names)} class name(s) {list(names)}; expected background on line 1, then a '
                        'line per class')
    return names


def get_spec(name, root=None, num_classes=None, given='--num-classes'):
    """The DatasetSpec of --data NAME: fixed, or read from ROOT; a num_classes that differs from it is refused."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}' (--data): expected one of {', '.join(DATASETS)}")
    root = Path(root or default_root(name))
    channels, ending, file = ['rgb'], '.png', root / 'classes.txt'
    if name in SPECS:
        names = SPECS[name].class_names
    elif name == 'nnunet':
        names, channels, ending = _nnunet(root)
    elif not root.is_dir():
        raise DataError(f"dataset root '{root}' not found: expected {_layout('folder')}")
    elif file.is_file():
        names = _class_names(file)
    elif num_classes:
        names = ('background',) + tuple(f'class{i}' for i in range(1, num_classes))
    else:
        raise DataError(f'{root}: no classes.txt (class i on line i) and no --num-classes')
    source = name if name in SPECS else root / 'dataset.json' if name == 'nnunet' else file if file.is_file() else given
    if num_classes not in (None, len(names)):
        raise DataError(f'{source} has {len(names)} classes, but {given} gives {num_classes}')
    if len(names) > MAX_CLASSES:
        raise DataError(f'{source}: {len(names)} classes; class ids are written as 8-bit images and volumes: at '
                        f'most {MAX_CLASSES}')
    if name in SPECS:
        return SPECS[name]
    # NOTE(impl): user images get ISIC's recipe, volumes Synapse's and channel 0's intensity rule.
    volume = ending in NIFTI_SUFFIXES
    intensity = 'rgb' if not volume else 'ct' if str(channels[0]).lower() == 'ct' else 'zscore'
    return replace(SPECS['synapse' if volume else 'isic2017'], name=name, num_classes=len(names), class_names=names,
                   report_order=tuple(range(1, len(names))), where=str(root), intensity=intensity, figure='mean')


def spec_from_dict(d):
    """The DatasetSpec a checkpoint recorded as a dict (asdict; tuples restored, unknown keys refused)."""
    names = {f.name for f in fields(DatasetSpec)}
    if not isinstance(d, dict) or set(d) - names - {'layout'}:
        raise DataError(f'dataset spec: expected a dict with keys {sorted(names)}, got {d!r:.200}')
    # 'layout', a text of the files that some checkpoints record, is the build function's docstring: dropped
    return DatasetSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != 'layout'})


def train_set(name, root, img_size, *, val_cases=None, seed=0, augment=True, label_map='transunet',
              num_classes=None, cache=True):
    """The training samples, less the cases held out for validation (val_cases=0: none); seed: augmentation's."""
    spec = get_spec(name, root, num_classes)
    items = _split(spec, root, 'train', val_cases, label_map)
    if label_map == 'cascade':  # a whole training case's raw labels tell the maps apart
        first = [f for it in items if it.case == items[0].case for f in it.files]
        maxima = [read_arrays(f, ('label',))[0].max() for f in first]
        _check_cascade(maxima, f'training case {items[0].case} ({first[0].parent})')
    disk = DiskCache() if spec.kind == 'image' and cache and len(items) * img_size ** 2 * 4 < CACHE_MAX_BYTES else None
    if spec.kind == 'volume' and items[0].index is None:  # NIfTI volumes train slice by slice
        # NOTE(impl): decoded once into memory-mapped .npy files: a .nii.gz per slice would decompress it all.
        disk = DiskCache()
        items = [replace(it, read=partial(_cached_slice, disk, it.id, it.read, k), index=k) for it in items
                 for k in range(read_nifti(it.files[0], voxels=False)[0][2])]
    ds = TrainSet(items, spec, img_size, seed=seed, augment=augment, cache=disk)
    ds.samples[0].read()  # fail here, not in a loader worker
    return ds


def eval_cases(name, root, split, *, val_cases=None, label_map='transunet', num_classes=None):
    """Whole cases as stored, of split 'val' (stored, or held out as train_set holds them) or 'test'."""
    spec = get_spec(name, root, num_classes)
    items = _split(spec, root, split, val_cases, label_map)
    if items is None:
        raise DataError(f'{root}: {spec.name} has no {split} split here; expected {_layout(spec.name)}')
    return Cases(_volumes(items))


def make_loader(dataset, batch_size, *, shuffle, workers, sampler=None, drop_last=False):
    """A DataLoader that keeps the GPU fed: pinned memory on CUDA, persistent workers."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


def output_dir(path, flag, inputs=(), roots=None):
    """The output folder of `flag`, created and checked before any work: writable, not an input folder, and
    outside the data folders it reads, roots {folder: the flag that names it}."""
    path = Path(path)
    if any(path.resolve() == Path(p).resolve() for p in inputs):
        raise DataError(f'{path} ({flag}) is also the input folder: outputs would be read back as inputs')
    for root, named in (roots or {}).items():
        if path.resolve().is_relative_to(Path(root).resolve()):
            raise DataError(f'{path} ({flag}) lies inside {root} ({named}), the data it reads: outputs would mix '
                            'with its files; choose a folder outside it')
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise DataError(f'{path} ({flag}): cannot write there ({e.strerror or e})') from None
    return path


LOCK = 'train.lock'  # in a run's --out: held (flock) by the training that writes there
_held = {}  # lock file -> its open file, while this process holds it


def lock_output(folder, hold=True):
    """Hold FOLDER/train.lock (flock) while this run writes there: a second run into the folder is refused. The OS
    frees the lock when the process ends, killed or not. hold=False: only check that no other run holds it."""
    path = Path(folder) / LOCK
    while str(path.resolve()) not in _held and (hold or path.is_file()):
        try:
            f = open(path, 'a+' if hold else 'r')
        except FileNotFoundError:  # removed by a run that just ended
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB if hold else fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            who = f.read().strip() or 'another process'
            f.close()
            raise DataError(f'{folder} is in use by a running training ({who}); let it finish, or choose another '
                             '--out') from None
        if not hold:
            return f.close()
        if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:  # not a file removed meanwhile
            f.truncate(0)
            f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
            f.flush()
            _held[str(path.resolve())] = f
            return
        f.close()


def unlock_outputs():
    """Release the locks this process holds; their files go first, while still held."""
    while _held:
        path, f = _held.popitem()
        Path(path).unlink(missing_ok=True)
        f.close()


def write_atomic(path, content):
    """Write bytes or text to path whole or not at all: into PATH.<pid>.tmp, then a rename (two writers: one whole
    file). A failed or interrupted write removes the .tmp and leaves the file as it was; the OSError names path."""
    path = Path(path)
    tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as f:
            f.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    return path


DEMO_SIZE, DEMO_SLICES = 96, 12            # slice side, slices per volume
DEMO_TRAIN_CASES, DEMO_TEST_CASES = 15, 3  # VAL_FRACTION holds 2 of the 15 training volumes out
DEMO_NOISE, DEMO_JITTER = 0.03, 0.04       # noise std (CT in [0,1]); shifts of anatomy and organs
DEMO_MARK = 'DANIE_DEMO'                   # marks make_demo's folders
# tissue -> (centre y, x, radius y, x; z centre, z half-extent; intensity, texture), fractions of the volume
DEMO_TISSUES = {  # 1-8: SYNAPSE_CLASSES; 9 body, 10 spine: anatomy in the image, background in the labels
    9: (0.50, 0.50, 0.42, 0.46, 0.5, 9.0, 0.30, 0.03), 10: (0.82, 0.50, 0.065, 0.07, 0.5, 9.0, 1.15, 0.10),
    5: (0.42, 0.30, 0.20, 0.17, 0.45, 0.70, 0.63, 0.03), 4: (0.55, 0.43, 0.085, 0.075, 0.35, 0.35, 0.10, 0.01),
    6: (0.37, 0.64, 0.13, 0.13, 0.55, 0.45, 0.41, 0.07), 1: (0.50, 0.82, 0.11, 0.08, 0.55, 0.40, 0.74, 0.02),
    2: (0.70, 0.27, 0.09, 0.07, 0.45, 0.40, 0.85, 0.02), 3: (0.70, 0.73, 0.09, 0.07, 0.50, 0.40, 0.96, 0.02),
    8: (0.52, 0.55, 0.055, 0.15, 0.45, 0.35, 0.52, 0.05), 7: (0.66, 0.50, 0.065, 0.065, 0.5, 9.0, 1.08, 0.01),
}


def _demo_volume(rng):
    """A synthetic abdominal volume: image float32 (D,S,S) about in [0,1], label uint8 (D,S,S)."""
    D, S = DEMO_SLICES, DEMO_SIZE
    z, y, x = np.meshgrid(np.linspace(0, 1, D), *[np.linspace(0, 1, S, dtype=np.float32)] * 2, indexing='ij')
    texture = ndimage.gaussian_filter(rng.standard_normal((D, S, S)).astype(np.float32), (0.7, 1.2, 1.2))
    image, tissue = np.zeros((D, S, S), np.float32), np.zeros((D, S, S), np.uint8)
    shift = rng.uniform(-DEMO_JITTER, DEMO_JITTER, 2)  # the patient's; each organ moves a little more
    for t, (cy, cx, ry, rx, zc, zh, level, amp) in DEMO_TISSUES.items():  # later tissues lie on top
        cy, cx = shift + (rng.uniform(-DEMO_JITTER, DEMO_JITTER, 2) if t < 9 else 0) + (cy, cx)
        ry, rx, zc = ry * rng.uniform(0.85, 1.15), rx * rng.uniform(0.85, 1.15), zc + rng.uniform(-0.08, 0.08)
        f = 1 - ((z - zc) / zh) ** 2  # an ellipsoid
        inside = (f >= 0.1) & (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < f)
        tissue[inside] = t
        image[inside] = level + (rng.uniform(-0.02, 0.02) if t < 9 else 0) + amp * texture[inside] / texture.std()
    image = ndimage.gaussian_filter(image, (0, 0.6, 0.6)) * (1 + 0.05 * (y - 0.5))  # partial volume, bias field
    image += DEMO_NOISE * rng.standard_normal((D, S, S))
    return image.astype(np.float32), np.where(tissue < 9, tissue, 0).astype(np.uint8)


def make_demo(root, seed=0, reuse=False):
    """Write the synthetic set (Synapse's layout) into a new, empty or demo folder; reuse: keep a finished one."""
    root = Path(root)
    if root.is_dir() and any(root.iterdir()) and not (root / DEMO_MARK).is_file():
        raise DataError(f'{root} holds files ({", ".join(sorted(os.listdir(root))[:3])}, ...) but no demo set: '
                        'demo sets are written only into new or empty folders')
    if reuse and (root / 'lists_Synapse/test_vol.txt').is_file():  # written last
        return root
    for d in ('train_npz', 'test_vol_h5', 'lists_Synapse'):
        output_dir(root / d, 'the demo folder')
    (root / DEMO_MARK).touch()
    lists = {'train': [], 'test_vol': []}
    for c in range(DEMO_TRAIN_CASES + DEMO_TEST_CASES):
        name, (image, label) = f'case{c + 1:04d}', _demo_volume(np.random.default_rng([seed, c]))
        label = label.astype(np.float32)  # float labels, as TransUNet's files
        if c < DEMO_TRAIN_CASES:
            for k in range(DEMO_SLICES):
                lists['train'].append(f'{name}_slice{k:03d}')
                np.savez(blob := io.BytesIO(), image=image[k], label=label[k])
                write_atomic(root / 'train_npz' / f"{lists['train'][-1]}.npz", blob.getbuffer())
        else:
            with h5py.File(blob := io.BytesIO(), 'w') as f:
                f['image'], f['label'] = image, label
            write_atomic(root / f'test_vol_h5/{name}.npy.h5', blob.getbuffer())
            lists['test_vol'].append(name)
    for k, names in lists.items():
        write_atomic(root / f'lists_Synapse/{k}.txt', '\n'.join(names) + '\n')
    return root


def main(argv=None):
    p = argparse.ArgumentParser(description='DANIE datasets (Sec. 4.1): write the synthetic demo set.')
    p.add_argument('--make-demo', metavar='DIR', required=True, help="where to write it (Synapse's layout)")
    try:
        print(f'wrote the demo set to {make_demo(p.parse_args(argv).make_demo)}')
    except DataError as e:
        sys.exit(print(f'error: {e}', file=sys.stderr) or 2)


if __name__ == '__main__':
    main()
