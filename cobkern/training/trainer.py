"""The training loop: :func:`train` and :func:`finetune`.

One loop serves a CPU, one GPU and ``torchrun --nproc_per_node=N`` (DistributedDataParallel,
NCCL on GPUs, gloo on CPUs; each rank takes its slice of every global batch). Its pieces
live beside it: :mod:`.optim` (optimizer, schedule), :mod:`.evaluation`,
:mod:`.checkpoint` (save, load, resume checks), :mod:`.metrics` (the JSON outputs) and
:mod:`.distributed`. Outputs in ``out_dir``:

* ``config.json`` — the resolved :class:`TrainConfig`;
* ``metrics.jsonl`` — one strict JSON object per line: ``{"event": "train", "step",
  "epoch", "loss", "accuracy", "lr", "images_per_s", "elapsed_s"}`` every ``log_every``
  steps (``loss`` / ``accuracy`` over the steps since the last line, ``lr`` the learning
  rate of the line's step) and ``{"event": "eval", "step", "epoch", "test_loss",
  "test_accuracy"}`` per evaluation. ``epoch`` is the 0-based index of the epoch the step
  belongs to; a
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
of the checkpoint, except the fields in :data:`~.checkpoint.RESUME_MAY_CHANGE`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cobkern._atomic import remove_stale
from cobkern._digest import tensor_digest
from cobkern.data import DeviceLoader, ImageSet, load_cifar10, subset
from cobkern.models import (
    VGG,
    default_model_filename,
    model_config,
    save_model,
    unwrap_model,
    vgg16_relu,
    vgg16_tsra,
)
from cobkern.ops import use_compile_kernels

from .checkpoint import (
    CHECKPOINT_NAME,
    CKPT_FORMAT,
    CKPT_VERSION,
    CheckpointError,
    check_resume_config,
    load_checkpoint,
    restore_rank_state,
    rng_state,
    save_checkpoint_file,
)
from .config import ConfigError, TrainConfig
from .distributed import DistContext, broadcast_buffers, ranks_in_sync
from .evaluation import bf16_autocast, check_num_classes, evaluate
from .metrics import METRICS_NAME, json_line, json_safe, start_metrics, trim_metrics, write_json
from .optim import build_optimizer, build_scheduler, load_optimizer_state

__all__ = ["train", "finetune"]


def _step_epoch(loader: DeviceLoader) -> int:
    """0-based epoch of the last batch the loader yielded (after the epoch's last batch the
    loader has already moved on to the next epoch)."""
    return loader.epoch if loader.batch > 0 else max(0, loader.epoch - 1)


def _prepare_data(config: TrainConfig, data: tuple[ImageSet, ImageSet] | None,
                  d: DistContext) -> tuple[ImageSet, ImageSet]:
    if data is None:
        # Rank 0 decodes and caches first; the others then read the cache.
        if d.main:
            data = load_cifar10(config.data_source, config.data_root, config.cache_dir,
                                download=config.download, progress=config.progress)
        d.barrier()
        if not d.main:
            data = load_cifar10(config.data_source, config.data_root, config.cache_dir,
                                download=False, progress=False)
    train_set, test_set = data
    train_set = subset(train_set, config.train_subset or None, seed=config.seed)
    test_set = subset(test_set, config.test_subset or None, seed=config.seed + 1)
    return train_set, test_set


def _data_fingerprint(images: ImageSet) -> str:
    """SHA-256 of the images and labels a run uses (after subsetting)."""
    return tensor_digest([("images", images.images), ("labels", images.labels)])


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
    on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train a model with ``config`` and write metrics, checkpoints and the model file.

    Args:
        config: all settings (see :class:`TrainConfig`; e.g. ``get_preset("quick")``).
        out_dir: run directory (created once the data and model are ready).
        resume: continue from ``out_dir/checkpoint.pt``, with the checkpoint's settings
            (only the fields in :data:`~.checkpoint.RESUME_MAY_CHANGE` may differ). Without it, an
            existing checkpoint in ``out_dir`` is an error (nothing is overwritten), and a
            ``metrics.jsonl`` left by a run killed before its first checkpoint is replaced.
        model: train this cobkern VGG (e.g. a pruned one) instead of building
            ``config.arch``; it is trained in place and keeps its architecture.
        data: ``(train, test)`` image sets instead of loading ``config.data_source``; the
            model's outputs must match their number of classes.
        on_step: called with the step number after every optimizer step (and after any
            checkpoint at that step); may raise to stop the run.
        on_start: called once, on the main rank, when the data, model, optimizer and any
            checkpoint are ready and before anything is written to ``out_dir``: the moment
            every check of the settings and data has passed (e.g. to remove an old run's
            files only once the new run can start).

    Returns:
        Final metrics: ``{"test_accuracy", "test_loss", "train_loss", "train_accuracy",
        "steps", "epochs", "elapsed_s", "images_per_s", "model_path", "world_size",
        "ranks_in_sync"}`` (the last one only under data parallelism).

    Raises:
        ConfigError: an invalid setting, a model that is not a cobkern VGG or whose outputs
        do not match the classes. CheckpointError: ``resume`` without a readable
        checkpoint of this model, or with settings that differ from the checkpoint's;
        a checkpoint in ``out_dir`` without ``resume``. :class:`cobkern.data.DataError`:
        missing or bad data.
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
    with _cpu_threads(config.num_threads):
        return _train_in(config, out, ckpt_path, resume, model, data, on_step, on_start)


@contextlib.contextmanager
def _cpu_threads(n: int) -> Iterator[None]:
    """torch's CPU threads set to ``n`` (0: left as they are) for the block, then put back,
    so that a later run with ``num_threads=0`` gets the default, not this run's count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_in(config: TrainConfig, out: Path, ckpt_path: Path, resume: bool,
              model: nn.Module | None, data: tuple[ImageSet, ImageSet] | None,
              on_step: Callable[[int], None] | None,
              on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """:func:`train` once its arguments are checked: the process group, then the run."""
    d = DistContext(config)
    if d.rank == 0:  # a run killed while writing its checkpoint left the temporary file
        remove_stale(ckpt_path)  # (~400 MB at full width): freed before the first write
    given = unwrap_model(model) if model is not None else None
    fused_before = getattr(given, "fuse_conv_bias", None)
    try:
        with use_compile_kernels(config.compile_kernels):  # read while torch.compile traces
            return _train(config, out, ckpt_path, resume, model, data, on_step, d, on_start)
    finally:
        if isinstance(given, VGG):  # fuse_conv_bias is set for the run only
            given.fuse_conv_bias = fused_before
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
           on_step: Callable[[int], None] | None, d: DistContext,
           on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    if config.batch_size % d.world:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the "
                          f"{d.world} ranks")
    # reduce-overhead and max-autotune replay the compiled step as CUDA graphs
    graphs = config.compile and config.compile_mode in ("reduce-overhead", "max-autotune")
    if graphs and d.active:
        raise ConfigError(f"compile_mode={config.compile_mode} (CUDA graphs) is not supported "
                          f"with {d.world} processes (DistributedDataParallel); use "
                          "compile_mode=default or max-autotune-no-cudagraphs")
    train_set, test_set = _prepare_data(config, data, d)
    data_id = _data_fingerprint(train_set)
    test_id = _data_fingerprint(test_set)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    if model is None:
        model = _build_model(config)
    base = unwrap_model(model)
    if not isinstance(base, VGG):  # checkpoints and the saved model record a VGG's config:
        # refused now, not at the first checkpoint (or after the whole run, without one)
        raise ConfigError(f"train needs a cobkern VGG model (vgg16_tsra / vgg16_relu / "
                          f"build_model, pruned or not), got {type(base).__name__}")
    base.fuse_conv_bias = config.fuse_conv_bias
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
        ckpt = load_checkpoint(ckpt_path, base, device)
        check_resume_config(ckpt.get("config"), config, ckpt_path)
        # older checkpoints record none; with both recorded, the data may have moved
        # (data_root is free to change on resume: a copy of the same images resumes)
        for key, have, what in (("data_id", data_id, "training"), ("test_id", test_id, "test")):
            if ckpt.get(key, have) != have:
                raise CheckpointError(
                    f"checkpoint {ckpt_path} was written for other {what} images (same "
                    "settings, different data: e.g. another COBKERN_DATA or data_root, or "
                    "changed files); resume with that data or start a new run in another "
                    "output directory")
        try:
            base.load_state_dict(ckpt["model"])
            # The checkpoint is read onto the CPU; load_state_dict casts the optimizer state
            # to the device (and dtype) of the parameters it belongs to.
            load_optimizer_state(opt, ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            loader.load_state_dict(ckpt["loader"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ckpt_path} does not fit this run: {e}") from None
        step, elapsed_before = int(ckpt["step"]), float(ckpt.get("elapsed_s", 0.0))
        window = restore_rank_state(ckpt, config, d, device)
        if isinstance(ckpt.get("last_train"), dict):
            last_train = dict(ckpt["last_train"])
        if isinstance(ckpt.get("last_eval"), dict):
            last_eval = dict(ckpt["last_eval"])
        if d.main:
            trim_metrics(out / METRICS_NAME, step)
    else:
        torch.manual_seed(config.seed + d.rank)  # per-rank dropout masks

    net: nn.Module = base
    if d.active:
        net = nn.parallel.DistributedDataParallel(
            base, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        mode = None if config.compile_mode == "default" else config.compile_mode
        net = torch.compile(net, mode=mode)

    if d.main:
        if on_start is not None:
            on_start()
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", asdict(config))
        if not resume:
            start_metrics(out / METRICS_NAME)
    metrics_file = open(out / METRICS_NAME, "a") if d.main else None  # noqa: SIM115

    def log(record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json_line(record) + "\n")
            metrics_file.flush()

    def save_checkpoint() -> None:
        # Every rank's own RNG state and metrics window (ranks draw different dropout masks
        # and see different images); gathered by all ranks, written by rank 0.
        ranks = d.all_gather_object({
            "rng": rng_state(device),
            "log_window": {"loss_sum": win_loss.item(), "correct": int(win_correct.item()),
                           "n": n_window, "seconds": time.perf_counter() - t_window}})
        if d.main:
            save_checkpoint_file({
                "format": CKPT_FORMAT, "version": CKPT_VERSION, "step": step,
                "model": base.state_dict(), "model_config": model_config(base),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "loader": loader.state_dict(), "data_id": data_id, "test_id": test_id,
                "rng": ranks[0]["rng"],  # rank 0's, as in a one-process checkpoint
                "rank_state": ranks, "last_train": last_train, "last_eval": last_eval,
                "config": asdict(config),
                "elapsed_s": elapsed_before + time.perf_counter() - t_start,
            }, ckpt_path)
        d.barrier()

    def run_eval() -> dict[str, Any]:
        if d.active:  # every rank scores its test shard with rank 0's BatchNorm statistics
            broadcast_buffers(base)
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
                if graphs:  # a new step: the last replay's outputs may now be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                with bf16_autocast(device, config.bf16):
                    logits = net(x)
                    loss = F.cross_entropy(logits.float(), y,
                                           label_smoothing=config.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(base.parameters(), config.grad_clip)
                step_lr = opt.param_groups[0]["lr"]  # the rate this step uses (logged)
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
                        "lr": step_lr,
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
                # at its step and a resumed run neither repeats nor loses it (the final step
                # included: its checkpoint may be the last one). Without eval_every, the end
                # of every epoch is evaluated.
                epoch_done = loader.batch == len(loader)
                if step >= config.steps or \
                        (config.eval_every and step % config.eval_every == 0) or \
                        (not config.eval_every and epoch_done):
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
        result["ranks_in_sync"] = ranks_in_sync(base, d)
    model_path = out / default_model_filename()
    if d.main:
        save_model(base, model_path, extra={k: v for k, v in json_safe(result).items()
                                            if isinstance(v, (int, float, bool, str))})
        write_json(out / "final.json", {**result, "model_path": str(model_path)})
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
