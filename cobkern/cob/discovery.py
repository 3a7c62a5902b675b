"""Finding the change-of-basis layers of a model (``method.md`` §4).

A *CoB layer* is a chain ``producer → ops → consumer`` in the model's leaf modules where

* ``producer`` and ``consumer`` are ``nn.Conv2d`` / ``nn.Linear`` (``groups == 1``),
* the ops between them contain at least one TSRA (:class:`cobkern.nn.TSRA` or
  :class:`cobkern.nn.RMSNormTSRA`; all with the same width and split) and otherwise only
  modules that commute with a block-diagonal rotation ``diag(R_U, R_V)`` of the channels:
  :class:`cobkern.nn.RMSNorm`, ``AvgPool1d/2d/3d``, ``AdaptiveAvgPool1d/2d/3d``,
  ``Dropout*`` (identity in eval mode), ``Flatten`` (only after the last TSRA, from a
  conv into a linear, and only of every axis after the batch), ``Identity`` (and an empty
  ``Sequential``, which is one; empty ``ModuleList`` / ``ModuleDict`` run nothing);
* producer and consumer are plain ``nn.Conv2d`` / ``nn.Linear``, not subclasses (whose
  ``forward`` may use the weight in ways a rotation or a channel cut does not preserve,
  and which pruning would have to rebuild), and their weights are plain parameters (no
  ``weight_norm`` / parametrization, which would recompute them and lose the merged
  rotation; a ``torch.nn.utils.prune`` mask may be calibrated but not rotated or cut:
  :func:`refuse_masked_weights`).

The CoB activation (what calibration records) is the output of the last TSRA module of
the chain. A producer with no consumer (the logits) is never a CoB layer. A module that
does not commute with such a rotation (``ReLU``, ``MaxPool2d``, ``BatchNorm2d``, ...)
between a producer and its consumer is refused with an error naming it; a chain without a
TSRA is simply not a CoB layer, whatever lies in it (a ReLU head may follow a TSRA trunk).
A linear consumer must see its input as ``(N, features)``; :func:`~cobkern.cob.calibrate`
checks this on the data (a functional ``torch.flatten`` in ``forward`` is invisible here).

Wrappers: ``torch.compile``'s ``OptimizedModule`` and ``DistributedDataParallel`` /
``DataParallel`` are looked through (:func:`cobkern._wrappers.unwrap_model`), so a layer
has the same name whether the model is wrapped or not, and statistics computed through a
wrapper apply to the plain model.

Leaf order: containers are walked in registration order (``named_children``), which is the
execution order of ``nn.Sequential`` and of models built from Sequentials (the project's
:class:`cobkern.models.VGG`: ``classifier(features(x))``). A custom container whose
``forward`` runs its children in another order is outside this contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from cobkern._wrappers import unwrap_model
from cobkern.nn import TSRA, RMSNorm, RMSNormTSRA

__all__ = ["CoBLayer", "find_cob_layers", "leaf_modules", "refuse_masked_weights",
           "ROTATION_COMPATIBLE"]

_WEIGHTED = (nn.Conv2d, nn.Linear)
#: Containers that, empty, are skipped: an empty Sequential returns its input; an empty
#: ModuleList / ModuleDict is never called.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_ACTIVATIONS = (TSRA, RMSNormTSRA)
#: Modules that commute with any (block-diagonal) rotation of the channel axis.
ROTATION_COMPATIBLE: tuple[type[nn.Module], ...] = (
    RMSNorm, TSRA, RMSNormTSRA,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.Flatten, nn.Identity,
)


@dataclass
class CoBLayer:
    """One rotatable, prunable layer.

    Attributes:
        name: the producer's qualified name (the layer's key everywhere in cobkern).
        producer: the ``Conv2d``/``Linear`` whose output channels are rotated/pruned.
        consumer_name, consumer: the next ``Conv2d``/``Linear`` (input channels).
        activation_name, activation: the last TSRA-type module; its output is the CoB
            activation.
        tsra: ``(name, module)`` of every TSRA / RMSNormTSRA in the chain.
        norms: ``(name, module)`` of every RMSNorm in the chain.
        spatial: positions per channel in the consumer's input (``S`` when a
            ``Flatten`` turns ``(C, S)`` into ``C·S`` linear inputs, else 1).
    """

    name: str
    producer: nn.Module
    consumer_name: str
    consumer: nn.Module
    activation_name: str
    activation: nn.Module
    tsra: list[tuple[str, nn.Module]] = field(default_factory=list)
    norms: list[tuple[str, nn.Module]] = field(default_factory=list)
    spatial: int = 1

    @property
    def num_channels(self) -> int:
        """Current width ``C`` (read live from the activation module)."""
        return int(self.activation.num_channels)

    @property
    def split(self) -> int:
        """Current size of ``U``."""
        return int(self.activation.split)

    def signature(self) -> tuple[str, int, int]:
        """``(name, C, split)``: what statistics must match."""
        return (self.name, self.num_channels, self.split)


def _qualname(t: type) -> str:
    """``torch.nn.AvgPool2d``, ``cobkern.nn.RMSNorm``, else ``module.Name``: the public
    path where there is one (two libraries name a class RMSNorm)."""
    mod = t.__module__
    for public in ("torch.nn", "cobkern.nn"):
        if mod == public or mod.startswith(public + "."):
            return f"{public}.{t.__name__}"
    return f"{mod}.{t.__name__}"


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules in registration order, with qualified names.

    cobkern's own modules (TSRA, RMSNorm, RMSNormTSRA) count as leaves. A module registered
    at several places (``nn.Sequential(lin, act, lin2, act, ...)``) is listed at each of
    them, as the forward pass runs it (``named_children`` would list it once). Empty
    ``Sequential`` / ``ModuleList`` / ``ModuleDict`` containers are left out: they compute
    nothing.
    """
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, m: nn.Module) -> None:
        m = unwrap_model(m)  # a compiled or DDP-wrapped part: named as the plain one
        children = [(n, c) for n, c in m._modules.items() if c is not None]
        if not children and type(m) in _CONTAINERS:
            return  # an empty container (a subclass may have a forward of its own: a leaf)
        if not children or isinstance(m, ROTATION_COMPATIBLE + _WEIGHTED):
            out.append((prefix, m))
            return
        for n, c in children:
            walk(f"{prefix}.{n}" if prefix else n, c)

    walk("", model)
    return out


