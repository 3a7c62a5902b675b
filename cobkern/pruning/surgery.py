"""Structured pruning surgery: build a genuinely smaller model from keep sets (``method.md`` §4.5).

For each CoB layer with keep sets ``K_U ⊆ [0, split)``, ``K_V ⊆ [0, C-split)``, the kept
channels are ``idx = K_U ∪ (split + K_V)`` (in order). Then

* the producer keeps ``len(idx)`` outputs (rows ``idx`` of the weight and bias);
* the consumer keeps the matching input columns (through a ``Flatten``, the columns
  ``c·S + s`` of the kept ``c``); a module that is both gets both cuts;
* every TSRA / RMSNormTSRA of the chain gets ``num_channels = len(idx)``,
  ``split = len(K_U)``; every RMSNorm gets ``num_channels = len(idx)``;
* the RMSNorm normaliser (``norm_size`` of RMSNorm and RMSNormTSRA): ``"kept"`` (default,
  the authors' behaviour) sets ``norm_size = None`` so it averages over the kept channels —
  the activations are scaled by ``sqrt(C_kept / C)`` (the RMS divisor grows by
  ``sqrt(C / C_kept)``); ``"original"`` keeps the
  pre-pruning width (``norm_size = C`` unless it was already set), so the scale is kept.

The model is edited in place: each cut Conv2d/Linear is the same module object with new,
smaller ``weight``/``bias`` parameters (so its hooks stay; an optimizer built before holds
the old parameters and must be built again). Input RGB channels and the logits are never
touched: only CoB producers lose outputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cobkern._wrappers import named_modules
from cobkern.cob.discovery import CoBLayer, refuse_masked_weights
from cobkern.nn import RMSNorm, RMSNormTSRA

__all__ = ["KeepSet", "PruneReport", "ModuleReport", "LayerReport", "apply_keep_sets",
           "check_keep_sets", "refuse_ddp", "count_params_after", "NORMALIZERS"]

NORMALIZERS = ("kept", "original")


@dataclass
class KeepSet:
    """Kept channels of one layer: sorted indices within U and within V (int64 tensors)."""

    u: Tensor
    v: Tensor

    def indices(self, split: int) -> Tensor:
        """``(k,)``: the kept channels of the whole layer (U's, then ``split +`` V's)."""
        return torch.cat([self.u, self.v + split])

    @property
    def num_kept(self) -> int:
        return self.u.numel() + self.v.numel()


@dataclass
class ModuleReport:
    """Parameters of one Conv2d/Linear before and after (weights and biases)."""

    name: str
    kind: str
    shape_before: list[int]
    shape_after: list[int]
    params_before: int
    params_after: int


@dataclass
class LayerReport:
    """One CoB layer's widths before and after."""

    name: str
    channels_before: int
    channels_after: int
    split_before: int
    split_after: int


