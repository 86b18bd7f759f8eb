"""Tests of predict.py: inference (the resize back, TTA), reading the user's files and writing label maps in
their geometry, the command line and its faults. CPU, offline, tiny models."""

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import data
import evaluate as E
import model as M
import predict as P
from data import DataError
from test_data import AFFINE, save_rgb, slice_image
from test_evaluate import Constant, _spec, ckpt_dict, tiny_model

torch.set_num_threads(1)  # tiny tensors: more threads only add overhead, and stall badly on a loaded machine


class Pointwise(torch.nn.Module):
    """Two-class scores from the first input channel, pixel by pixel: flip-equivariant, input-dependent."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return torch.cat((x[:, :1] * self.w, -x[:, :1]), 1), []


def _best(tmp_path, spec_name, num_classes, img_size=32):
    torch.manual_seed(0)
    path = tmp_path / 'best.pth'
    torch.save(ckpt_dict(tiny_model(num_classes=num_classes, img_size=img_size), {'name': spec_name},
                         spec=spec_name), path)
    return path

# ---- inference: the resize back, batching, TTA


def test_predict_case_resizes_back_and_batches():
    case = data.Item('v', np.random.default_rng(0).random((5, 48, 40), dtype=np.float32), np.zeros((5, 48, 40)))
    spec = _spec(classes=('background', 'x'))
    one = P.predict_case(Constant(), case, spec, 32, torch.device('cpu'), batch_size=1)
    three = P.predict_case(Constant(), case, spec, 32, torch.device('cpu'), batch_size=3)
    assert one.shape == (5, 48, 40) and np.array_equal(one, three)
    assert one[:, :, :20].all() and not one[:, :, 20:].any()  # nearest resize keeps the half split


def _scipy_predict(model, case, spec, img_size):
    """An independent path: numpy argmax and scipy's zoom (order 0) back."""
    images = case.image if spec.kind == 'volume' else case.image[None]
    with torch.no_grad():
        pred = model(data.prepare_input(images, img_size))[0].argmax(1).to(torch.uint8).numpy()
    out_hw, grid = case.label.shape[-2:], spec.kind == 'image'
    pred = ndimage.zoom(pred, (1.0, out_hw[0] / pred.shape[1], out_hw[1] / pred.shape[2]), order=0, grid_mode=grid,
                        mode='nearest' if grid else 'constant')
    return pred if spec.kind == 'volume' else pred[0]


def test_device_path_equals_numpy_path():
    rng = np.random.default_rng(1)
    vol = data.Item('v', rng.random((3, 45, 37), dtype=np.float32), np.zeros((3, 45, 37), np.int64))
    img = data.Item('i', rng.integers(0, 256, (53, 71, 3), dtype=np.uint8), rng.integers(0, 2, (53, 71)))
    for case, kind in ((vol, 'volume'), (img, 'image')):
        spec = _spec(kind=kind, classes=('background', 'x'))
        ours = P.predict_case(Pointwise(), case, spec, 32, torch.device('cpu'), batch_size=2)
        ref_map = _scipy_predict(Pointwise(), case, spec, 32)
        assert isinstance(ours, torch.Tensor) and np.array_equal(ours.numpy(), ref_map) and 0 < ref_map.mean() < 1
    p, g = ref_map.astype(bool), img.label.astype(bool)
    tp = np.count_nonzero(p & g)
    ref = [tp, np.count_nonzero(p) - tp, np.count_nonzero(g) - tp, p.size - np.count_nonzero(p | g)]
    assert E.confusion_counts(ours, torch.from_numpy(img.label), (1,)).tolist() == [ref]


def test_tta_equals_plain_on_flip_equivariant_model():
    x = torch.randn(3, 3, 16, 16)
    plain = P.segment(Pointwise(), x, torch.device('cpu'))
    assert torch.equal(P.segment(Pointwise(), x, torch.device('cpu'), tta=True), plain)
    assert 0 < plain.float().mean() < 1
    # and TTA does average: the left-half model's flipped-back maps put class 1 left twice and right twice
    p1 = (2 * torch.sigmoid(torch.tensor(1.0)) + 2 * 0.5) / 4  # softmax(0, 1) on the left, softmax(0, 0) right
    assert torch.allclose(P._forward(Constant(), x, tta=True)[:, 1].detach(), p1.expand(3, 16, 16))

# ---- the user's files in, label maps out