def _check_not_shared(lay: CoBLayer, places: dict[int, list[str]]) -> None:
    """Refuse a CoB layer whose producer, consumer, TSRA or RMSNorm is registered at another
    place too (``places``: module id → leaf names): rotating or pruning it for this layer
    would change it at the other place, and calibration would mix the two places'
    activations in one set of statistics. Stateless modules (pooling, dropout) may be
    shared."""
    mods = [lay.producer, lay.consumer] + [m for _, m in lay.tsra + lay.norms]
    for m in mods:
        names = places[id(m)]
        if len(names) > 1:
            raise ValueError(
                f"find_cob_layers: {names} are the same {type(m).__name__} module, part of CoB "
                f"layer {lay.name!r}; CoB rotates and prunes each place's channels separately, "
                "so give every place a module of its own (e.g. copy.deepcopy)")


def _out_channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _in_channels(m: nn.Module) -> int:
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


def _check_weights(name: str, m: nn.Module) -> None:
    """Refuse producers/consumers whose weight the rotation merge cannot rewrite, or that
    pruning could not rebuild as the same module."""
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        raise ValueError(f"find_cob_layers: {name} ({m}) is a grouped convolution "
                         f"(groups={m.groups}); only groups=1 can be rotated")
    # a parametrized weight (weight_norm, spectral_norm, ...) is recomputed on every
    # access, so an in-place rotation of it would be silently lost
    legacy = [type(h).__name__ for h in m._forward_pre_hooks.values()
              if isinstance(h, (WeightNorm, SpectralNorm))]
    if parametrize.is_parametrized(m) or legacy:
        how = legacy[0] if legacy else "a parametrization"
        raise ValueError(f"find_cob_layers: {name!r} ({type(m).__name__}) has its weight "
                         f"computed by {how}; the rotation merge rewrites weights in place — "
                         "remove it first (e.g. torch.nn.utils.parametrize."
                         "remove_parametrizations)")
    base = nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Linear
    if type(m) is not base:
        if isinstance(m, nn.modules.lazy.LazyModuleMixin):
            raise ValueError(f"find_cob_layers: {name!r} is an uninitialized "
                             f"{type(m).__name__}; run one forward pass to materialize it "
                             f"(it then becomes an nn.{base.__name__})")
        raise ValueError(f"find_cob_layers: {name!r} is a {type(m).__qualname__}, a subclass "
                         f"of nn.{base.__name__}; CoB rotates and cuts only plain "
                         f"nn.{base.__name__} modules (a subclass's forward may use its weight "
                         "or per-channel state in ways a rotation or a channel cut does not "
                         "preserve); build the model with plain modules")


