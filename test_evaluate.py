"""Tests for evaluate.py (paper Sec. 4.3): metrics with hand-derived answers, agreement with medpy, the
empty-mask rules, ISIC pooled vs per-image figures, checkpoint errors, and an end-to-end CLI run on the demo set.
CPU, offline, fast."""

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats
import torch

import data
import evaluate as E
import model as M
import predict

torch.set_num_threads(1)  # tiny tensors: more threads only add overhead, and stall badly on a loaded machine

SQ2, SQ3 = math.sqrt(2.0), math.sqrt(3.0)


def cube(shape, lo, size):
    """Boolean array with an axis-aligned box of `size` voxels per axis starting at `lo`."""
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, a + s) for a, s in zip(lo, size))] = True
    return m


def check(m, **expected):
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-12), (k, m[k], v)


# ---- metrics: hand-made masks with known answers

def test_cubes_offset_by_k_voxels_3d():
    # cubes of side 8 shifted by k along axis 0. Each surface's distances to the other (worked out by hand,
    # the same multiset in both directions): k=2 -> 168 zeros, 48 ones, 80 twos (296 surface voxels);
    # k=1 -> 196 zeros, 100 ones. Dice = (n-k)/n, IoU = (n-k)/(n+k).
    for k, hd95, asd in ((2, 2.0, (48 + 2 * 80) / 296), (1, 1.0, 100 / 296)):
        a = cube((14, 12, 12), (2, 2, 2), (8, 8, 8))
        b = cube((14, 12, 12), (2 + k, 2, 2), (8, 8, 8))
        for legacy in (False, True):  # symmetric case: both ASD definitions agree
            check(E.binary_metrics(a, b, legacy=legacy), dice=(8 - k) / 8, iou=(8 - k) / (8 + k), hd95=hd95, asd=asd)


def test_squares_offset_2d_and_segments_1d():
    # squares of side 8 shifted by 2: each direction 12 zeros, 4 ones, 12 twos -> ASD 1, HD95 2
    a, b = cube((12, 12), (1, 2), (8, 8)), cube((12, 12), (3, 2), (8, 8))
    check(E.binary_metrics(a, b), dice=0.75, iou=0.6, hd95=2.0, asd=1.0)
    # 1-D segments [0,10) and [3,13): the end points are 3 apart in both directions
    a, b = cube((16,), (0,), (10,)), cube((16,), (3,), (10,))
    check(E.binary_metrics(a, b), dice=0.7, iou=7 / 13, hd95=3.0, asd=3.0)


def test_concentric_cubes_asymmetric_asd():
    # inner cube side 4 inside a cube of side 6 (every face 1 voxel out). inner -> outer: 56 ones; outer ->
    # inner: 96 faces at 1, 48 edges at sqrt 2, 8 corners at sqrt 3. HD95 of the 208 values is sqrt 2.
    inner = cube((10, 10, 10), (3, 3, 3), (4, 4, 4))
    outer = cube((10, 10, 10), (2, 2, 2), (6, 6, 6))
    far = 96 + 48 * SQ2 + 8 * SQ3
    check(E.binary_metrics(inner, outer), dice=128 / 280, iou=64 / 216, hd95=SQ2, asd=(56 + far) / 208)
    check(E.binary_metrics(inner, outer, legacy=True), asd=(1 + far / 152) / 2)
    check(E.binary_metrics(outer, inner), asd=(56 + far) / 208)  # a real metric: order does not matter


def test_perfect_and_disjoint():
    a = cube((9, 9, 9), (1, 1, 1), (4, 5, 3))
    check(E.binary_metrics(a, a), dice=1.0, iou=1.0, hd95=0.0, asd=0.0)
    # side-4 squares 6 columns apart: distances from column x to the other's near edge are 6 - x (x = 0..3)
    a, b = cube((6, 14), (1, 0), (4, 4)), cube((6, 14), (1, 6), (4, 4))
    d = [6] * 4 + [5] * 2 + [4] * 2 + [3] * 4  # the 12 surface pixels of one square, by column
    check(E.binary_metrics(a, b), dice=0.0, iou=0.0, asd=float(np.mean(d)), hd95=float(np.percentile(d + d, 95)))


def test_bounding_box_crop_is_exact():
    # masks that touch the array's edges against the same masks inside a large zero frame
    rng = np.random.default_rng(0)
    a, b = rng.random((20, 24, 18)) < 0.3, rng.random((20, 24, 18)) < 0.2
    a[0], b[:, -1] = True, True
    big_a, big_b = np.zeros((40, 44, 38), bool), np.zeros((40, 44, 38), bool)
    big_a[10:30, 10:34, 10:28], big_b[10:30, 10:34, 10:28] = a, b
    small, big = E.binary_metrics(a, b), E.binary_metrics(big_a, big_b)
    for k in E.METRICS:
        assert small[k] == big[k]


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match='differ in shape'):
        E.binary_metrics(np.ones((3, 3), bool), np.ones((3, 4), bool))


# ---- agreement with medpy (dc, jc, hd95, assd) to 1e-6

def _random_masks(rng, ndim):
    from scipy import ndimage
    shape = tuple(int(s) for s in rng.integers(4, 24 if ndim == 3 else 48, size=ndim))
    a = ndimage.binary_opening(rng.random(shape) < rng.uniform(0.2, 0.7)) | (rng.random(shape) < 0.01)
    b = rng.random(shape) < rng.uniform(0.02, 0.5)
    return a, b


@pytest.mark.parametrize('ndim', [2, 3])
def test_agrees_with_medpy(ndim):
    mb = pytest.importorskip('medpy.metric.binary')
    rng = np.random.default_rng(ndim)
    n = 0
    for _ in range(40):
        a, b = _random_masks(rng, ndim)
        if not (a.any() and b.any()):
            continue
        n += 1
        ours, legacy = E.binary_metrics(a, b), E.binary_metrics(a, b, legacy=True)
        assert ours['dice'] == pytest.approx(mb.dc(a, b), abs=1e-6)
        assert ours['iou'] == pytest.approx(mb.jc(a, b), abs=1e-6)
        assert ours['hd95'] == pytest.approx(mb.hd95(a, b), abs=1e-6)
        assert legacy['hd95'] == pytest.approx(mb.hd95(a, b), abs=1e-6)
        # default ASD = the installed medpy's assd (>= 0.5: one mean over both surfaces); legacy = medpy < 0.5's
        # mean of the two directed means, which is what the published tables ran
        assert ours['asd'] == pytest.approx(mb.assd(a, b), abs=1e-6)
        assert legacy['asd'] == pytest.approx((mb.asd(a, b) + mb.asd(b, a)) / 2, abs=1e-6)
    assert n >= 30


