"""
Training of DANIE with the recipe of Sec. 4.2 (Li et al., "Dual Attention Encoder with Joint Preservation
for Medical Image Segmentation"): AdamW with learning rate and weight decay 1e-4, the loss of Eq. 13
(0.7 Dice + 0.3 cross-entropy), the per-dataset epochs and batch sizes of Sec. 4.2, all defaults taken from
data.SPECS. Model selection on held-out training cases with evaluate.py's own protocol (DESIGN.md 3).

    python train.py --data demo                       # synthetic set (made if missing), minutes on a CPU
    python train.py --data synapse --size L           # the Sec. 4.2 recipe on one GPU
    python train.py --resume runs/synapse-L/last.pth   # continue an interrupted run where it stopped
    torchrun --nproc_per_node 4 train.py --data synapse --size L   # DistributedDataParallel
    python train.py --bench                           # training-step images/s (and peak GPU memory)

Writes into --out: last.pth (every epoch), best.pth (best validation mean Dice), log.csv (one row per
epoch), summary.json. `python evaluate.py --ckpt OUT/best.pth` needs no other flag.
"""

import argparse
import csv
import dataclasses
import datetime
import itertools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Sampler
from tqdm import tqdm

import data
import evaluate
import model as danie_model

LAMBDA_DICE = 0.7  # Eq. 13: lambda_1; lambda_2 = 1 - lambda_1 = 0.3 weighs the cross-entropy
SUPERVISION = ('final', 'deep', 'mutation')
AMP_DTYPES = evaluate.AMP_DTYPES
RTX3090_CONTEXT_GIB = 0.5  # the paper's 24 GiB card (Sec. 4.2) less about what the CUDA context takes
# flags that define the run: on --resume they must match the checkpoint (a different value is a new run)
SAME_RUN = ('data', 'size', 'img_size', 'val_cases', 'label_map', 'select_on_test', 'seed', 'no_hap', 'no_sap',
            'no_spatial_att', 'no_channel_att', 'order', 'no_calibration', 'fusion', 'supervision',
            'batch_size', 'lr', 'weight_decay')

# -----------------------------------------------------------------------------
# loss (Eq. 13)


def dice_loss(logits, target, num_classes=None, smooth=1e-5):
    """Multi-class soft Dice loss on softmax probabilities: 1 - Dice per class, averaged over the classes."""
    # NOTE(impl): TransUNet/CASCADE's DiceLoss, where the 0.7/0.3 weights come from: every class including background, one Dice per class over the whole batch, squared terms in the denominator, smooth 1e-5.
    k = num_classes or logits.shape[1]
    prob = logits.float().softmax(dim=1)  # (B,K,H,W)
    onehot = F.one_hot(target, k).permute(0, 3, 1, 2).to(prob.dtype)  # (B,H,W,K) -> (B,K,H,W)
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)  # (K,)
    denom = (prob * prob).sum(dims) + onehot.sum(dims)  # onehot * onehot == onehot
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def seg_loss(logits, target, num_classes=None):
    """Eq. 13: lambda_1 Dice + (1 - lambda_1) CE, in float32 whatever the autocast dtype."""
    ce = F.cross_entropy(logits.float(), target)
    return LAMBDA_DICE * dice_loss(logits, target, num_classes) + (1 - LAMBDA_DICE) * ce


def criterion(y, heads, target, mode='deep', num_classes=None):
    """Eq. 13 on DANIE's outputs (y, [p1..p4]) under a supervision mode of DESIGN.md section 4."""
    if mode == 'final':  # Eq. 13 on y = sum_i alpha_i p_i (Eq. 12) only
        return seg_loss(y, target, num_classes)
    if mode == 'deep':  # CASCADE: Eq. 13 on every head, here plus y
        return sum(seg_loss(p, target, num_classes) for p in (*heads, y))
    if mode == 'mutation':  # MERIT: Eq. 13 on the summed logits of each non-empty subset of heads (15 for 4)
        subsets = itertools.chain.from_iterable(itertools.combinations(heads, r) for r in range(1, len(heads) + 1))
        return sum(seg_loss(sum(s), target, num_classes) for s in subsets)
    raise ValueError(f'supervision must be one of {SUPERVISION}, got {mode!r}')


# -----------------------------------------------------------------------------
# helpers


class TrainError(Exception):
    """A run that cannot go on (a non-finite loss); the last good checkpoint stays on disk."""


