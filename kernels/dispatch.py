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

__all__ = ["CheckCache", "LeanOp", "custom_op", "eager_ok", "env", "like_fake"]

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


def like_fake(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` in the dtype and strides of ``torch.empty_like(ref)``, the layout an op's fake
    implementation promises for a gradient of ``ref`` (compiled graphs assert it): ``t`` itself when
    it already has them, else a copy."""
    out = torch.empty_like(ref)
    if out.dtype == t.dtype and out.stride() == t.stride():
        return t
    return out.copy_(t)


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


# -- lean custom ops ------------------------------------------------------------------------------
# ``torch.library.custom_op`` dispatches a call through two Python layers: an autograd kernel that
# re-enters the C++ dispatcher below autograd, then a per-device wrapper around the function. A
# compiled graph calls each op with grad disabled, so every call pays both (tens of microseconds, as
# much as a small kernel). :func:`custom_op` defines the same operator (schema inferred from the
# annotations, fake implementation, autograd formula, FLOP formulas and opcheck work as before) with
# one Python autograd kernel that calls the function directly when there is nothing to
# differentiate and the tensors are plain, and otherwise redispatches below autograd.

_LIBS: dict = {}
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset
_DIRECT_KEYS = frozenset((torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA))


# keyset bits -> whether their highest key below autograd is CPU or CUDA (a model sees a handful of
# keysets; the pybind enum lookup costs about 1 us a call, the raw bits a tenth of it)
_DIRECT_BY_KEYSET: dict = {}


def _direct(keyset) -> bool:
    """True when an operator call reaching its autograd kernel with ``keyset`` may run the function
    itself: plain CPU or CUDA tensors below autograd (no Python key of a mode or subclass, no meta or
    functionalization), no jit tracing and no functorch transform."""
    raw = keyset.raw_repr()
    plain = _DIRECT_BY_KEYSET.get(raw)
    if plain is None:
        if len(_DIRECT_BY_KEYSET) > 256:
            _DIRECT_BY_KEYSET.clear()
        plain = _DIRECT_BY_KEYSET[raw] = (keyset & _AFTER_AUTOGRAD).highestPriorityTypeId() in _DIRECT_KEYS
    return plain and not torch._C._is_tracing() and not torch._C._are_functorch_transforms_active()


def _library(namespace: str) -> torch.library.Library:
    lib = _LIBS.get(namespace)
    if lib is None:
        lib = _LIBS[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return lib


class LeanOp:
    """A custom operator defined by :func:`custom_op`; calling it calls the operator."""

    def __init__(self, qualname: str, fn, mutates_args=()):
        namespace, name = qualname.split("::")
        self.qualname = qualname
        self._fn = fn
        self._lib = _library(namespace)
        self._lib.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        self._lib.impl(name, fn, "CompositeExplicitAutograd")
        self.op = getattr(getattr(torch.ops, namespace), name).default
        self._backward = self._setup_context = None
        # positions of the Tensor / Tensor? arguments: the only ones that can require grad
        self._tensor_args = tuple(
            i for i, a in enumerate(self.op._schema.arguments)
            if isinstance(a.type, torch.TensorType)
            or (isinstance(a.type, torch.OptionalType) and isinstance(a.type.getElementType(), torch.TensorType)))
        self._lib.impl(name, self._autograd_kernel, "Autograd", with_keyset=True)
        self.__doc__ = fn.__doc__
        self.__name__ = name

    def __call__(self, *args):
        return self.op(*args)

    def register_fake(self, fake):
        torch.library.register_fake(self.qualname, fake, lib=self._lib)
        return fake

    def register_autograd(self, backward, setup_context) -> None:
        self._backward, self._setup_context = backward, setup_context

    def _autograd_kernel(self, keyset, *args):
        differentiable = False
        if torch.is_grad_enabled():
            for i in self._tensor_args:
                a = args[i]
                if a is not None and a.requires_grad:
                    if self._backward is not None:
                        return _LeanFunction.apply(self, keyset, *args)
                    differentiable = True  # an op without a formula: its outputs stay off the graph
                    break
        direct = _direct(keyset)
        if direct and not differentiable:
            # nothing to record: the function runs as it is (under _AutoDispatchBelowAutograd its
            # tensor allocations dispatch more slowly, about 1.5 us a call)
            return self._fn(*args)
        with torch._C._AutoDispatchBelowAutograd():
            if direct:
                return self._fn(*args)
            return self.op.redispatch(keyset & _AFTER_AUTOGRAD, *args)


class _LeanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lean: LeanOp, keyset, *args):
        if _direct(keyset):  # grad mode is off inside forward: nothing the function does is recorded
            out = lean._fn(*args)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                out = lean.op.redispatch(keyset & _AFTER_AUTOGRAD, *args)
        lean._setup_context(ctx, args, out)
        ctx._lean = lean
        return out

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[2:]  # the backward formula sees the operator's own inputs
        try:
            grads = ctx._lean._backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (None, None) + (tuple(grads) if isinstance(grads, tuple) else (grads,))


def custom_op(qualname: str, *, mutates_args=()):
    """Decorator like ``torch.library.custom_op`` (functional ops only) that returns a :class:`LeanOp`."""
    if mutates_args:
        raise ValueError("foveal custom ops are functional: mutates_args must be empty")

    def wrap(fn) -> LeanOp:
        return LeanOp(qualname, fn)

    return wrap
