"""
Training of DANIE with the recipe of Sec. 4.2 (Li et al., "Dual Attention Encoder with Joint Preservation
for Medical Image Segmentation"): ImageNet-initialised MaxViT, AdamW with learning rate and weight decay
1e-4, the loss of Eq. 13 (0.7 Dice + 0.3 cross-entropy), the per-dataset epochs and batch sizes of Sec. 4.2.

Offers:
- dice_loss, seg_loss, criterion: Eq. 13 under the supervision modes 'final', 'deep' and 'mutation'
- train_step: one optimiser step, the very function that --bench times
- train_one_epoch, validate, checkpoint: the loop's parts; train: the loop itself
- bench: img/s, ms/step, peak memory, kernels (CUDA) or operators (CPU) per step, share of the chip
- main: the command line

    python train.py --data demo                        # synthetic set (made if missing), minutes on a CPU
    python train.py --data synapse --size L            # the Sec. 4.2 recipe on one GPU
    python train.py --resume runs/synapse-L/last.pth    # continue an interrupted run where it stopped
    torchrun --nproc_per_node 4 train.py --data synapse --size L   # the same recipe on 4 GPUs
    python train.py --bench                            # training-step speed table

Writes into --out: last.pth (the whole training state, every epoch), best.pth (weights and what evaluate.py
needs, best validation figure), log.csv and progress.png (one row / point per epoch), summary.json.
"""

import argparse
import csv
import datetime
import itertools
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Sampler
from tqdm import tqdm

import data
import evaluate
import model as danie_model

# -----------------------------------------------------------------------------
# constants

LAMBDA_DICE = 0.7  # Eq. 13: lambda_1; lambda_2 = 1 - lambda_1 = 0.3 weighs the cross-entropy
SUPERVISION = ('final', 'deep', 'mutation')
TRAIN_STATE = ('epoch_step', 'best_metric', 'best_epoch', 'elapsed')  # last.pth's 'train', besides the optimiser
LOG_EVERY = 50  # steps between the host reads of the loss (each one waits for the GPU)
# flags that define a run: on --resume they must match the checkpoint (a different value is a new run)
SAME_RUN = ('data', 'num_classes', 'size', 'img_size', 'val_cases', 'label_map', 'select_on_test', 'seed',
            'no_hap', 'no_sap', 'no_spatial_att', 'no_channel_att', 'order', 'no_calibration', 'fusion',
            'supervision', 'batch_size', 'lr', 'weight_decay')
# dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets), for the bench's share of the chip
BF16_PEAK_TFLOPS = {'H100 80GB HBM3': 989.0, 'H100 PCIe': 756.0, 'H100 NVL': 835.0, 'H200': 989.0,
                    'A100': 312.0, 'RTX 3090': 71.0, 'RTX 4090': 165.0, 'L40S': 362.0}

# -----------------------------------------------------------------------------
# helpers


class TrainError(Exception):
    """A run that cannot go on (a non-finite loss); the last good checkpoint stays on disk."""


def number(kind, low, strict):
    """An argparse type: a finite int/float above (strict) or at least `low`, with a one-line error."""
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected {kind.__name__}, got {text!r}') from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>' if strict else '>='} {low}, got {text!r}")
        return value
    return check


def pretrained_file(args):
    """The local ImageNet MaxViT file that initialises the SAP stream (Sec. 4.2), downloading it when online."""
    if args.pretrained_file:
        return args.pretrained_file
    backbone = danie_model.PRESETS[args.size]['backbone']
    cfg = danie_model.timm.models.get_pretrained_cfg(backbone)
    from huggingface_hub import hf_hub_download  # timm's own dependency, which it downloads with
    try:
        return hf_hub_download(cfg.hf_hub_id, 'model.safetensors')
    except Exception as e:
        raise danie_model.PretrainedError(
            f'cannot fetch the ImageNet weights of {backbone} that Sec. 4.2 starts from ({type(e).__name__}; '
            'offline?): pass --pretrained-file PATH (a local timm .safetensors/.pth file of it) or '
            '--no-pretrained to train from scratch') from None


def build_model(args, num_classes, pretrained):
    """DANIE-S/L with the ablation switches of Tables 5-7; pretrained: load the backbone's ImageNet weights."""
    file = pretrained_file(args) if pretrained and args.pretrained else None
    return danie_model.danie(args.size, num_classes=num_classes, img_size=args.img_size, pretrained_file=file,
                             **switches(args))


def init_name(args):
    """How the backbone starts, as the first line of the run and the checkpoint say it."""
    if not args.pretrained:
        return 'from scratch (--no-pretrained)'
    return f'ImageNet {danie_model.PRESETS[args.size]["backbone"]} (Sec. 4.2) from ' + (
        args.pretrained_file or "timm's hub")


def switches(args):
    return dict(hap=not args.no_hap, sap=not args.no_sap, spatial_att=not args.no_spatial_att,
                channel_att=not args.no_channel_att, order=args.order, calibration=not args.no_calibration,
                fusion=args.fusion)


def make_optimizer(model, args, device):
    """AdamW of Sec. 4.2, as one fused kernel over all parameters where torch has one."""
    # NOTE(impl): AdamW's default betas (0.9, 0.999) and eps 1e-8, and weight decay on every parameter (norms and biases too): Sec. 4.2 gives only lr and decay.
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                             fused=device.type in ('cuda', 'cpu'))


