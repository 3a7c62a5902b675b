"""Merging the CoB rotations into the weights (``method.md`` §4.3).

For each CoB layer with rotation ``R = diag(R_U, R_V)`` (eigenvectors of its un-rotated
statistics as rows):

* producer (output side): ``W ← R W``, ``b ← R b`` — a conv weight viewed as
  ``(out, in·k·k)``;
* consumer (input side): ``W_next ← W_next Rᵀ`` — a conv weight's input-channel axis, a
  linear's columns; through a ``Flatten`` the linear weight is viewed as ``(out, C, S)``
  (column ``c·S + s``) and its ``C`` axis is rotated.

Every rotation comes from the same un-rotated pass; a weight that is both a consumer and a
producer gets ``R_l W R_{l-1}ᵀ``. The arithmetic is float64, stored back in the weight's
dtype. RMSNorm, TSRA, average pooling and (eval) dropout commute with ``R``, so the
network's function is unchanged up to round-off.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cobkern._digest import tensor_digest

from .discovery import CoBLayer, refuse_masked_weights, select_layers
from .stats import CalibrationStats, LayerStats, weight_fingerprint

__all__ = ["rotate_model", "RotationResult", "rotate_output", "rotate_input", "ROTATION_MARK",
           "undone_on_error", "checked_layers", "rotate_layers"]

#: Attribute :func:`rotate_model` sets on each producer it rotated: a digest of the
#: statistics it rotated with. The weight fingerprint cannot tell a second rotation by the
#: same statistics when ``W Wᵀ = c·I`` and the bias is zero (orthogonal init: ``R W Wᵀ Rᵀ =
#: c·I``), nor where the statistics record no fingerprint; the mark can.
ROTATION_MARK = "_cobkern_rotated_with"


def _stats_token(s: LayerStats) -> str:
    """A digest of one layer's statistics (what marks a rotation by them)."""
    return tensor_digest([(f"{s.name}|{s.num_channels}|{s.split}|{s.count}|sum_sq", s.sum_sq),
                          ("sum_abs", s.sum_abs), ("gram_u", s.gram_u.diagonal())])


@contextmanager
def undone_on_error(layers: Sequence[CoBLayer]) -> Iterator[None]:
    """Put back what a rotation of ``layers`` rewrites if the block raises.

    Copies every weight and bias of the layers' producers and consumers (one extra copy of
    those parameters while the block runs) and their :data:`ROTATION_MARK`; on any exception
    — ``KeyboardInterrupt`` included — they are restored and the exception re-raised, so the
    model is never left partly rotated.
    """
    params: dict[int, Tensor] = {}
    for lay in layers:
        for m in (lay.producer, lay.consumer):
            for p in (m.weight, m.bias):
                if p is not None:
                    params[id(p)] = p
    saved = [(p, p.detach().clone()) for p in params.values()]
    marks = [(lay.producer, getattr(lay.producer, ROTATION_MARK, None)) for lay in layers]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for p, copy in saved:
                p.copy_(copy)
        for m, mark in marks:
            if mark is None:
                m.__dict__.pop(ROTATION_MARK, None)
            else:
                setattr(m, ROTATION_MARK, mark)
        raise


@dataclass
class RotationResult:
    """What :func:`rotate_model` did.

    Attributes:
        rotations: ``name → R`` (``(C, C)`` float64, block-diagonal).
        stats: the statistics in the rotated basis (:meth:`CalibrationStats.rotated`).
    """

    rotations: dict[str, Tensor]
    stats: CalibrationStats


def rotate_output(module: nn.Module, r: Tensor) -> None:
    """``W ← R W``, ``b ← R b`` on a Conv2d/Linear's output channels (in place)."""
    w = module.weight
    w2 = r.to(w.device) @ w.detach().to(torch.float64).reshape(w.shape[0], -1)
    w.data.copy_(w2.reshape(w.shape).to(w.dtype))
    if module.bias is not None:
        b = module.bias
        b.data.copy_((r.to(b.device) @ b.detach().to(torch.float64)).to(b.dtype))


