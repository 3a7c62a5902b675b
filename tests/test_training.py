"""Trainer: presets, config resolution, resume, errors, evaluation and 2-process DDP (gloo)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cobkern
from cobkern.data import ImageSet, load_cifar10
from cobkern.models import load_model, model_config, vgg16_tsra
from cobkern.training import (
    CheckpointError,
    ConfigError,
    TrainConfig,
    evaluate,
    finetune,
    get_preset,
    lr_factor,
    train,
)
from cobkern.training.cli import main


def _toy_data(n_train: int = 64, n_test: int = 32) -> tuple[ImageSet, ImageSet]:
    """Class-dependent colour blobs: learnable in a few steps, 4 classes."""
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> ImageSet:
        labels = torch.arange(n) % 4
        base = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]])
        noise = torch.randint(-30, 31, (n, 32, 32, 3), generator=g)
        imgs = (base[labels][:, None, None, :] + noise).clamp(0, 255).to(torch.uint8)
        return ImageSet(imgs, labels, ["r", "g", "b", "y"])

    return make(n_train), make(n_test)


def _tiny_config(**kw) -> TrainConfig:
    base = dict(width=0.0625, num_classes=4, batch_size=16, steps=10, warmup_steps=2,
                lr=3e-3, log_every=2, checkpoint_every=4, eval_batch_size=32, progress=False,
                device="cpu", seed=0)
    base.update(kw)
    return TrainConfig(**base).validate()


def test_presets() -> None:
    paper = get_preset("paper", "tsra")
    assert (paper.optimizer, paper.lr, paper.weight_decay, paper.warmup_steps) == \
        ("adamw", 1e-3, 5e-4, 1000)
    assert (paper.grad_clip, paper.batch_size, paper.steps, paper.schedule) == \
        (1.0, 1024, 120_000, "cosine")
    relu = get_preset("paper", "relu")
    assert (relu.optimizer, relu.lr, relu.momentum, relu.nesterov, relu.warmup_steps) == \
        ("sgd", 0.1, 0.9, True, 0)
    assert relu.steps == 120_000 and relu.arch == "relu"
    fast = get_preset("fast")
    assert fast.bf16 and fast.compile and fast.steps < paper.steps
    # the conv bias inside the TSRA kernel: a GPU setting (timed faster on an H200), and
    # only where a TSRA block follows the convolution
    assert fast.fuse_conv_bias and not get_preset("fast", "relu").fuse_conv_bias
    assert not paper.fuse_conv_bias and not get_preset("quick").fuse_conv_bias
    assert get_preset("quick").width < 0.5
    with pytest.raises(ValueError, match="available presets: fast, paper, quick"):
        get_preset("slow")


def test_lr_schedule_warmup_then_cosine_to_zero() -> None:
    cfg = _tiny_config(steps=100, warmup_steps=10, lr=1.0)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.5)
    assert lr_factor(100, cfg) == pytest.approx(0.0, abs=1e-12)
    vals = [lr_factor(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))


def test_train_writes_outputs_and_learns(tmp_path) -> None:
    data = _toy_data()
    with cobkern.use_backend("reference"):
        res = train(_tiny_config(steps=24), tmp_path / "run", data=data)
    out = tmp_path / "run"
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "final.json"} <= \
        {p.name for p in out.iterdir()}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["event"] == "train"]
    evals = [x for x in lines if x["event"] == "eval"]
    assert [x["step"] for x in train_lines] == list(range(2, 25, 2))
    assert all(x["images_per_s"] > 0 and 0 <= x["accuracy"] <= 1 for x in train_lines)
    # 64 images / batch 16 = 4 steps per epoch: an eval per epoch (the last one is step 24).
    assert [x["step"] for x in evals] == [4, 8, 12, 16, 20, 24]
    # Four well-separated colours: chance is 25%; a few dozen steps must beat it clearly.
    assert res["test_accuracy"] >= 0.5, res
    assert res["steps"] == 24 and res["epochs"] == 6
    model = load_model(res["model_path"])
    assert model_config(model)["num_classes"] == 4
    with cobkern.use_backend("reference"):
        again = evaluate(model, data[1])
    assert again["accuracy"] == pytest.approx(res["test_accuracy"])
    assert not list(out.glob(".*tmp*"))


class _Stop(Exception):
    pass


def test_resume_after_interruption_is_bit_identical(tmp_path) -> None:
    data = _toy_data()
    cfg = _tiny_config(steps=14, checkpoint_every=4)

    def stop_at(k: int):
        def hook(step: int) -> None:
            if step == k:
                raise _Stop
        return hook

    with cobkern.use_backend("reference"):
        ref = train(cfg, tmp_path / "a", data=data)
        # Killed at step 10 (after the checkpoint at 8): steps 9-10 are lost and redone.
        with pytest.raises(_Stop):
            train(cfg, tmp_path / "b", data=data, on_step=stop_at(10))
        assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 8
        with pytest.raises(CheckpointError, match="already exists"):
            train(cfg, tmp_path / "b", data=data)  # no silent overwrite
        res = train(cfg, tmp_path / "b", data=data, resume=True)
    a = load_model(ref["model_path"]).state_dict()
    b = load_model(res["model_path"]).state_dict()
    # Same device, same op order, restored data position and dropout RNG: bit-identical.
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert res["test_accuracy"] == ref["test_accuracy"]
    steps = [json.loads(x)["step"] for x in
             (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["event"] == "train"]
    assert steps == list(range(2, 15, 2))  # the interrupted tail was trimmed, not duplicated


#: Run in a fresh process (cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts): train a
#: reference run, a run killed at step 10, its resume; print whether they are bit-identical.
_RESUME_SCRIPT = """
import json, sys, warnings, torch
sys.path.insert(0, sys.argv[1])
from test_training import _Stop, _tiny_config, _toy_data
from cobkern.models import load_model
from cobkern.training import train
out, device = sys.argv[2], sys.argv[3]
# warn_only: an op without a deterministic CUDA kernel (PyTorch lists NLLLoss) is reported,
# not fatal; if the runs then differ, the report names it
torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cudnn.benchmark = False
cfg = _tiny_config(steps=14, checkpoint_every=4, device=device, bf16=device != "cpu",
                   channels_last=True)
data = _toy_data()
def stop(step):
    if step == 10:
        raise _Stop
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ref = train(cfg, out + "/a", data=data)
    try:
        train(cfg, out + "/b", data=data, on_step=stop)
    except _Stop:
        pass
    res = train(cfg, out + "/b", data=data, resume=True)
a = load_model(ref["model_path"]).state_dict()
b = load_model(res["model_path"]).state_dict()
print(json.dumps({"identical": all(torch.equal(a[k], b[k]) for k in a),
                  "acc": [ref["test_accuracy"], res["test_accuracy"]],
                  "steps": [ref["steps"], res["steps"]],
                  "nondeterministic_ops": sorted({str(w.message)[:120] for w in caught
                                                  if "deterministic" in str(w.message)})}))
