"""Opening checkpoints that foveal did not write.

Official releases of the families foveal hosts are pickles (``.pth`` / ``.bin``), and some of them
pickle more than tensors (an argparse namespace, a yacs config). Unpickling runs code, so every such
file is opened here and only here:

1. ``.safetensors`` files are read with safetensors (no code runs);
2. anything else goes through ``torch.load(weights_only=True)``, which only rebuilds tensors and
   plain containers;
3. a file that needs more is refused unless the caller passes ``allow_pickle=True``, and then only
   after a warning. Re-publish such files as safetensors (``tools/convert.py``) so nobody has to
   unpickle them again.
"""
import logging
import os
import pickle
import re
from typing import Any, Iterable, Mapping, Optional, Union

import torch

__all__ = ["load_foreign_checkpoint", "foreign_state_dict", "UnsafeCheckpointError"]

_logger = logging.getLogger(__name__)

# containers that official releases wrap their weights in, most specific first
STATE_DICT_KEYS = ("state_dict", "model", "module", "model_state", "net", "params")
EMA_STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "ema")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects that ``torch.load(weights_only=True)`` refuses to rebuild."""


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
