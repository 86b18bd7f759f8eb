"""Tests of data.py: every public layout read from tiny fixtures written here, splits, augmentation, errors,
the demo set. CPU only, offline; `python -m pytest -q test_data.py`."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataError

torch.set_num_threads(1)  # tiny tensors: more threads only add overhead, and stall badly on a loaded machine

REAL_ISIC2017 = Path(os.environ.get('ISIC2017_ROOT', 'data/isic2017_train'))  # the real training folder, if present


# ---- fixtures: tiny datasets in the public layouts

def slice_image(label):
    """An image whose pixel values encode the label (0.1 per class id), so alignment can be checked."""
    return (0.1 * label).astype(np.float32)


def organ_labels(rng, shape, ids):
    lab = np.zeros(shape, np.float32)
    h, w = shape
    for k, c in enumerate(ids):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        lab[y:y + 4, x:x + 4] = c
    return lab


def write_synapse(root, n_cases=4, n_slices=3, size=16, test_cases=2, ids=range(1, 9), lists=True, seed=0):
    """TransUNet's layout: float labels in npz slices and h5 volumes; returns {case: (image, label) volumes}."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / 'train_npz').mkdir(parents=True)
    (root / 'test_vol_h5').mkdir()
    vols, train, test = {}, [], []
    for c in range(n_cases + test_cases):
        name = f'case{c + 1:04d}'
        lab = np.stack([organ_labels(rng, (size, size), ids) for _ in range(n_slices)])
        img = slice_image(lab) + rng.normal(0, 0.01, lab.shape).astype(np.float32)
        vols[name] = (img, lab)
        if c < n_cases:
            for k in range(n_slices):
                np.savez(root / 'train_npz' / f'{name}_slice{k:03d}.npz', image=img[k], label=lab[k])
                train.append(f'{name}_slice{k:03d}')
        else:
            with h5py.File(root / 'test_vol_h5' / f'{name}.npy.h5', 'w') as f:
                f['image'], f['label'] = img, lab
            test.append(name)
    if lists:
        (root / 'lists_Synapse').mkdir()
        # slices listed in reverse order: volumes must still be stacked by slice number
        (root / 'lists_Synapse' / 'train.txt').write_text('\n'.join(train[::-1]) + '\n')
        (root / 'lists_Synapse' / 'test_vol.txt').write_text('\n'.join(test) + '\n')
    return vols


def save_rgb(path, arr):
    Image.fromarray(arr.astype(np.uint8)).save(path)


