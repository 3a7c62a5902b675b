"""Wrappers that leave a model's function and weights alone: ``torch.compile``'s
``OptimizedModule`` and ``DistributedDataParallel`` / ``DataParallel``.

Each keeps the real model as an attribute (``_orig_mod`` / ``module``), so names taken
from the wrapper get a prefix (``_orig_mod.features.0``, ``module.features.0``) that the
model itself does not have. Everything in cobkern that names layers — CoB discovery,
calibration statistics, pruning surgery, model files — names them on the unwrapped model,
so statistics computed through a compiled or DDP-wrapped model apply to the plain one and
the other way round.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

__all__ = ["unwrap_model", "named_modules", "get_submodule", "PARALLEL_WRAPPERS",
           "parallel_wrapped", "compiled_in_place"]

#: The wrappers that split work across devices or processes.
PARALLEL_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` and ``DistributedDataParallel``/``DataParallel`` wrappers
    (nested ones too); any other module is returned as it is."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, PARALLEL_WRAPPERS):
            model = model.module
        else:
            return model


def named_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` with every wrapper looked through: each module under the
    name it has in the unwrapped model (a wrapper itself is not listed)."""
    model = unwrap_model(model)
    yield prefix, model
    for name, child in model._modules.items():
        if child is not None:
            yield from named_modules(child, f"{prefix}.{name}" if prefix else name)


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` for a name from :func:`named_modules` (wrappers
    looked through on the way; the result unwrapped too)."""
    m = unwrap_model(model)
    for part in name.split(".") if name else ():
        m = unwrap_model(m.get_submodule(part))
    return m


def compiled_in_place(model: nn.Module) -> bool:
    """Whether ``model.compile()`` was called: ``nn.Module.compile`` compiles ``__call__``
    in place, with no wrapper to unwrap (calling its submodules one by one would bypass
    the compiled graph; switching its attributes would trace it again)."""
    return getattr(model, "_compiled_call_impl", None) is not None


def parallel_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` is, or wraps (through ``torch.compile`` too), a DataParallel or
    DistributedDataParallel module."""
    while True:
        if isinstance(model, PARALLEL_WRAPPERS):
            return True
        if not hasattr(model, "_orig_mod"):
            return False
        model = model._orig_mod
