""" The timm model API of foveal's staged backbones

A staged backbone here is a stem, an ``nn.Sequential`` of stages (each a ``downsample`` then
``blocks``, with a ``grad_checkpointing`` flag), usually a final ``norm``, and a timm
``ClassifierHead`` named ``head``. For such models the classifier, gradient-checkpointing, parameter
grouping and pruning methods timm calls are the same up to module names; `StagedTimmMixin` holds
them once, and each model names its modules in class attributes. A model overrides what its layout
does differently (a stem inside the first stage, a norm over NCHW maps, an isotropic body).

``forward`` stays in each model: torch.compile caches a model's graphs, and counts its recompiles
against a limit, per code object of ``forward``, so a shared one would pool every family's.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import get_device_dtype
from timm.models._features import feature_take_indices


class StagedTimmMixin:
    """timm's model API over a stem, a sequence of stages, an optional final norm and a ClassifierHead."""

    _stem_name: str = 'stem'  # the stem module, run first and grouped as 'stem'
    _stages_name: str = 'stages'  # the nn.Sequential of stages, in state-dict keys and feature_info
    _final_norm: bool = True  # a ``norm`` after the last stage, sized for it

    def _stage_seq(self) -> nn.Sequential:
        return getattr(self, self._stages_name)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Group parameters for optimization (layer-wise LR decay)."""
        stages = self._stages_name
        return dict(
            stem=rf'^{self._stem_name}',
            blocks=rf'^{stages}\.(\d+)' if coarse else [
                (rf'^{stages}\.(\d+)\.downsample', (0,)),
                (rf'^{stages}\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ]
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable gradient checkpointing."""
        for stage in self._stage_seq():
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """Get the classifier head."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Reset the classifier head.

        Args:
            num_classes: Number of classes for new classifier, 0 to remove it.
            global_pool: Global pooling type, unchanged if None.
        """
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, in_features=self.num_features, **dd)
        self.head_hidden_size = self.head.num_features
        if global_pool is not None:
            self.global_pool = global_pool

    def _intermediate_stages(
            self,
            indices: Optional[Union[int, List[int]]],
            stop_early: bool,
            output_fmt: str,
    ) -> Tuple[List[int], nn.Sequential]:
        """Check ``output_fmt``; the stage indices to take and the stages to run for them."""
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        stages = self._stage_seq()
        take_indices, max_index = feature_take_indices(len(stages), indices)
        if stop_early and not torch.jit.is_scripting():
            stages = stages[:max_index + 1]
        return take_indices, stages

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates (stage outputs), for a stem and stages on
        (B, H, W, C) maps and a final norm over channels.

        Args:
            x: Input image tensor (B, C, H, W).
            indices: Take last n stages if int, all if None, select matching indices if sequence.
            norm: Apply the final norm to the last stage's intermediate.
            stop_early: Stop iterating over stages when the last desired intermediate is reached.
            output_fmt: Layout of the intermediates, 'NCHW' or 'NHWC'.
            intermediates_only: Only return intermediate features.

        Returns:
            List of intermediate features or tuple of (final features (B, H, W, C), intermediates).
        """
        take_indices, stages = self._intermediate_stages(indices, stop_early, output_fmt)
        num_stages = len(self._stage_seq())
        intermediates = []

        x = getattr(self, self._stem_name)(x)  # B, H, W, C
        last_idx = 0
        for i, stage in enumerate(stages):
            x = stage(x)
            last_idx = i
            if i in take_indices:
                x_inter = self.norm(x) if norm and i == num_stages - 1 else x
                x_inter = x_inter.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else x_inter
                intermediates.append(x_inter.contiguous())

        if intermediates_only:
            return intermediates

        if last_idx == num_stages - 1:
            x = self.norm(x)  # final norm is sized for (and only applied to) the last stage
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Prune stages not required for the specified intermediates.

        Args:
            indices: Indices of intermediate stages to keep.
            prune_norm: Whether to prune the final norm (unused by a model without one).
            prune_head: Whether to prune the classifier head.

        Returns:
            List of indices that were kept.
        """
        stages = self._stage_seq()
        take_indices, max_index = feature_take_indices(len(stages), indices)
        prune_end = max_index < len(stages) - 1
        if self._final_norm and (prune_norm or prune_end):
            self.norm = nn.Identity()
        setattr(self, self._stages_name, stages[:max_index + 1])
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool and classify features laid out as ``output_fmt``; pre_logits returns the pooled features."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)
