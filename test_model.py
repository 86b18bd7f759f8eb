"""Tests of the DANIE network (attention.py, model.py): shapes, equations, ablations, GMAC, weight loading.
CPU, offline; full-size shape and GMAC checks run on the meta device, which needs no memory or time."""

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import EH, ES, HAP, ChannelAttention, ConvBlock, SpatialAttention
from model import FUSIONS, PAPER_GMAC, DANIE, JointPreservation, PretrainedError, danie, gmac, make_config

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


def test_attention_maps_have_the_papers_shapes():
    x = torch.randn(2, 32, 7, 7)
    for pool in ('max', 'avg'):
        assert ChannelAttention(32)(x, pool).shape == (2, 32, 1, 1)  # A^c in R^{C x 1 x 1}, one per image
        assert SpatialAttention()(x, pool).shape == (2, 1, 7, 7)  # A^s in R^{1 x H x W}
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
    for name, content in (('tensor.pth', torch.zeros(3)), ('list.pth', [torch.zeros(3)])):  # readable, no dict
        torch.save(content, tmp_path / name)
        with pytest.raises(PretrainedError, match=f"'{tmp_path / name}' holds no state dict of tensors$"):
            model.read_state_dict(str(tmp_path / name))
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'state_dict_ema': {'w': torch.ones(1)}}, tmp_path / 'ema.pth')
    assert model.read_state_dict(str(tmp_path / 'ema.pth'))['w'].item() == 0  # the trained weights, not the EMA

# ---- the state-dict layout: checkpoints written by any version of these blocks keep loading

# one HAP block and one EH at C = 64, key by key; the whole model by count, prefix and a hash of 'key:shape' lines
BN_64 = ('1.weight:(64,)', '1.bias:(64,)', '1.running_mean:(64,)', '1.running_var:(64,)', '1.num_batches_tracked:()')
HAP_KEYS_64 = ['channel.mlp.0.weight:(4, 64)', 'channel.mlp.0.bias:(4,)', 'channel.mlp.2.weight:(64, 4)',
               'channel.mlp.2.bias:(64,)', 'spatial.conv.weight:(1, 1, 1, 1)', 'spatial.conv.bias:(1,)',
               'calibration.w:(2,)', 'c.weight:(64, 64)', 'c.bias:(64,)'] + [
    f'block.{i}.{k}' for i in (0, 1) for k in ('0.weight:(64, 64, 3, 3)', *BN_64)]
EH_KEYS_64 = ['c1.weight:(1, 64, 1, 1)', 'c1.bias:(1,)', 'c1_int.weight:(16, 64)', 'c1_int.bias:(16,)',
              'ln.weight:(16,)', 'ln.bias:(16,)', 'c2.weight:(64, 16)', 'c2.bias:(64,)']
OURS = {'hap.embed': 24, 'hap.stages': 249, 'jp.0': 27, 'jp.1': 27, 'jp.2': 27, 'jp.3': 21, 'heads.0': 2,
        'heads.1': 2, 'heads.2': 2, 'heads.3': 2, 'sap.stem': 9, 'sap.stages_1': 100, 'sap.stages_2': 247,
        'sap.stages_3': 100}
STATE_DICTS = {'S': (937, dict(OURS, **{'sap.stages_0': 98}), '26983f242b24c4dc'),
               'L': (939, dict(OURS, **{'sap.stages_0': 100}), '69a44b3e16713a84')}


def key_lines(module):
    return [f'{k}:{tuple(v.shape)}' for k, v in module.state_dict().items()]


@pytest.mark.parametrize('size', ['S', 'L'])
def test_state_dict_keys_and_shapes_are_pinned(size):
    import collections
    import hashlib
    assert key_lines(HAP(64)) == HAP_KEYS_64 and key_lines(EH(64)) == EH_KEYS_64 and key_lines(ES()) == ['lam:(1,)']
    lines = sorted(key_lines(meta_danie(size)))
    prefixes = dict(collections.Counter('.'.join(line.split(':')[0].split('.')[:2]) for line in lines))
    count, want_prefixes, digest = STATE_DICTS[size]
    diff = {k: (prefixes.get(k), want_prefixes.get(k)) for k in {*prefixes, *want_prefixes}
            if prefixes.get(k) != want_prefixes.get(k)}
    assert not diff, f'keys per prefix (now, pinned): {diff}'
    assert len(lines) == count
    assert hashlib.sha256('\n'.join(lines).encode()).hexdigest()[:16] == digest, 'same counts, other names or shapes'


# ---- the paper's equations, one test each: the module against float64 formulas written from the text
# Each reference reads only the module's weights; its steps are plain torch ops, in the paper's symbols.


def randomise(module):
    """Non-trivial float64 weights: every parameter moved off its initial value (lambda != 0, w_max != w_avg)."""
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


