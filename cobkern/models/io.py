"""Architecture configs derived from live modules, and model files (weights + config).

Pruning edits a model in place (smaller ``Conv2d``/``Linear``, new ``num_channels``,
``split`` and ``norm_size`` on the TSRA/RMSNorm modules), so the config is never stored
from the constructor's arguments: :func:`model_config` reads every layer's actual sizes,
and :func:`build_model` rebuilds exactly that architecture. A model file holds both, so a
pruned model can be rebuilt from its file alone.

Config format (a JSON-serialisable dict)::

    {"format": "cobkern.vgg", "version": 1, "arch": "tsra" | "relu",
     "num_classes": 10, "fused": true | false | null,
     "features":   [{"type": "Conv2d", "in_channels": 3, ...}, {"type": "RMSNormTSRA", ...}, ...],
     "classifier": [{"type": "Flatten", ...}, {"type": "Linear", ...}, ...]}

File formats, chosen by the suffix when writing: ``*.safetensors`` (weights as safetensors,
config and ``extra`` as JSON in the header metadata; needs the ``safetensors`` package, else
:class:`ModelFileError` and nothing is written); any other suffix is a ``torch.save`` pickle
``{"format", "config", "state_dict", "extra"}``. :func:`default_model_filename` picks
``model.safetensors`` when the package is installed, else ``model.pt``. Writes are atomic.
Both record the SHA-256 of the weights (``sha256``), which reading checks: a damaged file
is an error, not other weights (files without it load unchecked).
Reading goes by the content (a renamed file still loads), the suffix only where the content
is neither format.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cobkern._atomic import atomic_path
from cobkern._digest import tensor_digest
from cobkern._wrappers import unwrap_model
from cobkern.nn import TSRA, RMSNorm, RMSNormTSRA

from .vgg import VGG

__all__ = [
    "ModelFileError",
    "model_config",
    "build_model",
    "save_model",
    "load_model",
    "read_model_file",
    "unwrap_model",
    "default_model_filename",
    "safetensors_available",
]

FORMAT = "cobkern.vgg"
VERSION = 1


class ModelFileError(ValueError):
    """A model file or config that cannot be read or does not describe a cobkern model."""


def safetensors_available() -> bool:
    """Whether the optional ``safetensors`` package imports."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_file_kind(path: str | os.PathLike) -> str:
    """Why ``torch.load(path, weights_only=True)`` refused to unpickle ``path``, in words:
    ``"not a torch file"``, or a torch file holding more than tensors and plain data (which
    no cobkern file does)."""
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError:
        is_zip = False
    return ("a torch file holding objects other than tensors and plain data" if is_zip
            else "not a torch file")


def default_model_filename() -> str:
    """``"model.safetensors"`` when safetensors is installed, else ``"model.pt"``."""
    return "model.safetensors" if safetensors_available() else "model.pt"