def test_nifti_input_with_non_identity_affine_is_written_back_in_its_geometry(tmp_path):
    vox = np.random.default_rng(0).normal(0, 100, (24, 20, 4)).astype(np.int16)
    src = nib.Nifti1Image(vox, AFFINE)
    src.header.set_zooms((0.8, 0.9, 2.5))
    nib.save(src, str(tmp_path / 'ct.nii.gz'))
    inp = P.read_input(tmp_path / 'ct.nii.gz')
    assert inp.id == 'ct' and inp.geometry is not None and inp.image.shape == (4, 20, 24)
    np.testing.assert_array_equal(inp.image[2, 5, 7], vox[7, 5, 2])  # (Z,Y,X) slices
    assert data.normalise(inp.image, 'ct').max() <= 1.0
    labels = (inp.image > 50).astype(np.int64) + (inp.image > 150)
    (tmp_path / 'out').mkdir()
    paths = P.write_prediction(tmp_path / 'out', inp.id, data.normalise(inp.image, 'ct'), labels,
                               data.SPECS['synapse'], geometry=inp.geometry)
    back = nib.load(str(tmp_path / 'out' / 'ct_pred.nii.gz'))
    assert back.shape == vox.shape and back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, AFFINE)
    np.testing.assert_array_equal(back.header['dim'], src.header['dim'])
    np.testing.assert_allclose(back.header.get_zooms(), (0.8, 0.9, 2.5))
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels.transpose(2, 1, 0))
    overlays = [p for p in paths if p.suffix == '.png']
    assert 1 <= len(overlays) <= P.OVERLAY_SLICES and all(p.is_file() for p in overlays)
    names = json.loads((tmp_path / 'out' / 'labels.json').read_text())
    assert names['0'] == 'background' and names['5'] == 'liver'


def test_png_inputs_come_back_as_label_maps_of_their_sizes(tmp_path):
    save_rgb(tmp_path / 'a.png', np.full((13, 17, 3), 90))
    Image.fromarray(np.full((9, 30), 200, np.uint8)).save(tmp_path / 'b.tif')  # grayscale
    spec, out = data.SPECS['isic2017'], tmp_path / 'out'
    out.mkdir()
    for name, hw in (('a.png', (13, 17)), ('b.tif', (9, 30))):
        inp = P.read_input(tmp_path / name)
        assert inp.image.shape == hw + (3,) and inp.image.dtype == np.uint8
        labels = np.zeros(hw, np.int64)
        labels[2:6, 3:8] = 1
        P.write_prediction(out, inp.id, inp.image, labels, spec, label=labels)
        np.testing.assert_array_equal(np.array(Image.open(out / f'{inp.id}_pred.png')), labels)  # the class ids
        assert np.array(Image.open(out / f'{inp.id}_overlay.png')).shape == hw + (3,)
    big = np.zeros((26, 34), np.int64)  # a mask larger than its stored image: the overlay takes the mask's size
    P.write_prediction(out, 'big', P.read_input(tmp_path / 'a.png').image, big, spec)
    assert np.array(Image.open(out / 'big_overlay.png')).shape == (26, 34, 3)


def test_preprocessed_inputs_and_bad_files(tmp_path):
    lab = np.zeros((3, 8, 10), np.float32)
    lab[:, 2:5, 3:7] = 2
    np.savez(tmp_path / 'case_001_volume_ED.npz', img=slice_image(lab), label=lab)
    with h5py.File(tmp_path / 'case0001.npy.h5', 'w') as f:
        f['image'] = slice_image(lab)
    np.savez(tmp_path / 's.npz', image=slice_image(lab[0]))
    inp = P.read_input(tmp_path / 'case_001_volume_ED.npz')
    assert inp.geometry is None and inp.image.shape == (3, 8, 10) and inp.label.dtype == np.int64
    assert inp.label.max() == 2
    h5 = P.read_input(tmp_path / 'case0001.npy.h5')
    assert h5.id == 'case0001' and h5.label is None and h5.image.shape == (3, 8, 10)
    assert P.read_input(tmp_path / 's.npz').image.shape == (1, 8, 10)
    (tmp_path / 'out').mkdir()
    paths = P.write_prediction(tmp_path / 'out', inp.id, inp.image, inp.label, data.SPECS['acdc'], label=inp.label)
    assert {p.name for p in paths if p.suffix == '.gz'} == {f'case_001_volume_ED_{s}.nii.gz' for s in
                                                            ('pred', 'img', 'gt')}
    (tmp_path / 'x.txt').write_text('hello')
    with pytest.raises(DataError, match='x.txt: unsupported file type'):
        P.read_input(tmp_path / 'x.txt')
    (tmp_path / 'bad.nii.gz').write_bytes(b'not a nifti')
    with pytest.raises(DataError, match='bad.nii.gz: unreadable or corrupt NIfTI'):
        P.read_input(tmp_path / 'bad.nii.gz')
    np.savez(tmp_path / 'nokey.npz', data=lab)
    with pytest.raises(DataError, match='nokey.npz: expected a 2-D or 3-D array image'):
        P.read_input(tmp_path / 'nokey.npz')


