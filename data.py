"""
The data of DANIE (paper Sec. 4.1): the five benchmarks in the on-disk layouts people download, the user's own
data (an image folder, nnU-Net v2's raw layout), the per-dataset defaults of Sec. 4.2, TransUNet's augmentation,
the model's input path and its inverse, prediction I/O, and a synthetic demo set.

Offers: DATASETS, SPECS, DatasetSpec (classes, kind, intensity, recipe), get_spec, spec_to_dict / spec_from_dict;
train_set -> TrainSet (item (epoch, index): image float32 (3,S,S), label int64 (S,S)); eval_cases -> CaseList of
Case(id, image as stored, label at its native size); make_loader; prepare_input (slices or RGB images -> (N,3,S,S))
and restore_size (its inverse for label maps, in torch); normalise (raw intensities); read_input and
write_prediction (files without labels in, NIfTI/PNG label maps and overlays out); make_demo; DataError.
`python data.py` summarises a dataset; `--bench` measures training samples/s; `--make-demo DIR` writes the demo set.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import h5py
import nibabel as nib
import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

# -----------------------------------------------------------------------------
# constants

# NOTE(impl): mean/std of timm's maxvit_*_tf_224 weights (ImageNet's), repeated here: data.py does not import model.py.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ROT_DEGREES = 20.0      # TransUNet's small rotation range, [-20, 20] degrees
# NOTE(impl): default held-out validation = 10% of the training cases (at least 1); the paper has none.
VAL_FRACTION = 0.1
ISIC2018_SPLIT = (1815, 259, 520)  # the paper's train/val/test (Azad et al.), over the 2594 training images
CACHE_MAX_BYTES = 8 << 30          # largest shared cache of resized RGB training pairs
# NOTE(impl): without a test list, 20% of the user's cases (at least 1) are held out for test, seeded with 0 so the test set never moves.
TEST_FRACTION, TEST_SEED = 0.2, 0
CT_WINDOW = (-125.0, 275.0)        # Synapse/TransUNet: clip HU to this window, then scale to [0, 1]
INTENSITIES = ('ct', 'mri', 'zscore', 'rgb', 'none')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')
NIFTI_SUFFIXES = ('.nii.gz', '.nii')
MASK_SUFFIXES_UPPER = tuple(x.upper() for x in IMAGE_SUFFIXES)  # masks named img1.PNG are found too
OVERLAY_SLICES = 3                 # PNG overlays written per predicted volume
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 160, 255], [255, 200, 0], [0, 200, 0], [200, 0, 255],
                    [0, 255, 200], [255, 120, 0], [120, 120, 255]], dtype=np.uint8)  # class id -> overlay colour

SYNAPSE_CLASSES = ('background', 'spleen', 'kidney_r', 'kidney_l', 'gallbladder', 'liver', 'stomach',
                   'aorta', 'pancreas')  # the label ids of TransUNet's files
SYNAPSE_TABLE1 = (7, 4, 3, 2, 5, 8, 1, 6)  # Table 1: Aorta, GB, KL, KR, Liver, PC, SP, SM
# CASCADE's files keep BTCV's 13 raw labels: 1 spleen, 2 r. kidney, 3 l. kidney, 4 gallbladder, 5 esophagus,
# 6 liver, 7 stomach, 8 aorta, 9 IVC, 10 portal/splenic vein, 11 pancreas, 12/13 adrenal glands.
# NOTE(impl): 'cascade' maps CASCADE's 8 organs to TransUNet's ids (not its 11->5 order): one class table for both maps.
CASCADE_LUT = np.array([0, 1, 2, 3, 4, 0, 5, 6, 7, 0, 0, 8, 0, 0], np.int64)
LABEL_MAPS = ('transunet', 'cascade')


@dataclass(frozen=True)
class DatasetSpec:
    """What the code needs to know about one benchmark: classes, table order, Sec. 4.2 defaults, layout."""
    name: str
    num_classes: int
    class_names: tuple     # index = label id; 'background' at 0
    kind: str              # 'volume' (evaluated per 3-D case) or 'image'
    report_order: tuple    # class ids in the order of the paper's table
    epochs: int            # Sec. 4.2
    batch_size: int        # Sec. 4.2
    where: str             # where the data is published
    layout: str            # the on-disk layout we read
    # NOTE(impl): 224x224 inputs: the paper does not state the input size; 224 is the ImageNet MaxViT's and the peers' (TransUNet, CASCADE).
    img_size: int = 224    # default model input size
    lr: float = 1e-4       # AdamW learning rate (Sec. 4.2)
    intensity: str = 'none'  # how a RAW input is normalised (normalise()): 'ct', 'mri', 'zscore', 'rgb'


_SYNAPSE_LAYOUT = ('ROOT/train_npz/caseXXXX_sliceNNN.npz (image, label), ROOT/test_vol_h5/caseXXXX.npy.h5 '
                   '(image, label: D x H x W), lists ROOT/lists_Synapse/{train,test_vol}.txt (optional)')
SPECS = {
    'synapse': DatasetSpec(
        'synapse', 9, SYNAPSE_CLASSES, 'volume', SYNAPSE_TABLE1, 300, 24,
        "TransUNet's preprocessed Synapse/BTCV (https://github.com/Beckschen/TransUNet, datasets/README.md); "
        'raw CT: https://www.synapse.org/#!Synapse:syn3193805', _SYNAPSE_LAYOUT, intensity='ct'),
    'acdc': DatasetSpec(
        'acdc', 4, ('background', 'RV', 'Myo', 'LV'), 'volume', (1, 2, 3), 400, 12,
        'https://www.creatis.insa-lyon.fr/Challenge/acdc/ ; preprocessed by MT-UNet '
        '(https://github.com/Dootmaan/MT-UNet) or SSL4MIS (https://github.com/HiLab-git/SSL4MIS, data/ACDC)',
        'MT-UNet/CASCADE: ROOT/{train,valid}/case_XXX_slice{ED,ES}_N.npz, ROOT/test/case_XXX_volume_{ED,ES}.npz '
        '(img, label), ROOT/lists_ACDC/{train,valid,test}.txt; or SSL4MIS: ROOT/data/slices/*.h5, ROOT/data/*.h5 '
        '(image, label), ROOT/{train_slices,val,test}.list', intensity='mri'),
    'isic2017': DatasetSpec(
        'isic2017', 2, ('background', 'lesion'), 'image', (1,), 200, 8,
        'https://challenge.isic-archive.com/data/#2017 (Part 1)',
        'ROOT/ISIC-2017_{Training,Validation,Test_v2}_Data/ISIC_<id>.jpg + '
        'ROOT/ISIC-2017_{Training,Validation,Test_v2}_Part1_GroundTruth/ISIC_<id>_segmentation.png', intensity='rgb'),
    'isic2018': DatasetSpec(
        'isic2018', 2, ('background', 'lesion'), 'image', (1,), 200, 8,
        'https://challenge.isic-archive.com/data/#2018 (Task 1)',
        'ROOT/ISIC2018_Task1-2_Training_Input/ISIC_<id>.jpg + '
        'ROOT/ISIC2018_Task1_Training_GroundTruth/ISIC_<id>_segmentation.png', intensity='rgb'),
    # NOTE(impl): GlaS batch size 8: Sec. 4.2 gives only the epochs; 8 as for the other 2-D sets.
    'glas': DatasetSpec(
        'glas', 2, ('background', 'gland'), 'image', (1,), 100, 8,
        'https://warwick.ac.uk/fac/cross_fac/tia/data/glascontest/ (Warwick QU dataset)',
        'ROOT/{train,testA,testB}_N.bmp + ROOT/{train,testA,testB}_N_anno.bmp '
        "(ROOT may also be the folder holding 'Warwick QU Dataset (Released 2016_07_08)')", intensity='rgb'),
    # NOTE(impl): demo defaults (10 epochs, batch 4, 64 px, lr 3e-4: from scratch, no pretrained weights offline) are ours, sized for a 2-core CPU.
    'demo': DatasetSpec(
        'demo', 9, SYNAPSE_CLASSES, 'volume', SYNAPSE_TABLE1, 10, 4,
        'synthetic, written by `python data.py --make-demo ROOT` (no download)', _SYNAPSE_LAYOUT, img_size=64,
        lr=3e-4, intensity='ct'),
}
FOLDER_LAYOUT = ('ROOT/images/<stem>.png|jpg|jpeg|tif|tiff|bmp + ROOT/masks/<stem>.<same kinds> (class ids, or 0/255 '
                 'for two classes); ROOT/classes.txt (one name per line, line i = id i) or --num-classes; optional '
                 'ROOT/{train,val,test}.txt (one stem per line)')
NNUNET_LAYOUT = ('nnU-Net v2 raw: ROOT/dataset.json (channel_names, labels, file_ending), '
                 'ROOT/imagesTr/CASE_0000<ending>, '
                 'ROOT/labelsTr/CASE<ending>, optional ROOT/imagesTs + ROOT/labelsTs')
DATASETS = tuple(SPECS) + ('folder', 'nnunet')  # the names --data accepts: the fixed sets, then the user's own

# the synthetic demo set: Synapse's layout and class ids, small slices, organ-like blobs
DEMO_SIZE = 96            # slice side in pixels
DEMO_SLICES = 12          # slices per volume
DEMO_TRAIN_CASES = 15     # training volumes (VAL_FRACTION holds 2 of them out)
DEMO_TEST_CASES = 3       # test volumes (test_vol_h5)
DEMO_NOISE = 0.03         # white noise std, in the [0,1] scale of Synapse's clipped CT
DEMO_JITTER = 0.04        # per-case shift of the anatomy and per-organ jitter (fraction of the slice)
# tissue -> (centre y, centre x, radius y, radius x: fractions of the slice; z centre, z half-extent:
#            fractions of the volume; intensity; texture amplitude). Ids 1-8 are Synapse's organs; 9 body and
# 10 spine are background for the labels but give the image anatomy (the spine is about as bright as the aorta).
DEMO_TISSUES = {
    9: (0.50, 0.50, 0.42, 0.46, 0.5, 9.0, 0.30, 0.03),     # body (soft tissue)
    10: (0.82, 0.50, 0.065, 0.07, 0.5, 9.0, 1.15, 0.10),   # spine: bright bone, coarse texture
    5: (0.42, 0.30, 0.20, 0.17, 0.45, 0.70, 0.63, 0.03),   # liver: large, patient's right
    4: (0.55, 0.43, 0.085, 0.075, 0.35, 0.35, 0.10, 0.01),  # gallbladder: dark (bile)
    6: (0.37, 0.64, 0.13, 0.13, 0.55, 0.45, 0.41, 0.07),   # stomach: mottled contents
    1: (0.50, 0.82, 0.11, 0.08, 0.55, 0.40, 0.74, 0.02),   # spleen
    2: (0.70, 0.27, 0.09, 0.07, 0.45, 0.40, 0.85, 0.02),   # right kidney
    3: (0.70, 0.73, 0.09, 0.07, 0.50, 0.40, 0.96, 0.02),   # left kidney
    8: (0.52, 0.55, 0.055, 0.15, 0.45, 0.35, 0.52, 0.05),  # pancreas: elongated, lobulated
    7: (0.66, 0.50, 0.065, 0.065, 0.5, 9.0, 1.08, 0.01),   # aorta: round, contrast-bright, every slice
}


class DataError(Exception):
    """A dataset on disk is missing, incomplete or not in the expected format."""

# -----------------------------------------------------------------------------
# helpers: reading files (every failure names the file)


def _missing_root(spec, root):
    how = (f'write it with `python data.py --make-demo {root}`' if spec.name == 'demo'
           else f'{spec.name} is published at {spec.where}')
    return DataError(f"dataset root '{root}' (--root) not found: expected {spec.name} as {spec.layout}; {how}")


def _read_arrays(path, keys=None):
    """The named arrays of an .npz or .h5 file (keys=None: all of them, as a dict); failures name the file."""
    h5 = not str(path).endswith('.npz')
    try:
        with (h5py.File(path, 'r') if h5 else np.load(path)) as f:
            have = list(f.keys()) if h5 else f.files
            if keys is None:
                return {k: f[k][()] for k in have}
            if any(k not in have for k in keys):
                raise DataError(f'{path}: expected {"datasets" if h5 else "arrays"} {list(keys)}, found {have}')
            return [f[k][()] for k in keys]
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f'{path}: file not found') from None
    except Exception as e:  # zipfile, pickle, HDF5 and OS errors all mean the same: a corrupt file
        raise DataError(f'{path}: unreadable or corrupt {"h5" if h5 else "npz"} ({type(e).__name__}: {e})') from None


def _read_image(path, mode):
    try:
        with Image.open(path) as im:
            return np.array(im.convert(mode) if mode else im)
    except FileNotFoundError:
        raise DataError(f'{path}: file not found') from None
    except Exception as e:
        raise DataError(f'{path}: unreadable or corrupt image ({type(e).__name__}: {e})') from None


def _labels(a, path, num_classes, lut=None):
    """Stored labels (often float) -> int64 class ids, refusing non-integers and ids outside the classes."""
    a = np.asarray(a)
    if a.dtype.kind == 'f' and not np.array_equal(a, np.round(a)):  # NaN also fails here
        bad = a[a != np.round(a)].flat[0]
        raise DataError(f'{path}: labels must be integers, found {bad}')
    a = a.astype(np.int64)
    if not a.size:
        raise DataError(f'{path}: empty label array')
    if lut is not None:
        if a.min() < 0 or a.max() >= len(lut):
            raise DataError(f'{path}: raw label {a.min() if a.min() < 0 else a.max()} outside the 13 BTCV '
                            f'labels 0..{len(lut) - 1} of label_map=cascade')
        if a.ndim == 3:  # a whole volume
            _check_cascade(a, path)
        a = lut[a]
    if a.min() < 0 or a.max() >= num_classes:
        hint = ("; 13-label (CASCADE) files need label_map='cascade'" if num_classes == 9 and a.max() <= 13
                else '')
        raise DataError(f'{path}: label {a.min() if a.min() < 0 else a.max()} outside the {num_classes} '
                        f'classes 0..{num_classes - 1}{hint}')
    return a


def _npz_pair(path, keys, num_classes, lut=None):
    """One slice or volume from an npz: (image float32, label int64) of the same shape."""
    img, lab = _read_arrays(path, keys)
    return _pair(img, lab, path, num_classes, lut)


def _h5_pair(path, num_classes, lut=None):
    img, lab = _read_arrays(path, ('image', 'label'))
    return _pair(img, lab, path, num_classes, lut)


def _pair(img, lab, path, num_classes, lut):
    img, lab = np.asarray(img), np.asarray(lab)
    if img.shape != lab.shape or img.ndim not in (2, 3):
        raise DataError(f'{path}: image {img.shape} and label {lab.shape} must be equal 2-D or 3-D shapes')
    return img.astype(np.float32), _labels(lab, path, num_classes, lut)


def _stack(loads, name):
    """A volume (D,H,W) from its slices' loaders, in slice order (for cases held out of the training slices)."""
    pairs = [load() for load in loads]
    if len({p[0].shape for p in pairs}) != 1:
        raise DataError(f'volume {name}: its slices have different shapes {sorted({p[0].shape for p in pairs})}')
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _read_mask(path):
    """A mask file -> 2-D integer array; 1-bit files read as 0/255, RGB(A) annotations by their largest channel."""
    mask = _read_image(path, None)
    if mask.dtype == bool:
        mask = mask.astype(np.uint8) * 255
    return mask[..., :3].max(axis=2) if mask.ndim == 3 else mask


