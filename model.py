"""
DANIE-S and DANIE-L (Li et al., "Dual Attention Encoder with Joint Preservation for Medical Image
Segmentation", Sec. 3): embeddings (Sec. 3.2), the Dual Attention Encoder with an SAP stream (MaxViT)
beside an HAP stream (Sec. 3.3), Joint Preservation decoding from the deepest stage (Sec. 3.4, Eq. 10-11)
and four prediction heads summed into y (Eq. 12).

Offers: `danie(size, num_classes, img_size, pretrained, pretrained_file, **switches)`, `DANIE`, `DANIEConfig`,
`make_config`, `PRESETS`, `gmac`; the checkpoint layout of train.py, evaluate.py and predict.py (`checkpoint`,
`save_checkpoint`, `load_checkpoint`, `from_checkpoint`); `AMP_DTYPES` and `autocast`.

Why this architecture: the text alone (a patch embedding to H/4, one HAP block per stage) gives about 8.4 / 18.1
GMAC for S / L at 224x224, 9 classes, far below Table 1's 13.29 / 26.55 (multiply-accumulates: MaxViT-T is 5.6 G
there). A UNet-style HAP embedding from full resolution (ConvBlock(3->64) at HxW, ConvBlock(64->C1) at H/2) and
HAP depths that mirror the MaxViT stages (2, 2, 5, 2) give 13.20 / 26.04 GMAC, within 1% / 2% of the paper.
"""

import io
import os
import re
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import data
from attention import EH, ES, HAP, ConvBlock, conv_bn_gelu

# ---- constants and config (Sec. 4.2, Tables 1 and 5-7)

PRESETS = {
    'S': dict(size='S', backbone='maxvit_tiny_tf_224', dims=(64, 128, 256, 512), depths=(2, 2, 5, 2)),
    'L': dict(size='L', backbone='maxvit_small_tf_224', dims=(96, 192, 384, 768), depths=(2, 2, 5, 2)),
}
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # --amp of every script
PAPER_GMAC = {'S': 13.29, 'L': 26.55}  # Table 1, 224x224, 9 classes ("GFLOPs" there are multiply-accumulates)
FUSION_PARTS = {'jp': (True, True), 'add': (False, False), 'concat_res': (False, False), 'eh_add': (False, True),
                'es_add': (True, False)}  # Table 7 row -> (ES on the SAP stream, EH on the HAP stream)
FUSIONS = tuple(FUSION_PARTS)
ORDERS = ('channel_first', 'spatial_first')
SWITCHES = ('hap', 'sap', 'spatial_att', 'channel_att', 'order', 'calibration', 'fusion')
FORMAT = 'danie-ckpt-v2'  # the checkpoint layout below
CKPT_KEYS = ('config', 'model', 'data', 'args', 'init', 'epoch', 'step', 'metric')  # best.pth; last.pth + 'train'


@dataclass(frozen=True)
class DANIEConfig:
    size: str = 'S'
    backbone: str = 'maxvit_tiny_tf_224'  # SAP stream (Sec. 4.2)
    dims: tuple = (64, 128, 256, 512)  # C_1..C_4 (Sec. 4.2)
    depths: tuple = (2, 2, 5, 2)  # HAP blocks per stage, mirroring the MaxViT stage beside it
    num_classes: int = 9
    img_size: int = 224
    alphas: tuple = (1.0, 1.0, 1.0, 1.0)  # Eq. 12: "we set all alpha values to 1.0"
    # ablation switches (Tables 5-7)
    hap: bool = True  # Table 5 A.1: no HAP stream
    sap: bool = True  # Table 5 A.2: no SAP stream
    spatial_att: bool = True  # Table 5 A.3
    channel_att: bool = True  # Table 5 A.4
    order: str = 'channel_first'  # Table 6: 'channel_first' or 'spatial_first'
    calibration: bool = True  # Table 6: dynamic calibration (Eq. 4) or a plain average
    fusion: str = 'jp'  # Table 7: 'jp', 'add', 'concat_res', 'eh_add', 'es_add'

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f'fusion must be one of {FUSIONS}, got {self.fusion!r}')
        if self.order not in ORDERS:
            raise ValueError(f'order must be one of {ORDERS}, got {self.order!r}')
        if not (self.hap or self.sap):
            raise ValueError('at least one of the two streams (hap, sap) must be on')
        if not (self.hap and self.sap) and self.fusion != 'add':
            raise ValueError(f"with one stream off (Table 5) the fusion must be 'add', got {self.fusion!r}")
        if not (self.spatial_att or self.channel_att):
            raise ValueError('HAP needs spatial or channel attention; to drop the whole stream set hap=False')
        if self.img_size % 32 or self.img_size < 32:
            raise ValueError(f"img_size must be a positive multiple of 32 (MaxViT's stride), got {self.img_size}")
        if self.num_classes < 2:
            raise ValueError(f'num_classes must be at least 2 (background + one class), got {self.num_classes}')
        if len(self.dims) != 4 or len(self.depths) != 4 or len(self.alphas) != 4:
            raise ValueError('dims, depths and alphas need one entry per stage (4)')


