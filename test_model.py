"""Tests of the DANIE network (attention.py, model.py): shapes, equations, ablations, GMAC, weight loading.
CPU, offline; full-size shape and GMAC checks run on the meta device, which needs no memory or time."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import EH, ES, HAP, ChannelAttention, ConvBlock, SpatialAttention
from model import FUSIONS, PAPER_GMAC, DANIE, PretrainedError, danie, gmac, make_config

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny tensors: more threads only add overhead, and stall badly on a loaded machine
# A narrower MaxViT (same stage layout, 4x cheaper) for the tests of wiring and switches; S and L themselves are
# built at full width for shapes, gradients, GMAC and weight loading.
TINY = dict(backbone='maxvit_rmlp_pico_rw_256', dims=(32, 64, 128, 256))


def tiny(num_classes=3, img_size=32, **switches):
    return danie('S', num_classes=num_classes, img_size=img_size, **TINY, **switches)


def meta_danie(size='S', **kw):
    with torch.device('meta'):
        return danie(size, **kw).eval()


def meta_gmac(model, img_size=224):
    with torch.device('meta'):
        return gmac(model, img_size)


# ---- whole model


@pytest.mark.parametrize('size,img_size,num_classes', [('S', 64, 9), ('L', 64, 4)])
def test_forward_shapes_and_eq12(size, img_size, num_classes):
    model = danie(size, num_classes=num_classes, img_size=img_size).eval()
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        y, heads = model(x)
    assert y.shape == (2, num_classes, img_size, img_size)
    assert len(heads) == 4 and all(p.shape == y.shape for p in heads)
    torch.testing.assert_close(y, heads[0] + heads[1] + heads[2] + heads[3])  # Eq. 12, alpha_i = 1


@pytest.mark.parametrize('size,img_size', [('S', 128), ('S', 256), ('L', 128), ('L', 224), ('L', 256)])
def test_shapes_at_full_sizes(size, img_size):
    model = meta_danie(size, num_classes=9, img_size=img_size)
    y, heads = model(torch.empty(2, 3, img_size, img_size, device='meta'))
    assert y.shape == (2, 9, img_size, img_size) and [p.shape for p in heads] == [y.shape] * 4


def test_grayscale_input_is_repeated():
    model = tiny().eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], model(x.repeat(1, 3, 1, 1))[0])


def test_wrong_input_size_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match='built for 32x32'):
        model(torch.randn(1, 3, 64, 64))


def test_every_parameter_gets_a_gradient():
    model = danie('S', num_classes=3, img_size=32).train()
    y, heads = model(torch.randn(2, 3, 32, 32))
    (y.square().mean() + sum(p.mean() for p in heads)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    # ES starts at lambda = 0, but lambda itself must learn (Eq. 7)
    assert all(jp.es.lam.grad.abs().item() > 0 for jp in model.jp)


def test_stream_and_stage_shapes_follow_the_paper():
    cfg = make_config('S', num_classes=2, img_size=64, **TINY)
    model = DANIE(cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        s, h = model.forward_encoder(x)
        assert model.hap.embed(x).shape == (1, 32, 16, 16)  # Sec. 3.2: H/4 x W/4 x C_1
        js = model.forward_decoder(s, h)
    for i, (c, r) in enumerate(zip(cfg.dims, (4, 8, 16, 32))):
        assert s[i].shape == h[i].shape == js[i].shape == (1, c, 64 // r, 64 // r)


def test_presets_are_not_shared_or_mutated():
    a, b = make_config('S', num_classes=4), make_config('S')
    assert a.num_classes == 4 and b.num_classes == 9
    with pytest.raises(Exception):
        a.num_classes = 2  # frozen
    assert make_config('L').dims == (96, 192, 384, 768) and make_config('L').backbone == 'maxvit_small_tf_224'


@pytest.mark.parametrize('bad', [dict(fusion='sum'), dict(order='random'), dict(hap=False, sap=False),
                                 dict(hap=False), dict(img_size=100), dict(num_classes=1), dict(depth=3)])
def test_bad_config_is_a_clear_error(bad):
    with pytest.raises(ValueError):
        make_config('S', **bad)


# ---- blocks


def test_conv_block_definition():
    block = ConvBlock(8, 16)
    kinds = [type(m) for m in block.modules() if not isinstance(m, nn.Sequential)]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.GELU] * 2
    assert all(m.kernel_size == (3, 3) for m in block.modules() if isinstance(m, nn.Conv2d))


def test_es_is_identity_at_init_and_matches_eq6_eq7():
    es = ES()
    x = torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(es(x), x)
    with torch.no_grad():
        es.lam.fill_(0.7)
    S = x.reshape(2, 8, 30)
    energy = torch.einsum('bin,bjn->bij', S, S)
    w = torch.softmax(energy, dim=1)  # Eq. 6: normalised over i
    expected = 0.7 * torch.einsum('bij,bin->bjn', w, S) + S  # Eq. 7: es_j = lam sum_i w_ij S3_i + S_in,j
    torch.testing.assert_close(es(x), expected.reshape_as(x))


def test_eh_matches_eq8_eq9():
    eh = EH(8).eval()
    x = torch.randn(2, 8, 4, 4)
    k = torch.softmax(eh.c1(x).flatten(1), dim=1)  # (B,N)
    A_g = torch.einsum('bcn,bn->bc', x.flatten(2), k)
    W_g = torch.sigmoid(eh.c2(nn.functional.gelu(eh.ln(eh.c1_int(A_g)))))
    torch.testing.assert_close(eh(x), W_g[:, :, None, None] * x)


def test_attention_maps_have_the_papers_shapes():
    x = torch.randn(2, 32, 7, 7)
    assert ChannelAttention(32)(x.amax(dim=(2, 3))).shape == (2, 32)  # A^c in R^{C x 1 x 1}, one per image
    assert SpatialAttention()(x.mean(dim=1, keepdim=True)).shape == (2, 1, 7, 7)  # A^s in R^{1 x H x W}
    for block in (HAP(32), HAP(32, order='spatial_first', calibration=False), ES(), EH(32)):
        assert block.eval()(x).shape == x.shape


def test_eq4_weights_are_trainable_parameters():
    model = tiny()
    haps = [m for m in model.modules() if isinstance(m, HAP)]
    assert len(haps) == sum(model.config.depths)
    names = {id(p) for p in model.parameters()}
    for hap in haps:
        assert isinstance(hap.calibration.w, nn.Parameter) and hap.calibration.w.requires_grad
        assert id(hap.calibration.w) in names and hap.calibration.w.tolist() == [0.5, 0.5]
    fixed = tiny(calibration=False)
    assert not any(isinstance(m.calibration.w, nn.Parameter) for m in fixed.modules() if isinstance(m, HAP))


def test_hap_orders_differ():
    torch.manual_seed(1)
    a = HAP(16, order='channel_first').eval()
    b = HAP(16, order='spatial_first').eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 16, 6, 6)
    assert not torch.allclose(a(x), b(x))


# ---- ablations (Tables 5-7) and GMAC


ABLATIONS = {
    'A.1 no HAP': dict(hap=False, fusion='add'),
    'A.2 no SAP': dict(sap=False, fusion='add'),
    'A.3 no spatial att': dict(spatial_att=False, fusion='add'),
    'A.4 no channel att': dict(channel_att=False, fusion='add'),
    'B.1 spatial first, no Dcal': dict(order='spatial_first', calibration=False),
    'B.2 spatial first': dict(order='spatial_first'),
    'B.3 channel first, no Dcal': dict(calibration=False),
    **{f'C fusion {f}': dict(fusion=f) for f in FUSIONS},
}


@pytest.mark.parametrize('name', list(ABLATIONS))
def test_every_ablation_builds_and_runs(name):
    model = tiny(**ABLATIONS[name]).train()
    y, heads = model(torch.randn(2, 3, 32, 32))
    (y.mean() + sum(p.mean() for p in heads)).backward()
    assert y.shape == (2, 3, 32, 32) and torch.isfinite(y).all()
    # no variant builds a module it does not use: DDP needs no find_unused_parameters
    assert all(p.grad is not None for p in model.parameters())
    assert (model.sap is None) == (ABLATIONS[name].get('sap') is False)
    assert (model.hap is None) == (ABLATIONS[name].get('hap') is False)


def test_gmac_within_3_percent_of_the_paper():
    for size in ('S', 'L'):
        g = meta_gmac(meta_danie(size))
        assert abs(g / PAPER_GMAC[size] - 1) < 0.03, (size, g)


def test_cheaper_variants_cost_less():
    jp = meta_gmac(meta_danie('L'))
    assert meta_gmac(meta_danie('L', fusion='add')) < jp
    assert meta_gmac(meta_danie('L', hap=False, fusion='add')) < meta_gmac(meta_danie('L', fusion='add'))
    bare = meta_gmac(timm.create_model('maxvit_small_tf_224', features_only=True, out_indices=(1, 2, 3, 4)).to('meta'))
    assert 11.0 < bare < 12.0 and jp > 2 * bare


# ---- pretrained weights from a local file (Sec. 4.2)


def test_local_weights_file_loads(tmp_path, capsys):
    src = timm.create_model('maxvit_tiny_tf_224')  # a random stand-in for timm's ImageNet file, at 224
    path = tmp_path / 'maxvit_tiny_tf_224.pth'
    torch.save(src.state_dict(), path)
    model = danie('S', num_classes=2, img_size=64, pretrained_file=str(path))  # rel-pos tables resized to 64
    got = model.sap.state_dict()
    torch.testing.assert_close(got['stem.conv1.weight'], src.state_dict()['stem.conv1.weight'])
    torch.testing.assert_close(got['stages_2.blocks.3.conv.conv2_kxk.weight'],
                               src.state_dict()['stages.2.blocks.3.conv.conv2_kxk.weight'])
    assert 'head.*' in capsys.readouterr().out  # the ignored classifier is reported


def test_wrong_weights_files_give_clear_errors(tmp_path):
    other = tmp_path / 'resnet18.pth'
    torch.save(timm.create_model('resnet18').state_dict(), other)
    with pytest.raises(PretrainedError, match='not a maxvit_tiny_tf_224 checkpoint'):
        danie('S', num_classes=2, img_size=32, pretrained_file=str(other))
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint')
    with pytest.raises(PretrainedError, match='cannot read'):
        danie('S', num_classes=2, img_size=32, pretrained_file=str(garbage))
    with pytest.raises(PretrainedError, match='does not exist'):
        danie('S', num_classes=2, img_size=32, pretrained_file=str(tmp_path / 'missing.pth'))


def test_maxvit_of_the_other_size_is_refused(tmp_path):
    with torch.device('meta'):  # shapes are all that matter here: a small file standing in for MaxViT-S
        small = timm.create_model('maxvit_small_tf_224').state_dict()
    path = tmp_path / 'maxvit_small_tf_224.pth'
    torch.save(small, path)
    with pytest.raises(PretrainedError, match='DANIE-S needs maxvit_tiny_tf_224'):
        danie('S', num_classes=2, img_size=32, pretrained_file=str(path))


def test_data_normalisation_matches_the_backbones_pretrained_config():
    import data  # data.py repeats the constants because it does not import model.py
    for size in ('S', 'L'):
        cfg = timm.get_pretrained_cfg(make_config(size).backbone).to_dict()
        assert tuple(cfg['mean']) == data.MEAN and tuple(cfg['std']) == data.STD


# ---- the batched blocks compute the functions of the per-branch code they replaced (same weights, same keys)


class RefChannelAttention(nn.Module):
    """The per-branch Eq. 2 before the two branches were batched."""

    def __init__(self, C, reduction=16):
        super().__init__()
        hidden = max(C // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(C, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, C))

    def forward(self, x, pool):
        p = x.amax(dim=(2, 3)) if pool == 'max' else x.mean(dim=(2, 3))
        return torch.sigmoid(self.mlp(p))[:, :, None, None]


class RefSpatialAttention(nn.Module):
    """The per-branch Eq. 3."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x, pool):
        p = x.amax(dim=1, keepdim=True) if pool == 'max' else x.mean(dim=1, keepdim=True)
        return torch.sigmoid(self.conv(p))


