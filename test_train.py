"""Tests of train.py: the loss of Eq. 13 (Sec. 4.2) by hand, the loop, exact resume, DDP on gloo, the NaN guard,
bad flags, and an end-to-end run on the demo set scored by evaluate.py. CPU, tiny, offline."""

import copy
import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import evaluate
import model as danie_model
import train

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    num_classes: int
    img_size: int


class Tiny(nn.Module):
    """DANIE's interface, (B,3,S,S) -> (y, [p1..p4]), in a few hundred parameters (with BatchNorm buffers)."""

    def __init__(self, num_classes, img_size):
        super().__init__()
        self.config = TinyConfig(num_classes, img_size)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.heads = nn.ModuleList(nn.Conv2d(8, num_classes, 3, padding=1) for _ in range(4))

    def forward(self, x):
        h = self.stem(x)
        p = [F.interpolate(head(F.avg_pool2d(h, 2 ** i)), size=x.shape[-2:], mode='bilinear', align_corners=False)
             for i, head in enumerate(self.heads)]
        return sum(p), p


def tiny_model(args, num_classes, pretrained):
    return Tiny(num_classes, args.img_size)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    # tiny tensors gain nothing from threads, and on a busy 2-core machine spinning OpenMP threads cost 10-50x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    return str(data.make_demo(tmp_path_factory.mktemp('demo') / 'demo'))


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(train, 'build_model', tiny_model)


def run(out, root, *flags):
    """train.main on the demo set at 32x32 with the tiny model's fast defaults."""
    return train.main(['--data', 'demo', '--root', root, '--out', str(out), '--img-size', '32', *flags])


def log_rows(out):
    with open(Path(out) / 'log.csv') as f:
        return list(csv.DictReader(f))


# ---- loss (Eq. 13)

# one image, two pixels, two classes: logits L give probabilities (1/2, 1/2) and (1/4, 3/4), target (0, 1)
L = torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3)]]]])  # (1,2,1,2)
T = torch.tensor([[[0, 1]]])  # (1,1,2)
Z = torch.zeros_like(L)  # zero logits: probabilities 1/2 everywhere
S = 1e-5  # TransUNet's smooth


def hand_seg(logits):
    """0.7 Dice + 0.3 CE of L or Z, written out by hand (background included, squared denominators)."""
    if logits is L:
        d0 = (2 * 0.5 + S) / (0.5 ** 2 + 0.25 ** 2 + 1 + S)  # class 0: p = (1/2, 1/4), t = (1, 0)
        d1 = (2 * 0.75 + S) / (0.5 ** 2 + 0.75 ** 2 + 1 + S)  # class 1: p = (1/2, 3/4), t = (0, 1)
        ce = (math.log(2) + math.log(4 / 3)) / 2
    else:
        d0 = d1 = (2 * 0.5 + S) / (0.25 + 0.25 + 1 + S)
        ce = math.log(2)
    return 0.7 * (1 - (d0 + d1) / 2) + 0.3 * ce


def test_dice_loss_by_hand():
    d0 = (1 + S) / (1.3125 + S)
    d1 = (1.5 + S) / (1.8125 + S)
    assert train.dice_loss(L, T, 2).item() == pytest.approx(1 - (d0 + d1) / 2, abs=1e-6)
    assert train.dice_loss(L, T).item() == pytest.approx(1 - (d0 + d1) / 2, abs=1e-6)  # K from the logits


@pytest.mark.parametrize('mode, expected', [
    ('final', lambda: hand_seg(L)),                     # on y only
    ('deep', lambda: 2 * hand_seg(L) + 3 * hand_seg(Z)),  # p1 = L, p2..p4 = 0, and y = L
    # 15 non-empty subsets of 4 heads: the 8 that hold p1 sum to L, the 7 others to 0
    ('mutation', lambda: 8 * hand_seg(L) + 7 * hand_seg(Z)),
])
def test_criterion_by_hand(mode, expected):
    heads = [L, Z, Z, Z]
    y = sum(heads)  # Eq. 12 with alpha_i = 1
    assert train.criterion(y, heads, T, mode, 2).item() == pytest.approx(expected(), abs=1e-5)


def test_criterion_is_float32_under_bf16():
    y = L.to(torch.bfloat16)
    loss = train.criterion(y, [y] * 4, T, 'deep')
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())


# ---- the loop


