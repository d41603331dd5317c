""" Agent-PVT: Pyramid Vision Transformers with agent attention

A PyTorch impl of:
* `Agent Attention: On the Integration of Softmax and Linear Attention` - https://arxiv.org/abs/2312.08874

Architecture, variants and checkpoint layout follow the authors' code (https://github.com/LeapLabTHU/Agent-Attention,
on PVT v1). The weights are the authors' (`checkpoint['model']` of their release files); `checkpoint_filter_fn`
renames their keys when the weights are loaded.

Four stages of a strided-conv patch embedding (4x4, then 2x2) with LayerNorm, a learned position
embedding (resized bilinearly to the map of any input size) and pre-norm blocks of global agent
attention (`foveal.layers.AgentAttention`, q and kv projections, no spatial reduction) and an MLP; no
final norm: the tokens are averaged and classified.
"""
import re
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from timm.layers import ClassifierHead, DropPath, Mlp, calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model, \
    register_notrace_function, register_notrace_module

from ._checkpoint import load_release_weights, release_cfg
from ._staged import StagedTimmMixin
from .agent_swin import resize_agent_tables
from .layers import AgentAttention

__all__ = ['AgentPVT']  # model_registry will add each entrypoint fn to this

_int_or_tuple_2_t = Union[int, Tuple[int, int]]

# a leaf for torch.fx: the bias tables are resized to the traced map, the op is a custom op
register_notrace_module(AgentAttention)


@register_notrace_function  # sizes come from the traced map
def resize_pos_embed(pos_embed: torch.Tensor, old_size: Tuple[int, int], new_size: Tuple[int, int],
                     mode: str = 'bilinear') -> torch.Tensor:
    """A ``(1, h0 * w0, C)`` position embedding as a ``(1, h, w, C)`` map, resized (align_corners=False)
    when ``(h, w) != (h0, w0)``: bilinear as the authors' forward at other sizes, bicubic as their
    fine-tuning loader."""
    h0, w0 = old_size[0], old_size[1]
    h, w = new_size[0], new_size[1]
    pos = pos_embed.reshape(1, h0, w0, -1)
    if h != h0 or w != w0:
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode=mode, align_corners=False)
        pos = pos.permute(0, 2, 3, 1)
    return pos