def compile_blocks(net, **compile_kw):
    """Regional compilation: each repeated block compiled in place, so torch.compile reuses one graph per block kind."""
    kinds = (danie_model.HAP, danie_model.JointPreservation, danie_model.timm.models.maxxvit.MaxxVitBlock)
    blocks = [m for m in net.modules() if isinstance(m, kinds)]
    # each block kind sees 4 stages x first/other block x train/inference mode: more graphs than dynamo's default 8
    cfg = torch._dynamo.config
    limit = 'recompile_limit' if hasattr(cfg, 'recompile_limit') else 'cache_size_limit'  # torch < 2.6
    setattr(cfg, limit, max(getattr(cfg, limit), 64))
    for m in blocks:
        m.compile(**compile_kw)
    return len(blocks)


class EpochSampler(Sampler):
    """This rank's share of a shuffle fixed by (seed, epoch), from sample `skip` on, as (epoch, index) keys."""

    def __init__(self, dataset, seed, rank, world):
        # drop_last: every rank gets as many samples; rank r takes every world-th index, so the union of the
        # ranks' k-th batches is the same global batch for any number of GPUs
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


class CheckpointWriter:
    """Writes checkpoints in a background thread, atomically (path.tmp, then rename), one at a time."""

    def __init__(self):
        self.thread, self.error = None, None

    def save(self, files):
        """files: {path: checkpoint}, written in order; tensors they share (best's and last's weights) copied once."""
        self.wait()
        memo = {}
        files = {Path(p): _to_host(obj, memo) for p, obj in files.items()}  # copies: training changes the live tensors
        self.thread = threading.Thread(target=self._write, args=(files,))
        self.thread.start()

    def _write(self, files):
        try:
            for path, obj in files.items():
                tmp = path.with_name(path.name + '.tmp')
                torch.save(obj, tmp)
                os.replace(tmp, path)
        except Exception as e:  # re-raised in the training thread by wait()
            self.error = e

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _to_host(obj, memo):
    """A host copy of a checkpoint's nested dicts/lists of tensors; memo holds the copies by the memory they view
    (each state_dict() call returns new tensor objects over the same parameters)."""
    if torch.is_tensor(obj):
        key = (obj.device, obj.data_ptr(), obj.dtype, tuple(obj.shape), obj.stride())
        if key not in memo:
            memo[key] = obj.detach().to('cpu', copy=True)
        return memo[key]
    if isinstance(obj, dict):
        return {k: _to_host(v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v, memo) for v in obj)
    return obj


def setup_distributed():
    """(rank, world size, device); under torchrun (RANK and WORLD_SIZE set) also the process group."""
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return 0, 1, evaluate.autodetect_device()
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    device = torch.device('cpu')
    if torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    # NOTE(impl): validation runs on rank 0 while the others wait at a barrier: a generous timeout keeps a long validation from killing the job.
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', timeout=datetime.timedelta(hours=2))
    return rank, world, device


def on_all_ranks(world, fn, *a):
    """fn(*a) on every rank; if it fails on any rank, every rank raises that error (no rank waits forever)."""
    result, error = None, None
    try:
        result = fn(*a)
    except Exception as e:  # re-raised below, on this rank as it is
        error = e
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, None if error is None else (type(error).__name__, str(error)))
        first = next((e for e in errors if e is not None), None)
        if error is None and first is not None:
            error = data.DataError(f'{first[1]} (on another rank)')
    if error is not None:
        raise error
    return result


