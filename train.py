"""
Training of DANIE with the recipe of Sec. 4.2: ImageNet-initialised MaxViT, AdamW (learning rate and weight decay
1e-4), the loss of Eq. 13 (0.7 Dice + 0.3 cross-entropy), the epochs and batch size of each dataset's spec.

    python train.py --data demo                        # the synthetic set (written if missing), minutes on a CPU
    python train.py --data synapse --size L            # the Sec. 4.2 recipe on one GPU
    python train.py --resume runs/synapse-L/last.pth   # continue a stopped run exactly where it stopped
    torchrun --nproc_per_node 4 train.py --data synapse --size L   # the same recipe on 4 GPUs

Writes into --out: last.pth (the whole training state) every epoch, best.pth (what evaluate.py needs) at the best
validation figure, log.csv and progress.png (the rows last.pth holds), summary.json. Offers: dice_loss, seg_loss,
criterion (Eq. 13); train_step, the one step the loop and bench.py run; main.
"""

import argparse
import csv
import datetime
import io
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
import model as danie

# -----------------------------------------------------------------------------
# constants

LAMBDA_DICE = 0.7  # Eq. 13: lambda_1; lambda_2 = 1 - lambda_1 = 0.3 weighs the cross-entropy
SUPERVISION = ('final', 'deep', 'mutation')
LOG_EVERY = 50     # steps between the progress bar's reads of the loss (each waits for the GPU)
# the flags that define a run (another value is another run); those a continued run does not take from it
SAME_RUN = ('data', 'num_classes', 'size', 'img_size', 'val_cases', 'label_map', 'select_on_test', 'seed', 'no_hap',
            'no_sap', 'no_spatial_att', 'no_channel_att', 'order', 'no_calibration', 'fusion', 'supervision',
            'batch_size', 'lr', 'weight_decay')
PER_CALL = ('resume', 'max_steps', 'workers', 'compile')

# -----------------------------------------------------------------------------
# helpers


class TrainError(Exception):
    """A run that cannot go on: a non-finite loss, a checkpoint that cannot be written."""


def number(kind, low, strict=False):
    """An argparse type: a finite int/float above (strict) or at least `low`."""
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected {kind.__name__}, got {text!r}') from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>' if strict else '>='} {low}, got {text!r}")
        return int(value) if kind is float and value >= 1 and value.is_integer() else value  # --val-cases 2: cases
    return check


def switches(args):
    return dict(hap=not args.no_hap, sap=not args.no_sap, spatial_att=not args.no_spatial_att, order=args.order,
                channel_att=not args.no_channel_att, calibration=not args.no_calibration, fusion=args.fusion)


def init_name(args):
    """How the backbone starts, as the run's first line and the checkpoint say it."""
    return (f"ImageNet {danie.PRESETS[args.size]['backbone']} (Sec. 4.2) from {args.pretrained_file or 'timm'}"
            if args.pretrained else 'from scratch (--no-pretrained)')


def build_model(args, num_classes, pretrained):
    """DANIE-S/L with the switches of Tables 5-7; pretrained: the backbone's ImageNet weights (Sec. 4.2)."""
    return danie.danie(args.size, num_classes=num_classes, img_size=args.img_size, pretrained=pretrained and
                       args.pretrained, pretrained_file=args.pretrained_file, **switches(args))


def make_optimizer(model, args, device):
    # NOTE(impl): AdamW's default betas and eps, and decay on every parameter (norms, biases): Sec. 4.2 gives only
    # the learning rate and the decay. One fused kernel for all parameters.
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                             fused=device.type in ('cuda', 'cpu'))


def setup_distributed():
    """(rank, world size, device); under torchrun (RANK and WORLD_SIZE set) also the process group."""
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else 'cpu')
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return 0, 1, device if cuda or not torch.backends.mps.is_available() else torch.device('mps')
    torch.cuda.set_device(device) if cuda else None
    # NOTE(impl): rank 0 validates while the others wait: a long timeout keeps that from ending the job.
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', timeout=datetime.timedelta(hours=2))
    return int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), device