def test_training_lowers_the_loss_and_writes_outputs(tmp_path, demo_root, tiny):
    summary = run(tmp_path, demo_root, '--epochs', '3', '--batch-size', '8', '--lr', '1e-2')
    rows = log_rows(tmp_path)
    assert [int(r['epoch']) for r in rows] == [1, 2, 3]
    assert float(rows[-1]['loss']) < 0.9 * float(rows[0]['loss'])
    assert all(0 <= float(r['val_dice']) <= 1 for r in rows)
    assert summary['steps'] == 3 * (len(data.train_set('demo', demo_root, 32)) // 8) and summary['epochs'] == 3
    best_logged = max(float(r['val_dice']) for r in rows)
    assert summary['best_val_dice'] == pytest.approx(best_logged, abs=1e-6)
    assert float(rows[-1]['best_dice']) == pytest.approx(best_logged, abs=1e-6)
    best, last = (torch.load(tmp_path / f, weights_only=True) for f in ('best.pth', 'last.pth'))  # safe loading
    assert last['epoch'] == 3 and last['train']['epoch_step'] == 0 and last['step'] == summary['steps']
    assert best['metric'] == last['train']['best_metric'] == summary['best_val_dice']
    # best.pth: what evaluate.py needs; last.pth: that plus the whole training state
    assert set(best) == {'format', 'config', 'model', 'data', 'args', 'init', 'epoch', 'step', 'metric'}
    assert set(last) == set(best) | {'train'}
    assert {'optimizer', 'scaler', 'epoch_step', 'best_metric', 'best_epoch', 'elapsed'} <= set(last['train'])
    assert last['data']['name'] == 'demo' and last['args']['epochs'] == 3
    assert last['init'] == 'from scratch (--no-pretrained)'
    assert (tmp_path / 'progress.png').stat().st_size > 1000  # loss and Dice against epoch
    assert not list(tmp_path.glob('*.tmp'))


def test_resume_mid_epoch_gives_the_same_weights(tmp_path, demo_root, tiny):
    flags = ['--epochs', '2', '--batch-size', '8', '--lr', '1e-2']
    assert len(data.train_set('demo', demo_root, 32)) // 8 == 19  # steps per epoch, for the numbers below
    run(tmp_path / 'a', demo_root, *flags, '--max-steps', '30')
    run(tmp_path / 'b', demo_root, *flags, '--max-steps', '7')  # stops in the middle of epoch 1
    stopped = torch.load(tmp_path / 'b' / 'last.pth', weights_only=True)
    assert (stopped['epoch'], stopped['step'], stopped['train']['epoch_step']) == (0, 7, 7)
    # only the flags that may change; the rest come from the checkpoint. Workers draw the same augmentation.
    train.main(['--resume', str(tmp_path / 'b' / 'last.pth'), '--max-steps', '30', '--workers', '2'])
    a, b = (torch.load(tmp_path / r / 'last.pth', weights_only=True) for r in 'ab')
    assert (b['epoch'], b['step'], b['train']['epoch_step']) == (a['epoch'], a['step'], a['train']['epoch_step'])
    assert (a['epoch'], a['step'], a['train']['epoch_step']) == (1, 30, 11)
    assert a['model'].keys() == b['model'].keys()
    for name in a['model']:
        assert torch.equal(a['model'][name], b['model'][name]), name
    for sa, sb in zip(a['train']['optimizer']['state'].values(), b['train']['optimizer']['state'].values()):
        assert torch.equal(sa['exp_avg_sq'], sb['exp_avg_sq'])
    # a control: without the resume the weights do differ from a shorter run
    assert not torch.equal(a['model']['stem.0.weight'], stopped['model']['stem.0.weight'])


def test_resume_refuses_a_different_run(tmp_path, demo_root, tiny, capsys):
    run(tmp_path, demo_root, '--batch-size', '8', '--max-steps', '1')
    with pytest.raises(SystemExit) as e:
        train.main(['--resume', str(tmp_path / 'last.pth'), '--lr', '1e-3'])
    assert e.value.code == 2 and f"--lr 0.001 (checkpoint: {data.SPECS['demo'].lr})" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # and a fresh run will not overwrite it
        run(tmp_path, demo_root, '--batch-size', '8')
    assert e.value.code == 2 and 'already holds a run' in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, demo_root, tiny, monkeypatch, capsys):
    real, calls = train.criterion, []

    def nan_at_step_5(*a, **kw):
        calls.append(1)
        loss = real(*a, **kw)
        return loss * float('nan') if len(calls) == 5 else loss

    monkeypatch.setattr(train, 'criterion', nan_at_step_5)
    with pytest.raises(SystemExit) as e:  # 3 steps per epoch: step 5 is neither the first nor the last of epoch 2
        run(tmp_path, demo_root, '--batch-size', '48', '--epochs', '5')
    err = capsys.readouterr().err
    assert e.value.code == 1 and 'loss is nan at step 5 (epoch 2)' in err and 'last.pth' in err
    last = torch.load(tmp_path / 'last.pth', weights_only=True)
    assert last['step'] == 3 and all(torch.isfinite(v).all() for v in last['model'].values())
    assert len(log_rows(tmp_path)) == 1


def test_bad_flags(tmp_path, demo_root, capsys):
    missing = str(tmp_path / 'missing')
    cases = [
        (['--data', 'nosuch'], "invalid choice: 'nosuch'"),
        (['--data', 'synapse', '--root', missing], missing),  # data.py's DataError, named, no traceback
        (['--data', 'demo', '--root', demo_root, '--batch-size', '1000'], 'larger than the training set'),
        (['--data', 'demo', '--root', demo_root, '--img-size', '40'], 'multiple of 32'),
        (['--data', 'demo', '--no-hap'], "fusion must be 'add'"),
        (['--data', 'demo', '--epochs', '0'], "argument --epochs: expected a finite number >= 1, got '0'"),
        (['--data', 'demo', '--lr', 'nan'], "argument --lr: expected a finite number > 0, got 'nan'"),
        (['--data', 'demo', '--lr', 'inf'], "argument --lr: expected a finite number > 0, got 'inf'"),
        (['--data', 'demo', '--lr', '0'], "argument --lr: expected a finite number > 0, got '0'"),
        (['--data', 'demo', '--weight-decay=-1e-4'], 'argument --weight-decay: expected a finite number >= 0'),
        (['--data', 'demo', '--batch-size', 'x'], "argument --batch-size: expected int, got 'x'"),
        (['--data', 'demo', '--val-cases=-1'], 'argument --val-cases'),
        (['--data', 'demo', '--val-cases', '2.5'], 'a whole number of cases or a fraction below 1, got'),
        (['--data', 'demo', '--seed=-1'], "argument --seed: expected a finite number >= 0, got '-1'"),
        (['--resume', str(tmp_path / 'nothing.pth')], 'no checkpoint at'),
        (['--resume', str(tmp_path / 'garbage.pth')], 'garbage.pth: not a readable PyTorch checkpoint'),
    ]
    (tmp_path / 'garbage.pth').write_bytes(b'not a checkpoint')
    if not torch.cuda.is_available():
        cases.append((['--data', 'demo', '--amp', 'fp16'], 'fp16 needs CUDA'))
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            train.main(argv + ['--out', str(tmp_path / 'out')])
        err = capsys.readouterr().err
        assert e.value.code == 2 and 'error: ' in err and message in err and 'Traceback' not in err, (argv, err)