class GlobalSum(torch.autograd.Function):
    """Sum over the ranks whose backward sums the gradients too: with DDP's 1/world average, the gradient of a
    loss computed from global-batch sums (Eq. 13's Dice) is exactly that of one process on the whole batch."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def global_sum(world):
    """The reduce of dice_loss: None on one process, GlobalSum under DDP."""
    return None if world == 1 else GlobalSum.apply


def read_log(path):
    if not path.exists():
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def write_log(path, rows):
    """log.csv (one row per epoch) and progress.png beside it (loss and validation Dice against epoch)."""
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib
        matplotlib.use('Agg')  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:  # requirements.txt has it; a bare GPU image may not: the run goes on without the plot
        return
    epochs = [int(r['epoch']) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [float(r['loss']) for r in rows], color='tab:blue', label='training loss (Eq. 13)')
    ax.set_xlabel('epoch')
    ax.set_ylabel('training loss', color='tab:blue')
    val = [(e, float(r['val_dice'])) for e, r in zip(epochs, rows) if r['val_dice']]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), 'o-', color='tab:orange', label='validation mean Dice')
        ax2.set_ylabel('validation mean Dice', color='tab:orange')
    fig.tight_layout()
    fig.savefig(path.with_name('progress.png'), dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# steps: the loss of Eq. 13


def dice_loss(logits, target, num_classes=None, smooth=1e-5, reduce=None):
    """Soft Dice loss of logits (B,K,H,W), or of M stacked outputs (M,B,K,H,W) -> (M,), against target (B,H,W)."""
    # NOTE(impl): TransUNet/CASCADE's DiceLoss, where the 0.7/0.3 weights come from: every class including background, one Dice per class over the whole batch, squared terms in the denominator, smooth 1e-5.
    B, K, H, W = logits.shape[-4:]
    prob = logits.float().view(-1, B, K, H, W).softmax(dim=2)  # (M,B,K,H,W)
    classes = torch.arange(num_classes or K, device=target.device).view(-1, 1, 1)
    onehot = (target.unsqueeze(1) == classes).to(prob.dtype)  # (B,K,H,W); unlike F.one_hot, no host sync
    inter, p2 = torch.stack([prob * onehot, prob * prob]).sum((2, 4, 5))  # (2,M,B,K,H,W) -> (2,M,K)
    g = onehot.sum((0, 2, 3))  # (K,); onehot * onehot == onehot
    if reduce is not None:  # DDP: the batch Dice of Eq. 13 over the global batch, not each GPU's share
        inter, p2, g = reduce(torch.cat([inter, p2, g[None]])).split([len(inter), len(p2), 1])
    return (1 - (2 * inter + smooth) / (p2 + g + smooth)).mean(dim=-1).view(logits.shape[:-4])  # (M,) -> lead


def seg_loss(logits, target, num_classes=None, reduce=None):
    """Eq. 13, lambda_1 Dice + (1 - lambda_1) CE in float32, of logits (B,K,H,W) or summed over (M,B,K,H,W)."""
    B, K, H, W = logits.shape[-4:]
    M = logits.numel() // (B * K * H * W)  # 1 for a single output
    ce = F.cross_entropy(logits.float().view(M * B, K, H, W), target.repeat(M, 1, 1))  # the mean of M means
    return LAMBDA_DICE * dice_loss(logits, target, num_classes, reduce=reduce).sum() + (1 - LAMBDA_DICE) * M * ce


def criterion(y, heads, target, mode='deep', num_classes=None, reduce=None):
    """Eq. 13 on DANIE's outputs (y, [p1..p4]) under a supervision mode; reduce sums the Dice terms over GPUs."""
    k = num_classes or y.shape[1]
    if mode == 'final':  # Eq. 13 on y = sum_i alpha_i p_i (Eq. 12) only
        outputs = y
    elif mode == 'deep':  # CASCADE: Eq. 13 on every head, here plus y
        outputs = torch.stack([*heads, y])  # (5,B,K,H,W)
    elif mode == 'mutation':  # MERIT: Eq. 13 on the summed logits of each non-empty subset of heads (15 for 4)
        bit = torch.arange(len(heads), device=y.device)
        subsets = torch.arange(1, 2 ** len(heads), device=y.device)  # bit m of s: head m is in subset s
        member = (subsets[:, None] >> bit) & 1  # (15,1) >> (4,) -> (15,4)
        outputs = torch.einsum('sm,mbkhw->sbkhw', member.to(y.dtype), torch.stack(heads))  # (15,4)@(4,...)
    else:
        raise ValueError(f'supervision must be one of {SUPERVISION}, got {mode!r}')
    return seg_loss(outputs, target, k, reduce)


# -----------------------------------------------------------------------------
# steps: one optimiser step, one epoch, validation


def train_step(net, opt, scaler, x, target, args, num_classes, reduce=None):
    """Forward, Eq. 13, backward, AdamW step; returns the loss as a device tensor (no host sync)."""
    with evaluate.autocast(x.device, args.amp):
        y, heads = net(x)
    loss = criterion(y, heads, target, args.supervision, num_classes, reduce)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def train_one_epoch(net, opt, scaler, loader, args, k, run, world, device, master):
    """One pass over the loader (from a resume's position on); returns (mean loss, steps)."""
    reduce = global_sum(world)
    loss_sum, first_bad, bad_loss = (torch.zeros((), device=device), torch.full((), -1.0, device=device),
                                     torch.zeros((), device=device))
    bar = tqdm(total=run.epoch_step + len(loader), initial=run.epoch_step, desc=f'epoch {run.epoch + 1}/{args.epochs}',
               leave=False, dynamic_ncols=True, disable=not master)
    n = 0
    for x, target in loader:
        x = x.to(device, non_blocking=True, memory_format=danie_model.MEMORY_FORMAT)
        target = target.to(device, non_blocking=True)
        loss = train_step(net, opt, scaler, x, target, args, k, reduce)  # batch, Eq. 13, step
        n += 1
        # the NaN guard without a host sync per step: the first bad step is kept on the device
        new_bad = (first_bad < 0) & ~torch.isfinite(loss)
        first_bad, bad_loss = torch.where(new_bad, run.step + n, first_bad), torch.where(new_bad, loss, bad_loss)
        loss_sum += loss
        bar.update()
        if master and n % LOG_EVERY == 0:
            bar.set_postfix(loss=f'{loss_sum.item() / n:.4f}', refresh=False)
        if args.max_steps is not None and run.step + n >= args.max_steps:
            break
    bar.close()
    # the last step's loss predates its update: the weights themselves must be finite too before any checkpoint
    weights_ok = torch.stack(torch._foreach_norm(list(net.parameters()))).isfinite().all()
    stats = torch.stack([loss_sum / world, first_bad, bad_loss, (~weights_ok).float()])
    if world > 1:  # every rank sees the same loss and the same verdict, so all stop together
        dist.all_reduce(stats[:1])
        dist.all_reduce(stats[1:2], op=dist.ReduceOp.MAX)
    loss, bad, bad_loss, bad_weights = stats.tolist()  # the epoch's one host sync
    if bad < 0 and bad_weights:
        bad, bad_loss = run.step + n, float('nan')  # the last step's update made the weights non-finite
    if bad >= 0:
        last = Path(args.out) / 'last.pth'
        kept = f'the last good checkpoint is {last}' if last.exists() else 'no checkpoint was written'
        raise TrainError(f'loss is {bad_loss} at step {int(bad)} (epoch {run.epoch + 1}); stopped, {kept}. '
                         'Try a lower --lr, or --amp none/bf16.')
    return loss / max(n, 1), n


