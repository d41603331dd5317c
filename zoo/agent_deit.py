""" Agent-DeiT: DeiT with agent attention

A PyTorch impl of:
* `Agent Attention: On the Integration of Softmax and Linear Attention` - https://arxiv.org/abs/2312.08874

Architecture, variants and checkpoint layout follow the authors' code (https://github.com/LeapLabTHU/Agent-Attention,
on timm's DeiT / ViT). The weights are the authors' (`checkpoint['model']` of their release files), in
timm's ViT layout already; `checkpoint_filter_fn` unwraps them and resizes size-dependent tables.

A ViT (patch 16, class token, learned position embedding) whose first `agent_layer` blocks use agent
attention with class-token biases (`foveal.layers.AgentAttention(cls_token=True)`: agents pool the
patch tokens only), the rest plain multi-head self-attention. The position embedding and the agents'
row / column tables are resized to the patch grid of any input size (bicubic and linear, as the authors
resize them for fine-tuning).
"""
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from timm.layers import DropPath, Mlp, PatchEmbed, calculate_drop_path_rates, get_device_dtype, to_2tuple, \
    trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_function, \
    register_notrace_module
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from ._checkpoint import load_release_weights, release_cfg
from .agent_swin import resize_agent_tables
from .layers import AgentAttention

__all__ = ['AgentDeiT']  # model_registry will add each entrypoint fn to this

_int_or_tuple_2_t = Union[int, Tuple[int, int]]

# a leaf for torch.fx: the bias tables are resized to the traced map, the op is a custom op
register_notrace_module(AgentAttention)


@register_notrace_function  # sizes come from the traced map
def resize_pos_embed(pos_embed: torch.Tensor, old_size: Tuple[int, int], new_size: Tuple[int, int]) -> torch.Tensor:
    """A ``(1, 1 + h0 * w0, C)`` position embedding (class token first) for an ``(h, w)`` patch grid: the
    grid part resized bicubically (align_corners=False), as the authors' fine-tuning loader resizes it."""
    h0, w0 = old_size[0], old_size[1]
    h, w = new_size[0], new_size[1]
    if h == h0 and w == w0:
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, h0, w0, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(h, w), mode='bicubic', align_corners=False).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


