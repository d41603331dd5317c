"""foveal backbones for mmdetection 3.x and mmsegmentation 1.x.

``import foveal.mm`` (configs do it with ``custom_imports = dict(imports=['foveal.mm'])``) registers
:class:`FovealBackbone` in the ``MODELS`` registry of mmdet and of mmseg, whichever of them is
installed; ``import foveal`` alone never needs the OpenMMLab packages. Only mmengine is required here.

The backbone wraps any timm model (foveal's or timm's own) and returns its stride 4 / 8 / 16 / 32
feature maps through the model's ``forward_intermediates``, NCHW, as mmdet necks and mmseg heads
take them. What a family's published downstream models add on top lives in a per-family table,
:data:`FAMILIES`: NAT / DiNAT put a LayerNorm (``norm0`` .. ``norm3``) on every output, BiFormer a
LayerNorm2d (the authors' ``extra_norms.{i}``), Agent-Swin a LayerNorm; Agent-PVT returns its stage maps
as they are. A new family plugs in with one :class:`Family` entry (its output norm, if any); its
downstream arguments are the timm model's own constructor arguments, passed through: DiNAT's
re-dilated ``dilations``, BiFormer's ``n_win`` and ``auto_pad=True`` (regions per side, and zero-padding
of each map to a multiple of them, so that inputs of any size run), Agent's ``dense_agent_num``
(agents pooled per stage; the bias tables keep their trained agent grid and are resized over it).

Weights (``init_cfg=dict(type='Pretrained', checkpoint=...)``) may be

- a timm model name with or without a pretrained tag (``'dinat_tiny.in1k'``, ``'hf-hub:org/name'``,
  ``'local-dir:/path'``): loaded the way ``timm.create_model(..., pretrained=True)`` loads them,
  through the family's ``checkpoint_filter_fn``;
- a local file or an URL: a classification checkpoint in any layout the family's filter reads, or
  an mm checkpoint (mmengine's ``state_dict`` with ``backbone.`` keys, neck and heads ignored):
  either the authors' layout (``backbone.levels...``, ``backbone.norm{i}``, BiFormer's
  ``backbone.extra_norms.{i}``) or this module's own (``backbone.model...``, ``backbone.norm{i}``).

Files are opened with ``torch.load(weights_only=True)``; what mmengine's Runner writes beside the
weights (numpy scalars and arrays, its message hub's history buffers) is allowed explicitly
(:func:`checkpoint_globals`), nothing else is.
"""
import logging
import os
import pickle
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import timm
from timm.layers import LayerNorm2d
from timm.layers.halo_attn import HaloAttn
from mmengine.logging import print_log
from mmengine.model import BaseModule

from ._checkpoint import load_foreign_checkpoint
from .agent_pvt import AgentPVT
from .agent_swin import AgentSwinTransformer
from .biformer import BiFormer
from .nat import NAT

__all__ = ['FovealBackbone', 'Family', 'FAMILIES', 'register_family', 'checkpoint_globals', 'load_checkpoint_file']

_STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class Family:
    """What a family's downstream backbone adds to the timm model.

    Attributes:
        out_norm: Norm layer class applied to every output (built as ``out_norm(channels)``), named
            ``norm{i}`` after the output index as in the published mm checkpoints; None for none.
        out_norm_fmt: Layout the out norm takes: 'NHWC' (LayerNorm over channels) or 'NCHW'.
        out_norm_key: The authors' name of output norm i in their mm checkpoints, as a format
            string of i (BiFormer: ``'extra_norms.{}'``); loaded into ``norm{i}``. None: ``norm{i}``.
        size_multiple: For models that only take inputs of some multiple (timm's HaloNets) or that
            pad their input to one (Swin's patch embedding): the multiple, from the model. Inputs are
            zero-padded on the bottom / right up to it and each output is cropped back to
            ``ceil(input size / stride)``.
    """
    out_norm: Optional[Type[nn.Module]] = None
    out_norm_fmt: str = 'NHWC'
    out_norm_key: Optional[str] = None
    size_multiple: Optional[Callable[[nn.Module], int]] = None


def _halo_multiple(model: nn.Module) -> int:
    # a HaloAttn layer splits its map into blocks, at most at stride 32 (stride-2 layers of the last
    # stage see the stride-16 map and emit half-size blocks at stride 32)
    return 32 * max(m.block_size for m in model.modules() if isinstance(m, HaloAttn))


def _has_halo_attn(model: nn.Module) -> bool:
    return any(isinstance(m, HaloAttn) for m in model.modules())