def validate(model, val_cases, spec, args, device):
    """Mean Dice with evaluate.py's protocol (volume-wise for volumes; ISIC: Table 3's pooled Dice at 256x256)."""
    summary = evaluate.evaluate(model, val_cases, spec, args.img_size, device=device, amp=args.amp,
                                progress=False, distances=False, workers=min(args.workers, 4))
    return float(summary['mean_dice'])


# -----------------------------------------------------------------------------
# top level: the benchmark, the real train_step timed


def count_ops(fn):
    """Operators that one call of fn dispatches (every aten op of forward, loss and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def count_kernels(fn):
    """CUDA kernels that one call of fn launches, from the profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == 'CUDA')


def bench_row(size, amp, batch, graph, args, device, flops):
    """One bench configuration: a fresh DANIE, timed with train_step on random data; flops: {(size, batch): FLOP}."""
    cuda = device.type == 'cuda'
    torch.manual_seed(args.seed)
    k = data.SPECS['synapse'].num_classes
    net = danie_model.danie(size, num_classes=k, img_size=args.img_size)
    net = net.to(device, memory_format=danie_model.MEMORY_FORMAT)
    opt = make_optimizer(net, args, device)
    scaler = torch.amp.GradScaler('cuda', enabled=amp == 'fp16')
    run_args = argparse.Namespace(**{**vars(args), 'amp': amp})
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    x = x.contiguous(memory_format=danie_model.MEMORY_FORMAT)
    t = torch.randint(0, k, (batch, args.img_size, args.img_size), device=device)
    t0 = time.perf_counter()
    if graph:
        torch._dynamo.reset()  # compile from scratch, so ready_s includes this row's compilation
        compile_blocks(net)
    step = lambda: train_step(net, opt, scaler, x, t, run_args, k)  # noqa: E731
    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    ready = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()
    dt = (time.perf_counter() - t0) / args.steps
    row = dict(model=f'DANIE-{size}', amp=amp, batch=batch, mode='graph' if graph else 'eager',
               images_per_s=batch / dt, ms_per_step=1e3 * dt, ready_s=ready,
               peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None)
    if not graph:  # counted on the eager step: dispatch modes and compiled regions do not mix
        row['kernels' if cuda else 'operators'] = count_kernels(step) if cuda else count_ops(step)
        if (size, batch) not in flops:
            flops[size, batch] = danie_model.flops(step) if cuda else None
    peak = next((v for name, v in BF16_PEAK_TFLOPS.items() if cuda and name in torch.cuda.get_device_name(device)),
                None)
    row['bf16_peak_share'] = flops[size, batch] / dt / 1e12 / peak if peak and flops.get((size, batch)) else None
    return row


def bench(args):
    """The training-step table of issue 9: S and L, fp32 and bf16, eager and graph mode, batches 24 and 8."""
    device = evaluate.autodetect_device()
    cuda = device.type == 'cuda'
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args.img_size = args.img_size or 224
    sizes = [args.size] if args.size else (['S', 'L'] if cuda else ['S'])
    amps = [args.amp] if args.amp else (['none', 'bf16'] if cuda else ['none'])
    batches = [args.batch_size] if args.batch_size else ([24, 8] if cuda else [2])
    graphs = [False, True] if cuda else [args.compile]  # compiling on a CPU takes many minutes
    name = torch.cuda.get_device_name(device) if cuda else f'CPU, {torch.get_num_threads()} threads'
    print(f'train_step on {name}: {args.img_size}x{args.img_size}, 9 classes, AdamW, --supervision '
          f'{args.supervision}; {args.warmup} warm-up + {args.steps} timed steps; share = FLOP/s / dense bf16 peak')
    print(f"{'model':8} {'amp':5} {'batch':>5} {'mode':6} {'img/s':>8} {'ms/step':>8} {'ready s':>7} "
          f"{'peak GiB':>8} {'kernels' if cuda else 'ops':>8} {'share':>6}")
    rows, flops = [], {}
    for size, amp, batch, graph in itertools.product(sizes, amps, batches, graphs):
        try:
            r = bench_row(size, amp, batch, graph, args, device, flops)
        except torch.cuda.OutOfMemoryError:
            print(f'DANIE-{size} {amp:5} {batch:5} out of memory', flush=True)
            continue
        rows.append(r)
        gib = '-' if r['peak_gib'] is None else f"{r['peak_gib']:.2f}"
        share = '-' if r['bf16_peak_share'] is None else f"{100 * r['bf16_peak_share']:.1f}%"
        print(f"{r['model']:8} {amp:5} {batch:5} {r['mode']:6} {r['images_per_s']:8.1f} {r['ms_per_step']:8.1f} "
              f"{r['ready_s']:7.1f} {gib:>8} {r.get('kernels', r.get('operators', '-')):>8} {share:>6}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    if not cuda:  # what DANIE adds to its backbone's operators (issue 9's CPU measure)
        rows.append(bench_added_ops(args, batches[0]))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / 'bench.json').write_text(json.dumps(rows, indent=2))
    return rows