def build_model(args, num_classes, pretrained):
    """DANIE-S/L with the ablation switches of Tables 5-7 (tests replace this with a tiny model)."""
    file = args.pretrained_file if pretrained else None
    return danie_model.danie(args.size, num_classes=num_classes, img_size=args.img_size,
                             pretrained=pretrained and args.pretrained, pretrained_file=file, **switches(args))


def switches(args):
    return dict(hap=not args.no_hap, sap=not args.no_sap, spatial_att=not args.no_spatial_att,
                channel_att=not args.no_channel_att, order=args.order, calibration=not args.no_calibration,
                fusion=args.fusion)


def make_optimizer(model, args, device):
    """AdamW of Sec. 4.2; the fused kernel where torch has one (on a CPU it takes a third of the for-loop's time)."""
    # NOTE(impl): AdamW's default betas (0.9, 0.999) and eps 1e-8, and weight decay on every parameter (norms and biases too): Sec. 4.2 gives only lr and decay.
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                             fused=device.type in ('cuda', 'cpu'))


def rng_state(device):
    """Python, numpy, torch (and this GPU's) RNG states, as plain types and tensors (weights_only loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {'python': random.getstate(), 'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   gauss),
            'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None}


def set_rng_state(state, device):
    random.setstate((state['python'][0], tuple(state['python'][1]), state['python'][2]))
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if device.type == 'cuda' and state.get('cuda') is not None:
        torch.cuda.set_rng_state(state['cuda'], device)


def save_atomic(obj, path):
    """torch.save to path.tmp, then rename: an interrupted write never leaves a truncated checkpoint."""
    tmp = f'{path}.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


class EpochSampler(Sampler):
    """This rank's share of a shuffle fixed by (seed, epoch), from sample `skip` on, as (epoch, index) keys."""

    def __init__(self, dataset, seed, rank, world):
        # drop_last: every rank gets the same number of samples, so DDP's all-reduces pair up
        self.order = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                        drop_last=True)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip
        self.order.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in itertools.islice(iter(self.order), self.skip, None))

    def __len__(self):
        return len(self.order) - self.skip


class SeededSamples(Dataset):
    """Draws each sample under RNGs seeded from (seed, epoch, index), so augmentation is the same whatever
    --workers and wherever a run was resumed; the caller's RNG states are restored afterwards."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        s = np.random.SeedSequence([self.seed, epoch, index]).generate_state(2)  # two uint32
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(int(s[0]))
        np.random.seed(s[0])
        torch.default_generator.manual_seed(int(s[0]) << 32 | int(s[1]))  # the CPU generator only, not CUDA's
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def setup_distributed():
    """(rank, world size, device); under torchrun (RANK and WORLD_SIZE set) also the process group."""
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return 0, 1, evaluate.autodetect_device()
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    # NOTE(impl): validation runs on rank 0 while the others wait at a barrier: a generous timeout keeps a long validation from killing the job.
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', timeout=datetime.timedelta(hours=2))
    return rank, world, device


def barrier(world):
    if world > 1:
        dist.barrier()


def mean_over_ranks(x, world):
    """The loss averaged over ranks (a float), so that every rank sees the same value and stops together."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)  # SUM: gloo has no AVG
        x /= world
    return x.item()


def validate(model, cases, spec, img_size, device, amp):
    """Mean Dice of the model on whole cases with evaluate.py's protocol (volume-wise for Synapse/ACDC)."""
    result = evaluate.evaluate(model, cases, spec, img_size, device=device, amp=amp, progress=False)  # eval mode inside
    return float(result['mean_dice'])


def append_csv(path, row):
    new = not path.exists()
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _count(text):
    """--val-cases: a number of cases (int) or a fraction of them (float < 1)."""
    value = float(text)
    if value < 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f'expected a number of cases or a fraction below 1, got {text!r}')
    return value if value < 1 else int(value)