def _patch_multiple(model: nn.Module) -> int:
    # the authors' downstream Swin pads the image to a multiple of the patch size (timm's patch
    # embedding would drop the remainder); patch merging pads odd maps itself
    return model.patch_embed.patch_size[0]


def _stride_multiple(model: nn.Module) -> int:
    # strided patch embeddings without padding (PVT) drop the rows / columns beyond a multiple of
    # each stride, and fail on maps smaller than the next stride: pad to the model's total stride, as
    # mmdet's data preprocessor does (sizes that are multiples of it run unchanged)
    return model.feature_info[-1]['reduction']


# (model class or predicate on the model, what its downstream backbone adds), first match wins;
# models that match nothing are used as they are
FAMILIES: List[Tuple[Union[type, Callable[[nn.Module], bool]], Family]] = [
    (NAT, Family(out_norm=nn.LayerNorm)),  # NAT / DiNAT / DiNAT_s: a LayerNorm on each stage output
    # BiFormer: timm's LayerNorm2d (eps 1e-6) on each stage output, NCHW, as the authors' BiFormer_mm
    (BiFormer, Family(out_norm=LayerNorm2d, out_norm_fmt='NCHW', out_norm_key='extra_norms.{}')),
    (AgentSwinTransformer, Family(out_norm=nn.LayerNorm, size_multiple=_patch_multiple)),
    # Agent-PVT: the stage maps without a norm, as the authors' AgentPVT returns them
    (AgentPVT, Family(size_multiple=_stride_multiple)),
    (_has_halo_attn, Family(size_multiple=_halo_multiple)),  # timm's HaloNets
]


def register_family(match: Union[type, Callable[[nn.Module], bool]], family: Family) -> None:
    """Declare what the downstream backbone of a model class (or of models a predicate accepts) adds."""
    FAMILIES.insert(0, (match, family))


def _family(model: nn.Module) -> Family:
    for match, family in FAMILIES:
        if isinstance(match, type):
            if isinstance(model, match):
                return family
        elif match(model):
            return family
    return Family()


def _history_buffer_method(obj: Any, name: str) -> Any:
    """``getattr`` as mmengine's pickled message hub uses it, and nothing more: the statistics
    methods (``mean``, ``min``, ...) of ``HistoryBuffer`` or of one of its instances."""
    from mmengine.logging import HistoryBuffer
    methods = {'min', 'max', 'current', 'mean', *HistoryBuffer._statistics_methods}  # built-ins, registered
    if not (obj is HistoryBuffer or isinstance(obj, HistoryBuffer)) or name not in methods:
        raise pickle.UnpicklingError(f'refusing getattr({obj!r:.40}, {name!r}) in a checkpoint')
    return getattr(obj, name)


def checkpoint_globals() -> List[Any]:
    """What mmengine checkpoints hold beyond tensors, allowed for ``torch.load(weights_only=True)``:
    numpy scalars, arrays and dtypes (``meta``, the message hub's logs), mmengine's ``HistoryBuffer``,
    and ``getattr`` restricted to a history buffer's statistics methods."""
    import numpy as np
    from mmengine.logging import HistoryBuffer
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
    return [scalar, _reconstruct, np.ndarray, np.dtype, *dtypes, HistoryBuffer,
            (_history_buffer_method, 'builtins.getattr'), (_history_buffer_method, '__builtin__.getattr')]


def load_checkpoint_file(path: str) -> Any:
    """A checkpoint file or URL, opened weights-only (with :func:`checkpoint_globals` allowed)."""
    with torch.serialization.safe_globals(checkpoint_globals()):
        if path.startswith(('http://', 'https://')):
            return torch.hub.load_state_dict_from_url(path, map_location='cpu', weights_only=True)
        return load_foreign_checkpoint(path)


def _is_file_or_url(checkpoint: str) -> bool:
    return checkpoint.startswith(('http://', 'https://')) or os.path.exists(checkpoint) or \
        checkpoint.endswith(('.pth', '.pt', '.bin', '.ckpt', '.safetensors'))