def bench_added_ops(args, batch):
    """Operators of forward + loss + backward: DANIE-S, its bare MaxViT-T backbone, and what DANIE adds."""
    k = data.SPECS['synapse'].num_classes
    net = danie_model.danie('S', num_classes=k, img_size=args.img_size).to(memory_format=danie_model.MEMORY_FORMAT)
    x = torch.randn(batch, 3, args.img_size, args.img_size).to(memory_format=danie_model.MEMORY_FORMAT)
    t = torch.randint(0, k, (batch, args.img_size, args.img_size))

    def danie_step():
        net.zero_grad(set_to_none=True)  # as train_step: gradients are new tensors, not accumulated
        criterion(*net(x), t, args.supervision, k).backward()

    def backbone_step():
        net.zero_grad(set_to_none=True)
        sum(f.float().mean() for f in net.sap(x)).backward()
    n = {name: count_ops(fn) for name, fn in (('danie', danie_step), ('backbone', backbone_step))}
    print(f"forward + loss + backward, batch {batch}: DANIE-S {n['danie']} operators, its bare MaxViT-T backbone "
          f"{n['backbone']}, added by DANIE {n['danie'] - n['backbone']}")
    return dict(model='DANIE-S beyond MaxViT-T', batch=batch, operators=n['danie'], backbone=n['backbone'],
                added=n['danie'] - n['backbone'])


# -----------------------------------------------------------------------------
# top level: the training run


@dataclass
class Progress:
    """Where a run stands: what last.pth must hold, besides weights and optimiser, to resume exactly."""
    epoch: int = 0          # epochs completed
    step: int = 0           # optimiser steps in all
    epoch_step: int = 0     # steps into the current epoch (a run stopped by --max-steps or an interrupt)
    best_metric: float = None
    best_epoch: int = None
    elapsed: float = 0.0    # seconds of training and validation

    def done(self, args):
        return self.epoch >= args.epochs or (args.max_steps is not None and self.step >= args.max_steps)


def make_demo(args, rank):
    if rank == 0 and args.data == 'demo' and not (Path(args.root) / 'train_npz').is_dir():
        print(f'making the synthetic demo set in {args.root}', flush=True)
        data.make_demo(args.root, seed=0)


def setup(args, ckpt, rank, world, device):
    """Model, optimiser, data and validation cases of a run (no collective inside: on_all_ranks runs it)."""
    spec = data.get_spec(args.data, args.root, args.num_classes)
    common = dict(seed=args.seed, label_map=args.label_map, num_classes=args.num_classes,
                  val_cases=0 if args.select_on_test else args.val_cases)
    train_set = data.train_set(args.data, args.root, args.img_size, **common)
    if len(train_set) // world < args.batch_size // world:
        raise data.DataError(f'--batch-size {args.batch_size} is larger than the training set of {args.data} at '
                             f'{args.root} ({len(train_set)} samples over {world} process(es))')
    val_cases = []
    if rank == 0:
        val_cases = data.eval_cases(args.data, args.root, 'test' if args.select_on_test else 'val', **common)
    torch.manual_seed(args.seed)  # the same initialisation on every rank (DDP also broadcasts rank 0's)
    net = build_model(args, spec.num_classes, pretrained=ckpt is None)
    if ckpt is not None:
        net.load_state_dict(ckpt['model'])
    if world > 1 and device.type == 'cuda':
        # NOTE(impl): SyncBatchNorm under DDP on GPUs, so BN sees the global batch as on one GPU (timm's converter keeps MaxViT's BatchNormAct2d). gloo on CPUs has none: there BN sees each process's share.
        net = danie_model.timm.layers.convert_sync_batchnorm(net)
    net = net.to(device, memory_format=danie_model.MEMORY_FORMAT)
    opt = make_optimizer(net, args, device)
    scaler = torch.amp.GradScaler('cuda', enabled=args.amp == 'fp16')
    if ckpt is not None:
        opt.load_state_dict(ckpt['train']['optimizer'])
        if ckpt['train']['scaler']:  # empty when the run so far had no fp16 loss scaling
            scaler.load_state_dict(ckpt['train']['scaler'])
    return spec, net, opt, scaler, train_set, val_cases