def _rgb_pair(img_path, mask_path, fg_threshold):
    """An RGB image as stored and its binary mask (foreground = value >= fg_threshold) at the mask's own size."""
    return _read_image(img_path, 'RGB'), (_read_mask(mask_path) >= fg_threshold).astype(np.int64)


def _class_pair(img_path, mask_path, num_classes):
    """An RGB image as stored (grayscale -> RGB) and its mask of class ids; for two classes 0/255 reads as 0/1."""
    mask = _read_mask(mask_path)
    if num_classes == 2:
        mask = np.where(mask == 255, 1, mask)
    return _read_image(img_path, 'RGB'), _labels(mask, mask_path, num_classes)


def _read_nifti(path):
    """A NIfTI file -> (its voxels as stored, squeezed to 3-D (X,Y,Z), the nibabel image for affine and header)."""
    try:
        img = nib.load(str(path))
        a = np.asanyarray(img.dataobj)
    except FileNotFoundError:
        raise DataError(f'{path}: file not found') from None
    except Exception as e:
        raise DataError(f'{path}: unreadable or corrupt NIfTI ({type(e).__name__}: {e})') from None
    a = a.reshape(a.shape[:3] + tuple(d for d in a.shape[3:] if d != 1))  # (X,Y,Z,1) -> (X,Y,Z)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise DataError(f'{path}: expected a 3-D volume, found shape {img.shape}')
    return a, img


# NOTE(impl): volume slices are cut along the 3rd voxel axis, rows = 2nd, columns = 1st: nibabel's (X,Y,Z) -> (Z,Y,X),
# NOTE(impl): no reorientation: the public Synapse conversion (SAMed's preprocess_data.py) and SSL4MIS's ACDC script do the same.
def _voxel_order(a):
    """(X,Y,Z) voxels <-> (Z,Y,X) slices; the transpose is its own inverse."""
    return np.ascontiguousarray(np.transpose(a, (2, 1, 0)))


def _check_cascade(labels, name):
    """label_map='cascade' on data that cannot be 13-label BTCV data is refused (issue: liver read as background)."""
    if np.asarray(labels).max() <= 8:
        raise DataError(f'{name}: label_map=cascade expects the 13 BTCV labels, but no label above 8 in the whole '
                        "case: these look like TransUNet's 9-class files; use --label-map transunet")

def _nifti_pair(img_path, lab_path, intensity, num_classes):
    """A raw NIfTI volume and its label map -> (image float32 (D,H,W) normalised, label int64 (D,H,W))."""
    (img, _), (lab, _) = _read_nifti(img_path), _read_nifti(lab_path)
    if img.shape != lab.shape:
        raise DataError(f'{lab_path}: label shape {lab.shape} differs from its image {img_path} {img.shape}')
    return normalise(_voxel_order(img), intensity), _labels(_voxel_order(lab), lab_path, num_classes)