def build_parser():
    p = argparse.ArgumentParser(description='Train DANIE (paper Sec. 4.2). Defaults left unset come from the '
                                            'dataset spec in data.SPECS.')
    # data
    p.add_argument('--data', choices=sorted(data.SPECS), help='dataset (Sec. 4.1); demo = synthetic, made if missing')
    p.add_argument('--root', help='dataset folder (default: data.default_root, e.g. data/synapse)')
    p.add_argument('--img-size', type=int, help='input size, a multiple of 32 (default: the dataset spec, 224 as '
                                                'Sec. 4.2; the demo smaller so that it runs on a CPU)')
    p.add_argument('--val-cases', type=_count,
                   help="training cases held out for model selection, a number or a fraction (default: data.py's; "
                        'ACDC and ISIC use their official validation split)')
    p.add_argument('--label-map', default='transunet', choices=data.LABEL_MAPS,
                   help="Synapse label ids: TransUNet's 9-class files (default) or CASCADE's 13-label files (DESIGN.md 3)")
    p.add_argument('--select-on-test', action='store_true',
                   help='CHOOSE best.pth ON THE TEST SPLIT, as CASCADE/MERIT do; only to reproduce their protocol: '
                        'the test score of such a best.pth is optimistic. Trains on all training cases')
    p.add_argument('--workers', type=int, help='DataLoader worker processes (default: 4 on CUDA, 0 on CPU)')
    # model
    p.add_argument('--size', choices=('S', 'L'), help='DANIE-S (MaxViT-T) or DANIE-L (MaxViT-S), Sec. 4.2 '
                                                      '(default S)')
    p.add_argument('--pretrained', action='store_true', help='ImageNet MaxViT weights from timm (Sec. 4.2; online)')
    p.add_argument('--pretrained-file', help='the same weights from a local .pth/.safetensors file (offline; '
                                             'implies --pretrained)')
    p.add_argument('--no-hap', action='store_true', help='Table 5 A.1: without the HAP stream (needs --fusion add)')
    p.add_argument('--no-sap', action='store_true', help='Table 5 A.2: without the SAP stream (needs --fusion add)')
    p.add_argument('--no-spatial-att', action='store_true', help='Table 5: HAP without spatial attention')
    p.add_argument('--no-channel-att', action='store_true', help='Table 5: HAP without channel attention')
    p.add_argument('--order', choices=danie_model.ORDERS, default=danie_model.DANIEConfig.order,
                   help='Table 6: order of the attentions in HAP (default: %(default)s)')
    p.add_argument('--no-calibration', action='store_true', help='Table 6: plain average instead of Eq. 4')
    p.add_argument('--fusion', choices=danie_model.FUSIONS, default=danie_model.DANIEConfig.fusion,
                   help='Table 7: jp = Joint Preservation, Eq. 6-11 (default: %(default)s)')
    # optimisation
    p.add_argument('--epochs', type=int, help='default per dataset, Sec. 4.2: Synapse 300, ACDC 400, ISIC 200, GlaS 100')
    p.add_argument('--batch-size', type=int, help='global batch, split over the GPUs; default per dataset, Sec. 4.2: '
                                                  'Synapse 24, ACDC 12, ISIC 8, GlaS 8 (not given there)')
    p.add_argument('--lr', type=float, help="AdamW learning rate (default: the dataset spec's lr where it has one, "
                                            'else 1e-4 as Sec. 4.2)')
    p.add_argument('--weight-decay', type=float, default=1e-4, help='AdamW weight decay (default: 1e-4, Sec. 4.2)')
    # NOTE(impl): default 'deep', Eq. 13 summed over p1..p4 (CASCADE's trainer, whose 0.7/0.3, AdamW 1e-4 and constant lr the paper repeats) plus y (DESIGN.md 4); the paper does not say where Eq. 13 applies.
    p.add_argument('--supervision', choices=SUPERVISION, default='deep',
                   help='where Eq. 13 applies: final = y only; deep = p1..p4 and y (CASCADE); '
                        'mutation = every subset of heads (MERIT) (default: %(default)s)')
    p.add_argument('--max-steps', type=int, help='stop after this many optimiser steps in all (smoke runs, benchmarks)')
    # system
    p.add_argument('--amp', choices=tuple(AMP_DTYPES), help='mixed precision: bf16 (Ampere+), fp16 (with loss '
                                                            'scaling), none (default, fp32 as the paper)')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (checkpoints hold the plain one)')
    p.add_argument('--seed', type=int, default=0, help='seed of the initialisation, the shuffle, the augmentation '
                                                       'and the validation split (default: %(default)s)')
    # output
    p.add_argument('--out', help='output folder (default: runs/<data>-<size>)')
    p.add_argument('--resume', nargs='?', const='', metavar='PATH',
                   help='continue a run from PATH (default OUT/last.pth); its flags are reused, given ones override')
    p.add_argument('--val-every', type=int, default=1, help='validate every N epochs, and after the last step (default: %(default)s)')
    p.add_argument('--bench', action='store_true', help='time training steps of DANIE-S and -L instead of training')
    return p


