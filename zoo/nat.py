""" Neighborhood Attention Transformers: NAT, DiNAT, DiNAT_s and isotropic NAT / DiNAT

A PyTorch impl of:
* `Neighborhood Attention Transformer` - https://arxiv.org/abs/2204.07143
* `Dilated Neighborhood Attention Transformer` - https://arxiv.org/abs/2209.15001

Architecture, variants and checkpoint layout follow the authors' code
(https://github.com/SHI-Labs/Neighborhood-Attention-Transformer, MIT licence, Copyright (c) Ali Hassani
and the SHI Lab). Weights are the authors': NAT / DiNAT from their Hugging Face repos (`shi-labs/*`,
transformers layout), DiNAT_s and the isotropic models from their release URLs (original `.pth`
layout). `checkpoint_filter_fn` converts both layouts when the weights are loaded.

Neighborhood attention runs on `foveal.kernels.na2d` through `foveal.layers.NeighborhoodAttention2d`,
which also pads maps smaller than kernel_size * dilation the way the published models do, so every
model accepts any input size.
"""
import re
from typing import Any, Dict, Final, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
from torch.fx import Proxy
from torch.nn.modules.module import _global_backward_hooks, _global_backward_pre_hooks, _global_forward_hooks, \
    _global_forward_pre_hooks

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from timm.layers import ClassifierHead, DropPath, Mlp, PatchEmbed, calculate_drop_path_rates, to_ntuple, \
    trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model, \
    register_notrace_module
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.swin_transformer import PatchMerging

from ._staged import StagedTimmMixin
from .kernels.dispatch import eager_ok, env
from .kernels.na_block import NABlockConfig, na_block
from .layers import AddLayerNorm, NeighborhoodAttention2d, RecomputeMlp

__all__ = ['NAT', 'NATIsotropic']  # model_registry will add each entrypoint fn to this

_int_or_seq_t = Union[int, Sequence[int]]

# leaves for torch.fx: the attention module's padding depends on the input size, the MLP's
# training path is an autograd.Function and the norm's eager path a custom op
register_notrace_module(NeighborhoodAttention2d)
register_notrace_module(RecomputeMlp)
register_notrace_module(AddLayerNorm)


_GLOBAL_HOOKS = (_global_forward_hooks, _global_forward_pre_hooks, _global_backward_hooks, _global_backward_pre_hooks)


def _resolve_dilations(
        dilations: Optional[Sequence[Sequence[int]]],
        depths: Sequence[int],
) -> Tuple[Tuple[int, ...], ...]:
    """One dilation per block of every stage (all 1 when None)."""
    if dilations is None:
        return tuple((1,) * d for d in depths)
    dilations = tuple(tuple(int(x) for x in stage) for stage in dilations)
    if len(dilations) != len(depths) or any(len(s) != d for s, d in zip(dilations, depths)):
        raise ValueError(
            f'dilations must give one value per block of every stage (depths={tuple(depths)}), got {dilations}')
    return dilations