"""


def _resume_in_subprocess(tmp_path, device: str) -> dict:
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8")
    env.pop("TRITON_INTERPRET", None)  # CPU: the reference path, as in the in-process test
    proc = subprocess.run([sys.executable, "-c", _RESUME_SCRIPT, str(Path(__file__).parent),
                           str(tmp_path), device], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("device", [
    "cpu",  # the same script on the reference path: keeps it runnable where CI is
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, device) -> None:
    """On CUDA, the trainer's GPU path (fused Triton kernels, bf16 autocast, channels_last,
    deterministic algorithms where PyTorch has them): a run killed at step 10 and resumed
    from its step-8 checkpoint ends with exactly the weights of an uninterrupted run. (The
    fused kernels use no atomics; any op PyTorch flags as nondeterministic is listed in the
    failure message.)"""
    r = _resume_in_subprocess(tmp_path, device)
    assert r["steps"] == [14, 14]
    assert r["identical"], r
    assert r["acc"][0] == r["acc"][1]


def test_resume_rejects_a_checkpoint_for_another_model(tmp_path) -> None:
    data = _toy_data()
    with cobkern.use_backend("reference"):
        train(_tiny_config(steps=4), tmp_path / "r", data=data)
        with pytest.raises(CheckpointError, match="different model"):
            train(_tiny_config(steps=8, width=0.125), tmp_path / "r", data=data, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(_tiny_config(), tmp_path / "none", data=data, resume=True)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        train(_tiny_config(), tmp_path / "junk", data=data, resume=True)


def test_a_file_that_is_not_a_checkpoint_is_a_one_line_error(tmp_path) -> None:
    """Not torch's advice to load with weights_only=False: the file is just not ours."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint.pt").write_text(json.dumps({"steps": 3}))
    with pytest.raises(CheckpointError) as e:
        train(_tiny_config(), tmp_path / "r", data=_toy_data(), resume=True)
    msg = str(e.value)
    assert "not a cobkern training checkpoint (not a torch file)" in msg
    assert str(tmp_path / "r" / "checkpoint.pt") in msg
    assert "weights_only" not in msg and "\n" not in msg


def test_finetune_keeps_a_pruned_architecture(tmp_path) -> None:
    data = _toy_data()
    torch.manual_seed(0)
    model = vgg16_tsra(num_classes=4, width=0.0625)
    act = model.classifier[2]
    act.split = 100  # an uneven split, as after pruning
    cfg_before = model_config(model)
    with cobkern.use_backend("reference"):
        res = finetune(model, data, _tiny_config(steps=4), tmp_path / "ft")
    assert model_config(load_model(res["model_path"])) == cfg_before
    assert model_config(model) == cfg_before  # trained in place


def test_fuse_conv_bias_trains_the_same_and_is_set_for_the_run_only(tmp_path) -> None:
    """``fuse_conv_bias=True`` (each conv's bias added in the TSRA kernel) trains the same
    model: after 4 SGD steps the weights equal the plain run's to 1e-4 relative (float32;
    the bias is added in another place, so the rounding differs — SGD, whose steps are
    linear in the gradients: Adam's normalised steps would turn a rounding difference in
    a near-zero gradient into a step of up to the learning rate). The
    switch is set on a given model for the run and put back afterwards; a model that is
    not a cobkern VGG is refused."""
    data = _toy_data()
    runs = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = vgg16_tsra(num_classes=4, width=0.0625)
        seen = []
        cfg = _tiny_config(steps=4, fuse_conv_bias=fused, optimizer="sgd", grad_clip=0.0)
        with cobkern.use_backend("reference"):
            train(cfg, tmp_path / f"t{fused}", model=model, data=data,
                  on_step=lambda _s, m=model, seen=seen: seen.append(m.fuse_conv_bias))
        assert seen == [fused] * 4  # on during the run
        assert model.fuse_conv_bias is False  # put back
        runs[fused] = model.state_dict()
    for k, v in runs[False].items():
        torch.testing.assert_close(runs[True][k], v, rtol=1e-4, atol=1e-5 * v.abs().max())
    with pytest.raises(ConfigError, match="needs a cobkern VGG"):
        finetune(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 4)), data,
                 _tiny_config(steps=1, fuse_conv_bias=True), tmp_path / "bad")


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(["--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown preset 'nope'") and "Traceback" not in err
    assert main(["--preset", "quick", "--data-root", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "y"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()  # nothing written for bad input
    assert main(["--lr", "abc", "--out", str(tmp_path / "z")]) == 2
    assert "bad value for lr" in capsys.readouterr().err


def test_cli_config_resolution(tmp_path, capsys) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"preset": "paper", "arch": "relu", "lr": 0.05, "steps": 7}))
    assert main(["--config", str(cfg), "--steps", "9", "--no-nesterov", "--print-config"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["arch"], got["optimizer"], got["lr"], got["steps"], got["nesterov"]) == \
        ("relu", "sgd", 0.05, 9, False)
    cfg.write_text(json.dumps({"learning_rate": 1}))
    assert main(["--config", str(cfg), "--print-config"]) == 2
    assert "unknown setting" in capsys.readouterr().err


def _write_folder(root: Path) -> None:
    train, test = _toy_data(32, 16)
    for split, ds in (("train", train), ("test", test)):
        for i, (img, lab) in enumerate(zip(ds.images, ds.labels, strict=True)):
            d = root / split / ds.classes[lab]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.numpy()).save(d / f"{i:03d}.png")


def test_cli_trains_on_an_imagefolder(tmp_path) -> None:
    _write_folder(tmp_path / "tree")
    argv = ["--preset", "quick", "--data-root", str(tmp_path / "tree"), "--cache-dir",
            str(tmp_path / "cache"), "--width", "0.0625", "--num-classes", "4", "--steps", "3",
            "--batch-size", "8", "--train-subset", "0", "--no-progress", "--out",
            str(tmp_path / "run"), "--device", "cpu"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "run" / "final.json").read_text())["steps"] == 3


#: Under torchrun: the training CLI's settings (argv[3:]), run through train() with a hook
#: that stops the run after step argv[1] (0: never); argv[2] == "resume" continues it.
_DDP_WORKER = """
import sys
from cobkern.training import train
from cobkern.training.cli import build_parser, resolve_config
class Stop(Exception):
    pass
def stop(step):
    if step == int(sys.argv[1]):
        raise Stop
args = build_parser().parse_args(sys.argv[3:])
try:
    train(resolve_config(args), args.out, resume=sys.argv[2] == "resume", on_step=stop)
except Stop:
    print("stopped", flush=True)
"""


def _metric_lines(path: Path) -> list[dict]:
    """metrics.jsonl records without the timing fields (which differ from run to run)."""
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "elapsed_s")}
            for r in recs]