class RefHAP(nn.Module):
    """HAP as first written: both branches at full size, one after the other, O_d formed, then pooled."""

    def __init__(self, C, order='channel_first', calibration=True, spatial_att=True, channel_att=True):
        super().__init__()
        self.order = order
        self.channel = RefChannelAttention(C) if channel_att else None
        self.spatial = RefSpatialAttention() if spatial_att else None
        self.calibration = nn.Module()
        if calibration:
            self.calibration.w = nn.Parameter(torch.full((2,), 0.5))
        else:
            self.calibration.register_buffer('w', torch.full((2,), 0.5))
        self.c = nn.Linear(C, C)
        self.block = ConvBlock(C, C)

    def branch(self, h, pool):
        stages = [self.channel, self.spatial] if self.order == 'channel_first' else [self.spatial, self.channel]
        x = h
        for att in stages:
            if att is not None:
                x = att(x, pool) * x
        return x

    def forward(self, h):
        O_d = self.calibration.w[0] * self.branch(h, 'max') + self.calibration.w[1] * self.branch(h, 'avg')
        A_d = torch.sigmoid(self.c(O_d.mean(dim=(2, 3))))[:, :, None, None]
        return self.block(A_d * h)


class RefES(nn.Module):
    """ES through matmul, lambda applied after the product."""

    def __init__(self):
        super().__init__()
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, S):
        B, C, H, W = S.shape
        S1 = S.reshape(B, C, H * W)
        W_c = torch.softmax(S1 @ S1.transpose(1, 2), dim=1)
        return self.lam * (W_c.transpose(1, 2) @ S1).reshape(B, C, H, W) + S


