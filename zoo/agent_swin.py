""" Agent-Swin: Swin Transformers with agent attention

A PyTorch impl of:
* `Agent Attention: On the Integration of Softmax and Linear Attention` - https://arxiv.org/abs/2312.08874

Architecture, variants and checkpoint layout follow the authors' code
(https://github.com/LeapLabTHU/Agent-Attention, on the Swin Transformer code base, MIT licence, Copyright (c)
2021 Microsoft). The weights are the authors' (`checkpoint['model']` of their release files);
`checkpoint_filter_fn` renames their keys when the weights are loaded.

Each stage holds "A" blocks (agent attention over the whole stage map, `foveal.layers.AgentAttention` on
`foveal.kernels.agent_attention`) and "B" blocks (timm's W-MSA / SW-MSA Swin blocks); the per-stage
layout is a string such as AAAB, AABB or AAMB2 ("M2": two A blocks, then B). The bias tables of the A
blocks are resized to the map of any input size, and `dense_agent_num` pools more agents for dense tasks.
"""
import re
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from timm.layers import ClassifierHead, DropPath, Mlp, PatchEmbed, calculate_drop_path_rates, to_2tuple, \
    trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model, \
    register_notrace_module
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock

from ._checkpoint import load_release_weights, release_cfg
from ._staged import StagedTimmMixin
from .layers import AgentAttention
from .layers.agent import squeeze_agent_tables

__all__ = ['AgentSwinTransformer']  # model_registry will add each entrypoint fn to this

_int_or_tuple_2_t = Union[int, Tuple[int, int]]