def refuse_masked_weights(layers: list[CoBLayer], who: str) -> None:
    """Raise ``ValueError`` if a producer or consumer of ``layers`` is pruned with
    :mod:`torch.nn.utils.prune`: its ``weight`` is recomputed from ``weight_orig`` and a
    mask before every forward, so a rotation or a cut written into it would be overwritten
    (and the mask would keep cutting the original channels). Calibrating such a model is
    fine; rotating or pruning it (``who``) is not, until the pruning is made permanent."""
    for lay in layers:
        for name, m in ((lay.name, lay.producer), (lay.consumer_name, lay.consumer)):
            if any(isinstance(h, BasePruningMethod) for h in m._forward_pre_hooks.values()):
                raise ValueError(
                    f"{who}: {name!r} ({type(m).__name__}) is pruned with "
                    "torch.nn.utils.prune (its weight is recomputed from weight_orig and a "
                    "mask before every forward, so a merged rotation or a channel cut would "
                    "be lost); make the pruning permanent first: "
                    "torch.nn.utils.prune.remove(module, 'weight')")


def find_cob_layers(model: nn.Module) -> list[CoBLayer]:
    """Discover every CoB layer of ``model`` (see the module docstring).

    Returns:
        The layers in forward order.

    Raises:
        ValueError: a non-commuting module between a producer and its consumer (named), a
            Flatten before a TSRA or of only some axes, TSRA modules of different
            widths/splits in one chain, widths that do not match, a grouped convolution, or
            a parametrized weight, or a layer's Conv2d / Linear / TSRA / RMSNorm module
            registered at another place too.
    """
    leaves = leaf_modules(model)
    places: dict[int, list[str]] = {}
    for n, m in leaves:
        places.setdefault(id(m), []).append(n)
    weighted = [i for i, (_, m) in enumerate(leaves) if isinstance(m, _WEIGHTED)]
    layers: list[CoBLayer] = []
    for k, i in enumerate(weighted[:-1]):
        j = weighted[k + 1]
        pname, prod = leaves[i]
        cname, cons = leaves[j]
        between = leaves[i + 1:j]
        acts = [(n, m) for n, m in between if isinstance(m, _ACTIVATIONS)]
        if not acts:
            continue  # no TSRA (e.g. a ReLU head): not a CoB layer, whatever lies between
        for n, m in between:
            if not isinstance(m, ROTATION_COMPATIBLE):
                # qualified names: torch.nn.RMSNorm (learned gain) is not cobkern.nn.RMSNorm
                raise ValueError(
                    f"find_cob_layers: module {n!r} ({_qualname(type(m))}) between {pname!r} "
                    f"and {cname!r} does not commute with a rotation of the channels; CoB "
                    f"needs only {sorted(_qualname(t) for t in ROTATION_COMPATIBLE)} there")
            if isinstance(m, nn.Flatten) and (m.start_dim != 1 or m.end_dim not in (-1, 3)):
                raise ValueError(
                    f"find_cob_layers: Flatten {n!r} has start_dim={m.start_dim}, "
                    f"end_dim={m.end_dim}; between {pname!r} and {cname!r} only a Flatten of "
                    "every axis after the batch (start_dim=1, end_dim=-1) keeps the channels "
                    "on the linear's input axis")
        _check_weights(pname, prod)
        _check_weights(cname, cons)
        c = _out_channels(prod)
        # the channel axis: dim 1; between two linears (no Flatten) the activation is
        # (N, C) — calibrate checks the consumer's input — so dim=-1 is the same axis
        linear = (isinstance(prod, nn.Linear) and isinstance(cons, nn.Linear)
                  and not any(isinstance(m, nn.Flatten) for _, m in between))
        dims = (1, -1) if linear else (1,)
        need = "dim=1 (or -1 between two Linear modules)" if linear else "dim=1"
        for n, m in acts:
            if m.num_channels != c or m.split != acts[0][1].split:
                raise ValueError(f"find_cob_layers: {n!r} has {m.num_channels} channels / split "
                                 f"{m.split}, but {pname!r} outputs {c} channels and the chain's "
                                 f"first TSRA has split {acts[0][1].split}")
            if getattr(m, "dim", 1) not in dims:
                raise ValueError(f"find_cob_layers: {n!r} acts on dim {m.dim}; between "
                                 f"{pname!r} and {cname!r} the channels are on dim 1, so it "
                                 f"needs {need}")
        norms = [(n, m) for n, m in between if isinstance(m, RMSNorm)]
        for n, m in norms:
            if m.num_channels != c or m.dim not in dims:
                raise ValueError(f"find_cob_layers: {n!r} normalises {m.num_channels} channels "
                                 f"on dim {m.dim}; {pname!r} outputs {c} channels on dim 1 "
                                 f"(it needs {need})")
        last_act = max(idx for idx, (n, m) in enumerate(between) if isinstance(m, _ACTIVATIONS))
        flat = [idx for idx, (_, m) in enumerate(between) if isinstance(m, nn.Flatten)]
        if flat and min(flat) < last_act:
            raise ValueError(f"find_cob_layers: Flatten {between[min(flat)][0]!r} comes before "
                             f"the TSRA {between[last_act][0]!r} between {pname!r} and {cname!r}")
        spatial = 1
        cin = _in_channels(cons)
        if flat or (isinstance(prod, nn.Conv2d) and isinstance(cons, nn.Linear)):
            if cin % c:
                raise ValueError(f"find_cob_layers: {cname!r} has {cin} inputs, not a multiple "
                                 f"of the {c} channels of {pname!r}")
            spatial = cin // c
        elif cin != c:
            raise ValueError(f"find_cob_layers: {cname!r} takes {cin} input channels but "
                             f"{pname!r} outputs {c}")
        aname, act = acts[-1]
        lay = CoBLayer(name=pname, producer=prod, consumer_name=cname, consumer=cons,
                       activation_name=aname, activation=act, tsra=acts, norms=norms,
                       spatial=spatial)
        _check_not_shared(lay, places)
        layers.append(lay)
    return layers


def select_layers(model: nn.Module, layers: list[str] | None) -> list[CoBLayer]:
    """The CoB layers of ``model`` restricted to the names in ``layers`` (all when ``None``).

    Raises:
        ValueError: no CoB layers, an empty list, or a name that is not a CoB layer of this
            model.
        TypeError: ``layers`` is a string (a list of names is needed).
    """
    found = find_cob_layers(model)
    if not found:
        raise ValueError("the model has no CoB layers (Conv2d/Linear → TSRA → Conv2d/Linear)")
    if layers is None:
        return found
    if isinstance(layers, str):
        raise TypeError(f"layers must be a list of layer names, got the string {layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError(f"layers=[] selects none of the model's CoB layers "
                         f"{[lay.name for lay in found]}; pass None for all of them")
    by_name = {lay.name: lay for lay in found}
    repeated = sorted({n for n in layers if layers.count(n) > 1})
    if repeated:
        raise ValueError(f"layers {repeated} are listed more than once")
    unknown = [n for n in layers if n not in by_name]
    if unknown:
        raise ValueError(f"layers {unknown} are not CoB layers of this model; its CoB layers "
                         f"are {list(by_name)}")
    return [by_name[n] for n in layers]