def _depth(path):
    """Slices of a NIfTI volume, from its header alone (nothing is decompressed)."""
    try:
        shape = nib.load(str(path)).shape
    except Exception as e:
        raise DataError(f'{path}: unreadable or corrupt NIfTI ({type(e).__name__}: {e})') from None
    return shape[2] if len(shape) >= 3 else 1


def _remove_if_owner(path, pid):
    if os.getpid() == pid:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else Path(path).unlink(missing_ok=True)


def _save_atomic(path, a):
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'wb') as f:
        np.save(f, a)
    os.replace(tmp, path)  # loader workers racing on one volume each write it whole; the last rename wins

# -----------------------------------------------------------------------------
# blocks: listing the datasets: training samples (grouped by case) and evaluation cases


@dataclass(frozen=True)
class _Sample:
    """One training slice or image."""
    case: str       # patient/volume/image: the unit of the validation split
    volume: str     # the volume it is a slice of (the image itself for 2-D sets)
    index: int      # position in that volume
    load: Callable  # () -> (image, label); a functools.partial, so it pickles into loader workers


@dataclass
class Case:
    """One evaluation case at its original size."""
    id: str
    image: np.ndarray   # volume: float32 (D,H,W); image: uint8 (H,W,3) as stored (its size may differ from the mask)
    label: np.ndarray   # int64, the same (D,H,W) / (H,W)


class CaseList(Sequence):
    """Evaluation cases, loaded one at a time on indexing (volumes are large)."""

    def __init__(self, refs):
        self.refs = list(refs)  # [(id, load)]
        self.ids = [r[0] for r in self.refs]

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return CaseList(self.refs[i])
        cid, load = self.refs[i]
        return Case(cid, *load())


def _entries(folder, suffix, list_file=None, layout=''):
    """Files of a folder in the order of its list file when there is one, else sorted."""
    if not folder.is_dir():
        raise DataError(f'{folder}: folder not found' + (f'; expected {layout}' if layout else ''))
    if list_file is None:
        files = sorted(p for p in folder.iterdir() if p.name.endswith(suffix))
        if not files:
            raise DataError(f'no samples found: {folder} has no *{suffix} files')
        return files
    names = [n.strip() for n in list_file.read_text().splitlines() if n.strip()]
    if not names:
        raise DataError(f'no samples found: list {list_file} is empty')
    files = [folder / (n if n.endswith(suffix) else n + suffix) for n in names]
    for n, f in zip(names, files):
        if not f.is_file():
            raise DataError(f'list {list_file} names {n}, but {f} does not exist')
    return files


def _first(*paths):
    return next((p for p in paths if p.is_file()), None)


def _slice_samples(files, pattern, load, example):
    """Training samples from slice files named like `example`; pattern gives (case, volume, index)."""
    out = []
    for f in files:
        m = re.match(pattern, f.name)
        if not m:
            raise DataError(f'{f}: expected a slice file named like {example}')
        case, volume, index = m.group('case'), m.group('volume'), int(m.group('index'))
        out.append(_Sample(case, volume, index, partial(load, f)))
    return out


# NOTE(impl): without list files, every file of the folder (sorted) is used; the lists are in the code repos.
class _Synapse:
    """TransUNet's Synapse files; the demo set uses the same layout."""
    official_val = False

    def __init__(self, root, spec, label_map):
        self.root, self.spec = root, spec
        self.lut = lut = CASCADE_LUT if label_map == 'cascade' else None
        self.lists = next((d for d in (root / 'lists_Synapse', root / 'lists' / 'lists_Synapse') if d.is_dir()),
                          root / 'lists_Synapse')
        self.slice_load = partial(_npz_pair, keys=('image', 'label'), num_classes=spec.num_classes, lut=lut)
        self.vol_load = partial(_h5_pair, num_classes=spec.num_classes, lut=lut)

    def train(self):
        files = _entries(self.root / 'train_npz', '.npz', _first(self.lists / 'train.txt'), self.spec.layout)
        pat = r'^(?P<volume>(?P<case>.+))_slice(?P<index>\d+)\.npz$'
        samples = _slice_samples(files, pat, self.slice_load, 'case0005_slice012.npz')
        if self.lut is not None:  # the raw labels of one whole training case tell the two maps apart
            first = [s.load.args[0] for s in samples if s.case == samples[0].case]
            _check_cascade(np.stack([_read_arrays(f, ('label',))[0].max() for f in first]),
                           f'training case {samples[0].case} ({first[0].parent})')
        return samples

    def test(self):
        files = _entries(self.root / 'test_vol_h5', '.npy.h5', _first(self.lists / 'test_vol.txt'), self.spec.layout)
        return [(f.name[:-len('.npy.h5')], partial(self.vol_load, f)) for f in files]


# NOTE(impl): ACDC cases held out of training are patients: ED and ES of one patient stay on one side.
class _ACDC_MTUNet:
    """ACDC as preprocessed by MT-UNet and used by CASCADE: npz slices (train, valid) and test volumes."""
    official_val = True
    pattern = r'^(?P<volume>(?P<case>case_\d+)_slice(?:ED|ES))_(?P<index>\d+)\.npz$'

    def __init__(self, root, spec, label_map):
        self.root, self.spec = root, spec
        self.load = partial(_npz_pair, keys=('img', 'label'), num_classes=spec.num_classes)

    def _files(self, split):
        return _entries(self.root / split, '.npz', _first(self.root / 'lists_ACDC' / f'{split}.txt'), self.spec.layout)

    def _slices(self, split):
        samples = _slice_samples(self._files(split), self.pattern, self.load, 'case_001_sliceED_0.npz')
        # volume ids as the test files name them: case_019_sliceED -> case_019_volume_ED
        return [replace(s, volume=s.volume.replace('_slice', '_volume_')) for s in samples]

    def train(self):
        return self._slices('train')

    def val(self):
        return _volumes_from_slices(self._slices('valid'))

    def test(self):
        return [(f.name[:-4], partial(self.load, f)) for f in self._files('test')]


class _ACDC_SSL4MIS:
    """ACDC as preprocessed by SSL4MIS: h5 slices for training, h5 volumes for validation and test."""
    official_val = True

    def __init__(self, root, spec, label_map):
        self.root, self.spec = root, spec
        self.load = partial(_h5_pair, num_classes=spec.num_classes)

    def train(self):
        lst = _first(self.root / 'train_slices.list')
        files = _entries(self.root / 'data' / 'slices', '.h5', lst, self.spec.layout)
        pat = r'^(?P<volume>(?P<case>patient\d+)_frame\d+)_slice_(?P<index>\d+)\.h5$'
        return _slice_samples(files, pat, self.load, 'patient001_frame01_slice_0.h5')

    def _volumes(self, lst):
        if not (self.root / lst).is_file():
            raise DataError(f'{self.root / lst}: list file not found; expected {self.spec.layout}')
        return [(f.name[:-3], partial(self.load, f)) for f in _entries(self.root / 'data', '.h5', self.root / lst)]

    def val(self):
        return self._volumes('val.list')

    def test(self):
        return self._volumes('test.list')


def _pairs(img_dir, mask_dir, mask_suffix, fg_threshold, spec, image_suffixes=('.jpg', '.jpeg', '.png')):
    """(id, loader) for every image of a folder, paired by id with its mask; superpixel files skipped."""
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f'{d}: folder not found; expected {spec.layout}; {spec.name} is published at {spec.where}')
    out = []
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() not in image_suffixes or p.stem.endswith(('_superpixels', '_segmentation')):
            continue  # ISIC 2017's training folder also holds ISIC_<id>_superpixels.png
        m = mask_dir / (p.stem + mask_suffix)
        if not m.is_file():
            raise DataError(f'{p}: no mask {m}')
        out.append((p.stem, partial(_rgb_pair, p, m, fg_threshold)))
    if not out:
        raise DataError(f'no samples found: {img_dir} has no images ({", ".join(image_suffixes)})')
    return out


# NOTE(impl): ISIC masks are 0/255; foreground = value >= 128, robust to masks that were resampled.
ISIC_FG = 128


def _image_samples(refs):
    return [_Sample(cid, cid, 0, load) for cid, load in refs]


class _ISIC2017:
    official_val = True
    dirs = {'train': 'Training', 'val': 'Validation', 'test': 'Test_v2'}

    def __init__(self, root, spec, label_map):
        self.root, self.spec = root, spec

    def _split(self, split):
        part = self.dirs[split]
        img_dir = self.root / f'ISIC-2017_{part}_Data'
        # NOTE(impl): without the official Validation folder, 'val' needs val_cases=N (held out of training).
        if split != 'train' and not img_dir.is_dir():
            raise DataError(f'{img_dir}: the official ISIC 2017 {part} folder is not under {self.root}'
                            + (' (or pass val_cases=N to hold out N training images instead)' if split == 'val'
                               else ''))
        return _pairs(img_dir, self.root / f'ISIC-2017_{part}_Part1_GroundTruth', '_segmentation.png', ISIC_FG,
                      self.spec)

    def train(self):
        return _image_samples(self._split('train'))

    def val(self):
        return self._split('val')

    def test(self):
        return self._split('test')