# ---- empty masks: the default rule and TransUNet's (--legacy)

def test_empty_mask_default_rule():
    full, empty = cube((6, 8, 10), (1, 1, 1), (2, 3, 4)), np.zeros((6, 8, 10), bool)
    assert all(math.isnan(v) for v in E.binary_metrics(empty, empty).values())
    diag = math.sqrt(6 ** 2 + 8 ** 2 + 10 ** 2)
    for pred, gt in ((full, empty), (empty, full)):  # hallucinated or missed: worst distance, Dice 0
        check(E.binary_metrics(pred, gt), dice=0.0, iou=0.0, hd95=diag, asd=diag)


def test_bbox_grows_by_the_margin_and_stops_at_the_edges():
    m = np.zeros((6, 5, 4), bool)
    m[2:4, 0:3, 3] = True
    assert E._bbox(m) == (slice(1, 5), slice(0, 4), slice(2, 4))
    assert E._bbox(m, margin=0) == (slice(2, 4), slice(0, 3), slice(3, 4))


def test_empty_mask_legacy_rule():
    full, empty = cube((5, 5), (1, 1), (2, 2)), np.zeros((5, 5), bool)
    check(E.binary_metrics(full, empty, legacy=True), dice=1.0, iou=1.0, hd95=0.0, asd=0.0)
    check(E.binary_metrics(empty, full, legacy=True), dice=0.0, iou=0.0, hd95=0.0, asd=0.0)
    check(E.binary_metrics(empty, empty, legacy=True), dice=0.0, iou=0.0, hd95=0.0, asd=0.0)


def _spec(kind='volume', name='toy', classes=('background', 'a', 'b')):
    return SimpleNamespace(name=name, kind=kind, num_classes=len(classes), class_names=classes,
                           report_order=tuple(range(1, len(classes))),
                           figure='pooled_256' if name.startswith('isic') else 'mean')


def test_summary_means_under_both_rules():
    # class 'b' is absent from case 2's ground truth: the model predicts a stray blob there (case 2) or
    # nothing (case 3). Default: case 2 counts as Dice 0, case 3 is skipped. Legacy: 1 and 0.
    spec = _spec()
    gt1 = np.zeros((4, 10, 10), np.int64)
    gt1[1:3, 2:6, 2:6], gt1[1:3, 6:9, 6:9] = 1, 2
    gt23 = gt1.copy()
    gt23[gt23 == 2] = 0
    pred2 = gt23.copy()
    pred2[0, 0, 0] = 2
    rows = (E.case_rows('c1', gt1, gt1, spec) + E.case_rows('c2', pred2, gt23, spec)
            + E.case_rows('c3', gt23, gt23, spec))
    s = E.summarize(rows, spec)
    assert s['per_class']['a']['dice'] == 1.0 and s['per_class']['a']['n'] == 3
    assert s['per_class']['b']['dice'] == 0.5 and s['per_class']['b']['n'] == 2
    assert s['mean_dice'] == 0.75 and s['rule'] == 'default'
    legacy = [E.case_rows(c, p, g, spec, legacy=True) for c, p, g in
              (('c1', gt1, gt1), ('c2', pred2, gt23), ('c3', gt23, gt23))]
    s = E.summarize(sum(legacy, []), spec, legacy=True)
    assert s['per_class']['b']['dice'] == pytest.approx(2 / 3) and s['per_class']['b']['hd95'] == 0.0
    assert s['rule'] == 'legacy'


# ---- ISIC: pooled confusion matrix vs per-image means

def test_isic_pooled_vs_per_image():
    # image 1: 8-pixel lesion found exactly; image 2: 1-pixel lesion missed, 1 false positive pixel.
    # pooled: TP 8, FP 1, FN 1, TN 22 -> Dice 16/18, SE 8/9, SP 22/23; per image: Dice (1 + 0)/2, SE 1/2
    spec = _spec(kind='image', name='isic2017', classes=('background', 'lesion'))
    g1 = np.zeros((4, 4), np.int64)
    g1[:2] = 1
    g2 = np.zeros((4, 4), np.int64)
    g2[3, 3] = 1
    p2 = np.zeros((4, 4), np.int64)
    p2[0, 0] = 1
    rows = E.case_rows('i1', g1, g1, spec, distances=False) + E.case_rows('i2', p2, g2, spec, distances=False)
    s = E.summarize(rows, spec)
    assert s['pooled_native']['dice'] == pytest.approx(16 / 18)
    assert s['mean_dice'] == s['pooled_256']['dice']  # Table 3's figure (4x4 images: see test_isic_pooled_256)
    assert s['pooled_native']['se'] == pytest.approx(8 / 9)
    assert s['pooled_native']['sp'] == pytest.approx(22 / 23)
    assert s['pooled_native']['acc'] == pytest.approx(30 / 32)
    assert s['per_image']['dice'] == pytest.approx(0.5) and s['mean_dice_per_image'] == pytest.approx(0.5)
    assert s['per_image']['se'] == pytest.approx(0.5)
    assert s['per_image']['sp'] == pytest.approx((1 + 14 / 15) / 2)
    assert math.isnan(rows[0]['hd95'])  # distances skipped on request
    # GlaS (figure 'mean'): the headline is the per-image mean
    glas = E.summarize(rows, _spec(kind='image', name='glas', classes=('background', 'lesion')))
    assert glas['mean_dice'] == pytest.approx(0.5)


# ---- checkpoints

def tiny_model(num_classes=2, img_size=32):
    # HAP stream only (Table 5's A.2 switch) with narrow widths: a checkpoint of a few hundred kB
    return M.danie('S', num_classes=num_classes, img_size=img_size, sap=False, fusion='add',
                   dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))


def ckpt_dict(net, data_info=None, train_state=None, spec='demo'):
    info = {'name': 'demo', 'root': 'nowhere', **(data_info or {}), 'spec': dataclasses.asdict(data.SPECS[spec])}
    fields = dict(data=info, args={'lr': 1e-4}, init='scratch', epoch=1, step=2, metric=0.5)
    return M.checkpoint(net, **fields, **({} if train_state is None else {'train': train_state}))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(M.CheckpointError, match='no such checkpoint'):
        M.load_checkpoint(tmp_path / 'missing.pth')
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'\x00not a torch file' * 50)
    with pytest.raises(M.CheckpointError, match='not a readable PyTorch checkpoint') as e:
        M.load_checkpoint(garbage)
    assert len(str(e.value).splitlines()) == 1 and 'weights_only' not in str(e.value)  # not torch's advice
    torch.save({'format': M.FORMAT, 'args': SimpleNamespace(lr=1)}, garbage)  # a pickled object, not tensors
    with pytest.raises(M.CheckpointError, match=r'garbage.pth: not a readable .*holds Python objects \(types.Simp'
                       ) as e:
        M.load_checkpoint(garbage)
    assert len(str(e.value).splitlines()) == 1 and 'file an issue' not in str(e.value)
    other = tmp_path / 'other.pth'
    torch.save({'state_dict': {'w': torch.zeros(2)}}, other)
    with pytest.raises(M.CheckpointError, match="no 'format' key"):
        M.load_checkpoint(other)
    torch.save([1, 2, 3], other)
    with pytest.raises(M.CheckpointError, match='not a DANIE checkpoint'):
        M.load_checkpoint(other)
    torch.save({'format': 'danie-ckpt-v0', 'config': {}, 'model': {}, 'data': {'name': 'demo'}}, other)
    with pytest.raises(M.CheckpointError, match="'danie-ckpt-v0'"):
        M.load_checkpoint(other)