def make_config(size='S', **overrides):
    """A fresh config from the S or L preset; overrides are any DANIEConfig fields."""
    if size not in PRESETS:
        raise ValueError(f'size must be one of {sorted(PRESETS)}, got {size!r}')
    if unknown := sorted(set(overrides) - {f.name for f in fields(DANIEConfig)}):
        raise ValueError(f'unknown config fields {unknown}; switches are {SWITCHES}')
    return DANIEConfig(**{**PRESETS[size], **overrides})


class PretrainedError(Exception):
    """ImageNet weights that cannot be had: a file missing, unreadable or of another model, or no hub."""


class CheckpointError(Exception):
    """A checkpoint file that is missing, unreadable, or not a DANIE checkpoint of this version."""


# ---- helpers: pretrained MaxViT weights (Sec. 4.2), FLOPs, amp and device


def read_state_dict(path):
    """Tensors of a .pth/.bin/.safetensors file, unwrapped from the usual containers by timm's own reader."""
    if not os.path.isfile(path):
        raise PretrainedError(f'pretrained file {path!r} does not exist')
    try:
        sd = timm.models.load_state_dict(path, use_ema=False)  # 'state_dict' before 'state_dict_ema'
    except AttributeError:  # timm's reader takes .items() of what the file holds
        raise PretrainedError(f'pretrained file {path!r} holds no state dict of tensors') from None
    except Exception as e:  # timm re-raises torch.load's errors with advice of its own: the cause is the reason
        raise PretrainedError(f'cannot read pretrained file {path!r} ({_load_error(path, e.__cause__ or e)})') from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise PretrainedError(f'pretrained file {path!r} holds no state dict of tensors')
    return sd


def load_backbone_file(backbone, cfg, path):
    """Load timm MaxViT ImageNet weights from a local file into the feature backbone; report, never drop, keys."""
    full = timm.create_model(cfg.backbone, pretrained=False, img_size=cfg.img_size)
    sd = read_state_dict(path)
    try:  # timm's own filter: resizes relative position tables for img_size != 224
        sd = timm.models.maxxvit.checkpoint_filter_fn(sd, full)
    except Exception as e:
        raise PretrainedError(f'{path!r} is not a {cfg.backbone} checkpoint ({type(e).__name__}: {e})') from None
    bad = _key_report(full.state_dict(), sd, skip='head.')
    if bad:
        raise PretrainedError(f'{path!r} is not a {cfg.backbone} checkpoint (DANIE-{cfg.size} needs '
                              f'{cfg.backbone}): {bad}')
    # the feature backbone is the model without its classifier; timm names stage n 'stages_n' there
    body = {k.replace('stages.', 'stages_', 1): v for k, v in sd.items() if not k.startswith('head.')}
    backbone.load_state_dict(body, strict=True)
    print(f'loaded {len(body)} {cfg.backbone} tensors from {path}; ignored the ImageNet classifier '
          f"({sum(k.startswith('head.') for k in sd)} head.* tensors)")


def _key_report(want, have, skip=None):
    """'' if `have` fits `want` key for key and shape, else counts and the first names of what does not."""
    missing = [k for k in want if k not in have and not (skip and k.startswith(skip))]
    unexpected = [k for k in have if k not in want]
    shapes = [f'size mismatch for {k}: {tuple(have[k].shape)} vs {tuple(want[k].shape)}' for k in want if k in have
              and have[k].shape != want[k].shape]
    parts = [f'{what} ({len(keys)}): ' + ', '.join(f'"{k}"' for k in keys[:3]) + (', ...' if len(keys) > 3 else '')
             for what, keys in (('Missing key(s)', missing), ('Unexpected key(s)', unexpected)) if keys]
    return '; '.join(parts + shapes[:3] + ([f'{len(shapes)} size mismatches in all'] if len(shapes) > 3 else []))