def isic2018_split(names):
    """The paper's ISIC 2018 split (Azad et al.): the first 1815 / next 259 / last 520 of the SORTED names."""
    names = sorted(names)
    n_train, n_val, n_test = ISIC2018_SPLIT
    if len(names) != sum(ISIC2018_SPLIT):
        # NOTE(impl): a folder with another count than 2594 is split in the same proportions (with a warning).
        warnings.warn(f'ISIC 2018: {len(names)} images instead of {sum(ISIC2018_SPLIT)}; '
                      f'splitting in the proportions {ISIC2018_SPLIT}')
        n_train = round(len(names) * n_train / sum(ISIC2018_SPLIT))
        n_val = round(len(names) * n_val / sum(ISIC2018_SPLIT))
    # NOTE(impl): sorted names; Azad et al.'s script took an unsorted glob, whose order depends on the file system.
    return names[:n_train], names[n_train:n_train + n_val], names[n_train + n_val:]


class _ISIC2018:
    official_val = True

    def __init__(self, root, spec, label_map):
        self.root, self.spec = root, spec

    def _split(self, k):
        refs = dict(_pairs(self.root / 'ISIC2018_Task1-2_Training_Input',
                           self.root / 'ISIC2018_Task1_Training_GroundTruth', '_segmentation.png', ISIC_FG,
                           self.spec, image_suffixes=('.jpg', '.jpeg')))
        return [(cid, refs[cid]) for cid in isic2018_split(refs)[k]]

    def train(self):
        return _image_samples(self._split(0))

    def val(self):
        return self._split(1)

    def test(self):
        return self._split(2)


# NOTE(impl): GlaS's held-out validation is by image: the file names carry no patient id.
class _GlaS:
    """Warwick QU bmp files; annotations are instance maps, foreground = anno > 0."""
    official_val = False

    def __init__(self, root, spec, label_map):
        # the download unpacks into one folder 'Warwick QU Dataset (Released 2016_07_08)': accept its parent too
        subs = [d for d in sorted(root.iterdir()) if d.is_dir() and any(d.glob('train_*_anno.bmp'))]
        self.root = root if any(root.glob('train_*_anno.bmp')) or len(subs) != 1 else subs[0]
        self.spec = spec

    def _split(self, prefixes):
        out = []
        for prefix in prefixes:
            files = [p for p in self.root.glob(f'{prefix}_*.bmp') if re.fullmatch(rf'{prefix}_\d+\.bmp', p.name)]
            for p in sorted(files, key=lambda p: int(p.stem.split('_')[1])):
                m = p.with_name(p.stem + '_anno.bmp')
                if not m.is_file():
                    raise DataError(f'{p}: no annotation {m}')
                out.append((p.stem, partial(_rgb_pair, p, m, 1)))  # instance ids > 0 are gland
        if not out:
            raise DataError(f'no samples found: no {"/".join(prefixes)}_N.bmp files in {self.root}; '
                            f'expected {self.spec.layout}')
        return out

    def train(self):
        return _image_samples(self._split(('train',)))

    def test(self):
        return self._split(('testA', 'testB'))


def _list_file(path, known):
    """Stems named by a list file (train.txt, val.txt, test.txt), or None when there is none."""
    if not path.is_file():
        return None
    names = [n.strip() for n in path.read_text().splitlines() if n.strip()]
    for n in names:
        if n not in known:
            raise DataError(f'list {path} names {n}, but there is no such case')
    return names


def _hold_test(names, name):
    """The seeded held-out test cases of a dataset without a test list."""
    if len(names) < 2:
        raise DataError(f'{name}: {len(names)} case(s) cannot be split into training and test')
    k = max(1, int(TEST_FRACTION * len(names) + 0.5))
    perm = np.random.default_rng(TEST_SEED).permutation(len(names))
    return {sorted(names)[i] for i in perm[:k]}


def _with_mask(img, mask_dir, stems):
    """The mask of an image: the first of mask_dir/<stem> that exists, else a DataError naming the image."""
    mask = _first(*(mask_dir / s for s in stems))
    if mask is None:
        raise DataError(f'{img}: no mask {mask_dir / stems[0]} (image without mask)')
    return mask


