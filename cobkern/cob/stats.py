"""Calibration statistics: per-layer, per-subspace second moments and their eigenbases.

:class:`LayerStats` holds the float64 sums one calibration pass produced for one CoB layer;
:meth:`LayerStats.eigh` turns them into the rotation (``method.md`` §4.2: eigenvectors of
``G_U`` and ``G_V`` as rows, eigenvalues descending, computed in float64).
:class:`CalibrationStats` is the whole model's set, with :meth:`~CalibrationStats.save` /
:meth:`~CalibrationStats.load` (a ``torch.save`` file of plain tensors, loadable with
``weights_only=True``), so a model is calibrated once and pruned many times.

``basis`` records in which basis the sums were taken: ``"original"`` (a pass through the
un-rotated model) or ``"rotated"`` (a pass through the model after :func:`rotate_model`;
needed for L1 importance in the rotated basis).

``fingerprint`` ties each layer's statistics to the weights they were taken with
(:func:`weight_fingerprint`), so that statistics of another model of the same shape, or of
the model before it was rotated or trained further (once the fingerprint moves by more than
:data:`FINGERPRINT_RTOL`, 1 %), are refused instead of silently
selecting the wrong channels. It is invariant to rotations of the producer's *input*
channels (what rotating the layer before does, without changing this layer's activations)
and changes with a rotation of its output channels.
"""

from __future__ import annotations

import enum
import math
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cobkern._atomic import atomic_path
from cobkern._digest import tensor_digest

__all__ = ["LayerStats", "CalibrationStats", "Eigen", "weight_fingerprint",
           "FINGERPRINT_RTOL", "BASES"]

#: The bases statistics can be taken in (see the module docstring).
BASES = ("original", "rotated")

_FORMAT = "cobkern.calibration_stats/1"

#: Relative difference of a :func:`weight_fingerprint` row above which the weights count as
#: others: far above what storing the weights in bfloat16 changes (about 2e-3), far below
#: what a rotation of the output channels or another model's weights change (order 1).
FINGERPRINT_RTOL = 1e-2


def weight_fingerprint(producer: nn.Module) -> Tensor:
    """A cheap signature of a CoB layer's producer weights, ``(1 or 2, C)`` float64, CPU.

    Row 0 is ``W Wᵀ u`` (``W`` viewed as ``(C, fan_in)``, ``u`` a fixed pseudo-random
    ``C``-vector), which a rotation of ``W``'s input channels leaves unchanged and a rotation
    ``R W`` of its output channels turns into ``R W Wᵀ Rᵀ u``; row 1 is the bias, if any.
    """
    w = producer.weight.detach().to(torch.float64).reshape(producer.weight.shape[0], -1)
    u = torch.randn(w.shape[0], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0)).to(w.device)
    rows = [w @ (w.T @ u)]
    if getattr(producer, "bias", None) is not None:
        rows.append(producer.bias.detach().to(torch.float64))
    return torch.stack(rows).cpu()


def _fingerprint_difference(saved: Tensor, now: Tensor) -> float:
    """The largest relative difference between the rows of two fingerprints (inf if their
    shapes differ)."""
    if saved.shape != now.shape:
        return math.inf
    diff = 0.0
    for a, b in zip(saved, now, strict=True):
        scale = float(a.norm())
        d = float((a - b).norm())
        diff = max(diff, d / scale if scale > 0 else (0.0 if d == 0 else math.inf))
    return diff


@dataclass
class Eigen:
    """Eigen-decomposition of one layer's two Gram matrices (float64).

    Attributes:
        values_u: ``(split,)`` descending; vectors_u: ``(split, split)``, eigenvectors as rows.
        values_v: ``(C-split,)`` descending; vectors_v: ``(C-split, C-split)``, rows.
    """

    values_u: Tensor
    vectors_u: Tensor
    values_v: Tensor
    vectors_v: Tensor

    def rotation(self) -> Tensor:
        """The block-diagonal ``R = diag(R_U, R_V)``, ``(C, C)`` float64."""
        return torch.block_diag(self.vectors_u, self.vectors_v)

    @property
    def values(self) -> Tensor:
        """``(C,)``: the eigenvalues of U then of V (the rotated channels' energies)."""
        return torch.cat([self.values_u, self.values_v])