def test_ddp_two_gloo_processes_stay_in_sync(tmp_path) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun not available")
    _write_folder(tmp_path / "tree")
    env = dict(os.environ, OMP_NUM_THREADS="1", COBKERN_CACHE=str(tmp_path / "cache"))
    settings = ["--preset", "quick", "--data-root", str(tmp_path / "tree"), "--width",
                "0.0625", "--num-classes", "4", "--steps", "4", "--batch-size", "8",
                "--train-subset", "0", "--checkpoint-every", "2", "--log-every", "3",
                "--no-progress", "--device", "cpu"]
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "cobkern.training",
           *settings, "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["world_size"] == 2
    assert final["ranks_in_sync"] is True
    assert final["steps"] == 4 and 0 <= final["test_accuracy"] <= 1
    # 32 training images, global batch 8 → 4 steps per epoch.
    assert final["epochs"] == 1

    # Killed after step 3 (after the step-2 checkpoint, inside a metrics window) and
    # resumed: each rank gets its own RNG state (dropout masks) and metrics window back,
    # so the weights and the metrics lines equal the uninterrupted run's exactly.
    worker = tmp_path / "ddp_worker.py"
    worker.write_text(_DDP_WORKER)
    for stop, mode in ((3, "fresh"), (0, "resume")):
        cmd = [torchrun, "--standalone", "--nproc_per_node=2", str(worker), str(stop), mode,
               *settings, "--out", str(tmp_path / "killed")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if mode == "fresh":
            assert proc.stdout.count("stopped") == 2
            ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
            assert ckpt["step"] == 2 and len(ckpt["rank_state"]) == 2
            # a fresh run seeds its ranks differently; the checkpoint keeps both states
            assert not torch.equal(ckpt["rank_state"][0]["rng"]["torch"],
                                   ckpt["rank_state"][1]["rng"]["torch"])
    resumed = json.loads((tmp_path / "killed" / "final.json").read_text())
    assert resumed["steps"] == 4 and resumed["ranks_in_sync"] is True
    a = load_model(final["model_path"]).state_dict()
    b = load_model(resumed["model_path"]).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["test_accuracy"] == final["test_accuracy"]
    assert _metric_lines(tmp_path / "killed" / "metrics.jsonl") == \
        _metric_lines(tmp_path / "run" / "metrics.jsonl")


def _stop_at(k: int):
    def hook(step: int) -> None:
        if step == k:
            raise _Stop
    return hook


def test_resume_restores_the_metrics_window_and_epoch_end_eval(tmp_path) -> None:
    """Killed at step 7, resumed from the step-4 checkpoint: step 4 is the last batch of
    epoch 0 (64 images, batch 16) and the middle of a 3-step metrics window. Every metrics
    line of the resumed run (up to the timing fields) equals the uninterrupted run's: the
    window's running loss/accuracy come from the checkpoint, and the end-of-epoch eval at
    step 4 is logged once, with the epoch of the train lines (0-based epoch of the step)."""
    data = _toy_data()
    cfg = _tiny_config(steps=9, log_every=3, checkpoint_every=4)
    with cobkern.use_backend("reference"):
        ref = train(cfg, tmp_path / "a", data=data)
        with pytest.raises(_Stop):
            train(cfg, tmp_path / "b", data=data, on_step=_stop_at(7))
        res = train(cfg, tmp_path / "b", data=data, resume=True)
    a = _metric_lines(tmp_path / "a" / "metrics.jsonl")
    b = _metric_lines(tmp_path / "b" / "metrics.jsonl")
    assert [(r["event"], r["step"], r["epoch"]) for r in a] == [
        ("train", 3, 0), ("eval", 4, 0), ("train", 6, 1), ("eval", 8, 1), ("train", 9, 2),
        ("eval", 9, 2)]
    assert b == a  # exact floats: the same sums in the same order
    assert res["train_loss"] == ref["train_loss"] and res["test_loss"] == ref["test_loss"]
    # Resuming the finished run again logs nothing new (its final eval is in the checkpoint).
    with cobkern.use_backend("reference"):
        again = train(cfg, tmp_path / "b", data=data, resume=True)
    assert _metric_lines(tmp_path / "b" / "metrics.jsonl") == a
    assert again["train_loss"] == ref["train_loss"]
    assert again["test_accuracy"] == ref["test_accuracy"]


def test_fresh_run_starts_a_new_metrics_file_and_writes_atomically(tmp_path, monkeypatch) \
        -> None:
    """A run killed before its first checkpoint, then started again (not resumed) in the
    same folder, must not append to the dead run's metrics.jsonl; config.json and
    final.json go through the atomic writer."""
    import cobkern._atomic
    import cobkern.training.checkpoint as checkpoint
    import cobkern.training.metrics as metrics

    written: list[str] = []
    real = cobkern._atomic.atomic_path

    def spy(path):
        written.append(Path(path).name)
        return real(path)

    for module in (checkpoint, metrics):  # every file the trainer writes goes through these
        monkeypatch.setattr(module, "atomic_path", spy)
    data = _toy_data()
    cfg = _tiny_config(steps=6, checkpoint_every=0)
    with cobkern.use_backend("reference"):
        with pytest.raises(_Stop):
            train(cfg, tmp_path / "c", data=data, on_step=_stop_at(5))
        assert not (tmp_path / "c" / "checkpoint.pt").exists()
        train(cfg, tmp_path / "c", data=data)
    lines = _metric_lines(tmp_path / "c" / "metrics.jsonl")
    assert [(r["event"], r["step"]) for r in lines] == [
        ("train", 2), ("train", 4), ("eval", 4), ("train", 6), ("eval", 6)]
    assert {"config.json", "final.json", "metrics.jsonl", "checkpoint.pt"} <= set(written)


def test_resume_with_other_settings_is_an_error(tmp_path) -> None:
    data = _toy_data()
    cfg = _tiny_config(steps=8)
    with cobkern.use_backend("reference"):
        with pytest.raises(_Stop):
            train(cfg, tmp_path / "r", data=data, on_step=_stop_at(6))
        saved = (tmp_path / "r" / "config.json").read_text()
        # the optimizer state would keep the old lr/wd/betas: refused, naming the field
        with pytest.raises(CheckpointError, match=r"lr was 0\.003, this run has 0\.01"):
            train(_tiny_config(steps=8, lr=1e-2, weight_decay=0.1), tmp_path / "r",
                  data=data, resume=True)
        with pytest.raises(CheckpointError, match="beta1 was 0.9, this run has 0.5"):
            train(_tiny_config(steps=8, beta1=0.5), tmp_path / "r", data=data, resume=True)
        # another optimizer: a clean error instead of KeyError('momentum') in SGD.step
        with pytest.raises(CheckpointError, match="optimizer was 'adamw', this run has 'sgd'"):
            train(_tiny_config(steps=8, optimizer="sgd", lr=0.05), tmp_path / "r", data=data,
                  resume=True)
        with pytest.raises(CheckpointError, match="steps was 8, this run has 12"):
            train(_tiny_config(steps=12), tmp_path / "r", data=data, resume=True)
        assert (tmp_path / "r" / "config.json").read_text() == saved  # not overwritten
        # Display, logging/eval/checkpoint intervals and threads may change.
        res = train(_tiny_config(steps=8, progress=True, log_every=1, eval_every=3,
                                 checkpoint_every=2, num_threads=1, eval_batch_size=8),
                    tmp_path / "r", data=data, resume=True)
    assert res["steps"] == 8
    assert json.loads((tmp_path / "r" / "config.json").read_text())["log_every"] == 1


def test_checkpoint_rng_state_is_loaded_on_the_cpu(tmp_path) -> None:
    """torch.set_rng_state and the CUDA generator need CPU byte tensors: a checkpoint is
    read with map_location="cpu" whatever the device ("meta" stands in for "cuda" here;
    load_state_dict moves model and optimizer state to the parameters' device)."""
    from cobkern.training.checkpoint import load_checkpoint, set_rng_state

    data = _toy_data()
    with cobkern.use_backend("reference"):
        train(_tiny_config(steps=2), tmp_path / "r", data=data)
    model = vgg16_tsra(num_classes=4, width=0.0625)
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoint.pt", model, torch.device("meta"))
    assert ckpt["rng"]["torch"].device.type == "cpu"
    assert ckpt["rank_state"][0]["rng"]["torch"].device.type == "cpu"
    assert ckpt["model"]["features.0.weight"].device.type == "cpu"
    state = torch.get_rng_state()
    set_rng_state({"torch": ckpt["rng"]["torch"]}, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), ckpt["rng"]["torch"])
    torch.set_rng_state(state)
    with pytest.raises(CheckpointError, match="map_location='cpu'"):
        set_rng_state({"torch": ckpt["rng"]["torch"].to("meta")}, torch.device("cpu"))


