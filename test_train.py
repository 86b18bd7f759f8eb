"""Tests of train.py: the loss of Eq. 13 (Sec. 4.2) by hand, the loop, exact resume, DDP on gloo, the NaN guard,
bad flags, and an end-to-end run on the demo set scored by evaluate.py. CPU, tiny, offline."""

import csv
import dataclasses
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import evaluate
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


# -----------------------------------------------------------------------------
# loss (Eq. 13)

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


# -----------------------------------------------------------------------------
# the loop


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
    assert last['epoch'] == 3 and last['epoch_step'] == 0 and last['step'] == summary['steps']
    assert best['metric'] == best['best_metric'] == summary['best_val_dice']
    assert {'format', 'config', 'model', 'data', 'args', 'epoch', 'step', 'optimizer', 'scaler', 'rng',
            'best_metric', 'metric'} <= set(last)
    assert last['data']['name'] == 'demo' and last['args']['epochs'] == 3
    assert not list(tmp_path.glob('*.tmp'))


def test_resume_mid_epoch_gives_the_same_weights(tmp_path, demo_root, tiny):
    flags = ['--epochs', '2', '--batch-size', '8', '--lr', '1e-2']
    assert len(data.train_set('demo', demo_root, 32)) // 8 == 19  # steps per epoch, for the numbers below
    run(tmp_path / 'a', demo_root, *flags, '--max-steps', '30')
    run(tmp_path / 'b', demo_root, *flags, '--max-steps', '7')  # stops in the middle of epoch 1
    stopped = torch.load(tmp_path / 'b' / 'last.pth', weights_only=True)
    assert (stopped['epoch'], stopped['step'], stopped['epoch_step']) == (0, 7, 7)
    # only the flags that may change; the rest come from the checkpoint. Workers draw the same augmentation.
    train.main(['--resume', str(tmp_path / 'b' / 'last.pth'), '--max-steps', '30', '--workers', '2'])
    a, b = (torch.load(tmp_path / r / 'last.pth', weights_only=True) for r in 'ab')
    assert (b['epoch'], b['step'], b['epoch_step']) == (a['epoch'], a['step'], a['epoch_step']) == (1, 30, 11)
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
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

    def nan_at_step_3(*a, **kw):
        calls.append(1)
        loss = real(*a, **kw)
        return loss * float('nan') if len(calls) == 3 else loss

    monkeypatch.setattr(train, 'criterion', nan_at_step_3)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, demo_root, '--batch-size', '64', '--epochs', '5')  # 2 steps per epoch
    err = capsys.readouterr().err
    assert e.value.code == 1 and 'loss is nan at step 3 (epoch 2)' in err and 'last.pth' in err
    last = torch.load(tmp_path / 'last.pth', weights_only=True)
    assert last['step'] == 2 and all(torch.isfinite(v).all() for v in last['model'].values())
    assert len(log_rows(tmp_path)) == 1


def test_bad_flags(tmp_path, demo_root, capsys):
    missing = str(tmp_path / 'missing')
    cases = [
        (['--data', 'nosuch'], "invalid choice: 'nosuch'"),
        (['--data', 'synapse', '--root', missing], missing),  # data.py's DataError, named, no traceback
        (['--data', 'demo', '--root', demo_root, '--batch-size', '1000'], 'larger than the training set'),
        (['--data', 'demo', '--root', demo_root, '--img-size', '40'], 'multiple of 32'),
        (['--data', 'demo', '--no-hap'], "fusion must be 'add'"),
        (['--data', 'demo', '--epochs', '0'], '--epochs must be at least 1'),
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


def test_flags_given_are_used_and_defaults_come_from_the_spec(tmp_path):
    spec = data.SPECS['synapse']
    _, args, _ = train.parse(['--data', 'synapse', '--out', str(tmp_path)])
    assert (args.epochs, args.batch_size, args.img_size, args.size) == (spec.epochs, spec.batch_size, 224, 'S')
    _, args, _ = train.parse(['--data', 'synapse', '--out', str(tmp_path), '--epochs', '7', '--batch-size', '2',
                              '--img-size', '256', '--size', 'L'])
    assert (args.epochs, args.batch_size, args.img_size, args.size) == (7, 2, 256, 'L')
    _, args, _ = train.parse(['--data', 'demo', '--out', str(tmp_path)])
    assert args.img_size == data.SPECS['demo'].img_size and args.supervision == 'deep'
    assert args.lr == getattr(data.SPECS['demo'], 'lr', 1e-4)
    _, args, _ = train.parse(['--data', 'synapse', '--out', str(tmp_path)])
    assert args.lr == 1e-4 and args.weight_decay == 1e-4  # Sec. 4.2


# -----------------------------------------------------------------------------
# multi-process and end to end


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
    assert sorted(f.name for f in out.iterdir()) == ['best.pth', 'last.pth', 'log.csv', 'summary.json']
    assert p.stdout.count('done:') == 1  # rank 0 alone reports
    ck = torch.load(out / 'last.pth', weights_only=True)
    assert ck['world_size'] == 2 and ck['step'] == 3 and ck['args']['batch_size'] == 8
    assert not any(k.startswith('module.') for k in ck['model'])  # the bare module, not the DDP wrapper


def test_end_to_end_demo_then_evaluate(tmp_path, demo_root):
    """The real DANIE-S for two steps; evaluate.py scores best.pth from the checkpoint alone."""
    summary = run(tmp_path, demo_root, '--batch-size', '4', '--max-steps', '2')
    assert summary['steps'] == 2 and summary['best_val_dice'] is not None
    ck = evaluate.load_checkpoint(tmp_path / 'best.pth')
    assert ck['config']['size'] == 'S' and ck['config']['img_size'] == 32 and ck['config']['num_classes'] == 9
    assert evaluate.main(['--ckpt', str(tmp_path / 'best.pth'), '--out', str(tmp_path / 'eval'),
                          '--no-progress']) == 0
    assert (tmp_path / 'eval' / 'summary.json').exists()


def test_bench_runs(tmp_path):
    rows = train.main(['--bench', '--size', 'S', '--img-size', '32', '--batch-size', '2', '--max-steps', '1',
                       '--out', str(tmp_path)])
    assert len(rows) == 1 and rows[0]['model'] == 'DANIE-S' and rows[0]['images_per_s'] > 0
    assert (tmp_path / 'bench.json').exists()
