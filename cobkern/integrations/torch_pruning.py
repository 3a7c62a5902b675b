"""Torch-Pruning support for cobkern's TSRA and RMSNorm modules.

Torch-Pruning (PyPI ``torch-pruning``) traces a model's autograd graph and removes coupled
channels from every layer it knows. It does not know cobkern's parameter-free modules, so
out of the box it treats them as element-wise ops: it cuts the convolutions and linear
layers around them but leaves :attr:`RMSNorm.num_channels`, the TSRA ``num_channels`` and
``split`` stale, and the next forward fails. This module supplies the missing pieces:

* :class:`TSRAPruner` — a Torch-Pruning pruning function for :class:`cobkern.nn.TSRA`,
  :class:`cobkern.nn.RMSNormTSRA` and :class:`cobkern.nn.RMSNorm`. Removing channels keeps
  the order of the survivors, updates ``num_channels``, sets the new ``split`` to the number
  of kept channels that were in ``U`` (indices below the old split) and, for the RMSNorm
  modules, sets ``norm_size`` per the ``normalizer`` option (``"kept"``: average over the
  kept channels, the paper's behaviour; ``"original"``: keep the unpruned width as the
  normaliser so the activations' scale does not shift).
* :func:`customized_pruners` — the ``customized_pruners=`` dict for Torch-Pruning's pruners
  and :class:`torch_pruning.DependencyGraph`.
* :class:`SubspaceGuard` — wraps any Torch-Pruning importance so that the most important
  channel of each TSRA subspace is never removed (TSRA needs ``1 <= split < C``).
* :func:`prune_with_torch_pruning` — one call: build a ``MetaPruner`` with the above for a
  cobkern VGG (TSRA or ReLU) and prune a uniform channel ratio, logits never pruned.

Example::

    import torch, torch_pruning as tp
    import cobkern.models
    from cobkern.integrations.torch_pruning import SubspaceGuard, customized_pruners
    model = cobkern.models.vgg16_tsra(width=0.25)
    pruner = tp.pruner.MetaPruner(
        model, torch.randn(1, 3, 32, 32),
        importance=SubspaceGuard(tp.importance.MagnitudeImportance(p=2)),
        pruning_ratio=0.5, ignored_layers=[model.classifier[-1]],
        customized_pruners=customized_pruners())
    pruner.step()
    model(torch.randn(1, 3, 32, 32))  # works: TSRA/RMSNorm widths and splits follow
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner.function import BasePruningFunc

from cobkern._modes import eval_mode
from cobkern.nn import TSRA, RMSNorm, RMSNormTSRA

__all__ = [
    "TSRAPruner",
    "TSRAPruningError",
    "SubspaceGuard",
    "customized_pruners",
    "make_importance",
    "prune_with_torch_pruning",
    "TSRA_TYPES",
]

Normalizer = Literal["kept", "original"]

#: cobkern module types the pruner handles.
TSRA_TYPES: tuple[type[nn.Module], ...] = (TSRA, RMSNormTSRA, RMSNorm)

#: Score given to protected channels by :class:`SubspaceGuard` (finite, so normalisation
#: and global ranking stay well-defined).
_PROTECTED = 1e30


class TSRAPruningError(ValueError):
    """Pruning would leave a TSRA subspace empty (TSRA needs ``1 <= split < C``)."""


def _plain(idxs: Sequence[Any]) -> list[int]:
    return [int(getattr(i, "idx", i)) for i in idxs]


class TSRAPruner(BasePruningFunc):
    """Torch-Pruning pruning function for cobkern's TSRA, RMSNormTSRA and RMSNorm modules.

    These modules have no parameters: pruning updates their channel count, the TSRA
    ``split`` and the RMSNorm ``norm_size``. Input and output channels are the same axis,
    so ``prune_in_channels is prune_out_channels`` (Torch-Pruning's convention for an
    intra-layer dependency).

    Args:
        normalizer: ``"kept"`` (default) — RMSNorm averages over the kept channels
            (``norm_size`` unchanged; ``None`` means the current width); ``"original"`` —
            RMSNorm keeps dividing by the unpruned width (``norm_size`` set to the width
            before the first pruning).

    Raises:
        TSRAPruningError: from a prune call that would remove every channel of ``U`` or of
            ``V``; the module is left unchanged. Wrap the importance in
            :class:`SubspaceGuard` to prevent it.
    """

    TARGET_MODULES = TSRA_TYPES

    def __init__(self, normalizer: Normalizer = "kept") -> None:
        super().__init__(pruning_dim=1)
        if normalizer not in ("kept", "original"):
            raise ValueError(f"normalizer must be 'kept' or 'original', got {normalizer!r}")
        self.normalizer = normalizer

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Remove channels ``idxs`` from ``layer`` in place and return it."""
        c = int(layer.num_channels)
        drop = set(_plain(idxs))
        keep = [i for i in range(c) if i not in drop]
        if isinstance(layer, (TSRA, RMSNormTSRA)):
            split = sum(1 for i in keep if i < layer.split)
            if not 1 <= split < len(keep):
                raise TSRAPruningError(
                    f"pruning {len(drop)} of {c} channels from {type(layer).__name__} "
                    f"(split={layer.split}) leaves {split} in U and {len(keep) - split} in V; "
                    f"TSRA needs at least one in each. Wrap the importance in "
                    f"cobkern.integrations.torch_pruning.SubspaceGuard.")
            layer.split = split
        if isinstance(layer, (RMSNorm, RMSNormTSRA)) and self.normalizer == "original":
            if layer.norm_size is None:
                layer.norm_size = c
        layer.num_channels = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        """The module's channel count."""
        return int(layer.num_channels)

    def get_in_channels(self, layer: nn.Module) -> int:
        """The module's channel count (same axis as the output)."""
        return int(layer.num_channels)


