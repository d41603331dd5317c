""" Agent-CSwin: CSWin Transformers with agent attention in the first two stages

A PyTorch impl of:
* `Agent Attention: On the Integration of Softmax and Linear Attention` - https://arxiv.org/abs/2312.08874
  (ECCV 2024), on the host of
* `CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows` -
  https://arxiv.org/abs/2107.00652

Architecture, variants and checkpoint layout follow the authors' code (https://github.com/LeapLabTHU/Agent-Attention,
`agent_transformer/models/agent_cswin.py`, on Microsoft's CSWin, MIT licence). The weights are the authors'
(`checkpoint['model']`, or the EMA copy `checkpoint['state_dict_ema']` that their CSwin runs also keep);
`checkpoint_filter_fn` renames their keys when the weights are loaded.

A 7x7 stride-4 conv + LN stem, then four stages (a 3x3 stride-2 conv + LN between them) of pre-norm blocks:
one fused qkv Linear, attention, an output Linear, and an MLP. The released models (layout "AABB") run
agent attention ("A") in stages 1-2, over the whole stage map with 9 / 16 agents (`foveal.kernels.agent_attention`,
biases broadcast over the batch), and CSWin's cross-shaped window attention ("B") in stages 3-4: half the
heads in vertical stripes, half in horizontal stripes, of width 7 (the last stage attends its whole map),
each adding a depthwise 3x3 conv of v taken inside its stripe (LePE). Any input size runs: the agent
biases are resized to the map (the 7x7 tables bilinearly, the row / column tables linearly, as the authors
resize them for fine-tuning), and a stripe that does not fit at the map's edge is narrower there.
"""
import re
from typing import Any, Dict, List, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from timm.layers import ClassifierHead, DropPath, calculate_drop_path_rates, to_2tuple, to_ntuple, \
    trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model, \
    register_notrace_module

from ._checkpoint import load_release_weights, release_cfg
from ._staged import StagedTimmMixin
from .kernels import agent_attention
from .layers import AddLayerNorm, RecomputeMlp
from .layers.agent import AgentTablesMixin, squeeze_agent_tables

__all__ = ['AgentCSWin']  # model_registry will add each entrypoint fn to this

_int_or_tuple_2_t = Union[int, Tuple[int, int]]

# the row / column bias tables: (the dim of their length, agents last) in the modules' 4-D layout (the
# release files add a leading singleton dim: foveal.layers.agent.squeeze_agent_tables)
_AGENT_TABLES = {'ah_bias': (2, False), 'aw_bias': (3, False), 'ha_bias': (1, True), 'wa_bias': (2, True)}


def _resize_table(table: torch.Tensor, name: str, size: int) -> torch.Tensor:
    """A row / column bias table (4-D layout, see ``_AGENT_TABLES``) linearly resized along its length."""
    if name == 'ah_bias':  # the entries of _AGENT_TABLES (TorchScript reads no global dict)
        dim, agents_last = 2, False
    elif name == 'aw_bias':
        dim, agents_last = 3, False
    elif name == 'ha_bias':
        dim, agents_last = 1, True
    else:
        dim, agents_last = 2, True
    if table.shape[dim] == size:
        return table
    shape = list(table.shape)
    heads, length = shape[0], shape[dim]
    agents = table.numel() // (heads * length)
    t = table.reshape(heads, length, agents).transpose(1, 2) if agents_last else table.reshape(heads, agents, length)
    t = F.interpolate(t, size=size, mode='linear', align_corners=False)  # heads, agents, size
    shape[dim] = size
    return (t.transpose(1, 2) if agents_last else t).reshape(shape)