def test_checkpoint_roundtrip_and_state_dict_mismatch(tmp_path):
    torch.manual_seed(0)
    net = tiny_model()
    path = tmp_path / 'ok.pth'
    torch.save(ckpt_dict(net), path)
    back = M.from_checkpoint(M.load_checkpoint(path))
    x = torch.randn(1, 3, 32, 32)
    net.eval(), back.eval()
    with torch.no_grad():
        assert torch.equal(net(x)[0], back(x)[0])

    ck = ckpt_dict(net)
    first = next(iter(ck['model']))
    del ck['model'][first]
    ck['model']['extra.weight'] = torch.zeros(1)
    with pytest.raises(M.CheckpointError, match=f'Missing key.*"{first}".*Unexpected key.*"extra.weight"'):
        M.from_checkpoint(ck)
    ck = ckpt_dict(net)
    key = next(k for k, v in ck['model'].items() if v.ndim == 4)
    ck['model'][key] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(M.CheckpointError, match=f'size mismatch for {key}'):
        M.from_checkpoint(ck)
    ck = ckpt_dict(net)  # the weights of another model: counts and a few names, not a dump of every key
    ck['model'] = M.danie('S', num_classes=2, img_size=32).state_dict()
    with pytest.raises(M.CheckpointError, match=r'Unexpected key\(s\) \(\d+\): .*size mismatches in all') as e:
        M.from_checkpoint(ck)
    assert len(str(e.value)) < 800 and len(str(e.value).splitlines()) == 1
    ck = ckpt_dict(net)
    ck['config']['window'] = 7
    with pytest.raises(M.CheckpointError, match="fields \\['window'\\]"):
        M.from_checkpoint(ck)


