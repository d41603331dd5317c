""" BiFormer: vision transformers with bi-level routing attention

A PyTorch impl of:
* `BiFormer: Vision Transformer with Bi-Level Routing Attention` - https://arxiv.org/abs/2303.08810

Architecture, variants and checkpoint layout follow the authors' code (https://github.com/rayleizhu/BiFormer,
MIT licence, Copyright (c) ZHU Lei), in the "legacy" formulation of its released T / S / B weights
(SPEC section 3). The weights are the authors' (`checkpoint['model']` of their release files);
`checkpoint_filter_fn` renames their keys when the weights are loaded.

Each block adds a 3x3 depthwise conv of its input, then runs pre-norm bi-level routing attention
(`foveal.layers.BiLevelRoutingAttention`, on `foveal.kernels.routed_attention`) and an MLP; the last
stage uses global attention with a depthwise conv of its input (`foveal.layers.AttentionLePE`).
Classification needs stage maps divisible by `n_win` (224 and multiples of 112 for the default
`n_win=7`); dense tasks set `auto_pad=True` and raise `n_win`.
"""
import re
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from timm.layers import ClassifierHead, DropPath, calculate_drop_path_rates, to_ntuple, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model, \
    register_notrace_module

from ._checkpoint import load_release_weights, release_cfg
from ._staged import StagedTimmMixin
from .layers import AddLayerNorm, AttentionLePE, BiLevelRoutingAttention, RecomputeMlp

__all__ = ['BiFormer']  # model_registry will add each entrypoint fn to this

_int_or_seq_t = Union[int, Sequence[int]]

# leaves for torch.fx: the routing (top-k, padding) depends on the input, the MLP's training path is
# an autograd.Function and the norm's eager path a custom op
register_notrace_module(BiLevelRoutingAttention)
register_notrace_module(AttentionLePE)
register_notrace_module(RecomputeMlp)
register_notrace_module(AddLayerNorm)