class RefEH(EH):
    """EH through matmul and reshape."""

    def forward(self, H_in):
        B, C, H, W = H_in.shape
        k = torch.softmax(self.c1(H_in).reshape(B, 1, H * W), dim=-1)
        A_g = H_in.reshape(B, C, H * W) @ k.transpose(1, 2)
        W_g = torch.sigmoid(self.c2(F.gelu(self.ln(self.c1_int(A_g.squeeze(-1))))))
        return W_g[:, :, None, None] * H_in


def ref_forward_heads(model, js, size):
    """Eq. 12 as first written: alpha_i * p_i summed from 0."""
    p = [F.interpolate(head(j), size=size, mode='bilinear', align_corners=False) for head, j in zip(model.heads, js)]
    return sum(a * p_i for a, p_i in zip(torch.tensor(model.config.alphas, dtype=p[0].dtype), p)), p


def reference_of(model):
    """A copy of model whose HAP, ES, EH and heads run the reference code, loaded with strict state dicts."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, (HAP, ES, EH)):
            if isinstance(m, HAP):
                new = RefHAP(m.c.in_features, m.order, isinstance(m.calibration.w, nn.Parameter),
                             m.spatial is not None, m.channel is not None)
            else:
                new = RefES() if isinstance(m, ES) else RefEH(m.c1.in_channels)
            new = new.to(next(m.parameters()).dtype).train(m.training)  # the tested block's mode (BN in HAP)
            new.load_state_dict(m.state_dict(), strict=True)
            parent, _, leaf = name.rpartition('.')
            setattr(ref.get_submodule(parent), leaf, new)
    ref.forward_heads = lambda js, size: ref_forward_heads(ref, js, size)
    return ref


def randomise(model):
    """Non-trivial weights: lambda != 0, uneven calibration, every parameter moved off its initial value."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def grads_of(model, x, seed=0):
    """Outputs, input gradient and parameter gradients of one loss that weighs every output differently."""
    x = x.clone().requires_grad_()
    y, heads = model(x)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in (y, *heads))
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [y, *heads, x.grad] + [p.grad for p in model.parameters()]


