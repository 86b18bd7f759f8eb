"""
Every speed table of DANIE, each timing the real code (train.train_step, evaluate.evaluate, predict.main,
data.train_set and its loader), never a copy of it. Ratios are measured within one run (the models take turns);
absolute times are worth quoting from a GPU only, with its name.

    python bench.py model            # parameters and GMAC beside Table 1, CPU latency against the bare backbone
    python bench.py train            # train_step eager and compiled (GPU: S and L, fp32/bf16, batches 24/8)
    python bench.py profile          # one eager DANIE-S train_step: the top kernels (operators) by time and by count
    python bench.py eval             # metrics against medpy; evaluation of volumes and ISIC-sized images
    python bench.py data --data isic2017 --root PATH   # training samples/s through the DataLoader
    python bench.py predict          # a 512x512x150 CT volume (NIfTI, Hounsfield units) predicted by predict.py

Every table goes to stdout and, with --out DIR, to DIR/bench-<what>.json.
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch._inductor.utils import fresh_inductor_cache
from torch.utils.flop_counter import FlopCounterMode

import data
import evaluate
import model as danie
import predict
import train

# dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets), for the share of the chip a step uses
BF16_PEAK_TFLOPS = {'H100 80GB HBM3': 989.0, 'H100 PCIe': 756.0, 'H100 NVL': 835.0, 'H200': 989.0,
                    'A100': 312.0, 'RTX 3090': 71.0, 'RTX 4090': 165.0, 'L40S': 362.0}
COMPILE_MODES = ('eager', 'whole')  # train: none, or the whole model compiled (train.py --compile)

# ---- helpers


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


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


def table(rows, cols):
    """Print rows (dicts) as a fixed-width table of the columns cols (name, width, format)."""
    print(' '.join(f'{c:>{w}}' for c, w, _ in cols))
    for r in rows:
        print(' '.join(f'{"-" if r.get(c) is None else format(r[c], f):>{w}}' for c, w, f in cols), flush=True)

# ---- the tables


def bench_model(args, device):
    """Parameters and GMAC beside Table 1; CPU forward latency of DANIE and of its bare backbone, taking turns."""
    rows = []
    for size in ('S', 'L'):
        net = danie.danie(size, num_classes=9, img_size=args.img_size).eval()
        g, g_bb = danie.gmac(net, args.img_size), danie.gmac(net.sap, args.img_size)
        times = {'ms': [], 'bb_ms': []}
        x = torch.randn(1, 3, args.img_size, args.img_size)
        with torch.inference_mode():
            for r in range(args.warmup + args.steps):
                for key, fn in (('ms', net), ('bb_ms', net.sap)):
                    t0 = time.perf_counter()
                    fn(x)
                    times[key] += [1e3 * (time.perf_counter() - t0)] if r >= args.warmup else []
        rows.append(dict(model=f'DANIE-{size}', params_m=sum(p.numel() for p in net.parameters()) / 1e6, gmac=g,
                         paper=danie.PAPER_GMAC[size], diff_pct=100 * (g / danie.PAPER_GMAC[size] - 1), bb_gmac=g_bb,
                         **{k: statistics.median(v) for k, v in times.items()}))
        rows[-1]['ms_ratio'] = rows[-1]['ms'] / rows[-1]['bb_ms']
    print(f'{args.img_size}x{args.img_size}, 9 classes; GMAC = FlopCounterMode FLOPs / 2 (the paper counts '
          f'multiply-accumulates); CPU latency: batch 1, median of {args.steps}, {torch.get_num_threads()} threads')
    table(rows, [('model', 8, ''), ('params_m', 9, '.2f'), ('gmac', 7, '.2f'), ('paper', 6, '.2f'),
                 ('diff_pct', 8, '+.1f'), ('bb_gmac', 8, '.2f'), ('ms', 8, '.1f'), ('bb_ms', 8, '.1f'),
                 ('ms_ratio', 8, '.2f')])
    return rows


def train_setup(size, amp, batch, mode, args, device):
    """A fresh DANIE (seed 0), its AdamW and one train.train_step on fixed random data; mode 'whole' compiles the
    whole model in place, as train.py --compile does."""
    torch.manual_seed(0)
    net = danie.danie(size, num_classes=9, img_size=args.img_size).to(device)
    spec, supervision = data.SPECS['synapse'], train.build_parser().get_default('supervision')  # Sec. 4.2's recipe
    opt = train.make_optimizer(net, spec.lr, spec.weight_decay, device)
    scaler = torch.amp.GradScaler('cuda', enabled=amp == 'fp16')
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    t = torch.randint(0, 9, (batch, args.img_size, args.img_size), device=device)
    if mode == 'whole':
        net.compile()
    return lambda: train.train_step(net, opt, scaler, x, t, amp, supervision, 9)  # the loss


def graph_breaks(size, args):
    """(graph breaks of the whole model's forward under dynamo, those inside DANIE's own files) and the latter's
    reasons, from torch._dynamo.explain."""
    net = danie.danie(size, num_classes=9, img_size=args.img_size)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(torch.randn(2, 3, args.img_size, args.img_size))
    ours = [r for r in explained.break_reasons if r.user_stack and Path(r.user_stack[-1].filename).name in
            ('attention.py', 'model.py')]
    return explained.graph_break_count, len(ours), [f'{r.user_stack[-1].filename}:{r.user_stack[-1].lineno} '
                                                    f'{r.reason}' for r in ours]


def train_rows(size, amp, batch, modes, args, device):
    """One configuration in each mode, the same weights and data: ready_s is the time from building the step to the
    end of its first step (compilation included, from empty caches); then the modes take turns, step by step."""
    cuda, steps, rows = device.type == 'cuda', {}, []
    torch._dynamo.reset()
    for mode in modes:
        with fresh_inductor_cache():  # no kernel compiled for an earlier mode or run is reused
            t0 = time.perf_counter()
            steps[mode] = train_setup(size, amp, batch, mode, args, device)
            steps[mode]()
            _sync(device)
            ready = time.perf_counter() - t0
            print(f'DANIE-{size} {amp} batch {batch}, {mode}: ready after {ready:.0f} s', flush=True)
            for _ in range(args.warmup):
                steps[mode]()
        rows.append(dict(model=f'DANIE-{size}', amp=amp, batch=batch, mode=mode, ready_s=ready, times=[], peak_gib=0))
    for _ in range(args.steps):
        for row in rows:
            torch.cuda.reset_peak_memory_stats(device) if cuda else None
            t0 = time.perf_counter()
            steps[row['mode']]().item()  # the step's end
            row['times'].append(time.perf_counter() - t0)
            row['peak_gib'] = max(row['peak_gib'], torch.cuda.max_memory_allocated(device) / 2 ** 30) if cuda else None
    for row in rows:
        dt = statistics.median(row.pop('times'))
        row.update(img_s=batch / dt, ms=1e3 * dt)
        row['vs_eager'] = rows[0]['ms'] / row['ms'] if modes[0] == 'eager' else None  # the speed-up on eager
        if row['mode'] == 'eager':  # counted on the eager step: dispatch modes and compiled regions do not mix
            step = steps['eager']
            row['kernels' if cuda else 'operators'] = count_kernels(step) if cuda else count_ops(step)
            peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if cuda and k in torch.cuda.get_device_name(device)),
                        None)
            with FlopCounterMode(display=False) as flops:
                step()
            row['peak_share'] = flops.get_total_flops() / dt / 1e12 / peak if peak else None
    return rows


def bench_train(args, device):
    """The training-step table, eager and compiled; graph breaks; on a CPU also the operators DANIE adds to its
    backbone."""
    cuda = device.type == 'cuda'
    torch.backends.cudnn.benchmark = True
    grid = args.grid or [(s, a, b) for s in ('S', 'L') if cuda or s == 'S'
                         for a in (('none', 'bf16') if cuda else ('none',)) for b in ((24, 8) if cuda else (2,))]
    modes = tuple(m for m in COMPILE_MODES if m in args.modes)
    print(f"train_step on {torch.cuda.get_device_name(device) if cuda else 'CPU'}: {args.img_size}x{args.img_size}, "
          f'9 classes, AdamW, deep supervision; {torch.get_num_threads()} threads; {args.warmup} warm-up + '
          f'{args.steps} timed steps per mode, the modes taking turns; ms: the median step')
    rows = []
    for size, amp, batch in grid:
        try:
            rows += train_rows(size, amp, batch, modes, args, device)
        except torch.cuda.OutOfMemoryError:
            rows.append(dict(model=f'DANIE-{size}', amp=amp, batch=batch, mode='out of memory'))
        torch.cuda.empty_cache() if cuda else None
    breaks, ours, reasons = graph_breaks('S', args) if 'whole' in modes else (None, None, [])
    for row in rows:
        row.update(breaks=breaks, breaks_danie=ours) if row.get('mode') == 'whole' else None
    table(rows, [('model', 8, ''), ('amp', 5, ''), ('batch', 5, 'd'), ('mode', 6, ''), ('img_s', 8, '.2f'),
                 ('ms', 8, '.0f'), ('vs_eager', 8, '.2f'), ('ready_s', 7, '.0f'), ('peak_gib', 8, '.2f'),
                 ('kernels' if cuda else 'operators', 9, 'd'), ('peak_share', 10, '.1%'), ('breaks', 6, 'd'),
                 ('breaks_danie', 12, 'd')])
    if 'whole' in modes:
        print(f"graph breaks (torch._dynamo.explain, DANIE-S forward): {breaks} in all, {ours} in attention.py/model.py"
              + ''.join(f'\n  {r}' for r in reasons))
    if not cuda:  # forward + loss + backward of DANIE-S against its bare MaxViT-T backbone
        net = danie.danie('S', num_classes=9, img_size=args.img_size)
        x, t = torch.randn(2, 3, args.img_size, args.img_size), torch.randint(0, 9, (2, args.img_size, args.img_size))
        ops = {k: count_ops(lambda: (net.zero_grad(set_to_none=True), fn().backward())) for k, fn in (
            ('danie', lambda: train.criterion(*net(x), t)), ('backbone', lambda: sum(f.mean() for f in net.sap(x))))}
        rows.append(dict(model='DANIE-S beyond MaxViT-T', **ops, added=ops['danie'] - ops['backbone']))
        print(f"operators of forward + loss + backward, batch 2: DANIE-S {ops['danie']}, its MaxViT-T backbone "
              f"{ops['backbone']}, added by DANIE {rows[-1]['added']}")
    return rows


def bench_profile(args, device):
    """One eager DANIE-S train_step (bf16 on a GPU, batch 24; CPU: fp32, batch 2) under torch.profiler: the
    kernels (CPU: operators) that take the most time, and those launched most often."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == 'cuda'
    amp, batch = ('bf16', 24) if cuda else ('none', 2)
    step = train_setup('S', amp, batch, 'eager', args, device)
    for _ in range(args.warmup):
        step()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        step().item()
    events = [e for e in prof.key_averages() if (e.device_type.name == 'CUDA') == cuda]
    us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(us(e) for e in events)
    rows = [dict(by=by, name=e.key[:60], calls=e.count, ms=us(e) / 1e3, share=us(e) / total) for by, key in
            (('time', us), ('count', lambda e: e.count)) for e in sorted(events, key=key, reverse=True)[:args.top]]
    print(f"DANIE-S train_step, {amp}, batch {batch}, {args.img_size}x{args.img_size}: {sum(e.count for e in events)} "
          f"{'kernels' if cuda else 'operators'}, {total / 1e3:.1f} ms of {'GPU' if cuda else 'CPU'} time")
    table(rows, [('by', 5, ''), ('name', 60, ''), ('calls', 6, 'd'), ('ms', 8, '.2f'), ('share', 6, '.1%')])
    return rows


