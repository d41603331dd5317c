"""HaloNet H0-H7 on the fused halo-attention op.

Paper: `Scaling Local Self-Attention for Parameter Efficient Visual Backbones` (Vaswani et al., CVPR
2021) - https://arxiv.org/abs/2103.12731

There is no official code and no official weights for the H family. The models are timm
``ByobNet`` networks (the model class of timm's own HaloNets, with its whole API: features_only,
``forward_intermediates``, ``prune_intermediate_layers``, grad checkpointing, ...) built the way
timm builds its untrained ``halonet_h1``: a 7x7 stem with max-pool, then four stages of halo
bottleneck blocks (1x1 conv, :class:`foveal.layers.HaloAttention2d`, 1x1 conv) of depth 3, 3, l3,
3, with an optional final 1x1 conv of ``df`` features. Block and halo sizes, l3, df and the image
sizes follow the SPEC section 2 table (a third-party transcription of the paper's table);
the stage widths are not transcribed there, so they are chosen per model to give the table's
parameter count (checkpoints.md lists both). The paper's value multiplier ``rv`` is not modelled:
values have the width of the block, as in timm's layer.

Names carry ``_paper`` so they never collide with timm's ``halonet_h1``.
"""
from typing import Any, Dict, Sequence

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_module
from timm.models.byobnet import ByoBlockCfg, ByoModelCfg, ByobNet

from foveal.layers.halo import HaloAttention2d

__all__ = []  # the model class is timm's ByobNet

register_notrace_module(HaloAttention2d)


def _halo_cfg(widths: Sequence[int], depth3: int, block_size: int, halo_size: int, num_features: int = 0,
              stem_chs: int = 64) -> ByoModelCfg:
    blocks = tuple(
        ByoBlockCfg(type='self_attn', d=d, c=c, s=1 if i == 0 else 2, gs=0, br=1.0)
        for i, (d, c) in enumerate(zip((3, 3, depth3, 3), widths))
    )
    return ByoModelCfg(
        blocks=blocks,
        stem_chs=stem_chs,
        stem_type='7x7',
        stem_pool='maxpool',
        num_features=num_features,
        self_attn_layer=HaloAttention2d,
        self_attn_kwargs=dict(block_size=block_size, halo_size=halo_size),
    )


# name: (stage widths, l3, block, halo, df); widths fitted to the SPEC parameter counts
model_cfgs = dict(
    halonet_paper_h0=_halo_cfg((64, 112, 224, 448), 7, 8, 3),
    halonet_paper_h1=_halo_cfg((64, 128, 256, 512), 10, 8, 3),
    halonet_paper_h2=_halo_cfg((64, 128, 272, 544), 11, 8, 3),
    halonet_paper_h3=_halo_cfg((64, 144, 288, 560), 12, 10, 3, 1024),
    halonet_paper_h4=_halo_cfg((96, 176, 368, 736), 12, 12, 2, 1280),
    halonet_paper_h5=_halo_cfg((96, 192, 400, 768), 23, 14, 2, 1536),
    halonet_paper_h6=_halo_cfg((112, 240, 464, 944), 24, 8, 4, 1536),
    halonet_paper_h7=_halo_cfg((144, 288, 576, 1120), 26, 10, 3, 2048),
    # CI-sized variant: the same blocks, narrow and shallow, block 4
    test_halonet_paper=_halo_cfg((16, 32, 32, 64), 1, 4, 1, stem_chs=16),
)


def _create_halonet(variant: str, pretrained: bool = False, **kwargs) -> ByobNet:
    return build_model_with_cfg(
        ByobNet, variant, pretrained,
        model_cfg=model_cfgs[variant],
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


def _cfg(size: int, block_size: int, **kwargs) -> Dict[str, Any]:
    # the last stage (stride 32) must be a whole number of blocks: the smallest input is 32 * block
    pool = size // 32
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, size, size), 'pool_size': (pool, pool),
        'min_input_size': (3, 32 * block_size, 32 * block_size), 'crop_pct': 0.95, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD, 'first_conv': 'stem.conv1.conv', 'classifier': 'head.fc',
        'license': 'apache-2.0', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'halonet_paper_h0.untrained': _cfg(256, 8),
    'halonet_paper_h1.untrained': _cfg(256, 8),
    'halonet_paper_h2.untrained': _cfg(256, 8),
    'halonet_paper_h3.untrained': _cfg(320, 10),
    'halonet_paper_h4.untrained': _cfg(384, 12),
    'halonet_paper_h5.untrained': _cfg(448, 14),
    'halonet_paper_h6.untrained': _cfg(512, 8),
    # the paper trains H7 at 600 px; 640 is the nearest size whose stride-32 map is whole blocks of 10
    'halonet_paper_h7.untrained': _cfg(640, 10),
    'test_halonet_paper.untrained': _cfg(128, 4),
})


@register_model
def halonet_paper_h0(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H0 @ 256 (block 8, halo 3); untrained."""
    return _create_halonet('halonet_paper_h0', pretrained=pretrained, **kwargs)


@register_model
def halonet_paper_h1(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H1 @ 256 (block 8, halo 3); the layout of timm's ``halonet_h1``; untrained."""
    return _create_halonet('halonet_paper_h1', pretrained=pretrained, **kwargs)


@register_model
def halonet_paper_h2(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H2 @ 256 (block 8, halo 3); untrained."""
    return _create_halonet('halonet_paper_h2', pretrained=pretrained, **kwargs)


@register_model
def halonet_paper_h3(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H3 @ 320 (block 10, halo 3, df 1024); untrained."""
    return _create_halonet('halonet_paper_h3', pretrained=pretrained, **kwargs)


@register_model
def halonet_paper_h4(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H4 @ 384 (block 12, halo 2, df 1280); untrained."""
    return _create_halonet('halonet_paper_h4', pretrained=pretrained, **kwargs)


@register_model
def halonet_paper_h5(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H5 @ 448 (block 14, halo 2, df 1536); untrained."""
    return _create_halonet('halonet_paper_h5', pretrained=pretrained, **kwargs)


@register_model
def halonet_paper_h6(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H6 @ 512 (block 8, halo 4, df 1536); untrained."""
    return _create_halonet('halonet_paper_h6', pretrained=pretrained, **kwargs)


@register_model
def halonet_paper_h7(pretrained: bool = False, **kwargs) -> ByobNet:
    """HaloNet-H7 @ 640 (block 10, halo 3, df 2048; the paper: 600); untrained."""
    return _create_halonet('halonet_paper_h7', pretrained=pretrained, **kwargs)


@register_model
def test_halonet_paper(pretrained: bool = False, **kwargs) -> ByobNet:
    """Tiny H-family layout for tests @ 128 (block 4, halo 1); untrained."""
    return _create_halonet('test_halonet_paper', pretrained=pretrained, **kwargs)