def test_nan_before_any_checkpoint_names_none(tmp_path, demo_root, tiny, capsys):
    with pytest.raises(SystemExit) as e:  # --lr 1e30: the first step already blows up
        run(tmp_path, demo_root, '--batch-size', '64', '--lr', '1e30', '--epochs', '2')
    err = capsys.readouterr().err
    assert e.value.code == 1 and 'no checkpoint was written' in err and 'last.pth' not in err
    assert not (tmp_path / 'last.pth').exists()


def test_non_finite_weights_are_never_checkpointed(tmp_path, demo_root, tiny, monkeypatch, capsys):
    """The last step of an epoch has a finite loss (computed before its update) but leaves NaN weights."""
    real, calls = train.train_step, []

    def poison_step_2(net, *a, **kw):
        loss = real(net, *a, **kw)
        calls.append(1)
        if len(calls) == 2:  # the last step of epoch 1 (2 steps per epoch)
            next(net.parameters()).data.fill_(float('nan'))
        return loss

    monkeypatch.setattr(train, 'train_step', poison_step_2)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, demo_root, '--batch-size', '64', '--epochs', '3')
    err = capsys.readouterr().err
    assert e.value.code == 1 and 'at step 2 (epoch 1)' in err and 'no checkpoint was written' in err
    assert not (tmp_path / 'last.pth').exists() and not (tmp_path / 'best.pth').exists()


def test_select_on_test_records_the_split_it_trained_on(tmp_path, demo_root, tiny, capsys):
    run(tmp_path, demo_root, '--batch-size', '64', '--max-steps', '1', '--select-on-test')
    last = torch.load(tmp_path / 'last.pth', weights_only=True)
    assert last['data']['val_cases'] == 0 and last['data']['selected_on'] == 'test'
    assert f'WARNING: {evaluate.SELECTED_ON_TEST}' in capsys.readouterr().err


def test_running_a_finished_command_twice_is_safe(tmp_path, demo_root, tiny, capsys):
    first = run(tmp_path, demo_root, '--batch-size', '64', '--epochs', '1')
    before = (tmp_path / 'last.pth').stat().st_mtime_ns
    assert run(tmp_path, demo_root, '--batch-size', '64', '--epochs', '1') is None
    out = capsys.readouterr().out
    assert 'already holds this run, finished at epoch 1/1: nothing to do' in out and 'best.pth' in out
    assert (tmp_path / 'last.pth').stat().st_mtime_ns == before and first['epochs'] == 1
    with pytest.raises(SystemExit) as e:  # another run in the same folder is refused, naming the flag
        run(tmp_path, demo_root, '--batch-size', '32', '--epochs', '1')
    assert e.value.code == 2 and 'holds another run, but --batch-size 32 (checkpoint: 64)' in capsys.readouterr().err


def test_val_cases_0_trains_on_every_case_and_keeps_last(tmp_path, demo_root, tiny, capsys):
    summary = run(tmp_path, demo_root, '--batch-size', '64', '--epochs', '1', '--val-cases', '0')
    assert summary['best_val_dice'] is None and summary['checkpoint'].endswith('last.pth')
    assert not (tmp_path / 'best.pth').exists()
    every = data.train_set('demo', demo_root, 32, val_cases=0)
    assert len(every) == data.DEMO_TRAIN_CASES * data.DEMO_SLICES  # all 15 training volumes
    assert summary['steps'] == len(every) // 64 and 'next: python evaluate.py --ckpt' in capsys.readouterr().out


