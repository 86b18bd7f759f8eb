"""Tests of the DANIE network (attention.py, model.py): shapes, equations, ablations, GMAC, weight loading.
CPU, offline; full-size shape and GMAC checks run on the meta device, which needs no memory or time."""

import pytest
import timm
import torch
import torch.nn as nn

from attention import EH, ES, HAP, ChannelAttention, ConvBlock, SpatialAttention
from model import FUSIONS, PAPER_GMAC, DANIE, PretrainedError, danie, gmac, make_config

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny tensors: more threads only add overhead, and stall badly on a loaded machine
# A narrower MaxViT (same stage layout, 4x cheaper) for the tests of wiring and switches; S and L themselves are
# built at full width for shapes, gradients, GMAC and weight loading.
TINY = dict(backbone="maxvit_rmlp_pico_rw_256", dims=(32, 64, 128, 256))


def tiny(num_classes=3, img_size=32, **switches):
    return danie("S", num_classes=num_classes, img_size=img_size, **TINY, **switches)


def meta_danie(size="S", **kw):
    with torch.device("meta"):
        return danie(size, **kw).eval()


def meta_gmac(model, img_size=224):
    with torch.device("meta"):
        return gmac(model, img_size)


# -----------------------------------------------------------------------------
# whole model


@pytest.mark.parametrize("size,img_size,num_classes", [("S", 64, 9), ("L", 64, 4)])
def test_forward_shapes_and_eq12(size, img_size, num_classes):
    model = danie(size, num_classes=num_classes, img_size=img_size).eval()
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        y, heads = model(x)
    assert y.shape == (2, num_classes, img_size, img_size)
    assert len(heads) == 4 and all(p.shape == y.shape for p in heads)
    torch.testing.assert_close(y, heads[0] + heads[1] + heads[2] + heads[3])  # Eq. 12, alpha_i = 1


@pytest.mark.parametrize("size,img_size", [("S", 128), ("S", 256), ("L", 128), ("L", 224), ("L", 256)])
def test_shapes_at_full_sizes(size, img_size):
    model = meta_danie(size, num_classes=9, img_size=img_size)
    y, heads = model(torch.empty(2, 3, img_size, img_size, device="meta"))
    assert y.shape == (2, 9, img_size, img_size) and [p.shape for p in heads] == [y.shape] * 4


def test_grayscale_input_is_repeated():
    model = tiny().eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], model(x.repeat(1, 3, 1, 1))[0])


def test_wrong_input_size_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match="built for 32x32"):
        model(torch.randn(1, 3, 64, 64))