def on_all_ranks(world, fn, *a):
    """fn(*a) on every rank; if it fails on any, every rank raises that error (none waits forever)."""
    result, error, errors = None, None, [None] * world
    try:
        result = fn(*a)
    except Exception as e:  # raised below, on this rank as it is
        error = e
    if world > 1:
        dist.all_gather_object(errors, None if error is None else str(error))
    if error or any(errors):
        raise error or data.DataError(f'{next(e for e in errors if e)} (on another rank)')
    return result


def global_sum(world):
    """Eq. 13's reduce under DDP: all_reduce, whose backward sums the gradients too, so that with DDP's 1/world
    average the gradient is that of one process on the global batch; None on one process."""
    return None if world == 1 else all_reduce


def save(args, files, run):
    """Checkpoints {name: dict} written into --out atomically (.tmp, then a rename), then log.csv and progress.png
    of run.log: the log never holds an epoch that no checkpoint holds. A failed write names the file and the
    reason; its .tmp goes, the last good checkpoint stays."""
    out, log = Path(args.out), io.StringIO()
    writer = csv.DictWriter(log, fieldnames=list(run.log[0]) if run.log else [], lineterminator='\n')
    writer.writeheader()
    writer.writerows(run.log)
    for path, obj in {**{out / k: v for k, v in files.items()}, out / 'log.csv': log.getvalue().encode()}.items():
        tmp, blob = path.with_name(path.name + '.tmp'), io.BytesIO()
        try:
            torch.save(obj, blob) if isinstance(obj, dict) else blob.write(obj)
            with open(tmp, 'wb') as f:
                f.write(blob.getbuffer())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise TrainError(f'{path}: cannot write it ({e.strerror or e}); the last good checkpoint is untouched')
    try:
        from matplotlib.figure import Figure  # the object API, without pyplot's global state
    except ImportError:  # requirements.txt has it; a bare GPU image may not: no plot then
        return
    ax = (fig := Figure(figsize=(7, 4))).add_subplot(xlabel='epoch', ylabel='training loss (Eq. 13)')
    ax.plot([int(r['epoch']) for r in run.log], [float(r['loss']) for r in run.log])
    val = [(int(r['epoch']), float(r['val_dice'])) for r in run.log if r['val_dice']]
    if val:
        ax.twinx().plot(*zip(*val), 'o-', color='tab:orange', label='validation Dice')
        fig.legend()
    fig.savefig(out / 'progress.png', dpi=100)

# -----------------------------------------------------------------------------
# steps: the loss of Eq. 13, one optimiser step, one epoch


def dice_loss(logits, target, num_classes=None, smooth=1e-5, reduce=None):
    """Soft Dice loss of logits (B,K,H,W), or of M stacked outputs (M,B,K,H,W) -> (M,), against target (B,H,W)."""
    # NOTE(impl): TransUNet/CASCADE's DiceLoss, where the 0.7/0.3 come from: every class with background, one Dice
    # per class over the whole batch, squared terms in the denominator, smooth 1e-5.
    B, K, H, W = logits.shape[-4:]
    prob = logits.float().view(-1, B, K, H, W).softmax(dim=2)  # (M,B,K,H,W)
    classes = torch.arange(num_classes or K, device=target.device).view(-1, 1, 1)  # (K,1,1)
    onehot = (target.unsqueeze(1) == classes).to(prob.dtype)  # (B,K,H,W); unlike F.one_hot, no host sync
    inter, p2 = torch.stack([prob * onehot, prob * prob]).sum((2, 4, 5))  # (2,M,B,K,H,W) -> (2,M,K)
    g = onehot.sum((0, 2, 3))  # (K,); onehot * onehot == onehot
    if reduce is not None:  # DDP: the batch Dice over the global batch, not each GPU's share
        inter, p2, g = reduce(torch.cat([inter, p2, g[None]])).split([len(inter), len(p2), 1])
    return (1 - (2 * inter + smooth) / (p2 + g + smooth)).mean(dim=-1).view(logits.shape[:-4])  # (M,K) -> (M,)


def seg_loss(logits, target, num_classes=None, reduce=None):
    """Eq. 13, lambda_1 Dice + (1 - lambda_1) CE in float32, of logits (B,K,H,W) or summed over (M,B,K,H,W)."""
    B, K, H, W = logits.shape[-4:]
    M = logits.numel() // (B * K * H * W)  # 1 for a single output
    ce = F.cross_entropy(logits.float().view(M * B, K, H, W), target.repeat(M, 1, 1))  # the mean of M means
    return LAMBDA_DICE * dice_loss(logits, target, num_classes, reduce=reduce).sum() + (1 - LAMBDA_DICE) * M * ce