def test_imagenet_initialisation_is_the_default_and_offline_stops_early(tmp_path, monkeypatch, capsys):
    import test_data
    roots = dict(folder=test_data.write_folder(tmp_path / 'f'), nnunet=test_data.write_nnunet(tmp_path / 'n'))
    for name in ('synapse', 'acdc', 'isic2017', 'isic2018', 'glas', 'folder', 'nnunet'):
        root = ['--root', str(roots[name])] if name in roots else []
        args, _ = train.parse(['--data', name, '--out', str(tmp_path / name), *root])
        assert args.pretrained, name
    assert not train.parse(['--data', 'demo', '--out', str(tmp_path / 'd')])[0].pretrained  # the demo: scratch
    assert not train.parse(['--data', 'synapse', '--no-pretrained', '--out', str(tmp_path / 's')])[0].pretrained
    import huggingface_hub.constants as hub  # offline, and no weights in the cache: stop before any training
    monkeypatch.setattr(hub, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    monkeypatch.setattr(hub, 'HF_HUB_CACHE', str(tmp_path / 'hf'))
    args, _ = train.parse(['--data', 'synapse', '--out', str(tmp_path / 'x')])
    with pytest.raises(danie_model.PretrainedError, match='--pretrained-file PATH .* or --no-pretrained'):
        train.build_model(args, 9, pretrained=True)
    assert 'from scratch' in train.init_name(train.parse(['--data', 'demo', '--out', str(tmp_path / 'y')])[0])


def test_flags_given_are_used_and_defaults_come_from_the_spec(tmp_path):
    spec = data.SPECS['synapse']
    args, _ = train.parse(['--data', 'synapse', '--out', str(tmp_path)])
    assert (args.epochs, args.batch_size, args.img_size, args.size) == (spec.epochs, spec.batch_size, 224, 'S')
    args, _ = train.parse(['--data', 'synapse', '--out', str(tmp_path), '--epochs', '7', '--batch-size', '2',
                              '--img-size', '256', '--size', 'L'])
    assert (args.epochs, args.batch_size, args.img_size, args.size) == (7, 2, 256, 'L')
    args, _ = train.parse(['--data', 'demo', '--out', str(tmp_path)])
    assert args.img_size == data.SPECS['demo'].img_size and args.supervision == 'deep'
    assert args.lr == getattr(data.SPECS['demo'], 'lr', 1e-4)
    args, _ = train.parse(['--data', 'synapse', '--out', str(tmp_path)])
    assert args.lr == 1e-4 and args.weight_decay == 1e-4  # Sec. 4.2



# ---- each flag where it is used, on fixtures where the right rule and its neighbours differ


def test_weight_decay_and_lr_reach_adamw_from_the_flag_or_the_spec(tmp_path, demo_root, tiny, monkeypatch):
    def adamw(out):
        group = torch.load(out / 'last.pth', weights_only=True)['train']['optimizer']['param_groups'][0]
        return group['lr'], group['weight_decay']
    run(tmp_path / 'flag', demo_root, '--batch-size', '64', '--max-steps', '1', '--weight-decay', '0.05', '--lr',
        '0.002')
    assert adamw(tmp_path / 'flag') == (0.002, 0.05)
    # unset: the dataset's recipe, here one whose decay is neither 1e-4 nor its lr
    monkeypatch.setitem(data.SPECS, 'demo', dataclasses.replace(data.SPECS['demo'], lr=0.003, weight_decay=0.02))
    run(tmp_path / 'spec', demo_root, '--batch-size', '64', '--max-steps', '1')
    assert adamw(tmp_path / 'spec') == (0.003, 0.02)


def test_supervision_and_amp_reach_the_loss(tmp_path, demo_root, tiny, monkeypatch):
    real, seen = train.criterion, []

    def spy(y, heads, target, mode='deep', *a, **kw):
        seen.append((mode, y.dtype))
        return real(y, heads, target, mode, *a, **kw)

    monkeypatch.setattr(train, 'criterion', spy)
    run(tmp_path / 'a', demo_root, '--batch-size', '64', '--max-steps', '1', '--supervision', 'mutation',
        '--amp', 'bf16')
    run(tmp_path / 'b', demo_root, '--batch-size', '64', '--max-steps', '1')
    assert seen == [('mutation', torch.bfloat16), ('deep', torch.float32)]


def test_val_every_validates_every_nth_epoch_and_the_last(tmp_path, demo_root, tiny):
    run(tmp_path, demo_root, '--batch-size', '64', '--epochs', '5', '--val-every', '2')  # 2 steps per epoch
    assert [bool(r['val_dice']) for r in log_rows(tmp_path)] == [False, True, False, True, True]


def test_best_pth_is_the_highest_validation_dice_not_the_latest(tmp_path, demo_root, tiny, monkeypatch):
    # a NaN first (no class counted), a tie after the best, then a drop: 'latest', '>=' and a NaN kept as the best
    # would each pick another epoch
    dice = iter([math.nan, 0.6, 0.8, 0.8, 0.7])
    monkeypatch.setattr(evaluate, 'evaluate', lambda *a, **kw: {'mean_dice': next(dice)})
    summary = run(tmp_path, demo_root, '--batch-size', '64', '--epochs', '5')
    assert (summary['best_epoch'], summary['best_val_dice']) == (3, 0.8)
    assert torch.load(tmp_path / 'best.pth', weights_only=True)['epoch'] == 3
    assert [r['best_dice'] for r in log_rows(tmp_path)] == ['', '0.600000', '0.800000', '0.800000', '0.800000']


def test_val_cases_sets_how_many_training_cases_are_held_out(tmp_path, demo_root, tiny):
    summary = run(tmp_path, demo_root, '--batch-size', '8', '--epochs', '1', '--val-cases', '4')
    held = data.train_set('demo', demo_root, 32, val_cases=4)
    assert len(held) == (data.DEMO_TRAIN_CASES - 4) * data.DEMO_SLICES != len(data.train_set('demo', demo_root, 32))
    assert summary['steps'] == len(held) // 8
    assert torch.load(tmp_path / 'last.pth', weights_only=True)['data']['val_cases'] == 4  # evaluate.py's split

def test_ablation_switches_and_size_reach_the_model(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(danie_model, 'danie', lambda size, **kw: built.append((size, kw)))
    argv = ['--data', 'demo', '--out', str(tmp_path), '--size', 'L', '--order', 'spatial_first',
            '--no-calibration', '--no-spatial-att', '--fusion', 'add']
    args, _ = train.parse(argv)
    train.build_model(args, 9, pretrained=True)
    size, kw = built[0]
    assert size == 'L' and kw['num_classes'] == 9 and kw['img_size'] == args.img_size
    assert {k: kw[k] for k in danie_model.SWITCHES} == dict(hap=True, sap=True, spatial_att=False, channel_att=True,
                                                           order='spatial_first', calibration=False, fusion='add')
    train.build_model(train.parse(['--data', 'demo', '--out', str(tmp_path / 'b'), '--no-sap', '--no-channel-att',
                                   '--fusion', 'add'])[0], 9, pretrained=True)
    assert (built[1][1]['sap'], built[1][1]['channel_att'], built[1][1]['hap']) == (False, False, True)

# ---- multi-process and end to end


def test_two_process_gloo_run_writes_one_checkpoint(tmp_path, demo_root):
    script = tmp_path / 'ddp_train.py'
    script.write_text(textwrap.dedent("""
        import sys
        import test_train, train
        train.build_model = test_train.tiny_model
        train.main(sys.argv[1:])
    """))
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(HERE), os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script),
           '--data', 'demo', '--root', demo_root, '--out', str(out), '--img-size', '32', '--batch-size', '8',
           '--max-steps', '3']
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert sorted(f.name for f in out.iterdir()) == ['best.pth', 'last.pth', 'log.csv', 'progress.png',
                                                     'summary.json']
    assert p.stdout.count('done:') == 1  # rank 0 alone reports
    ck = torch.load(out / 'last.pth', weights_only=True)
    assert ck['train']['world_size'] == 2 and ck['step'] == 3 and ck['args']['batch_size'] == 8
    assert not any(k.startswith('module.') for k in ck['model'])  # the bare module, not the DDP wrapper


