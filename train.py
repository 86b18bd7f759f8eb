"""
Training of DANIE (Sec. 4.2): ImageNet MaxViT, AdamW (lr and decay 1e-4), Eq. 13, each dataset's epochs and
batch. Writes into --out: last.pth every epoch, best.pth at the best validation Dice, log.csv, progress.png.

    python train.py --data synapse --size L            # --data demo: minutes on a CPU
    python train.py --resume runs/synapse-L/last.pth   # continue a stopped run
    torchrun --nproc_per_node 4 train.py --data synapse --size L   # 4 GPUs, the same recipe
"""

import argparse
import contextlib
import csv
import datetime
import io
import itertools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_reduce
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import evaluate
import model
from predict import number

# ---- constants

LAMBDA_DICE = 0.7  # Eq. 13: lambda_1; lambda_2 = 1 - lambda_1 weighs the CE
SUPERVISION = ('final', 'deep', 'mutation')
# flags a continued run may change (PER_CALL: not even taken from last.pth); the others define the run
PER_CALL = ('resume', 'max_steps', 'workers', 'compile')
MAY_CHANGE = PER_CALL + ('root', 'out', 'epochs', 'val_every', 'amp', 'pretrained', 'pretrained_file')

# ---- helpers


class TrainError(Exception):
    """A run that cannot go on: a checkpoint that cannot be written."""


def cases_arg(text):
    """argparse type of --val-cases: a whole number of cases, or a fraction of them below 1."""
    value = number(float, 0)(text)
    if value >= 1 and not isinstance(value, int):
        raise argparse.ArgumentTypeError(f'expected a whole number of cases or a fraction below 1, got {text!r}')
    return value


def switches(args):
    return dict(hap=not args.no_hap, sap=not args.no_sap, spatial_att=not args.no_spatial_att, order=args.order,
                channel_att=not args.no_channel_att, calibration=not args.no_calibration, fusion=args.fusion)


def init_name(args):
    return f"ImageNet {args.pretrained_file or 'from timm'}" if args.pretrained else 'from scratch (--no-pretrained)'


def build_model(args, num_classes, pretrained):
    """DANIE-S/L with the switches of Tables 5-7, from ImageNet (Sec. 4.2) or scratch."""
    return model.danie(args.size, num_classes=num_classes, img_size=args.img_size, pretrained=pretrained and
                       args.pretrained, pretrained_file=args.pretrained_file, **switches(args))


def make_optimizer(net, lr, weight_decay, device):
    # NOTE(impl): AdamW's default betas and eps, decay on all parameters: Sec. 4.2 gives only lr and decay.
    return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay, fused=device.type in ('cuda', 'cpu'))


def setup_distributed():
    """(rank, world size, device); under torchrun, the process group."""
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else 'cpu')
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return 0, 1, device
    if cuda:
        torch.cuda.set_device(device)
    # NOTE(impl): a long timeout: the others wait while rank 0 validates.
    dist.init_process_group('nccl' if cuda else 'gloo', timeout=datetime.timedelta(hours=2))
    return int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), device


@contextlib.contextmanager
def all_ranks(world):
    """Runs the block on every rank, then compares: if it failed on any rank, all raise (none waits)."""
    error, errors = None, [None] * world
    try:
        yield
    except Exception as e:  # raised below, once every rank knows
        error = e
    if world > 1:
        dist.all_gather_object(errors, None if error is None else str(error))
    if error or any(errors):
        raise error or data.DataError(f'{next(e for e in errors if e)} (on another rank)')

# ---- steps: the loss of Eq. 13, one optimiser step, one epoch, saving and logging


