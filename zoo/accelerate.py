"""``foveal.accelerate(model)``: swap timm's attention layers for foveal's fused ones, in place.

Today that is timm's ``HaloAttn`` (every HaloNet: ``halonet26t``, ``sehalonet33ts``,
``halonet50ts``, ``eca_halonext26ts``, ``haloregnetz_b``, ``halo2botnet50ts_256``,
``lamhalobotnet50ts_256``, ``halonet_h1``, and any model built from ``timm.layers.HaloAttn``),
which becomes :class:`foveal.layers.HaloAttention2d`: a subclass with the same submodules and
parameters whose forward runs the fused halo op. The swap changes each layer's class and keeps the
module object, so parameters, buffers, hooks, an optimizer built on them and the state-dict keys
all stay as they were, and the outputs are the same (SPEC section 2).
"""
import warnings

from torch import nn

from timm.layers.halo_attn import HaloAttn

from foveal.layers.halo import HaloAttention2d

__all__ = ["accelerate"]

# timm class -> foveal class that subclasses it and adds only the attributes set in _swap
_REPLACEMENTS = {HaloAttn: HaloAttention2d}


def _swap(module: nn.Module, cls: type, backend: str) -> None:
    module.__class__ = cls
    module.backend = backend


def accelerate(model: nn.Module, *, backend: str = "auto", verbose: bool = True) -> nn.Module:
    """Replaces, in place, every timm layer that foveal has a fused equivalent for (today
    ``timm.layers.HaloAttn`` -> :class:`foveal.layers.HaloAttention2d`), keeping its weights.

    Args:
        model: any ``nn.Module`` (a timm model, or the layer itself).
        backend: op backend the fused layers use (``"auto"``, ``"triton"`` or ``"reference"``).
        verbose: print a one-line summary of what was replaced.

    Returns:
        ``model`` itself (modified in place), so ``model = foveal.accelerate(model)`` reads naturally.

    Warns:
        UserWarning: nothing in ``model`` could be replaced (its attention layers are not timm
            ``HaloAttn``, or were already replaced).

    Example:
        >>> model = foveal.accelerate(timm.create_model("halonet26t"))  # doctest: +SKIP
        foveal.accelerate: replaced 3 HaloAttn layers with HaloAttention2d (stages.2.1.self_attn, ...)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be a torch.nn.Module, got {type(model).__name__}")
    replaced: dict = {}
    already = 0
    for name, module in model.named_modules():
        cls = _REPLACEMENTS.get(type(module))
        if cls is not None:
            replaced.setdefault((type(module).__name__, cls.__name__), []).append(name or "<root>")
            _swap(module, cls, backend)
        elif type(module) in _REPLACEMENTS.values():
            module.backend = backend
            already += 1
    if not replaced:
        note = f" ({already} fused layers already there; their backend was set to {backend!r})" if already else ""
        warnings.warn(
            f"accelerate: nothing to replace in {type(model).__name__}{note}; foveal accelerates "
            f"{', '.join(c.__name__ for c in _REPLACEMENTS)} layers (timm HaloNets such as halonet26t)",
            stacklevel=2,
        )
    elif verbose:
        for (old, new), names in replaced.items():
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            print(f"foveal.accelerate: replaced {len(names)} {old} layers with {new} ({shown})")
    return model