def lesion(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 255
    return m


def write_isic2017(root, splits=('Training', 'Validation', 'Test_v2'), n=3, img_hw=(20, 24), mask_hw=(40, 48)):
    """Official ISIC 2017 folders; images smaller than their masks (as in the real copies); superpixel files."""
    root = Path(root)
    for s, part in enumerate(splits):
        di, dm = root / f'ISIC-2017_{part}_Data', root / f'ISIC-2017_{part}_Part1_GroundTruth'
        di.mkdir(parents=True)
        dm.mkdir()
        for i in range(n):
            cid = f'ISIC_{s:02d}{i:05d}'
            save_rgb(di / f'{cid}.jpg', np.full(img_hw + (3,), 100 + 20 * i))
            save_rgb(di / f'{cid}_superpixels.png', np.zeros(img_hw + (3,)))
            Image.fromarray(lesion(*mask_hw, 10, 12, 30, 36)).save(dm / f'{cid}_segmentation.png')
        (di / f'ISIC-2017_{part}_Data_metadata.csv').write_text('image_id,age\n')
    return root


# ---- specs

def test_specs_are_consistent_and_synapse_reports_in_table1_order():
    for name, spec in data.SPECS.items():
        assert spec.name == name and spec.class_names[0] == 'background'
        assert spec.num_classes == len(spec.class_names)
        assert all(0 < c < spec.num_classes for c in spec.report_order)
    syn = data.SPECS['synapse']
    assert [syn.class_names[c] for c in syn.report_order] == [
        'aorta', 'gallbladder', 'kidney_l', 'kidney_r', 'liver', 'pancreas', 'spleen', 'stomach']
    assert (syn.epochs, syn.batch_size, syn.lr, syn.weight_decay) == (300, 24, 1e-4, 1e-4)  # Sec. 4.2
    assert {s.weight_decay for s in data.SPECS.values()} == {1e-4}
    assert (data.SPECS['acdc'].epochs, data.SPECS['acdc'].batch_size) == (400, 12)
    assert data.SPECS['demo'].class_names == syn.class_names
    assert data.default_root('synapse') == os.path.join('data', 'synapse')


# ---- Synapse

def test_synapse_train_items_val_volumes_and_float_labels_in_h5(tmp_path):
    vols = write_synapse(tmp_path)
    ds = data.train_set('synapse', tmp_path, 32, val_cases=1, augment=False)
    assert len(ds) == 3 * 3 and len(ds.cases) == 3
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.shape == (32, 32) and y.dtype == torch.int64
    val = data.eval_cases('synapse', tmp_path, 'val', val_cases=1)
    assert len(val) == 1 and val[0].id not in ds.cases
    img, lab = vols[val[0].id]
    case = val[0]
    assert case.image.dtype == np.float32 and case.label.dtype == np.int64
    np.testing.assert_array_equal(case.image, img)  # stacked by slice number, whatever the list order
    np.testing.assert_array_equal(case.label, lab.astype(np.int64))
    test = data.eval_cases('synapse', tmp_path, 'test')
    assert test.ids == ['case0005', 'case0006']
    np.testing.assert_array_equal(test[1].label, vols['case0006'][1].astype(np.int64))  # h5 float labels cast
    assert test[1].image.shape == (3, 16, 16) and len(test[:1]) == 1


def test_synapse_without_lists_uses_all_files(tmp_path):
    write_synapse(tmp_path, lists=False)
    assert len(data.train_set('synapse', tmp_path, 16, val_cases=0)) == 12
    assert data.eval_cases('synapse', tmp_path, 'test').ids == ['case0005', 'case0006']


def test_cascade_13_label_files_are_remapped_to_transunet_ids(tmp_path):
    raw = np.arange(14, dtype=np.float32).repeat(2).reshape(4, 7)  # every BTCV label 0..13
    (tmp_path / 'train_npz').mkdir()
    np.savez(tmp_path / 'train_npz' / 'case0001_slice000.npz', image=np.zeros((4, 7), np.float32), label=raw)
    np.savez(tmp_path / 'train_npz' / 'case0002_slice000.npz', image=np.zeros((4, 7), np.float32), label=raw)
    case = data.eval_cases('synapse', tmp_path, 'val', val_cases=1, label_map='cascade')[0]
    got = dict(zip(raw.ravel().astype(int), case.label.ravel()))
    # spleen, kidneys, gallbladder keep 1-4; liver 6->5, stomach 7->6, aorta 8->7, pancreas 11->8; the rest 0
    assert got == {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 0, 6: 5, 7: 6, 8: 7, 9: 0, 10: 0, 11: 8, 12: 0, 13: 0}
    with pytest.raises(DataError, match="label 13 outside the 9 classes.*label_map='cascade'"):
        data.train_set('synapse', tmp_path, 16, val_cases=0)


# ---- ACDC, both public formats

def test_acdc_mtunet_npz_format(tmp_path):
    rng = np.random.default_rng(1)
    for d in ('train', 'valid', 'test', 'lists_ACDC'):
        (tmp_path / d).mkdir()
    lists = {'train': [], 'valid': [], 'test': []}
    for split, cases in (('train', (1, 2, 3)), ('valid', (19,))):
        for c in cases:
            for ph in ('ED', 'ES'):
                for k in range(2):
                    name = f'case_{c:03d}_slice{ph}_{k}.npz'
                    lab = rng.integers(0, 4, (20, 14)).astype(np.float32)  # native, non-square size
                    np.savez(tmp_path / split / name, img=slice_image(lab), label=lab)
                    lists[split].append(name)
    lab = rng.integers(0, 4, (5, 20, 14)).astype(np.float32)
    np.savez(tmp_path / 'test' / 'case_002_volume_ED.npz', img=slice_image(lab), label=lab)
    lists['test'].append('case_002_volume_ED.npz')
    for split, names in lists.items():
        (tmp_path / 'lists_ACDC' / f'{split}.txt').write_text('\n'.join(names))
    ds = data.train_set('acdc', tmp_path, 24)
    assert len(ds) == 12 and ds.cases == ['case_001', 'case_002', 'case_003']  # official valid is not trained on
    assert ds[0][0].shape == (3, 24, 24) and ds[0][1].max() <= 3
    val = data.eval_cases('acdc', tmp_path, 'val')
    assert val.ids == ['case_019_volume_ED', 'case_019_volume_ES'] and val[0].image.shape == (2, 20, 14)
    test = data.eval_cases('acdc', tmp_path, 'test')[0]
    assert test.id == 'case_002_volume_ED' and test.image.shape == (5, 20, 14)
    np.testing.assert_array_equal(test.label, lab.astype(np.int64))
    # held out by patient: ED and ES of a patient stay on one side
    held = data.eval_cases('acdc', tmp_path, 'val', val_cases=1)
    kept = data.train_set('acdc', tmp_path, 24, val_cases=1)
    patient = held.ids[0][:8]
    assert len(held) == 2 and {i[:8] for i in held.ids} == {patient} and patient not in kept.cases


def test_acdc_ssl4mis_h5_format(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / 'data' / 'slices').mkdir(parents=True)
    train, labs = [], {}
    for p in (1, 2):
        for k in range(11):  # unpadded numbers: slice_10 sorts before slice_2 as a string
            name = f'patient{p:03d}_frame01_slice_{k}'
            labs[p, k] = lab = rng.integers(0, 4, (18, 22)).astype(np.uint8)
            with h5py.File(tmp_path / 'data' / 'slices' / f'{name}.h5', 'w') as f:
                f['image'], f['label'] = slice_image(lab).astype(np.float64), lab
            train.append(name)
    vol = rng.integers(0, 4, (3, 18, 22)).astype(np.uint8)
    for name in ('patient090_frame01', 'patient100_frame12'):
        with h5py.File(tmp_path / 'data' / f'{name}.h5', 'w') as f:
            f['image'], f['label'], f['scribble'] = slice_image(vol), vol, vol
    (tmp_path / 'train_slices.list').write_text('\n'.join(sorted(train)) + '\n')
    (tmp_path / 'val.list').write_text('patient090_frame01\n')
    (tmp_path / 'test.list').write_text('patient100_frame12\n')
    ds = data.train_set('acdc', tmp_path, 32, augment=False)
    assert len(ds) == 22 and ds.cases == ['patient001', 'patient002']
    assert data.eval_cases('acdc', tmp_path, 'val').ids == ['patient090_frame01']
    case = data.eval_cases('acdc', tmp_path, 'test')[0]
    assert case.image.dtype == np.float32 and case.image.shape == (3, 18, 22)
    np.testing.assert_array_equal(case.label, vol)
    held = data.eval_cases('acdc', tmp_path, 'val', val_cases=1)
    assert held.ids == ['patient001_frame01'] and held[0].image.shape == (11, 18, 22)
    np.testing.assert_array_equal(held[0].label, np.stack([labs[1, k] for k in range(11)]))  # by slice number
    assert data.train_set('acdc', tmp_path, 32, val_cases=1).cases == ['patient002']


# ---- ISIC 2017, ISIC 2018, GlaS

def test_isic2017_pairs_by_id_skips_superpixels_and_keeps_image_as_stored(tmp_path):
    write_isic2017(tmp_path)
    ds = data.train_set('isic2017', tmp_path, 32)
    assert len(ds) == 3 and not any('superpixels' in c for c in ds.cases)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and set(y.unique().tolist()) == {0, 1}
    val = data.eval_cases('isic2017', tmp_path, 'val')
    test = data.eval_cases('isic2017', tmp_path, 'test')
    assert len(val) == 3 and len(test) == 3 and val.ids[0] == 'ISIC_0100000'
    case = test[2]
    assert case.image.shape == (20, 24, 3) and case.image.dtype == np.uint8  # as stored, smaller than its mask
    assert case.label.shape == (40, 48) and case.label.dtype == np.int64 and case.label.sum() == 20 * 24
    assert abs(int(case.image[10, 10, 0]) - 140) <= 2


def test_isic2017_without_validation_folder_trains_and_needs_val_cases(tmp_path):
    write_isic2017(tmp_path, splits=('Training',), n=5)
    assert len(data.train_set('isic2017', tmp_path, 16)) == 5
    with pytest.raises(DataError, match='ISIC-2017_Validation_Data.*val_cases'):
        data.eval_cases('isic2017', tmp_path, 'val')
    with pytest.raises(DataError, match='Test_v2'):
        data.eval_cases('isic2017', tmp_path, 'test')
    held = data.eval_cases('isic2017', tmp_path, 'val', val_cases=2)
    kept = data.train_set('isic2017', tmp_path, 16, val_cases=2)
    assert len(held) == 2 and len(kept) == 3 and not set(held.ids) & set(kept.cases)


def test_isic2018_paper_split_over_sorted_names(tmp_path):
    names = [f'ISIC_{i:07d}' for i in np.random.default_rng(0).permutation(2594)]
    tr, va, te = data.isic2018_split(names)
    assert (len(tr), len(va), len(te)) == (1815, 259, 520)
    assert tr + va + te == sorted(names)
    # the folder: empty files suffice, nothing is read while listing
    di, dm = tmp_path / 'ISIC2018_Task1-2_Training_Input', tmp_path / 'ISIC2018_Task1_Training_GroundTruth'
    di.mkdir()
    dm.mkdir()
    for n in names:
        (di / f'{n}.jpg').touch()
        (dm / f'{n}_segmentation.png').touch()
    (di / 'ATTRIBUTION.txt').touch()
    assert data.eval_cases('isic2018', tmp_path, 'val').ids == va
    assert data.eval_cases('isic2018', tmp_path, 'test').ids == te
    held = data.eval_cases('isic2018', tmp_path, 'val', val_cases=100).ids  # out of the paper's training part
    assert len(held) == 100 and set(held) <= set(tr)
    with pytest.raises(DataError, match='ISIC_0000000.jpg: unreadable or corrupt image'):
        data.train_set('isic2018', tmp_path, 16)  # listing works; the first image is then read and is empty


def test_glas_bmp_instances_and_test_is_testA_plus_testB(tmp_path):
    d = tmp_path / 'Warwick QU Dataset (Released 2016_07_08)'
    d.mkdir()
    inst = np.zeros((12, 16), np.uint8)
    inst[2:5, 2:6], inst[7:10, 8:14] = 1, 3  # instance ids, not 0/255
    for prefix, numbers in (('train', (1, 2, 3)), ('testA', (1, 2, 10)), ('testB', (1,))):
        for i in numbers:
            save_rgb(d / f'{prefix}_{i}.bmp', np.full((12, 16, 3), 200))
            Image.fromarray(inst).save(d / f'{prefix}_{i}_anno.bmp')
    (d / 'Grade.csv').write_text('name,grade\n')
    ds = data.train_set('glas', tmp_path, 16, val_cases=1)  # root may be the folder's parent
    assert len(ds) == 2
    test = data.eval_cases('glas', tmp_path, 'test')
    assert test.ids == ['testA_1', 'testA_2', 'testA_10', 'testB_1']  # by number, not as strings
    assert test[0].label.sum() == 12 + 18 and test[0].label.max() == 1 and test[0].image.shape == (12, 16, 3)


# ---- the validation split

def test_casewise_validation_split_is_deterministic_and_never_leaks(tmp_path):
    write_synapse(tmp_path, n_cases=10, n_slices=2, size=8)
    val = data.eval_cases('synapse', tmp_path, 'val')
    assert val.ids == ['case0005']  # default 10% of 10 cases
    for seed in (0, 1, 2):  # --seed changes initialisation and sampling, never the held-out cases
        train_cases = {s.case for s in data.train_set('synapse', tmp_path, 8, seed=seed).samples}
        assert train_cases == {f'case{c:04d}' for c in range(1, 11)} - set(val.ids)
    assert len(data.eval_cases('synapse', tmp_path, 'val', val_cases=3)) == 3
    assert len(data.eval_cases('synapse', tmp_path, 'val', val_cases=0.25)) == 3  # fraction, rounded half up
    assert len(data.train_set('synapse', tmp_path, 8, val_cases=0)) == 20
    with pytest.raises(DataError, match='val_cases=10 holds out 10 of the 10'):
        data.train_set('synapse', tmp_path, 8, val_cases=10)
    assert len(data.eval_cases('synapse', tmp_path, 'val', val_cases=0)) == 0  # no validation: all 10 train


SYNAPSE_TRAIN = (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40)  # TransUNet's 18 cases


def test_synapse_holds_out_the_same_two_cases_for_every_seed(tmp_path):
    (tmp_path / 'train_npz').mkdir()
    lab = np.zeros((4, 4), np.float32)
    for c in SYNAPSE_TRAIN:
        np.savez(tmp_path / 'train_npz' / f'case{c:04d}_slice000.npz', image=lab, label=lab)
    held = ['case0007', 'case0028']  # a seed-dependent draw gives case0006 and case0031 for seed 1
    assert data.eval_cases('synapse', tmp_path, 'val').ids == held
    for seed in (1, 0):
        assert data.train_set('synapse', tmp_path, 8, seed=seed).cases == sorted(
            {f'case{c:04d}' for c in SYNAPSE_TRAIN} - set(held))


def test_the_seeded_test_split_is_the_same_for_every_seed(tmp_path):
    root = write_folder(tmp_path / 'f', n=12)  # no test list: 20% of the 12 images, then 2 held out
    for seed in (3, 0):  # a seed other than the default first
        ds = data.train_set('folder', root, 8, val_cases=2, seed=seed, augment=False)
        assert data.eval_cases('folder', root, 'test').ids == ['img7', 'img10']
        assert data.eval_cases('folder', root, 'val', val_cases=2).ids == ['img3', 'img5']
        assert [s.id for s in ds.samples] == ['img0', 'img1', 'img2', 'img4', 'img6', 'img8', 'img9', 'img11']


def test_held_out_splits_do_not_depend_on_string_hashing(tmp_path):
    root = write_folder(tmp_path / 'f', n=12)
    code = ("import sys, data; r = sys.argv[1]; print(data.eval_cases('folder', r, 'test').ids, "
            "data.eval_cases('folder', r, 'val', val_cases=3).ids, "
            "[s.id for s in data.train_set('folder', r, 8, val_cases=3, cache=False).samples])")
    outs = {subprocess.run([sys.executable, '-c', code, str(root)], cwd=Path(__file__).parent, check=True,
                           env={**os.environ, 'PYTHONHASHSEED': h}, capture_output=True, text=True).stdout
            for h in ('0', '1', '2')}  # each process hashes strings with another seed
    here = (data.eval_cases('folder', root, 'test').ids, data.eval_cases('folder', root, 'val', val_cases=3).ids,
            [s.id for s in data.train_set('folder', root, 8, val_cases=3, cache=False).samples])
    assert outs == {' '.join(map(str, here)) + '\n'}


# ---- augmentation and the shared input path

def test_augmentation_keeps_labels_integer_and_aligned_grayscale(tmp_path):
    (tmp_path / 'train_npz').mkdir()
    lab = np.zeros((40, 40), np.float32)
    lab[4:20, 6:30], lab[24:36, 10:22], lab[22:38, 26:36] = 3, 5, 8  # asymmetric: every rot/flip differs
    np.savez(tmp_path / 'train_npz' / 'case0001_slice000.npz', image=slice_image(lab), label=lab)
    ds = data.train_set('synapse', tmp_path, 40, val_cases=0)
    seen = set()
    for epoch in range(40):
        x, y = ds[(epoch, 0)]
        assert y.dtype == torch.int64 and set(y.unique().tolist()) <= {0, 3, 5, 8}
        img = x[0].numpy() * data.STD[0] + data.MEAN[0]  # un-normalise: the image still encodes the label (0.1 per id)
        yy = y.numpy()
        assert (np.abs(img - 0.1 * yy) < 0.05).mean() > 0.9  # only edges blur (bilinear rotation)
        inner = np.ones_like(yy, bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                inner &= np.roll(yy, (dy, dx), (0, 1)) == yy
        np.testing.assert_allclose(img[inner], 0.1 * yy[inner], atol=1e-4)
        seen.add(yy.tobytes())
    assert len(seen) > 5  # augmentation did happen, in several different ways


def test_augmentation_keeps_rgb_masks_aligned(tmp_path):
    root = write_isic2017(tmp_path, splits=('Training',), n=1, img_hw=(32, 32), mask_hw=(32, 32))
    img_path = root / 'ISIC-2017_Training_Data' / 'ISIC_0000000.png'  # lossless image that encodes the mask
    mask = np.array(Image.open(root / 'ISIC-2017_Training_Part1_GroundTruth' / 'ISIC_0000000_segmentation.png'))
    (root / 'ISIC-2017_Training_Data' / 'ISIC_0000000.jpg').unlink()
    save_rgb(img_path, np.repeat(mask[..., None], 3, 2))
    ds = data.train_set('isic2017', root, 32)
    for epoch in range(30):
        x, y = ds[(epoch, 0)]
        assert y.dtype == torch.int64 and set(y.unique().tolist()) <= {0, 1}
        white = (x[0] * data.STD[0] + data.MEAN[0]).numpy()
        agree = ((white > 0.5) == (y.numpy() == 1)).mean()
        assert agree > 0.97  # only interpolated edge pixels may differ


def test_prepare_input_equals_the_unaugmented_training_input(tmp_path):
    write_synapse(tmp_path, size=20)
    ds = data.train_set('synapse', tmp_path, 32, val_cases=0, augment=False)
    case = data.eval_cases('synapse', tmp_path, 'val', val_cases=1)[0]
    idx = [i for i, s in enumerate(ds.samples) if s.case == case.id]
    idx.sort(key=lambda i: ds.samples[i].index)
    x = data.prepare_input(case.image, 32)
    assert x.shape == (3, 3, 32, 32)
    for k, i in enumerate(idx):
        assert torch.equal(x[k], ds[i][0])
    isic = write_isic2017(tmp_path / 'isic', splits=('Training',), n=2)
    ds = data.train_set('isic2017', isic, 24, augment=False)
    for _ in range(2):  # the second time from the cache
        case = data.eval_cases('isic2017', isic, 'val', val_cases=1)[0]
        i = ds.cases.index(case.id)
        assert torch.equal(data.prepare_input(case.image[None], 24)[0], ds[i][0])
    with pytest.raises(ValueError, match='expected float slices'):
        data.prepare_input(np.zeros((4, 4, 3), np.uint8), 8)


def write_identical_slices(root, n):
    """n identical Synapse training slices of one case: any difference between items comes from augmentation."""
    (root / 'train_npz').mkdir()
    lab = np.zeros((16, 16), np.float32)
    lab[2:9, 3:14] = 1
    for k in range(n):
        np.savez(root / 'train_npz' / f'case0001_slice{k:03d}.npz', image=slice_image(lab), label=lab)


def test_loader_workers_draw_different_augmentations(tmp_path):
    write_identical_slices(tmp_path, 16)
    ds = data.train_set('synapse', tmp_path, 16, val_cases=0)
    loader = data.make_loader(ds, 1, shuffle=False, workers=2, drop_last=False)
    assert loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()
    torch.manual_seed(0)
    ys = [y[0].numpy().tobytes() for _, y in loader]
    # items 2j and 2j+1 come from worker 0 and worker 1: with a shared seed they would all be equal
    assert sum(ys[2 * j] != ys[2 * j + 1] for j in range(8)) >= 3
    assert len(set(ys)) >= 4


def test_make_loader_batches(tmp_path):  # a batch larger than the data: train.py refuses it (test_bad_flags)
    write_synapse(tmp_path, n_cases=2, n_slices=2, size=8)
    ds = data.train_set('synapse', tmp_path, 8, val_cases=0)
    x, y = next(iter(data.make_loader(ds, 2, shuffle=True, workers=0, drop_last=True)))
    assert x.shape == (2, 3, 8, 8) and y.shape == (2, 8, 8)


# ---- bad input: each gives a DataError that names the file or flag and what was expected

def test_missing_root_says_what_layout_and_where_published(tmp_path):
    with pytest.raises(DataError, match=r"root '.*nowhere' not found.*train_npz.*github.com/Beckschen"):
        data.train_set('synapse', tmp_path / 'nowhere', 16)
    with pytest.raises(DataError, match='make-demo'):
        data.eval_cases('demo', tmp_path / 'nowhere', 'test')
    with pytest.raises(DataError, match='neither ACDC layout.*lists_ACDC.*slices'):
        data.train_set('acdc', tmp_path, 16)
    with pytest.raises(DataError, match="unknown dataset 'brats'"):
        data.train_set('brats', tmp_path, 16)


def test_list_naming_a_missing_file(tmp_path):
    write_synapse(tmp_path)
    with open(tmp_path / 'lists_Synapse' / 'train.txt', 'a') as f:
        f.write('case0099_slice000\n')
    with pytest.raises(DataError, match=r'train.txt names case0099_slice000, but .*case0099_slice000.npz does not'):
        data.train_set('synapse', tmp_path, 16)
    np.savez(tmp_path / 'train_npz' / 'case0099_slice0x.npz', image=np.zeros((4, 4)), label=np.zeros((4, 4)))
    (tmp_path / 'lists_Synapse' / 'train.txt').write_text('case0001_slice000\ncase0099_slice0x\n')
    with pytest.raises(DataError, match=r'case0099_slice0x.npz: a name that synapse does not use; expected .*'
                                        r'train_npz/<case>_slice<k>.npz'):
        data.train_set('synapse', tmp_path, 16)


def slice_file(path):
    np.savez(path, image=np.zeros((4, 4)), label=np.zeros((4, 4)))
    return path


@pytest.mark.parametrize('name', ['case0006.npz', 'case0005_slice001_1.npz', 'case0005_slice-1.npz',
                                  'case0005_slice+3.npz', '_slice003.npz'])
def test_a_slice_file_of_another_name_is_refused_listed_or_not(tmp_path, name):
    write_synapse(tmp_path, lists=False)  # a stray copy would be stacked into a volume as slice 121, or -1
    slice_file(tmp_path / 'train_npz' / name)
    with pytest.raises(DataError, match=rf'{re.escape(name)}: a name that synapse does not use'):
        data.eval_cases('synapse', tmp_path, 'val', val_cases=3)


@pytest.mark.parametrize('layout, name', [
    ('mtunet', 'case_001_sliceXX_3'), ('mtunet', 'case_001_sliceed_3'), ('mtunet', 'case1_sliceED_3'),
    ('ssl4mis', 'patient_001_frame01_slice_2'), ('ssl4mis', 'patient001_slice_2'),
    ('ssl4mis', '._patient001_frame01_slice_2'), ('ssl4mis', 'patient001_frame01_slice_1_2')])
def test_acdc_slice_names_give_patient_phase_and_number_or_are_refused(tmp_path, layout, name):
    folder, suffix = (tmp_path / 'train', '.npz') if layout == 'mtunet' else (tmp_path / 'data' / 'slices', '.h5')
    folder.mkdir(parents=True)
    (tmp_path / 'test').mkdir()
    good = 'case_001_sliceED_3' if layout == 'mtunet' else 'patient001_frame01_slice_3'
    for stem in (good, name):
        if layout == 'mtunet':
            np.savez(folder / f'{stem}.npz', img=np.zeros((4, 4)), label=np.zeros((4, 4)))
        else:
            with h5py.File(folder / f'{stem}.h5', 'w') as f:
                f['image'], f['label'] = np.zeros((4, 4)), np.zeros((4, 4))
    with pytest.raises(DataError, match=rf'{re.escape(name + suffix)}: a name that acdc does not use'):
        data.train_set('acdc', tmp_path, 16, val_cases=0)


@pytest.mark.parametrize('kind', ['npz', 'h5', 'jpg'])
def test_corrupt_file_is_named(tmp_path, kind):
    if kind == 'jpg':
        write_isic2017(tmp_path, splits=('Training',), n=1)
        bad = tmp_path / 'ISIC-2017_Training_Data' / 'ISIC_0000000.jpg'
        bad.write_bytes(b'\xff\xd8not a jpeg')
        call = lambda: data.train_set('isic2017', tmp_path, 16)  # noqa: E731
    else:
        write_synapse(tmp_path, lists=False)
        bad = tmp_path / ('train_npz/case0001_slice000.npz' if kind == 'npz' else 'test_vol_h5/case0005.npy.h5')
        bad.write_bytes(b'garbage')
        call = (lambda: data.train_set('synapse', tmp_path, 16, val_cases=0)) if kind == 'npz' else \
            (lambda: data.eval_cases('synapse', tmp_path, 'test')[0])
    with pytest.raises(DataError, match=f'{bad.name}: unreadable or corrupt'):
        call()


def test_bad_labels_are_refused(tmp_path):
    (tmp_path / 'train_npz').mkdir()
    lab = np.zeros((8, 8), np.float32)
    lab[0, 0] = 2.5
    np.savez(tmp_path / 'train_npz' / 'case0001_slice000.npz', image=lab, label=lab)
    with pytest.raises(DataError, match='case0001_slice000.npz: labels must be integers, found 2.5'):
        data.train_set('synapse', tmp_path, 8, val_cases=0)
    lab[0, 0] = 9  # one past the 9 classes of TransUNet's ids
    np.savez(tmp_path / 'train_npz' / 'case0001_slice000.npz', image=lab, label=lab)
    with pytest.raises(DataError, match='label 9 outside the 9 classes 0..8'):
        data.train_set('synapse', tmp_path, 8, val_cases=0)
    lab[0, 0] = 14
    np.savez(tmp_path / 'train_npz' / 'case0001_slice000.npz', image=lab, label=lab)
    with pytest.raises(DataError, match='raw label 14 outside the 13 BTCV labels'):
        data.train_set('synapse', tmp_path, 8, val_cases=0, label_map='cascade')
    with pytest.raises(DataError, match="label_map='cascade' is for Synapse"):
        data.train_set('demo', tmp_path, 8, label_map='cascade')


def test_no_samples_found_and_missing_mask(tmp_path):
    (tmp_path / 'train_npz').mkdir()
    with pytest.raises(DataError, match='no samples found: .*train_npz has no \\*.npz files'):
        data.train_set('synapse', tmp_path, 8)
    write_isic2017(tmp_path / 'isic', splits=('Training',), n=2)
    (tmp_path / 'isic' / 'ISIC-2017_Training_Part1_GroundTruth' / 'ISIC_0000001_segmentation.png').unlink()
    with pytest.raises(DataError, match='ISIC_0000001.jpg: no mask .*ISIC_0000001_segmentation.png'):
        data.train_set('isic2017', tmp_path / 'isic', 8)


def test_make_demo_never_writes_into_a_folder_it_did_not_make(tmp_path, capsys):
    real = tmp_path / 'synapse'  # a user's Synapse data, whose case names the demo's would overwrite
    write_synapse(real, n_cases=2, n_slices=1, size=8)
    before = {p: p.read_bytes() for p in real.rglob('*') if p.is_file()}
    with pytest.raises(SystemExit) as e:
        data.main(['--make-demo', str(real)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f'error: {real} holds files') and len(err.splitlines()) == 1
    assert {p: p.read_bytes() for p in real.rglob('*') if p.is_file()} == before  # untouched, nothing added
    data.main(['--make-demo', str(tmp_path / 'demo')])  # a new folder, then the same demo set again over it
    data.main(['--make-demo', str(tmp_path / 'demo')])
    assert (tmp_path / 'demo' / data.DEMO_MARK).is_file() and 'wrote the demo set' in capsys.readouterr().out


# ---- the synthetic demo set

def test_make_demo_reuse_keeps_a_finished_set_and_finishes_a_broken_one(tmp_path):
    root = data.make_demo(tmp_path / 'demo')
    first = root / 'train_npz' / 'case0001_slice000.npz'
    first.write_bytes(b'changed')  # a finished set is kept as it is
    data.make_demo(root, reuse=True)
    assert first.read_bytes() == b'changed'
    (root / 'lists_Synapse' / 'test_vol.txt').unlink()  # the list written last is missing: a write was cut short
    data.make_demo(root, reuse=True)
    assert np.load(first)['image'].shape == (data.DEMO_SIZE, data.DEMO_SIZE)
    assert (root / 'lists_Synapse' / 'test_vol.txt').is_file()


def test_demo_set_is_deterministic_in_synapse_layout_and_loads(tmp_path):
    a, b = data.make_demo(tmp_path / 'a'), data.make_demo(tmp_path / 'b')
    train = (a / 'lists_Synapse' / 'train.txt').read_text().split()
    test = (a / 'lists_Synapse' / 'test_vol.txt').read_text().split()
    assert len(train) == data.DEMO_TRAIN_CASES * data.DEMO_SLICES and len(test) == data.DEMO_TEST_CASES
    assert train[0] == 'case0001_slice000' and (a / 'train_npz' / f'{train[-1]}.npz').is_file()
    name = 'train_npz/case0003_slice006.npz'
    with np.load(a / name) as f, np.load(b / name) as g:
        assert f['label'].dtype == np.float32 and f['image'].shape == (data.DEMO_SIZE, data.DEMO_SIZE)
        np.testing.assert_array_equal(f['image'], g['image'])
        np.testing.assert_array_equal(f['label'], g['label'])
    other = data._demo_volume(np.random.default_rng([1, 2]))[0]  # another seed, another set
    assert other.shape == (data.DEMO_SLICES, data.DEMO_SIZE, data.DEMO_SIZE)
    with h5py.File(a / 'test_vol_h5' / f'{test[0]}.npy.h5') as f:
        img, lab = f['image'][()], f['label'][()]
    assert img.shape == lab.shape == other.shape and lab.dtype == np.float32
    assert not np.array_equal(img, other)
    assert set(np.unique(lab)) == set(range(9))  # all 8 organs of Synapse
    for k in range(1, 9):
        assert (lab == k).sum() > 100  # not too tiny to learn
    means = sorted(img[lab == k].mean() for k in range(1, 9))
    assert min(np.diff(means)) > 0.04  # each organ has its own intensity
    ds = data.train_set('demo', a, 32)
    assert len(ds) == (data.DEMO_TRAIN_CASES - 2) * data.DEMO_SLICES and ds[0][0].shape == (3, 32, 32)
    assert len(data.eval_cases('demo', a, 'val')) == 2 and len(data.eval_cases('demo', a, 'test')) == 3


# ---- the real ISIC 2017 training folder (when present): 256-px images, full-resolution masks

@pytest.mark.skipif(not REAL_ISIC2017.is_dir(), reason='real ISIC 2017 folder absent (set ISIC2017_ROOT)')
def test_real_isic2017_training_folder_loads():
    ds = data.train_set('isic2017', REAL_ISIC2017, 64, augment=False, cache=False)
    assert len(ds) == 2000 and ds.cases[0] == 'ISIC_0000000'
    held = data.eval_cases('isic2017', REAL_ISIC2017, 'val', val_cases=2)
    case = held[0]
    i = ds.cases.index(case.id)
    assert case.image.shape[:2] == (256, 256) != case.label.shape  # image as stored, mask at its full size
    assert set(np.unique(case.label)) == {0, 1} and 0.01 < case.label.mean() < 0.99
    x, y = ds[i]
    assert torch.equal(data.prepare_input(case.image[None], 64)[0], x)
    assert 0.01 < y.float().mean() < 0.99
    with pytest.raises(DataError, match='Validation'):
        data.eval_cases('isic2017', REAL_ISIC2017, 'val')


# ---- the interface other files use: specs, seeded items, no validation, the resize back

def test_get_spec_and_spec_dicts_round_trip():
    assert data.DATASETS[-2:] == ('folder', 'nnunet') and set(data.SPECS) < set(data.DATASETS)
    assert data.get_spec('synapse', 'nowhere') is data.SPECS['synapse']
    assert [data.SPECS[n].intensity for n in ('synapse', 'acdc', 'isic2017', 'glas')] == ['ct', 'mri', 'rgb', 'rgb']
    for spec in data.SPECS.values():
        d = dataclasses.asdict(spec)
        assert isinstance(d['class_names'], tuple) and data.spec_from_dict(d) == spec
        assert data.spec_from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}) == spec
        assert data.spec_from_dict(d | {'layout': 'ROOT/train_npz/*.npz'}) == spec  # a checkpoint that records it
    with pytest.raises(DataError, match="unknown dataset 'brats'"):
        data.get_spec('brats', 'x')
    with pytest.raises(DataError, match='synapse has 9 classes, but --num-classes gives 3'):
        data.get_spec('synapse', 'x', num_classes=3)
    with pytest.raises(DataError, match='dataset spec: expected a dict'):
        data.spec_from_dict({'name': 'x', 'colour': 1})


@pytest.mark.parametrize('kind', ['volume', 'image'])
def test_restore_size_equals_scipy_zoom_order0(kind):
    from scipy import ndimage
    rng = np.random.default_rng(0)
    grid = kind == 'image'
    for S, (H, W) in [(8, (13, 29)), (16, (7, 5)), (24, (24, 50)), (10, (31, 3)), (32, (97, 64)), (5, (1, 9))]:
        pred = rng.integers(0, 9, (2, S, S)).astype(np.uint8)
        want = ndimage.zoom(pred, (1.0, H / S, W / S), order=0, grid_mode=grid, mode='nearest' if grid else 'constant')
        got = data.restore_size(torch.from_numpy(pred).long(), (H, W), kind)
        assert got.shape == (2, H, W) and got.dtype == torch.int64
        np.testing.assert_array_equal(got.numpy(), want)
    same = torch.zeros(1, 4, 4, dtype=torch.long)
    assert data.restore_size(same, (4, 4), 'volume') is same
    with pytest.raises(ValueError, match="kind must be 'volume' or 'image'"):
        data.restore_size(same, (5, 5), 'slice')


def test_train_items_are_seeded_by_epoch_and_index_the_same_in_any_worker(tmp_path):
    write_identical_slices(tmp_path, 6)
    ds = data.train_set('synapse', tmp_path, 16, val_cases=0, seed=3)
    state = np.random.get_state(), torch.get_rng_state()
    a = [ds[(e, i)][1] for e in range(3) for i in range(6)]
    assert torch.equal(ds[(0, 2)][1], a[2]) and torch.equal(ds[2][1], a[2])  # deterministic; int = epoch 0
    assert len({y.numpy().tobytes() for y in a}) >= 6  # epochs and indices differ
    other = data.train_set('synapse', tmp_path, 16, val_cases=0, seed=4)
    assert any(not torch.equal(other[(0, i)][1], a[i]) for i in range(6))  # the seed matters
    assert np.array_equal(np.random.get_state()[1], state[0][1]) and torch.equal(torch.get_rng_state(), state[1])
    keys = [(e, i) for e in range(2) for i in range(6)]
    got = {}
    for workers in (0, 2):
        loader = data.make_loader(ds, 1, shuffle=False, workers=workers, sampler=keys)
        got[workers] = [y[0] for _, y in loader]
    assert all(torch.equal(p, q) for p, q in zip(got[0], got[2])) and len(got[0]) == 12


def test_epoch_sampler_shards_one_seeded_shuffle_and_resumes_mid_epoch():
    def keys(seed, epoch, rank=0, world=1, skip=0):
        sampler = data.EpochSampler(list(range(7)), seed, rank, world)
        sampler.set_epoch(epoch, skip)
        return list(sampler)
    one = keys(5, 2)  # one GPU
    assert {e for e, _ in one} == {2} and sorted(i for _, i in one) == list(range(7))
    two = list(zip(keys(5, 2, 0, 2), keys(5, 2, 1, 2)))  # two GPUs: their k-th samples, side by side
    assert [k for pair in two for k in pair] == one[:6]  # the same global order, the odd sample dropped
    assert keys(5, 2, skip=3) == one[3:] and len(data.EpochSampler(list(range(7)), 5, 0, 1)) == 7
    order = [i for _, i in one]
    assert [i for _, i in keys(6, 2)] != order and [i for _, i in keys(5, 3)] != order  # seed and epoch reshuffle


def test_val_cases_0_means_no_validation_for_every_dataset(tmp_path):
    write_isic2017(tmp_path / 'isic', n=2)  # has an official validation folder
    assert len(data.eval_cases('isic2017', tmp_path / 'isic', 'val', val_cases=0)) == 0
    assert len(data.train_set('isic2017', tmp_path / 'isic', 16, val_cases=0)) == 2
    write_synapse(tmp_path / 'syn', n_cases=3, n_slices=2, size=8)
    assert len(data.eval_cases('synapse', tmp_path / 'syn', 'val', val_cases=0)) == 0
    assert len(data.train_set('synapse', tmp_path / 'syn', 8, val_cases=0).cases) == 3  # all training cases


def test_cascade_refuses_transunet_9_label_files(tmp_path):
    write_synapse(tmp_path, n_cases=2, n_slices=2, size=8)  # TransUNet's ids: nothing above 8
    with pytest.raises(DataError, match=r'training case case000\d.*no label above 8.*--label-map transunet'):
        data.train_set('synapse', tmp_path, 8, val_cases=0, label_map='cascade')
    with pytest.raises(DataError, match='case0003.npy.h5: label_map=cascade .*no label above 8'):
        data.eval_cases('synapse', tmp_path, 'test', label_map='cascade')[0]


# ---- the user's own data: an image folder and nnU-Net v2's raw layout

def write_folder(root, n=5, classes=('background', 'cell', 'nucleus')):
    (root / 'images').mkdir(parents=True)
    (root / 'masks').mkdir()
    for i in range(n):
        h, w = 20 + 2 * i, 24 - i  # every image its own size
        mask = np.zeros((h, w), np.uint8)
        mask[2:10, 3:12], mask[12:16, 4:8] = 1, len(classes) - 1
        img = 100 + 50 * mask
        if i % 2:  # grayscale
            Image.fromarray(img.astype(np.uint8)).save(root / 'images' / f'img{i}.png')
        else:
            save_rgb(root / 'images' / f'img{i}.jpg' if i == 2 else root / 'images' / f'img{i}.png',
                     np.repeat(img[..., None], 3, 2))
        Image.fromarray(mask).save(root / 'masks' / f'img{i}.png')
    if classes:
        (root / 'classes.txt').write_text('\n'.join(classes) + '\n')
    return root


AFFINE = np.array([[0.0, -0.8, 0.0, 12.5], [0.9, 0.0, 0.0, -30.0], [0.0, 0.0, 2.5, 7.0], [0, 0, 0, 1]])


def write_nnunet(root, n=3, ts=0, ending='.nii.gz', channels=('CT',), shape=(24, 20, 4)):
    """nnU-Net v2's raw layout; channel c > 0 of a case inverts its contrast, so a wrong channel shows."""
    import nibabel as nib
    rng = np.random.default_rng(0)
    for d in ('imagesTr', 'labelsTr') + (('imagesTs', 'labelsTs') if ts else ()):
        (root / d).mkdir(parents=True)
    for i in range(n + ts):
        lab = np.zeros(shape, np.uint8)
        lab[3:12, 2:9, :], lab[14:20, 10:18, 1:] = 1, 2
        split = ('Tr' if i < n else 'Ts')
        for c in range(len(channels)):
            contrast = 100.0 if c == 0 else -100.0
            img = (lab * contrast - 50 + rng.normal(0, 5, shape)).astype(np.float32)  # HU-like
            nib.save(nib.Nifti1Image(img, AFFINE), str(root / f'images{split}' / f'case_{i:03d}_{c:04d}{ending}'))
        nib.save(nib.Nifti1Image(lab, AFFINE), str(root / f'labels{split}' / f'case_{i:03d}{ending}'))
    names = {str(c): channels[c] for c in reversed(range(len(channels)))}  # '1' before '0': sorted by the reader
    meta = {'channel_names': names, 'labels': {'background': 0, 'liver': 1, 'tumour': 2},
            'file_ending': ending, 'numTraining': n}
    (root / 'dataset.json').write_text(__import__('json').dumps(meta))
    return root


def test_folder_dataset_trains_and_evaluates_with_class_names(tmp_path):
    root = write_folder(tmp_path / 'f')
    spec = data.get_spec('folder', root)
    assert spec.class_names == ('background', 'cell', 'nucleus') and spec.kind == 'image' and spec.intensity == 'rgb'
    ds = data.train_set('folder', root, 16, val_cases=1)
    test = data.eval_cases('folder', root, 'test')
    val = data.eval_cases('folder', root, 'val', val_cases=1)
    assert len(test) == 1 and len(val) == 1 and len(ds) == 3  # 20% test (seeded), then 1 held out
    assert not set(test.ids) & set(ds.cases) and not set(val.ids) & set(ds.cases)
    x, y = ds[(0, 0)]
    assert x.shape == (3, 16, 16) and set(y.unique().tolist()) <= {0, 1, 2}
    case = test[0]
    assert case.image.dtype == np.uint8 and case.image.shape == case.label.shape + (3,)
    assert set(np.unique(case.label)) == {0, 1, 2}
    (root / 'test.txt').write_text('img0\nimg3\n')
    (root / 'val.txt').write_text('img1\n')
    assert data.eval_cases('folder', root, 'test').ids == ['img0', 'img3']
    assert data.eval_cases('folder', root, 'val').ids == ['img1']
    assert data.train_set('folder', root, 8).cases == ['img2', 'img4']
    (root / 'train.txt').write_text('img4\nimg3\nimg2\n')  # its order; img3 is listed for test
    assert [s.id for s in data.train_set('folder', root, 8).samples] == ['img4', 'img2']
    (root / 'classes.txt').unlink()
    assert data.get_spec('folder', root, num_classes=3).class_names == ('background', 'class1', 'class2')
    with pytest.raises(DataError, match='no classes.txt .*--num-classes'):
        data.train_set('folder', root, 8)
    with pytest.raises(DataError, match=r'img\d.png: label 2 outside the 2 classes'):
        data.eval_cases('folder', root, 'test', num_classes=2)[0]


def test_folder_binary_0_255_masks_and_errors(tmp_path):
    root = write_folder(tmp_path / 'b', n=3, classes=('background', 'lesion'))
    for p in (root / 'masks').iterdir():
        Image.fromarray((np.array(Image.open(p)) > 0).astype(np.uint8) * 255).save(p)
    ds = data.train_set('folder', root, 8, val_cases=0)
    assert set(ds[0][1].unique().tolist()) == {0, 1}
    (root / 'masks' / 'img1.png').unlink()
    with pytest.raises(DataError, match='img1.png: no mask .*image without mask'):
        data.train_set('folder', root, 8)
    with pytest.raises(DataError, match=r"root '.*nowhere' not found: expected ROOT/images"):
        data.train_set('folder', tmp_path / 'nowhere', 8)
    (tmp_path / 'c' / 'images').mkdir(parents=True)
    with pytest.raises(DataError, match='masks: folder not found'):
        data.train_set('folder', tmp_path / 'c', 8, num_classes=2)


def test_nnunet_volumes_train_slicewise_and_evaluate_volumewise(tmp_path):
    root = write_nnunet(tmp_path / 'n', n=3, ts=1)
    spec = data.get_spec('nnunet', root)
    assert spec.class_names == ('background', 'liver', 'tumour') and spec.kind == 'volume' and spec.intensity == 'ct'
    ds = data.train_set('nnunet', root, 16, val_cases=1)
    assert len(ds.cases) == 2 and len(ds) == 2 * 4  # slices along the 3rd voxel axis
    x, y = ds[(1, 3)]
    assert x.shape == (3, 16, 16) and set(y.unique().tolist()) <= {0, 1, 2}
    test = data.eval_cases('nnunet', root, 'test')
    assert test.ids == ['case_003']
    case = test[0]
    assert case.image.shape == case.label.shape == (4, 20, 24) and case.image.dtype == np.float32
    assert 0 <= case.image.min() and case.image.max() <= 1  # CT window, scaled
    assert case.label[2, 5, 5] == 1 and case.label[2, 15, 15] == 2  # (Z,Y,X): row = voxel j, column = voxel i
    val = data.eval_cases('nnunet', root, 'val', val_cases=1)
    assert len(val) == 1 and val.ids[0] not in ds.cases and val[0].image.shape == (4, 20, 24)
    import nibabel as nib
    raw = nib.load(str(root / 'imagesTr' / f'{val.ids[0]}_0000.nii.gz')).get_fdata().transpose(2, 1, 0)
    np.testing.assert_allclose(val[0].image, (np.clip(raw, -125, 275) + 125) / 400, atol=1e-6)
    # no imagesTs: a seeded held-out test split; MRI-like channel: z-score
    root2 = write_nnunet(tmp_path / 'm', n=3, channels=('T2',))
    assert data.get_spec('nnunet', root2).intensity == 'zscore'
    test2 = data.eval_cases('nnunet', root2, 'test')
    assert len(test2) == 1 and test2.ids[0] not in data.train_set('nnunet', root2, 8, val_cases=0).cases
    assert abs(test2[0].image.mean()) < 1e-4


@pytest.mark.filterwarnings('ignore:.*DANIE reads channel 0')
def test_nnunet_reads_channel_0_of_several(tmp_path):
    import nibabel as nib
    root = write_nnunet(tmp_path / 'n', n=3, ts=1, channels=('CT', 'T2'))  # channel 1: contrast inverted
    with pytest.warns(UserWarning, match=r"2 channels \['CT', 'T2'\]; DANIE reads channel 0 \(CT\) only"):
        assert data.get_spec('nnunet', root).intensity == 'ct'  # channel 0's rule, though the json lists '1' first
    ds = data.train_set('nnunet', root, 16, val_cases=0, augment=False)
    assert ds.cases == ['case_000', 'case_001', 'case_002']  # a _0001 file is no case of its own
    case = data.eval_cases('nnunet', root, 'test')[0]
    for c in (0, 1):
        raw = nib.load(str(root / 'imagesTs' / f'case_003_{c:04d}.nii.gz')).get_fdata().transpose(2, 1, 0)
        assert np.allclose(case.image, (np.clip(raw, -125, 275) + 125) / 400, atol=1e-6) == (c == 0)
    whole = data.eval_cases('nnunet', root, 'val', val_cases=1)[0]  # a training case, read whole
    k = [s.id for s in ds.samples].index(whole.id)
    x = data.prepare_input(whole.image, 16)
    assert all(torch.equal(ds[k + z][0], x[z]) for z in range(4))  # its training slices, via the cache: channel 0


def test_nnunet_png_and_clear_errors(tmp_path):
    root = tmp_path / 'p'
    for d in ('imagesTr', 'labelsTr'):
        (root / d).mkdir(parents=True)
    for i in range(3):
        save_rgb(root / 'imagesTr' / f'c{i}_0000.png', np.full((10, 12, 3), 50))
        Image.fromarray(np.eye(10, 12, dtype=np.uint8)).save(root / 'labelsTr' / f'c{i}.png')
    (root / 'dataset.json').write_text('{"channel_names": {"0": "R"}, "labels": {"background": 0, "edge": 1}, '
                                       '"file_ending": ".png"}')
    assert data.get_spec('nnunet', root).kind == 'image'
    assert len(data.train_set('nnunet', root, 8, val_cases=0)) == 2
    assert data.eval_cases('nnunet', root, 'test')[0].label.sum() == 10
    (root / 'dataset.json').write_text('{"channel_names": {"0": "R"}, "labels": {"background": 0, "edge": 1}, '
                                       '"file_ending": ".mha"}')
    with pytest.raises(DataError, match="dataset.json: file_ending '.mha' is not supported"):
        data.train_set('nnunet', root, 8)
    (root / 'dataset.json').write_text('{"channel_names": {"0": "R"}, "labels": {"background": 0, "edge": 1}, '
                                       '"file_ending": ".nii.gz"}')
    with pytest.raises(DataError, match=r'imagesTr has no \*_0000.nii.gz files .*it holds c0_0000.png'):
        data.train_set('nnunet', root, 8)
    (root / 'dataset.json').write_text('{"labels": {"background": 0, "edge": 1}}')
    with pytest.raises(DataError, match=r"missing key\(s\) \['channel_names', 'file_ending'\]"):
        data.train_set('nnunet', root, 8)
    with pytest.raises(DataError, match='dataset.json: not found'):
        data.train_set('nnunet', tmp_path, 8)
    root3 = write_nnunet(tmp_path / 'q', n=2)
    (root3 / 'labelsTr' / 'case_001.nii.gz').unlink()
    with pytest.raises(DataError, match='case_001_0000.nii.gz: no mask .*image without mask'):
        data.train_set('nnunet', root3, 8)
    (root3 / 'dataset.json').write_text('{"channel_names": {"0": "CT"}, "labels": {"background": 0}, '
                                        '"file_ending": ".nii.gz"}')
    with pytest.raises(DataError, match='label ids must be 0..K-1'):
        data.get_spec('nnunet', root3)


def test_normalise_intensity_rules():
    hu = np.array([[-1000.0, -125.0, 75.0, 275.0, 3000.0]])
    np.testing.assert_allclose(data.normalise(hu, 'ct'), [[0, 0, 0.5, 1, 1]])
    mri = np.array([[10.0, 20.0, 30.0]])
    np.testing.assert_allclose(data.normalise(mri, 'mri'), [[0, 0.5, 1]])
    z = data.normalise(mri, 'zscore')
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5 and z.dtype == np.float32
    rgb = np.zeros((2, 2, 3), np.uint8)
    assert data.normalise(rgb, 'rgb') is rgb
    with pytest.raises(DataError, match="intensity 'pet' \\(--intensity\\)"):
        data.normalise(mri, 'pet')


# ---- the numbers a resize or a rule could change silently

def centre_nearest(a, S):
    """Pixel-centre nearest neighbour to S x S, written out: source row floor((i + 0.5) H / S)."""
    iy = np.floor((np.arange(S) + 0.5) * a.shape[0] / S).astype(int)
    ix = np.floor((np.arange(S) + 0.5) * a.shape[1] / S).astype(int)
    return a[iy][:, ix]


def test_training_labels_are_resized_nearest_never_interpolated(tmp_path):
    from scipy import ndimage
    (tmp_path / 'syn' / 'train_npz').mkdir(parents=True)
    lab = np.zeros((20, 20), np.float32)
    lab[3:9, 2:15], lab[11:18, 5:12] = 3, 8  # 3 and 8 touch 0 only: linear would paint 1, 2, 4..7 on the edges
    np.savez(tmp_path / 'syn' / 'train_npz' / 'case0001_slice000.npz', image=slice_image(lab), label=lab)
    y = data.train_set('synapse', tmp_path / 'syn', 32, val_cases=0, augment=False)[0][1].numpy()
    assert set(np.unique(y)) == {0, 3, 8}
    np.testing.assert_array_equal(y, ndimage.zoom(lab.astype(np.uint8), 32 / 20, order=0))  # TransUNet's zoom
    root = write_folder(tmp_path / 'f', n=2)  # RGB path: a 20x24 mask of ids 0, 1, 2 to 16x16
    (root / 'test.txt').write_text('img1\n')
    mask = np.array(Image.open(root / 'masks' / 'img0.png'))
    y = data.train_set('folder', root, 16, val_cases=0, augment=False)[(0, 0)][1].numpy()
    assert set(np.unique(y)) <= {0, 1, 2}
    np.testing.assert_array_equal(y, centre_nearest(mask, 16))


def test_mri_and_zscore_normalise_per_volume_not_per_slice():
    vol = np.stack([np.full((4, 5), 10.0), np.full((4, 5), 20.0), np.linspace(30, 50, 20).reshape(4, 5)])
    np.testing.assert_allclose(data.normalise(vol, 'mri'), (vol - 10) / 40, atol=1e-6)
    np.testing.assert_allclose(data.normalise(vol, 'zscore'), (vol - vol.mean()) / vol.std(), atol=1e-5)


def test_isic_foreground_is_128_and_above(tmp_path):
    root = write_isic2017(tmp_path, splits=('Test_v2',), n=1, img_hw=(4, 8), mask_hw=(4, 8))
    mask = np.repeat(np.array([[0, 126, 127, 128, 129, 200, 254, 255]], np.uint8), 4, axis=0)
    Image.fromarray(mask).save(root / 'ISIC-2017_Test_v2_Part1_GroundTruth' / 'ISIC_0000000_segmentation.png')
    label = data.eval_cases('isic2017', root, 'test')[0].label
    np.testing.assert_array_equal(label[0], [0, 0, 0, 1, 1, 1, 1, 1])
    green = np.stack([np.zeros_like(mask), mask, np.zeros_like(mask)], axis=2)  # an RGB mask drawn in green
    Image.fromarray(green).save(root / 'ISIC-2017_Test_v2_Part1_GroundTruth' / 'ISIC_0000000_segmentation.png')
    np.testing.assert_array_equal(data.eval_cases('isic2017', root, 'test')[0].label[0], [0, 0, 0, 1, 1, 1, 1, 1])


# ---- faults: images at their real bit depth, masks that do not belong to their image

def test_images_are_read_at_their_bit_depth_never_clipped(tmp_path):
    a8 = np.random.default_rng(0).integers(0, 256, (12, 10), dtype=np.uint8)
    Image.fromarray(a8).save(tmp_path / 'a8.png')
    Image.fromarray(a8.astype(np.uint16) * 257).save(tmp_path / 'a16.tif')  # 255 -> 65535: the type's full range
    Image.fromarray(a8.astype(np.uint16) * 257).save(tmp_path / 'a16.png')
    Image.fromarray(a8.astype(np.float32) / 255).save(tmp_path / 'f.tif')  # float in [0, 1]
    want = data.read_image(tmp_path / 'a8.png')
    assert want.shape == (12, 10, 3) and want.dtype == np.uint8
    for name in ('a16.tif', 'a16.png', 'f.tif'):
        np.testing.assert_array_equal(data.read_image(tmp_path / name), want)
    Image.fromarray(a8.astype(np.float32) * 4).save(tmp_path / 'big.tif')  # float beyond [0, 1]: refused by name
    with pytest.raises(DataError, match=r'big.tif: float32 image with values in \[0.0, .*\]; expected \[0, 1\]'):
        data.read_image(tmp_path / 'big.tif')
    root = write_folder(tmp_path / 'f', n=2)  # and in training: a 16-bit TIFF trains as its 8-bit twin
    (root / 'test.txt').write_text('img1\n')
    x8 = data.train_set('folder', root, 16, val_cases=0, augment=False)[0][0]
    img = np.array(Image.open(root / 'images' / 'img0.png'))[..., 0]
    (root / 'images' / 'img0.png').unlink()
    Image.fromarray(img.astype(np.uint16) * 257).save(root / 'images' / 'img0.tif')
    assert torch.equal(data.train_set('folder', root, 16, val_cases=0, augment=False)[0][0], x8)


def test_float_images_round_and_16_bit_images_shift_as_img_as_ubyte(tmp_path):
    rng = np.random.default_rng(0)
    k = rng.integers(0, 255, (12, 10))  # the 8-bit value each pixel must give, 0..254
    up = rng.random((12, 10)) < 0.5  # float (k + 0.7) / 255 rounds up to k + 1, (k + 0.3) / 255 down to k
    Image.fromarray(((k + np.where(up, 0.7, 0.3)) / 255).astype(np.float32)).save(tmp_path / 'f.tif')
    np.testing.assert_array_equal(data.read_image(tmp_path / 'f.tif')[..., 0], k + up)  # truncation: k
    low = rng.random((12, 10)) < 0.5  # 16-bit 256 k + 255 and 256 k both give k (v >> 8), not round(v / 257)
    Image.fromarray((256 * k + np.where(low, 0, 255)).astype(np.uint16)).save(tmp_path / 'a16.png')
    np.testing.assert_array_equal(data.read_image(tmp_path / 'a16.png')[..., 0], k)


def test_a_mask_of_another_aspect_ratio_is_refused_naming_both(tmp_path):
    root = write_folder(tmp_path / 'f', n=3)  # img0 is 20x24
    (root / 'test.txt').write_text('img2\n')
    Image.fromarray(np.zeros((24, 20), np.uint8)).save(root / 'masks' / 'img0.png')  # a mis-paired, turned mask
    with pytest.raises(DataError, match=r'masks/img0.png: a 24x20 mask of the 20x24 image .*images/img0.png'):
        data.train_set('folder', root, 16, val_cases=0)
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / 'masks' / 'img0.png')  # the same ratio: allowed
    assert data.train_set('folder', root, 16, val_cases=0)[0][1].shape == (16, 16)
    isic = write_isic2017(tmp_path / 'isic', splits=('Training',), n=1, img_hw=(20, 20), mask_hw=(40, 48))
    assert data.train_set('isic2017', isic, 16)[0][1].shape == (16, 16)  # ISIC's 256x256 copies of any mask


