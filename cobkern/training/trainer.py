"""The training loop: :func:`train`, :func:`finetune`, :func:`evaluate`.

One loop serves a CPU, one GPU and ``torchrun --nproc_per_node=N`` (DistributedDataParallel,
NCCL on GPUs, gloo on CPUs; each rank takes its slice of every global batch). Outputs in
``out_dir``:

* ``config.json`` — the resolved :class:`TrainConfig`;
* ``metrics.jsonl`` — one JSON object per line: ``{"event": "train", "step", "epoch",
  "loss", "accuracy", "lr", "images_per_s", "elapsed_s"}`` every ``log_every`` steps and
  ``{"event": "eval", "step", "epoch", "test_loss", "test_accuracy"}`` per evaluation;
* ``checkpoint.pt`` — model, optimizer, scheduler, loader position and RNG state, written
  atomically every ``checkpoint_every`` steps and at the end;
* ``model.safetensors`` (``model.pt`` without safetensors) — weights + architecture config
  (:func:`cobkern.models.save_model`).

``resume=True`` continues from ``checkpoint.pt``; the data order and augmentation are a
pure function of ``(seed, epoch, batch)`` and the dropout RNG is restored, so on a given
device a resumed run reproduces the uninterrupted run's weights exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
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

from .config import ConfigError, TrainConfig

__all__ = ["train", "finetune", "evaluate", "CheckpointError", "build_optimizer",
           "build_scheduler", "lr_factor"]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CKPT_FORMAT = "cobkern.checkpoint"


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


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _load_checkpoint(path: Path, model: nn.Module, device: torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"cannot resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {e})") \
            from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a cobkern training checkpoint")
    mine = model_config(model)
    if ckpt["model_config"] != mine:
        diff = _first_difference(ckpt["model_config"], mine)
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
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue  # a torn last line from a killed run
    with atomic_path(path) as tmp:
        tmp.write_text("".join(x + "\n" for x in keep))


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
        resume: continue from ``out_dir/checkpoint.pt``. Without it, an existing checkpoint
            in ``out_dir`` is an error (nothing is overwritten).
        model: train this model (e.g. a pruned one) instead of building ``config.arch``;
            it is trained in place and keeps its architecture.
        data: ``(train, test)`` image sets instead of loading ``config.data_source``.
        on_step: called with the step number after every optimizer step (and after any
            checkpoint at that step); may raise to stop the run.

    Returns:
        Final metrics: ``{"test_accuracy", "test_loss", "train_loss", "train_accuracy",
        "steps", "epochs", "elapsed_s", "images_per_s", "model_path", "world_size",
        "ranks_in_sync"}`` (the last one only under data parallelism).
    """
    config = TrainConfig(**asdict(config)).validate()
    out = Path(out_dir)
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
    if base.num_classes != len(train_set.classes) and data is None:
        raise ConfigError(f"the model has {base.num_classes} outputs but the data has "
                          f"{len(train_set.classes)} classes")
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
    if resume:
        ckpt = _load_checkpoint(ckpt_path, base, device)
        try:
            base.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            loader.load_state_dict(ckpt["loader"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {ckpt_path} does not fit this run: {e}") from None
        step, elapsed_before = int(ckpt["step"]), float(ckpt.get("elapsed_s", 0.0))
        _set_rng_state(ckpt["rng"], device)
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
        (out / "config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
    metrics_file = open(out / METRICS_NAME, "a") if d.main else None  # noqa: SIM115

    def log(record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def save_checkpoint() -> None:
        if d.main:
            _atomic_torch_save({
                "format": CKPT_FORMAT, "version": 1, "step": step,
                "model": base.state_dict(), "model_config": model_config(base),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "loader": loader.state_dict(), "rng": _rng_state(device),
                "config": asdict(config),
                "elapsed_s": elapsed_before + time.perf_counter() - t_start,
            }, ckpt_path)
        d.barrier()

    def run_eval() -> dict[str, float]:
        res = evaluate(base, test_loader, device, bf16=config.bf16)
        rec = {"event": "eval", "step": step, "epoch": loader.epoch,
               "test_loss": res["loss"], "test_accuracy": res["accuracy"]}
        log(rec)
        return rec

    pbar = tqdm(total=config.steps, initial=step, disable=not (config.progress and d.main),
                unit="step", dynamic_ncols=True, leave=True)
    t_start = time.perf_counter()
    t_window, n_window = time.perf_counter(), 0
    win_loss = torch.zeros((), dtype=torch.float64, device=device)
    win_correct = torch.zeros((), dtype=torch.int64, device=device)
    last_train: dict[str, Any] = {}
    last_eval: dict[str, Any] | None = None
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
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    save_checkpoint()
                if config.eval_every and step % config.eval_every == 0:
                    last_eval = run_eval()
                if on_step is not None:
                    on_step(step)
                if step >= config.steps:
                    break
            else:
                if not config.eval_every and step < config.steps:
                    last_eval = run_eval()  # end of an epoch
                continue
            break
    finally:
        pbar.close()
        if metrics_file is not None:
            metrics_file.close()
    metrics_file = open(out / METRICS_NAME, "a") if d.main else None  # noqa: SIM115
    try:
        if last_eval is None or last_eval["step"] != step:
            last_eval = run_eval()
        save_checkpoint()
    finally:
        if metrics_file is not None:
            metrics_file.close()
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
        save_model(base, model_path, extra={k: v for k, v in result.items()
                                            if isinstance(v, (int, float, bool, str))})
        (out / "final.json").write_text(json.dumps({**result, "model_path": str(model_path)},
                                                   indent=1) + "\n")
    d.barrier()
    result["model_path"] = str(model_path)
    return result


@torch.no_grad()
def _ranks_in_sync(model: nn.Module, d: _Dist) -> bool:
    """Whether every rank holds bit-identical parameters (compared by all-gathered sums)."""
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    probe = torch.stack([flat.sum(), flat.abs().sum(), (flat * torch.arange(
        flat.numel(), device=flat.device, dtype=flat.dtype).remainder(97)).sum()]).double()
    gathered = [torch.empty_like(probe) for _ in range(d.world)]
    dist.all_gather(gathered, probe)
    return all(torch.equal(g, gathered[0]) for g in gathered)


_ = DataError  # re-exported for callers catching data errors from train()