class FovealBackbone(BaseModule):
    """Multi-scale features of a timm model as an mmdet / mmseg backbone."""

    def __init__(
            self,
            model_name: str,
            out_indices: Optional[Sequence[int]] = None,
            frozen_stages: int = -1,
            norm_eval: bool = False,
            drop_path_rate: Optional[float] = None,
            with_cp: bool = False,
            pretrained: Optional[str] = None,
            init_cfg: Optional[Any] = None,
            **model_kwargs,
    ):
        """
        Args:
            model_name: timm architecture (``'dinat_tiny'``, ``'biformer_small'``, ``'agent_swin_tiny'``,
                ``'halonet50ts'``, ...). A pretrained tag is allowed and only names the default
                weights of ``init_cfg``.
            out_indices: Which of the model's ``feature_info`` entries to return; by default those
                at strides 4, 8, 16 and 32 (for NAT / DiNAT: 0, 1, 2, 3).
            frozen_stages: -1 trains everything; 0 freezes the stem (what the model's
                ``group_matcher`` calls so, e.g. Agent-PVT's stage-0 patch and position embeddings);
                k > 0 also freezes the modules that compute the first k outputs (their parameters get
                no gradient and their norms stay in eval mode) and those outputs' out norms.
            norm_eval: Keep every batch norm of the backbone in eval mode while training.
            drop_path_rate: Stochastic depth rate of the timm model (its default if None).
            with_cp: Gradient checkpointing (timm's ``set_grad_checkpointing``).
            pretrained: Deprecated spelling of ``init_cfg=dict(type='Pretrained', checkpoint=...)``.
            init_cfg: mmengine init config; ``dict(type='Pretrained', checkpoint=...)`` takes a timm
                model name, a local file or an URL (see the module docstring).
            **model_kwargs: Further arguments of the timm model (e.g. DiNAT's ``dilations``,
                ``kernel_size``); an argument the model does not take raises ``TypeError``.
        """
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError(f'give pretrained or init_cfg, not both (pretrained={pretrained!r}, '
                                 f'init_cfg={init_cfg!r})')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        self.checkpoint = None
        if isinstance(init_cfg, Mapping) and init_cfg.get('type') == 'Pretrained':
            unknown = set(init_cfg) - {'type', 'checkpoint'}
            if unknown:
                raise ValueError(f'Pretrained init_cfg takes only a checkpoint, got {sorted(unknown)}')
            self.checkpoint = init_cfg['checkpoint']
            init_cfg = None  # loaded by init_weights below, not by mmengine's PretrainedInit
        super().__init__(init_cfg=init_cfg)

        if drop_path_rate is not None:
            model_kwargs['drop_path_rate'] = drop_path_rate
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs)
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
        feature_info = list(model.feature_info)
        if out_indices is None:
            out_indices = [i for i, f in enumerate(feature_info) if f['reduction'] in _STRIDES]
        self.out_indices = tuple(int(i) for i in out_indices)
        if not self.out_indices or any(i < 0 or i >= len(feature_info) for i in self.out_indices):
            raise ValueError(f'out_indices must index the {len(feature_info)} feature_info entries of '
                             f'{model_name}, got {out_indices}')
        if frozen_stages < -1 or frozen_stages > len(self.out_indices):
            raise ValueError(f'frozen_stages must be in [-1, {len(self.out_indices)}], got {frozen_stages}')
        # the stages after the last output, the final norm and the head are never run
        model.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
        if with_cp:
            model.set_grad_checkpointing(True)
        self.model = model
        self.feature_info = [feature_info[i] for i in self.out_indices]
        self.out_channels = [f['num_chs'] for f in self.feature_info]
        self.family = _family(model)
        self.size_multiple = self.family.size_multiple(model) if self.family.size_multiple else None
        self._strides = [f['reduction'] for f in self.feature_info]
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        for i, f in zip(self.out_indices, self.feature_info):
            if self.family.out_norm is not None:
                self.add_module(f'norm{i}', self.family.out_norm(f['num_chs']))
        self._freeze_stages()

    def _out_norms(self) -> List[nn.Module]:
        return [getattr(self, f'norm{i}') for i in self.out_indices] if self.family.out_norm else []

    def _frozen(self) -> Tuple[List[nn.Module], List[nn.Parameter]]:
        """The modules and parameters ``frozen_stages`` freezes: the stem (what the model's
        ``group_matcher`` names so, which may be parts of the first stage, e.g. Agent-PVT's patch and
        position embeddings), the modules of the first ``frozen_stages`` outputs and their out norms."""
        if self.frozen_stages < 0:
            return [], []
        stem = self.model.group_matcher(coarse=True)['stem']
        patterns = stem if isinstance(stem, (list, tuple)) else [stem]
        modules = [m for n, m in self.model.named_modules() if n and any(_matches(p, n) for p in patterns)]
        params = [p for n, p in self.model.named_parameters() if any(_matches(pat, n) for pat in patterns)]
        for f in self.feature_info[:self.frozen_stages]:
            modules.append(self.model.get_submodule(f['module']))
        modules += self._out_norms()[:self.frozen_stages]
        return modules, params + [p for m in modules for p in m.parameters()]

    def _freeze_stages(self) -> None:
        modules, params = self._frozen()
        for m in modules:
            m.eval()
        for p in params:
            p.requires_grad = False

    def train(self, mode: bool = True) -> 'FovealBackbone':
        """Set the train mode, keeping frozen stages (and with ``norm_eval`` all batch norms) in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """
        Args:
            x: Images (B, C, H, W), any size.

        Returns:
            One feature map (B, C_i, H_i, W_i) per entry of ``out_indices``.
        """
        norms = self._out_norms()
        fmt = self.family.out_norm_fmt if norms else 'NCHW'
        H, W = x.shape[-2:]
        if self.size_multiple is not None:
            m = self.size_multiple
            x = F.pad(x, (0, (m - W % m) % m, 0, (m - H % m) % m))
        feats = self.model.forward_intermediates(
            x, indices=list(self.out_indices), output_fmt=fmt, intermediates_only=True)
        if norms:
            feats = [norm(f) for norm, f in zip(norms, feats)]
            if fmt == 'NHWC':
                feats = [f.permute(0, 3, 1, 2) for f in feats]
        if self.size_multiple is not None:
            feats = [f[..., :-(-H // s), :-(-W // s)] for f, s in zip(feats, self._strides)]
        return tuple(f.contiguous() for f in feats)

    def init_weights(self) -> None:
        """mmengine's init, then the pretrained weights named by ``init_cfg`` (if any)."""
        super().init_weights()
        if self.checkpoint is not None:
            self.load_pretrained(self.checkpoint)

    def load_pretrained(self, checkpoint: str) -> None:
        """Load weights from a timm model name, a local file or an URL (see the module docstring).

        Raises:
            KeyError: the checkpoint misses weights of the backbone's timm model.
        """
        if _is_file_or_url(checkpoint):
            state_dict = self._convert(load_checkpoint_file(checkpoint))
        else:
            source = timm.create_model(checkpoint, pretrained=True, **self.model_kwargs)
            state_dict = {f'model.{k}': v for k, v in source.state_dict().items()}
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing_model = [k for k in missing if k.startswith('model.')]
        if missing_model:
            raise KeyError(f'{checkpoint} has no weights for {len(missing_model)} parameters of '
                           f'{self.model_name}, e.g. {missing_model[:5]}')
        print_log(
            f'{type(self).__name__}({self.model_name}): loaded {checkpoint}; newly initialized: '
            f'{missing or "none"}; unused: {len(unexpected)} entries', logger='current', level=logging.INFO)

    def _convert(self, checkpoint: Any) -> Dict[str, torch.Tensor]:
        """A loaded checkpoint file -> keys of this module (``model.*``, ``norm{i}.*``)."""
        state_dict = checkpoint
        if isinstance(state_dict, Mapping):
            for key in ('state_dict', 'model'):
                if key in state_dict and isinstance(state_dict[key], Mapping):
                    state_dict = state_dict[key]
                    break
        state_dict = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
        state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
        if any(k.startswith('backbone.') for k in state_dict):  # a whole detector / segmentor
            state_dict = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
        if any(k.startswith('model.') for k in state_dict):  # written from this module
            return state_dict
        if self.family.out_norm_key is not None:  # the authors' names of the out norms -> norm{i}
            renames = {self.family.out_norm_key.format(i) + '.': f'norm{i}.' for i in self.out_indices}
            state_dict = {next((new + k[len(old):] for old, new in renames.items() if k.startswith(old)), k): v
                          for k, v in state_dict.items()}
        out_norms = tuple(f'norm{i}.' for i in self.out_indices)
        ours = {k: v for k, v in state_dict.items() if k.startswith(out_norms)}
        rest = {k: v for k, v in state_dict.items() if not k.startswith(out_norms)}
        filter_fn: Optional[Callable] = getattr(sys.modules[type(self.model).__module__], 'checkpoint_filter_fn', None)
        if filter_fn is not None:
            rest = filter_fn(rest, self.model)
        ours.update({f'model.{k}': v for k, v in rest.items()})
        return ours


def _matches(pattern: str, name: str) -> bool:
    return re.match(pattern, name) is not None


def _register() -> None:
    for registry_module in ('mmdet.registry', 'mmseg.registry'):
        try:
            registry = __import__(registry_module, fromlist=['MODELS']).MODELS
        except ImportError:
            continue
        registry.register_module(name='FovealBackbone', module=FovealBackbone, force=True)


_register()