def rotate_input(module: nn.Module, r: Tensor, spatial: int = 1) -> None:
    """``W ← W Rᵀ`` on a Conv2d/Linear's input channels (in place).

    Args:
        spatial: ``S`` when the input is a flattened ``(C, S)`` map (linear columns
            ``c·S + s``).
    """
    w = module.weight
    c = r.shape[0]
    wd = w.detach().to(torch.float64)
    rd = r.to(w.device)
    if isinstance(module, nn.Conv2d):
        w2 = torch.einsum("ocij,dc->odij", wd, rd)
    else:
        w2 = torch.einsum("ocs,dc->ods", wd.reshape(w.shape[0], c, spatial), rd)
    w.data.copy_(w2.reshape(w.shape).to(w.dtype))


def rotate_model(model: nn.Module, stats: CalibrationStats,
                 layers: list[str] | None = None) -> RotationResult:
    """Rotate every CoB layer of ``model`` (in place) into its principal basis.

    Args:
        model: the un-rotated model the statistics were computed on.
        stats: ``basis="original"`` statistics (:func:`calibrate`).
        layers: restrict to these CoB layers (default: every layer in ``stats``).

    Returns:
        :class:`RotationResult` (rotations and the rotated statistics).

    Raises:
        ValueError: statistics already in the rotated basis, or not matching the model (in
            width, split or weights: e.g. a model this function already rotated — its
            weights, or the mark :data:`~cobkern.cob.rotate.ROTATION_MARK` it leaves on
            the producers, tell), or a weight masked by ``torch.nn.utils.prune``
            (:func:`~cobkern.cob.discovery.refuse_masked_weights`).

    If it fails or is interrupted part-way, the weights and marks it had rewritten are put
    back (:func:`undone_on_error`).
    """
    chosen = checked_layers(model, stats, layers)
    with undone_on_error(chosen):
        return rotate_layers(chosen, stats)


def checked_layers(model: nn.Module, stats: CalibrationStats,
                   layers: list[str] | None) -> list[CoBLayer]:
    """:func:`rotate_model`'s checks (it raises what they raise); the layers to rotate."""
    if stats.basis != "original":
        raise ValueError(f"rotate_model needs statistics of the un-rotated model, got basis "
                         f"{stats.basis!r}")
    found = select_layers(model, None)
    stats.check_model(found)
    if layers is None:
        layers = [lay.name for lay in found if lay.name in stats]
    chosen: list[CoBLayer] = select_layers(model, layers)
    refuse_masked_weights(chosen, "rotate_model")
    stats.check_matches(chosen)
    return chosen


def rotate_layers(chosen: Sequence[CoBLayer], stats: CalibrationStats) -> RotationResult:
    """Rotate ``chosen`` (from :func:`checked_layers`) in place, without a guard of its own:
    the caller wraps it in :func:`undone_on_error` (:func:`rotate_model`, or ``prune``,
    whose one guard also covers what it does after the rotation — a second would copy the
    weights twice). Refuses, before writing anything, layers these statistics already
    rotated (their :data:`ROTATION_MARK`)."""
    tokens = {lay.name: _stats_token(stats[lay.name]) for lay in chosen}
    for lay in chosen:
        if getattr(lay.producer, ROTATION_MARK, None) == tokens[lay.name]:
            raise ValueError(
                f"rotate_model: {lay.name!r} was already rotated with these statistics; a "
                "second rotation would leave it out of its principal basis. Use the "
                "statistics rotate_model returned (RotationResult.stats), or calibrate the "
                "rotated model anew")
    rotations = {lay.name: stats[lay.name].eigh().rotation() for lay in chosen}
    with torch.no_grad():
        for lay in chosen:
            r = rotations[lay.name]
            rotate_output(lay.producer, r)
            rotate_input(lay.consumer, r, lay.spatial)
            setattr(lay.producer, ROTATION_MARK, tokens[lay.name])
    rotated = CalibrationStats({lay.name: stats[lay.name].rotated() for lay in chosen},
                               stats.num_images, dict(stats.meta))
    for lay in chosen:  # the rotated statistics belong to the rotated weights
        rotated[lay.name].fingerprint = weight_fingerprint(lay.producer)
    return RotationResult(rotations, rotated)