def criterion(y, heads, target, mode='deep', num_classes=None, reduce=None):
    """Eq. 13 on DANIE's outputs (y, [p1..p4]) under a supervision mode; reduce sums the Dice terms over GPUs."""
    if mode == 'final':  # on y = sum_i alpha_i p_i (Eq. 12) only
        outputs = y
    elif mode == 'deep':  # CASCADE: on every head, and here on y
        outputs = torch.stack([*heads, y])  # (5,B,K,H,W)
    else:  # 'mutation', MERIT: on the summed logits of each non-empty subset of heads (15 for 4)
        bit = torch.arange(len(heads), device=y.device)
        member = (torch.arange(1, 2 ** len(heads), device=y.device)[:, None] >> bit) & 1  # (15,1) >> (4,) -> (15,4)
        outputs = torch.einsum('sm,mbkhw->sbkhw', member.to(y.dtype), torch.stack(heads))  # (15,4) @ (4,B,K,H,W)
    return seg_loss(outputs, target, num_classes or y.shape[1], reduce)


def train_step(net, opt, scaler, x, target, args, num_classes, reduce=None):
    """Forward, Eq. 13, backward, AdamW step; the loss as a device tensor (no host sync)."""
    with danie.autocast(x.device, args.amp):
        y, heads = net(x)
    loss = criterion(y, heads, target, args.supervision, num_classes, reduce)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def train_one_epoch(net, opt, scaler, loader, args, run, world, device, master):
    """One pass over the loader (from a resume's position on); (mean loss, steps). Stops on a non-finite loss."""
    zero = torch.zeros((), device=device)
    loss_sum, first_bad, bad_loss, n, k = zero.clone(), zero - 1, zero.clone(), 0, loader.dataset.spec.num_classes
    bar = tqdm(total=run.epoch_step + len(loader), initial=run.epoch_step, desc=f'epoch {run.epoch + 1}/{args.epochs}',
               leave=False, dynamic_ncols=True, disable=not master)
    for x, target in loader:
        x = x.to(device, non_blocking=True, memory_format=danie.MEMORY_FORMAT)
        loss = train_step(net, opt, scaler, x, target.to(device, non_blocking=True), args, k, global_sum(world))
        n += 1  # the NaN guard without a host sync per step: the first bad step stays on the device
        new_bad = (first_bad < 0) & ~torch.isfinite(loss)
        first_bad, bad_loss = torch.where(new_bad, run.step + n, first_bad), torch.where(new_bad, loss, bad_loss)
        loss_sum += loss
        bar.update()
        if master and n % LOG_EVERY == 0:
            bar.set_postfix(loss=f'{loss_sum.item() / n:.4f}', refresh=False)
        if args.max_steps is not None and run.step + n >= args.max_steps:
            break
    bar.close()
    # the last step's loss predates its update: the weights must be finite too before any checkpoint
    weights_ok = torch.stack(torch._foreach_norm(list(net.parameters()))).isfinite().all()
    stats = torch.stack([loss_sum / world, first_bad, bad_loss, (~weights_ok).float()])
    if world > 1:  # one loss and one verdict on every rank, so that all stop together
        dist.all_reduce(stats[:1])
        dist.all_reduce(stats[1:2], op=dist.ReduceOp.MAX)
    loss, bad, bad_loss, bad_weights = stats.tolist()  # the epoch's one host sync
    if bad < 0 and bad_weights:
        bad, bad_loss = run.step + n, float('nan')  # the last update made the weights non-finite
    if bad >= 0:
        last = Path(args.out) / 'last.pth'
        kept = f'the last good checkpoint is {last}' if last.exists() else 'no checkpoint was written'
        raise TrainError(f'loss is {bad_loss} at step {int(bad)} (epoch {run.epoch + 1}); stopped, {kept}. '
                         'Try a lower --lr, or --amp none/bf16.')
    return loss / max(n, 1), n

# -----------------------------------------------------------------------------
# top level: the run