def customized_pruners(normalizer: Normalizer = "kept") -> dict[type[nn.Module], TSRAPruner]:
    """The ``customized_pruners`` dict that registers cobkern's modules with Torch-Pruning.

    Pass it to ``tp.pruner.MetaPruner(..., customized_pruners=...)`` (or any pruner built on
    it) or to ``tp.DependencyGraph().build_dependency(..., customized_pruners=...)``.
    """
    pruner = TSRAPruner(normalizer)
    return {t: pruner for t in TSRA_TYPES}


class SubspaceGuard(tp.importance.Importance):
    """Wrap a Torch-Pruning importance so no TSRA subspace is ever emptied.

    For every TSRA / RMSNormTSRA in a pruning group, the channel with the highest score in
    ``U`` and the one with the highest score in ``V`` get a huge score, so the pruner keeps
    them whatever the ratio (below 100%). All other scores pass through unchanged, so any of
    Torch-Pruning's criteria can be used.

    Args:
        base: the importance to wrap (e.g. ``tp.importance.MagnitudeImportance(p=2)``).
    """

    def __init__(self, base: tp.importance.Importance) -> None:
        self.base = base

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor:
        imp = self.base(group)
        if not isinstance(imp, torch.Tensor) or imp.dim() != 1 or imp.numel() == 0:
            return imp
        imp = imp.clone()
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if not isinstance(layer, (TSRA, RMSNormTSRA)):
                continue
            local = _plain(idxs)
            # Scores are indexed by the root layer's channels: map through root_idxs (filled
            # in by the dependency graph; plain ints or (idx, root_idx) pairs).
            root_idxs = getattr(group[i], "root_idxs", None)
            if root_idxs is None:
                root_idxs = [getattr(h, "root_idx", None) for h in idxs]
            roots = [getattr(r, "root_idx", r) for r in root_idxs]
            for in_u in (True, False):
                cand = [r for loc, r in zip(local, roots, strict=False)
                        if r is not None and 0 <= int(r) < imp.numel()
                        and (loc < layer.split) == in_u]
                if not cand:
                    continue
                idx = torch.tensor([int(r) for r in cand], device=imp.device)
                scores = torch.nan_to_num(imp[idx], nan=-float("inf"))
                imp[idx[int(torch.argmax(scores))]] = _PROTECTED
        return imp


