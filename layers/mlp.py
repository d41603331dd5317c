"""A timm ``Mlp`` whose training backward recomputes the activation instead of keeping it.

Autograd keeps two hidden-width tensors per MLP for the backward: the ``fc1`` output (for the
activation's gradient) and the activation's output (for ``fc2``'s weight gradient). With GELU the
second is cheap to recompute from the first, so :class:`RecomputeMlp` fuses ``act`` and ``fc2``
into one autograd node that saves only the ``fc1`` output: a third of a NAT block's saved
activations under bf16 autocast is one such tensor. Parameters, names and results are those of
``timm.layers.Mlp``; the recomputed activation is bitwise the forward's.

The fused node is used while training with gradients enabled and no dropout between the two
layers; otherwise (eval, dropout, TorchScript) the module runs timm's forward.

Not ``torch.utils.checkpoint`` with a selective-recompute policy: that runs every op of the region
under a Python dispatch mode, host time that eager NAT training (tens of blocks) cannot spare.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm.layers import Mlp

__all__ = ["RecomputeMlp"]


class _GeluLinear(torch.autograd.Function):
    """``linear(gelu(a), weight, bias)`` saving ``a`` only (the GELU output is recomputed)."""

    @staticmethod
    def forward(ctx, a: Tensor, weight: Tensor, bias, approximate: str):
        h = F.gelu(a, approximate=approximate)
        out = F.linear(h, weight, bias)  # under autocast this casts like the unfused layer does
        ctx.save_for_backward(a, weight)
        ctx.approximate = approximate
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # differentiable ops: double backward works as for timm's Mlp
        a, weight = ctx.saved_tensors
        dtype = grad_out.dtype  # the forward's compute dtype (autocast's, when it was on)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_a = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_h = grad_out @ weight.to(dtype)
            grad_a = torch.ops.aten.gelu_backward(grad_h.to(a.dtype), a, approximate=ctx.approximate)
        if ctx.needs_input_grad[1]:
            h = F.gelu(a, approximate=ctx.approximate)  # bitwise the forward's
            grad_weight = (g2.t() @ h.reshape(-1, h.shape[-1]).to(dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0).to(ctx.bias_dtype)
        return grad_a, grad_weight, grad_bias, None


class RecomputeMlp(Mlp):
    """``timm.layers.Mlp`` (fc1 -> GELU -> fc2) that keeps one hidden-width tensor for the backward."""

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            out_features: Optional[int] = None,
            approximate: str = "none",
            bias: bool = True,
            drop: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_features: Number of input channels.
            hidden_features: Hidden width (default: ``in_features``).
            out_features: Number of output channels (default: ``in_features``).
            approximate: GELU approximation, ``"none"`` (exact, ``nn.GELU``'s default) or ``"tanh"``.
            bias: Biases on both linear layers.
            drop: Dropout after the activation and after fc2 (a nonzero rate uses timm's forward).
        """
        super().__init__(in_features, hidden_features, out_features, act_layer=nn.GELU, bias=bias, drop=drop,
                         device=device, dtype=dtype)
        self.act = nn.GELU(approximate=approximate)

    def recomputes(self) -> bool:
        """True when a call trains through the fused GELU + fc2 node (training, gradients on, no dropout)."""
        return self.training and torch.is_grad_enabled() and self.drop1.p == 0. and self.drop2.p == 0.

    @torch.jit.unused
    def forward_hidden(self, a: Tensor) -> Tensor:
        """The MLP after ``fc1``: ``a`` is the ``fc1`` output (a block may compute it fused with its norm)."""
        if self.recomputes():
            return _GeluLinear.apply(a, self.fc2.weight, self.fc2.bias, self.act.approximate)
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(a)))))

    @torch.jit.unused
    def _fused(self, x: Tensor) -> Tensor:
        return _GeluLinear.apply(self.fc1(x), self.fc2.weight, self.fc2.bias, self.act.approximate)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and self.recomputes():
            return self._fused(x)
        # timm's forward, written out: TorchScript cannot call super().forward
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x