def bench_eval(args, device):
    """binary_metrics against medpy on Synapse-sized volumes; evaluate() on a volume and on ISIC-sized images."""
    from medpy.metric import binary as mb
    shape, rows = (150, 512, 512), []
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    ball = lambda c, r: sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r)) <= 1  # noqa: E731
    organs = {'liver-sized': ((75, 260, 200), (30, 80, 100), (78, 266, 195), (28, 84, 96)),
              'kidney-sized': ((70, 300, 360), (18, 30, 25), (72, 303, 357), (17, 31, 27)),
              'pancreas-sized': ((80, 250, 280), (8, 20, 45), (81, 253, 276), (7, 18, 47))}
    for name, (c1, r1, c2, r2) in organs.items():
        gt, pred = ball(c1, r1), ball(c2, r2)
        t0 = time.perf_counter()
        ours = evaluate.binary_metrics(pred, gt)
        t1 = time.perf_counter()
        ref = dict(dice=mb.dc(pred, gt), iou=mb.jc(pred, gt), hd95=mb.hd95(pred, gt), asd=mb.assd(pred, gt))
        rows.append(dict(what=f'metrics, {name}', ours_s=t1 - t0, medpy_s=time.perf_counter() - t1,
                         max_diff=max(abs(ours[k] - ref[k]) for k in evaluate.METRICS)))
    rng, spec = np.random.default_rng(0), data.SPECS['synapse']
    volume = data.Item('v', rng.random((args.slices, 512, 512), dtype=np.float32), np.zeros((args.slices, 512, 512)))
    images = [data.Item(f'i{i}', rng.integers(0, 256, hw + (3,), dtype=np.uint8), np.zeros(hw, np.int64))
              for i, hw in zip(range(args.images), [(767, 1022), (1129, 1504), (2016, 3024)] * args.images)]
    for what, cases, s in (('evaluate, a volume', [volume], spec), ('evaluate, ISIC images', images,
                                                                     data.SPECS['isic2017'])):
        net = danie.danie('S', num_classes=s.num_classes, img_size=args.img_size).to(device)
        evaluate.evaluate(net, cases[:1], s, args.img_size, device=device, progress=False)  # warm-up
        t0 = time.perf_counter()
        evaluate.evaluate(net, cases, s, args.img_size, device=device, progress=False, distances=False,
                          workers=4 if device.type == 'cuda' else 0)
        rows.append(dict(what=what, ours_s=(time.perf_counter() - t0) / len(cases)))
    print(f'metrics against medpy on {shape} volumes; evaluate() on {device}: s per case (a volume of {args.slices} '
          f'512x512 slices; ISIC images of 0.8 to 6 MP), DANIE-S at {args.img_size}')
    table(rows, [('what', 30, ''), ('ours_s', 9, '.3f'), ('medpy_s', 9, '.2f'), ('max_diff', 9, '.1e')])
    return rows