def train(args, ckpt, rank, world, device):
    """The recipe: per epoch, train_one_epoch, then (rank 0) validate, checkpoint and log."""
    master, out, per_rank = rank == 0, Path(args.out), args.batch_size // world
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
        # NOTE(impl): TF32 matmuls and convolutions on Ampere+, as the paper's PyTorch on an RTX 3090 did by default for convolutions.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if master:
        out.mkdir(parents=True, exist_ok=True)
        print(f'init: {init_name(args)}', flush=True)
        if args.select_on_test:
            print("WARNING: --select-on-test chooses best.pth by its Dice on the TEST split (the peers' protocol); "
                  'the test score of that checkpoint is optimistic.', file=sys.stderr, flush=True)
    on_all_ranks(world, make_demo, args, rank)  # also a barrier: the other ranks wait for the files
    spec, net, opt, scaler, train_set, val_cases = on_all_ranks(world, setup, args, ckpt, rank, world, device)
    sampler = EpochSampler(train_set, args.seed, rank, world)
    # NOTE(impl): --batch-size is the global batch, split over the processes, so that N GPUs run the Sec. 4.2 recipe unchanged.
    # NOTE(impl): drop_last, so that every step has a full batch (BatchNorm, and a constant number of steps per epoch).
    loader = data.make_loader(train_set, per_rank, shuffle=False, workers=args.workers, sampler=sampler,
                              drop_last=True)
    raw = net
    if world > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.compile:
        compile_blocks(raw)
    data_info = dict(name=args.data, root=os.path.abspath(args.root), label_map=args.label_map,
                     val_cases=0 if args.select_on_test else args.val_cases, seed=args.seed,
                     spec=data.spec_to_dict(spec), selected_on='test' if args.select_on_test else 'val')
    run = Progress(ckpt['epoch'], ckpt['step'], **{k: ckpt['train'][k] for k in TRAIN_STATE}) if ckpt else Progress()
    if master:
        print(f'DANIE-{args.size} ({sum(p.numel() for p in raw.parameters()) / 1e6:.1f} M parameters) on {device} '
              f'x{world}, {args.data}: {len(train_set)} training samples, {len(val_cases)} '
              f"{data_info['selected_on']} cases, batch {args.batch_size}, {args.img_size}x{args.img_size}, "
              f'{args.epochs} epochs, --supervision {args.supervision}, --amp {args.amp} -> {out}', flush=True)
    writer, log = CheckpointWriter(), read_log(out / 'log.csv')
    try:
        while not run.done(args):
            epoch, skip = run.epoch, run.epoch_step  # skip: batches of this epoch done before a resume
            sampler.set_epoch(epoch, skip * per_rank)
            t0 = time.perf_counter()
            loss, n = train_one_epoch(net, opt, scaler, loader, args, spec.num_classes, run, world, device, master)
            train_s = time.perf_counter() - t0
            run.step, run.epoch_step, run.elapsed = run.step + n, run.epoch_step + n, run.elapsed + train_s
            if run.epoch_step == skip + len(loader):
                run.epoch, run.epoch_step = epoch + 1, 0
            if master:
                t0 = time.perf_counter()
                metric = validate(raw, val_cases, spec, args, device) if due(run, args, val_cases) else None
                net.train()
                files = {}
                if metric is not None and math.isfinite(metric) and (run.best_metric is None or
                                                                     metric > run.best_metric):
                    run.best_metric, run.best_epoch = metric, epoch + 1
                    files[out / 'best.pth'] = checkpoint(raw, run, args, data_info, init_name(args), metric)
                run.elapsed += time.perf_counter() - t0
                state = dict(optimizer=opt.state_dict(), scaler=scaler.state_dict(), world_size=world)
                files[out / 'last.pth'] = checkpoint(raw, run, args, data_info, init_name(args), metric, state)
                writer.save(files)  # one host copy and one background write for both
                log.append(log_row(epoch + 1, run, loss, metric, n * args.batch_size / train_s, train_s))
                write_log(out / 'log.csv', log)
                print_epoch(log[-1], run, args, data_info['selected_on'])
            if world > 1:
                dist.barrier()
    finally:
        writer.wait()
    return finish(run, args, out, data_info['selected_on']) if master else None


def due(run, args, val_cases):
    """Validate after every --val-every full epochs and after the last step."""
    last = run.done(args)
    return len(val_cases) > 0 and (last or (run.epoch_step == 0 and run.epoch % args.val_every == 0))


def checkpoint(raw, run, args, data_info, init, metric, state=None):
    """evaluate.make_checkpoint for this run: with the training state (last.pth) or without (best.pth)."""
    train_state = None if state is None else {**state, **{k: getattr(run, k) for k in TRAIN_STATE}}
    return evaluate.make_checkpoint(raw, data_info, vars(args), init, run.epoch, run.step, metric, train_state)


def log_row(epoch, run, loss, metric, imgs_per_s, train_s):
    return dict(epoch=epoch, step=run.step, loss=f'{loss:.6f}', val_dice='' if metric is None else f'{metric:.6f}',
                best_dice='' if run.best_metric is None else f'{run.best_metric:.6f}',
                images_per_s=f'{imgs_per_s:.2f}', train_s=f'{train_s:.1f}', elapsed_s=f'{run.elapsed:.1f}')


def print_epoch(row, run, args, selected_on):
    partial = '' if run.epoch_step == 0 else f' (stopped at batch {run.epoch_step})'
    val = '' if not row['val_dice'] else (f" | {selected_on} Dice {float(row['val_dice']):.4f} (best "
                                          f'{run.best_metric:.4f} @ {run.best_epoch})')
    print(f"epoch {row['epoch']:4d}/{args.epochs}{partial} | step {run.step:7d} | loss {float(row['loss']):.4f} | "
          f"{float(row['images_per_s']):7.1f} img/s{val} | {run.elapsed:7.1f} s", flush=True)