def _load_error(path, e):
    """Why torch.load failed, in one line. Its weights-only errors open with advice to load unsafely (not for a
    file that failed), and garbage bytes fail as 'unsupported' pickles: neither is the reason."""
    text = str(e)
    if m := re.search(r'Unsupported global: GLOBAL (\S+)', text):
        return f'it holds Python objects ({m[1]}), not only tensors'
    if 'Weights only load failed' in text or not str(path).endswith('.safetensors') and not zipfile.is_zipfile(path):
        return 'an empty file' if os.path.getsize(path) == 0 else 'corrupt, or not a file torch.save wrote'
    return f'{type(e).__name__}: ' + (text.strip().splitlines() or [''])[0][:200]


def gmac(model, img_size, batch=1):
    """Multiply-accumulates of one forward pass in G (FlopCounterMode counts 2 FLOPs per multiply-accumulate)."""
    x = torch.randn(batch, 3, img_size, img_size, device=next(model.parameters()).device)
    was_training = model.training
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def autocast(device, amp):
    """The autocast context of --amp {none,bf16,fp16} on `device`."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != 'none')


# ---- helpers: the checkpoint layout (best.pth: CKPT_KEYS; last.pth: those and 'train', the state to resume)


def checkpoint(model, **fields):
    """A checkpoint dict: the format, the model's config and weights, and `fields` (CKPT_KEYS, 'train')."""
    while hasattr(model, 'module') or hasattr(model, '_orig_mod'):  # inside DDP or torch.compile
        model = getattr(model, 'module', None) or model._orig_mod
    return {'format': FORMAT, 'config': asdict(model.config), 'model': model.state_dict(), **fields}


def save_checkpoint(path, ckpt):
    """Write a checkpoint atomically (PATH.tmp, then a rename). A failed write names the file and the reason;
    its .tmp goes, and the last good checkpoint stays as it was."""
    path, blob = Path(path), io.BytesIO()
    torch.save(ckpt, blob)
    try:
        data.write_atomic(path, blob.getbuffer())
    except OSError as e:
        raise CheckpointError(f'{path}: cannot write it ({e.strerror or e}); the last good one is untouched') from None