def test_cli_reports_checkpoint_errors(tmp_path, capsys):
    assert E.main(['--ckpt', str(tmp_path / 'none.pth')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'none.pth' in err and 'Traceback' not in err


# ---- protocol and end to end on the demo set

class Constant(torch.nn.Module):
    """Predicts class 1 on the left half of the input and 0 elsewhere; returns (y, heads) like DANIE."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        y = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        y[:, 1, :, : x.shape[-1] // 2] = 1.0
        return y + self.w, []


def test_evaluate_restores_training_mode():
    net = Constant().train()
    case = data.Item(id='v', image=np.zeros((3, 32, 32), np.float32), label=np.zeros((3, 32, 32), np.int64))
    case.label[:, :, :16] = 1
    s = E.evaluate(net, [case], _spec(classes=('background', 'x')), 32, device='cpu', progress=False)
    assert net.training
    assert s['mean_dice'] == 1.0 and s['mean_hd95'] == 0.0 and len(s['cases']) == 1
    assert s['timing']['predict_s'] >= 0


def test_evaluate_images_and_png_export(tmp_path):
    # two RGB images at their mask's size (not the model's): the left-half prediction is resized back
    spec = _spec(kind='image', name='isic2017', classes=('background', 'lesion'))
    cases = []
    for i, (h, w) in enumerate(((40, 60), (50, 30))):
        label = np.zeros((h, w), np.int64)
        label[:, : w // 2] = 1
        label[0, -1] = 1  # one missed pixel each
        cases.append(data.Item(id=f'img{i}', image=np.full((h, w, 3), 128, np.uint8), label=label))
    s = E.evaluate(Constant(), cases, spec, 32, device='cpu', progress=False, save_pred=tmp_path)
    tp = 40 * 30 + 50 * 15
    assert s['pooled_native']['dice'] == pytest.approx(2 * tp / (2 * tp + 2)) and s['pooled_native']['sp'] == 1.0
    assert math.isnan(s['mean_hd95'])  # no distances for image sets unless asked
    from PIL import Image
    mask = np.asarray(Image.open(tmp_path / 'img1_pred.png'))
    assert mask.shape == (50, 30) and set(np.unique(mask)) == {0, 1}  # class ids (data.write_prediction)
    assert np.asarray(Image.open(tmp_path / 'img0_overlay.png')).shape == (40, 60, 3)


def test_cli_missing_dataset(tmp_path, capsys):
    path = tmp_path / 'best.pth'
    torch.save(ckpt_dict(tiny_model(num_classes=9), {'name': 'demo', 'root': str(tmp_path / 'no_data')}), path)
    assert E.main(['--ckpt', str(path), '--no-progress']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'no_data' in err


def test_cli_end_to_end_demo(tmp_path, capsys):
    root = data.make_demo(tmp_path / 'demo')
    spec = data.SPECS['demo']
    torch.manual_seed(0)
    net = tiny_model(num_classes=spec.num_classes, img_size=32)
    path = tmp_path / 'run' / 'best.pth'
    path.parent.mkdir()
    torch.save(ckpt_dict(net, {'name': 'demo', 'root': str(root), 'seed': 0}), path)
    pred_dir = tmp_path / 'pred'
    assert E.main(['--ckpt', str(path), '--limit', '1', '--no-progress', '--save-pred', str(pred_dir)]) == 0
    out = capsys.readouterr().out
    assert 'mean' in out and 'paper row' in out and 'DANIE-' not in out  # the demo is in no table of the paper
    summary = json.loads((path.parent / 'eval_test' / 'summary.json').read_text())
    assert summary['paper'] is None and summary['mean_dice_ci'] == [None, None]  # one case: no interval
    assert summary['n_cases'] == 1 and summary['split'] == 'test' and summary['rule'] == 'default'
    assert summary['mean_dice'] is None or 0.0 <= summary['mean_dice'] <= 1.0
    assert set(summary['per_class']) == {spec.class_names[c] for c in spec.report_order}
    lines = (path.parent / 'eval_test' / 'per_case.csv').read_text().splitlines()
    assert lines[0] == 'case,class,dice,iou,hd95,asd' and len(lines) == 1 + len(spec.report_order)
    case = data.eval_cases('demo', root, 'test')[0]
    nib = pytest.importorskip('nibabel')
    vol = nib.load(str(pred_dir / f'{case.id}_pred.nii.gz')).get_fdata()
    assert vol.shape == case.label.shape[::-1] and vol.max() < spec.num_classes
    assert list(pred_dir.glob(f'{case.id}_overlay_z*.png'))  # --save-pred: PNG overlays for volumes too
    # the held-out validation split under the legacy rule, into another folder
    assert E.main(['--ckpt', str(path), '--split', 'val', '--legacy', '--limit', '1', '--no-progress',
                   '--out', str(tmp_path / 'val')]) == 0
    summary = json.loads((tmp_path / 'val' / 'summary.json').read_text())
    assert summary['split'] == 'val' and summary['rule'] == 'legacy' and 0.0 <= summary['mean_dice'] <= 1.0


def test_legacy_reaches_image_sets_scored_without_distances(tmp_path, monkeypatch):
    """--legacy on images (overlap only, no HD95/ASD): an empty mask under a non-empty prediction scores Dice 1
    under TransUNet's rule, 0 under ours; the other image is predicted exactly under both."""
    from PIL import Image
    root = tmp_path / 'd'
    (root / 'images').mkdir(parents=True)
    (root / 'masks').mkdir()
    for i, lesion in enumerate((True, False)):
        mask = np.zeros((16, 20), np.uint8)
        mask[:, :10] = lesion  # Constant's left half, or nothing
        Image.fromarray(np.full((16, 20, 3), 100, np.uint8)).save(root / 'images' / f'im{i}.png')
        Image.fromarray(mask).save(root / 'masks' / f'im{i}.png')
    (root / 'classes.txt').write_text('background\nlesion\n')
    (root / 'test.txt').write_text('im0\nim1\n')
    info = dict(name='folder', root=str(root), seed=0, spec=dataclasses.asdict(data.get_spec('folder', root)))
    torch.save(M.checkpoint(tiny_model(), data=info, args={}, init='scratch', epoch=1, step=1, metric=None),
               tmp_path / 'best.pth')
    monkeypatch.setattr(M, 'from_checkpoint', lambda ckpt, name='checkpoint': Constant())
    scores = {}
    for flags in ([], ['--legacy']):
        out = tmp_path / f'eval{len(flags)}'
        assert E.main(['--ckpt', str(tmp_path / 'best.pth'), '--out', str(out), '--no-progress', *flags]) == 0
        summary = json.loads((out / 'summary.json').read_text())
        assert summary['n_cases'] == 2 and summary['mean_hd95'] is None  # no distances for images
        scores[summary['rule']] = summary['mean_dice'], summary['mean_iou']
    assert scores == {'default': (0.5, 0.5), 'legacy': (1.0, 1.0)}


def test_cli_prints_the_papers_row_for_a_benchmark(tmp_path, capsys, monkeypatch):
    # a DANIE-S checkpoint of Synapse, scored on two demo volumes (Synapse's layout and classes): the table has
    # Table 1's DANIE-S row under ours, under either rule, and summary.json keeps it with our intervals
    root = data.make_demo(tmp_path / 'demo')
    path = tmp_path / 'run' / 'best.pth'
    path.parent.mkdir()
    torch.manual_seed(0)
    torch.save(ckpt_dict(tiny_model(num_classes=9), {'name': 'synapse', 'root': str(root), 'seed': 0}, spec='synapse'),
               path)
    eval_cases = data.eval_cases
    monkeypatch.setattr(data, 'eval_cases', lambda name, *a, **kw: eval_cases('demo', *a, **kw))
    for flags in ([], ['--legacy']):
        assert E.main(['--ckpt', str(path), '--limit', '2', '--no-progress', '--out', str(tmp_path / 'e'), *flags]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[-2].split()[:6] == ['DANIE-S', '(T1)', '84.21', '75.42', '3.65', '-'] and out[-3].startswith('ours')
        summary = json.loads((tmp_path / 'e' / 'summary.json').read_text())
        assert summary['paper'] == dict(E.paper_row('synapse', 'S')) and summary['paper']['table'] == 1
        assert summary['rule'] == ('legacy' if flags else 'default') and len(summary['mean_dice_ci']) == 2


# ---- checkpoint layout: best.pth (no training state) and last.pth (with it)

def test_checkpoint_best_and_last(tmp_path):
    torch.manual_seed(0)
    net = tiny_model()
    best, last = tmp_path / 'best.pth', tmp_path / 'last.pth'
    torch.save(ckpt_dict(net), best)
    torch.save(ckpt_dict(net, train_state={'optimizer': {}, 'epoch_step': 0}), last)
    ck = M.load_checkpoint(best)
    assert 'train' not in ck and ck['format'] == 'danie-ckpt-v2' and ck['init'] == 'scratch'
    assert data.spec_from_dict(ck['data']['spec']) == data.SPECS['demo']
    M.from_checkpoint(ck)  # evaluation needs no training state
    with pytest.raises(M.CheckpointError, match='best.pth: no training state.*last.pth'):
        M.load_checkpoint(best, resume=True)
    assert M.load_checkpoint(last, resume=True)['train']['epoch_step'] == 0


def test_checkpoint_of_wrapped_model_and_prefix_hint():
    net = tiny_model()

    class Compiled(torch.nn.Module):  # what torch.compile returns: the model under _orig_mod
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m
    ck = M.checkpoint(Compiled(net), data={'name': 'demo'}, args={}, init='scratch', epoch=0, step=0, metric=None)
    assert set(ck['model']) == set(net.state_dict())
    ck['model'] = {f'module.{k}': v for k, v in ck['model'].items()}
    with pytest.raises(M.CheckpointError, match="Missing key.*'module.'.*save the bare module"):
        M.from_checkpoint(ck)


# ---- the device path equals the former numpy path (scipy zoom, numpy counts)

# ---- ISIC at Table 3's resolution: Azad et al.'s mask resize, pooled at 256x256

@pytest.mark.parametrize('hw', [(1024, 1536), (700, 500), (200, 150), (767, 1022), (256, 256)])
def test_table_resize_is_pillow_bilinear(hw):
    # scipy.misc.imresize(mask, [256, 256], interp='bilinear') = Pillow's BILINEAR on the 0/255 image; > 127
    from PIL import Image
    from scipy import ndimage
    rng = np.random.default_rng(hw[0])
    for sigma in (3, 25):
        m = ndimage.gaussian_filter(rng.random(hw), sigma) > 0.5
        pil = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((256, 256), Image.BILINEAR)) > 127
        assert np.array_equal(E.table_resize(torch.from_numpy(m)[None])[0].numpy(), pil)


def test_isic_pooled_256_vs_native_by_hand():
    # the model predicts the left half. Image A, 512x512: lesion = top half; image B, 256x256: lesion = the
    # left quarter. Native counts: A tp 65536 fp 65536 fn 65536 tn 65536; B tp 16384 fp 16384 fn 0 tn 32768.
    # At 256x256 A shrinks 4x (its halves stay halves): 16384 each; B is unchanged. A's 4x weight at native
    # resolution pulls every pooled figure down.
    spec = _spec(kind='image', name='isic2018', classes=('background', 'lesion'))
    a = np.zeros((512, 512), np.int64)
    a[:256] = 1
    b = np.zeros((256, 256), np.int64)
    b[:, :64] = 1
    cases = [data.Item('A', np.zeros((512, 512, 3), np.uint8), a), data.Item('B', np.zeros((256, 256, 3), np.uint8), b)]
    s = E.evaluate(Constant(), cases, spec, 32, device='cpu', progress=False)
    native, t256 = s['pooled_native'], s['pooled_256']
    # native: tp 81920, fp 81920, fn 65536, tn 98304
    assert native['dice'] == pytest.approx(10 / 19) and native['se'] == pytest.approx(5 / 9)
    assert native['sp'] == pytest.approx(6 / 11) and native['acc'] == pytest.approx(0.55)
    # 256x256: tp 32768, fp 32768, fn 16384, tn 49152
    assert t256['dice'] == pytest.approx(4 / 7) and t256['se'] == pytest.approx(2 / 3)
    assert t256['sp'] == pytest.approx(3 / 5) and t256['acc'] == pytest.approx(5 / 8)
    assert s['mean_dice'] == t256['dice'] and s['mean_dice_per_image'] == pytest.approx((1 / 2 + 2 / 3) / 2)
    table = E.format_table(s, spec)
    assert 'pooled 256' in table and 'pooled native' in table


def test_channels_last_computes_the_same_function():
    torch.manual_seed(0)
    net = tiny_model(num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)[0]
        fast = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))[0]
    assert torch.allclose(ref, fast, atol=1e-5, rtol=1e-4)