def dice_loss(logits, target, num_classes=None, smooth=1e-5, reduce=None):
    """Soft Dice loss of logits (B,K,H,W) for target (B,H,W), averaged over the classes."""
    # NOTE(impl): TransUNet/CASCADE's DiceLoss, whence 0.7/0.3: all classes, a Dice per class over the batch,
    # squared terms, smooth 1e-5.
    prob = logits.float().softmax(dim=1)  # (B,K,H,W)
    classes = torch.arange(num_classes or logits.shape[1], device=target.device)  # (K,)
    onehot = (target[:, None] == classes[:, None, None]).to(prob.dtype)  # (B,1,H,W) == (K,1,1) -> (B,K,H,W)
    inter = (prob * onehot).sum((0, 2, 3))  # (K,)
    p2 = (prob * prob).sum((0, 2, 3))  # (K,)
    g2 = onehot.sum((0, 2, 3))  # (K,); onehot * onehot == onehot
    if reduce is not None:  # DDP: the Dice of the global batch
        inter, p2, g2 = reduce(torch.stack([inter, p2, g2]))  # (3,K)
    return (1 - (2 * inter + smooth) / (p2 + g2 + smooth)).mean()


def seg_loss(logits, target, num_classes=None, reduce=None):
    """Eq. 13 on one output, in float32: lambda_1 Dice + lambda_2 CE."""
    dice = dice_loss(logits, target, num_classes, reduce=reduce)
    ce = F.cross_entropy(logits.float(), target)
    return LAMBDA_DICE * dice + (1 - LAMBDA_DICE) * ce  # Eq. (13)


def criterion(y, heads, target, mode='deep', num_classes=None, reduce=None):
    """Eq. 13 on DANIE's outputs (y, [p1..p4]), summed over the outputs the supervision mode names."""
    if mode == 'final':  # y = sum_i alpha_i p_i (Eq. 12) only
        outputs = [y]
    elif mode == 'deep':  # CASCADE: every head, and here y
        outputs = [*heads, y]
    else:  # 'mutation', MERIT: the summed logits of each non-empty subset of heads (15 for 4)
        subsets = [s for r in range(1, len(heads) + 1) for s in itertools.combinations(heads, r)]
        outputs = [sum(s) for s in subsets]
    return sum(seg_loss(o, target, num_classes or y.shape[1], reduce) for o in outputs)


def train_step(net, optimiser, scaler, x, target, amp, supervision, num_classes=None, reduce=None):
    """Forward, Eq. 13, backward, AdamW; the loss as a device tensor (no host sync)."""
    with model.autocast(x.device, amp):
        y, heads = net(x)
    loss = criterion(y, heads, target, supervision, num_classes, reduce)
    optimiser.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimiser)
    scaler.update()
    return loss.detach()