class GlobalAttention(nn.Module):
    """Multi-head self-attention over all tokens (the plain blocks of Agent-DeiT-B), SDPA."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_drop: float = 0.,
                 device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'GlobalAttention: num_heads must divide dim, got dim={dim}, num_heads={num_heads}')
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """(B, N, C) tokens -> (B, N, C); size (the patch grid) is unused."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # B, heads, N, head_dim
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class AgentDeiTBlock(nn.Module):
    """Pre-norm attention (agent or global) + MLP on (B, 1 + N, C) tokens."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            agent_num: Optional[int] = 49,
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
            num_heads: Number of attention heads.
            grid_size: Patch grid the agents' row / column tables are sized to.
            agent_num: Agents (a perfect square); None for global self-attention.
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            qkv_bias: Bias in the qkv projection.
            proj_drop: Dropout rate after the projections.
            drop_path: Stochastic depth rate.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        if agent_num is None:
            self.attn = GlobalAttention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop, **dd)
        else:
            self.attn = AgentAttention(dim, num_heads=num_heads, agent_num=agent_num, window_size=grid_size,
                                       qkv_bias=qkv_bias, cls_token=True, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """(B, 1 + H * W, C) tokens of an (H, W) patch grid -> same."""
        x = x + self.drop_path1(self.attn(self.norm1(x), size))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _init_weights(module: nn.Module, name: str = '') -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class AgentDeiT(nn.Module):
    """Agent-DeiT: a ViT / DeiT with agent attention in its first blocks."""

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official release file; timm calls this for the release URLs of the cfgs
        (see ``foveal._checkpoint.release_cfg``)."""
        load_release_weights(self, checkpoint_path, checkpoint_filter_fn)

    def __init__(
            self,
            img_size: _int_or_tuple_2_t = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            agent_num: int = 49,
            agent_layer: Optional[int] = None,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: Input image size the position embedding and bias tables are sized to (other sizes
                resize them on the fly).
            patch_size: Patch size.
            in_chans: Number of input image channels.
            num_classes: Number of classes for classification head.
            global_pool: 'token' (class token), 'avg' (mean of the patch tokens) or '' (all tokens).
            embed_dim: Width.
            depth: Number of blocks.
            num_heads: Number of attention heads.
            agent_num: Agents of the agent blocks (a perfect square).
            agent_layer: Number of leading agent blocks (the rest global self-attention); None: all.
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            qkv_bias: Bias in the qkv projections.
            drop_rate: Dropout rate before the classifier.
            pos_drop_rate: Dropout rate after the position embedding.
            proj_drop_rate: Dropout rate after the projections and in the MLPs.
            drop_path_rate: Stochastic depth rate (linear over blocks, from 0).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if global_pool not in ('token', 'avg', ''):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        agent_layer = depth if agent_layer is None else agent_layer
        if not 0 <= agent_layer <= depth:
            raise ValueError(f'agent_layer must be in [0, depth={depth}], got agent_layer={agent_layer}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      strict_img_size=False, output_fmt='NHWC', **dd)
        grid = self.patch_embed.grid_size
        self.pos_grid = grid  # the patch grid the position embedding holds
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate) if pos_drop_rate > 0. else nn.Identity()
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            AgentDeiTBlock(
                embed_dim, num_heads, grid, agent_num=agent_num if i < agent_layer else None, mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, proj_drop=proj_drop_rate, drop_path=dpr[i], **dd)
            for i in range(depth)])
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(_init_weights)

    @torch.no_grad()
    def set_input_size(self, img_size: Optional[_int_or_tuple_2_t] = None) -> None:
        """Make the model the one built for a new input size, its tables resized as the authors resize them
        for fine-tuning (position embedding bicubic, row / column tables linear); the forward resizes them
        the same way on the fly at any size."""
        if img_size is None:
            return
        self.patch_embed.set_input_size(img_size=to_2tuple(img_size))
        grid = self.patch_embed.grid_size
        if grid == self.pos_grid:
            return
        pos = resize_pos_embed(self.pos_embed, self.pos_grid, grid)
        self.pos_embed = nn.Parameter(pos.contiguous(), requires_grad=self.pos_embed.requires_grad)
        self.pos_grid = grid
        for block in self.blocks:
            if isinstance(block.attn, AgentAttention):
                block.attn.set_window_size(grid)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Position embedding and class token, as DeiT."""
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Group parameters for optimization (layer-wise LR decay)."""
        return dict(
            stem=r'^cls_token|pos_embed|patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable gradient checkpointing."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """Get the classifier head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Reset the classifier head.

        Args:
            num_classes: Number of classes for new classifier, 0 to remove it.
            global_pool: 'token', 'avg' or '', unchanged if None.
        """
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('token', 'avg', ''):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.patch_embed(x)  # B, H, W, C
        B, H, W, C = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, H * W, C)], dim=1)
        return self.pos_drop(x + resize_pos_embed(self.pos_embed, self.pos_grid, (H, W))), (H, W)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates (block outputs, patch tokens as maps).

        Args:
            x: Input image tensor (B, C, H, W).
            indices: Take last n blocks if int, all if None, select matching indices if sequence.
            norm: Apply the final norm to every intermediate.
            stop_early: Stop iterating over blocks when the last desired intermediate is reached.
            output_fmt: Layout of the intermediates, 'NCHW' or 'NLC' (patch tokens, class token dropped).
            intermediates_only: Only return intermediate features.

        Returns:
            List of intermediate features or tuple of (final features, intermediates).
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, size = self._embed(x)
        B = x.shape[0]
        last = len(self.blocks) - 1 if torch.jit.is_scripting() or not stop_early else max_index
        for i, block in enumerate(self.blocks):
            if i > last:
                break
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, size)
            else:
                x = block(x, size)
            if i in take_indices:
                y = self.norm(x) if norm else x
                y = y[:, self.num_prefix_tokens:]
                if output_fmt == 'NCHW':
                    y = y.reshape(B, size[0], size[1], -1).permute(0, 3, 1, 2)
                intermediates.append(y.contiguous())
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

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
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, 1 + H/16 * W/16, C) normalized tokens."""
        x, size = self._embed(x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, size)
            else:
                x = block(x, size)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool ('token': class token, 'avg': patch-token mean) and classify the tokens."""
        if self.global_pool == 'token':
            x = x[:, 0]
        elif self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Unwrap the authors' Agent-DeiT checkpoints ('model' or 'state_dict_ema'; the keys are this module's).

    A position embedding (bicubic) or row / column agent tables (linear) of another input size (square) are
    resized to the model's, as the authors' fine-tuning loader does.
    """
    if 'model' in state_dict:
        state_dict = state_dict['model']
    elif 'state_dict_ema' in state_dict:
        state_dict = state_dict['state_dict_ema']
    state_dict = dict(state_dict)
    if model is not None and 'pos_embed' in state_dict and state_dict['pos_embed'].shape != model.pos_embed.shape:
        v = state_dict['pos_embed']
        side = int(round((v.shape[1] - 1) ** 0.5))
        state_dict['pos_embed'] = resize_pos_embed(v, (side, side), model.pos_grid)
    return resize_agent_tables(state_dict, model)


def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs) -> AgentDeiT:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        AgentDeiT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