class _Folder:
    """The user's images: ROOT/images/<stem>.<png|jpg|...> + ROOT/masks/<stem>.<...>; optional list files."""

    def __init__(self, root, spec, label_map):
        self.spec, img_dir, mask_dir = spec, root / 'images', root / 'masks'
        for d in (img_dir, mask_dir):
            if not d.is_dir():
                raise DataError(f'{d}: folder not found; expected {spec.layout}')
        self.refs = {}
        for p in sorted(img_dir.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                m = _with_mask(p, mask_dir, [p.stem + x for x in IMAGE_SUFFIXES + MASK_SUFFIXES_UPPER])
                self.refs[p.stem] = partial(_class_pair, p, m, spec.num_classes)
        if not self.refs:
            raise DataError(f'no samples found: {img_dir} has no images ({", ".join(IMAGE_SUFFIXES)})')
        lists = {k: _list_file(root / f'{k}.txt', self.refs) for k in ('train', 'val', 'test')}
        self.val_ids = lists['val'] or []
        pool = [n for n in (lists['train'] or self.refs) if n not in self.val_ids]
        self.test_ids = lists['test'] if lists['test'] is not None else sorted(_hold_test(pool, root))
        self.train_ids = [n for n in pool if n not in self.test_ids]
        self.official_val = lists['val'] is not None

    def train(self):
        return _image_samples((n, self.refs[n]) for n in self.train_ids)

    def val(self):
        return [(n, self.refs[n]) for n in self.val_ids]

    def test(self):
        return [(n, self.refs[n]) for n in self.test_ids]


def _nnunet_meta(root):
    """dataset.json of an nnU-Net v2 raw folder -> (labels {name: id}, channel names in order, file_ending)."""
    path = root / 'dataset.json'
    if not root.is_dir():
        raise DataError(f"dataset root '{root}' (--root) not found: expected {NNUNET_LAYOUT}")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f'{path}: not found; expected {NNUNET_LAYOUT}') from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f'{path}: not valid JSON ({e})') from None
    missing = [k for k in ('channel_names', 'labels', 'file_ending') if k not in meta]
    if missing:
        raise DataError(f'{path}: missing key(s) {missing}; nnU-Net v2 needs channel_names, labels, file_ending')
    ending = meta['file_ending']
    if ending not in NIFTI_SUFFIXES + ('.png',):
        raise DataError(f'{path}: file_ending {ending!r} is not supported; expected .nii.gz, .nii or .png')
    labels = meta['labels']
    if not isinstance(labels, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise DataError(f'{path}: labels must map names to integer ids (region-based labels are not supported)')
    if sorted(labels.values()) != list(range(len(labels))) or len(labels) < 2:
        raise DataError(f'{path}: label ids must be 0..K-1 (background 0), found {sorted(labels.values())}')
    channels = [meta['channel_names'][k] for k in sorted(meta['channel_names'], key=int)]
    if len(channels) > 1:
        # NOTE(impl): DANIE takes one channel (or one RGB image): of several nnU-Net channels only channel 0 is read, with a warning.
        warnings.warn(f'{path}: {len(channels)} channels {channels}; DANIE reads channel 0 ({channels[0]}) only')
    return labels, channels, ending


class _NNUNet:
    """nnU-Net v2 raw: imagesTr/CASE_0000<ending> + labelsTr/CASE<ending>; imagesTs/labelsTs as the test split."""
    official_val = False

    def __init__(self, root, spec, label_map):
        self.root, self.spec = root, spec
        _, _, self.ending = _nnunet_meta(root)
        self.volume = spec.kind == 'volume'
        self.cache = _VolumeCache(spec.intensity, spec.num_classes) if self.volume else None
        self.tr = self._pairs('imagesTr', 'labelsTr')
        ts = self._pairs('imagesTs', 'labelsTs') if (root / 'labelsTs').is_dir() else None
        held = _hold_test(self.tr, root) if ts is None else set()
        self.ts = ts if ts is not None else {c: self.tr[c] for c in sorted(held)}
        self.tr = {c: p for c, p in self.tr.items() if c not in held}

    def _pairs(self, images, labels):
        """{case: (image file, label file)} of one split; every image needs its label."""
        img_dir, end = self.root / images, '_0000' + self.ending
        if not img_dir.is_dir():
            raise DataError(f'{img_dir}: folder not found; expected {NNUNET_LAYOUT}')
        files = sorted(p for p in img_dir.iterdir() if p.name.endswith(end))
        if not files:
            found = sorted(p.name for p in img_dir.iterdir())[:3]
            raise DataError(f'no samples found: {img_dir} has no CASE{end} files (file_ending {self.ending!r} in '
                            f'dataset.json); found {found}')
        return {p.name[:-len(end)]: (p, _with_mask(p, self.root / labels, [p.name[:-len(end)] + self.ending]))
                for p in files}

    def _load(self, case, pair):
        if self.volume:
            return partial(_nifti_pair, *pair, self.spec.intensity, self.spec.num_classes)
        return partial(_class_pair, *pair, self.spec.num_classes)

    def train(self):
        if not self.volume:
            return _image_samples((c, self._load(c, p)) for c, p in self.tr.items())
        return [_Sample(c, c, k, partial(self.cache.slice, c, p, k)) for c, p in self.tr.items()
                for k in range(_depth(p[0]))]

    def test(self):
        return [(c, self._load(c, p)) for c, p in self.ts.items()]


def _volumes_from_slices(samples):
    """Evaluation cases assembled from training-style slices, one volume per id, slices in index order."""
    by_volume = {}
    for s in samples:
        by_volume.setdefault(s.volume, []).append(s)
    refs = []
    for vid in sorted(by_volume):
        ss = sorted(by_volume[vid], key=lambda s: s.index)
        refs.append((vid, partial(_stack, [s.load for s in ss], vid)))
    return refs


def _folder_spec(root, num_classes):
    """The spec of the user's image folder: classes from ROOT/classes.txt or num_classes."""
    if not root.is_dir():
        raise DataError(f"dataset root '{root}' (--root) not found: expected {FOLDER_LAYOUT}")
    names = None
    if (root / 'classes.txt').is_file():
        names = tuple(n.strip() for n in (root / 'classes.txt').read_text().splitlines() if n.strip())
        if len(names) < 2 or num_classes not in (None, len(names)):
            raise DataError(f'{root / "classes.txt"}: {len(names)} classes' + (f' but --num-classes {num_classes}'
                            if num_classes else '; expected at least 2 lines (background first)'))
    elif num_classes is None:
        raise DataError(f'{root}: no classes.txt (one class name per line, line i = id i) and no --num-classes')
    names = names or ('background',) + tuple(f'class{i}' for i in range(1, num_classes))
    # NOTE(impl): the user's images train with ISIC's recipe (200 epochs, batch 8); the paper has no such set.
    return DatasetSpec('folder', len(names), names, 'image', tuple(range(1, len(names))), 200, 8, str(root),
                       FOLDER_LAYOUT, intensity='rgb')


def _nnunet_spec(root, num_classes):
    """The spec of an nnU-Net v2 raw folder: classes from dataset.json, intensity from its channel 0."""
    labels, channels, ending = _nnunet_meta(root)
    names = tuple(sorted(labels, key=labels.get))
    if num_classes not in (None, len(names)):
        raise DataError(f'num_classes={num_classes} (--num-classes): {root / "dataset.json"} has {len(names)} labels')
    volume = ending in NIFTI_SUFFIXES
    intensity = 'rgb' if not volume else 'ct' if str(channels[0]).lower() == 'ct' else 'zscore'
    # NOTE(impl): nnU-Net volumes train with Synapse's recipe (300 epochs, batch 24), 2-D sets with ISIC's (200, 8).
    return DatasetSpec('nnunet', len(names), names, 'volume' if volume else 'image', tuple(range(1, len(names))),
                       300 if volume else 200, 24 if volume else 8, str(root), NNUNET_LAYOUT, intensity=intensity)


def _source(spec, root, label_map):
    """The lister for one dataset root; checks the label map and that the root exists."""
    name, root = spec.name, Path(root)
    if label_map not in LABEL_MAPS:
        raise DataError(f"unknown label map '{label_map}' (--label-map): expected one of {', '.join(LABEL_MAPS)}")
    if label_map == 'cascade' and name != 'synapse':
        raise DataError(f"label_map='cascade' is for Synapse's 13-label files, not for {name}")
    if not root.is_dir():
        raise _missing_root(spec, root)
    if name in ('synapse', 'demo'):
        if not (root / 'train_npz').is_dir() and not (root / 'test_vol_h5').is_dir():
            raise DataError(f'{root}: no train_npz/ or test_vol_h5/ folder; expected {spec.layout}; '
                            + ('run `python data.py --make-demo ROOT`' if name == 'demo'
                               else f'Synapse is published at {spec.where}'))
        return _Synapse(root, spec, label_map)
    if name == 'acdc':
        if (root / 'data' / 'slices').is_dir():
            return _ACDC_SSL4MIS(root, spec, label_map)
        if (root / 'train').is_dir() or (root / 'lists_ACDC').is_dir():
            return _ACDC_MTUNet(root, spec, label_map)
        raise DataError(f'{root}: neither ACDC layout found; expected {spec.layout}; published at {spec.where}')
    return {'isic2017': _ISIC2017, 'isic2018': _ISIC2018, 'glas': _GlaS, 'folder': _Folder,
            'nnunet': _NNUNet}[name](root, spec, label_map)


def parse_val_cases(text):
    """--val-cases of train.py and data.py: a number of cases (int), a fraction below 1 (float), or 0 for none."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f'expected a number of cases >= 0 or a fraction in (0, 1), got {text!r}')
    return value if value < 1 and value != 0 else int(value)


def _n_val(val_cases, n):
    """How many of n training cases to hold out: a count, or a fraction (rounded, at least 1)."""
    bad = DataError(f'val_cases={val_cases!r} (--val-cases): expected a number of cases >= 0 or a fraction in (0, 1)')
    if isinstance(val_cases, bool) or not isinstance(val_cases, (int, float)) or val_cases < 0:
        raise bad
    if 0 < val_cases < 1:
        k = max(1, int(val_cases * n + 0.5))
    elif float(val_cases).is_integer():
        k = int(val_cases)
    else:
        raise bad
    if k >= n:
        raise DataError(f'val_cases={val_cases} holds out {k} of the {n} training cases; none would be left')
    return k


def _held_out(source, samples, val_cases, seed):
    """Cases held out of training: val_cases=None keeps an official split where the dataset has one."""
    # NOTE(impl): an explicit val_cases holds training cases out even where an official validation split exists.
    if val_cases is None:
        if source.official_val:
            return set()
        val_cases = VAL_FRACTION
    cases = sorted({s.case for s in samples})
    k = _n_val(val_cases, len(cases))
    # NOTE(impl): held-out cases = a seeded permutation of the sorted case ids (whole patients/volumes).
    perm = np.random.default_rng(seed).permutation(len(cases))
    return {cases[i] for i in perm[:k]}

# -----------------------------------------------------------------------------
# blocks: resizing, augmentation and normalisation: the same functions for training and evaluation


def _resize_gray(img, size):
    """A float slice (H,W) to (size,size), cubic spline (order 3) as TransUNet's train and test code."""
    img = img.astype(np.float32, copy=False)
    if img.shape == (size, size):
        return img
    return ndimage.zoom(img, (size / img.shape[0], size / img.shape[1]), order=3)


def _resize_gray_label(lab, size):
    if lab.shape == (size, size):
        return lab
    return ndimage.zoom(lab, (size / lab.shape[0], size / lab.shape[1]), order=0)


def _resize_rgb(img, size):
    """A uint8 RGB image (H,W,3) to (size,size,3), bicubic."""
    if img.shape[:2] == (size, size):
        return img
    # NOTE(impl): PIL bicubic with reducing_gap=3 (box pre-reduction) keeps megapixel ISIC images fast.
    return np.array(Image.fromarray(img).resize((size, size), Image.BICUBIC, reducing_gap=3.0))


def _resize_rgb_label(lab, size):
    # PIL's nearest uses the same pixel-centre grid as its bicubic, so mask and image stay aligned
    lab = lab.astype(np.uint8)  # class ids < 256; PIL rotates bytes, not int64
    if lab.shape == (size, size):
        return lab
    return np.array(Image.fromarray(lab).resize((size, size), Image.NEAREST))


def _rotate(a, angle, resample):
    # PIL rotates float ('F'), uint8 ('L') and RGB arrays about the same centre and fills with 0 (background)
    return np.array(Image.fromarray(np.ascontiguousarray(a)).rotate(angle, resample=resample))


def _augment(img, lab, rng):
    """TransUNet's RandomGenerator: p=0.5 rot90 (k in 0..3) + flip; else p=0.5 a rotation in [-20, 20] deg."""
    if rng.random() < 0.5:
        k, axis = int(rng.integers(4)), int(rng.integers(2))
        img, lab = np.flip(np.rot90(img, k), axis), np.flip(np.rot90(lab, k), axis)
    elif rng.random() < 0.5:
        # NOTE(impl): angle uniform in [-20, 20] and the image bilinear (TransUNet: integer angle, nearest for both).
        angle = float(rng.uniform(-ROT_DEGREES, ROT_DEGREES))
        img, lab = _rotate(img, angle, Image.BILINEAR), _rotate(lab, angle, Image.NEAREST)
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)


def _to_input(x, mean, std):
    """A resized slice (S,S) float or RGB (S,S,3) uint8 -> normalised float32 tensor (3,S,S)."""
    if x.ndim == 2:
        x = x[None].astype(np.float32, copy=False)  # (1,S,S): the grayscale slice feeds all 3 RGB inputs
    else:
        x = x.transpose(2, 0, 1).astype(np.float32) / np.float32(255)  # (3,S,S) in [0,1]
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    return torch.from_numpy((x - m) / s)  # broadcast to (3,S,S)