def test_preprocessed_npz_and_h5_through_the_command_line(tmp_path, monkeypatch):
    """TransUNet's .npy.h5 and MT-UNet's .npz volumes (already normalised: no intensity rule on top), a 2-D .npz:
    each segmented by a model that marks dark pixels (< ImageNet's mean, 0.485) and written as NIfTI (W,H,D)."""
    monkeypatch.setattr(M, 'from_checkpoint', lambda ckpt, name='checkpoint': Pointwise())
    src, out = tmp_path / 'in', tmp_path / 'out'
    src.mkdir()
    left = np.zeros((3, 32, 32), np.int64)
    left[:, :, :16] = 1  # dark on the left: class 1 there
    top = np.zeros((2, 32, 32), np.int64)
    top[:, :16] = 1  # dark at the top: a transposed write would put it on the left
    np.savez(src / 'case_001_volume_ED.npz', img=np.where(left, 0.1, 0.9).astype(np.float32), label=left + 1)
    with h5py.File(src / 'case0001.npy.h5', 'w') as f:
        f['image'] = np.where(top, 0.1, 0.9).astype(np.float32)
    np.savez(src / 's.npz', image=np.where(left[0], 0.1, 0.9).astype(np.float32))  # one slice
    ckpt = _best(tmp_path, 'synapse', 9)  # Synapse's 'ct' rule would map 0.1 and 0.9 both to dark
    assert P.main(['--ckpt', str(ckpt), '--input', str(src), '--out', str(out), '--no-progress']) == 0

    def nifti(name):
        return np.asarray(nib.load(str(out / f'{name}.nii.gz')).dataobj).transpose(2, 1, 0)  # (W,H,D) -> (D,H,W)
    np.testing.assert_array_equal(nifti('case_001_volume_ED_pred'), left)
    np.testing.assert_array_equal(nifti('case_001_volume_ED_gt'), left + 1)  # the file's label, beside it
    np.testing.assert_allclose(nifti('case_001_volume_ED_img'), np.where(left, 0.1, 0.9))
    np.testing.assert_array_equal(nifti('case0001_pred'), top)
    np.testing.assert_array_equal(nifti('s_pred'), left[:1])

# ---- the command line


def test_input_folder_of_pngs_and_a_bad_file(tmp_path, capsys):
    src, out = tmp_path / 'in', tmp_path / 'out'
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(src / 'rgb.png')
    Image.fromarray(rng.integers(0, 256, (33, 21), dtype=np.uint8)).save(src / 'gray.png')
    (src / 'broken.png').write_bytes(b'not a png')
    ckpt = _best(tmp_path, 'isic2017', 2)
    assert P.main(['--ckpt', str(ckpt), '--input', str(src), '--out', str(out), '--no-progress']) == 1
    err = capsys.readouterr().err
    assert 'broken.png' in err and 'failed (1)' in err and 'Traceback' not in err
    for stem, hw in (('rgb', (40, 70)), ('gray', (33, 21))):  # the good files are written at their sizes
        mask = np.asarray(Image.open(out / f'{stem}_pred.png'))
        assert mask.shape == hw and mask.max() <= 1
        assert (out / f'{stem}_overlay.png').is_file()
    assert json.loads((out / 'labels.json').read_text()) == {'0': 'background', '1': 'lesion'}
    # one good file alone: exit code 0; --tta runs
    assert P.main(['--ckpt', str(ckpt), '--input', str(src / 'rgb.png'), '--out', str(out / 'one'), '--tta',
                   '--no-progress']) == 0
    assert np.asarray(Image.open(out / 'one' / 'rgb_pred.png')).shape == (40, 70)


def test_tta_flag_reaches_the_forward_pass(tmp_path, monkeypatch):
    # Constant marks the left half: alone, the left half is class 1; with its flips averaged, every pixel is
    monkeypatch.setattr(M, 'from_checkpoint', lambda ckpt, name='checkpoint': Constant())
    save_rgb(tmp_path / 'a.png', np.full((20, 30, 3), 90))
    ckpt = _best(tmp_path, 'isic2017', 2)
    for flags, out in (([], 'plain'), (['--tta'], 'tta')):
        assert P.main(['--ckpt', str(ckpt), '--input', str(tmp_path / 'a.png'), '--out', str(tmp_path / out),
                       '--no-progress', *flags]) == 0
    plain, tta = (np.asarray(Image.open(tmp_path / out / 'a_pred.png')) for out in ('plain', 'tta'))
    assert plain[:, :15].all() and not plain[:, 15:].any() and tta.all()


