"""Trainer: presets, config resolution, resume, errors, evaluation and 2-process DDP (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import cobkern
from cobkern.data import ImageSet
from cobkern.models import load_model, model_config, vgg16_tsra
from cobkern.training import (
    CheckpointError,
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


def test_ddp_two_gloo_processes_stay_in_sync(tmp_path) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun not available")
    _write_folder(tmp_path / "tree")
    env = dict(os.environ, OMP_NUM_THREADS="1", COBKERN_CACHE=str(tmp_path / "cache"))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "cobkern.training",
           "--preset", "quick", "--data-root", str(tmp_path / "tree"), "--width", "0.0625",
           "--num-classes", "4", "--steps", "4", "--batch-size", "8", "--train-subset", "0",
           "--checkpoint-every", "2", "--no-progress", "--device", "cpu", "--out",
           str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["world_size"] == 2
    assert final["ranks_in_sync"] is True
    assert final["steps"] == 4 and 0 <= final["test_accuracy"] <= 1
    # 32 training images, global batch 8 → 4 steps per epoch.
    assert final["epochs"] == 1