def _stage_sizes(grid: Tuple[int, int], num_stages: int) -> List[Tuple[int, int]]:
    """Map of each stage: the patch grid, then halved (rounded up: patch merging pads odd maps)."""
    sizes = [tuple(grid)]
    for _ in range(num_stages - 1):
        sizes.append(tuple((s + 1) // 2 for s in sizes[-1]))
    return sizes


def _resize_rel_pos_table(table: torch.Tensor, old_window: Tuple[int, int], new_window: Tuple[int, int]) -> torch.Tensor:
    """A ((2h-1)(2w-1), heads) relative position table resized bicubically (align_corners=False), as the
    authors resize it when fine-tuning at another window."""
    if tuple(old_window) == tuple(new_window):
        return table
    heads = table.shape[1]
    src = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    dst = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    t = table.float().transpose(0, 1).reshape(1, heads, src[0], src[1])
    t = F.interpolate(t, size=dst, mode='bicubic', align_corners=False)
    return t.reshape(heads, dst[0] * dst[1]).transpose(0, 1).contiguous().to(table.dtype)


class SwinWindowBlock(SwinTransformerBlock):
    """timm's W-MSA / SW-MSA block (a "B" block; shift masks built for the map of each call) whose
    `set_input_size` resizes the relative position table bicubically, as the authors' fine-tuning does."""

    def set_input_size(self, feat_size: Tuple[int, int], window_size: Tuple[int, int],
                       always_partition: Optional[bool] = None) -> None:
        old_window = self.window_size
        table = self.attn.relative_position_bias_table
        super().set_input_size(feat_size=feat_size, window_size=window_size, always_partition=always_partition)
        if self.window_size != old_window:
            with torch.no_grad():
                resized = _resize_rel_pos_table(table.detach(), old_window, self.window_size)
            self.attn.relative_position_bias_table = nn.Parameter(resized, requires_grad=table.requires_grad)


# leaves for torch.fx: the agent bias tables are resized to the traced map and the op is a custom op; the
# B blocks pad and mask the traced map
register_notrace_module(AgentAttention)
register_notrace_module(SwinWindowBlock)


def _block_types(layout: str, depths: Sequence[int]) -> List[str]:
    """'AAMB2' -> one string of 'A' / 'B' per stage ('M<k>': k agent blocks, then Swin blocks)."""
    num_stages = len(depths)
    kinds, extra = layout[:num_stages], layout[num_stages:]
    if len(kinds) != num_stages or any(c not in 'ABM' for c in kinds) or ('M' in kinds) != bool(extra) \
            or (extra and not extra.isdigit()):
        raise ValueError(f"attn_type must give one of 'A', 'B', 'M' per stage and, with 'M', the number of agent "
                         f"blocks of that stage (e.g. 'AAMB2'), got attn_type={layout!r} for depths={tuple(depths)}")
    return [''.join(('A' if j < int(extra) else 'B') if c == 'M' else c for j in range(d)) for c, d in zip(kinds, depths)]


class AgentSwinBlock(nn.Module):
    """Swin-style block with agent attention over the whole map ("A" block)."""

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
            act_layer: Any = nn.GELU,
            norm_layer: Any = nn.LayerNorm,
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
            qkv_bias: Bias in the qkv projection.
            proj_drop: Dropout rate after the projections.
            drop_path: Stochastic depth rate.
            act_layer: Activation layer.
            norm_layer: Normalization layer.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = AgentAttention(
            dim, num_heads=num_heads, agent_num=agent_num, window_size=self.input_resolution, qkv_bias=qkv_bias,
            agent_shape=agent_shape, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def set_input_size(self, feat_size: Tuple[int, int], window_size: Tuple[int, int],
                       always_partition: Optional[bool] = None) -> None:
        """Resize the row / column tables to a new stage map (the window is always the whole map)."""
        self.input_resolution = tuple(feat_size)
        self.attn.set_window_size(self.input_resolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: Input features (B, H, W, C).

        Returns:
            Output features (B, H, W, C).
        """
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        x = x + self.drop_path1(self.attn(self.norm1(x), (H, W)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


class AgentSwinStage(nn.Module):
    """One stage: patch merging (all but the first), then A / B blocks on channels-last maps."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            input_resolution: Tuple[int, int],
            depth: int,
            num_heads: int,
            block_types: str,
            downsample: bool = True,
            agent_num: int = 49,
            agent_shape: Optional[Tuple[int, int]] = None,
            window_size: _int_or_tuple_2_t = 7,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: Union[List[float], float] = 0.,
            norm_layer: Any = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Number of input channels.
            out_dim: Number of output channels.
            input_resolution: Map of the blocks (after the patch merging).
            depth: Number of blocks.
            num_heads: Number of attention heads.
            block_types: 'A' (agent) or 'B' (Swin W-MSA / SW-MSA) for each block.
            downsample: Start with a 2x2 patch merging (else the input already has out_dim channels).
            agent_num: Agents of the A blocks' bias tables.
            agent_shape: Pooled agent grid of the A blocks for dense tasks.
            window_size: Window of the B blocks (shifted by half in every second block).
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            qkv_bias: Bias in the qkv projections.
            proj_drop: Projection dropout rate.
            attn_drop: Attention dropout rate of the B blocks.
            drop_path: Stochastic depth rate, one per block or one for all.
            norm_layer: Normalization layer.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if len(block_types) != depth:
            raise ValueError(f'block_types must give one type per block, got {block_types!r} for depth={depth}')
        self.input_resolution = tuple(input_resolution)
        self.grad_checkpointing = False
        window_size = to_2tuple(window_size)
        if downsample:
            self.downsample = PatchMerging(dim=dim, out_dim=out_dim, norm_layer=norm_layer, **dd)
        else:
            if dim != out_dim:
                raise ValueError(f'a stage without downsampling keeps its width, got dim={dim}, out_dim={out_dim}')
            self.downsample = nn.Identity()
        blocks = []
        for i, kind in enumerate(block_types):
            dp = drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path
            if kind == 'A':
                blocks.append(AgentSwinBlock(
                    out_dim, self.input_resolution, num_heads, agent_num=agent_num, agent_shape=agent_shape,
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop, drop_path=dp, norm_layer=norm_layer,
                    **dd))
            else:
                blocks.append(SwinWindowBlock(
                    out_dim, self.input_resolution, num_heads=num_heads, window_size=window_size,
                    shift_size=0 if i % 2 == 0 else (window_size[0] // 2, window_size[1] // 2), dynamic_mask=True,
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop, drop_path=dp,
                    norm_layer=norm_layer, **dd))
        self.blocks = nn.Sequential(*blocks)

    def set_input_size(self, feat_size: Tuple[int, int], window_size: Tuple[int, int]) -> None:
        """Push a new map (and B-block window) down to the blocks."""
        self.input_resolution = tuple(feat_size)
        for block in self.blocks:
            block.set_input_size(feat_size=self.input_resolution, window_size=window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H', W', C')."""
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


class AgentSwinTransformer(StagedTimmMixin, nn.Module):
    """Agent-Swin: Swin Transformer stages of agent ("A") and shifted-window ("B") blocks."""

    _stem_name = 'patch_embed'
    _stages_name = 'layers'

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
            embed_dim: int = 96,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            attn_type: str = 'AAAB',
            agent_num: Tuple[int, ...] = (9, 16, 49, 49),
            dense_agent_num: Optional[Tuple[int, ...]] = None,
            window_size: Optional[_int_or_tuple_2_t] = None,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            norm_layer: Any = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: Input image size the bias tables are sized to (other sizes resize them on the fly).
            patch_size: Patch size of the embedding.
            in_chans: Number of input image channels.
            num_classes: Number of classes for classification head.
            global_pool: Global pooling type.
            embed_dim: Width of the first stage (doubled per stage).
            depths: Number of blocks per stage.
            num_heads: Number of attention heads per stage.
            attn_type: Block layout: 'A' / 'B' / 'M' per stage, then with 'M' the number of A blocks
                that open that stage (AAAB, AABB, AAMB2).
            agent_num: Agents per stage in the bias tables (perfect squares).
            dense_agent_num: Agents pooled per stage for dense tasks (perfect squares, e.g. 81, 144,
                196, 49); the tables keep agent_num and are resized over the agent grid.
            window_size: Window of the B blocks; default the authors' rule max(7, stage-1 map // 8)
                (7 at 224, 9 at 288, 12 at 384).
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            qkv_bias: Bias in the qkv projections.
            drop_rate: Dropout rate before the classifier.
            proj_drop_rate: Dropout rate after the projections and in the MLPs.
            attn_drop_rate: Attention dropout rate of the B blocks.
            drop_path_rate: Stochastic depth rate (linear over blocks, from 0).
            norm_layer: Normalization layer.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        if len(num_heads) != num_stages or len(agent_num) != num_stages or \
                (dense_agent_num is not None and len(dense_agent_num) != num_stages):
            raise ValueError(f'num_heads, agent_num and dense_agent_num must give one value per stage, got '
                             f'depths={depths}, num_heads={num_heads}, agent_num={agent_num}, '
                             f'dense_agent_num={dense_agent_num}')
        block_types = _block_types(attn_type, depths)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = 'NHWC'
        self.num_layers = num_stages
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (num_stages - 1))
        self.feature_info = []

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, norm_layer=norm_layer,
            strict_img_size=False, output_fmt='NHWC', **dd)
        grid = self.patch_embed.grid_size
        if window_size is None:
            window_size = max(7, min(grid) // 8)
        self.window_size = to_2tuple(window_size)
        agent_shapes = [None] * num_stages
        if dense_agent_num is not None:
            agent_shapes = []
            for m in dense_agent_num:
                side = int(round(m ** 0.5))
                if side * side != m:
                    raise ValueError(f'dense_agent_num must hold perfect squares, got {dense_agent_num}')
                agent_shapes.append((side, side))

        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        layers = []
        in_dim = embed_dim
        stage_sizes = _stage_sizes(grid, num_stages)
        for i in range(num_stages):
            out_dim = int(embed_dim * 2 ** i)
            layers += [AgentSwinStage(
                dim=in_dim,
                out_dim=out_dim,
                input_resolution=stage_sizes[i],
                depth=depths[i],
                num_heads=num_heads[i],
                block_types=block_types[i],
                downsample=i > 0,
                agent_num=agent_num[i],
                agent_shape=agent_shapes[i],
                window_size=self.window_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                **dd,
            )]
            in_dim = out_dim
            self.feature_info += [dict(num_chs=out_dim, reduction=patch_size * 2 ** i, module=f'layers.{i}')]
        self.layers = nn.Sequential(*layers)

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

    def set_input_size(
            self,
            img_size: Optional[Tuple[int, int]] = None,
            window_size: Optional[_int_or_tuple_2_t] = None,
    ) -> None:
        """Make the model the one built for a new input size, its tables resized as the authors resize them
        for fine-tuning (the model runs at any size without it).

        The row / column tables of the A blocks are resized linearly to the new stage maps (what the
        forward does on the fly at any size); the B blocks take the window and shift a model built at
        that size has (a map larger than the window gets its shifted windows back), and a new window
        resizes their relative position tables bicubically. The result equals a model created with
        ``img_size`` (and ``window_size``) loading this model's weights through `checkpoint_filter_fn`.

        Args:
            img_size: New input resolution.
            window_size: New window of the B blocks; None keeps the current one.
        """
        if img_size is not None:
            self.patch_embed.set_input_size(img_size=img_size)
        if window_size is not None:
            self.window_size = to_2tuple(window_size)
        sizes = _stage_sizes(self.patch_embed.grid_size, len(self.layers))
        for stage, size in zip(self.layers, sizes):
            stage.set_input_size(feat_size=size, window_size=self.window_size)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The B blocks' relative position tables (the agent bias tables are decayed, as the authors did)."""
        return {n for n, _ in self.named_parameters() if 'relative_position_bias_table' in n}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, H/32, W/32, C') normalized features."""
        x = self.patch_embed(x)
        x = self.layers(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _resize_row_col(name: str, v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Row / column agent tables (4-D layout) of a checkpoint trained at another size, resized to the model's."""
    if name.endswith(('ah_bias', 'aw_bias')):
        size = target.shape[-2:]
        return torch.nn.functional.interpolate(v.float(), size=size, mode='bilinear').to(target.dtype)
    size = target.shape[1:3]  # ha / wa: H, h, w, n
    v = torch.nn.functional.interpolate(v.permute(0, 3, 1, 2).float(), size=size, mode='bilinear')
    return v.permute(0, 2, 3, 1).to(target.dtype)


def resize_agent_tables(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Resize the row / column agent tables (linearly) and Swin relative position tables (bicubically, square
    windows) of a state dict in this module's layout to the model's shapes (a checkpoint of another input
    size), as the authors' fine-tuning loader does. Release-layout (5-D) row / column tables become 4-D."""
    state_dict = squeeze_agent_tables(state_dict)
    if model is None:
        return state_dict
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        target = own.get(k)
        if target is not None and target.shape != v.shape:
            if k.endswith(('ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')):
                v = _resize_row_col(k, v, target)
            elif k.endswith('relative_position_bias_table'):
                old = int(round((v.shape[0] ** 0.5 + 1) / 2))
                new = int(round((target.shape[0] ** 0.5 + 1) / 2))
                v = _resize_rel_pos_table(v, (old, old), (new, new))
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert the authors' Agent-Swin checkpoints to this module's layout.

    Accepts the release files' layout (patch merging at the end of stage i as `layers.{i}.downsample`,
    `head`, the persistent `relative_position_index` / `attn_mask` buffers), wrapped in 'model' (or
    'state_dict_ema'), and this module's own layout. Row / column agent tables and relative position
    tables of another input size are resized to the model's.
    """
    if 'model' in state_dict:
        state_dict = state_dict['model']
    elif 'state_dict_ema' in state_dict:
        state_dict = state_dict['state_dict_ema']
    if 'head.fc.weight' in state_dict:
        return resize_agent_tables(dict(state_dict), model)
    out_dict = {}
    for k, v in state_dict.items():
        if k.endswith(('relative_position_index', 'attn_mask')):
            continue
        k = re.sub(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) + 1}.downsample', k)
        k = re.sub(r'^head\.', 'head.fc.', k)
        out_dict[k] = v
    return resize_agent_tables(out_dict, model)


def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    depths = kwargs.get('depths', (2, 2, 6, 2))
    out_indices = kwargs.pop('out_indices', tuple(range(len(depths))))
    return build_model_with_cfg(
        AgentSwinTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


_IN1K_LABELS = tuple(ImageNetInfo('imagenet-1k').label_names())


def _cfg(**kwargs) -> Dict[str, Any]:
    """Eval transform of the authors' ImageNet recipe: square resize to 224 / 0.875, centre crop, bicubic."""
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': .875, 'crop_mode': 'squash', 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head.fc',
        'license': 'mit', 'label_names': _IN1K_LABELS,
        'paper_ids': 'arXiv:2312.08874', 'origin_url': 'https://github.com/LeapLabTHU/Agent-Attention',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # the authors' release files (agent_transformer/README.md), Tsinghua Cloud; they pickle a yacs config
    # beside the weights: timm downloads them under a file name and load_pretrained opens them weights-only
    'agent_swin_tiny.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/a2ddc1190c224f768a41/?dl=1', 'agent_swin_tiny-in1k.pth')),
    'agent_swin_small.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/f607172c9fea4d6e99bb/?dl=1', 'agent_swin_small-in1k.pth')),
    'agent_swin_base.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/4fcd2d0114bb490483c3/?dl=1', 'agent_swin_base-in1k.pth')),
    # fine-tuned from the 224 models; evaluated at their size without a crop (TEST.CROP False)
    'agent_swin_small_288.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/09760394e93b4046a25e/?dl=1', 'agent_swin_small_288-in1k.pth'),
                                      input_size=(3, 288, 288), pool_size=(9, 9), crop_pct=1.0),
    'agent_swin_base_384.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/bb84ee9058954706a557/?dl=1', 'agent_swin_base_384-in1k.pth'),
                                     input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
    'test_agent_swin': _cfg(input_size=(3, 64, 64), pool_size=(2, 2), label_names=None, license='apache-2.0',
                            paper_ids=None, origin_url=None),
})