# ----------------------------------------------------------------------------- layer specs
def _pair(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _gains(m: TSRA | RMSNormTSRA) -> dict[str, float]:
    return {"a_u": float(m.a_u), "b_u": float(m.b_u), "a_v": float(m.a_v), "b_v": float(m.b_v)}


def layer_spec(m: nn.Module) -> dict[str, Any]:
    """The JSON spec of one supported layer, read from its current attributes."""
    if isinstance(m, nn.Conv2d):
        return {"type": "Conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": _pair(m.kernel_size), "stride": _pair(m.stride),
                "padding": _pair(m.padding), "dilation": _pair(m.dilation), "groups": m.groups,
                "bias": m.bias is not None, "padding_mode": m.padding_mode}
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
    if isinstance(m, nn.BatchNorm2d):
        return {"type": "BatchNorm2d", "num_features": m.num_features, "eps": m.eps,
                "momentum": m.momentum, "affine": m.affine,
                "track_running_stats": m.track_running_stats}
    if isinstance(m, RMSNormTSRA):
        return {"type": "RMSNormTSRA", "num_channels": m.num_channels, "split": m.split,
                "dim": m.dim, "eps": float(m.eps), "norm_size": m.norm_size, **_gains(m),
                "tsra_eps": float(m.tsra_eps)}
    if isinstance(m, TSRA):
        return {"type": "TSRA", "num_channels": m.num_channels, "split": m.split, "dim": m.dim,
                **_gains(m), "eps": float(m.tsra_eps)}
    if isinstance(m, RMSNorm):
        return {"type": "RMSNorm", "num_channels": m.num_channels, "dim": m.dim,
                "eps": float(m.eps), "norm_size": m.norm_size}
    if isinstance(m, nn.ReLU):
        return {"type": "ReLU", "inplace": m.inplace}
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        spec = {"type": type(m).__name__, "kernel_size": _pair(m.kernel_size),
                "stride": _pair(m.stride), "padding": _pair(m.padding),
                "ceil_mode": m.ceil_mode}
        if isinstance(m, nn.AvgPool2d):
            spec["count_include_pad"] = m.count_include_pad
        else:
            spec["dilation"] = _pair(m.dilation)
        return spec
    if isinstance(m, nn.Flatten):
        return {"type": "Flatten", "start_dim": m.start_dim, "end_dim": m.end_dim}
    if isinstance(m, nn.Dropout):
        return {"type": "Dropout", "p": m.p}
    if isinstance(m, nn.Identity):
        return {"type": "Identity"}
    raise ModelFileError(f"cannot describe layer of type {type(m).__name__} in a model config")


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


#: Every key :func:`layer_spec` writes for cobkern's modules. None is in the state dict (they
#: have no parameters), and each constructor has a default for it — a spec without ``split``
#: or ``norm_size`` (a pruned layer's) would load into another function — so all are required.
_GAIN_KEYS = ("a_u", "b_u", "a_v", "b_v")
_ACTIVATION_KEYS: dict[str, tuple[str, ...]] = {
    "RMSNormTSRA": ("num_channels", "split", "dim", "eps", "norm_size", *_GAIN_KEYS, "tsra_eps"),
    "TSRA": ("num_channels", "split", "dim", *_GAIN_KEYS, "eps"),
    "RMSNorm": ("num_channels", "dim", "eps", "norm_size"),
}


def build_layer(spec: dict[str, Any]) -> nn.Module:
    """Inverse of :func:`layer_spec`: a freshly initialised layer of that shape.

    Raises:
        ModelFileError: ``spec`` is not a dict, names an unknown type or has missing,
            unknown or invalid arguments.
    """
    if not isinstance(spec, dict):
        raise ModelFileError(f"a layer spec must be a dict, got {spec!r}")
    s = dict(spec)
    kind = s.pop("type", None)
    missing = [k for k in _ACTIVATION_KEYS.get(kind, ()) if k not in s]
    if missing:  # the constructors' defaults would build another function without a word
        raise ModelFileError(f"invalid {kind} layer spec {spec!r}: missing {missing}")
    try:
        if kind == "Conv2d":
            return nn.Conv2d(s["in_channels"], s["out_channels"], _tuple(s["kernel_size"]),
                             stride=_tuple(s["stride"]), padding=_tuple(s["padding"]),
                             dilation=_tuple(s["dilation"]), groups=s["groups"], bias=s["bias"],
                             padding_mode=s["padding_mode"])
        if kind == "Linear":
            return nn.Linear(s["in_features"], s["out_features"], bias=s["bias"])
        if kind == "BatchNorm2d":
            return nn.BatchNorm2d(s["num_features"], eps=s["eps"], momentum=s["momentum"],
                                  affine=s["affine"],
                                  track_running_stats=s["track_running_stats"])
        if kind == "RMSNormTSRA":
            return RMSNormTSRA(**s)
        if kind == "TSRA":
            return TSRA(**s)
        if kind == "RMSNorm":
            return RMSNorm(**s)
        if kind == "ReLU":
            return nn.ReLU(inplace=s.get("inplace", False))
        if kind == "MaxPool2d":
            return nn.MaxPool2d(_tuple(s["kernel_size"]), stride=_tuple(s["stride"]),
                                padding=_tuple(s["padding"]), dilation=_tuple(s["dilation"]),
                                ceil_mode=s["ceil_mode"])
        if kind == "AvgPool2d":
            return nn.AvgPool2d(_tuple(s["kernel_size"]), stride=_tuple(s["stride"]),
                                padding=_tuple(s["padding"]), ceil_mode=s["ceil_mode"],
                                count_include_pad=s["count_include_pad"])
        if kind == "Flatten":
            return nn.Flatten(s["start_dim"], s["end_dim"])
        if kind == "Dropout":
            return nn.Dropout(s["p"])
        if kind == "Identity":
            return nn.Identity()
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        # RuntimeError: e.g. a negative size; OverflowError: a size beyond int64
        raise ModelFileError(f"invalid {kind} layer spec {spec!r}: {e}") from None
    raise ModelFileError(f"unknown layer type {kind!r} in model config")


# ----------------------------------------------------------------------------- model config
def model_config(model: nn.Module) -> dict[str, Any]:
    """Derive a model's architecture config from its current modules.

    Args:
        model: a :class:`~cobkern.models.vgg.VGG` (possibly pruned in place, compiled or
            wrapped in DDP).

    Returns:
        A JSON-serialisable dict (see the module docstring) that :func:`build_model` turns
        back into the same architecture.
    """
    model = unwrap_model(model)
    if not isinstance(model, VGG):
        raise ModelFileError(f"model_config expects a cobkern VGG, got {type(model).__name__}")
    features = [layer_spec(m) for m in model.features]
    classifier = [layer_spec(m) for m in model.classifier]
    kinds = {s["type"] for s in features + classifier}
    if kinds & {"TSRA", "RMSNormTSRA", "RMSNorm"}:
        arch = "tsra"
    elif kinds & {"ReLU", "BatchNorm2d"}:
        arch = "relu"
    else:
        arch = "other"
    fused: bool | None = None
    fkinds = {s["type"] for s in features}
    if "RMSNormTSRA" in fkinds:
        fused = True
    elif "RMSNorm" in fkinds:
        fused = False
    return {"format": FORMAT, "version": VERSION, "arch": arch,
            "num_classes": model.num_classes, "fused": fused,
            "features": features, "classifier": classifier}


def build_model(config: dict[str, Any]) -> VGG:
    """Build the architecture described by ``config`` (from :func:`model_config`).

    The weights are freshly initialised; load a state dict to restore a trained model.

    Raises:
        ModelFileError: the config is not a cobkern VGG config (wrong format, a version
            that is not a non-negative integer — a config without one reads as version 0 —
            or is newer than this code, ``features`` or ``classifier`` not a list of layer
            specs) or a layer spec is invalid.
    """
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFileError(f"not a cobkern model config (expected format {FORMAT!r})")
    version = config.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ModelFileError(f"model config version {version!r} is not a non-negative integer")
    if version > VERSION:
        raise ModelFileError(f"model config version {version} is newer than this "
                             f"cobkern understands ({VERSION})")
    parts = {}
    for part in ("features", "classifier"):
        if part not in config:
            raise ModelFileError(f"model config has no {part!r} list of layer specs")
        specs = config[part]
        if not isinstance(specs, list):
            raise ModelFileError(f"model config {part!r} must be a list of layer specs, got "
                                 f"{type(specs).__name__}")
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
                raise ModelFileError(f"model config {part}[{i}] is not a layer spec (a dict "
                                     f"with a 'type'): {spec!r}")
        parts[part] = nn.Sequential(*[build_layer(s) for s in specs])
    if not any(isinstance(m, nn.Linear) for m in parts["classifier"]):
        raise ModelFileError("model config 'classifier' has no Linear layer (the logits)")
    return VGG(parts["features"], parts["classifier"])


# ----------------------------------------------------------------------------- files
def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def _refuse_reparametrized(model: nn.Module) -> None:
    """``ModelFileError`` naming the first module whose parameters are recomputed by a
    ``torch.nn.utils.prune`` hook or a ``torch.nn.utils.parametrize`` parametrization: its
    state dict holds ``weight_orig`` and ``weight_mask`` (or ``parametrizations.*``) where
    :func:`load_model` expects ``weight``, so the file saved but never loaded."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.prune import BasePruningMethod

    for name, m in model.named_modules():
        pruned = any(isinstance(h, BasePruningMethod) for h in m._forward_pre_hooks.values())
        if pruned or parametrize.is_parametrized(m):
            how = ("torch.nn.utils.prune.remove(module, 'weight')" if pruned else
                   "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')")
            raise ModelFileError(
                f"save_model: {name!r} ({type(m).__name__}) has a reparametrized weight "
                f"({'pruning mask' if pruned else 'parametrization'}); its state would hold "
                f"no plain 'weight' and the file would not load. Make it permanent first: "
                f"{how}")


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write a model's weights and derived config to one file, atomically.

    Args:
        model: a cobkern VGG (pruned, compiled or DDP-wrapped models are fine).
        path: ``*.safetensors`` (needs the ``safetensors`` package) or any other suffix for a
            ``torch.save`` file.
        extra: optional JSON-serialisable metadata stored alongside (e.g. accuracy).

    Returns:
        The path written.

    Raises:
        ValueError: a weight reparametrized by ``torch.nn.utils.prune`` or
            ``torch.nn.utils.parametrize`` (the file would hold ``weight_orig`` / a mask and
            not load), or a model :func:`model_config` cannot describe.
    """
    path = Path(path)
    base = unwrap_model(model)
    _refuse_reparametrized(base)
    config = model_config(base)
    state = _cpu_state_dict(base)
    extra = dict(extra or {})
    json.dumps(extra)  # fail before writing anything if extra is not serialisable
    digest = _weights_digest(state)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            if not safetensors_available():
                raise ModelFileError("saving *.safetensors needs the safetensors package "
                                     "(pip install safetensors) or use a .pt path")
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": FORMAT, "config": json.dumps(config),
                                                 "extra": json.dumps(extra), "sha256": digest})
        else:
            torch.save({"format": FORMAT, "config": config, "state_dict": state,
                        "extra": extra, "sha256": digest}, tmp)
    return path


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's tensors, in name order."""
    return tensor_digest(sorted(state.items()))