# -----------------------------------------------------------------------------
# benchmark


def bench(args):
    """Training-step images/s of DANIE-S/L on random data; on CUDA also peak memory, fp32 and bf16."""
    device = evaluate.autodetect_device()
    cuda = device.type == 'cuda'
    sizes = [args.size] if args.size else ['S', 'L']
    amps = [args.amp] if args.amp else (['none', 'bf16'] if cuda else ['none'])
    batch, img = args.batch_size or (24 if cuda else 4), args.img_size or 224
    steps, warmup = args.max_steps or (10 if cuda else 3), 2 if cuda else 1
    k = data.SPECS['synapse'].num_classes
    if cuda:
        torch.backends.cudnn.benchmark = True
    print(f'training step on {device} ({torch.get_num_threads()} CPU threads): batch {batch}, {img}x{img}, '
          f'{k} classes, AdamW, --supervision {args.supervision}; {warmup} warm-up + {steps} timed steps')
    rows = []
    for size, amp in itertools.product(sizes, amps):
        torch.manual_seed(args.seed)
        net = danie_model.danie(size, num_classes=k, img_size=img).to(device)
        opt = make_optimizer(net, args, device)
        step = torch.compile(net) if args.compile else net
        x = torch.randn(batch, 3, img, img, device=device)
        t = torch.randint(0, k, (batch, img, img), device=device)
        row = dict(model=f'DANIE-{size}', amp=amp, batch=batch, img_size=img, device=str(device))
        try:
            for i in range(warmup + steps):
                if i == warmup:
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                with evaluate.autocast(device, amp):
                    y, heads = step(x)
                loss = criterion(y, heads, t, args.supervision, k)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            row.update(images_per_s=batch * steps / dt, ms_per_step=1e3 * dt / steps)
            if cuda:  # allocated: tensors; reserved: what the caching allocator holds, closer to what nvidia-smi shows
                row.update(peak_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                           reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
        except torch.cuda.OutOfMemoryError:
            row.update(images_per_s=None, ms_per_step=None, peak_gib='OOM')
        rows.append(row)
        del net, opt, step, x, t
        if cuda:
            torch.cuda.empty_cache()
        if len(rows) == 1:
            print(f"{'model':8} {'amp':5} {'img/s':>8} {'ms/step':>9}" + (
                f" {'peak GiB':>9} {'reserved':>9} {'fits 24 GiB (RTX 3090)':>23}" if cuda else ''))
        r = row
        if r['images_per_s'] is None:
            print(f"{r['model']:8} {r['amp']:5} out of memory", flush=True)
            continue
        print(f"{r['model']:8} {r['amp']:5} {r['images_per_s']:8.2f} {r['ms_per_step']:9.1f}" + (
            f" {r['peak_gib']:9.2f} {r['reserved_gib']:9.2f} {str(r['reserved_gib'] + RTX3090_CONTEXT_GIB < 24):>23}"
            if cuda else ''), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / 'bench.json').write_text(json.dumps(rows, indent=2))
    return rows


# -----------------------------------------------------------------------------
# training


def parse(argv):
    """Parse, take a resumed run's flags from its checkpoint, fill the per-dataset defaults, check."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bench:
        args.lr = 1e-4 if args.lr is None else args.lr  # the rest of bench's defaults are in bench()
        return parser, args, None
    ckpt = None
    if args.resume is not None:
        path = args.resume
        if not path:
            if not (args.out or args.data):
                parser.error('--resume without a PATH needs --out or --data to find last.pth')
            path = os.path.join(args.out or os.path.join('runs', f'{args.data}-{args.size or "S"}'), 'last.pth')
        if not os.path.isfile(path):
            parser.error(f'--resume: no checkpoint at {path}')
        ckpt = evaluate.load_checkpoint(path)
        lacking = [k for k in ('args', 'optimizer', 'scaler', 'rng', 'epoch', 'step') if k not in ckpt]
        if lacking:
            raise evaluate.CheckpointError(f'{path}: cannot resume from it, it has no {lacking} (not written by '
                                           'this train.py)')
        saved = dict(ckpt['args'], out=str(Path(path).parent))  # the folder moves with its checkpoint
        # a flag given is a flag used: the checkpoint's arguments stand in for the defaults only
        args = parser.parse_args(argv, namespace=argparse.Namespace(**saved))
        args.resume = path
        changed = [f'--{k.replace("_", "-")} {getattr(args, k)} (checkpoint: {saved.get(k)})'
                   for k in SAME_RUN if getattr(args, k) != saved.get(k)]
        if changed:
            parser.error(f'--resume continues the same run, but {", ".join(changed)}; start a new --out instead')
    if args.data is None:
        parser.error('--data is required (or --resume PATH, or --bench)')

    spec = data.SPECS[args.data]
    args.root = args.root or data.default_root(args.data)
    args.size = args.size or 'S'
    args.epochs = spec.epochs if args.epochs is None else args.epochs
    args.batch_size = spec.batch_size if args.batch_size is None else args.batch_size
    args.img_size = spec.img_size if args.img_size is None else args.img_size
    args.lr = spec.lr if args.lr is None else args.lr
    args.amp = args.amp or 'none'
    args.workers = (4 if torch.cuda.is_available() else 0) if args.workers is None else args.workers
    args.out = args.out or os.path.join('runs', f'{args.data}-{args.size}')
    args.pretrained = args.pretrained or args.pretrained_file is not None

    world = int(os.environ.get('WORLD_SIZE', 1))
    for name in ('epochs', 'batch_size', 'val_every', 'max_steps'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    if args.lr <= 0 or args.weight_decay < 0:
        parser.error(f'--lr must be > 0 and --weight-decay >= 0, got {args.lr} and {args.weight_decay}')
    if args.workers < 0:
        parser.error(f'--workers must be >= 0, got {args.workers}')
    if args.batch_size % world:
        parser.error(f'--batch-size {args.batch_size} is the global batch and must divide among {world} processes')
    if args.amp == 'fp16' and not torch.cuda.is_available():
        parser.error('--amp fp16 needs CUDA (loss scaling); on a CPU use --amp bf16 or none')
    if args.pretrained_file is not None and not os.path.isfile(args.pretrained_file):
        parser.error(f'--pretrained-file {args.pretrained_file} does not exist')
    try:  # the model's own checks: img_size a multiple of 32, ablation switches that go together
        danie_model.make_config(args.size, num_classes=spec.num_classes, img_size=args.img_size, **switches(args))
    except ValueError as e:
        parser.error(str(e))
    if ckpt is None and os.path.exists(os.path.join(args.out, 'last.pth')):
        parser.error(f'{args.out} already holds a run (last.pth): --resume to continue it, or another --out')
    return parser, args, ckpt


def main(argv=None):
    args, world = None, 1
    try:
        parser, args, ckpt = parse(argv)
        if args.bench:
            return bench(args)
        rank, world, device = setup_distributed()
        return train(parser, args, ckpt, rank, world, device)
    except (data.DataError, evaluate.CheckpointError, danie_model.PretrainedError) as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(2)
    except TrainError as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        if args is not None and not args.bench:
            print(f'\ninterrupted; continue from the last epoch with: python train.py --resume '
                  f'{os.path.join(args.out, "last.pth")}', file=sys.stderr)
        raise SystemExit(130)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train(parser, args, ckpt, rank, world, device):
    master = rank == 0
    spec = data.SPECS[args.data]
    k = spec.num_classes
    out = Path(args.out)
    # NOTE(impl): --batch-size is the global batch, split over the processes, so that N GPUs run the Sec. 4.2 recipe unchanged.
    per_rank = args.batch_size // world
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # same initialisation on every rank (DDP also broadcasts rank 0's)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
        # NOTE(impl): TF32 matmuls and convolutions on Ampere+, as the paper's PyTorch on an RTX 3090 did by default for convolutions.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.select_on_test:
        if master:
            print('WARNING: --select-on-test chooses best.pth by its Dice on the TEST split (the peers\' protocol); '
                  'a test score of that checkpoint is optimistic. Without the flag, selection uses held-out '
                  'training cases.', file=sys.stderr, flush=True)

    # data
    if master:
        out.mkdir(parents=True, exist_ok=True)
        root = Path(args.root)
        if args.data == 'demo' and (not root.exists() or not any(root.iterdir())):
            print(f'making the synthetic demo set in {root}', flush=True)
            data.make_demo(root, seed=0)
    barrier(world)
    # NOTE(impl): with --select-on-test no training case is held out, as in the peers' runs that select on test.
    val_kw = {'val_cases': 0} if args.select_on_test else ({} if args.val_cases is None else
                                                          {'val_cases': args.val_cases})
    common = dict(seed=args.seed, label_map=args.label_map, **val_kw)
    # data.py's default mean/std are timm's maxvit_*_tf normalisation, the same that evaluate.py feeds the model
    train_set = data.train_set(args.data, args.root, args.img_size, **common)
    if len(train_set) // world < per_rank:
        parser.error(f'--batch-size {args.batch_size} is larger than the training set of {args.data} at '
                     f'{args.root} ({len(train_set)} samples over {world} process(es))')
    sampler = EpochSampler(train_set, args.seed, rank, world)
    # NOTE(impl): drop_last, so that every step has a full batch (BatchNorm, and a constant number of steps per epoch).
    loader = data.make_loader(SeededSamples(train_set, args.seed), per_rank, shuffle=False, workers=args.workers,
                              sampler=sampler, drop_last=True)
    val_cases = None
    if master:
        val_cases = data.eval_cases(args.data, args.root, 'test' if args.select_on_test else 'val', **common)
        if len(val_cases) == 0:
            parser.error(f'no validation cases for {args.data} at {args.root}: pass --val-cases N')

    # model, optimiser, state
    # NOTE(impl): a constant learning rate and no gradient clipping: Sec. 4.2 names neither a schedule nor clipping, and CASCADE's AdamW recipe uses none.
    net = build_model(args, k, pretrained=ckpt is None).to(device)
    opt = make_optimizer(net, args, device)
    scaler = torch.amp.GradScaler('cuda', enabled=args.amp == 'fp16')
    state = dict(epoch=0, step=0, epoch_step=0, best_metric=None, best_epoch=None, elapsed=0.0)
    if ckpt is not None:
        net.load_state_dict(ckpt['model'])
        opt.load_state_dict(ckpt['optimizer'])
        if ckpt['scaler']:  # empty when the run so far had no fp16 loss scaling
            scaler.load_state_dict(ckpt['scaler'])
        state.update({key: ckpt[key] for key in state if key in ckpt})
        set_rng_state(ckpt['rng'], device)  # after building the model, whose initialisation drew from it
        if master:
            print(f'resumed {args.resume}: epoch {state["epoch"]}, step {state["step"]}', flush=True)
    raw = net
    if world > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.compile:
        net = torch.compile(net)
    data_info = dict(name=args.data, root=os.path.abspath(args.root), label_map=args.label_map,
                     val_cases=val_kw.get('val_cases'), seed=args.seed,
                     selected_on='test' if args.select_on_test else 'val')

    def checkpoint(rng, metric):
        return {'format': evaluate.FORMAT, 'config': dataclasses.asdict(raw.config), 'model': raw.state_dict(),
                'data': data_info, 'args': vars(args), 'epoch': state['epoch'], 'step': state['step'],
                'epoch_step': state['epoch_step'], 'optimizer': opt.state_dict(), 'scaler': scaler.state_dict(),
                'rng': rng, 'best_metric': state['best_metric'], 'best_epoch': state['best_epoch'],
                'metric': metric, 'elapsed': state['elapsed'], 'world_size': world}

    if master:
        n_params = sum(p.numel() for p in raw.parameters()) / 1e6
        print(f'DANIE-{args.size} ({n_params:.1f} M parameters) on {device} x{world}, {args.data}: '
              f'{len(train_set)} training samples, {len(val_cases)} {data_info["selected_on"]} cases, '
              f'batch {args.batch_size}, {args.img_size}x{args.img_size}, {args.epochs} epochs, '
              f'--supervision {args.supervision}, --amp {args.amp} -> {out}', flush=True)
    done = (args.max_steps is not None and state['step'] >= args.max_steps) or state['epoch'] >= args.epochs
    if done and master:
        print(f'nothing to do: the checkpoint is at epoch {state["epoch"]}/{args.epochs}, step {state["step"]}')
    imgs_per_s = None
    net.train()
    for epoch in range(state['epoch'], args.epochs):
        if done:
            break
        skip = state['epoch_step']  # batches of this epoch done before a resume
        sampler.set_epoch(epoch, skip * per_rank)
        steps_in_epoch = skip + len(loader)
        bar = tqdm(total=steps_in_epoch, initial=skip, desc=f'epoch {epoch + 1}/{args.epochs}', leave=False,
                   dynamic_ncols=True, disable=not master)
        loss_sum, n, t0 = 0.0, 0, time.perf_counter()
        for x, target in loader:
            x, target = x.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with evaluate.autocast(device, args.amp):
                y, heads = net(x)
            loss = criterion(y, heads, target, args.supervision, k)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            state['step'] += 1
            state['epoch_step'] += 1
            value = mean_over_ranks(loss.detach(), world)
            if not math.isfinite(value):
                bar.close()
                raise TrainError(f'loss is {value} at step {state["step"]} (epoch {epoch + 1}); stopped. The last '
                                 f'good checkpoint is {out / "last.pth"}. Try a lower --lr or --amp none/bf16.')
            loss_sum, n = loss_sum + value, n + 1
            imgs_per_s = n * args.batch_size / (time.perf_counter() - t0)
            bar.set_postfix(loss=f'{loss_sum / n:.4f}', img_s=f'{imgs_per_s:.1f}', refresh=False)
            bar.update()
            if args.max_steps is not None and state['step'] >= args.max_steps:
                done = True
                break
        bar.close()
        train_s = time.perf_counter() - t0
        state['elapsed'] += train_s
        if state['epoch_step'] == steps_in_epoch:
            state['epoch'], state['epoch_step'] = epoch + 1, 0
        done = done or state['epoch'] >= args.epochs
        rng = rng_state(device)  # taken before validation: validating or not leaves the run's RNG stream alone
        metric = None
        if master and (done or (state['epoch_step'] == 0 and state['epoch'] % args.val_every == 0)):
            t1 = time.perf_counter()
            metric = validate(raw, val_cases, spec, args.img_size, device, args.amp)
            state['elapsed'] += time.perf_counter() - t1
        if master:
            improved = metric is not None and math.isfinite(metric) and (state['best_metric'] is None or
                                                                         metric > state['best_metric'])
            if improved:
                state['best_metric'], state['best_epoch'] = metric, epoch + 1
            ckpt = checkpoint(rng, metric)
            if improved:
                save_atomic(ckpt, out / 'best.pth')
            save_atomic(ckpt, out / 'last.pth')
            del ckpt
            mean_loss = loss_sum / max(n, 1)
            append_csv(out / 'log.csv', dict(epoch=epoch + 1, step=state['step'], loss=f'{mean_loss:.6f}',
                                             val_dice='' if metric is None else f'{metric:.6f}',
                                             best_dice='' if state['best_metric'] is None else
                                             f'{state["best_metric"]:.6f}',
                                             images_per_s=f'{imgs_per_s or 0:.2f}', train_s=f'{train_s:.1f}',
                                             elapsed_s=f'{state["elapsed"]:.1f}'))
            partial = '' if state['epoch_step'] == 0 else f' (stopped at batch {state["epoch_step"]})'
            val = '' if metric is None else (f' | {data_info["selected_on"]} Dice {metric:.4f} (best '
                                             f'{state["best_metric"]:.4f} @ {state["best_epoch"]})')
            print(f'epoch {epoch + 1:4d}/{args.epochs}{partial} | step {state["step"]:7d} | loss {mean_loss:.4f} | '
                  f'{imgs_per_s or 0:7.1f} img/s{val} | {state["elapsed"]:7.1f} s', flush=True)
        barrier(world)

    if not master:
        return None
    summary = dict(data=args.data, size=args.size, out=str(out), selected_on=data_info['selected_on'],
                   best_val_dice=state['best_metric'], best_epoch=state['best_epoch'], epochs=state['epoch'],
                   steps=state['step'], elapsed_s=round(state['elapsed'], 1), images_per_s=imgs_per_s,
                   best=str(out / 'best.pth'), last=str(out / 'last.pth'))
    (out / 'summary.json').write_text(json.dumps(summary, indent=2))
    best = 'none' if state['best_metric'] is None else f'{state["best_metric"]:.4f} at epoch {state["best_epoch"]}'
    print(f'done: {state["epoch"]}/{args.epochs} epochs, {state["step"]} steps, {state["elapsed"]:.0f} s; best '
          f'{data_info["selected_on"]} mean Dice {best} -> {out / "best.pth"}\n'
          f'next: python evaluate.py --ckpt {out / "best.pth"}', flush=True)
    return summary


if __name__ == '__main__':
    main()