@register_model
def agent_swin_tiny(pretrained=False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-T (AAAB) @ 224, trained on ImageNet-1k."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), attn_type='AAAB')
    return _create_agent_swin('agent_swin_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_small(pretrained=False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-S (AABB) @ 224, trained on ImageNet-1k."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), attn_type='AABB')
    return _create_agent_swin('agent_swin_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_base(pretrained=False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-B (AAMB2) @ 224, trained on ImageNet-1k."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), attn_type='AAMB2')
    return _create_agent_swin('agent_swin_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_small_288(pretrained=False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-S (AABB) @ 288 (B windows 9), fine-tuned from the 224 model on ImageNet-1k."""
    model_args = dict(img_size=288, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), attn_type='AABB')
    return _create_agent_swin('agent_swin_small_288', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_base_384(pretrained=False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-B (AAMB2) @ 384 (B windows 12), fine-tuned from the 224 model on ImageNet-1k."""
    model_args = dict(img_size=384, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), attn_type='AAMB2')
    return _create_agent_swin('agent_swin_base_384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_agent_swin(pretrained=False, **kwargs) -> AgentSwinTransformer:
    """Tiny Agent-Swin for tests (A, M1 and B stages, a shifted window), no weights."""
    model_args = dict(img_size=64, embed_dim=12, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), attn_type='AAMB1',
                      agent_num=(4, 4, 4, 4), window_size=2)
    return _create_agent_swin('test_agent_swin', pretrained=pretrained, **dict(model_args, **kwargs))