def make_importance(name: str) -> tp.importance.Importance:
    """A Torch-Pruning importance by name.

    ``"l2"`` / ``"magnitude"``: group L2 magnitude; ``"l1"``: group L1 magnitude;
    ``"l2-first"`` / ``"l1-first"``: the norm of the layer's own output weights only (the
    classic filter-norm criterion of Li et al.); ``"random"``.
    """
    name = name.lower()
    if name in ("l2", "magnitude"):
        return tp.importance.MagnitudeImportance(p=2)
    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name in ("l2-first", "l1-first"):
        return tp.importance.MagnitudeImportance(p=2 if name.startswith("l2") else 1,
                                                 group_reduction="first", normalizer=None)
    if name == "random":
        return tp.importance.RandomImportance()
    raise ValueError(f"unknown Torch-Pruning importance {name!r} "
                     "(choose l2, l1, l2-first, l1-first, random)")


def _logits_layer(model: nn.Module) -> nn.Module:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no nn.Linear: cannot find the logits layer to protect")
    return linears[-1]


def prune_with_torch_pruning(
    model: nn.Module,
    channel_ratio: float,
    *,
    importance: str | tp.importance.Importance = "l2",
    example_inputs: torch.Tensor | None = None,
    normalizer: Normalizer = "kept",
    ignored_layers: Sequence[nn.Module] | None = None,
) -> nn.Module:
    """Prune a fraction of every prunable layer's channels with Torch-Pruning, in place.

    Works for cobkern's TSRA models (via :func:`customized_pruners` and
    :class:`SubspaceGuard`) and for ordinary networks such as the ReLU control. The logits
    layer (the last ``nn.Linear``) is never pruned; input channels are never pruned.

    Args:
        model: the model (its parameters' device is used for the example input).
        channel_ratio: fraction of channels removed from every group, in ``[0, 1)``. To
            remove a fraction ``P`` of parameters use ``1 - sqrt(1 - P)``.
        importance: a name for :func:`make_importance` or a Torch-Pruning importance.
        example_inputs: a batch for tracing; default one random ``(1, 3, 32, 32)`` image
            in the dtype and on the device of the model's parameters (tracing only needs
            the shapes).
        normalizer: RMSNorm normaliser after pruning, see :class:`TSRAPruner`.
        ignored_layers: extra layers to leave alone.

    Returns:
        The same model object, pruned.

    Raises:
        TSRAPruningError: the ratio would keep fewer than 2 channels of some TSRA layer
            (checked before anything is changed).
    """
    if not 0.0 <= channel_ratio < 1.0:
        raise ValueError(f"channel_ratio must be in [0, 1), got {channel_ratio!r}")
    if channel_ratio == 0.0:
        return model
    for name, m in model.named_modules():
        if isinstance(m, (TSRA, RMSNormTSRA)) and int(m.num_channels * (1 - channel_ratio)) < 2:
            raise TSRAPruningError(
                f"channel_ratio={channel_ratio} keeps {int(m.num_channels * (1 - channel_ratio))}"
                f" of {m.num_channels} channels in {name}; TSRA needs at least 2 (one per "
                f"subspace)")
    first = next(model.parameters())
    if example_inputs is None:
        # in the model's floating dtype: a float32 image would not trace a bf16/float64 model
        dtype = first.dtype if first.is_floating_point() else torch.get_default_dtype()
        gen = torch.Generator().manual_seed(0)
        example_inputs = torch.randn(1, 3, 32, 32, generator=gen).to(first.device, dtype)
    imp = make_importance(importance) if isinstance(importance, str) else importance
    # also on a failed trace (e.g. a wrong example input) the modes are put back
    with eval_mode(model):
        pruner = tp.pruner.MetaPruner(
            model, example_inputs, importance=SubspaceGuard(imp), pruning_ratio=channel_ratio,
            ignored_layers=[_logits_layer(model), *(ignored_layers or [])],
            customized_pruners=customized_pruners(normalizer))
        with torch.enable_grad():
            pruner.step()
    return model