def test_input_nifti_keeps_shape_and_affine_and_nnunet_names(tmp_path):
    affine = np.array([[0, -0.8, 0, 100], [0.7, 0, 0, -50], [0, 0, 2.5, 30], [0, 0, 0, 1]], dtype=np.float64)
    hu = np.random.default_rng(0).normal(0, 300, (40, 36, 5)).astype(np.float32)  # (X,Y,Z) in HU
    src = tmp_path / 'in'
    src.mkdir()
    for name in ('ct.nii.gz', 'case_007_0000.nii.gz'):
        nib.save(nib.Nifti1Image(hu, affine), str(src / name))
    ckpt, out = _best(tmp_path, 'synapse', 9), tmp_path / 'out'
    assert P.main(['--ckpt', str(ckpt), '--input', str(src), '--out', str(out), '--no-progress']) == 0
    for name in ('ct_pred.nii.gz', 'case_007.nii.gz'):  # nnU-Net's CASE_0000 input gives CASE, as its predictor
        pred = nib.load(str(out / name))
        assert pred.shape == hu.shape and np.allclose(pred.affine, affine) and np.asarray(pred.dataobj).max() < 9
    assert (out / 'labels.json').is_file() and not list(out.glob('*_0000*'))


def test_intensity_follows_the_checkpoint(tmp_path, monkeypatch):
    # a raw CT volume gets the spec's 'ct' rule unless --intensity overrides it; RGB images are left to prepare_input
    seen = []
    monkeypatch.setattr(data, 'normalise', lambda image, intensity: seen.append(intensity) or image)
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 2), np.float32), np.eye(4)), str(tmp_path / 'v.nii.gz'))
    args = P.parse_args(['--ckpt', 'x', '--input', 'x', '--out', 'x'])
    _, labels = P.predict_file(Pointwise(), tmp_path / 'v.nii.gz', data.SPECS['synapse'], 16, args)
    args.intensity = 'mri'
    P.predict_file(Pointwise(), tmp_path / 'v.nii.gz', data.SPECS['synapse'], 16, args)
    assert labels.shape == (2, 20, 24) and seen == ['ct', 'mri']
    args.intensity = None  # an RGB checkpoint has no rule for Hounsfield units: refused, not guessed
    with pytest.raises(data.DataError, match='v.nii.gz: a volume, but the checkpoint learnt RGB images'):
        P.predict_file(Pointwise(), tmp_path / 'v.nii.gz', data.SPECS['isic2017'], 16, args)

# ---- faults: nothing lost, nothing silent


def test_twins_keep_their_endings_and_out_is_never_the_input(tmp_path, capsys):
    src, ckpt = tmp_path / 'in', _best(tmp_path, 'isic2017', 2)
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(src / 'scan.png')
    Image.fromarray(rng.integers(0, 256, (25, 15, 3), dtype=np.uint8)).save(src / 'scan.jpg')
    assert P.main(['--ckpt', str(ckpt), '--input', str(src), '--out', str(tmp_path / 'out'), '--no-progress']) == 0
    assert np.asarray(Image.open(tmp_path / 'out' / 'scan_png_pred.png')).shape == (20, 30)  # two outputs, not one
    assert np.asarray(Image.open(tmp_path / 'out' / 'scan_jpg_pred.png')).shape == (25, 15)
    assert 'wrote 2 of 2 label maps' in capsys.readouterr().out
    before = sorted(p.name for p in src.iterdir())
    assert P.main(['--ckpt', str(ckpt), '--input', str(src), '--out', str(src), '--no-progress']) == 2
    err = capsys.readouterr().err
    assert f'error: {src} (--out) is also the input folder' in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in src.iterdir()) == before  # nothing written into it


def test_a_16_bit_tiff_is_predicted_as_its_8_bit_image(tmp_path):
    src, ckpt = tmp_path / 'in', _best(tmp_path, 'isic2017', 2)
    src.mkdir()
    a8 = np.random.default_rng(3).integers(0, 256, (30, 40), dtype=np.uint8)
    Image.fromarray(a8).save(src / 'eight.png')
    Image.fromarray(a8.astype(np.uint16) * 257).save(src / 'sixteen.tif')  # 65535 -> 255, never clipped to white
    assert P.main(['--ckpt', str(ckpt), '--input', str(src), '--out', str(tmp_path / 'out'), '--no-progress']) == 0
    eight, sixteen = (np.asarray(Image.open(tmp_path / 'out' / f'{n}_pred.png')) for n in ('eight', 'sixteen'))
    assert np.array_equal(eight, sixteen)
    # the image the model sees is the 8-bit one, pixel for pixel (a clip to 255 would make it white)
    assert np.array_equal(P.read_input(src / 'sixteen.tif').image, P.read_input(src / 'eight.png').image)
    assert P.read_input(src / 'sixteen.tif').image.std() > 50