_IN1K_LABELS = tuple(ImageNetInfo('imagenet-1k').label_names())


def _cfg(**kwargs) -> Dict[str, Any]:
    """Eval transform of the authors' ImageNet recipe: square resize to 224 / 0.875, centre crop, bicubic."""
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .875, 'crop_mode': 'squash', 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'license': 'mit', 'label_names': _IN1K_LABELS,
        'paper_ids': 'arXiv:2312.08874', 'origin_url': 'https://github.com/LeapLabTHU/Agent-Attention',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # the authors' release files (agent_transformer/README.md), Tsinghua Cloud; they pickle a yacs config
    # beside the weights: timm downloads them under a file name and load_pretrained opens them weights-only
    'agent_deit_tiny.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/57e0904221824ee7b7af/?dl=1', 'agent_deit_tiny-in1k.pth')),
    'agent_deit_small.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/fdd43304372541db8ea7/?dl=1', 'agent_deit_small-in1k.pth')),
    'agent_deit_base.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/5115f15fdd7e4ab58fbc/?dl=1', 'agent_deit_base-in1k.pth')),
    'test_agent_deit': _cfg(
        input_size=(3, 64, 64), label_names=None, license='apache-2.0', paper_ids=None, origin_url=None),
})


@register_model
def agent_deit_tiny(pretrained=False, **kwargs) -> AgentDeiT:
    """Agent-DeiT-T @ 224 (49 agents in every block), trained on ImageNet-1k."""
    model_args = dict(embed_dim=192, depth=12, num_heads=3, agent_num=49)
    return _create_agent_deit('agent_deit_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_small(pretrained=False, **kwargs) -> AgentDeiT:
    """Agent-DeiT-S @ 224 (49 agents in every block), trained on ImageNet-1k."""
    model_args = dict(embed_dim=384, depth=12, num_heads=6, agent_num=49)
    return _create_agent_deit('agent_deit_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_base(pretrained=False, **kwargs) -> AgentDeiT:
    """Agent-DeiT-B @ 224 (81 agents in the first 4 blocks), trained on ImageNet-1k."""
    model_args = dict(embed_dim=768, depth=12, num_heads=12, agent_num=81, agent_layer=4)
    return _create_agent_deit('agent_deit_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_agent_deit(pretrained=False, **kwargs) -> AgentDeiT:
    """Tiny Agent-DeiT for tests (two agent blocks, one global), no weights."""
    model_args = dict(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, agent_num=4, agent_layer=2)
    return _create_agent_deit('test_agent_deit', pretrained=pretrained, **dict(model_args, **kwargs))