class CSWinAgentAttention(AgentTablesMixin, nn.Module):
    """Agent attention over the whole map, plus a depthwise 3x3 conv of v (the "A" branch of a block)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            agent_num: int = 49,
            table_size: _int_or_tuple_2_t = 56,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Channels of q, k and v.
            num_heads: Number of attention heads; must divide ``dim``.
            agent_num: Agents, a square (they are the q map average-pooled to a sqrt x sqrt grid).
            table_size: Size (h, w) of the row / column bias tables, the stage map at the training resolution.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        pool = int(round(agent_num ** 0.5))
        if dim % num_heads:
            raise ValueError(f'CSWinAgentAttention: num_heads must divide dim, got dim={dim}, num_heads={num_heads}')
        if agent_num < 1 or pool * pool != agent_num:
            raise ValueError(f'CSWinAgentAttention: agent_num must be a square, got agent_num={agent_num}')
        self.dim = dim
        self.num_heads = num_heads
        self.agent_num = agent_num
        self.pool_size = pool
        self.scale = (dim // num_heads) ** -0.5
        h, w = to_2tuple(table_size)
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.an_bias = nn.Parameter(torch.empty(num_heads, agent_num, 7, 7, **dd))
        self.na_bias = nn.Parameter(torch.empty(num_heads, agent_num, 7, 7, **dd))
        self.ah_bias = nn.Parameter(torch.empty(num_heads, agent_num, h, 1, **dd))
        self.aw_bias = nn.Parameter(torch.empty(num_heads, agent_num, 1, w, **dd))
        self.ha_bias = nn.Parameter(torch.empty(num_heads, h, 1, agent_num, **dd))
        self.wa_bias = nn.Parameter(torch.empty(num_heads, 1, w, agent_num, **dd))
        for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            trunc_normal_(p, std=.02)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, agent_num={self.agent_num}, '
                f'table_size={tuple(self.ah_bias.shape[2:3]) + tuple(self.aw_bias.shape[3:])}')

    @torch.no_grad()
    def set_table_size(self, table_size: _int_or_tuple_2_t) -> None:
        """Resize the row / column tables in place (the authors' rule for fine-tuning at another size)."""
        h, w = to_2tuple(table_size)
        for name, size in (('ah_bias', h), ('aw_bias', w), ('ha_bias', h), ('wa_bias', w)):
            table = getattr(self, name)
            setattr(self, name, nn.Parameter(_resize_table(table.detach(), name, size),
                                             requires_grad=table.requires_grad))

    def biases(self, H: int, W: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The composed agent <- key ``[heads, n, H * W]`` and query <- agent ``[heads, H * W, n]`` biases."""
        heads, n = self.num_heads, self.agent_num
        ah = _resize_table(self.ah_bias, 'ah_bias', H)  # heads, n, H, 1
        aw = _resize_table(self.aw_bias, 'aw_bias', W)  # heads, n, 1, W
        ha = _resize_table(self.ha_bias, 'ha_bias', H)  # heads, H, 1, n
        wa = _resize_table(self.wa_bias, 'wa_bias', W)  # heads, 1, W, n
        an = F.interpolate(self.an_bias, size=(H, W), mode='bilinear', align_corners=False)  # heads, n, H, W
        na = F.interpolate(self.na_bias, size=(H, W), mode='bilinear', align_corners=False)
        bias_ak = (an + ah + aw).reshape(heads, n, H * W)
        bias_qa = na.reshape(heads, n, H * W).transpose(1, 2) + (ha + wa).reshape(heads, H * W, n)
        return bias_ak, bias_qa

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor,
                  bias_ak: torch.Tensor, bias_qa: torch.Tensor) -> torch.Tensor:
        # the same two softmaxes as foveal.kernels.agent_attention, for TorchScript (which cannot call the op)
        q, k, v, agents = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), agents.transpose(1, 2)
        agent_v = ((agents * self.scale) @ k.transpose(-2, -1) + bias_ak).softmax(dim=-1) @ v  # B, heads, n, d
        out = ((q * self.scale) @ agents.transpose(-2, -1) + bias_qa).softmax(dim=-1) @ agent_v
        return out.transpose(1, 2)  # B, N, heads, d

    @torch.jit.unused
    def _fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor,
               bias_ak: torch.Tensor, bias_qa: torch.Tensor) -> torch.Tensor:
        return agent_attention(q, k, v, agents, bias_ak, bias_qa, self.scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """
        Args:
            q, k, v: Maps ``(B, H, W, dim)`` (strided slices of the block's qkv output are read in place).

        Returns:
            Attention output plus the conv of v, ``(B, H, W, dim)``.
        """
        B, H, W, C = q.shape
        heads = self.num_heads
        agents = F.adaptive_avg_pool2d(q.permute(0, 3, 1, 2), self.pool_size)  # B, C, p, p
        agents = agents.flatten(2).transpose(1, 2).reshape(B, self.agent_num, heads, C // heads)
        bias_ak, bias_qa = self.biases(H, W)
        qh = q.reshape(B, H * W, heads, C // heads)
        kh = k.reshape(B, H * W, heads, C // heads)
        vh = v.reshape(B, H * W, heads, C // heads)
        if torch.jit.is_scripting():
            out = self._explicit(qh, kh, vh, agents, bias_ak, bias_qa)
        else:
            out = self._fused(qh, kh, vh, agents, bias_ak, bias_qa)
        lepe = self.get_v(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # B, H, W, C
        return out.reshape(B, H, W, C) + lepe


def _windows(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(B, H, W, C) maps -> (B * H / wh * W / ww, wh, ww, C) windows, row-major."""
    B, H, W, C = x.shape
    return x.reshape(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, C)


class CSWinStripeAttention(nn.Module):
    """CSWin's LePE attention in stripes of one orientation (or over the whole map): the "B" branches of a block."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mode: str = 'vertical',
            split_size: int = 7,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Channels of q, k and v.
            num_heads: Number of attention heads; must divide ``dim``.
            mode: 'vertical' (full-height stripes ``split_size`` wide), 'horizontal' (full-width stripes
                ``split_size`` high) or 'full' (the whole map, CSWin's last stage).
            split_size: Stripe width; the last stripe of a map that is not a multiple of it is narrower.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if mode not in ('vertical', 'horizontal', 'full'):
            raise ValueError(f"CSWinStripeAttention: mode must be 'vertical', 'horizontal' or 'full', got {mode!r}")
        if dim % num_heads:
            raise ValueError(f'CSWinStripeAttention: num_heads must divide dim, got dim={dim}, num_heads={num_heads}')
        if split_size < 1:
            raise ValueError(f'CSWinStripeAttention: split_size must be >= 1, got split_size={split_size}')
        self.dim = dim
        self.num_heads = num_heads
        self.mode = mode
        self.split_size = split_size
        self.scale = (dim // num_heads) ** -0.5
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, mode={self.mode}, split_size={self.split_size}'

    def _windows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
        """Attention inside each wh x ww window of maps (B, H, W, C) whose sides are multiples of (wh, ww)."""
        B, H, W, C = q.shape
        nh, nw, heads = H // wh, W // ww, self.num_heads
        qw, kw, vw = _windows(q, wh, ww), _windows(k, wh, ww), _windows(v, wh, ww)
        lepe = self.get_v(vw.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # zero padding at the window's border
        qw, kw, vw = [t.reshape(-1, wh * ww, heads, C // heads).transpose(1, 2) for t in (qw, kw, vw)]
        out = F.scaled_dot_product_attention(qw, kw, vw, scale=self.scale)  # B', heads, wh * ww, d
        out = out.transpose(1, 2).reshape(-1, wh, ww, C) + lepe
        return out.reshape(B, nh, nw, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """
        Args:
            q, k, v: Maps ``(B, H, W, dim)``.

        Returns:
            Attention output plus the conv of v, ``(B, H, W, dim)``.
        """
        B, H, W, C = q.shape
        if self.mode == 'full':
            return self._windows(q, k, v, H, W)
        vertical = self.mode == 'vertical'
        length = W if vertical else H
        axis = 2 if vertical else 1
        s = self.split_size
        full = length // s * s
        parts: List[torch.Tensor] = []
        if full > 0:
            qs, ks, vs = q.narrow(axis, 0, full), k.narrow(axis, 0, full), v.narrow(axis, 0, full)
            parts.append(self._windows(qs, ks, vs, H, s) if vertical else self._windows(qs, ks, vs, s, W))
        if full < length:  # the stripe at the map's edge is narrower
            r = length - full
            qs, ks, vs = q.narrow(axis, full, r), k.narrow(axis, full, r), v.narrow(axis, full, r)
            parts.append(self._windows(qs, ks, vs, H, r) if vertical else self._windows(qs, ks, vs, r, W))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)


class AgentCSWinBlock(nn.Module):
    """Pre-norm block: qkv Linear, agent or cross-shaped attention, output Linear, then an MLP."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            attn_type: str = 'B',
            single_branch: bool = False,
            split_size: int = 7,
            agent_num: int = 49,
            table_size: _int_or_tuple_2_t = 56,
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
            attn_type: 'A' (agent attention over the whole map) or 'B' (cross-shaped window attention).
            single_branch: 'B' only: one full-map branch with every head (CSWin's last stage) instead of
                a vertical- and a horizontal-stripe half.
            split_size: Stripe width of the 'B' branches.
            agent_num: Agents of the 'A' attention.
            table_size: Map size at the training resolution ('A' bias tables).
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            qkv_bias: Bias in the qkv Linear.
            proj_drop: Dropout after the output Linear and in the MLP.
            drop_path: Stochastic depth rate.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if attn_type not in ('A', 'B'):
            raise ValueError(f"AgentCSWinBlock: attn_type must be 'A' or 'B', got {attn_type!r}")
        if attn_type == 'B' and not single_branch and (num_heads % 2 or dim % 2):
            raise ValueError(f'AgentCSWinBlock: cross-shaped attention halves dim and num_heads, got dim={dim}, '
                             f'num_heads={num_heads}')
        self.dim = dim
        self.norm1 = AddLayerNorm(dim, **dd)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        if attn_type == 'A':
            self.attns = nn.ModuleList([CSWinAgentAttention(dim, num_heads, agent_num, table_size, **dd)])
        elif single_branch:
            self.attns = nn.ModuleList([CSWinStripeAttention(dim, num_heads, 'full', split_size, **dd)])
        else:
            self.attns = nn.ModuleList([
                CSWinStripeAttention(dim // 2, num_heads // 2, mode, split_size, **dd)
                for mode in ('vertical', 'horizontal')])
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0. else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = AddLayerNorm(dim, **dd)
        self.mlp = RecomputeMlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def _attn(self, h: torch.Tensor) -> torch.Tensor:
        C = self.dim
        qkv = self.qkv(h)  # B, H, W, 3C: q | k | v
        if len(self.attns) == 2:
            c = C // 2
            outs: List[torch.Tensor] = []
            for i, attn in enumerate(self.attns):  # channels [0, C/2) vertical stripes, [C/2, C) horizontal
                outs.append(attn(qkv[..., i * c:(i + 1) * c], qkv[..., C + i * c:C + (i + 1) * c],
                                 qkv[..., 2 * C + i * c:2 * C + (i + 1) * c]))
            out = torch.cat(outs, dim=-1)
        else:
            out = self.attns[0](qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:])
        return self.proj_drop(self.proj(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: Input features (B, H, W, C).

        Returns:
            Output features (B, H, W, C).
        """
        y = self.drop_path1(self._attn(self.norm1(x)))
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


class ConvNormDown(nn.Module):
    """A strided conv (NCHW) then LayerNorm over channels-last maps: the stem and CSWin's merge blocks."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, padding: int, device=None,
                 dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, **dd)
        self.norm = nn.LayerNorm(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H', W', C')."""
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class AgentCSWinStage(nn.Module):
    """One stage: a 3x3 stride-2 conv + LN (except the first), then blocks on channels-last maps."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            depth: int,
            num_heads: int,
            attn_type: str = 'B',
            last_stage: bool = False,
            split_size: int = 7,
            agent_num: int = 49,
            feat_size: Tuple[int, int] = (56, 56),
            downsample: bool = True,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
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
            num_heads: Number of attention heads.
            attn_type: 'A' (agent) or 'B' (cross-shaped) blocks.
            last_stage: 'B' blocks attend the whole map with one branch (CSWin's last stage).
            split_size: Stripe width of the 'B' blocks.
            agent_num: Agents of the 'A' blocks.
            feat_size: Stage map at the training resolution (sizes the 'A' bias tables; a square map
                equal to ``split_size`` also makes 'B' blocks single-branch, as in CSWin).
            downsample: Start with a 3x3 stride-2 conv + LN (else the input already has out_dim channels).
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            qkv_bias: Bias in the qkv Linears.
            proj_drop: Projection dropout rate.
            drop_path: Stochastic depth rate, one per block or one for all.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = ConvNormDown(dim, out_dim, 3, 2, 1, **dd)
        else:
            if dim != out_dim:
                raise ValueError(f'a stage without downsampling keeps its width, got dim={dim}, out_dim={out_dim}')
            self.downsample = None
        single = last_stage or (feat_size[0] == feat_size[1] == split_size)
        self.blocks = nn.Sequential(*[
            AgentCSWinBlock(
                dim=out_dim,
                num_heads=num_heads,
                attn_type=attn_type,
                single_branch=single,
                split_size=split_size,
                agent_num=agent_num,
                table_size=feat_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop,
                drop_path=drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path,
                **dd,
            )
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H', W', C')."""
        if self.downsample is not None:
            x = self.downsample(x.permute(0, 3, 1, 2))
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


class AgentCSWin(StagedTimmMixin, nn.Module):
    """Agent-CSwin: a conv stem, four stages of agent / cross-shaped attention blocks, LN, pool, Linear."""

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official release file; timm calls this for the release URLs of the cfgs
        (see ``foveal._checkpoint.release_cfg``)."""
        load_release_weights(self, checkpoint_path, checkpoint_filter_fn)

    def __init__(
            self,
            img_size: _int_or_tuple_2_t = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 64,
            depths: Tuple[int, ...] = (2, 4, 18, 1),
            num_heads: Tuple[int, ...] = (2, 4, 8, 16),
            attn_types: Union[str, Sequence[str]] = 'AABB',
            split_size: Union[int, Tuple[int, ...]] = (1, 2, 7, 7),
            agent_num: Union[int, Tuple[int, ...]] = (9, 16, 49, 49),
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: Training input size; sizes the agent bias tables (other inputs resize them on the fly).
            in_chans: Number of input image channels.
            num_classes: Number of classes for classification head.
            global_pool: Global pooling type.
            embed_dim: Width of the first stage (doubled by each later stage).
            depths: Number of blocks per stage.
            num_heads: Attention heads per stage.
            attn_types: Per stage, 'A' (agent attention over the whole map) or 'B' (cross-shaped windows).
            split_size: Stripe width of the 'B' blocks, per stage.
            agent_num: Agents of the 'A' blocks, per stage (squares).
            mlp_ratio: Ratio of mlp hidden dim to embedding dim.
            qkv_bias: Bias in the qkv Linears.
            drop_rate: Dropout rate before the classifier.
            proj_drop_rate: Dropout after the attention projections and in the MLPs.
            drop_path_rate: Stochastic depth rate (linear over blocks, from 0).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        attn_types = tuple(attn_types)
        if len(num_heads) != num_stages or len(attn_types) != num_stages:
            raise ValueError(f'num_heads and attn_types must give one value per stage, got depths={depths}, '
                             f'num_heads={num_heads}, attn_types={attn_types}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = 'NHWC'
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        split_sizes = to_ntuple(num_stages)(split_size)
        agent_nums = to_ntuple(num_stages)(agent_num)
        self.img_size = to_2tuple(img_size)

        self.stem = ConvNormDown(in_chans, embed_dim, 7, 4, 2, **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        stages = []
        in_dim = embed_dim
        for i in range(num_stages):
            stages += [AgentCSWinStage(
                dim=in_dim,
                out_dim=dims[i],
                depth=depths[i],
                num_heads=num_heads[i],
                attn_type=attn_types[i],
                last_stage=i == num_stages - 1,
                split_size=split_sizes[i],
                agent_num=agent_nums[i],
                feat_size=self._feat_size(i),
                downsample=i > 0,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                drop_path=dpr[i],
                **dd,
            )]
            in_dim = dims[i]
            self.feature_info += [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)

        self.norm = nn.LayerNorm(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            input_fmt=self.output_fmt,
            **dd,
        )
        self.apply(_init_weights)

    def _feat_size(self, i: int) -> Tuple[int, int]:
        # the stem's 7x7 stride-4 conv (padding 2) and each 3x3 stride-2 conv (padding 1)
        h, w = [(s - 3) // 4 + 1 for s in self.img_size]
        for _ in range(i):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        return h, w

    @torch.jit.ignore
    def set_input_size(self, img_size: _int_or_tuple_2_t) -> None:
        """Make ``img_size`` the size the agent bias tables are stored at (resizing them, as for fine-tuning).

        Any input size runs without this; it changes which size the tables are kept (and trained) at.
        """
        self.img_size = to_2tuple(img_size)
        for i, stage in enumerate(self.stages):
            for block in stage.blocks:
                for attn in block.attns:
                    if isinstance(attn, CSWinAgentAttention):
                        attn.set_table_size(self._feat_size(i))

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """No parameter beyond timm's 1-D ones (norms, biases) is excluded (the authors decay the bias tables)."""
        return set()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, H/32, W/32, C') normalized features."""
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


# leaves for torch.fx: the attentions size their windows and biases from the input, and call a custom op;
# the MLP's training path is an autograd.Function and the norm's eager path a custom op
register_notrace_module(CSWinAgentAttention)
register_notrace_module(CSWinStripeAttention)
register_notrace_module(RecomputeMlp)
register_notrace_module(AddLayerNorm)

_OFFICIAL_RENAMES = (
    (r'^stage1_conv_embed\.0\.', 'stem.conv.'),
    (r'^stage1_conv_embed\.2\.', 'stem.norm.'),
    (r'^merge(\d+)\.', lambda m: f'stages.{m.group(1)}.downsample.'),
    (r'^stage(\d+)\.(\d+)\.', lambda m: f'stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.'),
    (r'^head\.', 'head.fc.'),
)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert the authors' Agent-CSwin checkpoints to this module's layout.

    Accepts the release files' layout (`stage1_conv_embed.{0,2}`, `stage{s}.{j}`, `merge{i}`, `head`), either
    the EMA weights (`state_dict_ema`, preferred when present) or `model` of a checkpoint, or a bare state
    dict, with or without a `module.` prefix, and this module's own layout. Row / column agent-bias tables
    of another size than the model's (a checkpoint trained at another resolution) are resized linearly,
    as the authors do when fine-tuning.
    """
    for key in ('state_dict_ema', 'model'):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    state_dict = squeeze_agent_tables(state_dict)
    official = 'stem.conv.weight' not in state_dict
    out_dict = {}
    for k, v in state_dict.items():
        if official:
            for pattern, repl in _OFFICIAL_RENAMES:
                k = re.sub(pattern, repl, k)
        out_dict[k] = v
    if model is not None:
        target = model.state_dict()
        for k, v in out_dict.items():
            name = k.rsplit('.', 1)[-1]
            if name in _AGENT_TABLES and k in target and v.shape != target[k].shape:
                dim = _AGENT_TABLES[name][0]
                out_dict[k] = _resize_table(v, name, target[k].shape[dim])
    return out_dict


def _create_agent_cswin(variant: str, pretrained: bool = False, **kwargs) -> AgentCSWin:
    depths = kwargs.get('depths', (2, 4, 18, 1))
    out_indices = kwargs.pop('out_indices', tuple(range(len(depths))))
    return build_model_with_cfg(
        AgentCSWin, variant, pretrained,
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
        'first_conv': 'stem.conv', 'classifier': 'head.fc',
        'license': 'mit', 'label_names': _IN1K_LABELS,
        'paper_ids': 'arXiv:2312.08874', 'origin_url': 'https://github.com/LeapLabTHU/Agent-Attention',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # the release files on Tsinghua Cloud, from the authors' agent_transformer/README.md
    'agent_cswin_tiny.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/8c562a74441e46d5902b/?dl=1', 'agent_cswin_tiny-in1k.pth')),
    'agent_cswin_small.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/30eb8af675bc4b7a8747/?dl=1', 'agent_cswin_small-in1k.pth')),
    'agent_cswin_base.in1k': _cfg(**release_cfg('https://cloud.tsinghua.edu.cn/f/c8035b0839b2410c8c9f/?dl=1', 'agent_cswin_base-in1k.pth')),
    'agent_cswin_base_384.in1k': _cfg(
        **release_cfg('https://cloud.tsinghua.edu.cn/f/1239be0df44b47719432/?dl=1', 'agent_cswin_base_384-in1k.pth'),
        input_size=(3, 384, 384),
        pool_size=(12, 12)),
    'test_agent_cswin': _cfg(
        input_size=(3, 64, 64), pool_size=(2, 2), label_names=None, license='apache-2.0', paper_ids=None,
        origin_url=None),
})


@register_model
def agent_cswin_tiny(pretrained=False, **kwargs) -> AgentCSWin:
    """Agent-CSwin-T @ 224, trained on ImageNet-1k."""
    model_args = dict(embed_dim=64, depths=(2, 4, 18, 1), num_heads=(2, 4, 8, 16))
    return _create_agent_cswin('agent_cswin_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_cswin_small(pretrained=False, **kwargs) -> AgentCSWin:
    """Agent-CSwin-S @ 224, trained on ImageNet-1k."""
    model_args = dict(embed_dim=64, depths=(3, 6, 29, 2), num_heads=(2, 4, 8, 16))
    return _create_agent_cswin('agent_cswin_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_cswin_base(pretrained=False, **kwargs) -> AgentCSWin:
    """Agent-CSwin-B @ 224, trained on ImageNet-1k."""
    model_args = dict(embed_dim=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32))
    return _create_agent_cswin('agent_cswin_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_cswin_base_384(pretrained=False, **kwargs) -> AgentCSWin:
    """Agent-CSwin-B @ 384 (stripes of 12), fine-tuned from the 224 model on ImageNet-1k."""
    model_args = dict(img_size=384, embed_dim=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32),
                      split_size=(1, 2, 12, 12))
    return _create_agent_cswin('agent_cswin_base_384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_agent_cswin(pretrained=False, **kwargs) -> AgentCSWin:
    """Tiny Agent-CSwin for tests (agent stages with 4 / 9 agents, two-stripe and full-map stages), no weights."""
    model_args = dict(img_size=64, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4), split_size=(1, 2, 2, 2),
                      agent_num=(4, 9, 4, 4), mlp_ratio=2.)
    return _create_agent_cswin('test_agent_cswin', pretrained=pretrained, **dict(model_args, **kwargs))