def test_volumes_are_scored_whole_not_slice_by_slice():
    # the left-half model on a 3-slice volume: slice 0 found exactly, slice 1 half wrong, slice 2 empty in
    # the ground truth. In 3-D: Dice 2 * 48 / (96 + 48) = 2/3; a mean over slices would give (1 + 2/3 + 0) / 3.
    mb = pytest.importorskip('medpy.metric.binary')
    gt = np.zeros((3, 8, 8), np.int64)
    gt[0, :, :4], gt[1, :, :2] = 1, 1
    pred = np.zeros_like(gt)
    pred[:, :, :4] = 1
    case = data.Item('v', np.zeros((3, 8, 8), np.float32), gt)
    s = E.evaluate(Constant(), [case], _spec(classes=('background', 'x')), 32, device='cpu', progress=False)
    x = s['per_class']['x']
    assert x['dice'] == pytest.approx(2 / 3) and x['iou'] == pytest.approx(0.5)
    assert x['hd95'] == pytest.approx(mb.hd95(pred, gt)) and x['asd'] == pytest.approx(mb.assd(pred, gt))
    assert x['hd95'] == pytest.approx(2.0) and s['n_cases'] == 1


# ---- faults: every flag checked before any work, one line each

def test_device_and_out_are_checked_before_any_case_is_scored(tmp_path, capsys, monkeypatch):
    path = tmp_path / 'best.pth'
    torch.save(ckpt_dict(tiny_model(num_classes=9), {'name': 'demo', 'root': str(tmp_path / 'demo')}), path)
    for device in ('foo', 'cuda:7' if torch.cuda.is_available() else 'cuda'):
        with pytest.raises(SystemExit) as e:
            E.main(['--ckpt', str(path), '--device', device])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument --device: '{device}' is not a device of this machine" in err
        assert 'Traceback' not in err
    (tmp_path / 'a_file').write_text('x')  # an --out that cannot be made (a file stands where its parent would)
    scored = []
    monkeypatch.setattr(E, 'evaluate', lambda *a, **kw: scored.append(1))
    assert E.main(['--ckpt', str(path), '--out', str(tmp_path / 'a_file' / 'eval'), '--no-progress']) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'a_file' / 'eval'} (--out): cannot write there (" in err and not scored


# ---- the intervals: a seeded percentile bootstrap over the cases

def _compositions(n):
    """Every resample of n cases as the times each case is drawn (stars and bars: C(2n-1, n-1) vectors)."""
    for bars in itertools.combinations(range(2 * n - 1), n - 1):
        edges = (-1,) + bars + (2 * n - 1,)
        yield np.array([b - a - 1 for a, b in zip(edges, edges[1:])], float)


def _exact_quantiles(n, statistic, ps):
    """The quantiles of the exact bootstrap distribution of statistic(w) over all n^n resamples, enumerated by
    their multinomial weights; resamples where the statistic is NaN are left out."""
    values, probs = [], []
    for w in _compositions(n):
        v = statistic(w)
        if not math.isnan(v):
            values.append(v)
            probs.append(math.factorial(n) / math.prod(math.factorial(int(k)) for k in w))
    order = np.argsort(values)
    cdf = np.cumsum(np.asarray(probs)[order]) / sum(probs)
    return [np.asarray(values)[order][np.searchsorted(cdf, p - 1e-12)] for p in ps]


def _volume_rows(dice, names=('a', 'b')):
    """Rows of len(dice[0]) cases, dice[k][j] the Dice of class names[k] in case j; IoU = Dice / 2."""
    return [{'case': f'c{j}', 'class': n, 'dice': d[j], 'iou': d[j] / 2, 'hd95': 1.0, 'asd': 1.0}
            for n, d in zip(names, dice) for j in range(len(dice[0]))]


def test_interval_by_hand():
    spec = _spec()
    # every case alike: every resample gives the same figure, a zero-width interval
    s = E.summarize(_volume_rows([[0.75] * 6, [0.5] * 6]), spec)
    assert s['per_class']['a']['dice_ci'] == [0.75, 0.75] and s['mean_dice_ci'] == pytest.approx([0.625, 0.625])
    # five cases at 0 and five at 1: a resample's mean is k/10, k ~ Binomial(10, 1/2). P(k <= 1) = 11/1024 and
    # P(k <= 2) = 56/1024 straddle 2.5%, symmetrically for 97.5%: [0.2, 0.8] (with 1,000 resamples, ~11 and ~55
    # of them fall at k <= 1 and k <= 2, far from the 25th)
    s = E.summarize(_volume_rows([[0.0] * 5 + [1.0] * 5, [1.0] * 10]), spec)
    assert s['per_class']['a']['dice_ci'] == pytest.approx([0.2, 0.8]) and s['per_class']['a']['dice'] == 0.5
    assert s['mean_dice_ci'] == pytest.approx([0.6, 0.9])  # class b is 1 in every resample
    # on any values: scipy.stats.bootstrap's own percentile interval, same seed, resampling the values themselves
    x = np.random.default_rng(7).uniform(0.3, 1.0, (2, 12))
    s = E.summarize(_volume_rows(x), spec)
    ref = lambda *data, stat: stats.bootstrap(  # noqa: E731
        data, stat, n_resamples=E.CI_RESAMPLES, method='percentile', paired=len(data) > 1,
        random_state=np.random.default_rng(E.CI_SEED)).confidence_interval
    assert s['per_class']['b']['dice_ci'] == pytest.approx(list(ref(x[1], stat=np.mean)), abs=1e-12)
    both = ref(*x, stat=lambda a, b, axis: (a.mean(axis) + b.mean(axis)) / 2)
    assert s['mean_dice_ci'] == pytest.approx(list(both), abs=1e-12)
    assert s['ci'] == '95% percentile bootstrap over the cases, 1000 resamples, seed 0'


def test_interval_skips_cases_without_the_class_as_the_mean_does():
    # class 'a' is absent (NaN, both masks empty) from four of eight cases. A replicate's mean skips them, as the
    # figure does; a replicate that draws none of the other four (P = 1/2^8: a few of the 1,000, each of which
    # makes a plain percentile NaN) is left out. Reference: the exact bootstrap distribution, all 8^8 resamples
    # enumerated; 1,000 seeded resamples put the 2.5% point between its 1.5% and 3.5% points, and the 97.5% point
    # likewise. Counting absent cases as 0 would give about [0.04, 0.53]: far outside.
    x = np.array([0.9, 0.8, np.nan, 0.3, np.nan, np.nan, np.nan, 0.1])
    ok = np.isfinite(x)
    lo, hi = E.summarize(_volume_rows([x, np.ones(8)]), _spec())['per_class']['a']['dice_ci']
    exact = _exact_quantiles(8, lambda w: (w[ok] @ x[ok]) / w[ok].sum() if w[ok].sum() else math.nan,
                             (0.015, 0.035, 0.965, 0.985))
    assert exact[0] <= lo <= exact[1] and exact[2] <= hi <= exact[3], (lo, hi, exact)
    # fewer than two cases: no interval
    s = E.summarize(_volume_rows([[0.5], [0.7]]), _spec())
    assert all(math.isnan(v) for v in s['per_class']['a']['dice_ci'] + s['mean_dice_ci'])


def _image_row(case, tp, fp, fn, tn):
    """A row of case_rows() for one lesion image from its confusion counts (the same at 256x256)."""
    scores = E.confusion_scores(tp, fp, fn, tn)
    return {'case': case, 'class': 'lesion', **scores, 'iou': tp / (tp + fp + fn), 'hd95': math.nan,
            'asd': math.nan, **dict(zip(E.COUNTS, (tp, fp, fn, tn))),
            **{f'{k}_256': v for k, v in zip(E.COUNTS, (tp, fp, fn, tn))}}


def test_pooled_interval_pools_the_drawn_images_again():
    # six images of very different lesion sizes: the pooled Dice weighs the large ones (0.869 over all six), the
    # per-image mean does not (0.589). A replicate pools the drawn images' counts again, so its interval follows the
    # pooled figure's exact bootstrap distribution (6^6 resamples enumerated), not the per-image Dice's.
    c = np.array([[90, 10, 0, 100], [0, 2, 2, 100], [5, 5, 5, 100], [40, 0, 10, 100], [1, 3, 0, 100],
                  [20, 5, 5, 100]], float)
    rows = [_image_row(f'i{j}', *map(int, n)) for j, n in enumerate(c)]
    s = E.summarize(rows, _spec(kind='image', name='isic2017', classes=('background', 'lesion')))
    pooled = lambda w: 2 * (w @ c[:, 0]) / (w @ (2 * c[:, 0] + c[:, 1] + c[:, 2]))  # noqa: E731
    dice = 2 * c[:, 0] / (2 * c[:, 0] + c[:, 1] + c[:, 2])
    ps = (0.015, 0.035, 0.965, 0.985)
    exact = _exact_quantiles(6, pooled, ps)  # [0.48, 0.61] and [0.923, 0.930]
    for key in ('pooled_256', 'pooled_native'):
        lo, hi = s[key]['dice_ci']
        assert s[key]['dice'] == pytest.approx(pooled(np.ones(6))) and s['mean_dice_ci'] == s['pooled_256']['dice_ci']
        assert exact[0] <= lo <= exact[1] and exact[2] <= hi <= exact[3], (key, lo, hi, exact)
    (lo, hi), per_image = s['per_image']['dice_ci'], _exact_quantiles(6, lambda w: (w @ dice) / 6, ps)
    assert per_image[0] <= lo <= per_image[1] and per_image[2] <= hi <= per_image[3]
    assert lo < exact[0] - 0.15 and hi < exact[2] - 0.05  # the per-image interval, [0.30, 0.83], is another one
    assert s['mean_dice_per_image_ci'] == s['per_image']['dice_ci']
    # SE pooled again too: tp / (tp + fn) of the drawn images' sums, against scipy on the counts themselves
    ref = stats.bootstrap(tuple(c.T), lambda tp, fp, fn, tn, axis: tp.sum(axis) / (tp + fn).sum(axis), paired=True,
                          n_resamples=E.CI_RESAMPLES, method='percentile', random_state=np.random.default_rng(0))
    assert s['pooled_256']['se_ci'] == pytest.approx(list(ref.confidence_interval), abs=1e-12)


def test_interval_cost():
    # 1,000 resamples of 600 ISIC images (Table 3's test set), every figure: well under a second
    rng = np.random.default_rng(0)
    rows = [_image_row(f'i{j}', *(int(v) for v in rng.integers(1, 10_000, 4))) for j in range(600)]
    spec = _spec(kind='image', name='isic2017', classes=('background', 'lesion'))
    t = time.perf_counter()
    E.summarize(rows, spec)
    assert time.perf_counter() - t < 1.0


# ---- the paper's rows

# Tables 1-4's DANIE rows, quoted from the paper's text as extracted (Table 1 prints both sizes in one row, each cell
# 'S L'; its columns: DICE, mIoU, ASD, GFLOPs, Aorta, GB, KL, KR, Liver, PC, SP, SM. Table 3: GFLOPs, then ISIC
# 2017's DICE, SE, SP, ACC, then ISIC 2018's. Table 4: GFLOPs, mDICE, mIoU)
TABLE1 = ('DANIE-S (our) DANIE-L (our)\t84.21 85.47\t75.42 76.60\t3.65 2.76\t13.29 26.55\t87.31 88.17\t73.11 77.80\t'
          '85.29 88.59\t83.86 84.68\t95.20 94.84\t70.20 71.94\t92.85 91.95\t85.90 85.82')
TABLE2 = 'DANIE-L (our)\t92.36\t90.12\t90.99\t96.00'
TABLE3 = 'DANIE-S (our)\t13.29\t93.84\t92.92\t98.73\t97.58\t93.32\t95.34\t96.63\t96.28'
TABLE4 = 'DANIE-L (our)\t26.55\t92.65\t86.28'


def test_paper_rows_against_the_paper_text():
    cells = TABLE1.split('\t')[1:]
    organs = ('aorta', 'gallbladder', 'kidney_l', 'kidney_r', 'liver', 'pancreas', 'spleen', 'stomach')
    for i, size in enumerate('SL'):
        v = [float(c.split()[i]) for c in cells]
        assert E.PAPER['synapse', size] == (1, dict(dice=v[0], iou=v[1], asd=v[2], **dict(zip(organs, v[4:]))))
    assert organs == tuple(data.SYNAPSE_CLASSES[c] for c in data.SYNAPSE_TABLE1)  # Table 1's order is ours
    assert E.PAPER['acdc', 'L'] == (2, dict(zip(('dice', 'RV', 'Myo', 'LV'), map(float, TABLE2.split('\t')[1:]))))
    v = [float(x) for x in TABLE3.split('\t')[2:]]
    assert E.PAPER['isic2017', 'S'] == (3, dict(zip(('dice', 'se', 'sp', 'acc'), v[:4])))
    assert E.PAPER['isic2018', 'S'] == (3, dict(zip(('dice', 'se', 'sp', 'acc'), v[4:])))
    assert E.PAPER['glas', 'L'] == (4, dict(zip(('dice', 'iou'), map(float, TABLE4.split('\t')[2:]))))
    # every row's keys are figures the summary has: its headline row's metrics or the dataset's classes
    for (name, size), (table, row) in E.PAPER.items():
        spec = data.SPECS[name]
        assert set(row) <= {'dice', 'iou', 'asd', 'se', 'sp', 'acc'} | set(spec.class_names[1:]), (name, size)
    assert {name for name, _ in E.PAPER} == {'synapse', 'acdc', 'isic2017', 'isic2018', 'glas'}
    assert E.paper_row('demo', 'S') is None and E.paper_row('synapse', 'M') is None
    assert E.paper_row('synapse', 'L')['kidney_l'] == pytest.approx(0.8859)
    assert E.paper_row('synapse', 'L')['asd'] == 2.76 and E.paper_row('glas', 'S')['table'] == 4


def _columns(line, keys, header):
    """The figure right-aligned under each of header's column names in line."""
    ends = [header.index(k) + len(k) for k in keys]
    assert all(line[e:e + 1] in ('', ' ') for e in ends), line  # nothing spills past a column's end
    return {k: line[:e].split()[-1] for k, e in zip(keys, ends)}


def test_table_layout_with_and_without_the_paper_row():
    spec = data.SPECS['synapse']
    names = [spec.class_names[c] for c in spec.report_order]
    rows = _volume_rows([[0.0] * 5 + [1.0] * 5] + [[0.5 + k / 20] * 10 for k in range(1, 8)], names)
    s = E.summarize(rows, spec)
    plain = E.format_table(s, spec).splitlines()
    s['paper'] = E.paper_row('synapse', 'L')
    lines = E.format_table(s, spec).splitlines()
    assert lines[:-1] == plain and len(lines) == len(names) + 6  # header, columns, classes, mean, Tables 1-2 rows
    # aorta: five cases at Dice 0, five at 1 (test_interval_by_hand); the other figures alike in every case
    assert lines[2].split() == ['aorta', '50.00', '[20.00,', '80.00]', '25.00', '[10.00,', '40.00]', '1.00',
                                '[1.00,', '1.00]', '1.00', '[1.00,', '1.00]', '10']
    header, ours, paper = lines[-3:]
    assert header.split() == ['paper', 'row', 'DICE', 'mIoU', 'ASD', 'HD95'] + names
    keys = ['DICE', 'mIoU', 'ASD', 'HD95'] + names
    assert _columns(ours, keys, header) == dict(zip(keys, ['67.50', '33.75', '1.00', '1.00'] +
                                                     [f'{50 + 5 * k:.2f}' for k in range(8)]))
    assert paper.startswith('DANIE-L (T1)') and _columns(paper, keys, header) == dict(
        DICE='85.47', mIoU='76.60', ASD='2.76', HD95='-', aorta='88.17', gallbladder='77.80', kidney_l='88.59',
        kidney_r='84.68', liver='94.84', pancreas='71.94', spleen='91.95', stomach='85.82')
    # image sets: the paper's row under the table's own figure, in its columns; none for the user's data
    for name, after in (('isic2018', 'pooled 256'), ('glas', 'per-image'), ('folder', None)):
        figure = 'pooled_256' if after == 'pooled 256' else 'mean'
        spec = dataclasses.replace(data.SPECS['isic2018'], name=name, figure=figure)  # one 'lesion' class
        s = E.summarize([_image_row(f'i{j}', 10 + j, 2, 3, 100) for j in range(4)], spec)
        plain = E.format_table(s, spec).splitlines()
        s['paper'] = E.paper_row(name, 'S')
        lines = E.format_table(s, spec).splitlines()
        if after is None:
            assert lines == plain and not any('DANIE' in line for line in lines)
            continue
        at = [line.startswith(after) for line in lines].index(True)
        assert lines[:at + 1] + lines[at + 2:] == plain and lines[at + 1].startswith('DANIE-S (T')
        head = lines[3]
        want = dict(Dice='93.32', SE='95.34', SP='96.63', ACC='96.28', IoU='-') if name == 'isic2018' else \
            dict(Dice='91.28', SE='-', SP='-', ACC='-', IoU='84.23')
        assert {k: lines[at + 1][head.index(k) - 6 + len(k):].split()[0] for k in want} == want

# ---- faults: nothing scored on seen cases, nothing written into the data, every result file whole


def nnunet_run(tmp_path, n=10):
    """An nnU-Net set with a test case (labelsTs) and a checkpoint of it that records its cases as train.py does."""
    from test_data import write_nnunet
    root = write_nnunet(tmp_path / 'd', n=n, ts=1, shape=(16, 16, 2))
    split = {k: data.eval_cases('nnunet', root, s, val_cases=1).ids for k, s in (('trained', 'train'),
                                                                                   ('validated', 'val'))}
    info = dict(name='nnunet', root=str(root), seed=0, val_cases=1, label_map='transunet', selected_on='val',
                spec=dataclasses.asdict(data.get_spec('nnunet', root)), **split)
    (tmp_path / 'run').mkdir()
    torch.manual_seed(0)
    net = tiny_model(num_classes=3)
    torch.save(M.checkpoint(net, data=info, args={}, init='scratch', epoch=1, step=2, metric=0.5),
               tmp_path / 'run' / 'best.pth')
    return root, tmp_path / 'run' / 'best.pth', split


def test_a_split_that_shares_cases_with_training_is_never_scored(tmp_path, capsys):
    import shutil
    root, ckpt, split = nnunet_run(tmp_path)
    assert E.main(['--ckpt', str(ckpt), '--out', str(tmp_path / 'ok'), '--no-progress']) == 0  # labelsTs: unseen
    assert json.loads((tmp_path / 'ok' / 'summary.json').read_text())['n_cases'] == 1
    copy = shutil.copytree(root, tmp_path / 'copy')
    shutil.rmtree(copy / 'labelsTs')  # no test split: 20% of imagesTr is carved out instead
    carved = data.eval_cases('nnunet', copy, 'test').ids
    assert len(carved) == 2 and set(carved) <= set(split['trained'] + split['validated'])
    capsys.readouterr()
    assert E.main(['--ckpt', str(ckpt), '--root', str(copy), '--out', str(tmp_path / 'ev'), '--no-progress']) == 2
    err = capsys.readouterr().err
    seen = {k: sorted(set(v) & set(carved)) for k, v in split.items()}
    how = ', '.join(f'{len(v)} {k} on' for k, v in seen.items() if v)
    assert f"error: the test split shares 2 of its 2 cases with those {ckpt} saw ({how}: {', '.join(carved)})" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / 'ev' / 'summary.json').exists()