def test_rank_state_fallbacks() -> None:
    """A one-process checkpoint resumed on 2 ranks: rank 0 gets its state and window back,
    rank 1 a fresh seed of its own (never rank 0's state)."""
    from types import SimpleNamespace

    from cobkern.training.checkpoint import restore_rank_state

    cfg = _tiny_config()
    saved = torch.manual_seed(123).get_state()
    window = {"loss_sum": 1.5, "correct": 3, "n": 4, "seconds": 0.5}
    ckpt = {"step": 8, "rng": {"torch": saved},
            "rank_state": [{"rng": {"torch": saved}, "log_window": window}]}
    cpu = torch.device("cpu")
    one = SimpleNamespace(rank=0, world=1, main=True)
    assert restore_rank_state(ckpt, cfg, one, cpu) == window
    assert torch.equal(torch.get_rng_state(), saved)
    r0 = SimpleNamespace(rank=0, world=2, main=True)
    assert restore_rank_state(ckpt, cfg, r0, cpu) == window
    r1 = SimpleNamespace(rank=1, world=2, main=False)
    assert restore_rank_state(ckpt, cfg, r1, cpu) is None
    assert not torch.equal(torch.get_rng_state(), saved)
    # a version-1 checkpoint (no per-rank list) still restores its one state
    assert restore_rank_state({"step": 8, "rng": {"torch": saved}}, cfg, one, cpu) is None
    assert torch.equal(torch.get_rng_state(), saved)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"seed": -1}, "seed"), ({"beta1": 1.5}, "beta1"), ({"beta2": 1.0}, "beta2"),
    ({"beta1": -0.1}, "beta1"), ({"momentum": -0.5}, "momentum"),
    ({"label_smoothing": 1.5}, "label_smoothing"), ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"width": float("inf")}, "width"), ({"width": float("nan")}, "width"),
    ({"lr": float("inf")}, "lr"), ({"weight_decay": float("inf")}, "weight_decay"),
    ({"grad_clip": float("nan")}, "grad_clip"),
    # torch's 64-bit seeds / 32-bit thread counts: these failed in train() after the data
    ({"seed": 2**64}, "seed"), ({"seed": 2**63}, "seed"), ({"num_threads": 2**31}, "num_threads")])
def test_config_validation_names_the_field(overrides, field) -> None:
    from cobkern.training import ConfigError, apply_overrides

    with pytest.raises(ConfigError, match=rf"^{field} must be"):
        apply_overrides(_tiny_config(), overrides)


def test_cli_rejects_bad_values_before_writing(tmp_path, capsys) -> None:
    for flags, field in ((["--seed", "-1"], "seed"), (["--beta1", "1.5"], "beta1"),
                         (["--width", "inf"], "width"),
                         (["--momentum", "-0.5", "--arch", "relu"], "momentum")):
        out = tmp_path / field
        assert main(["--preset", "quick", *flags, "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {field} must be") and "Traceback" not in err
        assert not out.exists()


def test_config_values_are_not_coerced_silently() -> None:
    from cobkern.training import ConfigError, apply_overrides

    cfg = _tiny_config()
    for bad in ({"augment": 2}, {"fused": 7}, {"augment": "maybe"}, {"augment": 1.0},
                {"cache_dir": False}, {"data_root": 5}, {"device": 0},
                {"optimizer": ["adamw"]}, {"lr": True}, {"steps": False}, {"steps": 2.5},
                {"lr": "fast"}, {"lr": None}, {"steps": [3]}, {"seed": {"a": 1}}):
        (name,) = bad
        with pytest.raises(ConfigError, match=f"bad value for {name}"):
            apply_overrides(cfg, bad)
    ok = apply_overrides(cfg, {"augment": False, "fused": 0, "bf16": "off", "download": 1,
                               "cache_dir": None, "data_root": "/data", "lr": "3e-4",
                               "steps": 1e3, "batch_size": "32", "width": 1})
    assert (ok.augment, ok.fused, ok.bf16, ok.download) == (False, False, False, True)
    assert (ok.cache_dir, ok.data_root, ok.lr, ok.steps, ok.batch_size) == \
        (None, "/data", 3e-4, 1000, 32)
    assert ok.width == 1.0 and isinstance(ok.width, float)


@pytest.mark.parametrize(("field", "value", "words"), [
    ("augment", "false", "true or false"), ("bf16", "off", "true or false"),
    ("batch_size", 2.5, "an integer"), ("eval_every", 0.5, "an integer"),
    ("steps", True, "an integer"), ("lr", "1e-3", "a number"), ("lr", True, "a number"),
    ("device", 0, "a string"), ("data_root", 5, "a string or None"),
    ("device", "cuda:x", "auto, cpu or cuda"), ("device", "cudafoo", "auto, cpu or cuda")])
def test_a_config_built_in_python_is_type_checked(field, value, words) -> None:
    """TrainConfig(...) skips the strict coercion of files and flags: the string "false"
    (truthy) turned augmentation and bf16 *on*, batch_size=2.5 failed deep in the loader,
    eval_every=0.5 evaluated at every step, and lr="1e-3" failed with a bare TypeError."""
    from cobkern.training import ConfigError

    with pytest.raises(ConfigError, match=rf"^{field} must be {words}"):
        _tiny_config(**{field: value})
    for dev in ("cuda", "cuda:1", "auto"):  # well-formed (whether present is checked later)
        assert TrainConfig(device=dev).validate().device == dev
    ok = _tiny_config(lr=1, batch_size=np.int64(8), width=np.float32(0.0625), data_root=None)
    assert ok.lr == 1 and type(ok.batch_size) is int and ok.batch_size == 8  # stored as int
    assert type(ok.width) is float and json.dumps(ok.to_dict())  # JSON can write it


def test_non_finite_metrics_are_written_as_null(tmp_path) -> None:
    """A diverged run (NaN weights) still writes strict JSON: NaN/inf become null."""
    from cobkern.training.metrics import json_line, trim_metrics

    assert json_line({"loss": float("nan"), "x": [float("inf"), 1.0]}) == \
        '{"loss": null, "x": [null, 1.0]}'
    data = _toy_data()
    torch.manual_seed(0)
    model = vgg16_tsra(num_classes=4, width=0.0625)
    with torch.no_grad():
        model.classifier[-1].bias.fill_(float("nan"))
    with cobkern.use_backend("reference"):
        res = train(_tiny_config(steps=2), tmp_path / "nan", model=model, data=data)
    assert math.isnan(res["train_loss"])

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))

    lines = [strict(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines if r["event"] == "train"] == [None]
    assert [r["test_loss"] for r in lines if r["event"] == "eval"] == [None]
    final = strict((tmp_path / "nan" / "final.json").read_text())
    assert final["train_loss"] is None and final["test_loss"] is None
    # the resume-time trimming reads such lines (and skips torn or foreign ones)
    m = tmp_path / "m.jsonl"
    m.write_text('{"step": 2, "loss": null}\n[1, 2]\n{"step": null}\n{"step": 5}\n{"st')
    trim_metrics(m, 4)
    assert m.read_text() == '{"step": 2, "loss": null}\n'


def test_atomic_path_syncs_before_the_rename(tmp_path, monkeypatch) -> None:
    import stat

    import cobkern._atomic as atomic

    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(st.st_mode) else st.st_size))
        real_fsync(fd)

    def replace(a, b) -> None:
        events.append(("replace",))
        real_replace(a, b)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    target = tmp_path / "sub" / "f.txt"
    with atomic.atomic_path(target) as tmp:
        tmp.write_text("hello")
    assert target.read_text() == "hello"
    assert events[:2] == [("fsync", 5), ("replace",)]  # the data is on disk before the rename
    if os.name == "posix":
        assert events[2:] == [("fsync", "dir")]
    events.clear()
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError
    assert target.read_text() == "hello" and events == []
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]