def check_with_grads(got, want, inputs, params, rtol=1e-10, atol=1e-12):
    """got == want, and so are their gradients of one loss that weighs every element differently."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=got.dtype)
    wrt = [*inputs, *params]
    for a, b in zip(torch.autograd.grad((got * weight).sum(), wrt, retain_graph=True, allow_unused=True),
                    torch.autograd.grad((want * weight).sum(), wrt, retain_graph=True, allow_unused=True)):
        assert b is not None
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def x64(*shape, seed=0, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            ).requires_grad_()


def captured(module, fn):
    """(the inputs of module's first call, its output) while fn() runs."""
    seen = []
    hook = module.register_forward_hook(lambda m, i, o: seen.append((i, o)))
    try:
        fn()
    finally:
        hook.remove()
    return seen[0]


def ref_A_c(hap, x, pool):
    """sigma(MLP(P^s(x))): P^s max or mean over H x W, MLP = W_1 ReLU(W_0 p + b_0) + b_1 (Eq. 2)."""
    p = x.amax(dim=(2, 3)) if pool == 'max' else x.mean(dim=(2, 3))  # (B,C)
    l0, l1 = hap.channel.mlp[0], hap.channel.mlp[2]
    z = torch.relu(p @ l0.weight.T + l0.bias) @ l1.weight.T + l1.bias
    return torch.sigmoid(z)[:, :, None, None]  # (B,C,1,1)


def ref_A_s(hap, x, pool):
    """sigma(Conv(P^c(x))): P^c max or mean over channels, Conv a 1x1 conv of one channel (Eq. 3)."""
    p = x.amax(dim=1, keepdim=True) if pool == 'max' else x.mean(dim=1, keepdim=True)  # (B,1,H,W)
    return torch.sigmoid(hap.spatial.conv.weight.view(()) * p + hap.spatial.conv.bias)


def ref_O(hap, h, pool):
    """m = A^c * h (Eq. 2), O = A^s * m (Eq. 3); spatial first swaps them; a switched-off attention is skipped."""
    steps = [(hap.channel, ref_A_c), (hap.spatial, ref_A_s)]
    x = h
    for module, A in (steps if hap.order == 'channel_first' else steps[::-1]):
        if module is not None:
            x = A(hap, x, pool) * x
    return x


def ref_conv_bn_gelu(unit, x):
    """3x3 conv, batch normalisation with the batch's statistics (train mode), GELU."""
    conv, bn = unit[0], unit[1]
    z = F.conv2d(x, conv.weight, stride=conv.stride, padding=1)
    mean, var = z.mean(dim=(0, 2, 3), keepdim=True), z.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    z = (z - mean) / torch.sqrt(var + bn.eps) * bn.weight[:, None, None] + bn.bias[:, None, None]
    return 0.5 * z * (1 + torch.erf(z / 2 ** 0.5))


def ref_conv_block(block, x):
    """ConvBlock: two 3x3 conv + BN + GELU (below Eq. 11)."""
    return ref_conv_bn_gelu(block[1], ref_conv_bn_gelu(block[0], x))


def ref_es(es, S_in):
    """es_j = lambda sum_i w_ij S_3,i + S_in,j, w_ij = exp(S_1,i . S_2,j) / sum_i exp(S_1,i . S_2,j) (Eq. 6-7)."""
    B, C, H, W = S_in.shape
    S1 = S_in.reshape(B, C, H * W)
    energy = torch.einsum('bin,bjn->bij', S1, S1)  # S_1,i . S_2,j
    e = torch.exp(energy - energy.amax(dim=1, keepdim=True))  # the same ratio, without overflow
    w = e / e.sum(dim=1, keepdim=True)  # Eq. 6: normalised over i
    out = es.lam * torch.einsum('bij,bin->bjn', w, S1) + S1  # Eq. 7, DANet's reading (S_3,i)
    return out.reshape(B, C, H, W)


def ref_A_g(eh, H_in):
    """A_g = psi(F_r1(c1 * H_in)) x F_r2(H_in): softmax over the H x W positions, then a weighted sum (Eq. 8)."""
    B, C = H_in.shape[:2]
    logits = torch.einsum('bchw,c->bhw', H_in, eh.c1.weight.view(C)) + eh.c1.bias  # c1 *: (B,H,W)
    k = torch.exp(logits.flatten(1)) / torch.exp(logits.flatten(1)).sum(dim=1, keepdim=True)  # psi over N
    return torch.einsum('bcn,bn->bc', H_in.flatten(2), k)  # (B,C)


def ref_eh(eh, H_in):
    """eh = sigma(c2 * GELU(LN(c1 * A_g))) * H_in (Eq. 9); LN over the C/4 bottleneck with its affine."""
    z = ref_A_g(eh, H_in) @ eh.c1_int.weight.T + eh.c1_int.bias
    z = (z - z.mean(dim=1, keepdim=True)) / torch.sqrt(z.var(dim=1, unbiased=False, keepdim=True) + eh.ln.eps)
    z = z * eh.ln.weight + eh.ln.bias
    z = 0.5 * z * (1 + torch.erf(z / 2 ** 0.5))
    W_g = torch.sigmoid(z @ eh.c2.weight.T + eh.c2.bias)
    return W_g[:, :, None, None] * H_in


@pytest.mark.parametrize('order', ['channel_first', 'spatial_first'])
def test_eq2_channel_attention(order):
    hap = randomise(HAP(16, order=order, spatial_att=False))  # Table 5 A.3: the branches end at m of Eq. 2
    h = x64(2, 16, 5, 6)
    (m_max, m_avg), _ = captured(hap.calibration, lambda: hap(h))
    params = list(hap.channel.parameters())
    check_with_grads(m_max, ref_A_c(hap, h, 'max') * h, [h], params)
    check_with_grads(m_avg, ref_A_c(hap, h, 'avg') * h, [h], params)


@pytest.mark.parametrize('order', ['channel_first', 'spatial_first'])
@pytest.mark.parametrize('channel_att', [True, False])
def test_eq3_spatial_attention_on_m(order, channel_att):
    hap = randomise(HAP(16, order=order, channel_att=channel_att))
    h = x64(2, 16, 5, 6)
    (O_max, O_avg), _ = captured(hap.calibration, lambda: hap(h))
    if channel_att:  # O = A^s(m) * m, m from Eq. 2 (or the other order)
        want_max, want_avg = ref_O(hap, h, 'max'), ref_O(hap, h, 'avg')
    else:  # Table 5 A.4: O = A^s(h) * h
        want_max, want_avg = ref_A_s(hap, h, 'max') * h, ref_A_s(hap, h, 'avg') * h
    params = [p for m in (hap.channel, hap.spatial) if m is not None for p in m.parameters()]
    check_with_grads(O_max, want_max, [h], params)
    check_with_grads(O_avg, want_avg, [h], params)


@pytest.mark.parametrize('calibration', [True, False])
def test_eq4_dynamic_calibration(calibration):
    hap = randomise(HAP(16, calibration=calibration))
    if not calibration:  # Table 6 'Dcal off': the fixed average
        assert hap.calibration.w.tolist() == [0.5, 0.5] and not hap.calibration.w.requires_grad
    h = x64(2, 16, 5, 6)
    _, O_d = captured(hap.calibration, lambda: hap(h))
    w_max, w_avg = hap.calibration.w
    params = [*hap.channel.parameters(), *hap.spatial.parameters(), *([hap.calibration.w] if calibration else [])]
    check_with_grads(O_d, w_max * ref_O(hap, h, 'max') + w_avg * ref_O(hap, h, 'avg'), [h], params)


@pytest.mark.parametrize('variant', [dict(), dict(order='spatial_first', calibration=False)], ids=str)
def test_eq5_hap_output(variant):
    hap = randomise(HAP(16, **variant)).train()
    h = x64(2, 16, 5, 6)
    w_max, w_avg = hap.calibration.w
    O_d = w_max * ref_O(hap, h, 'max') + w_avg * ref_O(hap, h, 'avg')
    A_d = torch.sigmoid(O_d.mean(dim=(2, 3)) @ hap.c.weight.T + hap.c.bias)  # sigma(c* O_d), O_d pooled to C x 1 x 1
    want = ref_conv_block(hap.block, A_d[:, :, None, None] * h)  # Eq. 5
    check_with_grads(hap(h), want, [h], [p for p in hap.parameters() if p.requires_grad], rtol=1e-9, atol=1e-10)


def test_eq6_softmax_over_i():
    # small features: energies of order 0.1, so the weights are far from one-hot and the axis of Eq. 6 shows
    es = ES().double()
    with torch.no_grad():
        es.lam.fill_(1.0)
    S_in = x64(2, 8, 5, 6, scale=0.05)
    S = S_in.detach().flatten(2)
    w = torch.softmax(S @ S.transpose(1, 2), dim=1)
    assert w.max() < 0.5 and not torch.allclose(w, w.transpose(1, 2).softmax(dim=1))  # soft, and not symmetric
    check_with_grads(es(S_in), ref_es(es, S_in), [S_in], [])


def test_eq7_lambda_and_residual():
    es = ES().double()
    S_in = x64(2, 8, 5, 6)
    torch.testing.assert_close(es(S_in), S_in)  # lambda learns from 0: ES starts as the identity
    with torch.no_grad():
        es.lam.fill_(0.7)
    check_with_grads(es(S_in), ref_es(es, S_in), [S_in], [es.lam])
    with torch.autocast('cpu', dtype=torch.bfloat16):  # the fp32 guard: energies beyond bf16's precision
        assert es.float()(S_in.detach().float()).dtype == torch.float32


def test_eq8_context_modelling():
    eh = randomise(EH(16))
    H_in = x64(2, 16, 5, 6)
    (A_g,), _ = captured(eh.c1_int, lambda: eh(H_in))  # c1_int reads A_g, C x 1 x 1 per image
    check_with_grads(A_g, ref_A_g(eh, H_in), [H_in], list(eh.c1.parameters()))


def test_eq9_context_integration():
    eh = randomise(EH(16))
    H_in = x64(2, 16, 5, 6)
    check_with_grads(eh(H_in), ref_eh(eh, H_in), [H_in], list(eh.parameters()))


def test_eq10_aggregation():
    jp = randomise(JointPreservation(16, None))
    s, h = x64(2, 16, 4, 4, seed=1), x64(2, 16, 4, 4, seed=2)
    check_with_grads(jp.fuse(s, h), ref_es(jp.es, s) + ref_eh(jp.eh, h), [s, h],
                     [*jp.es.parameters(), *jp.eh.parameters()])


@pytest.mark.parametrize('deepest', [True, False])
def test_eq11_decoding_stage(deepest):
    jp = randomise(JointPreservation(16, None if deepest else 32)).train()
    s, h, j = x64(2, 16, 4, 4, seed=1), x64(2, 16, 4, 4, seed=2), x64(2, 32, 2, 2, seed=3)
    e = ref_es(jp.es, s) + ref_eh(jp.eh, h)  # Eq. 10
    if deepest:  # j_4 = ConvBlock(e_4)
        got, want, inputs = jp(s, h), ref_conv_block(jp.block, e), [s, h]
    else:  # j_i = ConvBlock(Cat[e_i, up(j_{i+1})]), up = bilinear x2 then 3x3 conv + BN + GELU
        u = ref_conv_bn_gelu(jp.up, F.interpolate(j, scale_factor=2, mode='bilinear', align_corners=False))
        got, want, inputs = jp(s, h, j), ref_conv_block(jp.block, torch.cat([e, u], dim=1)), [s, h, j]
    check_with_grads(got, want, inputs, list(jp.parameters()), rtol=1e-9, atol=1e-10)


def test_eq12_weighted_sum_of_the_heads():
    model = tiny(img_size=64).double()
    model.config = make_config('S', num_classes=3, img_size=64, alphas=(0.5, 1.0, 2.0, 0.25), **TINY)
    js = [x64(2, c, 64 // r, 64 // r, seed=r) for c, r in zip(model.config.dims, (4, 8, 16, 32))]
    y, p = model.forward_heads(js, (64, 64))
    want_p = [F.interpolate(F.conv2d(j, head.weight, head.bias), size=(64, 64), mode='bilinear',
                            align_corners=False) for head, j in zip(model.heads, js)]
    for got, want in zip(p, want_p):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    want_y = 0.5 * want_p[0] + 1.0 * want_p[1] + 2.0 * want_p[2] + 0.25 * want_p[3]  # Eq. 12
    check_with_grads(y, want_y, js, list(model.heads.parameters()))


def ref_dice(logits, target, k, smooth=1e-5):
    """TransUNet's utils.DiceLoss, written out: softmax, one-hot, and per class (2 I + s) / (Z + Y + s) over the
    batch, squared terms, averaged over the k classes with background."""
    prob = torch.softmax(logits, dim=1)
    loss = 0
    for i in range(k):
        p, t = prob[:, i], (target == i).to(prob.dtype)
        loss = loss + 1 - (2 * (p * t).sum() + smooth) / ((p * p).sum() + (t * t).sum() + smooth)
    return loss / k


def ref_criterion(y, heads, target, mode, k):
    eq13 = lambda z: 0.7 * ref_dice(z, target, k) + 0.3 * F.cross_entropy(z, target)  # noqa: E731
    if mode == 'final':
        return eq13(y)
    if mode == 'deep':
        return sum(eq13(p) for p in heads) + eq13(y)
    subsets = [[p for m, p in enumerate(heads) if s >> m & 1] for s in range(1, 16)]  # bit m of s: head m is in
    return sum(eq13(sum(ps)) for ps in subsets)


@pytest.mark.parametrize('mode', ['final', 'deep', 'mutation'])
def test_eq13_loss(mode):
    import train
    g = torch.Generator().manual_seed(0)
    heads = [torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    y = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 5), generator=g)
    ours, ref = train.criterion(y, heads, target, mode, 3), ref_criterion(y, heads, target, mode, 3)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    got, want = (torch.autograd.grad(v, [y, *heads], allow_unused=True) for v in (ours, ref))
    for a, b in zip(got, want):
        if b is None:  # y takes no part in 'mutation'
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)