class NATBlock(nn.Module):
    """Pre-norm transformer block: neighborhood attention then MLP, each with optional layer scale."""
    fused_norm: Final[bool]
    whole_block: Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 7,
            dilation: int = 1,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            ls_init_value: Optional[float] = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Number of input channels.
            num_heads: Number of attention heads.
            kernel_size: Neighborhood size.
            dilation: Neighborhood dilation.
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            qkv_bias: If True, add a learnable bias to query, key, value.
            ls_init_value: Initial value of the per-channel layer scales (gamma1, gamma2); None disables them.
            proj_drop: Dropout rate after the attention projection and in the MLP.
            attn_drop: Attention dropout rate.
            drop_path: Stochastic depth rate.
            act_layer: Activation layer.
            norm_layer: Normalization layer. nn.LayerNorm becomes AddLayerNorm (same parameters): the
                norms write their output once, in the dtype the Linear after them consumes, and norm2
                adds the attention branch to the residual stream in the same pass.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.fused_norm = norm_layer is nn.LayerNorm
        if self.fused_norm:
            norm_layer = AddLayerNorm
        self.norm1 = norm_layer(dim, **dd)
        self.attn = NeighborhoodAttention2d(
            dim,
            num_heads=num_heads,
            kernel_size=kernel_size,
            dilation=dilation,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            **dd,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        if act_layer is nn.GELU:  # same parameters and outputs; the backward keeps one hidden tensor, not two
            self.mlp = RecomputeMlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        else:
            self.mlp = Mlp(
                in_features=dim,
                hidden_features=int(dim * mlp_ratio),
                act_layer=act_layer,
                drop=proj_drop,
                **dd,
            )
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        # the layers na_block computes: nn.LayerNorm norms, the GELU MLP, timm's DropPath
        self.whole_block = self.fused_norm and isinstance(self.mlp, RecomputeMlp)
        if ls_init_value is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(ls_init_value), **dd))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(ls_init_value), **dd))
        else:
            self.gamma1 = None
            self.gamma2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: Input features (B, H, W, C).

        Returns:
            Output features (B, H, W, C).
        """
        x, y = self.forward_split(x, None)
        return x + y

    def forward_split(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The block on the residual stream ``x + y`` (``x`` alone when ``y`` is None), with the
        output left as a sum too: the next block's first norm adds it in its own pass.

        Args:
            x: Residual stream (B, H, W, C).
            y: Pending branch output to add to it (B, H, W, C), or None.

        Returns:
            ``(x', y')`` (B, H, W, C) each, whose sum is the block output.
        """
        if not torch.jit.is_scripting() and self._one_node(x, y):
            return self._forward_one_node(x, y)
        if y is None:
            h = self.norm1(x)
        elif self.fused_norm:
            x, h = self.norm1.forward_add(x, y)
        else:
            x = x + y
            h = self.norm1(x)
        y = self.attn(h)
        if self.gamma1 is not None:
            y = self.gamma1 * y
        fused_mlp = False
        if not torch.jit.is_scripting():
            fused_mlp = self._norm2_fc1_fused()
        if fused_mlp:
            x, y = self._norm2_mlp(x, y)
        else:
            if self.fused_norm:
                x, h = self.norm2.forward_add(x, self.drop_path1(y))
            else:
                x = x + self.drop_path1(y)
                h = self.norm2(x)
            y = self.mlp(h)
        if self.gamma2 is not None:
            y = self.gamma2 * y
        return x, self.drop_path2(y)

    @torch.jit.unused
    def _one_node(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> bool:
        """True when the call can run as one ``foveal.kernels.na_block`` node: the modules' own
        computation (same parameters, dtypes and DropPath draws), without their per-module host time.
        Not under torch.compile / fx / dispatch modes (they see the modules), with hooks on the
        submodules, with dropout, custom norm or MLP layers, maps that need padding, or with the
        environment variable ``FOVEAL_NA_BLOCK=0``."""
        if not self.whole_block or isinstance(x, Proxy) or isinstance(y, Proxy) or not eager_ok(x, y) \
                or env('FOVEAL_NA_BLOCK') == '0':
            return False
        attn, mlp = self.attn, self.mlp
        window = attn.kernel_size * attn.dilation
        if x.dim() != 4 or x.shape[1] < window or x.shape[2] < window:
            return False
        if self.training and (attn.attn_drop.p > 0. or not isinstance(attn.proj_drop, nn.Identity)
                              or mlp.drop1.p > 0. or mlp.drop2.p > 0.):
            return False
        if _GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1] or _GLOBAL_HOOKS[2] or _GLOBAL_HOOKS[3]:
            return False
        for module in (self.norm1, attn, attn.qkv, attn.proj, self.drop_path1, self.norm2, mlp, mlp.fc1, mlp.act,
                       mlp.fc2, self.drop_path2):
            if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks \
                    or module._backward_pre_hooks:
                return False
        return True

    @torch.jit.unused
    def _forward_one_node(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        attn, mlp, norm1, norm2 = self.attn, self.mlp, self.norm1, self.norm2
        cfg = NABlockConfig(
            attn.num_heads, attn.kernel_size, attn.dilation, attn.scale, norm1.eps, norm2.eps, mlp.act.approximate,
            getattr(self.drop_path1, 'drop_prob', 0.), getattr(self.drop_path2, 'drop_prob', 0.),
            getattr(self.drop_path1, 'scale_by_keep', True), attn.backend)
        return na_block(
            x, y, norm1.weight, norm1.bias, attn.qkv.weight, attn.qkv.bias, attn.rpb, attn.proj.weight,
            attn.proj.bias, norm2.weight, norm2.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
            self.gamma1, self.gamma2, cfg, self.training)

    @torch.jit.unused
    def _norm2_fc1_fused(self) -> bool:
        return self.fused_norm and isinstance(self.mlp, RecomputeMlp) and self.mlp.recomputes()

    @torch.jit.unused
    def _norm2_mlp(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # training: fc1 fused with norm2, whose output is recomputed in the backward instead of kept
        x, a = self.norm2.forward_add_linear(x, self.drop_path1(y), self.mlp.fc1)
        return x, self.mlp.forward_hidden(a)


class NATBlocks(nn.Sequential):
    """A sequence of NATBlocks that hands each block's last residual add to the next block's first
    norm (one pass over the stream instead of two); the keys are those of ``nn.Sequential``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: Optional[torch.Tensor] = None
        for blk in self:
            x, y = blk.forward_split(x, y)
        if y is not None:
            x = x + y
        return x


class ConvTokenizer(nn.Module):
    """Overlapping stem: two 3x3 stride-2 convs (C/2 then C channels), then a norm; NCHW in, NHWC out."""

    def __init__(
            self,
            in_chans: int = 3,
            embed_dim: int = 64,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chans: Number of input image channels.
            embed_dim: Number of output channels.
            norm_layer: Normalization layer.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1, **dd),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1, **dd),
        )
        self.norm = norm_layer(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)  # B, H/4, W/4, C
        return self.norm(x)


class ConvDownsample(nn.Module):
    """3x3 stride-2 conv (no bias) then a norm; NHWC in and out."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Number of input channels.
            out_dim: Number of output channels.
            norm_layer: Normalization layer.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1, bias=False, **dd)
        self.norm = norm_layer(out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # B, H/2, W/2, C'
        return self.norm(x)


class NATStage(nn.Module):
    """One stage: optional downsampling of the previous stage's output, then NA blocks."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            depth: int,
            num_heads: int,
            kernel_size: int = 7,
            dilations: Optional[Sequence[int]] = None,
            downsample: str = '',
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            ls_init_value: Optional[float] = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: Union[List[float], float] = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Number of input channels.
            out_dim: Number of output channels.
            depth: Number of blocks.
            num_heads: Number of attention heads.
            kernel_size: Neighborhood size.
            dilations: One dilation per block (all 1 if None).
            downsample: '' (none), 'conv' (3x3 stride-2 conv + norm, NAT / DiNAT) or 'merge'
                (2x2 patch merging, DiNAT_s).
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            qkv_bias: If True, add a learnable bias to query, key, value.
            ls_init_value: Layer-scale init value, None for no layer scale.
            proj_drop: Projection dropout rate.
            attn_drop: Attention dropout rate.
            drop_path: Stochastic depth rate, one per block or one for all.
            act_layer: Activation layer.
            norm_layer: Normalization layer.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        dilations = tuple(dilations) if dilations is not None else (1,) * depth
        if downsample == 'conv':
            self.downsample = ConvDownsample(dim, out_dim, norm_layer=norm_layer, **dd)
        elif downsample == 'merge':
            self.downsample = PatchMerging(dim, out_dim, norm_layer=norm_layer, **dd)
        elif downsample == '':
            if dim != out_dim:
                raise ValueError(f'a stage without downsampling keeps its width, got dim={dim}, out_dim={out_dim}')
            self.downsample = nn.Identity()
        else:
            raise ValueError(f"downsample must be one of '', 'conv', 'merge', got {downsample!r}")
        self.blocks = NATBlocks(*[
            NATBlock(
                dim=out_dim,
                num_heads=num_heads,
                kernel_size=kernel_size,
                dilation=dilations[i],
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                ls_init_value=ls_init_value,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path,
                act_layer=act_layer,
                norm_layer=norm_layer,
                **dd,
            )
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
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


class _NATBase(StagedTimmMixin, nn.Module):
    """The staged timm API, with no weight decay for the relative positional biases (``*.rpb``)."""

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Relative positional biases take no weight decay (1-D params are excluded by timm already)."""
        return {n for n, _ in self.named_parameters() if n.endswith('.rpb')}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


class NAT(_NATBase):
    """Hierarchical neighborhood attention transformer: NAT, DiNAT and DiNAT_s."""

    _stem_name = 'patch_embed'
    _stages_name = 'levels'

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 64,
            depths: Tuple[int, ...] = (3, 4, 18, 5),
            num_heads: Tuple[int, ...] = (2, 4, 8, 16),
            kernel_size: _int_or_seq_t = 7,
            dilations: Optional[Sequence[Sequence[int]]] = None,
            mlp_ratio: float = 3.,
            qkv_bias: bool = True,
            ls_init_value: Optional[float] = None,
            stem_type: str = 'conv',
            patch_size: int = 4,
            downsample_type: str = 'conv',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chans: Number of input image channels.
            num_classes: Number of classes for classification head.
            global_pool: Global pooling type.
            embed_dim: Width of the first stage; each later stage doubles it.
            depths: Number of blocks per stage.
            num_heads: Number of attention heads per stage.
            kernel_size: Neighborhood size, one for all stages or one per stage.
            dilations: One dilation per block of every stage (DiNAT); None for plain NA (NAT). Changing
                them does not change the parameters, so pretrained weights can be re-dilated.
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            qkv_bias: If True, add a learnable bias to query, key, value.
            ls_init_value: Layer-scale init value (gamma1 / gamma2), None for no layer scale.
            stem_type: 'conv' (two overlapping 3x3 stride-2 convs, NAT / DiNAT; patch_size must be 4) or
                'patch' (non-overlapping patch_size x patch_size conv, DiNAT_s).
            patch_size: Stem stride.
            downsample_type: 'conv' (3x3 stride-2 conv, NAT / DiNAT) or 'merge' (patch merging, DiNAT_s).
            drop_rate: Dropout rate before the classifier.
            proj_drop_rate: Dropout rate after the attention projection and in the MLPs (the original
                code's drop_rate).
            attn_drop_rate: Attention dropout rate.
            drop_path_rate: Stochastic depth rate (linear over blocks, from 0).
            act_layer: MLP activation layer.
            norm_layer: Normalization layer.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f'num_heads must give one value per stage, got depths={depths}, num_heads={num_heads}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = 'NHWC'
        embed_dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]
        self.num_features = self.head_hidden_size = embed_dims[-1]
        kernel_sizes = to_ntuple(num_stages)(kernel_size)
        dilations = _resolve_dilations(dilations, depths)

        if stem_type == 'conv':
            if patch_size != 4:
                raise ValueError(f"stem_type='conv' downsamples by 4, got patch_size={patch_size}")
            self.patch_embed = ConvTokenizer(in_chans, embed_dims[0], norm_layer=norm_layer, **dd)
        elif stem_type == 'patch':
            self.patch_embed = PatchEmbed(
                img_size=None,
                patch_size=patch_size,
                in_chans=in_chans,
                embed_dim=embed_dims[0],
                norm_layer=norm_layer,
                output_fmt='NHWC',
                strict_img_size=False,
                dynamic_img_pad=True,
                **dd,
            )
        else:
            raise ValueError(f"stem_type must be 'conv' or 'patch', got {stem_type!r}")
        if downsample_type not in ('conv', 'merge'):
            raise ValueError(f"downsample_type must be 'conv' or 'merge', got {downsample_type!r}")

        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        levels = []
        in_dim = embed_dims[0]
        for i in range(num_stages):
            levels += [NATStage(
                dim=in_dim,
                out_dim=embed_dims[i],
                depth=depths[i],
                num_heads=num_heads[i],
                kernel_size=kernel_sizes[i],
                dilations=dilations[i],
                downsample=downsample_type if i > 0 else '',
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                ls_init_value=ls_init_value,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                **dd,
            )]
            in_dim = embed_dims[i]
            self.feature_info += [dict(num_chs=embed_dims[i], reduction=patch_size * 2 ** i, module=f'levels.{i}')]
        self.levels = nn.Sequential(*levels)

        self.norm = norm_layer(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            input_fmt=self.output_fmt,
            **dd,
        )
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, H/32, W/32, C') normalized features (for the default 4 stages)."""
        x = self.patch_embed(x)
        x = self.levels(x)
        x = self.norm(x)
        return x


class NATIsotropic(_NATBase):
    """Isotropic (ViT-like, single-resolution) neighborhood attention transformer."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            patch_size: int = 16,
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 12,
            kernel_size: int = 7,
            dilations: Optional[Sequence[int]] = None,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            ls_init_value: Optional[float] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chans: Number of input image channels.
            num_classes: Number of classes for classification head.
            global_pool: Global pooling type.
            patch_size: Patch size of the (non-overlapping) stem.
            embed_dim: Embedding dimension.
            depth: Number of blocks.
            num_heads: Number of attention heads.
            kernel_size: Neighborhood size.
            dilations: One dilation per block (all 1 if None).
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            qkv_bias: If True, add a learnable bias to query, key, value.
            ls_init_value: Layer-scale init value, None for no layer scale.
            drop_rate: Dropout rate before the classifier.
            proj_drop_rate: Dropout rate after the attention projection and in the MLPs.
            attn_drop_rate: Attention dropout rate.
            drop_path_rate: Stochastic depth rate (linear over blocks, from 0).
            act_layer: MLP activation layer.
            norm_layer: Normalization layer.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = 'NHWC'
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        dilations = _resolve_dilations(None if dilations is None else (dilations,), (depth,))[0]

        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer,
            output_fmt='NHWC',
            strict_img_size=False,
            dynamic_img_pad=True,
            **dd,
        )
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.layers = NATBlocks(*[
            NATBlock(
                dim=embed_dim,
                num_heads=num_heads,
                kernel_size=kernel_size,
                dilation=dilations[i],
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                ls_init_value=ls_init_value,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                **dd,
            )
            for i in range(depth)])
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f'layers.{i}') for i in range(depth)]

        self.norm = norm_layer(embed_dim, **dd)
        self.head = ClassifierHead(
            embed_dim,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            input_fmt=self.output_fmt,
            **dd,
        )
        self.apply(_init_weights)

    # one sequence of blocks, no stages: the staged API's stage methods are replaced from here on
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Group parameters for optimization (layer-wise LR decay)."""
        return dict(
            stem=r'^patch_embed',
            blocks=[(r'^layers\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable gradient checkpointing."""
        self.grad_checkpointing = enable

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates (block outputs).

        Args:
            x: Input image tensor (B, C, H, W).
            indices: Take last n blocks if int, all if None, select matching indices if sequence.
            norm: Apply the final norm to every intermediate.
            stop_early: Stop iterating over blocks when the last desired intermediate is reached.
            output_fmt: Layout of the intermediates, 'NCHW' or 'NHWC'.
            intermediates_only: Only return intermediate features.

        Returns:
            List of intermediate features or tuple of (final features, intermediates).
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.layers), indices)

        x = self.patch_embed(x)
        if torch.jit.is_scripting() or not stop_early:
            blocks = self.layers
        else:
            blocks = self.layers[:max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
            if i in take_indices:
                x_inter = self.norm(x) if norm else x
                if output_fmt == 'NCHW':
                    x_inter = x_inter.permute(0, 3, 1, 2).contiguous()
                intermediates.append(x_inter)

        if intermediates_only:
            return intermediates

        x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Prune blocks not required for the specified intermediates.

        Args:
            indices: Indices of intermediate blocks to keep.
            prune_norm: Whether to prune the final norm.
            prune_head: Whether to prune the classifier head.

        Returns:
            List of indices that were kept.
        """
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, H/16, W/16, C) normalized features."""
        x = self.patch_embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.layers, x)
        else:
            x = self.layers(x)
        x = self.norm(x)
        return x


_HF_BLOCK_RENAMES = (
    ('layernorm_before.', 'norm1.'),
    ('layernorm_after.', 'norm2.'),
    ('attention.self.rpb', 'attn.rpb'),
    ('attention.output.dense.', 'attn.proj.'),
    ('intermediate.dense.', 'mlp.fc1.'),
    ('output.dense.', 'mlp.fc2.'),
)


def _convert_transformers(state_dict: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """transformers `NatForImageClassification` / `DinatForImageClassification` layout -> ours."""
    out_dict = {}
    qkv_parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        if k.startswith(prefix):
            k = k[len(prefix):]
        if k.startswith('embeddings.patch_embeddings.projection.'):
            k = k.replace('embeddings.patch_embeddings.projection.', 'patch_embed.proj.')
        elif k.startswith('embeddings.norm.'):
            k = k.replace('embeddings.norm.', 'patch_embed.norm.')
        elif k.startswith('layernorm.'):
            k = k.replace('layernorm.', 'norm.')
        elif k.startswith('classifier.'):
            k = k.replace('classifier.', 'head.fc.')
        elif k.startswith('encoder.levels.'):
            m = re.match(r'encoder\.levels\.(\d+)\.(.*)', k)
            level, rest = int(m.group(1)), m.group(2)
            if rest.startswith('downsample.'):
                # transformers (like the original code) downsamples at the end of a stage, we at the start
                k = f'levels.{level + 1}.{rest}'
            else:
                m = re.match(r'layers\.(\d+)\.(.*)', rest)
                block, name = f'levels.{level}.blocks.{m.group(1)}.', m.group(2)
                q = re.match(r'attention\.self\.(query|key|value)\.(weight|bias)', name)
                if q is not None:
                    qkv_parts.setdefault(f'{block}attn.qkv.{q.group(2)}', {})[q.group(1)] = v
                    continue
                if name == 'layer_scale_parameters':
                    out_dict[f'{block}gamma1'] = v[0]
                    out_dict[f'{block}gamma2'] = v[1]
                    continue
                for old, new in _HF_BLOCK_RENAMES:
                    if name.startswith(old):
                        name = new + name[len(old):]
                        break
                k = block + name
        out_dict[k] = v
    for k, parts in qkv_parts.items():
        out_dict[k] = torch.cat([parts['query'], parts['key'], parts['value']], dim=0)
    return out_dict


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert NAT / DiNAT / DiNAT_s / isotropic checkpoints to this module's layout.

    Accepts the transformers layout (keys under `nat.` / `dinat.`, split query / key / value,
    `layer_scale_parameters`, `classifier`), the authors' original `.pth` layout (stages under
    `levels` (NAT / DiNAT) or `layers` (DiNAT_s) with the downsampler at the end of a stage, `head`),
    optionally wrapped in 'model' / 'state_dict', and this module's own layout (unchanged).
    """
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    for prefix in ('nat.', 'dinat.'):
        if any(k.startswith(prefix) for k in state_dict):
            return _convert_transformers(state_dict, prefix)
    if 'head.fc.weight' in state_dict or 'head.fc.bias' in state_dict:
        return dict(state_dict)

    out_dict = {}
    for k, v in state_dict.items():
        if k.startswith('head.'):
            k = k.replace('head.', 'head.fc.')
        elif isinstance(model, NAT):
            # the original stages downsample at their end (stage 0 has one), ours at their start
            k = re.sub(
                r'^(?:levels|layers)\.(\d+)\.downsample\.',
                lambda m: f'levels.{int(m.group(1)) + 1}.downsample.',
                k,
            )
            k = re.sub(r'^layers\.', 'levels.', k)
        out_dict[k] = v
    return out_dict


def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> NAT:
    depths = kwargs.get('depths', (3, 4, 18, 5))
    out_indices = kwargs.pop('out_indices', tuple(range(len(depths))))
    return build_model_with_cfg(
        NAT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _create_nat_isotropic(variant: str, pretrained: bool = False, **kwargs) -> NATIsotropic:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        NATIsotropic, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


_IN1K_LABELS = tuple(ImageNetInfo('imagenet-1k').label_names())


def _cfg(**kwargs) -> Dict[str, Any]:
    """Eval transform of the authors' ImageNet recipe: resize to 224 / 0.875, bicubic, ImageNet mean / std."""
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        # any size works (maps smaller than kernel_size * dilation are padded); timm's reduced-size tests use this
        'min_input_size': (3, 32, 32),
        'crop_pct': .875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj.0', 'classifier': 'head.fc',
        'license': 'mit', 'label_names': _IN1K_LABELS,
        'paper_ids': 'arXiv:2204.07143', 'origin_url': 'https://github.com/SHI-Labs/Neighborhood-Attention-Transformer',
        **kwargs,
    }


def _hf_cfg(hub_name: str, **kwargs) -> Dict[str, Any]:
    """The authors' Hugging Face repo (transformers layout, converted by checkpoint_filter_fn)."""
    return _cfg(hf_hub_id=f'shi-labs/{hub_name}', hf_hub_filename='pytorch_model.bin', **kwargs)


_DINAT_URL = 'https://shi-labs.com/projects/dinat/checkpoints'

default_cfgs = generate_default_cfgs({
    'nat_mini.in1k': _hf_cfg('nat-mini-in1k-224'),
    'nat_tiny.in1k': _hf_cfg('nat-tiny-in1k-224'),
    'nat_small.in1k': _hf_cfg('nat-small-in1k-224'),
    'nat_base.in1k': _hf_cfg('nat-base-in1k-224'),

    'dinat_mini.in1k': _hf_cfg('dinat-mini-in1k-224', paper_ids='arXiv:2209.15001'),
    'dinat_tiny.in1k': _hf_cfg('dinat-tiny-in1k-224', paper_ids='arXiv:2209.15001'),
    'dinat_small.in1k': _hf_cfg('dinat-small-in1k-224', paper_ids='arXiv:2209.15001'),
    'dinat_base.in1k': _hf_cfg('dinat-base-in1k-224', paper_ids='arXiv:2209.15001'),
    'dinat_large.in22k_ft_in1k': _hf_cfg('dinat-large-in22k-in1k-224', paper_ids='arXiv:2209.15001'),
    'dinat_large_384.in22k_ft_in1k': _hf_cfg(
        'dinat-large-in22k-in1k-384', paper_ids='arXiv:2209.15001',
        input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
    'dinat_large_k11_384.in22k_ft_in1k': _hf_cfg(
        'dinat-large-11x11-in22k-in1k-384', paper_ids='arXiv:2209.15001',
        input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),

    'dinat_s_tiny.in1k': _cfg(
        url=f'{_DINAT_URL}/imagenet1k/dinat_s_tiny_in1k_224.pth', first_conv='patch_embed.proj',
        paper_ids='arXiv:2209.15001'),
    'dinat_s_small.in1k': _cfg(
        url=f'{_DINAT_URL}/imagenet1k/dinat_s_small_in1k_224.pth', first_conv='patch_embed.proj',
        paper_ids='arXiv:2209.15001'),
    'dinat_s_base.in1k': _cfg(
        url=f'{_DINAT_URL}/imagenet1k/dinat_s_base_in1k_224.pth', first_conv='patch_embed.proj',
        paper_ids='arXiv:2209.15001'),
    'dinat_s_large.in22k_ft_in1k': _cfg(
        url=f'{_DINAT_URL}/imagenet1k/dinat_s_large_in1k_224.pth', first_conv='patch_embed.proj',
        paper_ids='arXiv:2209.15001'),

    'nat_isotropic_small.in1k': _cfg(
        url=f'{_DINAT_URL}/isotropic/nat_isotropic_small_in1k_224.pth', first_conv='patch_embed.proj',
        pool_size=(14, 14), min_input_size=(3, 16, 16), paper_ids='arXiv:2209.15001'),
    'nat_isotropic_base.in1k': _cfg(
        url=f'{_DINAT_URL}/isotropic/nat_isotropic_base_in1k_224.pth', first_conv='patch_embed.proj',
        pool_size=(14, 14), min_input_size=(3, 16, 16), paper_ids='arXiv:2209.15001'),
    'dinat_isotropic_small.in1k': _cfg(
        url=f'{_DINAT_URL}/isotropic/dinat_isotropic_small_in1k_224.pth', first_conv='patch_embed.proj',
        pool_size=(14, 14), min_input_size=(3, 16, 16), paper_ids='arXiv:2209.15001'),
    'dinat_isotropic_base.in1k': _cfg(
        url=f'{_DINAT_URL}/isotropic/dinat_isotropic_base_in1k_224.pth', first_conv='patch_embed.proj',
        pool_size=(14, 14), min_input_size=(3, 16, 16), paper_ids='arXiv:2209.15001'),

    'nat_nano': _cfg(
        num_classes=10, input_size=(1, 28, 28), pool_size=(2, 2), min_input_size=(1, 28, 28),
        crop_pct=1.0, interpolation='bilinear', mean=(0.2860,), std=(0.3530,), label_names=None, license='apache-2.0',
        paper_ids=None, origin_url=None),
    'test_nat': _cfg(
        input_size=(3, 96, 96), pool_size=(3, 3), label_names=None, license='apache-2.0',
        paper_ids=None, origin_url=None),
    'test_nat_isotropic': _cfg(
        input_size=(3, 96, 96), pool_size=(6, 6), min_input_size=(3, 16, 16), first_conv='patch_embed.proj',
        label_names=None, license='apache-2.0', paper_ids=None, origin_url=None),
})

_DINAT_224 = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 9, (1,) * 5)
_DINAT_MINI_224 = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 3, (1,) * 5)
_DINAT_384 = ((1, 13, 1), (1, 6, 1, 6), (1, 3) * 9, (1,) * 5)
_DINAT_S_224 = ((1, 8), (1, 4), (1, 2) * 9, (1, 1))
_DINAT_S_TINY_224 = ((1, 8), (1, 4), (1, 2) * 3, (1, 1))


@register_model
def nat_mini(pretrained=False, **kwargs) -> NAT:
    """NAT-Mini @ 224x224, trained ImageNet-1k"""
    model_args = dict(
        embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3., drop_path_rate=0.2)
    return _create_nat('nat_mini', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_tiny(pretrained=False, **kwargs) -> NAT:
    """NAT-Tiny @ 224x224, trained ImageNet-1k"""
    model_args = dict(
        embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3., drop_path_rate=0.2)
    return _create_nat('nat_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_small(pretrained=False, **kwargs) -> NAT:
    """NAT-Small @ 224x224, trained ImageNet-1k"""
    model_args = dict(
        embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2., ls_init_value=1e-5,
        drop_path_rate=0.3)
    return _create_nat('nat_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_base(pretrained=False, **kwargs) -> NAT:
    """NAT-Base @ 224x224, trained ImageNet-1k"""
    model_args = dict(
        embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2., ls_init_value=1e-5,
        drop_path_rate=0.5)
    return _create_nat('nat_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_mini(pretrained=False, **kwargs) -> NAT:
    """DiNAT-Mini @ 224x224, trained ImageNet-1k"""
    model_args = dict(
        embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3., dilations=_DINAT_MINI_224,
        drop_path_rate=0.2)
    return _create_nat('dinat_mini', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_tiny(pretrained=False, **kwargs) -> NAT:
    """DiNAT-Tiny @ 224x224, trained ImageNet-1k"""
    model_args = dict(
        embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3., dilations=_DINAT_224,
        drop_path_rate=0.2)
    return _create_nat('dinat_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_small(pretrained=False, **kwargs) -> NAT:
    """DiNAT-Small @ 224x224, trained ImageNet-1k (no layer scale, unlike NAT-Small)"""
    model_args = dict(
        embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2., dilations=_DINAT_224,
        drop_path_rate=0.3)
    return _create_nat('dinat_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_base(pretrained=False, **kwargs) -> NAT:
    """DiNAT-Base @ 224x224, trained ImageNet-1k"""
    model_args = dict(
        embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2., ls_init_value=1e-5,
        dilations=_DINAT_224, drop_path_rate=0.5)
    return _create_nat('dinat_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large(pretrained=False, **kwargs) -> NAT:
    """DiNAT-Large @ 224x224, pretrained ImageNet-22k, fine-tuned ImageNet-1k"""
    model_args = dict(
        embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), mlp_ratio=2., dilations=_DINAT_224,
        drop_path_rate=0.35)
    return _create_nat('dinat_large', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large_384(pretrained=False, **kwargs) -> NAT:
    """DiNAT-Large @ 384x384 (dilations for 384), pretrained ImageNet-22k, fine-tuned ImageNet-1k"""
    model_args = dict(
        embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), mlp_ratio=2., dilations=_DINAT_384,
        drop_path_rate=0.35)
    return _create_nat('dinat_large_384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large_k11_384(pretrained=False, **kwargs) -> NAT:
    """DiNAT-Large, 11x11 neighborhoods @ 384x384, pretrained ImageNet-22k (RPB bicubic-resized), fine-tuned 1k"""
    model_args = dict(
        embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), mlp_ratio=2., kernel_size=11,
        dilations=_DINAT_224, drop_path_rate=0.35)
    return _create_nat('dinat_large_k11_384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_tiny(pretrained=False, **kwargs) -> NAT:
    """DiNAT_s-Tiny (Swin-T layout with NA / DiNA blocks) @ 224x224, trained ImageNet-1k"""
    model_args = dict(
        embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), mlp_ratio=4., dilations=_DINAT_S_TINY_224,
        stem_type='patch', downsample_type='merge', drop_path_rate=0.2)
    return _create_nat('dinat_s_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_small(pretrained=False, **kwargs) -> NAT:
    """DiNAT_s-Small @ 224x224, trained ImageNet-1k"""
    model_args = dict(
        embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), mlp_ratio=4., dilations=_DINAT_S_224,
        stem_type='patch', downsample_type='merge', drop_path_rate=0.3)
    return _create_nat('dinat_s_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_base(pretrained=False, **kwargs) -> NAT:
    """DiNAT_s-Base @ 224x224, trained ImageNet-1k"""
    model_args = dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), mlp_ratio=4., dilations=_DINAT_S_224,
        stem_type='patch', downsample_type='merge', drop_path_rate=0.5)
    return _create_nat('dinat_s_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_large(pretrained=False, **kwargs) -> NAT:
    """DiNAT_s-Large @ 224x224, pretrained ImageNet-22k, fine-tuned ImageNet-1k"""
    model_args = dict(
        embed_dim=192, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), mlp_ratio=4., dilations=_DINAT_S_224,
        stem_type='patch', downsample_type='merge', drop_path_rate=0.35)
    return _create_nat('dinat_s_large', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_isotropic_small(pretrained=False, **kwargs) -> NATIsotropic:
    """Isotropic NAT-Small (patch 16, 12 NA blocks) @ 224x224, trained ImageNet-1k"""
    model_args = dict(embed_dim=384, depth=12, num_heads=12, drop_path_rate=0.1)
    return _create_nat_isotropic('nat_isotropic_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_isotropic_base(pretrained=False, **kwargs) -> NATIsotropic:
    """Isotropic NAT-Base (patch 16, 12 NA blocks) @ 224x224, trained ImageNet-1k"""
    model_args = dict(embed_dim=768, depth=12, num_heads=24, drop_path_rate=0.4)
    return _create_nat_isotropic('nat_isotropic_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_isotropic_small(pretrained=False, **kwargs) -> NATIsotropic:
    """Isotropic DiNAT-Small (patch 16, NA / DiNA (dilation 2) alternating) @ 224x224, trained ImageNet-1k"""
    model_args = dict(embed_dim=384, depth=12, num_heads=12, dilations=(1, 2) * 6, drop_path_rate=0.1)
    return _create_nat_isotropic('dinat_isotropic_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_isotropic_base(pretrained=False, **kwargs) -> NATIsotropic:
    """Isotropic DiNAT-Base (patch 16, NA / DiNA (dilation 2) alternating) @ 224x224, trained ImageNet-1k"""
    model_args = dict(embed_dim=768, depth=12, num_heads=24, dilations=(1, 2) * 6, drop_path_rate=0.4)
    return _create_nat_isotropic('dinat_isotropic_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_nano(pretrained=False, **kwargs) -> NAT:
    """DiNAT-style model for training from scratch on 28x28 single-channel images (Fashion-MNIST), no weights.

    NAT tokenizer (stride 4) -> 7x7 map with 3x3 NA and DiNA (dilation 2) blocks, then 4x4 and 2x2 stages.
    """
    model_args = dict(
        embed_dim=32, depths=(2, 2, 1), num_heads=(1, 2, 4), kernel_size=3, dilations=((1, 2), (1, 1), (1,)),
        mlp_ratio=2.)
    return _create_nat('nat_nano', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_nat(pretrained=False, **kwargs) -> NAT:
    """Tiny NAT / DiNAT for tests, no weights."""
    model_args = dict(
        embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), kernel_size=3,
        dilations=((2,), (1,), (1, 2), (1,)), mlp_ratio=2., ls_init_value=1e-5)
    return _create_nat('test_nat', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_nat_isotropic(pretrained=False, **kwargs) -> NATIsotropic:
    """Tiny isotropic NAT / DiNAT for tests, no weights."""
    model_args = dict(embed_dim=32, depth=4, num_heads=1, kernel_size=3, dilations=(1, 2, 1, 2), mlp_ratio=2.)
    return _create_nat_isotropic('test_nat_isotropic', pretrained=pretrained, **dict(model_args, **kwargs))
