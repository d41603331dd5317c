"""NAT / DiNAT backbones and the neighborhood-attention layer: architecture, timm API, checkpoints."""
import pytest
import timm
import torch
import torch.nn.functional as F

import foveal  # noqa: F401  (registers the models)
from foveal.layers import NeighborhoodAttention2d


def _explicit(layer: NeighborhoodAttention2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward on its explicit (TorchScript / attention-dropout) path."""
    B, H, W, C = x.shape
    window = layer.kernel_size * layer.dilation
    pad_h, pad_w = max(0, window - H), max(0, window - W)
    xp = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    q, k, v = layer.qkv(xp).reshape(B, H + pad_h, W + pad_w, 3, layer.num_heads, layer.head_dim).unbind(3)
    out = layer._explicit_attn(q, k, v).reshape(B, H + pad_h, W + pad_w, C)[:, :H, :W]
    return layer.proj(out)


@pytest.mark.parametrize("H, W, kernel_size, dilation", [
    (14, 14, 7, 1), (14, 14, 7, 2), (9, 23, 3, 3), (5, 6, 7, 2), (8, 8, 7, 8), (7, 7, 7, 1),
])
def test_layer_fused_matches_explicit(H, W, kernel_size, dilation):
    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(32, 2, kernel_size, dilation).double()
    x = torch.randn(2, H, W, 32, dtype=torch.double)
    torch.testing.assert_close(layer(x), _explicit(layer, x))


def test_nat_nano_trains_on_28x28_single_channel():
    model = timm.create_model('nat_nano')
    assert model.in_chans == 1 and model.num_classes == 10
    x = torch.randn(4, 1, 28, 28)
    out = model(x)
    assert out.shape == (4, 10)
    F.cross_entropy(out, torch.arange(4)).backward()
    assert all(p.grad is not None for p in model.parameters())
    feats = timm.create_model('nat_nano', features_only=True)(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 7, 7), (64, 4, 4), (128, 2, 2)]