def test_folder_and_nnunet_train_with_their_own_recipe(tmp_path):
    folder = data.get_spec('folder', write_folder(tmp_path / 'f'))
    nnunet = data.get_spec('nnunet', write_nnunet(tmp_path / 'n'))
    recipe = lambda s: (s.epochs, s.batch_size, s.img_size, s.lr, s.weight_decay)  # noqa: E731
    assert recipe(folder) == recipe(data.SPECS['isic2017']) == (200, 8, 224, 1e-4, 1e-4)  # images: ISIC's
    assert recipe(nnunet) == recipe(data.SPECS['synapse']) == (300, 24, 224, 1e-4, 1e-4)  # volumes: Synapse's
    assert folder.figure == nnunet.figure == 'mean'  # the pooled 256x256 figure is ISIC's Table 3 only


def test_palette_masks_give_their_indices_as_class_ids(tmp_path):
    (tmp_path / 'images').mkdir()
    (tmp_path / 'masks').mkdir()
    for i in range(3):
        Image.new('RGB', (8, 8), (90, 90, 90)).save(tmp_path / 'images' / f'img{i}.png')
        mask = Image.fromarray(np.array([[0, 1, 2, 2]] * 4, np.uint8).repeat(2, 0).repeat(2, 1), mode='P')
        mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])  # ids 1, 2 drawn red and green
        mask.save(tmp_path / 'masks' / f'img{i}.png')
    labels = data.train_set('folder', tmp_path, 8, val_cases=0, num_classes=3, augment=False)[0][1]
    assert labels[0].tolist() == [0, 0, 1, 1, 2, 2, 2, 2]