HAP_VARIANTS = [dict(order=o, calibration=c) for o in ('channel_first', 'spatial_first') for c in (True, False)] + [
    dict(spatial_att=False), dict(channel_att=False), dict(spatial_att=False, order='spatial_first', calibration=False),
    dict(channel_att=False, order='spatial_first', calibration=False)]


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('variant', HAP_VARIANTS, ids=str)
def test_batched_hap_equals_the_per_branch_hap(variant, channels_last):
    ref = RefHAP(16, **variant).double().train()
    randomise(ref)
    hap = HAP(16, **variant).double().train()
    hap.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 16, 6, 7, dtype=torch.float64)
    if channels_last:
        hap, x = hap.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    outs = []
    for block in (hap, ref):
        xi = x.clone().requires_grad_()
        y = block(xi)
        (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape).sin()).sum().backward()
        outs.append([y, xi.grad] + [p.grad for p in block.parameters()])
    assert len(outs[0]) == len(outs[1]) == 2 + len(list(ref.parameters()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not channels_last or outs[0][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('channels_last', [False, True])
def test_es_eh_equal_the_reference(channels_last):
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    es, eh = randomise(ES().double()), randomise(EH(8).double())
    ref_es, ref_eh = RefES().double(), RefEH(8).double()
    ref_es.load_state_dict(es.state_dict(), strict=True)
    ref_eh.load_state_dict(eh.state_dict(), strict=True)
    for new, ref in ((es, ref_es), (eh, ref_eh)):
        out = new(x)
        torch.testing.assert_close(out, ref(x), rtol=1e-10, atol=1e-12)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_danie_s_equals_the_reference_model():
    # 64x64, not 32: at 32 the deepest BN sees 2 values per channel and amplifies rounding without bound
    torch.manual_seed(0)
    model = randomise(danie('S', num_classes=3, img_size=64).double().train())
    ref = reference_of(model)
    assert sum(isinstance(m, RefHAP) for m in ref.modules()) == sum(model.config.depths)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    new_out, ref_out = grads_of(model, x), grads_of(ref, x)  # train mode: BN uses batch statistics in both
    assert len(new_out) == len(ref_out) == 6 + len(list(model.parameters()))
    for a, b in zip(new_out[:5], ref_out[:5]):  # y and the four heads
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    scale = max(g.abs().max() for g in ref_out[5:])  # biases before BN have gradients of pure rounding noise
    for a, b in zip(new_out[5:], ref_out[5:]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * scale)
    model.eval()  # and in eval mode (BN's running statistics), the reference built in that mode too
    ref = reference_of(model)
    assert not any(m.training for m in ref.modules())
    with torch.no_grad():
        for a, b in zip(model(x)[1], ref(x)[1]):  # float64 values up to ~1e4: rounding at 1e-10 relative
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * b.abs().max().item())


def test_channels_last_model_computes_the_same_and_stays_channels_last():
    torch.manual_seed(0)
    model = tiny(img_size=64).eval()  # eval: batch statistics of tiny maps would amplify rounding
    with torch.no_grad():
        for jp in model.jp:
            jp.es.lam.fill_(0.1)  # let ES act
    x = torch.randn(2, 3, 64, 64)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    layouts = []
    hooks = [m.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last)))
             for m in cl_model.modules() if isinstance(m, (HAP, ES, EH, ConvBlock))]
    y_cl, heads_cl = cl_model(x.contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    y, heads = model(x)
    assert layouts and all(layouts)
    torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-4 * y.abs().max().item())