@dataclass
class Run:
    """Where a run stands: what last.pth holds, besides the weights and the optimiser, to resume exactly."""
    epoch: int = 0          # epochs completed
    step: int = 0           # optimiser steps in all
    epoch_step: int = 0     # steps into the current epoch (a run stopped by --max-steps or an interrupt)
    best_metric: float = None
    best_epoch: int = None
    elapsed: float = 0.0    # seconds of training and validation
    log: list = field(default_factory=list)  # the rows of log.csv

    def done(self, args):
        return self.epoch >= args.epochs or args.max_steps is not None and self.step >= args.max_steps


def setup(args, ckpt, rank, world, device):
    """The training set, the validation cases (every file read now), the model and the optimiser."""
    common = dict(seed=args.seed, label_map=args.label_map, num_classes=args.num_classes,
                  val_cases=0 if args.select_on_test else args.val_cases)
    train_set = data.train_set(args.data, args.root, args.img_size, **common)
    if len(train_set) // world < args.batch_size // world:
        raise data.DataError(f'--batch-size {args.batch_size} is larger than the training set of {args.data} at '
                             f'{args.root} ({len(train_set)} samples over {world} process(es))')
    val = data.eval_cases(args.data, args.root, 'test' if args.select_on_test else 'val', **common) if rank == 0 else []
    for item in getattr(val, 'items', []):  # a broken validation file is named now, not after an epoch
        item.read()
    torch.manual_seed(args.seed)  # the same initialisation on every rank (DDP also broadcasts rank 0's)
    net = build_model(args, train_set.spec.num_classes, pretrained=ckpt is None)
    if ckpt is not None:
        danie.load_weights(net, ckpt['model'], args.resume or Path(args.out) / 'last.pth')
    if world > 1 and device.type == 'cuda':
        # NOTE(impl): SyncBatchNorm under DDP on GPUs: BN sees the global batch, as on one GPU (gloo on CPUs has
        # none: there BN sees each process's share).
        net = timm.layers.convert_sync_batchnorm(net)
    net = net.to(device, memory_format=danie.MEMORY_FORMAT)
    opt, scaler = make_optimizer(net, args, device), torch.amp.GradScaler('cuda', enabled=args.amp == 'fp16')
    if ckpt is not None:
        opt.load_state_dict(ckpt['train']['optimizer'])
        scaler.load_state_dict(ckpt['train']['scaler'] or scaler.state_dict())  # empty: no fp16 scaling so far
    return net, opt, scaler, train_set, val