class TinyNoBN(Tiny):
    """Tiny without BatchNorm: on CPUs (gloo) BN sees each process's share, on GPUs SyncBatchNorm the global batch."""

    def __init__(self, num_classes, img_size):
        super().__init__(num_classes, img_size)
        self.stem[1] = nn.Identity()


def torchrun(tmp_path, nproc, *flags, patch=''):
    """train.main in nproc gloo processes on the tiny BN-free model; the CompletedProcess."""
    script = tmp_path / 'ddp_train.py'
    script.write_text(textwrap.dedent(f"""
        import os, sys
        import data, test_train, train
        train.build_model = lambda args, num_classes, pretrained: test_train.TinyNoBN(num_classes, args.img_size)
        {patch}
        train.main(sys.argv[1:])
    """))
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(HERE), os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc),
           str(script), *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def test_n_processes_train_as_one_and_resume_across_world_sizes(tmp_path, demo_root, monkeypatch):
    """Eq. 13's batch Dice over the global batch and the same global batches: 2 processes = 1, and a run
    stopped under 2 processes and resumed in 1 ends where a 1-process run does."""
    monkeypatch.setattr(train, 'build_model', lambda args, num_classes, pretrained: TinyNoBN(num_classes, 32))
    flags = ['--data', 'demo', '--root', demo_root, '--img-size', '32', '--batch-size', '8', '--lr', '1e-2']
    run(tmp_path / 'one', demo_root, *flags[4:], '--max-steps', '4')
    p = torchrun(tmp_path, 2, *flags, '--out', str(tmp_path / 'two'), '--max-steps', '2')
    assert p.returncode == 0, p.stderr[-3000:]
    train.main(['--resume', str(tmp_path / 'two' / 'last.pth'), '--max-steps', '4'])
    one, two = (torch.load(tmp_path / r / 'last.pth', weights_only=True) for r in ('one', 'two'))
    assert one['step'] == two['step'] == 4
    for name in one['model']:
        assert torch.allclose(one['model'][name], two['model'][name], atol=1e-5), name
    # a control: a Dice per process (no all_reduce) trains another function
    p = torchrun(tmp_path, 2, *flags, '--out', str(tmp_path / 'local'), '--max-steps', '4',
                 patch='train.all_reduce = None')
    local = torch.load(tmp_path / 'local' / 'last.pth', weights_only=True)
    assert not all(torch.allclose(one['model'][n], local['model'][n], atol=1e-5) for n in one['model'])


def test_an_error_on_one_rank_ends_every_rank(tmp_path, demo_root):
    patch = textwrap.dedent("""
        real = data.train_set
        def train_set(*a, **kw):
            if os.environ['RANK'] == '1':
                raise data.DataError('case0007_slice003.npz: unreadable (rank 1 only)')
            return real(*a, **kw)
        data.train_set = train_set
    """).replace('\n', '\n        ')
    p = torchrun(tmp_path, 2, '--data', 'demo', '--root', demo_root, '--img-size', '32', '--batch-size', '8',
                 '--out', str(tmp_path / 'out'), '--max-steps', '2', patch=patch)
    # both ranks end with the one-line error (rank 0 names it as another rank's), none waits at a barrier
    assert p.returncode != 0 and p.stderr.count('error: case0007_slice003.npz: unreadable') == 2, p.stderr[-3000:]
    assert '(on another rank)' in p.stderr and not (tmp_path / 'out' / 'last.pth').exists()


def test_a_nan_on_one_rank_stops_every_rank_at_that_step(tmp_path, demo_root):
    patch = textwrap.dedent("""
        real, calls = train.criterion, []
        def criterion(*a, **kw):
            calls.append(1)
            loss = real(*a, **kw)
            return loss * float('nan') if os.environ['RANK'] == '1' and len(calls) == 2 else loss
        train.criterion = criterion
    """).replace('\n', '\n        ')
    p = torchrun(tmp_path, 2, '--data', 'demo', '--root', demo_root, '--img-size', '32', '--batch-size', '8',
                 '--out', str(tmp_path / 'out'), '--max-steps', '4', patch=patch)
    # both ranks name rank 1's loss and its step; none trains on, none waits
    assert p.returncode != 0 and p.stderr.count('error: loss is nan at step 2 (epoch 1)') == 2, p.stderr[-3000:]
    assert not (tmp_path / 'out' / 'last.pth').exists()


