"""Argument checks shared by foveal operators.

Messages follow one pattern: the argument, the rule, then what was given.
"""
import math
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "check_tensors",
    "check_axis_arg",
    "check_bool_axis_arg",
    "check_scale_arg",
]

IntOrTuple = Union[int, Sequence[int]]


def check_tensors(op: str, names: Sequence[str], tensors: Sequence[torch.Tensor], rank: int) -> None:
    """Type, floating dtype, rank, dtype and device agreement of the op's main tensors."""
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must have a floating dtype, got {name}.dtype={t.dtype}")
        if t.dim() != rank:
            raise ValueError(
                f"{op}: {name} must have {rank} dimensions, got {name}.shape={tuple(t.shape)}"
            )
    first, t0 = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != t0.dtype:
            raise ValueError(
                f"{op}: {name} and {first} must have the same dtype, got {name}.dtype={t.dtype}, "
                f"{first}.dtype={t0.dtype}"
            )
        if t.device != t0.device:
            raise ValueError(
                f"{op}: {name} and {first} must be on the same device, got {name}.device={t.device}, "
                f"{first}.device={t0.device}"
            )


def check_axis_arg(op: str, name: str, value: IntOrTuple, n: int, minimum: int) -> tuple[int, ...]:
    """Normalises an int-or-tuple argument to an ``n``-tuple of ints ``>= minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int or a tuple of {n} ints, got {value!r}")
    if isinstance(value, int):
        value = (value,) * n
    elif isinstance(value, (tuple, list, torch.Size)):
        value = tuple(value)
        if len(value) != n or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise ValueError(f"{op}: {name} must be an int or a tuple of {n} ints, got {value!r}")
    else:
        raise TypeError(f"{op}: {name} must be an int or a tuple of {n} ints, got {type(value).__name__}")
    if any(x < minimum for x in value):
        raise ValueError(f"{op}: every {name} must be >= {minimum}, got {name}={value}")
    return value


def check_bool_axis_arg(op: str, name: str, value: Union[bool, Sequence[bool]], n: int) -> tuple[bool, ...]:
    """Normalises a bool-or-tuple argument to an ``n``-tuple of bools."""
    if isinstance(value, bool):
        return (value,) * n
    if isinstance(value, (tuple, list)) and len(value) == n and all(isinstance(x, bool) for x in value):
        return tuple(value)
    raise TypeError(f"{op}: {name} must be a bool or a tuple of {n} bools, got {value!r}")


def check_scale_arg(op: str, scale: Optional[float], head_dim: int) -> float:
    """Default scale is head_dim ** -0.5; an explicit 0.0 is kept (it is not 'unset'), negative
    scales are allowed; nan and +-inf are rejected (they would turn every output into NaN)."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    try:
        value = float(scale)
    except OverflowError:  # an int beyond the float range
        value = math.inf if scale > 0 else -math.inf
    if not value - value == 0:  # nan and +-inf; unlike math.isfinite it traces on a SymFloat (dynamic=True)
        raise ValueError(f"{op}: scale must be a finite number, got scale={value}")
    return value