def finish(run, args, out, selected_on):
    """summary.json and the closing lines, pointing at the checkpoint to evaluate."""
    ckpt = out / ('best.pth' if run.best_metric is not None else 'last.pth')
    summary = dict(data=args.data, size=args.size, out=str(out), init=init_name(args), selected_on=selected_on,
                   best_val_dice=run.best_metric, best_epoch=run.best_epoch, epochs=run.epoch, steps=run.step,
                   elapsed_s=round(run.elapsed, 1), checkpoint=str(ckpt))
    (out / 'summary.json').write_text(json.dumps(summary, indent=2))
    best = ('none (no validation cases: last.pth is the result, as in the paper)' if run.best_metric is None
            else f'{run.best_metric:.4f} at epoch {run.best_epoch}')
    print(f'done: {run.epoch}/{args.epochs} epochs, {run.step} steps, {run.elapsed:.0f} s; best {selected_on} '
          f'mean Dice {best}\nnext: python evaluate.py --ckpt {ckpt}', flush=True)
    return summary


# -----------------------------------------------------------------------------
# CLI


def build_parser():
    p = argparse.ArgumentParser(description='Train DANIE (paper Sec. 4.2). Defaults left unset come from the '
                                            'dataset spec in data.py.')
    # data
    p.add_argument('--data', choices=data.DATASETS, help='dataset (Sec. 4.1); demo = synthetic, made if missing; '
                                                         'folder / nnunet = your own data')
    p.add_argument('--root', help='dataset folder (default: data/<name>)')
    p.add_argument('--num-classes', type=number(int, 2, False),
                   help='--data folder: classes including background (or ROOT/classes.txt)')
    p.add_argument('--img-size', type=number(int, 32, False),
                   help='input size, a multiple of 32 (default 224; the paper does not state it, 224 is the size of '
                        "the ImageNet MaxViT it starts from; the demo's is smaller, to run on a CPU)")
    p.add_argument('--val-cases', type=data.parse_val_cases,
                   help='training cases held out for model selection, a number or a fraction; 0 = none: train on '
                        'all of them and keep last.pth, as the paper (default: the official validation split, '
                        'else 10%%)')
    p.add_argument('--label-map', default='transunet', choices=data.LABEL_MAPS,
                   help="Synapse label ids: TransUNet's 9-class files (default) or CASCADE's 13-label files")
    p.add_argument('--select-on-test', action='store_true',
                   help='CHOOSE best.pth ON THE TEST SPLIT, as CASCADE/MERIT do; only to reproduce their protocol: '
                        'the test score of such a best.pth is optimistic. Trains on all training cases')
    p.add_argument('--workers', type=number(int, 0, False),
                   help='DataLoader worker processes (default: 8 on CUDA, 0 on CPU)')
    # model
    p.add_argument('--size', choices=('S', 'L'), help='DANIE-S (MaxViT-T) or DANIE-L (MaxViT-S), Sec. 4.2 '
                                                      '(default S)')
    p.add_argument('--no-pretrained', dest='pretrained', action='store_false', default=None,
                   help='train the backbone from scratch (default for the benchmarks and your own data: ImageNet '
                        "MaxViT weights from timm, Sec. 4.2; the demo's default is from scratch)")
    p.add_argument('--pretrained-file', help='the ImageNet MaxViT weights from a local .safetensors/.pth file '
                                             '(offline machines)')
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
    p.add_argument('--epochs', type=number(int, 1, False),
                   help='default per dataset, Sec. 4.2: Synapse 300, ACDC 400, ISIC 200, GlaS 100')
    p.add_argument('--batch-size', type=number(int, 1, False),
                   help='global batch, split over the GPUs; default per dataset, Sec. 4.2: Synapse 24, ACDC 12, '
                        'ISIC 8, GlaS 8 (not given there)')
    p.add_argument('--lr', type=number(float, 0, True),
                   help="AdamW learning rate (default: the dataset spec's, 1e-4 as Sec. 4.2)")
    p.add_argument('--weight-decay', type=number(float, 0, False), default=1e-4,
                   help='AdamW weight decay (default: 1e-4, Sec. 4.2)')
    # NOTE(impl): default 'deep', Eq. 13 summed over p1..p4 (CASCADE's trainer, whose 0.7/0.3, AdamW 1e-4 and constant lr the paper repeats) plus y; the paper does not say where Eq. 13 applies.
    p.add_argument('--supervision', choices=SUPERVISION, default='deep',
                   help='where Eq. 13 applies: final = y only; deep = p1..p4 and y (CASCADE); '
                        'mutation = every subset of heads (MERIT) (default: %(default)s)')
    p.add_argument('--max-steps', type=number(int, 1, False),
                   help='stop after this many optimiser steps in all (smoke runs)')
    # system
    p.add_argument('--amp', choices=tuple(evaluate.AMP_DTYPES),
                   help='mixed precision: bf16 (Ampere+), fp16 (with loss scaling), none (default, fp32 as the paper)')
    p.add_argument('--compile', action='store_true',
                   help='regional torch.compile of the repeated blocks (checkpoints hold the plain weights)')
    p.add_argument('--seed', type=int, default=0, help='seed of the initialisation, the shuffle, the augmentation '
                                                       'and the validation split (default: %(default)s)')
    # output
    p.add_argument('--out', help='output folder (default: runs/<data>-<size>)')
    p.add_argument('--resume', nargs='?', const='', metavar='PATH',
                   help='continue a run from PATH (default OUT/last.pth); its flags are reused, given ones override')
    p.add_argument('--val-every', type=number(int, 1, False), default=1,
                   help='validate every N epochs, and after the last step (default: %(default)s)')
    # benchmark
    p.add_argument('--bench', action='store_true', help='time train_step instead of training (table + bench.json)')
    p.add_argument('--warmup', type=number(int, 1, False), default=3, help='--bench: untimed steps')
    p.add_argument('--steps', type=number(int, 1, False), default=10, help='--bench: timed steps')
    return p