def test_an_error_in_a_loader_worker_is_one_line(tmp_path):
    write_synapse(tmp_path, n_cases=2, n_slices=2, size=8)
    ds = data.train_set('synapse', tmp_path, 8, val_cases=0)
    bad = ds.samples[-1].files[0]
    bad.write_bytes(b'not an npz file')  # numpy would advise loading it with allow_pickle
    with pytest.raises(DataError) as e:
        list(data.make_loader(ds, 1, shuffle=False, workers=1))
    msg = str(e.value)
    assert msg.startswith(f'{bad}: unreadable or corrupt npz') and len(msg.splitlines()) == 1, msg
    assert 'allow_pickle' not in msg and 'Traceback' not in msg

# ---- faults: values a viewer would not show, labels that are no class ids, outputs inside the data

def test_non_finite_values_are_refused_where_the_file_is_read(tmp_path):
    import nibabel as nib
    write_synapse(tmp_path / 's', n_cases=2, n_slices=2, size=8)
    f = sorted((tmp_path / 's' / 'train_npz').iterdir())[-1]
    image = np.zeros((8, 8), np.float32)
    image[2, 3] = np.nan
    np.savez(f, image=image, label=np.zeros((8, 8), np.float32))
    with pytest.raises(DataError, match=rf"{f.name}: 1 of 64 values of 'image' are NaN or Inf \(first: nan\)"):
        data.read_arrays(f, ('image', 'label'))
    with pytest.raises(DataError, match=f'{f.name}: 1 of 64'):  # in training too, with the file named
        ds = data.train_set('synapse', tmp_path / 's', 8, val_cases=0)
        [ds[i] for i in range(len(ds))]
    root = write_nnunet(tmp_path / 'n', n=3)
    vol = root / 'imagesTr' / 'case_001_0000.nii.gz'
    a = np.asanyarray(nib.load(vol).dataobj).copy()
    a[0, 0, 0], a[1, 0, 0] = np.inf, -np.inf
    nib.save(nib.Nifti1Image(a, AFFINE), str(vol))
    with pytest.raises(DataError, match=rf'case_001_0000.nii.gz: 2 of {a.size} voxels are NaN or Inf'):
        data.read_nifti(vol)
    with pytest.raises(DataError, match='case_001_0000.nii.gz: 2 of'):  # and as an evaluation case
        list(data.eval_cases('nnunet', root, 'train', val_cases=0))
    Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(tmp_path / 'nan.tif')
    with pytest.raises(DataError, match='nan.tif: 16 of 16 pixels are NaN or Inf'):
        data.read_image(tmp_path / 'nan.tif')


