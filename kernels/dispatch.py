"""Which path an op call takes: its custom op, or the eager path that skips the dispatcher.

The Python dispatch of a ``torch.library`` custom op costs more host time than a small kernel, so
eager calls on plain tensors take an ``autograd.Function`` (or, with nothing to differentiate, the
backend directly). Anything that needs to see the op (torch.compile, export, jit tracing, fake or
meta tensors, tensor subclasses, dispatch modes such as the FLOP counter, functorch transforms)
goes through the custom op.
"""
import os
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["CheckCache", "eager_ok", "env"]

# nn.Parameter is a plain tensor to the dispatcher: it disables torch_function
_PLAIN = (Tensor, torch.nn.Parameter)


def eager_ok(*tensors: Optional[Tensor]) -> bool:
    """True when a call on ``tensors`` (None entries are skipped) may bypass the custom op."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.is_meta):
            return False
    return True


# os.environ.get encodes the name and wraps the value on every call (a few microseconds, paid
# several times per op call); on POSIX its backing dict of bytes is read directly, and it stays
# in step with os.environ (putenv through os.environ updates it, as monkeypatch.setenv does)
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None


def env(name: str, default: Optional[str] = None) -> Optional[str]:
    """``os.environ.get(name, default)``, cheaply."""
    if _ENV_DATA is None:  # pragma: no cover - not POSIX
        return os.environ.get(name, default)
    value = _ENV_DATA.get(name.encode())
    return default if value is None else value.decode()


class CheckCache:
    """Resolved argument checks of one op, keyed by call signature.

    Calls with the same shapes, dtypes, devices and arguments pass the same checks and pick the same
    backend, so an op resolves them once per signature (a model makes tens of calls per step with a
    few signatures). The cache is cleared when it outgrows ``limit`` (shapes that never repeat).
    """

    def __init__(self, limit: int = 4096):
        self.limit = limit
        self._entries: dict = {}

    def get(self, key):
        return self._entries.get(key)

    def put(self, key, value) -> None:
        if len(self._entries) > self.limit:
            self._entries.clear()
        self._entries[key] = value