def prepare_input(images, img_size, mean=MEAN, std=STD):
    """Slices (N,H,W) float or RGB images (N,H,W,3) uint8 -> the model's input (N,3,S,S), as in training."""
    a = np.asarray(images)
    if a.ndim == 3 and a.dtype != np.uint8:
        return torch.stack([_to_input(_resize_gray(x, img_size), mean, std) for x in a])
    if a.ndim == 4 and a.shape[-1] == 3 and a.dtype == np.uint8:
        return torch.stack([_to_input(_resize_rgb(x, img_size), mean, std) for x in a])
    raise ValueError(f'prepare_input: expected float slices (N,H,W) or uint8 RGB (N,H,W,3), got {a.dtype} {a.shape}')

def _nearest_index(n_in, n_out, grid):
    """Source index of each output pixel of scipy.ndimage.zoom(order=0) along one axis, in scipy's own float64 steps."""
    if grid:  # pixel-centre grid (PIL's, grid_mode=True): centres map onto centres
        c = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    else:  # corner-aligned grid (scipy's default): first and last pixels map onto each other
        c = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 1.0)
    return np.clip(np.floor(c + 0.5), 0, n_in - 1).astype(np.int64)


def restore_size(labels, out_hw, kind):
    """Label maps (N,S,S) (a torch integer tensor, any device) -> (N,H,W) by nearest neighbour, inverting prepare_input.

    kind 'volume': scipy's corner-aligned grid of the slices' resize; 'image': PIL's pixel-centre grid of RGB images."""
    if kind not in ('volume', 'image'):
        raise ValueError(f"restore_size: kind must be 'volume' or 'image', got {kind!r}")
    h, w = labels.shape[-2:]
    if (h, w) == tuple(out_hw):
        return labels
    # NOTE(impl): the argmax label map is resized back with order 0 (TransUNet's test_single_volume), not the logits.
    iy, ix = (torch.from_numpy(_nearest_index(n, m, kind == 'image')).to(labels.device)
              for n, m in ((h, out_hw[0]), (w, out_hw[1])))
    return labels.index_select(-2, iy).index_select(-1, ix)  # (N,S,S) -> (N,H,S) -> (N,H,W)


def normalise(image, intensity):
    """A raw input -> the values the training slices hold: 'ct', 'mri', 'zscore' (float32); 'rgb', 'none' as given."""
    if intensity not in INTENSITIES:
        raise DataError(f"intensity {intensity!r} (--intensity): expected one of {', '.join(INTENSITIES)}")
    if intensity in ('rgb', 'none'):
        return image
    a = np.asarray(image, dtype=np.float32)
    if intensity == 'ct':  # Synapse/TransUNet: clip HU to the abdominal window, scale to [0, 1]
        lo, hi = CT_WINDOW
        return (np.clip(a, lo, hi) - lo) / np.float32(hi - lo)
    if intensity == 'mri':
        # NOTE(impl): 'mri' = per-volume min-max to [0, 1], as SSL4MIS's acdc_data_processing.py wrote the ACDC h5 files.
        return (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
    # NOTE(impl): 'zscore' = nnU-Net's rule for non-CT channels: mean and std over the whole volume (no foreground mask).
    return (a - a.mean()) / max(float(a.std()), 1e-8)

# -----------------------------------------------------------------------------
# blocks: the training dataset


class _ResizedCache:
    """Resized, un-augmented RGB pairs in a memory-mapped temp file that all loader workers share."""

    def __init__(self, n, size):
        self.n, self.size = n, size
        self.row = size * size * 4 + 1  # RGB, label, 'filled' flag
        fd, self.path = tempfile.mkstemp(prefix='danie-cache-')
        os.ftruncate(fd, n * self.row)  # sparse: costs nothing until filled
        os.close(fd)
        weakref.finalize(self, _remove_if_owner, self.path, os.getpid())
        self._mm, self._pid = None, None

    def __getstate__(self):  # worker processes map the file themselves
        return {**self.__dict__, '_mm': None, '_pid': None}

    def _map(self):
        if self._pid != os.getpid():
            self._mm, self._pid = np.memmap(self.path, np.uint8, 'r+', shape=(self.n, self.row)), os.getpid()
        return self._mm

    def get(self, i):
        row, s = self._map()[i], self.size
        if not row[-1]:
            return None
        return row[:3 * s * s].reshape(s, s, 3).copy(), row[3 * s * s:-1].reshape(s, s).copy()

    def put(self, i, img, lab):
        row, s = self._map()[i], self.size
        row[:3 * s * s], row[3 * s * s:-1] = img.ravel(), lab.ravel()
        row[-1] = 1  # written last: a reader never sees half a pair as filled


# NOTE(impl): nnU-Net volumes are decoded once (first use, in whichever process) into uncompressed .npy files in a temp folder, then memory-mapped per slice.
class _VolumeCache:
    """Decoded, normalised NIfTI volumes as .npy files in a temp folder that all loader workers share."""

    def __init__(self, intensity, num_classes):
        self.intensity, self.num_classes = intensity, num_classes
        self.dir = tempfile.mkdtemp(prefix='danie-volumes-')
        weakref.finalize(self, _remove_if_owner, self.dir, os.getpid())
        self._maps = {}

    def __getstate__(self):  # worker processes map the files themselves
        return {**self.__dict__, '_maps': {}}

    def slice(self, case, pair, k):
        """Slice k of a case -> (image float32 (H,W), label int64 (H,W)), decoding the volume on first use."""
        if case not in self._maps:
            img_f, lab_f = (os.path.join(self.dir, f'{case}_{x}.npy') for x in ('image', 'label'))
            if not os.path.exists(lab_f):  # the label is written last
                img, lab = _nifti_pair(*pair, self.intensity, self.num_classes)
                _save_atomic(img_f, img)
                _save_atomic(lab_f, lab.astype(np.uint8))
            self._maps[case] = np.load(img_f, mmap_mode='r'), np.load(lab_f, mmap_mode='r')
        img, lab = self._maps[case]
        return np.array(img[k]), lab[k].astype(np.int64)


class TrainSet(Dataset):
    """Training samples -> (image float32 (3,S,S) normalised, label int64 (S,S)), TransUNet-augmented.

    Item (epoch, index) draws its augmentation from default_rng([seed, epoch, index]): the same whatever the workers."""

    def __init__(self, samples, spec, img_size, *, seed=0, augment=True, mean=MEAN, std=STD, cache=True):
        self.samples, self.spec, self.img_size, self.seed = samples, spec, img_size, seed
        self.augment, self.mean, self.std = augment, tuple(mean), tuple(std)
        self.cases = sorted({s.case for s in samples})
        self.rgb = spec.kind == 'image'
        # NOTE(impl): RGB pairs are resized to S, cached, then augmented at S (TransUNet augments at native size).
        big = len(samples) * (img_size * img_size * 4 + 1) > CACHE_MAX_BYTES
        self._cache = _ResizedCache(len(samples), img_size) if self.rgb and cache and not big else None

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)  # a plain index is epoch 0
        # NOTE(impl): one generator per (seed, epoch, index): no repeats across workers, exact resume, no global RNG touched.
        rng = np.random.default_rng([self.seed, int(epoch), int(i)])
        S = self.img_size
        if self.rgb:
            pair = self._cache.get(i) if self._cache is not None else None
            if pair is None:
                img, lab = self.samples[i].load()  # image and mask resized to S each on its own
                pair = _resize_rgb(img, S), _resize_rgb_label(lab, S)
                if self._cache is not None:
                    self._cache.put(i, *pair)
            img, lab = _augment(*pair, rng) if self.augment else pair
        else:
            img, lab = self.samples[i].load()
            lab = lab.astype(np.uint8)  # class ids < 256; PIL and zoom are faster on bytes
            if self.augment:  # TransUNet: augment at the native size, then resize
                img, lab = _augment(img, lab, rng)
            img, lab = _resize_gray(img, S), _resize_gray_label(lab, S)
        return _to_input(img, self.mean, self.std), torch.from_numpy(lab.astype(np.int64))

# -----------------------------------------------------------------------------
# top level: the public functions


def default_root(name):
    """Where a dataset is looked for when --root is not given."""
    return os.path.join('data', name)


def get_spec(name, root=None, num_classes=None):
    """The DatasetSpec of --data NAME: fixed for the benchmarks, read from ROOT for 'folder' and 'nnunet'."""
    if name in SPECS:
        if num_classes not in (None, SPECS[name].num_classes):
            raise DataError(f'num_classes={num_classes} (--num-classes): {name} has {SPECS[name].num_classes} classes')
        return SPECS[name]
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}' (--data): expected one of {', '.join(DATASETS)}")
    if num_classes is not None and (type(num_classes) is not int or num_classes < 2):
        raise DataError(f'num_classes={num_classes!r} (--num-classes): expected an integer >= 2 (background included)')
    return (_folder_spec if name == 'folder' else _nnunet_spec)(Path(root), num_classes)


def spec_to_dict(spec):
    """A DatasetSpec as plain types, for checkpoints."""
    return asdict(spec)