def test_every_parameter_gets_a_gradient():
    model = danie("S", num_classes=3, img_size=32).train()
    y, heads = model(torch.randn(2, 3, 32, 32))
    (y.square().mean() + sum(p.mean() for p in heads)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    # ES starts at lambda = 0, but lambda itself must learn (Eq. 7)
    assert all(jp.es.lam.grad.abs().item() > 0 for jp in model.jp)


def test_stream_and_stage_shapes_follow_the_paper():
    cfg = make_config("S", num_classes=2, img_size=64, **TINY)
    model = DANIE(cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        s, h = model.forward_encoder(x)
        assert model.hap.embed(x).shape == (1, 32, 16, 16)  # Sec. 3.2: H/4 x W/4 x C_1
        js = model.forward_decoder(s, h)
    for i, (c, r) in enumerate(zip(cfg.dims, (4, 8, 16, 32))):
        assert s[i].shape == h[i].shape == js[i].shape == (1, c, 64 // r, 64 // r)


def test_presets_are_not_shared_or_mutated():
    a, b = make_config("S", num_classes=4), make_config("S")
    assert a.num_classes == 4 and b.num_classes == 9
    with pytest.raises(Exception):
        a.num_classes = 2  # frozen
    assert make_config("L").dims == (96, 192, 384, 768) and make_config("L").backbone == "maxvit_small_tf_224"


@pytest.mark.parametrize("bad", [dict(fusion="sum"), dict(order="random"), dict(hap=False, sap=False),
                                 dict(hap=False), dict(img_size=100), dict(num_classes=1), dict(depth=3)])
def test_bad_config_is_a_clear_error(bad):
    with pytest.raises(ValueError):
        make_config("S", **bad)


# -----------------------------------------------------------------------------
# blocks


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
    energy = torch.einsum("bin,bjn->bij", S, S)
    w = torch.softmax(energy, dim=1)  # Eq. 6: normalised over i
    expected = 0.7 * torch.einsum("bij,bin->bjn", w, S) + S  # Eq. 7: es_j = lam sum_i w_ij S3_i + S_in,j
    torch.testing.assert_close(es(x), expected.reshape_as(x))


def test_eh_matches_eq8_eq9():
    eh = EH(8).eval()
    x = torch.randn(2, 8, 4, 4)
    k = torch.softmax(eh.c1(x).flatten(1), dim=1)  # (B,N)
    A_g = torch.einsum("bcn,bn->bc", x.flatten(2), k)
    W_g = torch.sigmoid(eh.c2(nn.functional.gelu(eh.ln(eh.c1_int(A_g)))))
    torch.testing.assert_close(eh(x), W_g[:, :, None, None] * x)


def test_attention_maps_have_the_papers_shapes():
    x = torch.randn(2, 32, 7, 7)
    assert ChannelAttention(32)(x, "max").shape == (2, 32, 1, 1)  # A^c in R^{C x 1 x 1}
    assert SpatialAttention()(x, "avg").shape == (2, 1, 7, 7)  # A^s in R^{1 x H x W}
    for block in (HAP(32), HAP(32, order="spatial_first", calibration=False), ES(), EH(32)):
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
    a = HAP(16, order="channel_first").eval()
    b = HAP(16, order="spatial_first").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 16, 6, 6)
    assert not torch.allclose(a(x), b(x))


# -----------------------------------------------------------------------------
# ablations (Tables 5-7) and GMAC


ABLATIONS = {
    "A.1 no HAP": dict(hap=False, fusion="add"),
    "A.2 no SAP": dict(sap=False, fusion="add"),
    "A.3 no spatial att": dict(spatial_att=False, fusion="add"),
    "A.4 no channel att": dict(channel_att=False, fusion="add"),
    "B.1 spatial first, no Dcal": dict(order="spatial_first", calibration=False),
    "B.2 spatial first": dict(order="spatial_first"),
    "B.3 channel first, no Dcal": dict(calibration=False),
    **{f"C fusion {f}": dict(fusion=f) for f in FUSIONS},
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_ablation_builds_and_runs(name):
    model = tiny(**ABLATIONS[name]).train()
    y, heads = model(torch.randn(2, 3, 32, 32))
    (y.mean() + sum(p.mean() for p in heads)).backward()
    assert y.shape == (2, 3, 32, 32) and torch.isfinite(y).all()
    # no variant builds a module it does not use: DDP needs no find_unused_parameters
    assert all(p.grad is not None for p in model.parameters())
    assert (model.sap is None) == (ABLATIONS[name].get("sap") is False)
    assert (model.hap is None) == (ABLATIONS[name].get("hap") is False)


def test_gmac_within_3_percent_of_the_paper():
    for size in ("S", "L"):
        g = meta_gmac(meta_danie(size))
        assert abs(g / PAPER_GMAC[size] - 1) < 0.03, (size, g)


def test_cheaper_variants_cost_less():
    jp = meta_gmac(meta_danie("L"))
    assert meta_gmac(meta_danie("L", fusion="add")) < jp
    assert meta_gmac(meta_danie("L", hap=False, fusion="add")) < meta_gmac(meta_danie("L", fusion="add"))
    bare = meta_gmac(timm.create_model("maxvit_small_tf_224", features_only=True, out_indices=(1, 2, 3, 4)).to("meta"))
    assert 11.0 < bare < 12.0 and jp > 2 * bare


# -----------------------------------------------------------------------------
# pretrained weights from a local file (Sec. 4.2)


def test_local_weights_file_loads(tmp_path, capsys):
    src = timm.create_model("maxvit_tiny_tf_224")  # a random stand-in for timm's ImageNet file, at 224
    path = tmp_path / "maxvit_tiny_tf_224.pth"
    torch.save(src.state_dict(), path)
    model = danie("S", num_classes=2, img_size=64, pretrained_file=str(path))  # rel-pos tables resized to 64
    got = model.sap.state_dict()
    torch.testing.assert_close(got["stem.conv1.weight"], src.state_dict()["stem.conv1.weight"])
    torch.testing.assert_close(got["stages_2.blocks.3.conv.conv2_kxk.weight"],
                               src.state_dict()["stages.2.blocks.3.conv.conv2_kxk.weight"])
    assert "head.*" in capsys.readouterr().out  # the ignored classifier is reported


def test_wrong_weights_files_give_clear_errors(tmp_path):
    other = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), other)
    with pytest.raises(PretrainedError, match="not a maxvit_tiny_tf_224 checkpoint"):
        danie("S", num_classes=2, img_size=32, pretrained_file=str(other))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedError, match="cannot read"):
        danie("S", num_classes=2, img_size=32, pretrained_file=str(garbage))
    with pytest.raises(PretrainedError, match="does not exist"):
        danie("S", num_classes=2, img_size=32, pretrained_file=str(tmp_path / "missing.pth"))


def test_maxvit_of_the_other_size_is_refused(tmp_path):
    with torch.device("meta"):  # shapes are all that matter here: a small file standing in for MaxViT-S
        small = timm.create_model("maxvit_small_tf_224").state_dict()
    path = tmp_path / "maxvit_small_tf_224.pth"
    torch.save(small, path)
    with pytest.raises(PretrainedError, match="DANIE-S needs maxvit_tiny_tf_224"):
        danie("S", num_classes=2, img_size=32, pretrained_file=str(path))


def test_data_normalisation_matches_the_backbones_pretrained_config():
    import data  # data.py repeats the constants because it does not import model.py
    for size in ("S", "L"):
        cfg = timm.get_pretrained_cfg(make_config(size).backbone).to_dict()
        assert tuple(cfg["mean"]) == data.MEAN and tuple(cfg["std"]) == data.STD
