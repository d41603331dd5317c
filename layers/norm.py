"""LayerNorm for the pre-norms of a block, with the residual add fused in (``foveal.kernels.add_layer_norm``)."""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Proxy

from foveal.kernels import add_layer_norm, add_layer_norm_linear

__all__ = ["AddLayerNorm"]


class AddLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim, written in the dtype the next Linear consumes, with an optional fused add.

    Meant for norms that feed a Linear: the output dtype is the autocast dtype when autocast is on
    for the input's device type (else the input's dtype), which is what the Linear would cast it
    to, so the cast is written once by the norm. Statistics are float32, as in ``nn.LayerNorm``
    under autocast. Parameters (``weight``, ``bias``) are those of ``nn.LayerNorm``, so
    checkpoints load unchanged.

    Paths: eager calls run the fused op (:func:`foveal.kernels.add_layer_norm`). Under
    ``torch.compile``, TorchScript and ``torch.fx`` symbolic tracing it is plain ``nn.LayerNorm``
    (after the add): a compiled, traced or scripted graph must not fix the autocast state at trace
    time, so ``h`` stays in ``F.layer_norm``'s dtype (float32 under autocast) and the next Linear
    casts it itself, to the same values; inductor fuses the add, the norm and that cast into one
    kernel, with no opaque op in the graph.
    """

    def __init__(
            self,
            normalized_shape: Union[int, Sequence[int]],
            eps: float = 1e-5,
            elementwise_affine: bool = True,
            bias: bool = True,
            device=None,
            dtype=None,
    ):
        """
        Args:
            normalized_shape: Number of channels C (the last dim); a 1-element sequence is accepted too.
            eps: Added to the variance.
            elementwise_affine: Learnable per-channel scale (``weight``) and, with ``bias``, shift.
            bias: Learnable shift (``bias``) when ``elementwise_affine``.
        """
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"AddLayerNorm normalizes over the last dim only, got normalized_shape={normalized_shape}")

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x: Input (*, C).

        Returns:
            LayerNorm(x) (*, C), in the dtype the next Linear consumes.
        """
        if torch.jit.is_scripting():
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return self._forward(x, None)[1]

    def forward_add(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """
        Args:
            x: Residual stream (*, C).
            y: Branch output to add (*, C), any floating dtype.

        Returns:
            ``(s, h)``: ``s = x + y`` (*, C) in the promoted dtype (a float32 stream stays float32
            under autocast) and ``h = LayerNorm(s)`` (*, C) in the dtype the next Linear consumes.
        """
        if torch.jit.is_scripting():
            s = x + y
            return s, F.layer_norm(s, self.normalized_shape, self.weight, self.bias, self.eps)
        return self._forward(x, y)

    def forward_add_linear(self, x: Tensor, y: Tensor, linear: nn.Linear) -> Tuple[Tensor, Tensor]:
        """``(s, linear(h))`` for ``(s, h) = forward_add(x, y)``, without keeping ``h`` for the
        backward: eager training recomputes it from ``s`` (which the norm's backward keeps anyway),
        so the Linear's saved input costs no memory (see :func:`foveal.kernels.add_layer_norm_linear`).

        Args:
            x: Residual stream (*, C).
            y: Branch output to add (*, C).
            linear: The ``nn.Linear`` that consumes the normalized stream.
        """
        if torch.jit.is_scripting():
            s = x + y
            return s, linear(F.layer_norm(s, self.normalized_shape, self.weight, self.bias, self.eps))
        return self._forward_linear(x, y, linear)

    @torch.jit.unused
    def _forward_linear(self, x: Tensor, y: Tensor, linear: nn.Linear) -> Tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling() or isinstance(x, Proxy) or isinstance(y, Proxy):
            s, h = self._forward(x, y)  # plain ops: inductor decides what to keep
            return s, linear(h)
        out, s = add_layer_norm_linear(x, y, self.weight, self.bias, linear.weight, linear.bias, self.eps)
        return s, out

    @torch.jit.unused
    def _forward(self, x: Tensor, y: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling() or isinstance(x, Proxy) or isinstance(y, Proxy):
            # plain ops: inductor fuses the add, the norm and the next Linear's autocast cast itself
            # (querying the autocast state would break the graph on some torch versions)
            s = x if y is None else x + y
            return s, F.layer_norm(s, self.normalized_shape, self.weight, self.bias, self.eps)
        h, s = add_layer_norm(x, y, self.weight, self.bias, self.eps)
        return s, h