def spec_from_dict(d):
    """The DatasetSpec a checkpoint recorded (tuples restored; unknown keys refused)."""
    names = {f.name for f in fields(DatasetSpec)}
    if not isinstance(d, dict) or set(d) - names:
        raise DataError(f'dataset spec: expected a dict with keys {sorted(names)}, got {d!r:.200}')
    return DatasetSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def train_set(name, root, img_size, *, val_cases=None, seed=0, augment=True, label_map='transunet',
              num_classes=None, mean=MEAN, std=STD, cache=True):
    """Training items of a dataset, without the cases held out for validation (val_cases=0: none held out)."""
    if not isinstance(img_size, int) or img_size < 8:
        raise DataError(f'img_size={img_size!r} (--img-size): expected an integer >= 8')
    spec = get_spec(name, root, num_classes)
    source = _source(spec, root, label_map)
    samples = source.train()
    held = _held_out(source, samples, val_cases, seed)
    ds = TrainSet([s for s in samples if s.case not in held], spec, img_size, seed=seed, augment=augment, mean=mean,
                  std=std, cache=cache)
    ds.samples[0].load()  # fail here, with the file's name, rather than inside a loader worker
    return ds


def eval_cases(name, root, split, *, val_cases=None, seed=0, label_map='transunet', num_classes=None):
    """Whole cases as stored: split 'val' (held-out training cases, official, or none for val_cases=0) or 'test'."""
    if split not in ('val', 'test'):
        raise DataError(f"split '{split}' (--split): expected 'val' or 'test'")
    spec = get_spec(name, root, num_classes)
    source = _source(spec, root, label_map)
    if split == 'test':
        return CaseList(source.test())
    if val_cases == 0:
        return CaseList([])
    if val_cases is None and source.official_val:
        return CaseList(source.val())
    samples = source.train()
    held = _held_out(source, samples, val_cases, seed)
    kept = [s for s in samples if s.case in held]
    if spec.kind == 'image':
        return CaseList((s.case, s.load) for s in sorted(kept, key=lambda s: s.case))
    return CaseList(_volumes_from_slices(kept))


def make_loader(dataset, batch_size, *, shuffle, workers, sampler=None, drop_last=False):
    """A DataLoader that keeps the GPU fed: workers, pinned memory on CUDA, persistent workers."""
    if drop_last and len(dataset) < batch_size:
        raise DataError(f'batch size {batch_size} (--batch-size) is larger than the {len(dataset)} training samples')
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)

# -----------------------------------------------------------------------------
# top level: prediction I/O, files without labels in, label maps and overlays out


@dataclass
class Input:
    """A file to predict on: the image as the model's slices expect it, and what writing the result back needs."""
    id: str
    path: Path
    kind: str                 # 'volume': float32 (D,H,W) slices; 'image': uint8 RGB (H,W,3)
    image: np.ndarray
    raw: bool                 # True: normalise(image, intensity) before prepare_input; False: preprocessed already
    geometry: object = None   # NIfTI inputs: the nibabel image whose shape, affine and header the prediction takes
    label: np.ndarray = None  # the labels a preprocessed .npz/.h5 file carries, else None


INPUT_SUFFIXES = NIFTI_SUFFIXES + ('.npy.h5', '.h5', '.npz') + IMAGE_SUFFIXES


def read_input(path):
    """One image (.png .jpg .jpeg .bmp .tif .tiff), raw NIfTI volume (.nii .nii.gz) or preprocessed .npz/.h5 file."""
    path = Path(path)
    suffix = next((x for x in INPUT_SUFFIXES if path.name.lower().endswith(x)), None)
    if suffix is None:
        raise DataError(f'{path}: unsupported file type; expected one of {", ".join(INPUT_SUFFIXES)}')
    cid = path.name[:-len(suffix)]
    if suffix in IMAGE_SUFFIXES:  # RGB or grayscale -> uint8 RGB
        return Input(cid, path, 'image', _read_image(path, 'RGB'), raw=True)
    if suffix in NIFTI_SUFFIXES:  # sliced as the training volumes were (_voxel_order)
        a, img = _read_nifti(path)
        return Input(cid, path, 'volume', _voxel_order(a.astype(np.float32)), raw=True, geometry=img)
    arrays = _read_arrays(path)
    key = next((k for k in ('image', 'img') if k in arrays), None)
    if key is None or arrays[key].ndim not in (2, 3):
        raise DataError(f'{path}: expected a 2-D or 3-D array image (or img), found {list(arrays)}')
    image, label = (_pair(arrays[key], arrays['label'], path, 256, None) if 'label' in arrays
                    else (arrays[key].astype(np.float32), None))
    if image.ndim == 2:  # one slice: a volume of depth 1
        image, label = image[None], None if label is None else label[None]
    return Input(cid, path, 'volume', image, raw=False, label=label)


def _overlay(base, pred, gt=None):
    """The prediction filled at 40% in its class colours over an RGB image; the ground truth's outline in green."""
    colour = PALETTE[pred % len(PALETTE)].astype(np.float32)
    alpha = np.where(pred > 0, 0.4, 0.0)[..., None]
    over = np.asarray(base, np.float32) * (1 - alpha) + colour * alpha
    if gt is not None:
        fg = np.asarray(gt) > 0
        over[fg ^ ndimage.binary_erosion(fg, iterations=2)] = (0, 255, 0)
    return over.clip(0, 255).astype(np.uint8)


def _write_volume(out, case_id, image, labels, geometry, label):
    """<id>_pred.nii.gz in the input's geometry, or (no geometry) with _img/_gt beside it on an identity affine."""
    if geometry is not None:  # shape, affine and header of the input: it overlays the input in ITK-SNAP / 3D Slicer
        header = geometry.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)  # class ids, never rescaled
        lab = _voxel_order(np.asarray(labels, np.uint8)).reshape(geometry.shape)
        nib.save(type(geometry)(lab, geometry.affine, header), str(out / f'{case_id}_pred.nii.gz'))
        return [out / f'{case_id}_pred.nii.gz']
    # NOTE(impl): .h5/.npz files carry no geometry: identity affine, (D,H,W) written back as NIfTI (X,Y,Z) = (W,H,D).
    paths = []
    for suffix, arr, dtype in (('pred', labels, np.uint8), ('img', image, np.float32), ('gt', label, np.uint8)):
        if arr is not None:  # image and ground truth beside the prediction, so a viewer can overlay them
            paths.append(out / f'{case_id}_{suffix}.nii.gz')
            nib.save(nib.Nifti1Image(_voxel_order(np.asarray(arr, dtype)), np.eye(4)), str(paths[-1]))
    return paths