def test_end_to_end_demo_then_evaluate(tmp_path, demo_root, capsys):
    """The real DANIE-S for two steps; evaluate.py scores best.pth from the checkpoint alone."""
    summary = run(tmp_path, demo_root, '--batch-size', '4', '--max-steps', '2')
    assert summary['steps'] == 2 and summary['best_val_dice'] is not None
    ck = danie_model.load_checkpoint(tmp_path / 'best.pth')
    assert ck['config']['size'] == 'S' and ck['config']['img_size'] == 32 and ck['config']['num_classes'] == 9
    assert evaluate.main(['--ckpt', str(tmp_path / 'best.pth'), '--out', str(tmp_path / 'eval'),
                          '--no-progress']) == 0
    assert (tmp_path / 'eval' / 'summary.json').exists() and evaluate.SELECTED_ON_TEST not in capsys.readouterr().err
    ck['data']['selected_on'] = 'test'  # as --select-on-test records it
    torch.save(ck, tmp_path / 'on_test.pth')
    assert evaluate.main(['--ckpt', str(tmp_path / 'on_test.pth'), '--out', str(tmp_path / 'eval2'), '--limit', '1',
                          '--no-progress']) == 0
    assert f'WARNING: {evaluate.SELECTED_ON_TEST}' in capsys.readouterr().err
    assert json.loads((tmp_path / 'eval2' / 'summary.json').read_text())['selected_on'] == 'test'


def test_compiled_model_computes_the_same_steps():
    """--compile's torch.compile of the whole model (dynamo with the eager backend here: inductor takes minutes on a
    CPU) computes the eager model's losses and outputs."""
    torch.manual_seed(0)
    plain = danie_model.danie('S', num_classes=3, img_size=32)
    graph = copy.deepcopy(plain)
    graph.compile(backend='eager')
    assert graph._compiled_call_impl is not None  # what train.py --compile runs
    x, t = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    opts = [train.make_optimizer(m, 1e-3, 1e-4, x.device) for m in (plain, graph)]
    scaler = torch.amp.GradScaler('cuda', enabled=False)
    for _ in range(2):  # two steps, then inference mode: the graphs follow the weights and the mode
        losses = [train.train_step(m, o, scaler, x, t, 'none', 'deep', 3).item() for m, o in zip((plain, graph), opts)]
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    with torch.inference_mode():
        assert torch.allclose(plain.eval()(x)[0], graph.eval()(x)[0], atol=1e-5)
    assert graph.state_dict().keys() == plain.state_dict().keys()  # checkpoints hold the plain names


@pytest.mark.parametrize('layout', ['folder', 'nnunet'])
def test_your_own_data_trains_two_steps_and_evaluates(tmp_path, layout):
    """The real DANIE-S on a tiny folder / nnU-Net dataset: train, then evaluate.py scores it by class name."""
    import test_data
    root = test_data.write_folder(tmp_path / 'd', n=6) if layout == 'folder' else \
        test_data.write_nnunet(tmp_path / 'd', n=4, ts=1, shape=(32, 32, 4))
    summary = train.main(['--data', layout, '--root', str(root), '--out', str(tmp_path / 'run'), '--img-size', '32',
                          '--batch-size', '2', '--max-steps', '2', '--no-pretrained', '--val-cases', '1'])
    assert summary['steps'] == 2 and summary['best_val_dice'] is not None
    ck = danie_model.load_checkpoint(tmp_path / 'run' / 'best.pth')
    assert ck['data']['spec']['name'] == layout and ck['config']['num_classes'] == 3
    assert evaluate.main(['--ckpt', str(tmp_path / 'run' / 'best.pth'), '--out', str(tmp_path / 'eval'),
                          '--no-progress']) == 0
    result = json.loads((tmp_path / 'eval' / 'summary.json').read_text())
    names = ('cell', 'nucleus') if layout == 'folder' else ('liver', 'tumour')
    assert set(names) <= set(result['per_class']) and result['n_cases'] >= 1


def test_folder_and_nnunet_take_their_own_recipe(tmp_path):
    import test_data
    folder, nnunet = test_data.write_folder(tmp_path / 'f'), test_data.write_nnunet(tmp_path / 'n')
    args, _ = train.parse(['--data', 'folder', '--root', str(folder), '--out', str(tmp_path / 'a')])
    assert (args.epochs, args.batch_size) == (200, 8)
    args, _ = train.parse(['--data', 'nnunet', '--root', str(nnunet), '--out', str(tmp_path / 'b')])
    assert (args.epochs, args.batch_size) == (300, 24)

# ---- faults: nothing lost, nothing silent


def test_an_unwritable_out_is_refused_before_any_step(tmp_path, demo_root, tiny, monkeypatch, capsys):
    steps = []
    monkeypatch.setattr(train, 'train_step', lambda *a, **kw: steps.append(1))
    (tmp_path / 'a_file').write_text('x')  # a file where --out's parent folder would be
    with pytest.raises(SystemExit) as e:
        run(tmp_path / 'a_file' / 'out', demo_root, '--batch-size', '64', '--epochs', '1')
    err = capsys.readouterr().err
    assert e.value.code == 2 and '(--out): cannot write there (Not a directory)' in err and not steps
    assert len(err.strip().splitlines()) == 1


