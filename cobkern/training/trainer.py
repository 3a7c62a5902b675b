"""The training loop: :func:`train`, :func:`finetune`, :func:`evaluate`.

One loop serves a CPU, one GPU and ``torchrun --nproc_per_node=N`` (DistributedDataParallel,
NCCL on GPUs, gloo on CPUs; each rank takes its slice of every global batch). Outputs in
``out_dir``:

* ``config.json`` — the resolved :class:`TrainConfig`;
* ``metrics.jsonl`` — one strict JSON object per line: ``{"event": "train", "step",
  "epoch", "loss", "accuracy", "lr", "images_per_s", "elapsed_s"}`` every ``log_every``
  steps and ``{"event": "eval", "step", "epoch", "test_loss", "test_accuracy"}`` per
  evaluation. ``epoch`` is the 0-based index of the epoch the step belongs to; a
  non-finite number (a diverged loss) is written as ``null``. A fresh run starts a new
  file; a resumed one drops the lines logged after its checkpoint and appends;
* ``checkpoint.pt`` — model, optimizer, scheduler, loader position, every rank's RNG state
  and metrics window, the last evaluation and the settings, written atomically every
  ``checkpoint_every`` steps and at the end;
* ``final.json`` — the final metrics (:func:`train`'s result);
* ``model.safetensors`` (``model.pt`` without safetensors) — weights + architecture config
  (:func:`cobkern.models.save_model`).

Every file is written through :func:`cobkern._atomic.atomic_path` (``metrics.jsonl`` is
appended to line by line, and replaced atomically when started or trimmed).

``resume=True`` continues from ``checkpoint.pt``; the data order and augmentation are a
pure function of ``(seed, epoch, batch)`` and each rank's dropout RNG is restored, so on a
given device and number of ranks a resumed run reproduces the uninterrupted run's weights
and ``metrics.jsonl`` lines (up to the timing fields) exactly. The settings must be those
of the checkpoint, except the fields in :data:`RESUME_MAY_CHANGE`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cobkern._atomic import atomic_path
from cobkern.data import DataError, DeviceLoader, ImageSet, load_cifar10, subset
from cobkern.models import (
    default_model_filename,
    model_config,
    save_model,
    unwrap_model,
    vgg16_relu,
    vgg16_tsra,
)
from cobkern.models.io import torch_file_kind

from .config import ConfigError, TrainConfig

__all__ = ["train", "finetune", "evaluate", "CheckpointError", "build_optimizer",
           "build_scheduler", "lr_factor", "RESUME_MAY_CHANGE", "setting_change",
           "check_num_classes"]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CKPT_FORMAT = "cobkern.checkpoint"
CKPT_VERSION = 2  # 2: per-rank RNG state and metrics window, last evaluation

#: The :class:`TrainConfig` fields a resumed run may set differently from its checkpoint.
#: They decide how the run is shown (``progress``), how often it records (``log_every``,
#: ``eval_every``, ``checkpoint_every``), where and how fast it executes (``device``,
#: ``num_threads``, ``compile``, ``channels_last``, ``eval_batch_size``) and where the
#: decoded data is cached (``cache_dir``, ``download``) — not the optimisation itself.
#: (``compile``, ``channels_last``, ``eval_batch_size`` and another device may change
#: float rounding, so such a resume is no longer bit-identical to an uninterrupted run.)
#: Every other field (model, optimizer and its hyper-parameters, schedule, steps, batch,
#: data, augmentation, seed, bf16) must match: the optimizer and scheduler state restored
#: from the checkpoint would otherwise silently keep the old values.
RESUME_MAY_CHANGE = frozenset({
    "progress", "log_every", "eval_every", "checkpoint_every", "eval_batch_size",
    "num_threads", "device", "compile", "channels_last", "cache_dir", "download"})


class CheckpointError(ValueError):
    """A missing checkpoint, or one that does not belong to this model or run."""


# ----------------------------------------------------------------------------- distributed
class _Dist:
    """This process's place in a (possibly one-process) data-parallel job."""

    def __init__(self, config: TrainConfig) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want = config.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"device {config.device!r} requested but CUDA is not available")
            self.device = torch.device("cuda", self.local_rank) if self.world > 1 or want == \
                "cuda" else torch.device(want)
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            self.owns_group = True
        self.active = self.world > 1 and dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a one-process run)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- pieces