def _eigh_desc(g: Tensor) -> tuple[Tensor, Tensor]:
    g = g.to(torch.float64)
    g = 0.5 * (g + g.T)
    vals, vecs = torch.linalg.eigh(g)             # ascending, eigenvectors as columns
    vals = vals.flip(0).clamp_min(0.0)            # G is PSD: negative values are round-off
    return vals, vecs.flip(1).T.contiguous()


@dataclass
class LayerStats:
    """Sums over the calibration samples of one CoB layer (float64, CPU).

    Attributes:
        name: the layer's producer name.
        num_channels: ``C``; split: size of ``U``.
        gram_u ``(split, split)``, gram_v ``(C-split, C-split)``: uncentered second moments.
        sum_abs ``(C,)``: ``Σ|a|``; sum_sq ``(C,)``: ``Σa²``.
        count: samples (positions) summed.
        basis: ``"original"`` or ``"rotated"``.
        accumulation: ``"float64"`` (reference path) or ``"float32"`` (the Triton kernel's
            partial sums, Kahan-compensated per tile and added into float64): the precision of
            the sums, hence of the small eigenvalues.
        fingerprint: :func:`weight_fingerprint` of the producer the sums were taken with;
            ``None`` skips the check (statistics written before it existed, or made by hand).
    """

    name: str
    num_channels: int
    split: int
    gram_u: Tensor
    gram_v: Tensor
    sum_abs: Tensor
    sum_sq: Tensor
    count: int
    basis: str = "original"
    accumulation: str = "float64"
    fingerprint: Tensor | None = None
    unrotated_fingerprint: Tensor | None = None
    _eigen: Eigen | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # a misspelt basis used to count as rotated wherever the code asked "original?"
        if not isinstance(self.basis, str) or self.basis not in BASES:
            raise ValueError(f"statistics for {self.name!r}: basis must be one of {BASES}, "
                             f"got {self.basis!r}")

    def check_finite(self) -> None:
        """Raise ``ValueError`` naming the layer and the sums that hold NaN or Inf (from NaN
        weights or inputs, or float16 activations that overflowed): ranked or
        eigen-decomposed, they would pick channels at random or fail in ``eigh`` without a
        word of why. ``Σ|a|`` may be all NaN in rotated statistics derived from the
        eigen-decomposition (:meth:`rotated`), which marks it as unknown."""
        bad = [k for k in ("gram_u", "gram_v", "sum_sq")
               if not bool(torch.isfinite(getattr(self, k)).all())]
        sa = self.sum_abs
        unknown = self.basis == "rotated" and bool(torch.isnan(sa).all())
        if not unknown and not bool(torch.isfinite(sa).all()):
            bad.append("sum_abs")
        if bad:
            raise ValueError(f"statistics for {self.name!r}: {', '.join(bad)} hold non-finite "
                             "values (NaN or Inf): the layer's activations were not finite "
                             "during calibration (NaN/Inf weights or inputs, or a float16 "
                             "overflow); fix the model or data and calibrate again")

    def eigh(self) -> Eigen:
        """Eigen-decomposition in float64 (cached): descending values, vectors as rows.

        Raises:
            ValueError: the Gram matrices hold NaN or Inf (:meth:`check_finite`).
        """
        if self._eigen is None:
            self.check_finite()
            vu, ru = _eigh_desc(self.gram_u)
            vv, rv = _eigh_desc(self.gram_v)
            self._eigen = Eigen(vu, ru, vv, rv)
        return self._eigen

    def rotated(self) -> LayerStats:
        """The statistics the rotated layer would produce, from the eigen-decomposition.

        ``G' = R G Rᵀ = diag(λ)`` and ``Σa'² = λ``; ``Σ|a'|`` is not a function of ``G`` and
        is set to NaN (take a second pass through the rotated model for it). The fingerprint
        is left unset: :func:`~cobkern.cob.rotate_model` records the rotated weights'.
        """
        e = self.eigh()
        return LayerStats(self.name, self.num_channels, self.split, torch.diag(e.values_u),
                          torch.diag(e.values_v), torch.full_like(self.sum_abs, float("nan")),
                          e.values.clone(), self.count, "rotated", self.accumulation,
                          unrotated_fingerprint=self.fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_channels": self.num_channels, "split": self.split,
                "gram_u": self.gram_u, "gram_v": self.gram_v, "sum_abs": self.sum_abs,
                "sum_sq": self.sum_sq, "count": self.count, "basis": self.basis,
                "accumulation": self.accumulation, "fingerprint": self.fingerprint,
                "unrotated_fingerprint": self.unrotated_fingerprint}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerStats:
        return cls(d["name"], int(d["num_channels"]), int(d["split"]), d["gram_u"], d["gram_v"],
                   d["sum_abs"], d["sum_sq"], int(d["count"]), d.get("basis", "original"),
                   d.get("accumulation", "float64"), d.get("fingerprint"),
                   d.get("unrotated_fingerprint"))