def train(args, ckpt, rank, world, device):
    """The recipe: per epoch, train_one_epoch, then (rank 0) validation, checkpoints and the log."""
    on_all_ranks(world, prepare, args, rank)  # also a barrier: the other ranks wait for the demo's files
    # NOTE(impl): matmuls stay IEEE fp32 (PyTorch's default), so ES's energies are formed as in evaluation;
    # convolutions take cuDNN's TF32 default, as the paper's PyTorch on an RTX 3090 did.
    torch.backends.cudnn.benchmark = True  # one input size: cuDNN picks its fastest kernels once
    raw, opt, scaler, train_set, val = on_all_ranks(world, setup, args, ckpt, rank, world, device)
    sampler = data.EpochSampler(train_set, args.seed, rank, world)
    # NOTE(impl): --batch-size is the global batch, split over the processes (N GPUs run the recipe unchanged);
    # drop_last gives every step a full batch (BatchNorm, and one number of steps per epoch).
    loader = data.make_loader(train_set, args.batch_size // world, shuffle=False, workers=args.workers,
                              sampler=sampler, drop_last=True)
    net = DistributedDataParallel(raw, device_ids=device.index is not None and [device.index] or None) \
        if world > 1 else raw
    if args.compile:
        raw.compile_blocks()
    state = {k: v for k, v in ckpt['train'].items() if k in Run.__annotations__} if ckpt else {}
    run = Run(ckpt['epoch'], ckpt['step'], **state) if ckpt else Run()
    if rank == 0:
        save(args, {}, run)  # the log as last.pth has it: rows that a killed run wrote beyond it go
        print(f'DANIE-{args.size} on {device} x{world}: {len(train_set)} {args.data} training samples, {len(val)} '
              f'validation cases, batch {args.batch_size}, {args.epochs} epochs -> {args.out}', flush=True)
    while not run.done(args):
        epoch, skip, t0 = run.epoch, run.epoch_step, time.perf_counter()  # skip: batches done before a resume
        sampler.set_epoch(epoch, skip * (args.batch_size // world))
        loss, n = train_one_epoch(net, opt, scaler, loader, args, run, world, device, rank == 0)
        run.step, run.epoch_step, train_s = run.step + n, run.epoch_step + n, time.perf_counter() - t0
        run.epoch, run.epoch_step = (epoch + 1, 0) if run.epoch_step == skip + len(loader) else (epoch, run.epoch_step)
        run.elapsed += train_s
        if rank == 0:
            checkpoint(raw, opt, scaler, args, run, val, train_set.spec, world, device, loss, n * args.batch_size
                       / train_s)
        on_all_ranks(world, lambda: None)  # the other ranks wait for rank 0's validation and checkpoints
    return finish(run, args) if rank == 0 else None


def prepare(args, rank):
    """Rank 0, before any work: the output folder checked, a killed write's .tmp removed, the demo set made."""
    if rank == 0:
        data.output_dir(args.out, '--out')
        for tmp in Path(args.out).glob('*.tmp'):
            tmp.unlink()
        if args.data == 'demo' and not (Path(args.root) / 'train_npz').is_dir():
            data.make_demo(args.root)
        print(f'init: {init_name(args)}', flush=True)
        if args.select_on_test:
            print("WARNING: --select-on-test chooses best.pth by its Dice on the TEST split (the peers' protocol); "
                  'the test score of that checkpoint is optimistic.', file=sys.stderr, flush=True)


def checkpoint(raw, opt, scaler, args, run, val, spec, world, device, loss, images_per_s):
    """Rank 0 after an epoch: validation when due, best.pth when it improves, last.pth, and the log's row."""
    t0, metric, epoch = time.perf_counter(), None, run.epoch + (run.epoch_step > 0)  # the epoch of these steps
    if len(val) and (run.done(args) or run.epoch_step == 0 and run.epoch % args.val_every == 0):
        metric = float(evaluate.evaluate(raw, val, spec, args.img_size, device=device, amp=args.amp, progress=False,
                                         distances=False, workers=min(args.workers, 4))['mean_dice'])
    best = metric is not None and math.isfinite(metric) and (run.best_metric is None or metric > run.best_metric)
    run.best_metric, run.best_epoch = (metric, epoch) if best else (run.best_metric, run.best_epoch)
    run.elapsed += time.perf_counter() - t0
    run.log.append(dict(epoch=epoch, step=run.step, loss=f'{loss:.6f}', val_dice='' if metric is None else
                        f'{metric:.6f}', best_dice='' if run.best_metric is None else f'{run.best_metric:.6f}',
                        images_per_s=f'{images_per_s:.2f}', elapsed_s=f'{run.elapsed:.1f}'))
    info = dict(name=args.data, root=os.path.abspath(args.root), label_map=args.label_map, seed=args.seed,
                val_cases=0 if args.select_on_test else args.val_cases, spec=asdict(spec),
                selected_on='test' if args.select_on_test else 'val')
    fields = dict(data=info, args=vars(args), init=init_name(args), epoch=run.epoch, step=run.step, metric=metric)
    files = {'best.pth': danie.checkpoint(raw, **fields)} if best else {}
    files['last.pth'] = danie.checkpoint(raw, **fields, train=dict(
        {k: v for k, v in asdict(run).items() if k not in ('epoch', 'step')}, optimizer=opt.state_dict(),
        scaler=scaler.state_dict(), world_size=world))
    save(args, files, run)
    score = '' if metric is None else f' | Dice {metric:.4f} (best {run.best_metric:.4f} @ {run.best_epoch})'
    print(f"epoch {epoch:4d}/{args.epochs}{f' (stopped at batch {run.epoch_step})' if run.epoch_step else ''} | step "
          f'{run.step:7d} | loss {loss:.4f} | {images_per_s:7.1f} img/s{score} | {run.elapsed:7.1f} s', flush=True)


def finish(run, args):
    """summary.json and the closing lines, which name the checkpoint to evaluate."""
    ckpt = Path(args.out) / ('best.pth' if run.best_metric is not None else 'last.pth')
    summary = dict(data=args.data, size=args.size, init=init_name(args), best_val_dice=run.best_metric,
                   best_epoch=run.best_epoch, epochs=run.epoch, steps=run.step, elapsed_s=round(run.elapsed, 1),
                   checkpoint=str(ckpt))
    (Path(args.out) / 'summary.json').write_text(json.dumps(summary, indent=2))
    print(f'done: {run.epoch}/{args.epochs} epochs, {run.step} steps, {run.elapsed:.0f} s; best validation Dice '
          f"{'none: last.pth is the result' if run.best_metric is None else f'{run.best_metric:.4f}'}\n"
          f'next: python evaluate.py --ckpt {ckpt}', flush=True)
    return summary

# -----------------------------------------------------------------------------
# CLI


def build_parser():
    p = argparse.ArgumentParser(description="Train DANIE (Sec. 4.2); unset flags take the dataset's recipe")
    a = p.add_argument
    a('--data', choices=data.DATASETS, help='dataset (Sec. 4.1); demo: synthetic; folder, nnunet: your own')
    a('--root', help='dataset folder (default: data/<name>)')
    a('--num-classes', type=number(int, 2), help='--data folder without classes.txt: classes with background')
    a('--img-size', type=number(int, 32), help="a multiple of 32 (default 224, the ImageNet MaxViT's)")
    a('--val-cases', type=number(float, 0), help='training cases held out to pick best.pth: a count or fraction; 0: '
                                                 'none, keep last.pth (default: official split, else 10%%)')
    a('--label-map', default='transunet', choices=data.LABEL_MAPS, help="Synapse's ids: TransUNet's or CASCADE's")
    a('--select-on-test', action='store_true', help="PICK best.pth ON THE TEST SPLIT (the peers' protocol only)")
    a('--workers', type=number(int, 0), help='loader processes (default: 8 on CUDA, 0 on CPU)')
    a('--size', choices=('S', 'L'), help='DANIE-S (MaxViT-T) or DANIE-L (MaxViT-S), Sec. 4.2 (default S)')
    a('--no-pretrained', dest='pretrained', action='store_false', default=None,
      help="from scratch (default: ImageNet weights, Sec. 4.2; the demo's: from scratch)")
    a('--pretrained-file', help='the ImageNet MaxViT weights in a local file (offline machines)')
    for flag, row in (('hap', 'A.1'), ('sap', 'A.2'), ('spatial-att', 'A.3'), ('channel-att', 'A.4')):
        a(f'--no-{flag}', action='store_true', help=f'Table 5 {row} (with --fusion add)')
    a('--order', choices=danie.ORDERS, default='channel_first', help="Table 6: the order of HAP's attentions")
    a('--no-calibration', action='store_true', help='Table 6: a plain average instead of Eq. 4')
    a('--fusion', choices=danie.FUSIONS, default='jp', help='Table 7; jp = Joint Preservation, Eq. 6-11')
    a('--epochs', type=number(int, 1), help='default (Sec. 4.2): Synapse 300, ACDC 400, ISIC 200, GlaS 100')
    a('--batch-size', type=number(int, 1), help='global; default (Sec. 4.2): 24, 12, 8, 8 (GlaS: ours)')
    a('--lr', type=number(float, 0, True), help='AdamW learning rate (default 1e-4, Sec. 4.2)')
    a('--weight-decay', type=number(float, 0), default=1e-4, help='AdamW weight decay (default 1e-4, Sec. 4.2)')
    # NOTE(impl): 'deep' by default, Eq. 13 on p1..p4 (CASCADE's trainer, whose 0.7/0.3, AdamW 1e-4 and constant
    # lr the paper repeats) and on y: the paper does not say where Eq. 13 applies.
    a('--supervision', choices=SUPERVISION, default='deep', help='Eq. 13 on y; on p1..p4 and y; on each subset')
    a('--max-steps', type=number(int, 1), help='stop after this many optimiser steps in all (smoke runs)')
    a('--amp', choices=tuple(danie.AMP_DTYPES), help='autocast: bf16, fp16 (CUDA) or none (default, fp32)')
    a('--compile', action='store_true', help='regional torch.compile of the repeated blocks')
    a('--seed', type=int, default=0, help='of the initialisation, shuffle, augmentation, validation split')
    a('--out', help='output folder (default: runs/<data>-<size>)')
    a('--resume', metavar='PATH', help="continue the run in PATH (a last.pth), with that run's flags")
    a('--val-every', type=number(int, 1), default=1, help='validate every N epochs, and after the last step')
    return p


def parse(argv):
    """The arguments, and the checkpoint a run continues from (--resume PATH) or that --out already holds."""
    parser = build_parser()
    args = parser.parse_args(argv)
    path = Path(args.resume or Path(args.out or f"runs/{args.data}-{args.size or 'S'}") / 'last.pth')
    if args.resume and not path.is_file():
        parser.error(f'--resume: no checkpoint at {path}')
    ckpt = danie.load_checkpoint(path, resume=True) if (args.resume or args.data) and path.is_file() else None
    if ckpt is not None:  # a flag given is a flag used: the checkpoint's stand in for the defaults only
        saved = {k: v for k, v in ckpt['args'].items() if k not in PER_CALL}
        args = parser.parse_args(argv, namespace=argparse.Namespace(**dict(saved, out=str(path.parent))))
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint: {saved.get(k)})" for k in SAME_RUN
                   if getattr(args, k) != saved.get(k)]
        if changed:
            what = '--resume continues the same run' if args.resume else f'{args.out} holds another run'
            parser.error(f'{what}, but {", ".join(changed)}; start a new --out instead')
    if args.data is None:
        parser.error('--data is required (or --resume PATH)')
    fill_defaults(parser, args)
    if ckpt is not None and not args.resume and not Run(ckpt['epoch'], ckpt['step']).done(args):
        parser.error(f"{args.out} already holds a run, stopped at epoch {ckpt['epoch']}/{args.epochs} (step "
                     f"{ckpt['step']}): continue it with --resume {path}, or choose another --out")
    return args, ckpt


