"""Opening checkpoints that foveal did not write.

Official releases of the families foveal hosts are pickles (``.pth`` / ``.bin``), and some of them
pickle more than tensors (an argparse namespace, a yacs config). Unpickling runs code, so every such
file is opened here and only here:

1. ``.safetensors`` files are read with safetensors (no code runs);
2. anything else goes through ``torch.load(weights_only=True)``, which only rebuilds tensors and
   plain containers, plus the configuration objects that releases store beside their weights
   (``argparse.Namespace``, and yacs's ``CfgNode`` rebuilt as an ``OrderedDict`` of its items, so yacs
   need not be installed and none of its code runs);
3. a file that needs more is refused unless the caller passes ``allow_pickle=True``, and then only
   after a warning. Re-publish such files as safetensors (``tools/convert.py``) so nobody has to
   unpickle them again.
"""
import argparse
import collections
import logging
import os
import pickle
import re
from typing import Any, Iterable, Mapping, Optional, Union

import torch

__all__ = ["load_foreign_checkpoint", "foreign_state_dict", "UnsafeCheckpointError", "release_cfg",
           "load_release_weights"]

_logger = logging.getLogger(__name__)

# containers that official releases wrap their weights in, most specific first
STATE_DICT_KEYS = ("state_dict", "model", "module", "model_state", "net", "params")
EMA_STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "ema")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects that ``torch.load(weights_only=True)`` refuses to rebuild."""


class _PickledConfig:
    """Stands for yacs's ``CfgNode`` when a checkpoint is unpickled: the node is rebuilt as an
    ``OrderedDict`` of its items (its attributes set on it), without yacs or any of its code."""

    def __new__(cls, *args):
        return collections.OrderedDict()


# data-only classes of the configs that releases pickle beside their weights, as the weights-only
# unpickler may rebuild them (nothing of theirs runs: the unpickler sets items and attributes)
_CONFIG_GLOBALS = [argparse.Namespace, (_PickledConfig, "yacs.config.CfgNode")]


def load_foreign_checkpoint(
        path: Union[str, os.PathLike],
        allow_pickle: bool = False,
        map_location: Union[str, torch.device] = "cpu",
) -> Any:
    """Load a checkpoint file written elsewhere, without running its code unless told to.

    Args:
        path: a ``.safetensors`` file, or a torch pickle (``.pth``, ``.pt``, ``.bin``, ``.ckpt``).
        allow_pickle: allow a full unpickle when the weights-only load fails. Only for files from a
            source you trust: unpickling can run arbitrary code.
        map_location: where tensors are loaded.

    Returns:
        What the file holds: a dict of tensors for safetensors, else the unpickled object.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file needs a full unpickle and ``allow_pickle`` is False.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        import safetensors.torch
        return safetensors.torch.load_file(path, device=str(map_location))
    try:
        with torch.serialization.safe_globals(_CONFIG_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{path} holds objects beyond tensors and plain containers, so the weights-only load "
                f"refused it ({_reason(e)}). Unpickling it can run arbitrary code: if you trust its "
                "source, pass allow_pickle=True (tools/convert.py: --allow-pickle), then re-publish the "
                "weights as safetensors."
            ) from e
    _logger.warning("Fully unpickling %s (allow_pickle=True): this runs code stored in the file.", path)
    return torch.load(path, map_location=map_location, weights_only=False)


