"""Backend registry and selection shared by every foveal operator.

Each operator family keeps an ordered registry of backends (``"triton"`` before ``"reference"``).
A backend is a probe that says why it cannot run a given call (or ``None`` when it can) plus the
forward and backward launchers. ``backend="auto"`` takes the first backend whose probe accepts the
call; the environment variable ``FOVEAL_BACKEND`` replaces ``"auto"`` for every op, and an explicit
``backend=`` argument wins over both. Asking for a backend that cannot run raises with its reason.

Set ``FOVEAL_LOG_LEVEL=DEBUG`` to log why each backend declined.
"""
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["Backend", "BackendRegistry", "BACKEND_ENV", "logger", "triton_device_reason"]

BACKEND_ENV = "FOVEAL_BACKEND"

logger = logging.getLogger("foveal.kernels")
if os.environ.get("FOVEAL_LOG_LEVEL"):
    logger.setLevel(os.environ["FOVEAL_LOG_LEVEL"].upper())


@dataclass(frozen=True)
class Backend:
    """One implementation of an operator.

    Attributes:
        name: id used in ``backend=`` arguments and in ``FOVEAL_BACKEND``.
        probe: ``probe(*tensors, **cfg) -> Optional[str]``: ``None`` when the backend can run the
            call, otherwise the reason it cannot.
        fwd: forward launcher.
        bwd: backward launcher.
    """

    name: str
    probe: Callable[..., Optional[str]]
    fwd: Callable
    bwd: Callable


class BackendRegistry:
    """Ordered backends of one operator family (first = preferred)."""

    def __init__(self, op_name: str):
        self.op_name = op_name
        self._backends: dict[str, Backend] = {}

    def register(self, backend: Backend, first: bool = False) -> None:
        if backend.name in ("auto",):
            raise ValueError(f"backend name {backend.name!r} is reserved")
        items = [(n, b) for n, b in self._backends.items() if n != backend.name]
        items = [(backend.name, backend)] + items if first else items + [(backend.name, backend)]
        self._backends = dict(items)

    def names(self) -> list[str]:
        return list(self._backends)

    def __getitem__(self, name: str) -> Backend:
        return self._backends[name]

    def choose(self, requested: Optional[str], *tensors, **cfg) -> str:
        """Resolves ``requested`` ("auto", None or a backend id) to a backend that can run the call."""
        if requested is None or requested == "auto":
            requested = os.environ.get(BACKEND_ENV, "auto") or "auto"
            source = f"environment variable {BACKEND_ENV}"
        else:
            source = "argument backend"
        if not isinstance(requested, str):
            raise TypeError(f"{self.op_name}: backend must be a string, got {type(requested).__name__}")
        if requested == "auto":
            reasons = []
            for name, backend in self._backends.items():
                reason = backend.probe(*tensors, **cfg)
                if reason is None:
                    return name
                if not torch.compiler.is_compiling():  # dynamo cannot trace logging calls
                    logger.debug("%s: backend %r declined: %s", self.op_name, name, reason)
                reasons.append(f"{name}: {reason}")
            raise NotImplementedError(
                f"{self.op_name}: no backend can run this call ({'; '.join(reasons)}). "
                f"Set FOVEAL_LOG_LEVEL=DEBUG to log the reasons."
            )
        if requested not in self._backends:
            raise ValueError(
                f"{self.op_name}: unknown backend {requested!r} (from {source}); "
                f"expected 'auto' or one of {self.names()}"
            )
        reason = self._backends[requested].probe(*tensors, **cfg)
        if reason is not None:
            raise NotImplementedError(
                f"{self.op_name}: backend {requested!r} (from {source}) cannot run this call: {reason}"
            )
        return requested


def triton_device_reason(t: torch.Tensor, interpreting: bool) -> Optional[str]:
    """Why a Triton backend cannot take ``t``'s device (``None`` when it can): CUDA tensors, or CPU
    tensors when the kernels run in Triton's interpreter (``interpreting``)."""
    if t.is_cuda:
        return None
    if not t.is_cpu:
        return f"needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got device={t.device}"
    if interpreting:
        return None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return ("CPU tensors need Triton's interpreter, but TRITON_INTERPRET=1 was set after triton was "
                "imported; set it before the first import")
    return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)"