def resume_point(parser, args):
    """(path, checkpoint) a run continues from: --resume PATH, or a run already in --out; (None, None) if none."""
    out = args.out or (os.path.join('runs', f"{args.data}-{args.size or 'S'}") if args.data else None)
    if args.resume is None:  # a fresh run: is its folder taken?
        path = Path(out) / 'last.pth' if out else None
        return (path, evaluate.load_checkpoint(path, resume=True)) if path and path.is_file() else (None, None)
    if not (args.resume or out):
        parser.error('--resume without a PATH needs --out or --data to find last.pth')
    path = Path(args.resume or Path(out) / 'last.pth')
    if not path.is_file():
        parser.error(f'--resume: no checkpoint at {path}')
    return path, evaluate.load_checkpoint(path, resume=True)


def parse(argv):
    """Parse, take a continued run's flags from its checkpoint, fill the per-dataset defaults, check."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bench:
        args.lr = args.lr or 1e-4
        return args, None
    path, ckpt = resume_point(parser, args)
    if ckpt is not None:
        saved = dict(ckpt['args'], out=str(path.parent))  # the folder moves with its checkpoint
        resuming = args.resume is not None
        # a flag given is a flag used: the checkpoint's arguments stand in for the defaults only
        args = parser.parse_args(argv, namespace=argparse.Namespace(**saved))
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint: {saved.get(k)})"
                   for k in SAME_RUN if getattr(args, k) != saved.get(k)]
        if changed:
            what = '--resume continues the same run' if resuming else f'{args.out} holds another run'
            parser.error(f'{what}, but {", ".join(changed)}; start a new --out instead')
        if not resuming and ckpt['epoch'] < args.epochs:
            parser.error(f"{args.out} already holds a run (last.pth at epoch {ckpt['epoch']}/{args.epochs}): "
                         '--resume to continue it, or another --out')
        args.resume = str(path) if resuming else 'finished'
    if args.data is None:
        parser.error('--data is required (or --resume PATH, or --bench)')
    fill_defaults(args)
    check(parser, args)
    return args, ckpt


def fill_defaults(args):
    """The per-dataset defaults of Sec. 4.2 (data.py's specs) for the flags left unset."""
    spec = data.SPECS.get(args.data)
    args.root = args.root or data.default_root(args.data)
    args.size = args.size or 'S'
    args.epochs = args.epochs or (spec.epochs if spec else 100)
    args.batch_size = args.batch_size or (spec.batch_size if spec else 8)
    args.img_size = args.img_size or (spec.img_size if spec else 224)
    args.lr = args.lr or (spec.lr if spec else 1e-4)
    args.amp = args.amp or 'none'
    args.workers = (8 if torch.cuda.is_available() else 0) if args.workers is None else args.workers
    args.out = args.out or os.path.join('runs', f'{args.data}-{args.size}')
    # NOTE(impl): the demo trains from scratch (no download on a CPU demo); every other dataset starts from ImageNet as Sec. 4.2.
    if args.pretrained is None:
        args.pretrained = args.data != 'demo' or args.pretrained_file is not None


def check(parser, args):
    """The checks that argparse's types cannot make alone."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    if args.batch_size % world:
        parser.error(f'--batch-size {args.batch_size} is the global batch and must divide among {world} processes')
    if args.amp == 'fp16' and not torch.cuda.is_available():
        parser.error('--amp fp16 needs CUDA (loss scaling); on a CPU use --amp bf16 or none')
    if args.pretrained_file is not None and not os.path.isfile(args.pretrained_file):
        parser.error(f'--pretrained-file {args.pretrained_file} does not exist')
    if args.pretrained_file is not None and not args.pretrained:
        parser.error('--pretrained-file and --no-pretrained contradict each other')
    try:  # the model's own checks: img_size a multiple of 32, ablation switches that go together
        danie_model.make_config(args.size, img_size=args.img_size, **switches(args))
    except ValueError as e:
        parser.error(str(e))


def main(argv=None):
    args, world = None, 1
    try:
        args, ckpt = parse(argv)
        if args.bench:
            return bench(args)
        if args.resume == 'finished':  # the same command again: the run is there, nothing is lost or redone
            best = Path(args.out) / 'best.pth'
            print(f"{args.out} already holds this run, finished at epoch {ckpt['epoch']}/{args.epochs}: nothing to "
                  f"do.\nnext: python evaluate.py --ckpt {best if best.exists() else Path(args.out) / 'last.pth'}")
            return None
        rank, world, device = setup_distributed()
        return train(args, ckpt, rank, world, device)
    except (data.DataError, evaluate.CheckpointError, danie_model.PretrainedError) as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(2)
    except TrainError as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        if args is not None and not args.bench:
            print(f"\ninterrupted; continue with: python train.py --resume {Path(args.out) / 'last.pth'}",
                  file=sys.stderr)
        raise SystemExit(130)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