def test_ddp_relu_model_is_evaluated_with_the_saved_batchnorm_statistics(tmp_path) -> None:
    """After a DDP step every rank holds the BatchNorm running statistics of its own shard
    (DDP broadcasts rank 0's only at the next forward): the reported test metrics mixed
    each rank's statistics, so re-evaluating the saved model gave another loss (2.2477
    reported vs 2.2158 measured in an audit), and ranks_in_sync compared parameters only.
    Both evaluations run the same float32 code on the same 16 images: 1e-6 covers the order
    of the per-rank partial sums."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun not available")
    _write_folder(tmp_path / "tree")
    env = dict(os.environ, OMP_NUM_THREADS="1", COBKERN_CACHE=str(tmp_path / "cache"))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "cobkern.training",
           "--preset", "quick", "--arch", "relu", "--data-root", str(tmp_path / "tree"),
           "--width", "0.0625", "--num-classes", "4", "--steps", "3", "--batch-size", "8",
           "--train-subset", "0", "--no-progress", "--device", "cpu", "--out",
           str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["ranks_in_sync"] is True
    _, test = load_cifar10("imagefolder", tmp_path / "tree", tmp_path / "cache")
    again = evaluate(load_model(final["model_path"]), test, batch_size=8)
    assert again["loss"] == pytest.approx(final["test_loss"], rel=1e-6, abs=1e-6)
    assert again["accuracy"] == final["test_accuracy"]


@pytest.mark.parametrize("under", [False, True])
def test_out_that_is_a_file_is_one_error_line_before_any_data(tmp_path, capsys, under) -> None:
    """--out naming a file (or a folder under one) ended in a FileExistsError /
    NotADirectoryError traceback, after the data had been loaded for nothing."""
    f = tmp_path / "afile"
    f.write_text("")
    out = f / "run" if under else f
    argv = ["--preset", "quick", "--data-root", str(tmp_path / "no-data-needed"),
            "--steps", "1", "--no-progress", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: run directory {out}: {f} exists and is not a directory; " \
                  "choose another --out\n"


def test_lr_schedule_reaches_min_lr_and_constant_stays_flat() -> None:
    cfg = _tiny_config(steps=100, warmup_steps=10, lr=2.0, min_lr=0.5)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx((1.0 + 0.25) / 2)  # half-way: mean of 1, m
    assert lr_factor(100, cfg) == pytest.approx(0.25)  # min_lr / lr at the last step
    assert lr_factor(1000, cfg) == pytest.approx(0.25)  # and after it
    const = _tiny_config(steps=100, warmup_steps=10, schedule="constant", min_lr=0.5)
    assert [lr_factor(s, const) for s in (0, 4, 9, 10, 50, 100)] == \
        pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0, 1.0])


def _spec_lr(s: int, cfg: TrainConfig) -> float:
    """method.md §3, written out independently of ``lr_factor``: the learning rate of
    optimizer step ``s + 1`` (linear warm-up, then cosine from lr to min_lr at ``steps``)."""
    if s < cfg.warmup_steps:
        return cfg.lr * (s + 1) / cfg.warmup_steps
    t = min(1.0, (s - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_training_loop_matches_a_hand_written_reference(tmp_path, optimizer) -> None:
    """The trainer's weights and train metrics equal a plain PyTorch loop written from the
    spec: every setting set away from its default (nesterov, weight decay, beta2, label
    smoothing, an active grad clip before the step, warm-up and cosine to a non-zero
    min_lr), and 5 steps logged every 2 so the last window is a partial one."""
    from cobkern.data import DeviceLoader

    cfg = _tiny_config(optimizer=optimizer, steps=5, warmup_steps=2, log_every=2,
                       eval_every=1000, checkpoint_every=0, weight_decay=0.3,
                       label_smoothing=0.2, grad_clip=0.05, min_lr=1e-3, seed=3,
                       optimizer_impl="for-loop",  # the loop below: PyTorch's CPU default
                       **(dict(lr=3e-3, beta2=0.95) if optimizer == "adamw" else
                          dict(lr=0.05, momentum=0.8, nesterov=True)))
    data = _toy_data()
    torch.manual_seed(0)
    model = vgg16_tsra(num_classes=4, width=0.0625)
    ref = copy.deepcopy(model)
    with cobkern.use_backend("reference"):
        res = train(cfg, tmp_path / "run", model=model, data=data)

        loader = DeviceLoader.from_imageset(data[0], cfg.batch_size, augment=True,
                                            shuffle=True, drop_last=True, seed=cfg.seed)
        params = list(ref.parameters())
        if optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=1.0, betas=(0.9, 0.95), weight_decay=0.3)
        else:
            opt = torch.optim.SGD(params, lr=1.0, momentum=0.8, nesterov=True,
                                  weight_decay=0.3)
        torch.manual_seed(cfg.seed)  # the dropout masks of a one-process run
        ref.train()
        losses, correct, clipped = [], [], []
        batches = (b for _ in range(cfg.steps) for b in loader)  # epoch after epoch
        for s in range(cfg.steps):
            x, y = next(batches)
            logits = ref(x)
            loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.2)
            opt.zero_grad()
            loss.backward()
            clipped.append(torch.nn.utils.clip_grad_norm_(params, 0.05).item() > 0.05)
            for group in opt.param_groups:
                group["lr"] = _spec_lr(s, cfg)
            opt.step()
            losses.append(loss.item())
            correct.append((logits.argmax(1) == y).sum().item())
    assert all(clipped)  # the clip is active at every step, so its placement matters
    got = load_model(res["model_path"])
    want = ref.state_dict()
    # Same ops in the same order on the same CPU (bit-identical when written); only the
    # learning rate comes from another, equivalent formula and may differ in its last bit:
    # 1e-6 covers that, while dropping any one of the settings above (or moving the clip or
    # the scheduler step) changes some weight by more than 3e-4 (measured).
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-7,
                                   msg=lambda m, k=k: f"{k}: {m}")
    lines = [r for r in _metric_lines(tmp_path / "run" / "metrics.jsonl")
             if r["event"] == "train"]
    assert [r["step"] for r in lines] == [2, 4, 5]
    windows = [(0, 2), (2, 4), (4, 5)]
    for r, (a, b) in zip(lines, windows, strict=True):
        # the window mean of the per-step batch losses (float64 sums vs Python floats)
        assert r["loss"] == pytest.approx(sum(losses[a:b]) / (b - a), rel=1e-9)
        assert r["accuracy"] == sum(correct[a:b]) / (cfg.batch_size * (b - a))
        # the learning rate step r["step"] used (0-based s = step - 1); it used to log the
        # next step's, ending on min_lr, which no step used
        assert r["lr"] == pytest.approx(_spec_lr(r["step"] - 1, cfg), rel=1e-9)


#: The TrainConfig fields a resume may change (checkpoint.py documents why each one does not
#: change the optimisation); listed here so that adding one is a deliberate change.
_MAY_CHANGE = {"progress", "log_every", "eval_every", "checkpoint_every", "eval_batch_size",
               "num_threads", "device", "compile", "compile_mode", "compile_kernels",
               "channels_last", "fuse_conv_bias", "cache_dir", "download", "optimizer_impl",
               "data_root"}


def test_every_optimisation_setting_is_checked_on_resume() -> None:
    from dataclasses import asdict, fields, replace

    from cobkern.training.checkpoint import RESUME_MAY_CHANGE, setting_change

    assert RESUME_MAY_CHANGE == _MAY_CHANGE
    cfg = _tiny_config()
    saved = asdict(cfg)
    other_text = {"arch": "relu", "optimizer": "sgd", "schedule": "constant",
                  "data_source": "shipped", "device": "cuda"}
    for f in fields(TrainConfig):
        old = getattr(cfg, f.name)
        if isinstance(old, bool):
            new = not old
        elif isinstance(old, (int, float)):
            new = old + 1
        elif f.name in other_text:
            new = other_text[f.name]
        else:
            new = "/elsewhere"  # data_root, cache_dir
        change = setting_change(saved, replace(cfg, **{f.name: new}))
        if f.name in _MAY_CHANGE:
            assert change is None, f.name
        else:
            assert change == (f.name, old, new), f.name


def test_paper_presets_follow_the_method() -> None:
    """method.md §3, the fields test_presets leaves out: the control's weight decay, no
    clipping for the control (§3 lists clipping for the TSRA model only), cosine to 0 for
    both, the standard augmentation and no label smoothing."""
    for arch in ("tsra", "relu"):
        p = get_preset("paper", arch)
        assert (p.weight_decay, p.schedule, p.min_lr, p.label_smoothing, p.augment) == \
            (5e-4, "cosine", 0.0, 0.0, True), arch
        assert (p.batch_size, p.steps) == (1024, 120_000), arch
    assert get_preset("paper", "relu").grad_clip == 0.0
    assert get_preset("paper", "tsra").grad_clip == 1.0


def test_a_hook_that_stops_at_a_checkpoint_step_keeps_that_checkpoint(tmp_path) -> None:
    """on_step runs after the checkpoint of its step: a run stopped by the hook at step 4
    (checkpoint_every=4) can resume from step 4, not from scratch."""
    with cobkern.use_backend("reference"), pytest.raises(_Stop):
        train(_tiny_config(steps=8, checkpoint_every=4), tmp_path / "r", data=_toy_data(),
              on_step=_stop_at(4))
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["step"] == 4


def test_evaluate_scores_the_whole_set_from_any_loader_position() -> None:
    """A loader passed to evaluate() scores every image once, un-augmented (a partly
    consumed, shuffled, augmenting, tail-dropping training loader too: it used to score
    augmented images and skip the tail), leaves the loader where it was (it used to reset
    it to epoch 0 and leave it at epoch 1), and the model's mode is restored."""
    from cobkern.data import DeviceLoader

    _, test = _toy_data(n_test=20)
    torch.manual_seed(0)
    model = vgg16_tsra(num_classes=4, width=0.0625)
    with cobkern.use_backend("reference"):
        want = evaluate(model, test, batch_size=20)
        for augment, drop_last in ((False, False), (True, True)):
            loader = DeviceLoader.from_imageset(test, 8, augment=augment, shuffle=True,
                                                drop_last=drop_last, seed=1)
            loader.load_state_dict({"epoch": 5, "batch": 1})  # a training loader's position
            got = evaluate(model, loader)
            assert model.training  # restored
            assert (loader.epoch, loader.batch) == (5, 1)  # the caller's position kept
            assert got["n"] == 20 == want["n"]
            # batches of 8 sum the same per-image losses in another grouping (float64)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
            assert got["accuracy"] == want["accuracy"]
        model.eval()
        evaluate(model, test)
        assert not model.training