def load_checkpoint(path, resume=False):
    """Read and check a checkpoint (resume=True: also the training state); CheckpointError names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such checkpoint file (train.py writes best.pth and last.pth into --out)')
    try:  # checkpoints hold tensors and plain types only, so the safe unpickler suffices
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle, zip and EOF errors all mean the same thing to the user
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint ({_load_error(path, e)})') from None
    if not isinstance(ckpt, dict) or 'format' not in ckpt:
        what = f'a dict with keys {sorted(map(str, ckpt))[:8]}' if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a DANIE checkpoint (found {what}, no 'format' key)")
    if ckpt['format'] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format']!r}, this code reads {FORMAT!r}")
    missing = [k for k in CKPT_KEYS if k not in ckpt] or [k for k in ('name', 'spec') if k not in dict(ckpt['data'])]
    if missing:
        raise CheckpointError(f'{path}: {FORMAT} checkpoint without {missing}')
    if resume and 'train' not in ckpt:
        raise CheckpointError(f"{path}: no training state ('train'): best.pth holds what evaluation needs; resume "
                              'from last.pth')
    return ckpt


def from_checkpoint(ckpt, name='checkpoint'):
    """DANIE built from ckpt['config'] with ckpt['model'] loaded strictly; a mismatch is summarised, not dumped."""
    unknown = sorted(set(ckpt['config']) - {f.name for f in fields(DANIEConfig)})
    if unknown:
        raise CheckpointError(f'{name}: config has fields {unknown} that model.DANIEConfig does not know '
                              '(written by another version of model.py)')
    # tuples may come back as lists from other writers; the frozen config wants hashable values
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt['config'].items()}
    try:
        net = DANIE(DANIEConfig(**cfg))
    except Exception as e:
        raise CheckpointError(f'{name}: cannot build DANIE from its config {cfg}: {type(e).__name__}: {e}') from None
    return load_weights(net, ckpt['model'], name)


def load_weights(net, state, name='checkpoint'):
    """net with `state` loaded strictly; a mismatch (CheckpointError) is summarised, not dumped."""
    bad = _key_report(net.state_dict(), state) if isinstance(state, dict) else f'a {type(state).__name__}'
    if bad:
        hint = ''
        if isinstance(state, dict) and any(str(k).startswith(('module.', '_orig_mod.')) for k in state):
            hint = " (keys start with 'module.' / '_orig_mod.': a DDP/compiled state_dict; save the bare module)"
        raise CheckpointError(f'{name}: weights do not fit the model built from its config: {bad}{hint}')
    net.load_state_dict(state, strict=True)
    return net


# ---- blocks: the two streams of the Dual Attention Encoder (Sec. 3.2-3.3), Joint Preservation (Sec. 3.4)


class HAPStream(nn.Module):
    """Convolutional embedding to H/4 (Sec. 3.2), then four stages of stacked HAP blocks (Eq. 2-5)."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.dims
        # NOTE(impl): UNet-style embedding, ConvBlock(3->64) at HxW and ConvBlock(64->C1) at H/2, each max-pooled:
        # the full-resolution block is what lands Table 1's GMAC (module docstring).
        self.embed = nn.Sequential(ConvBlock(3, 64), nn.MaxPool2d(2), ConvBlock(64, C[0]), nn.MaxPool2d(2))
        hap = dict(order=cfg.order, calibration=cfg.calibration, spatial_att=cfg.spatial_att,
                   channel_att=cfg.channel_att)
        self.stages = nn.ModuleList()
        for i, (c, depth) in enumerate(zip(C, cfg.depths)):
            # NOTE(impl): a 3x3 stride-2 conv + BN + GELU halves the map before stages 2-4, as MaxViT's do.
            down = [conv_bn_gelu(C[i - 1], c, stride=2)] if i > 0 else []
            self.stages.append(nn.Sequential(*down, *[HAP(c, **hap) for _ in range(depth)]))

    def forward(self, x):
        h = self.embed(x)  # (B,C1,H/4,W/4)
        out = []
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out  # h_1..h_4 at H/4..H/32


def sap_stream(cfg, pretrained=False, pretrained_file=None):
    """SAP stream: timm's MaxViT stages (Eq. 1) as a feature backbone; stem + stage-1 stride = the H/4 embedding.
    pretrained: ImageNet weights from pretrained_file, else through timm's hub (online machines)."""
    try:
        backbone = timm.create_model(cfg.backbone, pretrained=pretrained and pretrained_file is None,
                                     features_only=True, out_indices=(1, 2, 3, 4), img_size=cfg.img_size)
    except (OSError, RuntimeError) as e:  # the hub's errors when offline
        raise PretrainedError(f'cannot fetch the ImageNet weights of {cfg.backbone} ({type(e).__name__}; offline?): '
                              'pass --pretrained-file PATH (a local timm .safetensors/.pth file) or --no-pretrained'
                              ) from None
    got = tuple(backbone.feature_info.channels())
    if got != tuple(cfg.dims):
        raise ValueError(f'{cfg.backbone} gives channels {got}, but dims is {cfg.dims}')
    if pretrained_file is not None:
        load_backbone_file(backbone, cfg, pretrained_file)
    return backbone


