"""The hybrid network: shapes, deep supervision, position embeddings, patch-size errors."""
import pytest
import torch

from nnunet_hyspark.methods.hyspark.encoder import HybridEncoder
from nnunet_hyspark.layers.pos_embed import sincos_3d
from nnunet_hyspark.methods.hyspark.network import HySparKUNet

TINY = dict(widths=(8, 16, 16, 24, 24), depths=(1, 1, 1, 1, 1), expansions=(2, 2, 2, 2, 2), vit_depth=1,
            vit_heads=2)


@pytest.mark.parametrize("shape", [(32, 32, 32), (16, 48, 32), (64, 16, 32)])
@pytest.mark.parametrize("channels,classes", [(1, 4), (3, 2)])
def test_unet_shapes_and_deep_supervision(shape, channels, classes):
    net = HySparKUNet(channels, classes, patch_size=shape, **TINY)
    x = torch.randn(2, channels, *shape)
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 4
    for i, o in enumerate(outs):  # largest first: 1, 1/2, 1/4, 1/8
        assert o.shape == (2, classes, *(s >> i for s in shape))
    net.decoder.deep_supervision = False
    out = net(x)
    assert torch.is_tensor(out) and out.shape == (2, classes, *shape)
    assert torch.allclose(out, outs[0], atol=1e-5)


def test_encoder_returns_five_skip_maps():
    enc = HybridEncoder(1, **TINY)
    feats = enc(torch.randn(1, 1, 32, 48, 16))
    widths = [16, 16, 24, 24, 24]  # x1..x4 have widths w1..w4, x5 has w4
    for s, (f, c) in enumerate(zip(feats, widths)):
        assert f.shape == (1, c, 32 >> s, 48 >> s, 16 >> s)


def test_default_encoder_matches_the_published_size():
    enc = HybridEncoder(1)
    n = sum(p.numel() for p in enc.parameters())
    # the published 11.9 M include the fixed (1, 216, 384) position embedding and the
    # (1, 1, 384) ViT mask token, which this project does not store
    assert abs(n + 216 * 384 + 384 - 11.9e6) < 0.05e6
    assert len(enc.state_dict()) == 120  # 122 published tensors minus pos_embed and mask_token


def test_patch_not_multiple_of_16_names_the_axis():
    with pytest.raises(ValueError, match=r"axis 1 \(y\) = 40 is not a multiple of 16"):
        HySparKUNet(1, 2, patch_size=(32, 40, 32), **TINY)
    with pytest.raises(ValueError, match="axis 2"):
        HybridEncoder(1, **TINY)(torch.randn(1, 1, 32, 32, 24))


def test_position_embedding_is_fixed_rebuilt_per_grid_and_not_stored():
    enc = HybridEncoder(1, **TINY)
    assert not any("pos" in k for k in enc.state_dict())
    a = enc.pos_embed((2, 3, 4), torch.device("cpu"), torch.float32)
    b = enc.pos_embed((4, 4, 4), torch.device("cpu"), torch.float32)
    assert a.shape == (1, 24, 24) and b.shape == (1, 64, 24)
    assert torch.allclose(a[0], sincos_3d(24, (2, 3, 4)))
    # layout [sin h, cos h, sin w, cos w, sin d, cos d]; token (h, w, d) = (1, 2, 3) is row-major index 1*12+2*4+3
    tok = a[0, 1 * 12 + 2 * 4 + 3]
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    expected = torch.cat([torch.sin(1 * omega), torch.cos(1 * omega), torch.sin(2 * omega), torch.cos(2 * omega),
                          torch.sin(3 * omega), torch.cos(3 * omega)]).float()
    assert torch.allclose(tok, expected, atol=1e-6)
    # the same network runs on another patch size with its embedding rebuilt
    net = HySparKUNet(1, 2, patch_size=(32, 32, 32), **TINY)
    net.decoder.deep_supervision = False
    assert net(torch.randn(1, 1, 48, 32, 64)).shape == (1, 2, 48, 32, 64)


def test_nnunet_builds_the_network_from_plan_arguments():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    net = get_network_from_plans("nnunet_hyspark.models.unet.HySparKUNet",
                                 {"patch_size": [32, 32, 32], **TINY,
                                  "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]},
                                 [], 1, 3, deep_supervision=True)
    assert isinstance(net, HySparKUNet) and net.decoder.deep_supervision