def failing_write(name, at_call, exc):
    """An open() for data.py (where every file is written) whose write to the n-th temporary file of `name` writes
    a part, then raises exc."""
    import builtins
    calls = []

    def fake_open(path, mode='r', *a, **kw):
        f = builtins.open(path, mode, *a, **kw)
        if Path(path).name.startswith(name + '.') and str(path).endswith('.tmp'):
            calls.append(1)
            if len(calls) == at_call:
                f.write(b'part of a checkpoint')
                f.close()
                raise exc
        return f
    return fake_open


def test_a_full_disk_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, demo_root, tiny, monkeypatch,
                                                                      capsys):
    import errno
    flags = ['--batch-size', '64', '--epochs', '3']  # 2 steps per epoch
    monkeypatch.setattr(data, 'open', failing_write('last.pth', 2, OSError(errno.ENOSPC, 'No space left on '
                                                                                       'device')), raising=False)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, demo_root, *flags)
    err = capsys.readouterr().err
    msg = f"{tmp_path / 'last.pth'}: cannot write it (No space left on device); the last good one is untouched"
    assert e.value.code == 1 and msg in err
    assert not list(tmp_path.glob('*.tmp')) and 'Traceback' not in err
    last = torch.load(tmp_path / 'last.pth', weights_only=True)
    assert last['epoch'] == 1 and [int(r['epoch']) for r in log_rows(tmp_path)] == [1]  # untouched, and the log
    monkeypatch.delattr(data, 'open')
    train.main(['--resume', str(tmp_path / 'last.pth')])  # room again: the run goes on from epoch 1
    rows = log_rows(tmp_path)
    assert [int(r['epoch']) for r in rows] == [1, 2, 3] and torch.load(tmp_path / 'last.pth')['step'] == 6
    assert all(float(a['elapsed_s']) < float(b['elapsed_s']) for a, b in zip(rows, rows[1:]))


def test_a_kill_in_the_gap_leaves_a_log_that_matches_its_checkpoint(tmp_path, demo_root, tiny, monkeypatch,
                                                                    capsys):
    flags = ['--batch-size', '64', '--epochs', '3']
    monkeypatch.setattr(data, 'open', failing_write('last.pth', 2, KeyboardInterrupt()), raising=False)
    with pytest.raises(SystemExit) as e:  # killed while epoch 2's last.pth was being written
        run(tmp_path, demo_root, *flags)
    assert e.value.code == 130 and '--resume' in capsys.readouterr().err
    assert not list(tmp_path.glob('*.tmp'))  # an interrupted write leaves no part of a file
    assert torch.load(tmp_path / 'last.pth', weights_only=True)['epoch'] == 1
    assert [int(r['epoch']) for r in log_rows(tmp_path)] == [1]  # the log holds no epoch the checkpoint lacks
    monkeypatch.delattr(data, 'open')
    with pytest.raises(SystemExit) as e:  # the same command again says exactly which flag continues it
        run(tmp_path, demo_root, *flags)
    assert e.value.code == 2 and f"continue it with --resume {tmp_path / 'last.pth'}" in capsys.readouterr().err
    train.main(['--resume', str(tmp_path / 'last.pth')])
    assert [int(r['epoch']) for r in log_rows(tmp_path)] == [1, 2, 3] and not list(tmp_path.glob('*.tmp'))


def test_a_kill_before_the_first_checkpoint_is_rerun_cleanly(tmp_path, demo_root, tiny):
    (tmp_path / 'log.csv').write_text('epoch,step,loss\n1,2,0.5\n')  # what such a kill leaves
    (tmp_path / 'best.pth.tmp').write_bytes(b'')
    run(tmp_path, demo_root, '--batch-size', '64', '--epochs', '2')
    assert [int(r['epoch']) for r in log_rows(tmp_path)] == [1, 2] and not list(tmp_path.glob('*.tmp'))


def test_a_run_stopped_by_max_steps_continues_with_resume(tmp_path, demo_root, tiny, capsys):
    run(tmp_path, demo_root, '--batch-size', '8', '--epochs', '1', '--max-steps', '3')
    with pytest.raises(SystemExit) as e:
        run(tmp_path, demo_root, '--batch-size', '8', '--epochs', '1')
    assert e.value.code == 2 and 'stopped at epoch 0/1 (step 3): continue it with --resume' in capsys.readouterr().err
    run(tmp_path, demo_root, '--batch-size', '8', '--epochs', '1', '--max-steps', '3')  # the same command again
    assert 'already holds this run, finished at step 3: nothing to do' in capsys.readouterr().out
    summary = train.main(['--resume', str(tmp_path / 'last.pth')])  # not "done": --max-steps was that call's
    assert summary['steps'] == 19 and summary['epochs'] == 1


def test_a_broken_validation_file_is_named_before_the_first_epoch(tmp_path, tiny, monkeypatch, capsys):
    root = data.make_demo(tmp_path / 'demo')
    case = data.eval_cases('demo', root, 'val').ids[0]
    (root / 'train_npz' / f'{case}_slice005.npz').write_bytes(b'garbage')
    steps = []
    monkeypatch.setattr(train, 'train_step', lambda *a, **kw: steps.append(1))
    with pytest.raises(SystemExit) as e:
        run(tmp_path / 'out', str(root), '--batch-size', '64', '--epochs', '1')
    assert e.value.code == 2 and f'{case}_slice005.npz: unreadable or corrupt npz' in capsys.readouterr().err
    assert not steps