def read_model_file(
    path: str | os.PathLike, map_location: str | torch.device = "cpu",
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``(config, state_dict, extra)`` from a file written by :func:`save_model`, the
    tensors on ``map_location``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``map_location`` is not a device this machine has (e.g. ``"cuda"``
            without a GPU).
        ModelFileError: an unreadable or damaged file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    _check_device(map_location)
    with open(path, "rb") as f:
        head = f.read(9)
    # The format is the content's, whatever the suffix (a safetensors file renamed *.pt was
    # "not a torch file"): torch.save writes a zip archive; safetensors files start with a
    # little-endian u64 header length, then '{'. Neither: the suffix decides (for the error).
    if head[:4] == b"PK\x03\x04":
        is_safetensors = False
    elif (len(head) == 9 and head[8:9] == b"{"
          and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8):
        is_safetensors = True
    else:
        is_safetensors = path.suffix == ".safetensors"
    head = head[:8]
    try:
        if is_safetensors:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("format") != FORMAT:
                raise ModelFileError(f"{path}: safetensors file without cobkern metadata")
            config = json.loads(meta["config"])
            extra = json.loads(meta.get("extra", "{}"))
            recorded = meta.get("sha256")
            _check_digest(path, state, recorded)
            state = {k: v.to(map_location) for k, v in state.items()}
        else:
            # a file object: torch.load of a path ending in .safetensors reads safetensors
            # (torch >= 2.14), whatever the content
            with open(path, "rb") as fh:
                blob = torch.load(fh, map_location=map_location, weights_only=True)
            if not isinstance(blob, dict) or blob.get("format") != FORMAT:
                raise ModelFileError(f"{path}: not a cobkern model file")
            config, state, extra = blob["config"], blob["state_dict"], blob.get("extra", {})
            _check_digest(path, state, blob.get("sha256"))
    except ModelFileError:
        raise
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False: wrong for a file that is not ours
        raise ModelFileError(f"{path}: cannot read model file: not a cobkern model file "
                             f"({torch_file_kind(path)})") from None
    except Exception as e:  # corrupt/truncated files surface as many exception types
        kind = "safetensors" if is_safetensors else "torch"
        raise ModelFileError(f"{path}: cannot read {kind} model file ({type(e).__name__}: {e}; "
                             f"first bytes {head!r})") from None
    return config, state, extra


def _check_device(map_location: object) -> None:
    """Raise ``ValueError`` unless ``map_location`` names a device tensors can be put on here
    (it was found out while reading the file: "cannot read torch model file", as if the
    file were damaged, for ``"cuda"`` on a machine without a GPU)."""
    try:
        device = torch.device(map_location)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"map_location must be a device such as 'cpu' or 'cuda:0', got "
                         f"{map_location!r}") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # no driver / not compiled with CUDA / index
        raise ValueError(f"cannot load a model onto {device}: {e}") from None