def _content_digest(num_images: Any, meta: Any, layers: list[dict[str, Any]]) -> str:
    """SHA-256 of what a statistics file holds: every tensor's bytes (with its shape and
    dtype) and every scalar. :meth:`CalibrationStats.save` stores it, :meth:`~CalibrationStats.
    load` checks it: ``torch.load`` does not verify the zip's checksums, so a damaged tensor
    would otherwise load as other numbers."""
    items = [(f"num_images={num_images!r}|meta={meta!r}", torch.zeros(0))]
    for d in layers:
        scalars = "|".join(f"{k}={d[k]!r}" for k in ("name", "num_channels", "split", "count",
                                                   "basis", "accumulation"))
        for k in ("gram_u", "gram_v", "sum_abs", "sum_sq", "fingerprint",
                  "unrotated_fingerprint"):
            t = d.get(k)
            if t is not None:
                if not isinstance(t, Tensor):
                    raise TypeError(f"{d.get('name')!r}: {k} is a {type(t).__name__}, not a "
                                    "tensor")
                items.append((f"{scalars}|{k}", t))
    return tensor_digest(items)


def _plain(v: Any, where: str) -> Any:
    """``v`` as plain Python data that ``torch.load(weights_only=True)`` accepts."""
    if v is None or isinstance(v, (torch.device, torch.dtype)):
        return v
    if isinstance(v, enum.Enum):  # its value: str() of a (str, Enum) member is "E.A"
        return _plain(v.value, where)
    for plain in (bool, int, float, str):  # subclasses too (numpy.float64 is a float)
        if isinstance(v, plain):
            return plain(v)
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, (list, tuple)):  # a namedtuple becomes a tuple, torch.Size stays
        items = [_plain(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return (list(items) if isinstance(v, list) else
                torch.Size(items) if isinstance(v, torch.Size) else tuple(items))
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise TypeError(f"CalibrationStats.save: {where} has a key {k!r} of type "
                                f"{type(k).__name__}; keys must be str")
            out[k] = _plain(x, f"{where}[{k!r}]")
        return out
    item = getattr(v, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(v, "ndim", None) == 0:
        return _plain(item(), where)
    raise TypeError(f"CalibrationStats.save: {where} is a {type(v).__name__}; statistics "
                    "metadata must be str, int, float, bool, None, torch.device/dtype, or "
                    "lists, tuples and dicts of them")


@dataclass
class CalibrationStats:
    """Statistics of every calibrated CoB layer of one model.

    Attributes:
        layers: ``name → LayerStats``, in forward order.
        num_images: images that went through the model.
        meta: free-form provenance (e.g. the loader's description), saved with the stats.
    """

    layers: dict[str, LayerStats]
    num_images: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __iter__(self):
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def basis(self) -> str:
        """``"original"``, ``"rotated"`` (or ``"mixed"``)."""
        bases = {s.basis for s in self.layers.values()}
        return bases.pop() if len(bases) == 1 else "mixed"

    def rotated(self) -> CalibrationStats:
        """Every layer's :meth:`LayerStats.rotated`."""
        return CalibrationStats({n: s.rotated() for n, s in self.layers.items()},
                                self.num_images, dict(self.meta))

    def check_matches(self, layers) -> None:
        """Raise ``ValueError`` unless every given :class:`~cobkern.cob.CoBLayer` has stats of
        the same width and split (statistics from another model, or a pruned one), taken with
        the same producer weights (:func:`weight_fingerprint`, where the stats record one:
        another model of the same shape, the model before :func:`~cobkern.cob.rotate_model`
        or before further training), and finite sums (:meth:`LayerStats.check_finite`)."""
        for lay in layers:
            if lay.name not in self.layers:
                raise ValueError(f"the statistics have no layer {lay.name!r} (they hold "
                                 f"{list(self.layers)}); were they computed for another model?")
            s = self.layers[lay.name]
            if (s.num_channels, s.split) != (lay.num_channels, lay.split):
                raise ValueError(
                    f"statistics for {lay.name!r} have {s.num_channels} channels / split "
                    f"{s.split}, but the model's layer has {lay.num_channels} / {lay.split}; "
                    "the statistics come from another (or an already pruned) model")
            c, sp = s.num_channels, s.split
            shapes = {"gram_u": (sp, sp), "gram_v": (c - sp, c - sp), "sum_sq": (c,),
                      "sum_abs": (c,)}
            for attr, want in shapes.items():
                got = tuple(getattr(s, attr).shape)
                if got != want:
                    raise ValueError(f"statistics for {lay.name!r}: {attr} has shape {got}, "
                                     f"expected {want} for {c} channels / split {sp}; the "
                                     "statistics are malformed")
            s.check_finite()
            if (s.basis == "rotated" and s.fingerprint is None
                    and s.unrotated_fingerprint is not None
                    and _fingerprint_difference(s.unrotated_fingerprint,
                                                weight_fingerprint(lay.producer))
                    <= FINGERPRINT_RTOL):
                raise ValueError(
                    f"statistics for {lay.name!r} are in the rotated basis "
                    "(CalibrationStats.rotated()), but the model's weights are the un-rotated "
                    "ones they were derived from; pass the original statistics (prune rotates), "
                    "or rotate the model with rotate_model and use the statistics it returns")
            if s.fingerprint is not None:
                diff = _fingerprint_difference(s.fingerprint, weight_fingerprint(lay.producer))
                if diff > FINGERPRINT_RTOL:
                    raise ValueError(
                        f"statistics for {lay.name!r} were taken with other weights (their "
                        f"fingerprint differs by {diff:.2g} relative, more than "
                        f"{FINGERPRINT_RTOL:g}): another model of the same shape, a model "
                        f"already rotated (use the statistics rotate_model returned, basis "
                        f"'rotated'), or one trained since; calibrate this model again")

    def check_model(self, layers) -> None:
        """Raise ``ValueError`` if the statistics hold a layer that is not among ``layers``
        (every CoB layer of a model): they were computed for another model, whose layers
        only partly share names with this one."""
        names = {lay.name for lay in layers}
        foreign = [n for n in self.layers if n not in names]
        if foreign:
            raise ValueError(f"the statistics hold layers {foreign} that are not CoB layers of "
                             f"this model (it has {sorted(names)}); were they computed for "
                             "another model?")

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` atomically (``torch.save`` of plain tensors and Python scalars).

        Raises:
            TypeError: ``meta`` holds something other than ``str``/``int``/``float``/
                ``bool``/``None``/``torch.device``/``torch.dtype`` and lists, tuples and
                dicts of them (paths and numpy scalars are converted); checked before
                anything is written, so that every file written can be loaded (:meth:`load`
                reads with ``weights_only=True``).
        """
        meta = _plain(self.meta, "meta")
        layers = [s.to_dict() for s in self.layers.values()]
        num_images = int(self.num_images)
        with atomic_path(path) as tmp:
            torch.save({"format": _FORMAT, "num_images": num_images, "meta": meta,
                        "layers": layers,
                        "digest": _content_digest(num_images, meta, layers)}, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not readable statistics (truncated, damaged — its
                content no longer matches the checksum saved with it — or another kind of
                file); the message names it. Files written before the checksum load
                unchecked.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no calibration statistics at {path}")
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's message would advise weights_only=False
            raise ValueError(f"{path}: not a cobkern calibration-statistics file (not a torch "
                             "file, or one holding objects other than tensors and plain "
                             "data)") from None
        except Exception as e:  # a truncated zip, ...
            raise ValueError(f"{path}: cannot read calibration statistics ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); the file is "
                             "damaged or incomplete — calibrate again") from None
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a cobkern calibration-statistics file")
        try:
            intact = "digest" not in d or d["digest"] == _content_digest(
                d["num_images"], d["meta"], d["layers"])
            layers = [LayerStats.from_dict(x) for x in d["layers"]]
            out = cls({s.name: s for s in layers}, int(d["num_images"]),
                      dict(d.get("meta", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: malformed calibration statistics ({type(e).__name__}: "
                             f"{e})") from None
        if not intact:
            raise ValueError(f"{path}: the calibration statistics do not match the checksum "
                             "saved with them; the file is damaged — calibrate again")
        return out