def test_saved_nifti_predictions_keep_the_geometry_of_their_image(tmp_path):
    import nibabel as nib
    from test_data import AFFINE
    root, ckpt, _ = nnunet_run(tmp_path, n=4)
    assert E.main(['--ckpt', str(ckpt), '--out', str(tmp_path / 'ev'), '--save-pred', str(tmp_path / 'sp'),
                   '--no-progress']) == 0
    image = root / 'imagesTs' / 'case_004_0000.nii.gz'
    assert predict.main(['--ckpt', str(ckpt), '--input', str(image), '--out', str(tmp_path / 'pp'),
                         '--no-progress']) == 0
    saved, by_predict = (nib.load(d / n) for d, n in ((tmp_path / 'sp', 'case_004_pred.nii.gz'),
                                                      (tmp_path / 'pp', 'case_004.nii.gz')))
    assert np.allclose(saved.affine, AFFINE) and saved.shape == nib.load(image).shape == (16, 16, 2)
    assert np.array_equal(saved.get_fdata(), by_predict.get_fdata())  # as predict.py writes the same file
    assert not (tmp_path / 'sp' / 'case_004_img.nii.gz').exists()  # the image is the user's own file
    image.rename(image.with_name('case_004_0000.NII.GZ'))  # suffixes in any case, as the layout reads them
    assert E.main(['--ckpt', str(ckpt), '--out', str(tmp_path / 'ev2'), '--save-pred', str(tmp_path / 'sp2'),
                   '--no-progress']) == 0
    assert np.allclose(nib.load(tmp_path / 'sp2' / 'case_004_pred.nii.gz').affine, AFFINE)