def test_compile_mode_reaches_torch_compile_and_marks_cuda_graph_steps(tmp_path,
                                                                       monkeypatch) -> None:
    """compile_mode is torch.compile's mode (``default``: none passed); with a CUDA-graph
    mode every step starts with ``cudagraph_mark_step_begin`` (a replay may overwrite the
    previous step's outputs). torch.compile is replaced by a recorder: what is tested is
    the trainer's plumbing, not Inductor."""
    seen, marks = [], []

    def fake_compile(module, **kw):
        seen.append(kw)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    data = _toy_data()
    with cobkern.use_backend("reference"):
        train(_tiny_config(steps=3, compile=True), tmp_path / "a", data=data)
        train(_tiny_config(steps=3, compile=True, compile_mode="reduce-overhead"),
              tmp_path / "b", data=data)
    assert seen == [{"mode": None}, {"mode": "reduce-overhead"}]
    assert len(marks) == 3
    with pytest.raises(ConfigError, match="compile_mode must be one of"):
        _tiny_config(compile_mode="fastest")


def test_compile_kernels_is_set_for_the_run_and_restored(tmp_path) -> None:
    """compile_kernels is the process-wide :func:`cobkern.ops.set_compile_kernels` while
    the run traces and trains (recorded at every step), and the previous value afterwards;
    a bad value is refused with the options named."""
    from cobkern.ops import get_compile_kernels

    steps: list[str] = []
    data = _toy_data()
    before = get_compile_kernels()
    other = "opaque" if before == "inline" else "inline"
    with cobkern.use_backend("reference"):
        train(_tiny_config(steps=2, compile_kernels=other), tmp_path / "a", data=data,
              on_step=lambda s: steps.append(get_compile_kernels()))
    assert steps == [other, other]
    assert get_compile_kernels() == before
    with pytest.raises(ConfigError, match="compile_kernels must be one of auto, opaque, inline"):
        _tiny_config(compile_kernels="fused")


def test_cuda_graph_compile_modes_are_refused_with_several_processes(tmp_path) -> None:
    """reduce-overhead / max-autotune replay CUDA graphs, which the trainer does not support
    under DistributedDataParallel: refused before any data or model is touched, naming the
    modes that work (a stand-in for a two-rank context: no process group is started)."""
    import types

    from cobkern.training.trainer import _train

    d = types.SimpleNamespace(active=True, world=2, rank=0, main=True)
    for mode in ("reduce-overhead", "max-autotune"):
        cfg = _tiny_config(compile=True, compile_mode=mode, batch_size=16)
        with pytest.raises(ConfigError, match="max-autotune-no-cudagraphs"):
            _train(cfg, tmp_path / mode, tmp_path / mode / "ckpt.pt", False, None, None, None,
                   d)
        assert not (tmp_path / mode).exists()


