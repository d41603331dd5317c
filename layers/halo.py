"""Halo attention layer (HaloNet): a drop-in for ``timm.layers.halo_attn.HaloAttn``.

:class:`HaloAttention2d` *is* a timm ``HaloAttn`` (a subclass: the same constructor arguments,
initialisation, submodules ``q``, ``kv``, ``pos_embed.{height_rel, width_rel}``, ``pool`` and so
the same state-dict keys), whose forward runs :func:`foveal.kernels.halo2d` on q, k and v read in
place from the projections instead of unfolding the key / value windows in memory. It computes
what timm's layer computes (SPEC section 2), forward and backward.

timm's projection lays the channels out per head (``[heads, head_dim]`` for q; ``[heads,
head_dim_qk + head_dim_v]`` for kv, k first inside each head); the heads-last views below follow
that layout, so no weight is permuted. The output is returned as an NCHW-shaped view of the op's
heads-last result (channels-last memory), which the following convolution or norm reads as is.

The fused op cannot be compiled by TorchScript, so the layer keeps an explicit path (padded,
unfolded windows and a dense softmax) that it takes under ``torch.jit.script``; the tests check it
against the op.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from timm.layers.halo_attn import HaloAttn

from foveal.kernels import halo2d

__all__ = ["HaloAttention2d"]


class HaloAttention2d(HaloAttn):
    """Halo attention on the fused :func:`foveal.kernels.halo2d` op; state-dict compatible with timm's ``HaloAttn``."""

    def __init__(
            self,
            dim: int,
            dim_out: Optional[int] = None,
            feat_size: Optional[Tuple[int, int]] = None,
            stride: int = 1,
            num_heads: int = 8,
            dim_head: Optional[int] = None,
            block_size: int = 8,
            halo_size: int = 3,
            qk_ratio: float = 1.0,
            qkv_bias: bool = False,
            avg_down: bool = False,
            scale_pos_embed: bool = False,
            backend: str = "auto",
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Input channels.
            dim_out: Output channels (default ``dim``); ``num_heads`` must divide it.
            feat_size: Unused (argument compatibility with timm's bottleneck / lambda layers).
            stride: Output stride, 1 or 2: strided queries when ``block_size`` is even and not
                ``avg_down``, else attention at stride 1 followed by a 2x2 average pool.
            num_heads: Attention heads.
            dim_head: Query / key head dim; default ``make_divisible(dim_out * qk_ratio, 8) // num_heads``.
            block_size: Query block size ``b``; input height and width must be multiples of it.
            halo_size: Halo ``h``: each block attends to a ``(b + 2h)`` square window.
            qk_ratio: Query / key width relative to ``dim_out`` when ``dim_head`` is not set.
            qkv_bias: Bias in the q and kv projections.
            avg_down: Downsample with an average pool instead of strided queries.
            scale_pos_embed: Scale the positional logits as well as ``q @ k``.
            backend: Halo-attention backend passed to :func:`foveal.kernels.halo2d`.
        """
        if stride not in (1, 2):
            raise ValueError(f"HaloAttention2d: stride must be 1 or 2, got stride={stride!r}")
        out = dim_out or dim
        if out % num_heads:
            raise ValueError(f"HaloAttention2d: num_heads must divide dim_out, got dim_out={out}, num_heads={num_heads}")
        super().__init__(dim, dim_out, feat_size, stride, num_heads, dim_head, block_size, halo_size, qk_ratio,
                         qkv_bias, avg_down, scale_pos_embed, device=device, dtype=dtype)
        self.backend = backend

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, block_size={self.block_size}, halo_size={self.halo_size}, "
                f"block_stride={self.block_stride}, dim_head_qk={self.dim_head_qk}, dim_head_v={self.dim_head_v}")

    @torch.jit.unused
    def _fused_attn(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return halo2d(q, k, v, self.block_size, self.halo_size, self.block_stride, self.pos_embed.height_rel,
                      self.pos_embed.width_rel, scale=self.scale, scale_rel=self.scale_pos_embed,
                      backend=self.backend)

    def _explicit_attn(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, H, W, heads, dqk = k.shape
        b, hs = self.block_size, self.halo_size
        win, bq = self.win_size, self.block_size_ds
        nh, nw = H // b, W // b
        q = q.reshape(B, nh, bq, nw, bq, heads, dqk).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, nh, nw, heads, bq * bq, dqk)
        k = F.pad(k, (0, 0, 0, 0, hs, hs, hs, hs)).unfold(1, win, b).unfold(2, win, b).flatten(-2)
        v = F.pad(v, (0, 0, 0, 0, hs, hs, hs, hs)).unfold(1, win, b).unfold(2, win, b).flatten(-2)
        attn = q @ k * self.scale  # B, nh, nw, heads, bq*bq, win*win
        idx = torch.arange(win, device=q.device)[None, :] - torch.arange(bq, device=q.device)[:, None] + win - 1
        rel_h = self.pos_embed.height_rel[idx]  # qy, ky, dqk
        rel_w = self.pos_embed.width_rel[idx]  # qx, kx, dqk
        q6 = q.reshape(B, nh, nw, heads, bq, bq, dqk)
        pos = (torch.einsum("bijnyxd,ykd->bijnyxk", q6, rel_h)[..., :, None]
               + torch.einsum("bijnyxd,xkd->bijnyxk", q6, rel_w)[..., None, :])
        pos = pos.reshape(B, nh, nw, heads, bq * bq, win * win)
        attn = attn + (pos * self.scale if self.scale_pos_embed else pos)
        out = attn.softmax(dim=-1) @ v.transpose(-1, -2)  # B, nh, nw, heads, bq*bq, dv
        dv = out.shape[-1]
        return out.reshape(B, nh, nw, heads, bq, bq, dv).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, nh * bq, nw * bq, heads, dv)

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x: Input features ``(B, C, H, W)``; ``H`` and ``W`` multiples of ``block_size``.

        Returns:
            Output features ``(B, dim_out, H / stride, W / stride)``.
        """
        if x.dim() != 4:
            raise ValueError(f"HaloAttention2d: expected input (B, C, H, W), got shape {list(x.shape)}")
        B, C, H, W = x.shape
        if H % self.block_size != 0 or W % self.block_size != 0:
            raise ValueError(f"HaloAttention2d: input height and width must be multiples of block_size="
                             f"{self.block_size}, got shape {list(x.shape)}; resize or pad the input")
        heads, dqk, dv = self.num_heads, self.dim_head_qk, self.dim_head_v
        q = self.q(x)
        Hq, Wq = q.shape[-2], q.shape[-1]
        q = q.view(B, heads, dqk, Hq, Wq).permute(0, 3, 4, 1, 2)  # B, Hq, Wq, heads, dqk (a view)
        kv = self.kv(x).view(B, heads, dqk + dv, H, W).permute(0, 3, 4, 1, 2)  # B, H, W, heads, dqk + dv
        k, v = kv[..., :dqk], kv[..., dqk:]
        if torch.jit.is_scripting():
            out = self._explicit_attn(q, k, v)
        else:
            out = self._fused_attn(q, k, v)
        out = out.reshape(B, Hq, Wq, heads * dv).permute(0, 3, 1, 2)  # B, dim_out, Hq, Wq (channels-last memory)
        return self.pool(out)
