"""Training checkpoints: what a resumable run saves, and the checks made when it resumes.

A checkpoint (``checkpoint.pt``, written atomically) holds the model, optimizer, scheduler
and loader state, every rank's RNG state and metrics window, the last evaluation and the
resolved settings. :func:`load_checkpoint` refuses a file that is not a cobkern training
checkpoint or belongs to another model; :func:`check_resume_config` refuses settings that
differ from the checkpoint's outside :data:`RESUME_MAY_CHANGE`; :func:`restore_rank_state`
gives each rank its own RNG state back (or a fresh rank-specific seed when the number of
ranks changed).
"""

from __future__ import annotations

import math
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cobkern._atomic import atomic_path
from cobkern.models import model_config
from cobkern.models.io import torch_file_kind

from .config import TrainConfig
from .distributed import DistContext

__all__ = ["CheckpointError", "CHECKPOINT_NAME", "RESUME_MAY_CHANGE", "setting_change",
           "check_resume_config", "load_checkpoint", "save_checkpoint_file", "rng_state",
           "set_rng_state", "restore_rank_state"]

CHECKPOINT_NAME = "checkpoint.pt"
CKPT_FORMAT = "cobkern.checkpoint"
CKPT_VERSION = 2  # 2: per-rank RNG state and metrics window, last evaluation

#: The :class:`TrainConfig` fields a resumed run may set differently from its checkpoint.
#: They decide how the run is shown (``progress``), how often it records (``log_every``,
#: ``eval_every``, ``checkpoint_every``), where and how fast it executes (``device``,
#: ``num_threads``, ``compile``, ``compile_mode``, ``compile_kernels``, ``channels_last``,
#: ``fuse_conv_bias``, ``eval_batch_size``, ``optimizer_impl``)
#: where the data is read and its decode cached (``data_root``: the checkpoint's
#: fingerprints of the training and test images must match the data found there, so a copy
#: of the same data elsewhere resumes; ``cache_dir``, ``download``) — not the
#: optimisation itself. (``compile``, ``compile_mode``, ``compile_kernels`` — on a CPU —,
#: ``channels_last``, ``fuse_conv_bias``, ``eval_batch_size``, ``optimizer_impl``,
#: ``num_threads`` — CPU reductions split by thread — and another device may change
#: float rounding, so such a resume is no longer bit-identical to an uninterrupted run.)
#: Every other field (model, optimizer and its hyper-parameters, schedule, steps, batch,
#: data, augmentation, seed, bf16) must match: the optimizer and scheduler state restored
#: from the checkpoint would otherwise silently keep the old values.
RESUME_MAY_CHANGE = frozenset({
    "progress", "log_every", "eval_every", "checkpoint_every", "eval_batch_size",
    "num_threads", "device", "compile", "compile_mode", "compile_kernels", "channels_last",
    "fuse_conv_bias", "cache_dir", "download", "optimizer_impl", "data_root"})


class CheckpointError(ValueError):
    """A missing checkpoint, or one that does not belong to this model or run."""