def test_images_are_read_as_a_viewer_shows_them(tmp_path):
    a = np.zeros((6, 10, 3), np.uint8)
    a[0, :3] = 255  # a mark in the stored top-left corner
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # EXIF orientation: viewers turn it 90 degrees clockwise
    im.save(tmp_path / 'turned.jpg', exif=exif, quality=100)
    shown = data.read_image(tmp_path / 'turned.jpg')
    assert shown.shape == (10, 6, 3) and shown[:3, -1].min() > 200 and shown[0, 0].max() < 50
    frames = [Image.fromarray(np.full((4, 4), v, np.uint8)) for v in (0, 9)]
    frames[0].save(tmp_path / 'pages.tif', save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match='pages.tif: 2 pages'):
        data.read_image(tmp_path / 'pages.tif')


def test_label_files_are_checked_against_the_classes(tmp_path):
    root = write_folder(tmp_path / 'f', n=3)
    (root / 'masks' / 'img0.png').unlink()
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / 'masks' / 'img0.jpg')
    with pytest.raises(DataError, match='masks/img0.jpg: a JPEG mask; lossy compression changes class ids'):
        list(data.eval_cases('folder', root, 'train', val_cases=0))
    with pytest.raises(DataError, match='x.npz: complex128 labels; expected integer class ids'):
        data.class_ids(np.zeros(3, complex), 'x.npz', 3)
    with pytest.raises(DataError, match='x.npz: label -1; expected class ids'):
        data.class_ids(np.array([0, -1]), 'x.npz')
    assert data.class_ids(np.array([0.0, 7.0]), 'x.npz').tolist() == [0, 7]  # no class count: integers only