class JointPreservation(nn.Module):
    """One decoding stage: e_i = ES(s_i) + EH(h_i) (Eq. 10), j_i = ConvBlock(Cat[e_i, up(j_{i+1})]) (Eq. 11)."""

    def __init__(self, C, C_deeper, fusion='jp', hap=True, sap=True):
        super().__init__()
        use_es, use_eh = FUSION_PARTS[fusion]
        self.es = ES() if (use_es and sap) else None
        self.eh = EH(C) if (use_eh and hap) else None
        # NOTE(impl): Table 7's C.1 "Concat + Res" is read as a 3x3 conv + BN + GELU on Cat[s, h] back to C
        # channels, plus the residual s + h: the paper names the row only.
        self.cat_res = conv_bn_gelu(2 * C, C) if fusion == 'concat_res' else None
        if C_deeper is None:  # the deepest stage has no j_{i+1}
            self.up, self.block = None, ConvBlock(C, C)
        else:
            # NOTE(impl): Eq. 11 is silent on how j_{i+1} reaches stage i: bilinear x2, then a 3x3 conv
            # C_{i+1}->C_i + BN + GELU, before Cat.
            self.up, self.block = conv_bn_gelu(C_deeper, C), ConvBlock(2 * C, C)

    def fuse(self, s, h):
        if s is None or h is None:  # Table 5: one stream only
            return h if s is None else s
        if self.cat_res is not None:
            return self.cat_res(torch.cat([s, h], dim=1)) + s + h  # Table 7 C.1: Concat + Res
        es = self.es(s) if self.es is not None else s  # Eq. (6)-(7)
        eh = self.eh(h) if self.eh is not None else h  # Eq. (8)-(9)
        return es + eh  # Eq. (10)

    def forward(self, s, h, j_deeper=None):
        e = self.fuse(s, h)
        if self.up is None:
            return self.block(e)
        u = self.up(F.interpolate(j_deeper, size=e.shape[-2:], mode='bilinear', align_corners=False))
        return self.block(torch.cat([e, u], dim=1))  # Eq. (11)


# ---- top level: DANIE and its heads (Eq. 12)


class DANIE(nn.Module):
    """DANIE: returns y = sum_i alpha_i p_i (Eq. 12) and the four upsampled head maps [p_1..p_4]."""

    def __init__(self, cfg, pretrained=False, pretrained_file=None):
        super().__init__()
        self.config = cfg
        C = cfg.dims
        self.sap = sap_stream(cfg, pretrained, pretrained_file) if cfg.sap else None
        self.hap = HAPStream(cfg) if cfg.hap else None
        self.jp = nn.ModuleList([JointPreservation(C[i], C[i + 1] if i < 3 else None, cfg.fusion, cfg.hap, cfg.sap)
                                 for i in range(4)])
        self.heads = nn.ModuleList([nn.Conv2d(c, cfg.num_classes, 1) for c in C])

    def forward_encoder(self, x):
        """Embeddings and the Dual Attention Encoder: SAP || HAP, four stages each."""
        s = self.sap(x) if self.sap is not None else [None] * 4  # s_1..s_4
        h = self.hap(x) if self.hap is not None else [None] * 4  # h_1..h_4
        return s, h

    def forward_decoder(self, s, h):
        """Joint Preservation from the deepest stage up: j_4, j_3, j_2, j_1."""
        j, js = None, [None] * 4
        for i in (3, 2, 1, 0):
            j = js[i] = self.jp[i](s[i], h[i], j)
        return js

    def forward_heads(self, js, size):
        """Heads (Eq. 12): p_i = 1x1 conv of j_i, bilinearly brought to the input size; y = sum_i alpha_i p_i."""
        p = [F.interpolate(head(j), size=size, mode='bilinear', align_corners=False)
             for head, j in zip(self.heads, js)]  # p_i: (B,K,H,W)
        a = self.config.alphas
        y = a[0] * p[0] + a[1] * p[1] + a[2] * p[2] + a[3] * p[3]  # Eq. (12)
        return y, p

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f'DANIE expects (B,3,H,W) or (B,1,H,W) input, got {tuple(x.shape)}')
        if x.shape[-2:] != (self.config.img_size, self.config.img_size):
            raise ValueError(f'DANIE was built for {self.config.img_size}x{self.config.img_size} input '
                             f'(MaxViT windows are fixed by img_size), got {tuple(x.shape[-2:])}')
        if x.shape[1] == 1:
            # NOTE(impl): grayscale CT/MRI is repeated to 3 channels so the ImageNet stem applies unchanged.
            x = x.expand(-1, 3, -1, -1)
        s, h = self.forward_encoder(x)
        js = self.forward_decoder(s, h)
        return self.forward_heads(js, x.shape[-2:])


def danie(size='S', num_classes=9, img_size=224, pretrained=False, pretrained_file=None, **switches):
    """Build DANIE-S or DANIE-L; switches are the ablation fields of DANIEConfig (Tables 5-7)."""
    cfg = make_config(size, num_classes=num_classes, img_size=img_size, **switches)
    return DANIE(cfg, pretrained=pretrained, pretrained_file=pretrained_file)