def _volume_overlays(out, case_id, image, labels, label):
    """PNG overlays of the slices through the largest predicted structures (one per class, largest first)."""
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    picks = []
    for c in ids[np.argsort(-counts)]:
        k = int((labels == c).sum(axis=(1, 2)).argmax())  # the slice where class c is largest
        picks += [k] if k not in picks else []
        if len(picks) == OVERLAY_SLICES:
            break
    lo, hi = np.percentile(image, (0.5, 99.5))
    paths = []
    for k in sorted(picks) or [len(labels) // 2]:
        gray = (np.clip(image[k], lo, hi) - lo) / max(float(hi - lo), 1e-8) * 255  # (H,W) in [0, 255]
        paths.append(out / f'{case_id}_overlay_z{k:03d}.png')
        Image.fromarray(_overlay(np.repeat(gray[..., None], 3, 2), labels[k], None if label is None else label[k])
                        ).save(paths[-1])
    return paths


def _write_image(out, case_id, image, labels, label):
    """<id>_pred.png (the class ids themselves) and <id>_overlay.png, both at the label map's size."""
    # NOTE(impl): <id>_pred.png holds class ids, not ids scaled for viewing (it stays a label map); the overlay is for looking.
    Image.fromarray(labels.astype(np.uint8)).save(out / f'{case_id}_pred.png')
    if image.shape[:2] != labels.shape:  # an image stored smaller than its mask (ISIC): shown at the mask's size
        image = np.array(Image.fromarray(image).resize(labels.shape[::-1], Image.BILINEAR))
    Image.fromarray(_overlay(image, labels, label)).save(out / f'{case_id}_overlay.png')
    return [out / f'{case_id}_pred.png', out / f'{case_id}_overlay.png']


def write_prediction(out_dir, case_id, image, labels, spec, geometry=None, label=None):
    """Write one predicted label map (volume (D,H,W) or image (H,W)) where a viewer opens it; returns the paths.

    Volumes: <id>_pred.nii.gz (+ PNG overlays); images: <id>_pred.png + <id>_overlay.png; labels.json beside."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'labels.json').write_text(json.dumps(dict(enumerate(spec.class_names)), indent=1) + '\n')
    labels = np.asarray(labels)
    if labels.ndim == 3:
        return (_write_volume(out, case_id, image, labels, geometry, label)
                + _volume_overlays(out, case_id, np.asarray(image, np.float32), labels, label))
    return _write_image(out, case_id, np.asarray(image), labels, label)


# -----------------------------------------------------------------------------
# top level: the synthetic demo set


def _blob(yy, xx, cy, cx, ry, rx, theta, harm):
    """Inside of an ellipse with a wavy outline (harmonics 2 and 3), rotated by theta; yy, xx in [0,1]."""
    S, r = yy.shape[0], max(ry, rx) * (1 + harm[0] + harm[2])
    y0, y1 = (np.clip([cy - r, cy + r], 0, 1) * (S - 1)).astype(int) + (0, 2)  # only the bounding box
    x0, x1 = (np.clip([cx - r, cx + r], 0, 1) * (S - 1)).astype(int) + (0, 2)
    dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
    u = (np.cos(theta) * dy + np.sin(theta) * dx) / ry
    v = (-np.sin(theta) * dy + np.cos(theta) * dx) / rx
    phi = np.arctan2(v, u)
    edge = 1 + harm[0] * np.sin(2 * phi + harm[1]) + harm[2] * np.sin(3 * phi + harm[3])
    inside = np.zeros(yy.shape, bool)
    inside[y0:y1, x0:x1] = u * u + v * v < edge * edge
    return inside


def _demo_volume(rng):
    """One synthetic abdominal volume: image float32 (D,S,S) about in [0,1], label uint8 (D,S,S)."""
    D, S = DEMO_SLICES, DEMO_SIZE
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / (S - 1)  # (S,S) each, in [0,1]
    tissue = np.zeros((D, S, S), np.uint8)
    shift = rng.uniform(-DEMO_JITTER, DEMO_JITTER, 2)
    params = {}
    for t, (cy, cx, ry, rx, zc, zh, _, _) in DEMO_TISSUES.items():
        j = rng.uniform(-DEMO_JITTER, DEMO_JITTER, 2) if t < 9 else np.zeros(2)
        params[t] = (cy + shift[0] + j[0], cx + shift[1] + j[1], ry * rng.uniform(0.85, 1.15),
                     rx * rng.uniform(0.85, 1.15), zc + rng.uniform(-0.08, 0.08), zh,
                     rng.uniform(-0.3, 0.3), (rng.uniform(0, 0.12), rng.uniform(0, 6.3), rng.uniform(0, 0.08),
                                              rng.uniform(0, 6.3)), rng.uniform(-0.05, 0.05, 2))
    for d, z in enumerate(np.linspace(0, 1, D)):
        for t, (cy, cx, ry, rx, zc, zh, theta, harm, drift) in params.items():  # later tissues lie on top
            f = 1 - ((z - zc) / zh) ** 2
            if f < 0.1:  # the organ's z-extent ends: no slivers thinner than ~30% of its radius
                continue
            f = np.sqrt(f)
            centre = cy + drift[0] * (z - zc), cx + drift[1] * (z - zc)
            tissue[d][_blob(yy, xx, *centre, ry * f, rx * f, theta, harm)] = t
    lut = np.zeros((11, 2), np.float32)  # tissue -> (intensity, texture amplitude)
    for t, p in DEMO_TISSUES.items():
        lut[t] = (p[6] + (rng.uniform(-0.02, 0.02) if t < 9 else 0), p[7])
    texture = ndimage.gaussian_filter(rng.standard_normal((D, S, S)).astype(np.float32), (0.7, 1.2, 1.2))
    texture /= texture.std()
    image = lut[tissue, 0] + lut[tissue, 1] * texture
    image = ndimage.gaussian_filter(image, (0, 0.6, 0.6))  # partial-volume blur at the edges
    image = image * (1 + 0.05 * (yy - 0.5)) + DEMO_NOISE * rng.standard_normal((D, S, S))  # bias field, noise
    label = np.where(tissue < 9, tissue, 0).astype(np.uint8)
    return image.astype(np.float32), label


def make_demo(root, seed=0):
    """Write the synthetic set in Synapse's on-disk layout (npz slices, h5 volumes, lists); deterministic."""
    root = Path(root)
    for d in ('train_npz', 'test_vol_h5', 'lists_Synapse'):
        (root / d).mkdir(parents=True, exist_ok=True)
    train, test = [], []
    for c in range(DEMO_TRAIN_CASES + DEMO_TEST_CASES):
        name = f'case{c + 1:04d}'
        image, label = _demo_volume(np.random.default_rng([seed, c]))
        if c < DEMO_TRAIN_CASES:
            for k in range(DEMO_SLICES):  # float labels, as in TransUNet's files
                np.savez(root / 'train_npz' / f'{name}_slice{k:03d}.npz', image=image[k],
                         label=label[k].astype(np.float32))
                train.append(f'{name}_slice{k:03d}')
        else:
            with h5py.File(root / 'test_vol_h5' / f'{name}.npy.h5', 'w') as f:
                f.create_dataset('image', data=image)
                f.create_dataset('label', data=label.astype(np.float32))
            test.append(name)
    (root / 'lists_Synapse' / 'train.txt').write_text('\n'.join(train) + '\n')
    (root / 'lists_Synapse' / 'test_vol.txt').write_text('\n'.join(test) + '\n')
    return root

# -----------------------------------------------------------------------------
# CLI: benchmark, demo set, summary


def _bench(args):
    if args.data == 'demo' and not Path(args.root).exists():
        print(f'writing the demo set to {args.root}')
        make_demo(args.root)
    opts = dict(val_cases=args.val_cases, seed=args.seed, label_map=args.label_map, num_classes=args.num_classes)
    ds = train_set(args.data, args.root, args.img_size, **opts)
    n = min(len(ds), args.batches * args.batch_size)
    sub = torch.utils.data.Subset(ds, range(n))  # the same samples twice: cold, then (RGB sets) cached
    plain = train_set(args.data, args.root, args.img_size, cache=False, **opts)
    t0 = time.perf_counter()
    for i in range(min(n, 20)):
        plain[i]
    one = (time.perf_counter() - t0) / min(n, 20)
    print(f'{args.data} at {args.root}: {len(ds)} training samples, img_size {args.img_size}; '
          f'one sample in this process: {one * 1e3:.1f} ms')
    torch.manual_seed(args.seed)
    loader = make_loader(sub, args.batch_size, shuffle=True, workers=args.workers, drop_last=False)
    for p in ('first pass', 'second pass'):
        t0, count = time.perf_counter(), 0
        for x, y in loader:
            count += len(x)
        dt = time.perf_counter() - t0
        print(f'DataLoader, {args.workers} workers, batch {args.batch_size}, {p} over {count} samples: '
              f'{count / dt:.1f} samples/s')


def _summary(args):
    opts = dict(val_cases=args.val_cases, seed=args.seed, label_map=args.label_map, num_classes=args.num_classes)
    spec = get_spec(args.data, args.root, args.num_classes)
    ds = train_set(args.data, args.root, args.img_size, **opts)
    print(f'{spec.name}: {spec.num_classes} classes {spec.class_names}, {spec.kind}s, intensity {spec.intensity}')
    print(f'train: {len(ds)} samples from {len(ds.cases)} cases')
    for split in ('val', 'test'):
        try:
            cases = eval_cases(args.data, args.root, split, **opts)
            print(f'{split}: {len(cases)} cases ({", ".join(cases.ids[:4])}{", ..." if len(cases) > 4 else ""})')
        except DataError as e:
            print(f'{split}: not available ({e})')


def main(argv=None):
    p = argparse.ArgumentParser(description='DANIE datasets (Sec. 4.1): summary, loader benchmark, demo set.')
    # what to do
    p.add_argument('--bench', action='store_true', help='measure training samples/s through the DataLoader')
    p.add_argument('--make-demo', metavar='DIR', help="write the synthetic demo set (Synapse's layout) to DIR")
    # which data
    p.add_argument('--data', default='demo', choices=DATASETS, help='dataset (default: demo)')
    p.add_argument('--root', help='dataset folder (default: data/<name>)')
    p.add_argument('--label-map', default='transunet', choices=LABEL_MAPS,
                   help="Synapse labels: TransUNet's 9 ids, or CASCADE's 13 BTCV labels remapped")
    p.add_argument('--val-cases', type=parse_val_cases,
                   help='training cases held out for validation: a count or a fraction '
                   '(default: the official split, else 10%%)')
    p.add_argument('--seed', type=int, default=0, help='seed of the validation split and the benchmark')
    p.add_argument('--num-classes', type=int,
                   help='classes of --data folder without a classes.txt (background included)')
    # loading
    p.add_argument('--img-size', type=int, default=224,
                   help="model input size (default 224, the ImageNet MaxViT's; the paper does not state it)")
    p.add_argument('--workers', type=int, default=2, help='DataLoader worker processes')
    p.add_argument('--batch-size', type=int, default=24, help='batch size of the benchmark (Sec. 4.2: Synapse 24)')
    p.add_argument('--batches', type=int, default=20, help='batches per benchmark pass')
    args = p.parse_args(argv)
    args.root = args.root or default_root(args.data)
    if args.workers < 0 or args.batch_size < 1 or args.batches < 1:
        p.error('--workers must be >= 0, --batch-size and --batches >= 1')
    try:
        if args.make_demo:
            t0 = time.perf_counter()
            make_demo(args.make_demo, seed=args.seed)
            print(f'wrote the demo set to {args.make_demo} in {time.perf_counter() - t0:.1f} s')
        elif args.bench:
            _bench(args)
        else:
            _summary(args)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