def test_optimizer_impl_picks_the_step_implementation() -> None:
    """``optimizer_impl`` reaches AdamW and SGD as their ``fused`` / ``foreach`` flags;
    ``auto`` is fused for CPU float parameters. Bad values are refused by name."""
    from cobkern.training.optim import build_optimizer, implementation_flags

    model = torch.nn.Linear(3, 2)
    want = {"auto": (True, None), "fused": (True, None), "foreach": (None, True),
            "for-loop": (None, False)}
    for opt_name in ("adamw", "sgd"):
        for impl, flags in want.items():
            opt = build_optimizer(model, _tiny_config(optimizer=opt_name, optimizer_impl=impl))
            g = opt.param_groups[0]
            assert (g["fused"], g["foreach"]) == flags, (opt_name, impl)
    # not fusable (an integer tensor): auto falls back to PyTorch's own default
    assert implementation_flags([torch.zeros(2, dtype=torch.int64)], "auto") == \
        {"fused": None, "foreach": None}
    with pytest.raises(ConfigError, match="optimizer_impl must be one of auto, fused"):
        _tiny_config(optimizer_impl="apex")


def test_fused_and_foreach_steps_agree() -> None:
    """The implementations compute the same update: ten AdamW steps (and SGD-Nesterov
    steps) on the same gradients agree to float32 rounding (rtol 1e-5: the kernels order
    the same per-element operations differently)."""
    from cobkern.training.optim import build_optimizer

    for opt_name in ("adamw", "sgd"):
        results = []
        for impl in ("fused", "foreach", "for-loop"):
            torch.manual_seed(0)
            model = torch.nn.Linear(16, 8)
            opt = build_optimizer(model, _tiny_config(optimizer=opt_name, optimizer_impl=impl))
            for i in range(10):
                torch.manual_seed(100 + i)
                for p in model.parameters():
                    p.grad = torch.randn_like(p)
                opt.step()
            results.append([p.detach().clone() for p in model.parameters()])
        for other in results[1:]:
            for a, b in zip(results[0], other, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_may_switch_the_optimizer_implementation(tmp_path) -> None:
    """A run checkpointed with foreach AdamW resumes fused (the step counters move to the
    fused kernel's layout) and ends where an uninterrupted fused run ends, to float32
    rounding of the steps before the switch (rtol 1e-4 on the weights after 8 steps)."""
    data = _toy_data()

    def stop_at_4(step: int) -> None:
        if step == 4:
            raise _Stop

    with cobkern.use_backend("reference"):
        ref = train(_tiny_config(steps=8, optimizer_impl="fused"), tmp_path / "a", data=data)
        with pytest.raises(_Stop):
            train(_tiny_config(steps=8, optimizer_impl="foreach"), tmp_path / "b", data=data,
                  on_step=stop_at_4)
        res = train(_tiny_config(steps=8, optimizer_impl="fused"), tmp_path / "b", data=data,
                    resume=True)
    assert res["steps"] == 8
    a = load_model(ref["model_path"]).state_dict()
    b = load_model(res["model_path"]).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    # what makes the switch: the loaded groups keep this run's flags (a plain
    # load_state_dict would restore the checkpoint's foreach)
    from cobkern.training.optim import build_optimizer, load_optimizer_state

    model = torch.nn.Linear(3, 2)
    saved = build_optimizer(model, _tiny_config(optimizer_impl="foreach"))
    model.weight.grad, model.bias.grad = torch.ones(2, 3), torch.ones(2)
    saved.step()
    opt = build_optimizer(model, _tiny_config(optimizer_impl="fused"))
    load_optimizer_state(opt, saved.state_dict())
    assert (opt.param_groups[0]["fused"], opt.param_groups[0]["foreach"]) == (True, None)
    assert opt.state[model.weight]["step"].item() == 1
    plain = build_optimizer(model, _tiny_config(optimizer_impl="fused"))
    plain.load_state_dict(saved.state_dict())
    assert plain.param_groups[0]["foreach"] is True  # the control


def test_resume_with_other_training_images_is_an_error(tmp_path) -> None:
    """Same settings, other data (another COBKERN_DATA, files replaced): the checkpoint
    records a fingerprint of the training images and labels and refuses them."""
    data = _toy_data()
    # the same images, relabelled
    other = ImageSet(data[0].images, data[0].labels.flip(0), data[0].classes)
    cfg = _tiny_config(steps=8)
    with cobkern.use_backend("reference"):
        with pytest.raises(_Stop):
            train(cfg, tmp_path / "r", data=data, on_step=_stop_at(6))
        with pytest.raises(CheckpointError, match="written for other training images"):
            train(cfg, tmp_path / "r", data=(other, data[1]), resume=True)
        assert train(cfg, tmp_path / "r", data=data, resume=True)["steps"] == 8


def test_min_lr_above_lr_is_refused_under_the_cosine_schedule() -> None:
    with pytest.raises(ConfigError, match=r"min_lr \(0.01\) must not exceed lr"):
        _tiny_config(lr=2e-3, min_lr=0.01)
    assert _tiny_config(lr=2e-3, min_lr=1e-3).min_lr == 1e-3


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def test_a_resume_removes_the_temporary_file_of_a_killed_checkpoint_write(tmp_path) -> None:
    """A kill during the checkpoint's write leaves ``.checkpoint.pt.tmp-<host>-<pid>``
    (weights and optimizer state: ~400 MB at full width); the next run in that folder
    removes it — but not the file of a live writer or of another machine's."""
    from cobkern import _atomic
    from cobkern.training.trainer import CHECKPOINT_NAME

    data = _toy_data()
    cfg = _tiny_config(steps=8)
    host, dead = _atomic._host(), _dead_pid()
    with cobkern.use_backend("reference"):
        with pytest.raises(_Stop):
            train(cfg, tmp_path / "r", data=data, on_step=_stop_at(6))
        stale = [tmp_path / "r" / f".{CHECKPOINT_NAME}.tmp-{dead}",
                 tmp_path / "r" / f".{CHECKPOINT_NAME}.tmp-{host}-{dead}"]
        kept = [tmp_path / "r" / f".{CHECKPOINT_NAME}.tmp-{host}-{os.getppid()}",
                tmp_path / "r" / f".{CHECKPOINT_NAME}.tmp-otherhost-{dead}"]
        for p in stale + kept:
            p.write_bytes(b"half a checkpoint")
        train(cfg, tmp_path / "r", data=data, resume=True)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


def test_num_threads_is_set_for_the_run_only(tmp_path) -> None:
    """torch.set_num_threads stayed in effect after train() returned (or failed), so a
    later run with num_threads=0 ("torch's default") inherited this run's count."""
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    seen: list[int] = []
    with cobkern.use_backend("reference"):
        train(_tiny_config(steps=2, num_threads=want), tmp_path / "a", data=_toy_data(),
              on_step=lambda s: seen.append(torch.get_num_threads()))
    assert seen == [want, want] and torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="stop here"):
        def stop(_s):
            raise RuntimeError("stop here")
        with cobkern.use_backend("reference"):
            train(_tiny_config(steps=2, num_threads=want), tmp_path / "b", data=_toy_data(),
                  on_step=stop)
    assert torch.get_num_threads() == before