class AgentPvtBlock(nn.Module):
    """Pre-norm agent attention + MLP on channels-last maps."""

    def __init__(
            self,
            dim: int,
            input_resolution: Tuple[int, int],
            num_heads: int,
            agent_num: int = 49,
            agent_shape: Optional[Tuple[int, int]] = None,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Number of channels.
            input_resolution: Stage map the row / column bias tables are sized to.
            num_heads: Number of attention heads.
            agent_num: Agents of the bias tables (a perfect square).
            agent_shape: Pooled agent grid for dense tasks (None: the tables' grid).
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            qkv_bias: Bias in the q and kv projections.
            proj_drop: Dropout rate after the projections.
            drop_path: Stochastic depth rate.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.attn = AgentAttention(
            dim, num_heads=num_heads, agent_num=agent_num, window_size=input_resolution, qkv_bias=qkv_bias,
            fused_qkv=False, agent_shape=agent_shape, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        x = x + self.drop_path1(self.attn(self.norm1(x), (H, W)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


class AgentPvtPatchEmbed(nn.Module):
    """Strided conv + LayerNorm; NCHW image or channels-last map in, channels-last map out."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, **dd)
        self.norm = nn.LayerNorm(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class AgentPvtStage(nn.Module):
    """Patch embedding, position embedding (resized to the map), agent blocks."""

    def __init__(
            self,
            in_chans: int,
            dim: int,
            input_resolution: Tuple[int, int],
            depth: int,
            num_heads: int,
            patch_size: int = 2,
            agent_num: int = 49,
            agent_shape: Optional[Tuple[int, int]] = None,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            drop_path: Union[List[float], float] = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chans: Input channels.
            dim: Number of channels.
            input_resolution: Map (after the patch embedding) the position embedding and bias tables are sized to.
            depth: Number of blocks.
            num_heads: Number of attention heads.
            patch_size: Stride of the patch embedding.
            agent_num: Agents of the bias tables.
            agent_shape: Pooled agent grid for dense tasks.
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            qkv_bias: Bias in the q and kv projections.
            proj_drop: Projection dropout rate.
            drop_path: Stochastic depth rate, one per block or one for all.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.input_resolution = tuple(input_resolution)
        self.patch_embed = AgentPvtPatchEmbed(in_chans, dim, patch_size, **dd)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.input_resolution[0] * self.input_resolution[1], dim, **dd))
        self.blocks = nn.Sequential(*[
            AgentPvtBlock(
                dim, self.input_resolution, num_heads, agent_num=agent_num, agent_shape=agent_shape,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
                drop_path=drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path, **dd)
            for i in range(depth)])
        trunc_normal_(self.pos_embed, std=.02)

    @torch.no_grad()
    def set_input_size(self, feat_size: Tuple[int, int]) -> None:
        """Resize the position embedding (bicubic) and the row / column tables (linear) to a new map, as
        the authors' fine-tuning loader does."""
        feat_size = tuple(feat_size)
        if feat_size == self.input_resolution:
            return
        pos = resize_pos_embed(self.pos_embed, self.input_resolution, feat_size, mode='bicubic')
        pos = pos.reshape(1, -1, self.pos_embed.shape[-1])
        self.pos_embed = nn.Parameter(pos.contiguous(), requires_grad=self.pos_embed.requires_grad)
        self.input_resolution = feat_size
        for block in self.blocks:
            block.attn.set_window_size(feat_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H', W', C')."""
        x = self.patch_embed(x)
        x = x + resize_pos_embed(self.pos_embed, self.input_resolution, (x.shape[1], x.shape[2]))
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


class AgentPVT(StagedTimmMixin, nn.Module):
    """Agent-PVT: a four-stage pyramid of agent-attention blocks, token mean, Linear."""

    # no final norm; the stem (patch and position embeddings) belongs to the first stage, which takes
    # NCHW input, so group_matcher and forward_intermediates are the model's own
    _final_norm = False

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official release file; timm calls this for the release URLs of the cfgs
        (see ``foveal._checkpoint.release_cfg``)."""
        load_release_weights(self, checkpoint_path, checkpoint_filter_fn)

    def __init__(
            self,
            img_size: _int_or_tuple_2_t = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Tuple[int, ...] = (64, 128, 320, 512),
            depths: Tuple[int, ...] = (2, 2, 2, 2),
            num_heads: Tuple[int, ...] = (1, 2, 5, 8),
            mlp_ratios: Tuple[float, ...] = (8., 8., 4., 4.),
            agent_num: Tuple[int, ...] = (9, 16, 49, 49),
            dense_agent_num: Optional[Tuple[int, ...]] = None,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: Input image size the position embeddings and bias tables are sized to (other
                sizes resize them on the fly).
            patch_size: Stride of the first patch embedding (the others are 2).
            in_chans: Number of input image channels.
            num_classes: Number of classes for classification head.
            global_pool: Global pooling type.
            embed_dims: Width of each stage.
            depths: Number of blocks per stage.
            num_heads: Number of attention heads per stage.
            mlp_ratios: Ratio of mlp hidden dim to embedding dim, per stage.
            agent_num: Agents per stage in the bias tables (perfect squares).
            dense_agent_num: Agents pooled per stage for dense tasks (perfect squares, e.g. 144, 256,
                784, 784); the tables keep agent_num and are resized over the agent grid.
            qkv_bias: Bias in the q and kv projections.
            drop_rate: Dropout rate before the classifier.
            proj_drop_rate: Dropout rate after the projections and in the MLPs.
            drop_path_rate: Stochastic depth rate (linear over blocks, from 0).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        for name, value in (('embed_dims', embed_dims), ('num_heads', num_heads), ('mlp_ratios', mlp_ratios),
                            ('agent_num', agent_num), ('dense_agent_num', dense_agent_num)):
            if value is not None and len(value) != num_stages:
                raise ValueError(f'{name} must give one value per stage, got {name}={value} for depths={depths}')
        agent_shapes = [None] * num_stages
        if dense_agent_num is not None:
            agent_shapes = []
            for m in dense_agent_num:
                side = int(round(m ** 0.5))
                if side * side != m:
                    raise ValueError(f'dense_agent_num must hold perfect squares, got {dense_agent_num}')
                agent_shapes.append((side, side))
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = 'NHWC'
        self.patch_size = patch_size
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.img_size = to_2tuple(img_size)

        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        stages = []
        in_chs = in_chans
        grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        reduction = patch_size
        for i in range(num_stages):
            if i > 0:
                grid = (grid[0] // 2, grid[1] // 2)
                reduction *= 2
            stages += [AgentPvtStage(
                in_chs, embed_dims[i], grid, depths[i], num_heads[i], patch_size=patch_size if i == 0 else 2,
                agent_num=agent_num[i], agent_shape=agent_shapes[i], mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, drop_path=dpr[i], **dd)]
            in_chs = embed_dims[i]
            self.feature_info += [dict(num_chs=embed_dims[i], reduction=reduction, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(
            self.num_features,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            input_fmt=self.output_fmt,
            **dd,
        )
        self.apply(_init_weights)

    def set_input_size(self, img_size: Optional[_int_or_tuple_2_t] = None) -> None:
        """Make the model the one built for a new input size, its tables resized as the authors resize them
        for fine-tuning: position embeddings bicubic, row / column tables linear (the model runs at any
        size without it, resizing the position embeddings bilinearly as the authors' forward does)."""
        if img_size is None:
            return
        self.img_size = to_2tuple(img_size)
        grid = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        for i, stage in enumerate(self.stages):
            if i > 0:
                grid = (grid[0] // 2, grid[1] // 2)
            stage.set_input_size(grid)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """No parameter beyond timm's 1-D ones is excluded from weight decay (as the authors trained)."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Group parameters for optimization (layer-wise LR decay)."""
        return dict(
            stem=r'^stages\.0\.(?:patch_embed|pos_embed)',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.(?:patch_embed|pos_embed)', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            ]
        )

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
            norm: Unused: the model has no final norm.
            stop_early: Stop iterating over stages when the last desired intermediate is reached.
            output_fmt: Layout of the intermediates, 'NCHW' or 'NHWC'.
            intermediates_only: Only return intermediate features.

        Returns:
            List of intermediate features or tuple of (final features, intermediates).
        """
        take_indices, stages = self._intermediate_stages(indices, stop_early, output_fmt)
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x if i == 0 else x.permute(0, 3, 1, 2))
            if i in take_indices:
                intermediates.append(x.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else x.contiguous())
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, H/32, W/32, C') features (no final norm)."""
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else x.permute(0, 3, 1, 2))  # the next conv reads an NCHW view
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _resize_pos_embed(v: torch.Tensor, target: torch.Tensor, model: 'AgentPVT', stage: int) -> torch.Tensor:
    """A (square) position embedding of another input size, resized bicubically to the model's grid."""
    side = int(round(v.shape[1] ** 0.5))
    pos = resize_pos_embed(v.float(), (side, v.shape[1] // side), model.stages[stage].input_resolution, mode='bicubic')
    return pos.reshape(target.shape).to(target.dtype)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert the authors' Agent-PVT checkpoints to this module's layout.

    Accepts the release files' layout (`patch_embed{s}`, `pos_embed{s}`, `block{s}.{j}`, `head`), wrapped
    in 'model' (or 'state_dict_ema'), and this module's own layout. Position embeddings (bicubic) and row /
    column agent tables (linear) of another input size (square) are resized to the model's, as the authors'
    fine-tuning loader does.
    """
    if 'model' in state_dict:
        state_dict = state_dict['model']
    elif 'state_dict_ema' in state_dict:
        state_dict = state_dict['state_dict_ema']
    if 'head.fc.weight' not in state_dict:
        out_dict = {}
        for k, v in state_dict.items():
            k = re.sub(r'^patch_embed(\d+)\.', lambda m: f'stages.{int(m.group(1)) - 1}.patch_embed.', k)
            k = re.sub(r'^pos_embed(\d+)$', lambda m: f'stages.{int(m.group(1)) - 1}.pos_embed', k)
            k = re.sub(r'^block(\d+)\.(\d+)\.', lambda m: f'stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.', k)
            k = re.sub(r'^head\.', 'head.fc.', k)
            out_dict[k] = v
        state_dict = out_dict
    if model is not None:
        own = model.state_dict()
        state_dict = dict(state_dict)
        for k, v in state_dict.items():
            match = re.match(r'^stages\.(\d+)\.pos_embed$', k)
            if match and k in own and own[k].shape != v.shape:
                state_dict[k] = _resize_pos_embed(v, own[k], model, int(match.group(1)))
    return resize_agent_tables(state_dict, model)


def _create_agent_pvt(variant: str, pretrained: bool = False, **kwargs) -> AgentPVT:
    depths = kwargs.get('depths', (2, 2, 2, 2))
    out_indices = kwargs.pop('out_indices', tuple(range(len(depths))))
    return build_model_with_cfg(
        AgentPVT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


_IN1K_LABELS = tuple(ImageNetInfo('imagenet-1k').label_names())


def _cfg(**kwargs) -> Dict[str, Any]:
    """Eval transform of the authors' ImageNet recipe: square resize to 224 / 0.875, centre crop, bicubic."""
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': .875, 'crop_mode': 'squash', 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stages.0.patch_embed.proj', 'classifier': 'head.fc',
        'license': 'mit', 'label_names': _IN1K_LABELS,
        'paper_ids': 'arXiv:2312.08874', 'origin_url': 'https://github.com/LeapLabTHU/Agent-Attention',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # the authors' release files (agent_transformer/README.md), Tsinghua Cloud; they pickle a yacs config
    # beside the weights: timm downloads them under a file name and load_pretrained opens them weights-only
    'agent_pvt_tiny.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/13fdf0e0a7c5498c934f/?dl=1', 'agent_pvt_tiny-in1k.pth')),
    'agent_pvt_small.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/36b8be9a8863456685a3/?dl=1', 'agent_pvt_small-in1k.pth')),
    'agent_pvt_medium.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/4d00ecacf18b45f9b88c/?dl=1', 'agent_pvt_medium-in1k.pth')),
    'agent_pvt_large.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/040cfe0cfbbe4762ad09/?dl=1', 'agent_pvt_large-in1k.pth')),
    'agent_pvt_medium_256.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/654df734121643b19c52/?dl=1', 'agent_pvt_medium_256-in1k.pth'),
                                      input_size=(3, 256, 256), pool_size=(8, 8)),
    'test_agent_pvt': _cfg(input_size=(3, 64, 64), pool_size=(2, 2), label_names=None, license='apache-2.0',
                           paper_ids=None, origin_url=None),
})