@dataclass
class PruneReport:
    """What :func:`apply_keep_sets` (or :func:`cobkern.pruning.prune`) did.

    Attributes:
        modules: per Conv2d/Linear whose shape changed or not, in model order.
        layers: per pruned CoB layer.
        total_before, total_after: every parameter of the model (biases included).
        meta: ``normalizer``, ``importance``, ``cob`` and the strategy's
            ``describe()`` (``strategy``, ``value``, ``per_subspace``, and e.g. ``target``,
            ``ratio`` / ``achieved`` for the parameter strategies).
    """

    modules: list[ModuleReport]
    layers: list[LayerReport]
    total_before: int
    total_after: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction_pruned(self) -> float:
        """``(before - after) / before`` over all parameters (``method.md`` §4.5)."""
        return (self.total_before - self.total_after) / self.total_before

    def to_dict(self) -> dict[str, Any]:
        return {"total_before": self.total_before, "total_after": self.total_after,
                "fraction_pruned": self.fraction_pruned, "meta": self.meta,
                "layers": [asdict(x) for x in self.layers],
                "modules": [asdict(x) for x in self.modules]}

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """JSON text of :meth:`to_dict`; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def summary(self) -> str:
        """A plain-text table (one line per module, then the total)."""
        lines = [f"{'module':<24}{'shape before':>22}{'shape after':>22}{'params before':>16}"
                 f"{'params after':>14}"]
        for m in self.modules:
            lines.append(f"{m.name:<24}{str(m.shape_before):>22}{str(m.shape_after):>22}"
                         f"{m.params_before:>16,}{m.params_after:>14,}")
        lines.append(f"{'total':<68}{self.total_before:>16,}{self.total_after:>14,}"
                     f"   ({100 * self.fraction_pruned:.2f}% pruned)")
        return "\n".join(lines)


def _module_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters(recurse=False))


def _params_with(m: nn.Module, out_n: int | None, in_n: int | None) -> int:
    """Parameters of ``m`` with ``out_n`` outputs / ``in_n`` input columns (None = unchanged)."""
    w = m.weight
    out = w.shape[0] if out_n is None else out_n
    inn = w.shape[1] if in_n is None else in_n
    per = 1
    for s in w.shape[2:]:
        per *= s
    bias = out if getattr(m, "bias", None) is not None else 0
    others = sum(p.numel() for n, p in m.named_parameters(recurse=False)
                 if n not in ("weight", "bias"))
    return out * inn * per + bias + others


def count_params_after(model: nn.Module, layers: list[CoBLayer], kept: dict[str, int]) -> int:
    """Total parameters ``model`` would have with ``kept[name]`` channels in each layer.

    Analytic (no surgery): only the producers' outputs and consumers' inputs change.
    """
    out_n: dict[int, int] = {}
    in_n: dict[int, int] = {}
    for lay in layers:
        if lay.name in kept:
            out_n[id(lay.producer)] = kept[lay.name]
            in_n[id(lay.consumer)] = kept[lay.name] * lay.spatial
    total = sum(p.numel() for p in model.parameters())
    mods = {}
    for lay in layers:
        mods[id(lay.producer)] = lay.producer
        mods[id(lay.consumer)] = lay.consumer
    for key, m in mods.items():
        if key in out_n or key in in_n:
            total += _params_with(m, out_n.get(key), in_n.get(key)) - _module_params(m)
    return total


def _shrink(m: nn.Module, out_idx: Tensor | None, in_idx: Tensor | None) -> None:
    """Cut ``m`` (a plain Conv2d/Linear) in place to rows ``out_idx`` and input columns
    ``in_idx``: new ``weight``/``bias`` parameters and the matching size attributes. The
    module itself stays, so its hooks (and their handles), its training flag and every
    reference to it still hold.

    The new parameters are ordinary tensors even when pruning runs under
    ``torch.inference_mode()``: inference tensors could not be trained (fine-tuned) later.
    """
    with torch.inference_mode(False):
        w = m.weight.detach()
        b = m.bias.detach() if m.bias is not None else None
        if out_idx is not None:
            w = w.index_select(0, out_idx.to(w.device))
            b = b.index_select(0, out_idx.to(w.device)) if b is not None else None
        if in_idx is not None:
            w = w.index_select(1, in_idx.to(w.device))
        cl = torch.channels_last
        keep_cl = (isinstance(m, nn.Conv2d) and not m.weight.is_contiguous()
                   and m.weight.is_contiguous(memory_format=cl))  # a channels_last model
        w = w.clone(memory_format=cl if keep_cl else torch.contiguous_format)
        m.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
        if b is not None:
            m.bias = nn.Parameter(b.clone(), requires_grad=m.bias.requires_grad)
    if isinstance(m, nn.Conv2d):
        m.out_channels, m.in_channels = w.shape[0], w.shape[1]
    else:
        m.out_features, m.in_features = w.shape[0], w.shape[1]


def refuse_ddp(model: nn.Module, who: str) -> None:
    """Raise ``ValueError`` if ``model`` is or holds a ``DistributedDataParallel`` module:
    its gradient synchronisation is bound to the parameters it was built with, which
    surgery replaces. (``torch.compile`` and ``DataParallel``, which replicates its module
    at every forward, are fine.)"""
    for name, m in model.named_modules():
        if isinstance(m, nn.parallel.DistributedDataParallel):
            where = f"at {name!r}" if name else "the model itself"
            raise ValueError(f"{who}: cannot prune a DistributedDataParallel module ({where}): "
                             "its gradient synchronisation is bound to the parameters it was "
                             "built with; prune the module inside (ddp.module) and wrap the "
                             "pruned model again")


def _as_indices(lay: CoBLayer, sub: str, idx: Any) -> Tensor:
    """One subspace's kept indices as a 1-D int64 CPU tensor: a tensor, numpy array or
    sequence of integers; ``TypeError`` for anything else (a float index would be truncated
    and a bool mask read as the indices 0 and 1)."""
    try:
        t = idx if isinstance(idx, Tensor) else torch.as_tensor(idx)
        if t.numel() == 0 and not isinstance(idx, Tensor):  # [] reads as float32: no type
            t = t.to(torch.int64)  # an empty sequence is an empty keep set (a ValueError)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{lay.name}: keep set of {sub} must be integer indices (a tensor, "
                        f"array or sequence of ints), got {idx!r}") from e
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex() or t.dim() > 1:
        raise TypeError(f"{lay.name}: keep set of {sub} must be a 1-D tensor of integer "
                        f"indices, got {t.dim()}-D {t.dtype}: {idx!r}")
    return t.detach().reshape(-1).to("cpu", torch.int64)


def check_keep_sets(layers: list[CoBLayer], keep: dict[str, KeepSet]) -> dict[str, KeepSet]:
    """``keep`` checked against ``layers`` (every name a layer of them, indices distinct and
    in range, at least one per subspace), with int64 CPU index tensors. Changes nothing, so
    callers run it before any surgery.

    Raises:
        ValueError: an unknown layer name, an empty subspace, or repeated / out-of-range
            indices.
        TypeError: indices that are not integers.
    """
    by_name = {lay.name: lay for lay in layers}
    unknown = [n for n in keep if n not in by_name]
    if unknown:
        raise ValueError(f"keep sets for unknown layers {unknown}")
    out = {}
    for n, k in keep.items():
        lay = by_name[n]
        k = KeepSet(_as_indices(lay, "U", k.u), _as_indices(lay, "V", k.v))
        _check_keep(lay, k)
        out[n] = k
    return out


def _check_keep(lay: CoBLayer, k: KeepSet) -> None:
    su, sv = lay.split, lay.num_channels - lay.split
    for sub, idx, size in (("U", k.u, su), ("V", k.v, sv)):
        if idx.numel() < 1:
            raise ValueError(f"{lay.name}: the keep set leaves subspace {sub} empty; at least one "
                             "channel must stay in each subspace")
        if idx.unique().numel() != idx.numel() or idx.min() < 0 or idx.max() >= size:
            raise ValueError(f"{lay.name}: keep set of {sub} must be distinct indices in "
                             f"[0, {size}), got {idx.tolist()}")


def apply_keep_sets(model: nn.Module, layers: list[CoBLayer], keep: dict[str, KeepSet],
                    normalizer: str = "kept") -> PruneReport:
    """Prune ``model`` in place to the given keep sets; return the report.

    Args:
        model: the model ``layers`` were found in (by :func:`~cobkern.cob.find_cob_layers`).
        layers: the CoB layers (only those named in ``keep`` are pruned).
        keep: ``name → KeepSet``; the indices a tensor, numpy array or sequence of ints.
        normalizer: ``"kept"`` (default, authors') or ``"original"``; see the module docstring.

    Returns:
        :class:`PruneReport`. The ``CoBLayer`` objects still name the same modules, now
        smaller; call ``find_cob_layers`` again for a fresh list.

    Raises:
        ValueError, TypeError: an unknown normalizer, keep sets that
            :func:`check_keep_sets` refuses, or a weight masked by ``torch.nn.utils.prune``
            — before the model is changed.
    """
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}; expected one of {NORMALIZERS}")
    keep = check_keep_sets(layers, keep)  # before anything is changed
    refuse_ddp(model, "apply_keep_sets")
    refuse_masked_weights([lay for lay in layers if lay.name in keep], "apply_keep_sets")
    total_before = sum(p.numel() for p in model.parameters())
    named = dict(named_modules(model))  # wrappers looked through, as in cob.discovery
    out_idx: dict[str, Tensor] = {}
    in_idx: dict[str, Tensor] = {}
    layer_reports = []
    for lay in layers:
        if lay.name not in keep:
            continue
        k = keep[lay.name]
        idx = k.indices(lay.split)
        out_idx[lay.name] = idx
        cols = idx
        if lay.spatial > 1:
            s = lay.spatial
            cols = (idx[:, None] * s + torch.arange(s)[None, :]).reshape(-1)
        in_idx[lay.consumer_name] = cols
        layer_reports.append(LayerReport(lay.name, lay.num_channels, k.num_kept, lay.split,
                                         k.u.numel()))
    weighted = [(n, m) for n, m in named.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
    reports = []
    for n, m in weighted:
        before = list(m.weight.shape)
        pb = _module_params(m)
        if n in out_idx or n in in_idx:
            _shrink(m, out_idx.get(n), in_idx.get(n))
        reports.append(ModuleReport(n, type(m).__name__, before, list(m.weight.shape), pb,
                                    _module_params(m)))
    for lay in layers:
        if lay.name not in keep:
            continue
        k = keep[lay.name]
        c_old = lay.num_channels
        for _, mod in lay.tsra + lay.norms:
            mod.num_channels = k.num_kept
            if isinstance(mod, (RMSNorm, RMSNormTSRA)):
                if normalizer == "kept":
                    mod.norm_size = None
                elif mod.norm_size is None:
                    mod.norm_size = c_old
            if hasattr(mod, "split") and not isinstance(mod, RMSNorm):
                mod.split = k.u.numel()
    total_after = sum(p.numel() for p in model.parameters())
    return PruneReport(reports, layer_reports, total_before, total_after,
                       {"normalizer": normalizer})