def save_checkpoint_file(obj: Any, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if type(a) is not type(b):
        return f"{where or 'config'}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} layers != {len(b)} layers"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where}: {a!r} != {b!r}"


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's CPU (and, on CUDA, ``device``'s) generator state."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _byte_state(t: Any, what: str) -> torch.Tensor:
    """A saved RNG state as the CPU ``uint8`` tensor the generators require."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise CheckpointError(f"checkpoint has an invalid {what} RNG state")
    if t.device.type != "cpu":
        if t.device.type == "meta":
            raise CheckpointError(f"checkpoint's {what} RNG state was loaded without its data "
                                  "(meta device); load checkpoints with map_location='cpu'")
        t = t.cpu()
    return t


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state`'s output. The tensors may sit on any device with data (a
    checkpoint loaded with a GPU ``map_location``); the generators get CPU copies."""
    if not isinstance(state, dict) or "torch" not in state:
        raise CheckpointError("checkpoint has no valid RNG state")
    torch.set_rng_state(_byte_state(state["torch"], "CPU"))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_byte_state(state["cuda"], "CUDA"), device)


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """A fresh, rank-specific RNG seed for a rank whose saved state a checkpoint lacks."""
    import numpy as np

    words = np.random.SeedSequence([seed, rank, step, 0x5EED]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def restore_rank_state(ckpt: dict[str, Any], config: TrainConfig, d: DistContext,
                       device: torch.device) -> dict[str, Any] | None:
    """Restore this rank's RNG state from ``ckpt``; returns its saved metrics window.

    A checkpoint of the same number of ranks holds one entry per rank, and each rank gets
    its own state back. A single-process checkpoint (or one from before per-rank states)
    gives rank 0 its ``"rng"``; when the number of ranks changed, ranks without a saved
    state get a fresh rank-specific seed (so no two ranks share dropout masks) and the
    saved windows are summed into rank 0's.
    """
    ranks = ckpt.get("rank_state")
    if not isinstance(ranks, list) or not ranks:
        ranks = [{"rng": ckpt.get("rng"), "log_window": None}]
    if not all(isinstance(r, dict) for r in ranks):
        raise CheckpointError("checkpoint has an invalid per-rank state")
    if d.rank < len(ranks):
        set_rng_state(ranks[d.rank].get("rng"), device)
    else:
        torch.manual_seed(_rank_seed(config.seed, d.rank, int(ckpt["step"])))
        return None
    if device.type == "cuda" and "cuda" not in ranks[d.rank]["rng"]:
        torch.cuda.manual_seed(_rank_seed(config.seed, d.rank, int(ckpt["step"])))
    if len(ranks) == d.world:
        return ranks[d.rank].get("log_window")
    if not d.main:
        return None
    windows = [r.get("log_window") for r in ranks if isinstance(r.get("log_window"), dict)]
    if not windows:
        return None
    return {"loss_sum": math.fsum(float(w["loss_sum"]) for w in windows),
            "correct": sum(int(w["correct"]) for w in windows),
            "n": sum(int(w["n"]) for w in windows),
            "seconds": max(float(w.get("seconds", 0.0)) for w in windows)}


_MISSING = object()


def setting_change(saved: dict[str, Any], config: TrainConfig, *,
                   missing_ok: bool = False,
                   may_change: frozenset[str] = RESUME_MAY_CHANGE) -> tuple[str, Any, Any] | None:
    """The first field outside ``may_change`` (default :data:`RESUME_MAY_CHANGE`) in which
    ``config`` differs from ``saved`` (a recorded ``asdict(TrainConfig)``), as ``(name,
    old, new)``; ``None`` if there is none. A field missing from ``saved`` counts as a change
    (``old`` is a private sentinel) unless ``missing_ok``; ``True`` and ``1`` differ."""
    for name, new in asdict(config).items():
        if name in may_change:
            continue
        old = saved.get(name, _MISSING)
        if old is _MISSING and missing_ok:
            continue
        if old is _MISSING or old != new or isinstance(old, bool) != isinstance(new, bool):
            return name, old, new
    return None


def check_resume_config(saved: Any, config: TrainConfig, path: Path) -> None:
    """Raise :class:`CheckpointError` if ``config`` differs from the checkpoint's settings
    in a field outside :data:`RESUME_MAY_CHANGE` (naming the first one, old and new)."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} does not record its training settings; "
                              "cannot check that this run continues it")
    change = setting_change(saved, config)
    if change is not None:
        name, old, new = change
        old_txt = "(not recorded)" if old is _MISSING else repr(old)
        raise CheckpointError(
            f"checkpoint {path} was written with different settings: {name} was "
            f"{old_txt}, this run has {new!r}. Resume with the checkpoint's settings "
            f"(only {', '.join(sorted(RESUME_MAY_CHANGE))} may change) or start a new "
            "run in another output directory")


def load_checkpoint(path: Path, model: nn.Module, device: torch.device) -> dict[str, Any]:
    """Read and check ``path``. Everything is loaded onto the CPU: the RNG states must be
    CPU byte tensors, and ``load_state_dict`` moves the model's and the optimizer's state to
    the parameters' device (``device`` is accepted for the callers' convenience only)."""
    del device
    if not path.is_file():
        raise CheckpointError(f"cannot resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False: wrong for a file that is not ours
        raise CheckpointError(f"cannot read checkpoint {path}: not a cobkern training "
                              f"checkpoint ({torch_file_kind(path)})") from None
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {e})") \
            from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a cobkern training checkpoint")
    if not isinstance(ckpt.get("version"), int) or ckpt["version"] > CKPT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {ckpt.get('version')!r}; this "
                              f"cobkern reads versions up to {CKPT_VERSION}")
    mine = model_config(model)
    if ckpt.get("model_config") != mine:
        diff = _first_difference(ckpt.get("model_config"), mine)
        raise CheckpointError(f"checkpoint {path} was written for a different model "
                              f"(first difference: {diff})")
    return ckpt