def test_class_counts_name_the_file_or_flag_that_gives_them(tmp_path):
    root = write_folder(tmp_path / 'f', n=2, classes=('background',))
    with pytest.raises(DataError, match=r"classes.txt: 1 class name\(s\) \['background'\]; expected background"):
        data.get_spec('folder', root)
    (root / 'classes.txt').write_text('\n\n')
    with pytest.raises(DataError, match=r'classes.txt: 0 class name\(s\)'):
        data.get_spec('folder', root, num_classes=3)
    (root / 'classes.txt').write_text('background\na\nb\nc\n')
    with pytest.raises(DataError, match='classes.txt has 4 classes, but best.pth gives 3'):
        data.get_spec('folder', root, 3, given='best.pth')
    (root / 'classes.txt').unlink()
    with pytest.raises(DataError, match='--num-classes: 300 classes; class ids are written as 8-bit .* at most 256'):
        data.get_spec('folder', root, 300)


def test_outputs_never_go_inside_the_data_they_read(tmp_path):
    root = write_folder(tmp_path / 'f', n=2)
    for inside in (root, root / 'images', root / 'new' / 'deeper'):
        with pytest.raises(DataError, match=rf'\(--save-pred\) lies inside .*/f \(--root\), the data it reads'):
            data.output_dir(inside, '--save-pred', roots={root: '--root'})
    assert not (root / 'new').exists()  # refused before anything is made
    assert data.output_dir(tmp_path / 'f2', '--out', roots={root: '--root'}).is_dir()  # a sibling with its prefix