def test_outputs_inside_the_dataset_root_are_refused_naming_the_flag(tmp_path, capsys):
    root, ckpt, _ = nnunet_run(tmp_path, n=4)
    before = sorted(root.rglob('*'))
    assert E.main(['--ckpt', str(ckpt), '--save-pred', str(root / 'imagesTs'), '--no-progress']) == 2
    err = capsys.readouterr().err
    assert f"{root / 'imagesTs'} (--save-pred) lies inside {root} (the dataset root the checkpoint records)" in err
    inside = root / 'runs' / 'best.pth'  # a checkpoint kept in the dataset: its default results folder
    inside.parent.mkdir()
    inside.write_bytes(ckpt.read_bytes())
    before.append(inside.parent)
    before.append(inside)
    assert E.main(['--ckpt', str(inside), '--root', str(root), '--no-progress']) == 2
    err = capsys.readouterr().err
    assert '(the results folder beside --ckpt; --out sets another) lies inside' in err and f'{root} (--root)' in err
    assert sorted(root.rglob('*')) == sorted(before)


def test_a_class_count_mismatch_names_the_checkpoint_and_the_file(tmp_path, capsys):
    root, ckpt, _ = nnunet_run(tmp_path, n=4)
    meta = json.loads((root / 'dataset.json').read_text())
    meta['labels']['cyst'] = 3
    (root / 'dataset.json').write_text(json.dumps(meta))
    assert E.main(['--ckpt', str(ckpt), '--out', str(tmp_path / 'ev'), '--no-progress']) == 2
    err = capsys.readouterr().err
    assert f"{root / 'dataset.json'} has 4 classes, but {ckpt} (the classes it learnt) gives 3" in err
    assert '--num-classes' not in err


def test_ctrl_c_and_a_full_disk_end_in_one_line_and_leave_no_part_of_a_file(tmp_path, capsys, monkeypatch):
    import builtins
    import errno
    root, ckpt, _ = nnunet_run(tmp_path, n=4)
    flags = ['--ckpt', str(ckpt), '--out', str(tmp_path / 'ev'), '--no-progress']

    def full_disk(path, mode='r', *a, **kw):
        f = builtins.open(path, mode, *a, **kw)
        if Path(path).name.startswith('summary.json.'):
            f.write(b'{"rule": ')
            f.close()
            raise OSError(errno.ENOSPC, 'No space left on device')
        return f
    monkeypatch.setattr(data, 'open', full_disk, raising=False)
    assert E.main(flags) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {tmp_path / 'ev'}: cannot write the results (No space left on device)"
    assert sorted(p.name for p in (tmp_path / 'ev').iterdir()) == ['per_case.csv']  # no summary.json, no .tmp
    monkeypatch.delattr(data, 'open')
    monkeypatch.setattr(E, 'evaluate', lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert E.main(flags) == 130
    assert capsys.readouterr().err == '\ninterrupted: no results written\n'