def test_a_write_that_fails_after_the_checks_is_one_line(tmp_path, demo_root, tiny, capsys):
    (tmp_path / 'summary.json').mkdir()  # the last file a run writes cannot be written
    with pytest.raises(SystemExit) as e:
        run(tmp_path, demo_root, '--batch-size', '64', '--max-steps', '1')
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.rstrip().endswith(f"error: {tmp_path / 'summary.json'}: Is a directory"), err
    assert 'Traceback' not in err
    assert (tmp_path / 'last.pth').is_file()  # the checkpoints before it stay


def test_the_demo_never_writes_into_a_users_folder(tmp_path, tiny, capsys):
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
    with pytest.raises(SystemExit) as e:
        run(tmp_path / 'out', str(tmp_path / 'mine'), '--batch-size', '64', '--epochs', '1')
    assert e.value.code == 2 and 'holds files (notes.txt' in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / 'mine').iterdir()) == ['notes.txt']
    real = tmp_path / 'synapse' / 'train_npz' / 'case0001_slice000.npz'  # Synapse's layout, not a demo set
    real.parent.mkdir(parents=True)
    np.savez(real, image=np.zeros((8, 8)), label=np.zeros((8, 8)))
    with pytest.raises(SystemExit) as e:
        run(tmp_path / 'out', str(tmp_path / 'synapse'), '--batch-size', '64', '--epochs', '1')
    assert e.value.code == 2 and 'holds files (train_npz' in capsys.readouterr().err
    assert [p.name for p in real.parent.iterdir()] == [real.name] and np.load(real)['image'].shape == (8, 8)


def test_a_folder_in_use_by_a_running_training_is_refused_and_a_killed_run_frees_it(tmp_path, demo_root, tiny,
                                                                                    capsys):
    flags = ['--batch-size', '64', '--max-steps', '1']
    run(tmp_path / 'a', demo_root, *flags)  # a stopped run in a, then a fresh folder b
    for out in (tmp_path / 'a', tmp_path / 'b'):
        out.mkdir(exist_ok=True)
        (out / 'last.pth.tmp').write_bytes(b'the running run is writing this')
        holder = subprocess.Popen([sys.executable, '-c', f'import data, time; data.lock_output({str(out)!r}); '
                                   'print("held", flush=True); time.sleep(120)'], cwd=HERE, stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert holder.stdout.readline().strip() == 'held'
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                run(out, demo_root, *flags[:2])
            err = capsys.readouterr().err
            assert e.value.code == 2 and f'error: {out} is in use by a running training (pid {holder.pid} on ' in err
            assert len(err.strip().splitlines()) == 1 and (out / 'last.pth.tmp').is_file()  # nothing touched
        finally:
            holder.kill()  # SIGKILL: no clean-up of its own
            holder.wait()
        assert (out / 'train.lock').is_file()  # what the kill leaves does not lock the folder
        run(out, demo_root, *flags) if out.name == 'b' else train.main(['--resume', str(out / 'last.pth')])
        assert not (out / 'train.lock').exists() and (out / 'last.pth').is_file()


def test_outputs_never_go_inside_the_dataset_root(tmp_path, tiny, capsys):
    root = data.make_demo(tmp_path / 'demo')
    before = sorted(p.relative_to(root) for p in root.rglob('*'))
    for out in (root, root / 'train_npz', root / 'runs'):
        with pytest.raises(SystemExit) as e:
            run(out, str(root), '--batch-size', '64', '--max-steps', '1')
        assert e.value.code == 2 and f'{out} (--out) lies inside {root} (the dataset root)' in capsys.readouterr().err
    assert sorted(p.relative_to(root) for p in root.rglob('*')) == before


def test_a_run_records_the_cases_it_trained_and_validated_on(tmp_path, demo_root, tiny):
    run(tmp_path, demo_root, '--batch-size', '64', '--max-steps', '1')
    info = torch.load(tmp_path / 'best.pth', weights_only=True)['data']
    assert info['trained'] == data.eval_cases('demo', demo_root, 'train').ids and len(info['trained']) == 13
    assert info['validated'] == data.eval_cases('demo', demo_root, 'val').ids and len(info['validated']) == 2


def test_pretrained_file_on_a_folder_that_trained_from_scratch_says_so(tmp_path, demo_root, tiny, capsys):
    run(tmp_path, demo_root, '--batch-size', '64', '--max-steps', '1')  # the demo trains from scratch
    with pytest.raises(SystemExit) as e:
        run(tmp_path, demo_root, '--batch-size', '64', '--max-steps', '2', '--pretrained-file', 'w.safetensors')
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage lines
    assert e.value.code == 2 and f"--pretrained-file: {tmp_path / 'last.pth'} trained from scratch" in err
    assert '--no-pretrained' not in err


def test_a_run_holds_its_out_folder_while_it_trains(tmp_path, demo_root, tiny, monkeypatch):
    import fcntl
    seen, step = [], train.train_step

    def checked_step(*a, **kw):  # another open file of the lock, as a second run would try it
        with open(tmp_path / 'train.lock') as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                seen.append('free')
            except BlockingIOError:
                seen.append('held')
        return step(*a, **kw)
    monkeypatch.setattr(train, 'train_step', checked_step)
    run(tmp_path, demo_root, '--batch-size', '64', '--max-steps', '2')
    assert seen == ['held', 'held'] and not (tmp_path / 'train.lock').exists()