def test_a_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import builtins
    import errno
    path = data.write_atomic(tmp_path / 'summary.json', '{"old": 1}')

    def full_disk(p, mode='r', *a, **kw):
        f = builtins.open(p, mode, *a, **kw)
        f.write(b'{"ne')  # a part, then the disk is full
        f.close()
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(data, 'open', full_disk, raising=False)
    with pytest.raises(OSError, match='No space left') as e:
        data.write_atomic(path, '{"new": 2}')
    assert e.value.filename == str(path) and path.read_text() == '{"old": 1}'
    def ctrl_c(p, mode='r', *a, **kw):
        f = builtins.open(p, mode, *a, **kw)
        f.write(b'{"ne')  # a part, then Ctrl-C
        f.close()
        raise KeyboardInterrupt
    monkeypatch.setattr(data, 'open', ctrl_c, raising=False)
    with pytest.raises(KeyboardInterrupt):
        data.write_atomic(tmp_path / 'new.json', 'x')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['summary.json']  # no .tmp, no part of a file


def test_a_label_volume_that_a_viewer_would_not_overlay_is_refused(tmp_path):
    import nibabel as nib
    root = write_nnunet(tmp_path / 'n', n=3)
    lab = root / 'labelsTr' / 'case_000.nii.gz'
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0  # 5 mm off its image
    nib.save(nib.Nifti1Image(np.asanyarray(nib.load(lab).dataobj), shifted), str(lab))
    with pytest.raises(DataError, match='labelsTr/case_000.nii.gz: its affine differs from that of its image .*'
                                        'imagesTr/case_000_0000.nii.gz'):
        list(data.eval_cases('nnunet', root, 'train', val_cases=0))
