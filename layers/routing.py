"""Bi-level routing attention (BiFormer, SPEC section 3) and the global attention of its last stage.

:class:`BiLevelRoutingAttention` keeps the "legacy" formulation of the released checkpoints: one
Linear gives q, k (``qk_dim`` each) and v (``dim``), rows in that order; routing runs without
gradient on the region means of q and k over all channels (not per head), and the top-k regions
are shared by the heads; the token attention uses the full-width scale ``qk_dim ** -0.5``; a 5x5
depthwise conv on v (LCE) is added before the output Linear. Dense inputs whose size is not a
multiple of ``n_win`` are zero-padded bottom/right before the projection (``auto_pad``; padded
tokens become bias vectors that count in the region means and are not masked) and cropped after.

The token attention is :func:`foveal.kernels.routed_attention` on region-major views of the one
projection (torch's SDPA over all tokens when top-k covers every region); TorchScript takes an
explicit gather path with the same result.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foveal.kernels import routed_attention

__all__ = ["BiLevelRoutingAttention", "AttentionLePE"]


def _check_int(cls: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{cls}: {name} must be an int >= {minimum}, got {name}={value!r}")


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention on channels-last maps (BiFormer's legacy formulation)."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            n_win: int = 7,
            topk: int = 4,
            qk_dim: Optional[int] = None,
            qk_scale: Optional[float] = None,
            side_dwconv: int = 5,
            auto_pad: bool = False,
            proj_drop: float = 0.,
            backend: str = "auto",
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Number of input, value and output channels.
            num_heads: Number of attention heads; must divide ``dim`` and ``qk_dim``.
            n_win: Regions per side (``n_win ** 2`` regions).
            topk: Key regions routed to each query region; ``topk >= n_win ** 2`` is dense attention.
            qk_dim: Width of q and k (default ``dim``).
            qk_scale: Logit scale for routing and attention (default ``qk_dim ** -0.5``, the full width).
            side_dwconv: Kernel of the depthwise LCE conv on v (odd, >= 1).
            auto_pad: Zero-pad inputs bottom/right to multiples of ``n_win`` (dense tasks); without
                it such inputs raise.
            proj_drop: Dropout after the output projection.
            backend: Routed-attention backend passed to :func:`foveal.kernels.routed_attention`.
        """
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        qk_dim = dim if qk_dim is None else qk_dim
        for name, value, minimum in (("dim", dim, 1), ("num_heads", num_heads, 1), ("n_win", n_win, 1),
                                     ("topk", topk, 1), ("qk_dim", qk_dim, 1), ("side_dwconv", side_dwconv, 1)):
            _check_int("BiLevelRoutingAttention", name, value, minimum)
        if dim % num_heads or qk_dim % num_heads:
            raise ValueError(f"BiLevelRoutingAttention: num_heads must divide dim and qk_dim, got dim={dim}, "
                             f"qk_dim={qk_dim}, num_heads={num_heads}")
        if side_dwconv % 2 == 0:
            raise ValueError(f"BiLevelRoutingAttention: side_dwconv must be odd, got side_dwconv={side_dwconv}")
        self.dim = dim
        self.qk_dim = qk_dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.scale = qk_dim ** -0.5 if qk_scale is None else float(qk_scale)
        self.auto_pad = auto_pad
        self.backend = backend

        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, **dd)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0. else nn.Identity()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, qk_dim={self.qk_dim}, num_heads={self.num_heads}, n_win={self.n_win}, "
                f"topk={self.topk}, auto_pad={self.auto_pad}")

    def set_routing(self, n_win: Optional[int] = None, topk: Optional[int] = None) -> None:
        """Change the region grid or top-k (dense tasks raise ``n_win``); the weights are unchanged."""
        if n_win is not None:
            _check_int("BiLevelRoutingAttention", "n_win", n_win, 1)
            self.n_win = n_win
        if topk is not None:
            _check_int("BiLevelRoutingAttention", "topk", topk, 1)
            self.topk = topk

    @torch.jit.unused
    def _fused_attn(self, q: Tensor, k: Tensor, v: Tensor, idx: Optional[Tensor]) -> Tensor:
        if idx is None:  # top-k covers every region: attention over all tokens, torch's SDPA (flash on GPUs)
            B, R, T, heads, _ = q.shape
            q, k, v = (t.reshape(B, R * T, heads, t.shape[-1]).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # B, heads, R * T, head_dim_v
            return out.transpose(1, 2).reshape(B, R, T, heads, out.shape[-1])
        return routed_attention(q, k, v, idx, self.scale, backend=self.backend, check_indices=False)

    def _explicit_attn(self, q: Tensor, k: Tensor, v: Tensor, idx: Optional[Tensor]) -> Tensor:
        B, R, T, heads, _ = q.shape
        if idx is not None:  # the gather formulation: a top-k-fold copy of k and v
            batch = torch.arange(B, device=q.device)[:, None, None]
            k = k[batch, idx].flatten(2, 3)  # B, R, topk * T, heads, qk_head_dim
            v = v[batch, idx].flatten(2, 3)
        else:
            k = k.reshape(B, 1, R * T, heads, k.shape[-1])
            v = v.reshape(B, 1, R * T, heads, v.shape[-1])
        attn = torch.einsum("brqhd,brkhd->brhqk", q * self.scale, k).softmax(dim=-1)
        return torch.einsum("brhqk,brkhe->brqhe", attn, v)

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x: Input features ``(B, H, W, C)``.

        Returns:
            Output features ``(B, H, W, C)``.
        """
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"BiLevelRoutingAttention: expected input (B, H, W, C={self.dim}), "
                             f"got shape {list(x.shape)}")
        B, H, W, C = x.shape
        S = self.n_win
        pad_h, pad_w = (S - H % S) % S, (S - W % S) % S
        if pad_h or pad_w:
            if not self.auto_pad:
                raise ValueError(f"BiLevelRoutingAttention: H and W must be multiples of n_win={S} "
                                 f"(or set auto_pad=True), got shape {list(x.shape)}")
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        rh, rw = Hp // S, Wp // S
        R, T = S * S, rh * rw
        heads, qk = self.num_heads, self.qk_dim

        qkv = self.qkv(x)  # B, Hp, Wp, 2 * qk + C
        regions = qkv.reshape(B, S, rh, S, rw, 2 * qk + C).permute(0, 1, 3, 2, 4, 5).reshape(B, R, T, 2 * qk + C)
        q, k, v = regions.split([qk, qk, C], dim=-1)  # B, R, T, * (strided views)

        idx: Optional[Tensor] = None
        if self.topk < R:
            with torch.no_grad():  # routing: region means over all channels, one graph for all heads
                q_r, k_r = q.detach().mean(2), k.detach().mean(2)  # B, R, qk
                affinity = (q_r * self.scale) @ k_r.transpose(-1, -2)  # B, R, R
                idx = torch.topk(affinity, k=self.topk, dim=-1).indices  # B, R, topk
        q = q.unflatten(-1, (heads, qk // heads))
        k = k.unflatten(-1, (heads, qk // heads))
        v = v.unflatten(-1, (heads, C // heads))
        if torch.jit.is_scripting():
            out = self._explicit_attn(q, k, v, idx)
        else:
            out = self._fused_attn(q, k, v, idx)
        out = out.reshape(B, S, S, rh, rw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        out = out + self.lepe(qkv[..., 2 * qk:].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # NCHW view of v
        out = self.proj_drop(self.proj(out))
        if pad_h or pad_w:
            out = out[:, :H, :W].contiguous()
        return out


class AttentionLePE(nn.Module):
    """Global multi-head self-attention plus a depthwise "LePE" conv of the input (BiFormer stage 4)."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            side_dwconv: int = 5,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Number of input and output channels.
            num_heads: Number of attention heads; must divide ``dim``.
            qkv_bias: Add a learnable bias to the fused q, k, v projection.
            side_dwconv: Kernel of the depthwise conv on the input (odd, >= 1).
            proj_drop: Dropout after the output projection.
        """
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads), ("side_dwconv", side_dwconv)):
            _check_int("AttentionLePE", name, value, 1)
        if dim % num_heads:
            raise ValueError(f"AttentionLePE: num_heads must divide dim, got dim={dim}, num_heads={num_heads}")
        if side_dwconv % 2 == 0:
            raise ValueError(f"AttentionLePE: side_dwconv must be odd, got side_dwconv={side_dwconv}")
        self.dim = dim
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0. else nn.Identity()
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **dd)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x: Input features ``(B, H, W, C)``.

        Returns:
            Output features ``(B, H, W, C)``.
        """
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"AttentionLePE: expected input (B, H, W, C={self.dim}), got shape {list(x.shape)}")
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B, heads, N, head_dim
        out = F.scaled_dot_product_attention(q, k, v)  # scale (C / heads) ** -0.5
        out = out.transpose(1, 2).reshape(B, H, W, C) + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out))