def foreign_state_dict(
        path: Union[str, os.PathLike],
        allow_pickle: bool = False,
        key: Optional[str] = None,
        use_ema: bool = False,
) -> dict:
    """The state dict inside a foreign checkpoint, unwrapped and with ``module.`` prefixes removed.

    Args:
        path: checkpoint file (see :func:`load_foreign_checkpoint`).
        allow_pickle: see :func:`load_foreign_checkpoint`.
        key: the entry holding the weights (e.g. ``"model"``); by default the first of
            ``state_dict``, ``model``, ``module``, ... that holds tensors, or the file itself.
        use_ema: prefer the EMA weights (``state_dict_ema``, ``model_ema``, ``ema``) when present.

    Raises:
        KeyError: ``key`` is not in the checkpoint, or ``use_ema`` and no EMA weights are found.
        ValueError: no state dict of tensors was found.
    """
    checkpoint = load_foreign_checkpoint(path, allow_pickle=allow_pickle)
    if key is not None:
        if not isinstance(checkpoint, Mapping) or key not in checkpoint:
            found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
            raise KeyError(f"{path} has no entry {key!r}; it holds {found}")
        state_dict = checkpoint[key]
    elif use_ema:
        state_dict = _first_state_dict(checkpoint, EMA_STATE_DICT_KEYS)
        if state_dict is None:
            raise KeyError(f"{path} holds no EMA weights under any of {EMA_STATE_DICT_KEYS}")
    else:
        state_dict = _first_state_dict(checkpoint, STATE_DICT_KEYS)
        if state_dict is None and _is_state_dict(checkpoint):
            state_dict = checkpoint
    if state_dict is None or not _is_state_dict(state_dict):
        keys = sorted(checkpoint)[:10] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"no state dict of tensors found in {path} (top level: {keys}); pass key=...")
    return {_strip_prefix(k): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def release_cfg(url: str, file_name: str) -> dict:
    """Pretrained-cfg entries for weights published as a training checkpoint at ``url`` whose name
    does not end in a file name (a cloud drive's ``.../f/<id>/?dl=1``): timm downloads it to its cache
    as ``file_name`` and hands it to the model's ``load_pretrained``, which opens it with
    :func:`load_release_weights` (weights-only; the argparse / yacs config the file pickles beside the
    weights is read as data). A ``pretrained_cfg_overlay=dict(file=...)`` (say, a converted ``.safetensors``) takes
    timm's own loading path with the model's checkpoint filter instead."""
    return dict(url=(url, file_name), custom_load=True)


def load_release_weights(model: torch.nn.Module, path: Union[str, os.PathLike], filter_fn) -> None:
    """Load an official release file into ``model`` as timm's ``load_pretrained`` would: through the
    family's ``filter_fn(checkpoint, model)``, the stem conv adapted when ``in_chans`` differs from the
    file's, the classifier dropped when the model's class count differs (then loaded non-strictly,
    only those keys missing), strictly otherwise."""
    from timm.models._manipulate import adapt_input_conv

    state_dict = filter_fn(load_foreign_checkpoint(path), model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    own = model.state_dict()
    first_convs = cfg.get("first_conv") or ()
    for name in (first_convs,) if isinstance(first_convs, str) else first_convs:
        key = name + ".weight"
        if key in state_dict and key in own and state_dict[key].shape[1] != own[key].shape[1]:
            state_dict[key] = adapt_input_conv(own[key].shape[1], state_dict[key])
    dropped = []
    classifiers = cfg.get("classifier") or ()
    for name in (classifiers,) if isinstance(classifiers, str) else classifiers:
        for key in (name + ".weight", name + ".bias"):
            if key in state_dict and (key not in own or state_dict[key].shape != own[key].shape):
                state_dict.pop(key)
                dropped.append(key)
    missing, unexpected = model.load_state_dict(state_dict, strict=not dropped)
    if dropped:
        still = [k for k in missing if k not in dropped]
        if still or unexpected:
            raise RuntimeError(f"loading {path}: missing keys {still[:10]}, unexpected keys {unexpected[:10]}")
        _logger.info("%s: classifier not loaded (%s), its class count differs from the model's", path, dropped)


def _first_state_dict(checkpoint: Any, keys: Iterable[str]) -> Optional[Mapping]:
    if not isinstance(checkpoint, Mapping):
        return None
    for k in keys:
        if k in checkpoint and _is_state_dict(checkpoint[k]):
            return checkpoint[k]
    return None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and any(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _reason(error: Exception) -> str:
    # torch's message is long and colored; the line naming the refused global is the useful part
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line
    return next((line for line in lines if line), type(error).__name__)