def bench_data(args, device):
    """Training samples/s through the DataLoader: a first pass (decoding, caching), then a second."""
    root = args.root or data.default_root(args.data)
    if args.data == 'demo':
        data.make_demo(root, reuse=True)
    ds = data.train_set(args.data, root, args.img_size, val_cases=0)
    sub = torch.utils.data.Subset(ds, range(min(len(ds), args.images * args.batch)))
    loader = data.make_loader(sub, args.batch, shuffle=True, workers=args.workers)
    rows = []
    for what in ('first pass', 'second pass'):
        t0 = time.perf_counter()
        n = sum(len(x) for x, _ in loader)
        rows.append(dict(what=f'{args.data}, {what}', samples=n, samples_s=n / (time.perf_counter() - t0)))
    print(f'{len(ds)} training samples at {root}, {args.img_size}x{args.img_size}, {args.workers} workers')
    table(rows, [('what', 24, ''), ('samples', 8, 'd'), ('samples_s', 10, '.1f')])
    return rows


def bench_predict(args, device):
    """predict.py's whole path on a 512x512x150 float NIfTI volume in Hounsfield units, with a random DANIE-S."""
    import nibabel as nib
    tmp = Path(tempfile.mkdtemp(prefix='danie-bench-'))  # removed at the end
    hu = np.random.default_rng(0).uniform(-1000, 1000, (512, 512, 150)).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.diag([0.7, 0.7, 2.5, 1.0])), str(tmp / 'ct.nii.gz'))
    info = dict(name='synapse', root='', label_map='transunet', val_cases=None, seed=0,
                spec=asdict(data.SPECS['synapse']))
    torch.save(danie.checkpoint(danie.danie('S', num_classes=9, img_size=args.img_size), data=info, args={},
                                init='random', epoch=0, step=0, metric=None), tmp / 'random-S.pth')
    t0 = time.perf_counter()
    rc = predict.main(['--ckpt', str(tmp / 'random-S.pth'), '--input', str(tmp / 'ct.nii.gz'), '--out',
                       str(tmp / 'pred'), '--amp', args.amp, '--device', str(device), '--no-progress'])
    seconds = time.perf_counter() - t0
    shutil.rmtree(tmp)
    if rc:
        raise SystemExit(f'predict.py failed (exit {rc}): no time to report')
    rows = [dict(what='512x512x150 CT, read to written', seconds=seconds)]
    table(rows, [('what', 34, ''), ('seconds', 8, '.1f')])
    return rows