def fill_defaults(parser, args):
    """The dataset's Sec. 4.2 recipe for the flags left unset, then the checks argparse's types cannot make."""
    spec = data.get_spec(args.data, args.root, args.num_classes)
    args.root, args.size, args.amp = args.root or data.default_root(args.data), args.size or 'S', args.amp or 'none'
    args.epochs, args.batch_size = args.epochs or spec.epochs, args.batch_size or spec.batch_size
    args.img_size, args.lr = args.img_size or spec.img_size, args.lr or spec.lr
    args.workers = (8 if torch.cuda.is_available() else 0) if args.workers is None else args.workers
    args.out = args.out or os.path.join('runs', f'{args.data}-{args.size}')
    # NOTE(impl): the demo trains from scratch (no download for a CPU demo); the rest from ImageNet (Sec. 4.2).
    args.pretrained = args.pretrained if args.pretrained is not None else args.data != 'demo' or bool(
        args.pretrained_file)
    world = int(os.environ.get('WORLD_SIZE', 1))
    if args.batch_size % world:
        parser.error(f'--batch-size {args.batch_size} is the global batch: it must divide among {world} processes')
    if args.amp == 'fp16' and not torch.cuda.is_available() or args.pretrained_file and not args.pretrained:
        parser.error('--amp fp16 needs CUDA' if args.amp == 'fp16' else '--pretrained-file and --no-pretrained '
                     'contradict each other')
    try:  # the model's own checks: img_size a multiple of 32, ablation switches that go together
        danie.make_config(args.size, img_size=args.img_size, **switches(args))
    except ValueError as e:
        parser.error(str(e))


def main(argv=None):
    args, world = None, 1
    try:
        args, ckpt = parse(argv)
        if ckpt is not None and not args.resume:  # the same command again: the run is there, nothing is redone
            best = Path(args.out) / ('best.pth' if (Path(args.out) / 'best.pth').exists() else 'last.pth')
            print(f"{args.out} already holds this run, finished at epoch {ckpt['epoch']}/{args.epochs}: nothing to do "
                  f"(step {ckpt['step']}).\nnext: python evaluate.py --ckpt {best}")
            return None
        rank, world, device = setup_distributed()
        return train(args, ckpt, rank, world, device)
    except (data.DataError, danie.CheckpointError, danie.PretrainedError, TrainError) as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(1 if isinstance(e, TrainError) else 2)
    except KeyboardInterrupt:
        last = args and Path(args.out) / 'last.pth'
        print(f'\ninterrupted; continue with: python train.py --resume {last}' if last and last.exists() else
              '\ninterrupted before the first checkpoint: run the command again', file=sys.stderr)
        raise SystemExit(130)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