def test_bad_out_and_device_fail_before_any_file(tmp_path, capsys):
    src, ckpt = tmp_path / 'in', _best(tmp_path, 'isic2017', 2)
    src.mkdir()
    for i in range(2):
        save_rgb(src / f'im{i}.png', np.full((10, 12, 3), 50 * i))
    (tmp_path / 'a_file').write_text('x')
    assert P.main(['--ckpt', str(ckpt), '--input', str(src), '--out', str(tmp_path / 'a_file' / 'o')]) == 2
    err, out = capsys.readouterr()[::-1]
    assert err.count('error:') == 1 and '(--out): cannot write there' in err and 'im0' not in err
    assert 'labels.json' not in out
    with pytest.raises(SystemExit) as e:
        P.main(['--ckpt', str(ckpt), '--input', str(src), '--out', str(tmp_path / 'o'), '--device', 'foo'])
    assert e.value.code == 2 and "argument --device: 'foo' is not a device" in capsys.readouterr().err


def test_out_inside_the_input_folder_is_refused(tmp_path, capsys):
    src, ckpt = tmp_path / 'in', _best(tmp_path, 'isic2017', 2)
    src.mkdir()
    save_rgb(src / 'a.png', np.full((10, 12, 3), 50))
    assert P.main(['--ckpt', str(ckpt), '--input', str(src), '--out', str(src / 'pred'), '--no-progress']) == 2
    err = capsys.readouterr().err
    assert f"error: {src / 'pred'} (--out) lies inside {src} (--input), the data it reads" in err
    assert [p.name for p in src.iterdir()] == ['a.png']
    assert P.main(['--ckpt', str(ckpt), '--input', str(src / 'a.png'), '--out', str(tmp_path / 'pred'),
                   '--no-progress']) == 0  # one file: any folder but its own


def test_non_finite_voxels_and_labels_outside_the_classes_are_named(tmp_path, capsys):
    src, ckpt = tmp_path / 'in', _best(tmp_path, 'synapse', 9)
    src.mkdir()
    hu = np.zeros((16, 16, 2), np.float32)
    hu[3, 4, 1] = np.nan
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(src / 'nan.nii.gz'))
    lab = np.zeros((2, 8, 8), np.float32)
    lab[0, 0, 0] = 12  # a 13-label file given to a 9-class checkpoint
    np.savez(src / 'other.npz', image=slice_image(lab), label=lab)
    assert P.main(['--ckpt', str(ckpt), '--input', str(src), '--out', str(tmp_path / 'out'), '--no-progress']) == 1
    err = capsys.readouterr().err
    assert f"error: {src / 'nan.nii.gz'}: 1 of 512 voxels are NaN or Inf (first: nan)" in err
    assert f"error: {src / 'other.npz'}: label 12 outside the 9 classes 0..8" in err
    assert not [p for p in (tmp_path / 'out').iterdir() if p.name != 'labels.json']  # nothing predicted of them


def test_ctrl_c_ends_in_one_line_and_an_interrupted_volume_leaves_no_file(tmp_path, capsys, monkeypatch):
    import builtins
    src, ckpt, out = tmp_path / 'in', _best(tmp_path, 'synapse', 9), tmp_path / 'out'
    src.mkdir()
    for name in ('a.nii.gz', 'b.nii.gz'):
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 2), np.float32), np.eye(4)), str(src / name))

    def interrupted(path, mode='r', *a, **kw):  # Ctrl-C while b's label map is being written
        f = builtins.open(path, mode, *a, **kw)
        if Path(path).name.startswith('b_pred.nii.gz.'):
            f.write(b'\x1f\x8b')
            f.close()
            raise KeyboardInterrupt
        return f
    monkeypatch.setattr(data, 'open', interrupted, raising=False)
    assert P.main(['--ckpt', str(ckpt), '--input', str(src), '--out', str(out), '--no-progress']) == 130
    err = capsys.readouterr().err
    assert err == '\ninterrupted: the label maps written so far are whole; run it again for the rest\n'
    assert not list(out.glob('b_*')) and nib.load(str(out / 'a_pred.nii.gz')).shape == (16, 16, 2)
