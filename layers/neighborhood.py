"""Neighborhood attention layers (NAT / DiNAT) over channels-last feature maps.

:class:`NeighborhoodAttention2d` holds the parameters the published NAT / DiNAT checkpoints expect
(``qkv``, ``rpb``, ``proj``) and runs :func:`foveal.kernels.na2d` on q, k, v sliced in place from
the fused projection. It also applies the published small-input rule (SPEC section 1.2): a map
smaller than ``kernel_size * dilation`` on an axis is zero-padded on the right / bottom *before*
the qkv projection (padded tokens carry the projection biases and are attended to), then cropped
after attention.

The fused op has no dropout on attention probabilities and cannot be compiled by TorchScript, so
the layer keeps an explicit path (gathered neighborhoods, dense softmax) that it takes under
``torch.jit.script`` and while training with ``attn_drop > 0``. It follows the same window rule and
is checked against the op in the tests.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm.layers import trunc_normal_

from foveal.kernels import na2d

__all__ = ["NeighborhoodAttention2d"]


def _axis_neighbors(length: int, kernel_size: int, dilation: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Key coordinates ``[length, kernel_size]`` of every query on one axis and their bias indices.

    Non-causal, stride 1: the window of ``kernel_size`` keys from the query's dilation group,
    shifted inward at the borders; the bias index is ``(key - query) / dilation + kernel_size - 1``.
    """
    i = torch.arange(length, device=device)
    group = i % dilation
    c = torch.div(i, dilation, rounding_mode="floor")
    group_len = torch.div(length - group + dilation - 1, dilation, rounding_mode="floor")
    start = torch.minimum((c - kernel_size // 2).clamp(min=0), group_len - kernel_size)
    j = start[:, None] + torch.arange(kernel_size, device=device)[None, :]
    return j * dilation + group[:, None], j - c[:, None] + kernel_size - 1


class NeighborhoodAttention2d(nn.Module):
    """Multi-head 2-D (dilated) neighborhood attention with relative positional bias."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 7,
            dilation: int = 1,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            backend: str = "auto",
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Number of input and output channels.
            num_heads: Number of attention heads; must divide ``dim``.
            kernel_size: Neighborhood size per axis (>= 2).
            dilation: Dilation per axis (>= 1). Maps smaller than ``kernel_size * dilation`` are
                padded (see the module docstring), so any input size works.
            qkv_bias: Add a learnable bias to the fused q, k, v projection.
            attn_drop: Dropout on the attention probabilities (training only; uses the explicit path).
            proj_drop: Dropout after the output projection.
            backend: Neighborhood-attention backend passed to :func:`foveal.kernels.na2d`.
        """
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        for name, value, minimum in (("dim", dim, 1), ("num_heads", num_heads, 1), ("kernel_size", kernel_size, 2),
                                     ("dilation", dilation, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"NeighborhoodAttention2d: {name} must be an int >= {minimum}, got {name}={value!r}")
        if dim % num_heads:
            raise ValueError(
                f"NeighborhoodAttention2d: num_heads must divide dim, got dim={dim}, num_heads={num_heads}"
            )
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.scale = self.head_dim ** -0.5
        self.backend = backend

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.rpb = nn.Parameter(torch.empty(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1, **dd))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0. else nn.Identity()  # no call when unused
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialize the relative positional bias (trunc-normal, std .02)."""
        trunc_normal_(self.rpb, std=.02)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}")

    @torch.jit.unused
    def _fused_attn(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return na2d(q, k, v, self.kernel_size, self.dilation, rpb=self.rpb, scale=self.scale, backend=self.backend)

    def _explicit_attn(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, H, W, heads, head_dim = q.shape
        K = self.kernel_size
        key_h, rel_h = _axis_neighbors(H, K, self.dilation, q.device)
        key_w, rel_w = _axis_neighbors(W, K, self.dilation, q.device)
        idx_h = key_h[:, None, :, None].expand(H, W, K, K)
        idx_w = key_w[None, :, None, :].expand(H, W, K, K)
        k = k[:, idx_h, idx_w].flatten(3, 4)  # B, H, W, K*K, heads, head_dim
        v = v[:, idx_h, idx_w].flatten(3, 4)
        attn = torch.einsum("bxyhd,bxynhd->bxyhn", q * self.scale, k)
        bias = self.rpb[:, rel_h[:, None, :, None], rel_w[None, :, None, :]]  # heads, H, W, K, K
        attn = attn + bias.flatten(3, 4).permute(1, 2, 0, 3).to(attn.dtype)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return torch.einsum("bxyhn,bxynhd->bxyhd", attn, v)

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x: Input features ``(B, H, W, C)``.

        Returns:
            Output features ``(B, H, W, C)``.
        """
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(
                f"NeighborhoodAttention2d: expected input (B, H, W, C={self.dim}), got shape {list(x.shape)}"
            )
        B, H, W, C = x.shape
        window = self.kernel_size * self.dilation
        pad_h = max(0, window - H)
        pad_w = max(0, window - W)
        padded = pad_h > 0 or pad_w > 0
        if padded:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        qkv = self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(3)  # each B, Hp, Wp, heads, head_dim (strided views)
        if torch.jit.is_scripting() or (self.training and self.attn_drop.p > 0.):
            x = self._explicit_attn(q, k, v)
        else:
            x = self._fused_attn(q, k, v)
        x = x.reshape(B, Hp, Wp, C)
        if padded:
            x = x[:, :H, :W]
        x = self.proj(x)
        x = self.proj_drop(x)
        return x