def lr_factor(step: int, config: TrainConfig) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warm-up, then cosine to min_lr.

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``. Cosine:
    ``m + (1 - m) * (1 + cos(pi * t)) / 2`` with ``t`` the fraction of post-warm-up steps
    done and ``m = min_lr / lr``; ``constant`` stays at 1.
    """
    w, total = config.warmup_steps, config.steps
    if step < w:
        return (step + 1) / w
    if config.schedule == "constant":
        return 1.0
    t = min(1.0, (step - w) / max(1, total - w))
    m = config.min_lr / config.lr
    return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum) over all parameters, with ``config.weight_decay``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=(config.beta1, config.beta2),
                                 weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           nesterov=config.nesterov and config.momentum > 0,
                           weight_decay=config.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, config: TrainConfig):
    """``LambdaLR`` with :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config))


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: DeviceLoader | ImageSet,
    device: torch.device | str | None = None,
    *,
    batch_size: int = 1000,
    bf16: bool = False,
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on un-augmented data.

    Args:
        model: any classifier returning ``(B, num_classes)`` logits. Put in eval mode for the
            call and restored afterwards.
        data: an :class:`ImageSet` (wrapped in a plain :class:`DeviceLoader`) or a loader.
        device: where to run (default: the model's device).
        batch_size: batch size when ``data`` is an ImageSet.
        bf16: run under bf16 autocast.

    Returns:
        ``{"accuracy": float in [0, 1], "loss": float, "n": int}``. Under an active
        ``torch.distributed`` group with a rank-sliced loader the sums are all-reduced.
    """
    if device is None:
        device = next(unwrap_model(model).parameters()).device
    device = torch.device(device)
    if isinstance(data, ImageSet):
        data = DeviceLoader.from_imageset(data, batch_size, augment=False, shuffle=False,
                                          drop_last=False, device=device,
                                          channels_last=channels_last)
    else:
        data.epoch, data.batch = 0, 0  # always the full set, from the start
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    try:
        for x, y in data:
            if y.numel() == 0:
                continue
            with _autocast(device, bf16):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            n += y.numel()
    finally:
        model.train(was_training)
    totals = [loss_sum.item(), float(correct.item()), float(n)]
    if data.world_size > 1 and dist.is_available() and dist.is_initialized():
        t = torch.tensor(totals, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        totals = t.tolist()
    loss_total, correct_total, n_total = totals
    n_total = max(n_total, 1.0)
    return {"accuracy": correct_total / n_total, "loss": loss_total / n_total, "n": int(n_total)}


def check_num_classes(model: nn.Module, num_classes: int, data: str = "data") -> None:
    """Raise :class:`ConfigError` if ``model`` has another number of outputs than the
    ``num_classes`` classes of the ``data`` it is to be trained or evaluated on (a model
    without a ``num_classes`` attribute is not checked)."""
    outputs = getattr(unwrap_model(model), "num_classes", None)
    if outputs is not None and outputs != num_classes:
        raise ConfigError(f"the model has {outputs} outputs but the {data} has {num_classes} "
                          "classes")


def _atomic_torch_save(obj: Any, path: Path) -> None:
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


def _json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by ``None`` (JSON ``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _json_line(record: dict[str, Any]) -> str:
    """One strict-JSON metrics line (non-finite numbers as ``null``)."""
    return json.dumps(_json_safe(record), allow_nan=False)


def _write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_json_safe(obj), indent=1, allow_nan=False) + "\n")


def _rng_state(device: torch.device) -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`_rng_state`'s output. The tensors may sit on any device with data (a
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


def _restore_rank_state(ckpt: dict[str, Any], config: TrainConfig, d: _Dist,
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
        _set_rng_state(ranks[d.rank].get("rng"), device)
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
                   missing_ok: bool = False) -> tuple[str, Any, Any] | None:
    """The first field outside :data:`RESUME_MAY_CHANGE` in which ``config`` differs from
    ``saved`` (a recorded ``asdict(TrainConfig)``), as ``(name, old, new)``; ``None`` if
    there is none. A field missing from ``saved`` counts as a change (``old`` is a private
    sentinel) unless ``missing_ok``; ``True`` and ``1`` differ."""
    for name, new in asdict(config).items():
        if name in RESUME_MAY_CHANGE:
            continue
        old = saved.get(name, _MISSING)
        if old is _MISSING and missing_ok:
            continue
        if old is _MISSING or old != new or isinstance(old, bool) != isinstance(new, bool):
            return name, old, new
    return None


def _check_resume_config(saved: Any, config: TrainConfig, path: Path) -> None:
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


def _load_checkpoint(path: Path, model: nn.Module, device: torch.device) -> dict[str, Any]:
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


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after ``step`` (they belong to the interrupted tail)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line from a killed run
        s = rec.get("step", 0) if isinstance(rec, dict) else None
        if isinstance(s, int) and not isinstance(s, bool) and s <= step:
            keep.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(x + "\n" for x in keep))


def _start_metrics(path: Path) -> None:
    """Begin an empty metrics file (a fresh run never appends to an old run's lines)."""
    with atomic_path(path) as tmp:
        tmp.write_text("")


def _step_epoch(loader: DeviceLoader) -> int:
    """0-based epoch of the last batch the loader yielded (after the epoch's last batch the
    loader has already moved on to the next epoch)."""
    return loader.epoch if loader.batch > 0 else max(0, loader.epoch - 1)


def _prepare_data(config: TrainConfig, data: tuple[ImageSet, ImageSet] | None,
                  d: _Dist) -> tuple[ImageSet, ImageSet]:
    if data is None:
        # Rank 0 decodes and caches first; the others then read the cache.
        if d.main:
            data = load_cifar10(config.data_source, config.data_root, config.cache_dir,
                                download=config.download)
        d.barrier()
        if not d.main:
            data = load_cifar10(config.data_source, config.data_root, config.cache_dir,
                                download=False)
    train_set, test_set = data
    train_set = subset(train_set, config.train_subset or None, seed=config.seed)
    test_set = subset(test_set, config.test_subset or None, seed=config.seed + 1)
    return train_set, test_set


def _build_model(config: TrainConfig) -> nn.Module:
    if config.arch == "tsra":
        return vgg16_tsra(config.num_classes, config.width, fused=config.fused)
    return vgg16_relu(config.num_classes, config.width)


# ----------------------------------------------------------------------------- train
def train(
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    model: nn.Module | None = None,
    data: tuple[ImageSet, ImageSet] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train a model with ``config`` and write metrics, checkpoints and the model file.

    Args:
        config: all settings (see :class:`TrainConfig`; e.g. ``get_preset("quick")``).
        out_dir: run directory (created once the data and model are ready).
        resume: continue from ``out_dir/checkpoint.pt``, with the checkpoint's settings
            (only the fields in :data:`RESUME_MAY_CHANGE` may differ). Without it, an
            existing checkpoint in ``out_dir`` is an error (nothing is overwritten), and a
            ``metrics.jsonl`` left by a run killed before its first checkpoint is replaced.
        model: train this model (e.g. a pruned one) instead of building ``config.arch``;
            it is trained in place and keeps its architecture.
        data: ``(train, test)`` image sets instead of loading ``config.data_source``.
        on_step: called with the step number after every optimizer step (and after any
            checkpoint at that step); may raise to stop the run.

    Returns:
        Final metrics: ``{"test_accuracy", "test_loss", "train_loss", "train_accuracy",
        "steps", "epochs", "elapsed_s", "images_per_s", "model_path", "world_size",
        "ranks_in_sync"}`` (the last one only under data parallelism).

    Raises:
        ConfigError: an invalid setting. CheckpointError: ``resume`` without a readable
        checkpoint of this model, or with settings that differ from the checkpoint's;
        a checkpoint in ``out_dir`` without ``resume``. DataError: missing or bad data.
    """
    config = TrainConfig(**asdict(config)).validate()
    out = Path(out_dir)
    _check_out_dir(out)
    ckpt_path = out / CHECKPOINT_NAME
    if not resume and ckpt_path.exists():
        raise CheckpointError(f"{ckpt_path} already exists; pass resume=True (--resume) to "
                              "continue that run or choose another output directory")
    if resume and not ckpt_path.is_file():
        raise CheckpointError(f"cannot resume: no checkpoint at {ckpt_path}")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    d = _Dist(config)
    try:
        return _train(config, out, ckpt_path, resume, model, data, on_step, d)
    finally:
        d.close()


def finetune(
    model: nn.Module,
    data: tuple[ImageSet, ImageSet] | None,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Fine-tune a given (e.g. pruned) model in place: :func:`train` with ``model=model``."""
    return train(config, out_dir, resume=resume, model=model, data=data)


def _train(config: TrainConfig, out: Path, ckpt_path: Path, resume: bool,
           model: nn.Module | None, data: tuple[ImageSet, ImageSet] | None,
           on_step: Callable[[int], None] | None, d: _Dist) -> dict[str, Any]:
    from tqdm.auto import tqdm

    if config.batch_size % d.world:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the "
                          f"{d.world} ranks")
    train_set, test_set = _prepare_data(config, data, d)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    if model is None:
        model = _build_model(config)
    base = unwrap_model(model)
    if data is None:
        check_num_classes(base, len(train_set.classes))
    device = d.device
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    base.to(device=device, memory_format=fmt)

    per_rank = config.batch_size // d.world
    loader = DeviceLoader.from_imageset(
        train_set, per_rank, augment=config.augment, shuffle=True, drop_last=True,
        seed=config.seed, device=device, rank=d.rank, world_size=d.world,
        channels_last=config.channels_last)
    test_loader = DeviceLoader.from_imageset(
        test_set, max(1, config.eval_batch_size // d.world), augment=False, shuffle=False,
        drop_last=False, device=device, rank=d.rank, world_size=d.world,
        channels_last=config.channels_last)
    opt = build_optimizer(base, config)
    sched = build_scheduler(opt, config)

    step, elapsed_before = 0, 0.0
    window: dict[str, Any] | None = None
    last_train: dict[str, Any] = {}
    last_eval: dict[str, Any] | None = None
    if resume:
        ckpt = _load_checkpoint(ckpt_path, base, device)
        _check_resume_config(ckpt.get("config"), config, ckpt_path)
        try:
            base.load_state_dict(ckpt["model"])
            # The checkpoint is read onto the CPU; load_state_dict casts the optimizer state
            # to the device (and dtype) of the parameters it belongs to.
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            loader.load_state_dict(ckpt["loader"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ckpt_path} does not fit this run: {e}") from None
        step, elapsed_before = int(ckpt["step"]), float(ckpt.get("elapsed_s", 0.0))
        window = _restore_rank_state(ckpt, config, d, device)
        if isinstance(ckpt.get("last_train"), dict):
            last_train = dict(ckpt["last_train"])
        if isinstance(ckpt.get("last_eval"), dict):
            last_eval = dict(ckpt["last_eval"])
        if d.main:
            _trim_metrics(out / METRICS_NAME, step)
    else:
        torch.manual_seed(config.seed + d.rank)  # per-rank dropout masks

    net: nn.Module = base
    if d.active:
        net = nn.parallel.DistributedDataParallel(
            base, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)

    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", asdict(config))
        if not resume:
            _start_metrics(out / METRICS_NAME)
    metrics_file = open(out / METRICS_NAME, "a") if d.main else None  # noqa: SIM115

    def log(record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(_json_line(record) + "\n")
            metrics_file.flush()

    def save_checkpoint() -> None:
        # Every rank's own RNG state and metrics window (ranks draw different dropout masks
        # and see different images); gathered by all ranks, written by rank 0.
        ranks = d.all_gather_object({
            "rng": _rng_state(device),
            "log_window": {"loss_sum": win_loss.item(), "correct": int(win_correct.item()),
                           "n": n_window, "seconds": time.perf_counter() - t_window}})
        if d.main:
            _atomic_torch_save({
                "format": CKPT_FORMAT, "version": CKPT_VERSION, "step": step,
                "model": base.state_dict(), "model_config": model_config(base),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "loader": loader.state_dict(),
                "rng": ranks[0]["rng"],  # rank 0's, as in a one-process checkpoint
                "rank_state": ranks, "last_train": last_train, "last_eval": last_eval,
                "config": asdict(config),
                "elapsed_s": elapsed_before + time.perf_counter() - t_start,
            }, ckpt_path)
        d.barrier()

    def run_eval() -> dict[str, Any]:
        if d.active:  # every rank scores its test shard with rank 0's BatchNorm statistics
            _broadcast_buffers(base)
        res = evaluate(base, test_loader, device, bf16=config.bf16)
        rec = {"event": "eval", "step": step, "epoch": _step_epoch(loader),
               "test_loss": res["loss"], "test_accuracy": res["accuracy"]}
        log(rec)
        return rec

    def evaluated_now() -> bool:
        return last_eval is not None and last_eval.get("step") == step

    pbar = tqdm(total=config.steps, initial=step, disable=not (config.progress and d.main),
                unit="step", dynamic_ncols=True, leave=True)
    t_start = time.perf_counter()
    t_window, n_window = time.perf_counter(), 0
    win_loss = torch.zeros((), dtype=torch.float64, device=device)
    win_correct = torch.zeros((), dtype=torch.int64, device=device)
    if window is not None:  # the metrics window the checkpoint interrupted
        win_loss.fill_(float(window["loss_sum"]))
        win_correct.fill_(int(window["correct"]))
        n_window = int(window["n"])
        t_window -= float(window.get("seconds", 0.0))
    base.train()
    try:
        while step < config.steps:
            for x, y in loader:
                with _autocast(device, config.bf16):
                    logits = net(x)
                    loss = F.cross_entropy(logits.float(), y,
                                           label_smoothing=config.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(base.parameters(), config.grad_clip)
                opt.step()
                sched.step()
                step += 1
                win_loss += loss.detach().double() * y.numel()
                win_correct += (logits.detach().argmax(1) == y).sum()
                n_window += y.numel()
                pbar.update(1)
                if step % config.log_every == 0 or step == config.steps:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    now = time.perf_counter()
                    s_loss, s_correct, s_n = d.all_sum(
                        [win_loss.item(), float(win_correct.item()), float(n_window)])
                    last_train = {
                        "event": "train", "step": step, "epoch": loader.epoch,
                        "loss": s_loss / s_n, "accuracy": s_correct / s_n,
                        "lr": opt.param_groups[0]["lr"],
                        "images_per_s": s_n / max(now - t_window, 1e-9),
                        "elapsed_s": elapsed_before + now - t_start}
                    log(last_train)
                    pbar.set_postfix(loss=f"{last_train['loss']:.3f}",
                                     acc=f"{last_train['accuracy']:.3f}",
                                     img_s=f"{last_train['images_per_s']:.0f}")
                    win_loss.zero_()
                    win_correct.zero_()
                    t_window, n_window = time.perf_counter(), 0
                # Evaluate before checkpointing, so that a checkpoint records the evaluation
                # at its step and a resumed run neither repeats nor loses it. Without
                # eval_every, the end of every epoch is evaluated (the final step always is,
                # below).
                epoch_done = loader.batch == len(loader)
                if (config.eval_every and step % config.eval_every == 0) or \
                        (not config.eval_every and epoch_done and step < config.steps):
                    last_eval = run_eval()
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    save_checkpoint()
                if on_step is not None:
                    on_step(step)
                if step >= config.steps:
                    break
            else:
                # The epoch's end was evaluated at its last batch (above); this evaluates
                # only when a version-1 checkpoint taken on an epoch's last batch (which
                # does not record that evaluation) is resumed.
                if not config.eval_every and step < config.steps and not evaluated_now():
                    last_eval = run_eval()  # end of an epoch
                continue
            break
    finally:
        pbar.close()
        if metrics_file is not None:
            metrics_file.close()
    metrics_file = open(out / METRICS_NAME, "a") if d.main else None  # noqa: SIM115
    try:
        if not evaluated_now():
            last_eval = run_eval()
        save_checkpoint()
    finally:
        if metrics_file is not None:
            metrics_file.close()
    assert last_eval is not None
    elapsed = elapsed_before + time.perf_counter() - t_start
    result: dict[str, Any] = {
        "test_accuracy": last_eval["test_accuracy"], "test_loss": last_eval["test_loss"],
        "train_loss": last_train.get("loss"), "train_accuracy": last_train.get("accuracy"),
        "steps": step, "epochs": step / len(loader), "elapsed_s": elapsed,
        "images_per_s": last_train.get("images_per_s"), "world_size": d.world,
    }
    if d.active:
        result["ranks_in_sync"] = _ranks_in_sync(base, d)
    model_path = out / default_model_filename()
    if d.main:
        save_model(base, model_path, extra={k: v for k, v in _json_safe(result).items()
                                            if isinstance(v, (int, float, bool, str))})
        _write_json(out / "final.json", {**result, "model_path": str(model_path)})
    d.barrier()
    result["model_path"] = str(model_path)
    return result


def _check_out_dir(out: Path) -> None:
    """Refuse, before any data is loaded, a run directory that is a file or lies under one
    (``mkdir`` would raise ``FileExistsError`` / ``NotADirectoryError`` after the data)."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"run directory {out}: {p} exists and is not a directory; "
                                  "choose another --out")
            return


@torch.no_grad()
def _broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts them at the start of each forward pass, so after a step every rank holds
    the statistics of its own shard: evaluating then would score each test shard with other
    statistics than the model rank 0 saves. Training is unaffected (the next forward
    broadcasts the same values)."""
    for b in model.buffers():
        dist.broadcast(b, 0)


@torch.no_grad()
def _ranks_in_sync(model: nn.Module, d: _Dist) -> bool:
    """Whether every rank holds bit-identical parameters and floating-point buffers
    (compared by all-gathered sums)."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
    probe = torch.stack([flat.sum(), flat.abs().sum(), (flat * torch.arange(
        flat.numel(), device=flat.device, dtype=flat.dtype).remainder(97)).sum()]).double()
    gathered = [torch.empty_like(probe) for _ in range(d.world)]
    dist.all_gather(gathered, probe)
    return all(torch.equal(g, gathered[0]) for g in gathered)


_ = DataError  # re-exported for callers catching data errors from train()