def test_eq12_with_other_alphas_equals_the_reference():
    torch.manual_seed(0)
    model = tiny(img_size=64).eval()
    model.config = make_config('S', num_classes=3, img_size=64, alphas=(0.5, 1.0, 2.0, 0.25), **TINY)
    js = [torch.randn(2, c, 64 // r, 64 // r) for c, r in zip(model.config.dims, (4, 8, 16, 32))]
    y, p = model.forward_heads(js, (64, 64))
    y_ref, p_ref = ref_forward_heads(model, js, (64, 64))
    torch.testing.assert_close(y, y_ref)
    assert all(torch.equal(a, b) for a, b in zip(p, p_ref))


@pytest.mark.parametrize('channels_last', [False, True])
def test_es_gradients_equal_the_reference_where_the_softmax_is_soft(channels_last):
    # small features: energies of order 0.1, so W_c is far from one-hot and every weight carries gradient
    x = 0.05 * torch.randn(2, 8, 5, 6, dtype=torch.float64)
    S = x.flatten(2)
    assert torch.softmax(S @ S.transpose(1, 2), dim=1).max() < 0.5  # not saturated
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    es = randomise(ES().double())
    ref = RefES().double()
    ref.load_state_dict(es.state_dict(), strict=True)
    grads = []
    for block in (es, ref):
        xi = x.clone().requires_grad_()
        y = block(xi)
        (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape).cos()).sum().backward()
        grads.append((y, xi.grad, block.lam.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert grads[0][2].abs().item() > 1e-3  # lambda learns


def test_unreadable_weight_files_are_named_without_torchs_advice(tmp_path):
    import types
    import model
    rng = __import__('numpy').random.default_rng(0)
    for seed in range(4):  # random bytes fail in several ways inside torch.load: one reason for all
        (tmp_path / 'random.pth').write_bytes(rng.bytes(4000))
        for load in (model.read_state_dict, model.load_checkpoint):
            with pytest.raises((PretrainedError, model.CheckpointError)) as e:
                load(str(tmp_path / 'random.pth'))
            msg = str(e.value)
            assert msg.endswith('(corrupt, or not a file torch.save wrote)') and 'weights_only' not in msg, msg
            assert 'Python objects' not in msg and len(msg.splitlines()) == 1
    torch.save({'w': torch.zeros(2)}, tmp_path / 'bad_pickle.pth')
    blob = bytearray((tmp_path / 'bad_pickle.pth').read_bytes())
    start = blob.find(b'\x80\x02')  # the pickle inside torch's zip: bytes no unpickler knows
    blob[start + 2:start + 5] = b'\xff\xfe\xfd'
    (tmp_path / 'bad_pickle.pth').write_bytes(blob)
    with pytest.raises(PretrainedError, match=r'\(corrupt, or not a file torch.save wrote\)$'):
        model.read_state_dict(str(tmp_path / 'bad_pickle.pth'))
    torch.save({'a': types.SimpleNamespace(x=1)}, tmp_path / 'objects.pth')  # a real pickle of an object
    with pytest.raises(PretrainedError, match=r'holds Python objects \(types.SimpleNamespace\), not only tens'):
        model.read_state_dict(str(tmp_path / 'objects.pth'))
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(model.CheckpointError, match=r'empty.pth: not a readable PyTorch checkpoint \(an empty file\)'):
        model.load_checkpoint(tmp_path / 'empty.pth')