_PVT_ARGS = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4))


@register_model
def agent_pvt_tiny(pretrained=False, **kwargs) -> AgentPVT:
    """Agent-PVT-T @ 224, trained on ImageNet-1k."""
    model_args = dict(_PVT_ARGS, depths=(2, 2, 2, 2))
    return _create_agent_pvt('agent_pvt_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_small(pretrained=False, **kwargs) -> AgentPVT:
    """Agent-PVT-S @ 224, trained on ImageNet-1k."""
    model_args = dict(_PVT_ARGS, depths=(3, 4, 6, 3))
    return _create_agent_pvt('agent_pvt_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_medium(pretrained=False, **kwargs) -> AgentPVT:
    """Agent-PVT-M @ 224, trained on ImageNet-1k."""
    model_args = dict(_PVT_ARGS, depths=(3, 4, 18, 3))
    return _create_agent_pvt('agent_pvt_medium', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_large(pretrained=False, **kwargs) -> AgentPVT:
    """Agent-PVT-L @ 224, trained on ImageNet-1k."""
    model_args = dict(_PVT_ARGS, depths=(3, 8, 27, 3))
    return _create_agent_pvt('agent_pvt_large', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_medium_256(pretrained=False, **kwargs) -> AgentPVT:
    """Agent-PVT-M @ 256, trained on ImageNet-1k."""
    model_args = dict(_PVT_ARGS, img_size=256, depths=(3, 4, 18, 3))
    return _create_agent_pvt('agent_pvt_medium_256', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_agent_pvt(pretrained=False, **kwargs) -> AgentPVT:
    """Tiny Agent-PVT for tests, no weights."""
    model_args = dict(img_size=64, embed_dims=(24, 32, 48, 64), num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2),
                      depths=(1, 1, 2, 1), agent_num=(4, 4, 4, 1))
    return _create_agent_pvt('test_agent_pvt', pretrained=pretrained, **dict(model_args, **kwargs))