# ---- CLI


def grid_arg(text):
    """--grid's SIZE:AMP:BATCH, e.g. S:bf16:24."""
    size, amp, batch = (text.split(':') + ['', '', ''])[:3]
    if size not in ('S', 'L') or amp not in danie.AMP_DTYPES or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE:AMP:BATCH (S or L, one of {', '.join(danie.AMP_DTYPES)}, "
                                         f'a batch size), got {text!r}')
    return size, amp, int(batch)


def main(argv=None):
    p = argparse.ArgumentParser(description='The speed tables of DANIE, on the real code.')
    p.add_argument('what', nargs='+', choices=('model', 'train', 'profile', 'eval', 'data', 'predict'))
    p.add_argument('--img-size', type=int, default=224, help='model input size (default 224)')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps or rounds')
    p.add_argument('--steps', type=int, default=10, help='timed steps or rounds')
    p.add_argument('--modes', nargs='+', choices=COMPILE_MODES, default=COMPILE_MODES,
                   help='train: eager, compiled (the whole model, as train.py --compile) (default: both)')
    p.add_argument('--grid', nargs='+', type=grid_arg, metavar='SIZE:AMP:BATCH',
                   help='train: the configurations, e.g. S:bf16:24 (default: S and L, none and bf16, 24 and 8)')
    p.add_argument('--top', type=predict.number(int, 1), default=15, help='profile: rows per table')
    p.add_argument('--slices', type=int, default=16, help='eval: slices in the timed volume')
    p.add_argument('--images', type=int, default=6, help='eval: ISIC-sized images; data: batches per pass')
    p.add_argument('--data', default='demo', choices=data.DATASETS, help='data: the dataset')
    p.add_argument('--root', help='data: its folder')
    p.add_argument('--batch', type=int, default=8, help='data: batch size')
    p.add_argument('--workers', type=int, default=2, help='data: loader processes')
    p.add_argument('--amp', choices=tuple(danie.AMP_DTYPES), default='none', help='predict: autocast dtype')
    p.add_argument('--device', type=predict.device_arg, help='default: the best there is')
    p.add_argument('--out', help='also write DIR/bench-<what>.json')
    args = p.parse_args(argv)
    device, results = args.device or predict.device_arg(None), {}
    for what in args.what:
        print(f'== {what}')
        results[what] = globals()[f'bench_{what}'](args, device)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            data.write_atomic(Path(args.out) / f'bench-{what}.json', json.dumps(results[what], indent=2, default=str))
    return results


if __name__ == '__main__':
    main()