class BiFormerBlock(nn.Module):
    """x + DWConv3x3(x), then pre-norm attention (routed, or global in the last stage) and MLP."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            n_win: int = 7,
            topk: int = 4,
            mlp_ratio: float = 3.,
            side_dwconv: int = 5,
            auto_pad: bool = False,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Number of channels.
            num_heads: Heads of the routed attention (the global attention has 8).
            n_win: Regions per side of the routed attention.
            topk: Key regions per query region; -1 for global attention with LePE (the last stage).
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            side_dwconv: Kernel of the attention's depthwise conv (LCE on v, or LePE on the input).
            auto_pad: Zero-pad maps to multiples of n_win inside the routed attention.
            proj_drop: Dropout rate after the attention projection and in the MLP.
            drop_path: Stochastic depth rate.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.norm1 = AddLayerNorm(dim, eps=1e-6, **dd)
        if topk == -1:
            self.attn = AttentionLePE(dim, num_heads=8, side_dwconv=side_dwconv, proj_drop=proj_drop, **dd)
        else:
            self.attn = BiLevelRoutingAttention(
                dim, num_heads=num_heads, n_win=n_win, topk=topk, side_dwconv=side_dwconv, auto_pad=auto_pad,
                proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = AddLayerNorm(dim, eps=1e-6, **dd)
        self.mlp = RecomputeMlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: Input features (B, H, W, C).

        Returns:
            Output features (B, H, W, C).
        """
        x, h = self.norm1.forward_add(x, self.pos_embed(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        y = self.drop_path1(self.attn(h))
        fused_mlp = False
        if not torch.jit.is_scripting():
            fused_mlp = self.mlp.recomputes()
        if fused_mlp:
            x, y = self._norm2_mlp(x, y)
        else:
            x, h = self.norm2.forward_add(x, y)
            y = self.mlp(h)
        return x + self.drop_path2(y)

    @torch.jit.unused
    def _norm2_mlp(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # training: fc1 fused with norm2, whose output is recomputed in the backward instead of kept
        x, a = self.norm2.forward_add_linear(x, y, self.mlp.fc1)
        return x, self.mlp.forward_hidden(a)


class BiFormerStage(nn.Module):
    """One stage: the stem or a 3x3 stride-2 conv + BN (NCHW), then blocks on channels-last maps."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            depth: int,
            num_heads: int,
            n_win: int = 7,
            topk: int = 4,
            downsample: bool = True,
            mlp_ratio: float = 3.,
            side_dwconv: int = 5,
            auto_pad: bool = False,
            proj_drop: float = 0.,
            drop_path: Union[List[float], float] = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Number of input channels.
            out_dim: Number of output channels.
            depth: Number of blocks.
            num_heads: Heads of the routed attention.
            n_win: Regions per side.
            topk: Key regions per query region, -1 for global attention.
            downsample: Start with a 3x3 stride-2 conv + BN (else the input already has out_dim channels).
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            side_dwconv: Kernel of the attention's depthwise conv.
            auto_pad: Zero-pad maps to multiples of n_win (dense tasks).
            proj_drop: Projection dropout rate.
            drop_path: Stochastic depth rate, one per block or one for all.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, **dd),
                nn.BatchNorm2d(out_dim, **dd),
            )
        else:
            if dim != out_dim:
                raise ValueError(f'a stage without downsampling keeps its width, got dim={dim}, out_dim={out_dim}')
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            BiFormerBlock(
                dim=out_dim,
                num_heads=num_heads,
                n_win=n_win,
                topk=topk,
                mlp_ratio=mlp_ratio,
                side_dwconv=side_dwconv,
                auto_pad=auto_pad,
                proj_drop=proj_drop,
                drop_path=drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path,
                **dd,
            )
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H', W', C')."""
        x = self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # the convs see channels-last NCHW views
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


def _init_weights(module: nn.Module, name: str = '') -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class BiFormer(StagedTimmMixin, nn.Module):
    """BiFormer: a conv stem, four stages of routed (then global) attention blocks, BN, pool, Linear."""

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official release file; timm calls this for the release URLs of the cfgs
        (see ``foveal._checkpoint.release_cfg``)."""
        load_release_weights(self, checkpoint_path, checkpoint_filter_fn)

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Tuple[int, ...] = (64, 128, 256, 512),
            depths: Tuple[int, ...] = (4, 4, 18, 4),
            head_dim: int = 32,
            n_win: _int_or_seq_t = 7,
            topks: Tuple[int, ...] = (1, 4, 16, -1),
            mlp_ratio: float = 3.,
            side_dwconv: int = 5,
            auto_pad: bool = False,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chans: Number of input image channels.
            num_classes: Number of classes for classification head.
            global_pool: Global pooling type.
            embed_dims: Width of each stage.
            depths: Number of blocks per stage.
            head_dim: Head width of the routed attention (heads = width / head_dim).
            n_win: Regions per side, one for all stages or one per stage (dense tasks use 8 or 16).
            topks: Key regions per query region, per stage; -1 is global attention with LePE.
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            side_dwconv: Kernel of the attention's depthwise conv (LCE / LePE).
            auto_pad: Zero-pad maps to multiples of n_win in the routed attention (dense tasks);
                without it, classification inputs must give stage maps divisible by n_win.
            drop_rate: Dropout rate before the classifier.
            proj_drop_rate: Dropout rate after the attention projections and in the MLPs.
            drop_path_rate: Stochastic depth rate (linear over blocks, from 0).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        if len(embed_dims) != num_stages or len(topks) != num_stages:
            raise ValueError(f'embed_dims and topks must give one value per stage, got depths={depths}, '
                             f'embed_dims={embed_dims}, topks={topks}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = 'NCHW'
        self.num_features = self.head_hidden_size = embed_dims[-1]
        n_wins = to_ntuple(num_stages)(n_win)

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dims[0] // 2, 3, stride=2, padding=1, **dd),
            nn.BatchNorm2d(embed_dims[0] // 2, **dd),
            nn.GELU(),
            nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, stride=2, padding=1, **dd),
            nn.BatchNorm2d(embed_dims[0], **dd),
        )
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        stages = []
        in_dim = embed_dims[0]
        for i in range(num_stages):
            stages += [BiFormerStage(
                dim=in_dim,
                out_dim=embed_dims[i],
                depth=depths[i],
                num_heads=embed_dims[i] // head_dim,
                n_win=n_wins[i],
                topk=topks[i],
                downsample=i > 0,
                mlp_ratio=mlp_ratio,
                side_dwconv=side_dwconv,
                auto_pad=auto_pad,
                proj_drop=proj_drop_rate,
                drop_path=dpr[i],
                **dd,
            )]
            in_dim = embed_dims[i]
            self.feature_info += [dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)

        self.norm = nn.BatchNorm2d(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            input_fmt=self.output_fmt,
            **dd,
        )
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """No parameter beyond timm's 1-D ones (norms, biases) is excluded from weight decay."""
        return set()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates (stage outputs).

        Args:
            x: Input image tensor (B, C, H, W).
            indices: Take last n stages if int, all if None, select matching indices if sequence.
            norm: Apply the final norm to the last stage's intermediate.
            stop_early: Stop iterating over stages when the last desired intermediate is reached.
            output_fmt: Layout of the intermediates, 'NCHW' or 'NHWC'.
            intermediates_only: Only return intermediate features.

        Returns:
            List of intermediate features or tuple of (final features (B, C, H, W), intermediates).
        """
        take_indices, stages = self._intermediate_stages(indices, stop_early, output_fmt)
        num_stages = len(self.stages)
        intermediates = []

        x = self.stem(x).permute(0, 2, 3, 1)  # B, H, W, C
        last_idx = 0
        for i, stage in enumerate(stages):
            x = stage(x)
            last_idx = i
            if i in take_indices:
                x_inter = x.permute(0, 3, 1, 2)
                if norm and i == num_stages - 1:
                    x_inter = self.norm(x_inter)
                x_inter = x_inter.contiguous() if output_fmt == 'NCHW' else x_inter.permute(0, 2, 3, 1).contiguous()
                intermediates.append(x_inter)

        if intermediates_only:
            return intermediates

        x = x.permute(0, 3, 1, 2)
        if last_idx == num_stages - 1:
            x = self.norm(x)  # final norm is sized for (and only applied to) the last stage
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, C', H/32, W/32) normalized features."""
        x = self.stem(x).permute(0, 2, 3, 1)
        x = self.stages(x)
        return self.norm(x.permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


_OFFICIAL_RENAMES = (
    (r'^downsample_layers\.0\.', 'stem.'),
    (r'^downsample_layers\.(\d+)\.', r'stages.\1.downsample.'),
    (r'^stages\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
    (r'\.attn\.qkv\.qkv\.', '.attn.qkv.'),  # legacy QKVLinear: one Linear, rows q | k | v
    (r'\.attn\.wo\.', '.attn.proj.'),
    (r'\.mlp\.0\.', '.mlp.fc1.'),
    (r'\.mlp\.3\.', '.mlp.fc2.'),
    (r'^head\.', 'head.fc.'),
)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert the authors' BiFormer checkpoints to this module's layout.

    Accepts the release files' layout (`downsample_layers.{i}`, blocks as `stages.{s}.{b}`, legacy
    `attn.qkv.qkv` and `attn.wo`, `mlp.{0,3}`, `head`), optionally wrapped in 'model', with or without
    the BatchNorm `num_batches_tracked` buffers, and this module's own layout (unchanged).
    """
    state_dict = state_dict.get('model', state_dict)
    if 'stem.0.weight' in state_dict:
        return dict(state_dict)
    out_dict = {}
    for k, v in state_dict.items():
        for pattern, repl in _OFFICIAL_RENAMES:
            k = re.sub(pattern, repl, k)
        out_dict[k] = v
    return out_dict


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    depths = kwargs.get('depths', (4, 4, 18, 4))
    out_indices = kwargs.pop('out_indices', tuple(range(len(depths))))
    return build_model_with_cfg(
        BiFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


_IN1K_LABELS = tuple(ImageNetInfo('imagenet-1k').label_names())


def _cfg(**kwargs) -> Dict[str, Any]:
    """Eval transform of the authors' ImageNet recipe: resize to 224 / 0.875, bicubic, ImageNet mean / std."""
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        # stage maps must be multiples of n_win=7 up to stage 3: 112 is the smallest such input
        'min_input_size': (3, 112, 112),
        'crop_pct': .875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0', 'classifier': 'head.fc',
        'license': 'mit', 'label_names': _IN1K_LABELS,
        'paper_ids': 'arXiv:2303.08810', 'origin_url': 'https://github.com/rayleizhu/BiFormer',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # the release URLs of the authors' models/biformer.py (their README's OneDrive copies are reported broken)
    'biformer_tiny.in1k': _cfg(**release_cfg('https://matix.li/e36fe9fb086c', 'biformer_tiny-in1k.pth')),
    'biformer_small.in1k': _cfg(**release_cfg('https://matix.li/5bb436318902', 'biformer_small-in1k.pth')),
    'biformer_base.in1k': _cfg(**release_cfg('https://matix.li/995db75f585d', 'biformer_base-in1k.pth')),
    'test_biformer': _cfg(
        input_size=(3, 64, 64), pool_size=(2, 2), min_input_size=(3, 32, 32), label_names=None,
        license='apache-2.0', paper_ids=None, origin_url=None),
})


@register_model
def biformer_tiny(pretrained=False, **kwargs) -> BiFormer:
    """BiFormer-T @ 224, trained on ImageNet-1k."""
    model_args = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2))
    return _create_biformer('biformer_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_small(pretrained=False, **kwargs) -> BiFormer:
    """BiFormer-S @ 224, trained on ImageNet-1k."""
    model_args = dict(embed_dims=(64, 128, 256, 512), depths=(4, 4, 18, 4))
    return _create_biformer('biformer_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_base(pretrained=False, **kwargs) -> BiFormer:
    """BiFormer-B @ 224, trained on ImageNet-1k."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(4, 4, 18, 4))
    return _create_biformer('biformer_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_biformer(pretrained=False, **kwargs) -> BiFormer:
    """Tiny BiFormer for tests (n_win 2, every routing case: top-k 1, 2, all, global), no weights."""
    model_args = dict(embed_dims=(16, 32, 32, 64), depths=(1, 1, 2, 1), head_dim=8, n_win=2, topks=(1, 2, 4, -1),
                      mlp_ratio=2.)
    return _create_biformer('test_biformer', pretrained=pretrained, **dict(model_args, **kwargs))