def train_one_epoch(net, optimiser, scaler, loader, device, amp, supervision, run, max_steps=None):
    """The loader's batches from the run's position, up to max_steps in all; (mean loss, steps)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    reduce = all_reduce if world > 1 else None  # its backward sums the gradients too
    num_classes, losses = loader.dataset.spec.num_classes, []
    for x, target in tqdm(loader, desc=f'epoch {run.epoch + 1}', leave=False, disable=rank > 0):
        x = x.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        losses.append(train_step(net, optimiser, scaler, x, target, amp, supervision, num_classes, reduce))
        if max_steps is not None and run.step + len(losses) >= max_steps:
            break
    norm = torch.stack(torch._foreach_norm(list(net.parameters()))).sum()  # the last loss predates its update
    stats = torch.stack([*losses, norm]) / world
    if world > 1:  # a sum: a NaN on any rank reaches every rank, and all stop together
        dist.all_reduce(stats)
    *losses, norm = stats.tolist()  # the epoch's one host read
    i = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if i is not None or not math.isfinite(norm):
        what, i = ('the weights are not finite', len(losses) - 1) if i is None else (f'loss is {losses[i]}', i)
        raise FloatingPointError(f'{what} at step {run.step + i + 1} (epoch {run.epoch + 1})')
    return sum(losses) / max(len(losses), 1), len(losses)


def save(out, net, optimiser, scaler, run, fields, best, world):
    """best.pth if `best`, then last.pth (and the training state), each atomic: a failed write keeps the last."""
    fields = dict(fields, epoch=run.epoch, step=run.step)
    state = {k: v for k, v in asdict(run).items() if k not in ('epoch', 'step')}
    try:
        if best:
            model.save_checkpoint(out / 'best.pth', model.checkpoint(net, **fields))
        model.save_checkpoint(out / 'last.pth', model.checkpoint(net, **fields, train=dict(
            state, optimizer=optimiser.state_dict(), scaler=scaler.state_dict(), world_size=world)))
    except model.CheckpointError as e:
        raise TrainError(e) from None


def log(out, rows, epochs):
    """log.csv (each row written after its checkpoint), the epoch's line, progress.png (loss and Dice)."""
    writer = csv.DictWriter(text := io.StringIO(newline=''), fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    data.write_atomic(out / 'log.csv', text.getvalue())
    row = rows[-1]
    print(f"epoch {row['epoch']}/{epochs} | " + ' | '.join(f'{k} {v}' for k, v in row.items() if v != '' and
                                                          k != 'epoch'), flush=True)
    try:
        from matplotlib.figure import Figure  # without pyplot's global state
    except ImportError:  # a bare GPU image: no plot
        return
    ax = (fig := Figure(figsize=(7, 4))).add_subplot(xlabel='epoch', ylabel='training loss (Eq. 13)')
    ax.plot([int(r['epoch']) for r in rows], [float(r['loss']) for r in rows])
    if dice := [(int(r['epoch']), float(r['val_dice'])) for r in rows if r['val_dice']]:
        ax.twinx().plot(*zip(*dice), 'o-', color='tab:orange', label='validation Dice')
        fig.legend()
    fig.savefig(png := io.BytesIO(), format='png', dpi=100)
    data.write_atomic(out / 'progress.png', png.getbuffer())

# ---- top level: the run


@dataclass
class Run:
    """Where a run stands: what last.pth holds besides weights and optimiser."""
    epoch: int = 0          # epochs done
    step: int = 0           # optimiser steps
    epoch_step: int = 0     # steps into this epoch
    best_metric: float = None
    best_epoch: int = None
    elapsed: float = 0.0    # seconds
    log: list = field(default_factory=list)  # the rows of log.csv

    def done(self, epochs, max_steps):
        return self.epoch >= epochs or max_steps is not None and self.step >= max_steps


def prepare(args, rank):
    """Rank 0 first: --out checked, a killed write's .tmp removed, the demo made."""
    if rank == 0:
        data.output_dir(args.out, '--out', roots={args.root: 'the dataset root'})
        data.lock_output(args.out)
        for tmp in Path(args.out).glob('*.tmp'):
            tmp.unlink()
        if args.data == 'demo':
            data.make_demo(args.root, reuse=True)  # refuses a folder it did not write
        print(f'init: {init_name(args)}', flush=True)
        if args.select_on_test:
            print(f'WARNING: {evaluate.SELECTED_ON_TEST}', file=sys.stderr)


def setup(args, ckpt, rank, world, device):
    """Training set, validation cases (each file read now), model, optimiser; the data the checkpoints record."""
    split = 'test' if args.select_on_test else 'val'  # --select-on-test: nothing held out, best.pth on the test split
    common = dict(label_map=args.label_map, num_classes=args.num_classes,
                  val_cases=0 if args.select_on_test else args.val_cases)
    train_set = data.train_set(args.data, args.root, args.img_size, seed=args.seed, **common)
    if len(train_set) // world < args.batch_size // world:
        raise data.DataError(f'--batch-size {args.batch_size} is larger than the training set')
    val = data.eval_cases(args.data, args.root, split, **common) if rank == 0 else []
    for item in getattr(val, 'items', []):  # a broken file fails now, not after an epoch
        item.read()
    torch.manual_seed(args.seed)  # one initialisation on every rank
    net = build_model(args, train_set.spec.num_classes, pretrained=ckpt is None)
    if ckpt is not None:
        model.load_weights(net, ckpt['model'], args.resume)
    if world > 1 and device.type == 'cuda':
        # NOTE(impl): SyncBatchNorm on GPUs: BN sees the global batch (gloo on CPUs has none).
        net = timm.layers.convert_sync_batchnorm(net)
    net = net.to(device)
    optimiser = make_optimizer(net, args.lr, args.weight_decay, device)
    scaler = torch.amp.GradScaler('cuda', enabled=args.amp == 'fp16')
    if ckpt is not None:
        optimiser.load_state_dict(ckpt['train']['optimizer'])
        scaler.load_state_dict(ckpt['train']['scaler'] or scaler.state_dict())  # empty: no fp16
    record = dict(name=args.data, root=os.path.abspath(args.root), label_map=args.label_map, seed=args.seed,
                  val_cases=common['val_cases'], spec=asdict(train_set.spec), selected_on=split,
                  # the cases seen: evaluate.py refuses to score a split that shares one
                  trained=sorted({s.id for s in train_set.samples}), validated=[] if args.select_on_test else
                  list(getattr(val, 'ids', [])))
    return train_set, val, net, optimiser, scaler, record


def train(args, ckpt, rank, world, device):
    """Sec. 4.2's run: each epoch trains on every rank, then rank 0 validates, keeps the best, saves and logs."""
    with all_ranks(world):  # the others wait for the demo
        prepare(args, rank)
    # NOTE(impl): matmuls stay IEEE fp32 (PyTorch's default), as in evaluation: see ES.forward.
    torch.backends.cudnn.benchmark = True  # one input size
    with all_ranks(world):
        train_set, val, net, optimiser, scaler, record = setup(args, ckpt, rank, world, device)
    sampler, per_rank = data.EpochSampler(train_set, args.seed, rank, world), args.batch_size // world
    # NOTE(impl): --batch-size is the global batch; drop_last: full batches only (BatchNorm).
    loader = data.make_loader(train_set, per_rank, shuffle=False, workers=args.workers, sampler=sampler,
                              drop_last=True)
    ddp = DistributedDataParallel(net, [device.index] if device.type == 'cuda' else None) if world > 1 else net
    if args.compile:  # the whole model, in place (the state-dict keys stay): see BENCHMARKS.md
        net.compile()
    state = {k: v for k, v in (ckpt or {}).get('train', {}).items() if k in Run.__annotations__}
    run = Run(ckpt['epoch'], ckpt['step'], **state) if ckpt else Run()
    out, spec, meta = Path(args.out), train_set.spec, dict(data=record, args=vars(args), init=init_name(args))
    while not run.done(args.epochs, args.max_steps):
        t0 = time.perf_counter()
        sampler.set_epoch(run.epoch, run.epoch_step * per_rank)  # from the sample the run stopped at
        loss, steps = train_one_epoch(ddp, optimiser, scaler, loader, device, args.amp, args.supervision, run,
                                      args.max_steps)
        seconds, epoch_over = time.perf_counter() - t0, steps == len(loader)
        run.step, run.epoch_step, run.elapsed = run.step + steps, run.epoch_step + steps, run.elapsed + seconds
        run.epoch, run.epoch_step = (run.epoch + 1, 0) if epoch_over else (run.epoch, run.epoch_step)
        epoch = run.epoch + (run.epoch_step > 0)  # the epoch the log names: one stopped part way counts
        with all_ranks(world):  # rank 0 validates and writes; the others wait here
            if rank == 0:
                t0, metric = time.perf_counter(), None
                if len(val) and (run.done(args.epochs, args.max_steps) or epoch_over and epoch % args.val_every == 0):
                    # validate: the table's figure, mean Dice (ISIC: pooled at 256x256), no distances
                    metric = float(evaluate.evaluate(net, val, spec, args.img_size, device=device, amp=args.amp,
                                                     progress=False, distances=False,
                                                     workers=min(args.workers, 4))['mean_dice'])
                if best := metric is not None and math.isfinite(metric) and (run.best_metric is None or
                                                                            metric > run.best_metric):
                    run.best_metric, run.best_epoch = metric, epoch
                run.elapsed += time.perf_counter() - t0
                run.log.append(dict(epoch=epoch, step=run.step, loss=f'{loss:.6f}', val_dice='' if metric is None else
                                    f'{metric:.6f}', best_dice='' if run.best_metric is None else
                                    f'{run.best_metric:.6f}', images_per_s=f'{steps * args.batch_size / seconds:.2f}',
                                    elapsed_s=f'{run.elapsed:.1f}'))
                save(out, net, optimiser, scaler, run, dict(meta, metric=metric), best, world)
                log(out, run.log, args.epochs)
    if rank == 0:  # summary.json, and the next command
        kept = out / ('best.pth' if run.best_metric is not None else 'last.pth')
        summary = dict(best_val_dice=run.best_metric, best_epoch=run.best_epoch, epochs=run.epoch, steps=run.step,
                       checkpoint=str(kept))
        data.write_atomic(out / 'summary.json', json.dumps(summary, indent=2))
        print(f'done: {run.epoch} epochs, {run.step} steps, {run.elapsed:.0f} s')
        print(f'next: python evaluate.py --ckpt {kept}')
        return summary

# ---- CLI


def build_parser():
    p = argparse.ArgumentParser(description="Train DANIE (Sec. 4.2); unset flags: the dataset's recipe")
    a = p.add_argument
    a('--data', choices=data.DATASETS, help='Sec. 4.1; demo: synthetic; folder, nnunet: your own')
    a('--root', help='dataset folder (default: data/<name>)')
    a('--num-classes', type=number(int, 2), help='--data folder without classes.txt')
    a('--img-size', type=number(int, 32), help='a multiple of 32 (default 224)')
    a('--val-cases', type=cases_arg, help='cases held out to pick best.pth (a count or fraction)')
    a('--label-map', default='transunet', choices=data.LABEL_MAPS, help="Synapse's ids")
    a('--select-on-test', action='store_true', help="PICK best.pth ON THE TEST SPLIT (as peers do)")
    a('--workers', type=number(int, 0), help='loader processes (default: 8 on CUDA, else 0)')
    a('--size', choices=('S', 'L'), help='DANIE-S or DANIE-L, Sec. 4.2 (default S)')
    a('--no-pretrained', dest='pretrained', action='store_false', default=None, help='not ImageNet (Sec. 4.2)')
    a('--pretrained-file', help='ImageNet weights from a local file (offline)')
    for flag, row in (('hap', 'A.1'), ('sap', 'A.2'), ('spatial-att', 'A.3'), ('channel-att', 'A.4')):
        a(f'--no-{flag}', action='store_true', help=f'Table 5 {row} (with --fusion add)')
    a('--order', choices=model.ORDERS, default='channel_first', help="Table 6: HAP's order")
    a('--no-calibration', action='store_true', help='Table 6: a plain average, not Eq. 4')
    a('--fusion', choices=model.FUSIONS, default='jp', help='Table 7; jp: Eq. 6-11')
    a('--epochs', type=number(int, 1), help='default (Sec. 4.2): Synapse 300, ACDC 400, ISIC 200, GlaS 100')
    a('--batch-size', type=number(int, 1), help='global; default (Sec. 4.2): 24, 12, 8, 8 (GlaS: ours)')
    a('--lr', type=number(float, 0, True), help='AdamW (default 1e-4, Sec. 4.2)')
    a('--weight-decay', type=number(float, 0), help='AdamW (default 1e-4, Sec. 4.2)')
    # NOTE(impl): 'deep' by default, on p1..p4 (as CASCADE, whose recipe the paper repeats) and y: the paper
    # does not say where Eq. 13 applies.
    a('--supervision', choices=SUPERVISION, default='deep', help='where Eq. 13 applies')
    a('--max-steps', type=number(int, 1), help='stop after this many steps')
    a('--amp', choices=tuple(model.AMP_DTYPES), help='autocast dtype (default: none, fp32)')
    a('--compile', action='store_true', help='torch.compile the model')
    a('--seed', type=number(int, 0), default=0, help='initialisation, sampling, augmentation (not the held-out cases)')
    a('--out', help='output folder (default: runs/<data>-<size>)')
    a('--resume', metavar='PATH', help='continue the run of PATH (a last.pth)')
    a('--val-every', type=number(int, 1), default=1, help='validate every N epochs')
    return p


def parse(argv):
    """The arguments (unset: the dataset's recipe) and the checkpoint the run continues or --out holds."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join('runs', f"{args.data}-{args.size or 'S'}")
    path = Path(args.resume or Path(args.out) / 'last.pth')
    if args.resume and not path.is_file():
        parser.error(f'--resume: no checkpoint at {path}')
    data.lock_output(path.parent, hold=False)  # a running run's checkpoint is no stopped run
    ckpt = model.load_checkpoint(path, resume=True) if (args.resume or args.data) and path.is_file() else None
    if ckpt is not None:  # the checkpoint's flags stand in for the defaults
        saved = {k: v for k, v in ckpt['args'].items() if k not in PER_CALL}
        args = parser.parse_args(argv, namespace=argparse.Namespace(**dict(saved, out=str(path.parent))))
        changed = [f"--{k.replace('_', '-')} {v} (checkpoint: {saved.get(k)})" for k, v in vars(args).items()
                   if k not in MAY_CHANGE and v != saved.get(k)]
        if changed:
            what = '--resume continues the same run' if args.resume else f'{args.out} holds another run'
            parser.error(f'{what}, but {", ".join(changed)}; start a new --out instead')
    if args.data is None:
        parser.error('--data is required (or --resume PATH)')
    spec = data.get_spec(args.data, args.root, args.num_classes)
    args.root, args.size, args.amp = args.root or data.default_root(args.data), args.size or 'S', args.amp or 'none'
    for k in ('epochs', 'batch_size', 'img_size', 'lr', 'weight_decay'):  # unset: the dataset's recipe
        setattr(args, k, getattr(spec, k) if getattr(args, k) is None else getattr(args, k))
    args.workers = (8 if torch.cuda.is_available() else 0) if args.workers is None else args.workers
    # NOTE(impl): the demo trains from scratch (no download on a CPU); the rest from ImageNet (Sec. 4.2).
    args.pretrained = args.data != 'demo' or bool(args.pretrained_file) if args.pretrained is None else args.pretrained
    world = int(os.environ.get('WORLD_SIZE', 1))
    for bad, why in ((args.batch_size % world, f'--batch-size {args.batch_size}: not divisible by {world} GPUs'),
                     (args.amp == 'fp16' and not torch.cuda.is_available(), '--amp fp16 needs CUDA'),
                     (args.pretrained_file and not args.pretrained, '--pretrained-file with --no-pretrained' if
                      ckpt is None else f'--pretrained-file: {path} trained from scratch, and a continued run keeps '
                      'its own weights; start a new --out to train from ImageNet')):
        if bad:
            parser.error(why)
    try:  # the model's checks: img_size, ablation switches that go together
        model.make_config(args.size, img_size=args.img_size, **switches(args))
    except ValueError as e:
        parser.error(str(e))
    if ckpt is not None and not args.resume and not Run(ckpt['epoch'], ckpt['step']).done(args.epochs, args.max_steps):
        parser.error(f"{args.out} already holds a run, stopped at epoch {ckpt['epoch']}/{args.epochs} (step "
                     f"{ckpt['step']}): continue it with --resume {path}, or choose another --out")
    return args, ckpt


def main(argv=None):
    args, world = None, 1
    try:
        args, ckpt = parse(argv)
        if ckpt is not None and not args.resume:  # the same command again: nothing is redone
            best = next(p for p in (Path(args.out) / 'best.pth', Path(args.out) / 'last.pth') if p.exists())
            end = f"epoch {ckpt['epoch']}/{args.epochs}" if ckpt['epoch'] >= args.epochs else f"step {ckpt['step']}"
            return print(f'{args.out} already holds this run, finished at {end}: nothing to do.\n'
                         f'next: python evaluate.py --ckpt {best}')
        rank, world, device = setup_distributed()
        return train(args, ckpt, rank, world, device)
    except (data.DataError, model.CheckpointError, model.PretrainedError, TrainError, OSError) as e:
        print(f"error: {f'{e.filename}: {e.strerror}' if isinstance(e, OSError) else e}", file=sys.stderr)
        raise SystemExit(1 if isinstance(e, (TrainError, OSError)) else 2)  # 1: the run failed; 2: bad input
    except FloatingPointError as e:  # train_one_epoch: a non-finite loss or weights
        last = Path(args.out) / 'last.pth'
        kept = f'the last good checkpoint is {last}' if last.exists() else 'no checkpoint was written'
        print(f'error: {e}; stopped, {kept}; try a lower --lr', file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        last = args and Path(args.out) / 'last.pth'
        print(f'\ninterrupted; continue: python train.py --resume {last}' if last and last.exists() else
              '\ninterrupted before the first checkpoint', file=sys.stderr)
        raise SystemExit(130)
    finally:
        data.unlock_outputs()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