def _check_digest(path: Path, state: Any, recorded: Any) -> None:
    """Raise :class:`ModelFileError` if the weights differ from the digest the file records
    (files written before digests were recorded have none: not checked)."""
    if recorded is None or not isinstance(state, dict):
        return
    if _weights_digest(state) != recorded:
        raise ModelFileError(f"{path}: the weights do not match the checksum the file records "
                             "(a damaged or altered file); save the model again or restore "
                             "the file")


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> VGG:
    """Rebuild a model from a file written by :func:`save_model` and load its weights.

    Returns:
        The model on ``map_location``, in training mode (call ``.eval()`` for inference),
        its tensors in the dtypes they were saved in.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``map_location`` is not a device this machine has (``"cuda"`` without a
            GPU, an index beyond the last GPU).
        ModelFileError: unreadable file, weights that do not match the checksum the file
            records (damaged), or weights that do not fit the stored config.
    """
    config, state, _ = read_model_file(path, map_location)
    if not isinstance(state, dict):
        raise ModelFileError(f"{path}: the weights must be a dict of tensors, got "
                             f"{type(state).__name__}")
    model = build_model(config).to(map_location)
    try:
        # assign: the saved dtypes (a bf16/fp16 model stays one) instead of a float32 copy
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: weights do not match the stored architecture: {e}") from None
    return model