def test_a_kill_in_the_final_checkpoint_write_logs_the_final_eval_once(tmp_path,
                                                                       monkeypatch) -> None:
    """With checkpoint_every dividing steps (every preset: 1500/250, ...), a checkpoint is
    written at the final step. The final evaluation came after it, so that checkpoint did
    not record it; killed in the final checkpoint write, the resumed run evaluated again and
    metrics.jsonl kept two eval lines at the last step, for good. The final step is now
    evaluated before its checkpoint, like every other."""
    from cobkern.training import trainer as T

    data = _toy_data()
    cfg = _tiny_config(steps=8, checkpoint_every=4, log_every=2)
    real = T.save_checkpoint_file
    written = []

    def dying(obj, path):
        written.append(obj["step"])
        if len(written) == 3:  # after the step-4 and step-8 checkpoints: the final write
            raise _Stop
        real(obj, path)

    with cobkern.use_backend("reference"):
        train(cfg, tmp_path / "a", data=data)
        monkeypatch.setattr(T, "save_checkpoint_file", dying)
        with pytest.raises(_Stop):
            train(cfg, tmp_path / "b", data=data)
        monkeypatch.setattr(T, "save_checkpoint_file", real)
        train(cfg, tmp_path / "b", data=data, resume=True)
    assert written == [4, 8, 8]
    a = _metric_lines(tmp_path / "a" / "metrics.jsonl")
    b = _metric_lines(tmp_path / "b" / "metrics.jsonl")
    assert [(r["event"], r["step"]) for r in a].count(("eval", 8)) == 1
    assert b == a


def test_train_refuses_a_foreign_model_and_mismatched_classes_before_any_step(tmp_path) \
        -> None:
    """A model that is not a cobkern VGG trained its steps and then failed at the first
    checkpoint (whose model_config records a VGG); given data=, the class count was not
    checked (4 classes into a 10-way head trained silently; 6 classes into a 4-way head
    failed inside the loss). Both are ConfigErrors now, before step 1."""
    steps: list[int] = []
    data = _toy_data()
    foreign = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    with pytest.raises(ConfigError, match="needs a cobkern VGG model.*Sequential"):
        train(_tiny_config(), tmp_path / "a", data=data, model=foreign, on_step=steps.append)
    with pytest.raises(ConfigError, match="10 outputs but the data has 4 classes"):
        train(_tiny_config(num_classes=10), tmp_path / "b", data=data, on_step=steps.append)
    six = [ImageSet(s.images, torch.arange(len(s.labels)) % 6, list("abcdef")) for s in data]
    with pytest.raises(ConfigError, match="4 outputs but the data has 6 classes"):
        train(_tiny_config(), tmp_path / "c", data=tuple(six), on_step=steps.append)
    assert steps == []
    assert not any((tmp_path / d).exists() for d in "abc")


def test_evaluate_puts_back_each_submodules_own_mode() -> None:
    """A training model with frozen (eval-mode) Dropout layers: evaluate restored only the
    top-level flag (``model.train(True)``), which switched the frozen layers back on."""
    model = vgg16_tsra(num_classes=4, width=0.0625)
    frozen = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert frozen
    for m in frozen:
        m.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    with cobkern.use_backend("reference"):
        evaluate(model, _toy_data(8, 8)[1], batch_size=8)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.training and not any(m.training for m in frozen)


@pytest.mark.parametrize("key", ["preset", "arch"])
def test_a_config_file_naming_a_preset_or_arch_that_is_not_a_string_is_one_line(
        tmp_path, capsys, key) -> None:
    """``{"preset": ["quick"]}`` raised TypeError (unhashable list) with a traceback."""
    f = tmp_path / "c.json"
    f.write_text(json.dumps({key: ["quick" if key == "preset" else "tsra"]}))
    assert main(["--config", str(f), "--print-config"]) == 2
    assert f"unknown {key} ['" in capsys.readouterr().err


def test_a_run_resumes_from_a_copy_of_its_data_elsewhere(tmp_path) -> None:
    """data_root had to stay the same on resume, so the same data copied elsewhere (a
    cluster job's $TMPDIR) was refused. The checkpoint's fingerprints of the training and
    (now also) the test images decide: a copy resumes, bit-identical; other test images
    are refused."""
    data = _toy_data()
    cfg = _tiny_config(steps=8, data_root=str(tmp_path / "here"))
    moved = dataclasses.replace(cfg, data_root=str(tmp_path / "elsewhere"))
    with cobkern.use_backend("reference"):
        ref = train(cfg, tmp_path / "a", data=data)
        with pytest.raises(_Stop):
            train(cfg, tmp_path / "r", data=data, on_step=_stop_at(6))
        other_test = ImageSet(data[1].images.flip(0), data[1].labels.flip(0), data[1].classes)
        with pytest.raises(CheckpointError, match="written for other test images"):
            train(moved, tmp_path / "r", data=(data[0], other_test), resume=True)
        res = train(moved, tmp_path / "r", data=data, resume=True)
    assert res["train_loss"] == ref["train_loss"] and res["test_loss"] == ref["test_loss"]


def test_evaluate_refuses_a_rank_slice_without_a_process_group() -> None:
    """A loader for rank 0 of 2 without torch.distributed scored that rank's half of the
    test images (n=16 of 32) as if it were the whole."""
    from cobkern.data import DeviceLoader

    _, test = _toy_data(8, 32)
    model = vgg16_tsra(num_classes=4, width=0.0625)
    half = DeviceLoader.from_imageset(test, 8, augment=False, shuffle=False, drop_last=False,
                                      rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank 0's slice of 2.*no torch.distributed"):
        evaluate(model, half)
    whole = DeviceLoader.from_imageset(test, 8, augment=False, shuffle=False, drop_last=False)
    with cobkern.use_backend("reference"):
        assert evaluate(model, whole)["n"] == 32


def test_a_temporary_file_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path) \
        -> None:
    """SIGKILL inside an atomic write (after the temporary file is written, before the
    rename) runs no cleanup: ``.calibration.pt.tmp-<pid>`` (the size of the real file)
    stayed beside it for good. The next write of the same file removes such files of dead
    processes on this machine — not a live writer's, not another machine's."""
    from cobkern import _atomic
    from cobkern._atomic import atomic_path

    dead = _dead_pid()
    target = tmp_path / "calibration.pt"
    host = _atomic._host()
    stale = [tmp_path / f".calibration.pt.tmp-{host}-{dead}",
             tmp_path / f".calibration.pt.tmp-{dead}"]  # the name before hosts were in it
    kept = [tmp_path / f".calibration.pt.tmp-{host}-{os.getppid()}",  # a live process
            tmp_path / f".calibration.pt.tmp-otherhost-{dead}",  # another machine's
            tmp_path / f".other.pt.tmp-{host}-{dead}"]  # another file's (its own write)
    for p in stale + kept:
        p.write_bytes(b"x" * 100)
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
