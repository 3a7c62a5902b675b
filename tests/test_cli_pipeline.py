"""End to end: a tiny version of `cobkern run --preset quick`, through the real CLI.

The data are a tiny synthetic ImageFolder (10 classes), the model a width-1/16 TSRA VGG
trained for a few steps. The checks hold whatever the training gave: every file is written
and consistent, parameter counts match the pruned models, CoB at P = 0 and lossless
(rank-tolerance) pruning leave the predictions unchanged, and the report rebuilds from the
files alone.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from imagefolder_tools import write_imagefolder

from cobkern.cli.main import build_parser, main
from cobkern.experiments import Context, count_params
from cobkern.experiments.files import read_jsonl

N_TRAIN, N_TEST = 24, 12  # per class


@pytest.fixture(scope="module", autouse=True)
def _reference_ops():
    """The pipeline runs the plain-PyTorch ops: under TRITON_INTERPRET=1 (conftest, no GPU)
    the Triton kernels would run in the interpreter, which the kernel tests cover."""
    from cobkern.ops import use_backend

    with use_backend("reference"):
        yield


TRAIN = {"width": 0.0625, "steps": 4, "batch_size": 40, "warmup_steps": 1, "train_subset": 0,
         "eval_batch_size": 60, "checkpoint_every": 0, "log_every": 2}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "data"
    write_imagefolder(data, N_TRAIN, N_TEST)
    out = tmp / "out"
    train = {**TRAIN, "data_source": "imagefolder", "data_root": str(data),
             "cache_dir": str(tmp / "cache")}
    argv = ["run", "--preset", "quick", "--out", str(out), "--no-progress",
            "--set", "train=" + json.dumps(train),
            # the ReLU control (peers): as small, on the same images (not the preset's run
            # on the shipped CIFAR-10, which took most of this module's time)
            "--set", "train_relu_overrides=" + json.dumps(train),
            "--calib-samples", "200", "--eval-subset", "0", "--fractions", "0,0.5,0.9",
            "--importances", "l2,l1", "--finetune-steps", "2",
            "--set", "normalizer_fractions=[0.5]",
            "--set", 'thresholds=[["max", 0.1]]',
            "--set", 'finetune={"steps": 2, "batch_size": 40, "warmup_steps": 1, '
                     '"train_subset": 0}',
            "--set", "peer_fractions=[0.5]", "--set", 'peer_criteria=["l2"]',
            "--set", "speed_fractions=[0.5]", "--set", "speed_batches=[1, 8]",
            "--set", "speed_repeats=1"]
    assert main(argv) == 0
    return out


def _records(out: Path) -> list[dict]:
    return read_jsonl(out / "metrics.jsonl")


def test_every_file_is_written(run_dir: Path) -> None:
    for rel in ["config.json", "train/final.json", "train/metrics.jsonl", "calibration.pt",
                "calibration-rotated.pt", "metrics.jsonl", "summary.json", "report.md",
                "run.json", "tables/fixed_ratio.csv", "tables/frontier.csv",
                "tables/threshold_finetune.csv", "tables/peers.csv",
                "tables/lossless_layers.csv", "tables/speed.csv", "tables/published.csv",
                "figures/accuracy_vs_pruned.png", "figures/normalizer.png",
                "figures/eigen_spectra.png", "figures/kept_channels.png",
                "figures/threshold_finetune.png", "figures/peers.png", "figures/speed.png"]:
        assert (run_dir / rel).is_file(), rel
    assert any((run_dir / "train" / n).is_file() for n in ("model.safetensors", "model.pt"))
    for png in (run_dir / "figures").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run_dir / "report.md").read_text()
    for png in (run_dir / "figures").glob("*.png"):
        assert f"figures/{png.name}" in report
    assert "reliable frontier" in report.lower() and "15 M" in report
    assert not list(run_dir.rglob(".*.tmp-*"))  # no leftovers of atomic writes


def test_config_and_records_are_consistent(run_dir: Path) -> None:
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["experiment"]["preset"] == "quick"
    assert cfg["training"]["width"] == 0.0625
    recs = _records(run_dir)
    keys = [r["key"] for r in recs if "key" in r]
    assert len(keys) == len(set(keys))
    ref = next(r for r in recs if r["key"] == "reference|tsra")
    ctx = Context(run_dir, progress=False)
    n0 = count_params(ctx.model())
    assert ref["params_after"] == n0
    fixed = [r for r in recs if r.get("strategy") == "param_target" and not r["finetuned"]]
    # 2 importances x 2 methods x 3 fractions + the normaliser experiment's "original" points
    assert len([r for r in fixed if r["normalizer"] == "kept"]) == 12
    assert len([r for r in fixed if r["normalizer"] == "original"]) == 2
    for r in fixed:
        assert r["params_before"] == n0
        assert r["fraction_pruned"] == pytest.approx((n0 - r["params_after"]) / n0)
        assert r["n_eval"] == 10 * N_TEST
    for imp in ("l2", "l1"):
        for method in ("cob", "baseline"):
            pts = sorted((r for r in fixed if r["importance"] == imp and r["method"] == method
                          and r["normalizer"] == "kept"), key=lambda r: r["target"])
            assert [r["target"] for r in pts] == [0.0, 0.5, 0.9]
            assert pts[0]["fraction_pruned"] == 0.0
            assert pts[0]["accuracy"] == pytest.approx(ref["accuracy"], abs=1 / ref["n_eval"])
            assert pts[0]["fraction_pruned"] < pts[1]["fraction_pruned"] \
                < pts[2]["fraction_pruned"]
    # CoB and baseline prune the same counts per subspace at a fixed ratio
    by = {(r["method"], r["importance"], r["target"]): r for r in fixed
          if r["normalizer"] == "kept"}
    assert by[("cob", "l2", 0.9)]["params_after"] == by[("baseline", "l2", 0.9)]["params_after"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["unpruned_accuracy"] == ref["accuracy"]
    assert summary["unpruned_params"] == n0
    with open(run_dir / "tables" / "fixed_ratio.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(fixed)


def test_parameter_counts_match_the_pruned_models(run_dir: Path) -> None:
    ctx = Context(run_dir, progress=False)
    recs = _records(run_dir)
    checked = 0
    for r in recs:
        if r.get("experiment") not in ("fixed", "normalizer", "lossless", "threshold"):
            continue
        model, report = ctx.prune((r["strategy"], r["value"]), importance=r["importance"],
                                  cob=r["method"] == "cob", normalizer=r["normalizer"])
        assert count_params(model) == r["params_after"] == report.total_after, r["key"]
        widths = {x["name"]: x["after"] for x in r["layers"]}
        for lay in report.layers:
            assert widths[lay.name] == lay.channels_after
        checked += 1
    assert checked >= 16
    speed = [r for r in recs if r.get("experiment") == "speed"]
    assert {r["method"] for r in speed} == {"unpruned", "cob"}
    assert all(r["latency_ms"] > 0 and r["throughput"] > 0 for r in speed)
    pruned = next(r for r in speed if r["method"] == "cob")
    unpruned = next(r for r in speed if r["method"] == "unpruned")
    assert pruned["params"] < unpruned["params"] and pruned["flops"] < unpruned["flops"]


def test_lossless_pruning_leaves_predictions_unchanged(run_dir: Path) -> None:
    rec = next(r for r in _records(run_dir) if r.get("experiment") == "lossless")
    assert rec["agreement"] == 1.0
    assert rec["max_logit_diff"] <= 1e-4 * max(1.0, rec["logit_scale"])  # float32 round-off
    # the first hidden classifier layer (width 256, input 32) saturates at 2 * (32 + 1)
    first = next(x for x in rec["layers"] if x["name"] == "classifier.1")
    bound = rec["saturation_bound"]["classifier.1"]
    assert bound == 66
    assert first["before"] == 256 and first["after"] == bound
    assert rec["fraction_pruned"] > 0
    # independently: rebuild it and compare logits with the unpruned model
    ctx = Context(run_dir, progress=False)
    model, _ = ctx.prune(("lossless", rec["value"]), importance="l2", cob=True,
                         normalizer="original")
    a, b = ctx.logits(model), ctx.logits(ctx.model())
    assert torch.equal(a.argmax(1), b.argmax(1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_threshold_and_peer_records_are_finetuned(run_dir: Path) -> None:
    recs = _records(run_dir)
    th = [r for r in recs if r.get("experiment") == "threshold"]
    assert {r["method"] for r in th} == {"cob", "baseline"}
    peers = [r for r in recs if r.get("experiment") == "peers"]
    assert {r["method"] for r in peers} == {"cob", "tp-l2"}
    for r in th + peers:
        assert r["finetuned"] and r["finetune_steps"] == 2
        assert 0.0 <= r["accuracy_before_ft"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
    tp = next(r for r in peers if r["method"] == "tp-l2")
    assert tp["fraction_pruned"] == pytest.approx(0.5, abs=0.1)


def test_report_rebuilds_without_recomputing(run_dir: Path) -> None:
    before = (run_dir / "report.md").read_text()
    n_records = len(_records(run_dir))
    mtime = (run_dir / "metrics.jsonl").stat().st_mtime_ns
    for p in (run_dir / "figures").glob("*.png"):
        p.unlink()
    (run_dir / "report.md").unlink()
    assert main(["report", "--out", str(run_dir)]) == 0
    assert (run_dir / "report.md").read_text() == before
    assert (run_dir / "figures" / "accuracy_vs_pruned.png").is_file()
    assert len(_records(run_dir)) == n_records
    assert (run_dir / "metrics.jsonl").stat().st_mtime_ns == mtime


def test_rerunning_run_skips_done_work(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    n = len(_records(run_dir))
    assert main(["run", "--preset", "quick", "--out", str(run_dir), "--no-progress"]) == 0
    assert len(_records(run_dir)) == n
    # --no-progress hides the bars, not the stage lines: a log still says what was reused
    # and where the report is
    out = capsys.readouterr().out
    assert "[cobkern] tsra model already trained" in out
    assert f"[cobkern] report: {run_dir / 'report.md'}" in out


def test_prune_finetune_evaluate_commands(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(run_dir)
    assert main(["prune", "--out", out, "--strategy", "param_target", "--value", "0.5",
                 "--name", "p50", "--no-progress"]) == 0
    info = json.loads((run_dir / "pruned" / "p50" / "prune.json").read_text())
    from cobkern.models import load_model

    files = [p for p in (run_dir / "pruned" / "p50").iterdir() if p.name.startswith("model.")]
    model = load_model(files[0])
    assert count_params(model) == info["total_after"]
    assert main(["finetune", "--out", out, "--name", "p50", "--steps", "1",
                 "--no-progress"]) == 0
    assert (run_dir / "pruned" / "p50" / "finetune" / "final.json").is_file()
    assert main(["evaluate", "--out", out, "--name", "p50", "--no-progress"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["prune", "--out", out, "--strategy", "lossless", "--value", "1e-6",
                 "--baseline", "--no-progress"]) == 2  # eigenvalue rules need CoB
    assert "rotated basis" in capsys.readouterr().err


def test_missing_previous_step_names_the_command(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "empty")
    assert main(["calibrate", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "cobkern train --out" in err and "model" in err
    assert main(["sweep", "--out", out]) == 2
    assert "cobkern train --out" in capsys.readouterr().err
    assert main(["report", "--out", out]) == 2
    assert "cobkern sweep --out" in capsys.readouterr().err
    assert main(["finetune", "--out", out, "--name", "nope"]) == 2
    assert "cobkern prune" in capsys.readouterr().err


def test_pipeline_refuses_several_processes(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # under torchrun every rank would write (and delete) the same output folder
    out = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["finetune", "--out", str(out), "--name", "p"]) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2" in err and "-m cobkern.training" in err
    assert not out.exists()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["finetune", "--out", str(out), "--name", "p"]) == 2
    assert "WORLD_SIZE" not in capsys.readouterr().err  # one process: the usual path


def test_missing_calibration_names_the_command(run_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    import shutil

    out = tmp_path / "nocal"
    shutil.copytree(run_dir / "train", out / "train")
    assert main(["prune", "--out", str(out), "--strategy", "ratio", "--value", "0.5"]) == 2
    assert "cobkern calibrate --out" in capsys.readouterr().err


@pytest.mark.parametrize("command", [None, "run", "train", "calibrate", "prune", "finetune",
                                     "evaluate", "sweep", "report"])
def test_help_explains_every_option(command: str | None,
                                    capsys: pytest.CaptureFixture) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: cobkern" in text
    if command == "report":  # only reads files: --device, --seed, --no-progress did nothing
        assert "--out" in text and "--debug" in text
        assert "--device" not in text and "--seed" not in text and "--no-progress" not in text
    elif command is not None:
        assert "--out" in text and "--device" in text and "--seed" in text
        # every option has a help text
        parser = build_parser()
        sub = parser._subparsers._group_actions[0].choices[command]  # noqa: SLF001
        for action in sub._actions:  # noqa: SLF001
            if action.option_strings and action.dest != "help":
                assert action.help, f"{command} {action.option_strings} has no help"


@pytest.mark.parametrize("command", ["run", "train", "calibrate", "prune", "finetune",
                                     "evaluate", "sweep", "report", "python -m cobkern.training"])
def test_help_names_each_default_once(command: str, capsys: pytest.CaptureFixture) -> None:
    """An option whose help says its default ("the experiment config's, normally 0") must not
    also get argparse's "(default: None)" — None there means "the config's"."""
    import re

    from cobkern.training.cli import build_parser as training_parser

    with pytest.raises(SystemExit):
        if command.startswith("python"):
            training_parser().parse_args(["--help"])
        else:
            build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    assert "(default: None)" not in text
    assert "(default: [])" not in text  # a repeatable option's empty list says nothing
    # one "default" per option at most
    for chunk in re.split(r"\s(?=-{1,2}[a-z])", text):
        assert chunk.count("default:") <= 1, chunk


def test_value_v_with_whole_layer_is_refused(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """--whole-layer ranks U and V with the single --value: a --value-v would be ignored."""
    assert main(["prune", "--out", str(tmp_path / "x"), "--strategy", "ratio", "--value", "0.5",
                 "--value-v", "0.3", "--whole-layer", "--no-eval", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--value-v" in err and "--whole-layer" in err


def test_bad_values_are_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--out", str(tmp_path / "x"), "--experiments", "nonsense"]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "x"), "--fractions", "0,1.5"]) == 2
    assert "[0, 1)" in capsys.readouterr().err


# ---------------------------------------------------------------------------- regressions
def _copy(run_dir: Path, tmp_path: Path, name: str = "copy") -> Path:
    import shutil

    out = tmp_path / name
    shutil.copytree(run_dir, out)
    return out


def _fixed_csv(out: Path) -> list[dict]:
    with open(out / "tables" / "fixed_ratio.csv") as f:
        return list(csv.DictReader(f))


def test_report_after_a_single_param_target_prune(run_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = _copy(run_dir, tmp_path)
    n_rows = len(_fixed_csv(out))
    assert main(["prune", "--out", str(out), "--strategy", "param_target", "--value", "0.5",
                 "--no-progress"]) == 0
    assert main(["report", "--out", str(out)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert len(_fixed_csv(out)) == n_rows  # a single prune is not a point of the sweep


def test_finetune_steps_merge_into_the_set_recipe(run_dir: Path) -> None:
    cfg = json.loads((run_dir / "config.json").read_text())["experiment"]["finetune"]
    # --set finetune={"steps": 2, "batch_size": 40, "warmup_steps": 1, ...} --finetune-steps 2
    assert cfg["steps"] == 2 and cfg["batch_size"] == 40 and cfg["warmup_steps"] == 1


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture) -> None:
    import importlib.metadata

    import cobkern

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"cobkern {cobkern.__version__}"
    assert cobkern.__version__ == importlib.metadata.version("cobkern")


def test_set_help_says_which_key_shrinks_the_relu_control(
        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    assert "train_relu_overrides" in capsys.readouterr().out


def test_changed_calibration_settings_recalibrate(run_dir: Path, tmp_path: Path) -> None:
    from cobkern.cob import CalibrationStats

    out = _copy(run_dir, tmp_path)
    n = len(_records(out))
    assert main(["run", "--preset", "quick", "--out", str(out), "--no-progress",
                 "--calib-samples", "100", "--experiments", "fixed"]) == 0
    stats = CalibrationStats.load(out / "calibration.pt")
    assert stats.num_images == 100 and stats.meta["samples"] == 100
    new = _records(out)[n:]
    # the pruned models depend on the statistics: measured again; the reference does not
    assert len(new) == 12 and {r["experiment"] for r in new} == {"fixed"}
    assert len({r["inputs"]["calibration"] for r in _records(out)
                if r.get("experiment") == "fixed"}) == 2
    # the report shows only the points of the current statistics
    assert len(_fixed_csv(out)) == 12


def test_statistics_of_another_model_are_refused_then_recalibrated(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cobkern.cob import CalibrationStats

    out = _copy(run_dir, tmp_path)
    stats = CalibrationStats.load(out / "calibration.pt")
    stats.meta["model"] = "0123456789abcdef"
    stats.save(out / "calibration.pt")
    assert main(["prune", "--out", str(out), "--strategy", "ratio", "--value", "0.5"]) == 2
    assert "cobkern calibrate" in capsys.readouterr().err
    assert main(["run", "--preset", "quick", "--out", str(out), "--no-progress",
                 "--experiments", "lossless"]) == 0
    ctx = Context(out, progress=False)
    assert CalibrationStats.load(out / "calibration.pt").meta["model"] == \
        ctx.model_fingerprint()


def test_sweep_with_another_eval_subset_does_not_mix_curves(run_dir: Path,
                                                            tmp_path: Path) -> None:
    out = _copy(run_dir, tmp_path)
    n = len(_records(out))
    assert main(["sweep", "--out", str(out), "--no-progress", "--eval-subset", "60",
                 "--experiments", "fixed"]) == 0
    new = _records(out)[n:]
    assert len(new) == 14 and all(r["n_eval"] == 60 for r in new)  # 2 references + 12
    # the ReLU control's reference is measured with the fixed sweep (the report's gap)
    assert "reference|relu" in {r["key"] for r in new}
    assert main(["report", "--out", str(out)]) == 0
    rows = _fixed_csv(out)
    assert len(rows) == 12 and {r["n_eval"] for r in rows} == {"60"}
    assert json.loads((out / "summary.json").read_text())["eval_images"] == 60


def test_stale_records_are_neither_reused_nor_reported(run_dir: Path, tmp_path: Path) -> None:
    out = _copy(run_dir, tmp_path)
    recs = _records(out)
    for r in recs:
        if "inputs" in r:
            r["inputs"]["model"] = "another-model"
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["report", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["unpruned_accuracy"] is None
    assert _fixed_csv(out) == []
    assert main(["sweep", "--out", str(out), "--no-progress", "--experiments", "fixed"]) == 0
    assert len(_records(out)) == len(recs) + 14  # + reference|relu
    assert main(["report", "--out", str(out)]) == 0
    assert len(_fixed_csv(out)) == 12


def test_run_refuses_other_training_settings(run_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    out = _copy(run_dir, tmp_path)
    config = (out / "config.json").read_text()
    train = json.loads(config)["experiment"]["train"]
    argv = ["run", "--preset", "quick", "--out", str(out), "--no-progress",
            "--set", "train=" + json.dumps({**train, "steps": 5})]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "steps=4" in err and "steps=5" in err and "--force" in err
    assert (out / "config.json").read_text() == config  # nothing claims the new settings
    assert main(["train", "--out", str(out), "--set", "steps=5", "--no-progress"]) == 2
    assert (out / "config.json").read_text() == config


def test_train_force_drops_the_statistics_of_the_old_model(run_dir: Path,
                                                           tmp_path: Path) -> None:
    out = _copy(run_dir, tmp_path)
    assert main(["train", "--out", str(out), "--force", "--set", "steps=3",
                 "--no-progress"]) == 0
    assert not (out / "calibration.pt").exists()
    assert not (out / "calibration-rotated.pt").exists()
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 3


def test_an_interrupted_train_force_leaves_no_old_model_behind(run_dir: Path, tmp_path: Path,
                                                               monkeypatch,
                                                               capsys: pytest.CaptureFixture
                                                               ) -> None:
    """``train --force`` switches the settings at once: the old model file goes too, so no
    later step can use it under the new settings if the new run is killed."""
    from cobkern.experiments import pipeline

    out = _copy(run_dir, tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train", killed)
    assert main(["train", "--out", str(out), "--force", "--set", "steps=300",
                 "--no-progress"]) != 0  # "interrupted; run the same command again"
    assert not any((out / "train").glob("model.*"))
    assert main(["evaluate", "--out", str(out), "--no-progress"]) == 2
    assert "trained tsra model not found" in capsys.readouterr().err


def test_an_interrupted_train_force_says_how_to_continue_the_new_run(
        run_dir: Path, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    """Once the forced run has started, the same command (``--force``) would start it over
    at step 0: the message says to continue without ``--force``, and that resumes it."""
    from cobkern.experiments import pipeline

    out = _copy(run_dir, tmp_path)
    real_train = pipeline.train

    def killed_at_step_3(*args, **kwargs):
        def stop(step: int) -> None:
            if step == 3:
                raise KeyboardInterrupt
        return real_train(*args, on_step=stop, **kwargs)

    monkeypatch.setattr(pipeline, "train", killed_at_step_3)
    assert main(["train", "--out", str(out), "--force", "--set", "steps=6",
                 "--set", "checkpoint_every=1", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert f"`cobkern train --out {out}` (without --force" in err
    seen: list[int] = []

    def spy(*args, **kwargs):
        assert kwargs["resume"] is True
        return real_train(*args, on_step=seen.append, **kwargs)

    monkeypatch.setattr(pipeline, "train", spy)
    assert main(["train", "--out", str(out), "--no-progress"]) == 0
    assert "after 6 steps" in capsys.readouterr().out
    assert seen == [4, 5, 6]  # resumed from the step-3 checkpoint, not started over


def test_finetune_checkpoints_and_keeps_a_finished_run_when_the_recipe_cannot_run(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A fine-tune writes checkpoints along the way (resumable after a kill), and a new
    recipe the data cannot run is refused before the finished fine-tune is deleted."""
    out = _copy(run_dir, tmp_path)
    o = str(out)
    assert main(["prune", "--out", o, "--strategy", "ratio", "--value", "0.3", "--name", "p",
                 "--no-eval", "--no-progress"]) == 0
    assert main(["finetune", "--out", o, "--name", "p", "--steps", "20",
                 "--no-progress"]) == 0
    ft = out / "pruned" / "p" / "finetune"
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["checkpoint_every"] == 2  # steps // 10
    kept = sorted(p.name for p in ft.iterdir())
    assert main(["finetune", "--out", o, "--name", "p", "--steps", "20", "--batch-size",
                 "100000", "--no-progress"]) == 2
    assert "make no full fine-tuning batch of 100000" in capsys.readouterr().err
    assert sorted(p.name for p in ft.iterdir()) == kept


def test_unreadable_final_json_finishes_from_the_checkpoint(run_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture
                                                            ) -> None:
    out = _copy(run_dir, tmp_path)
    n = len(_records(out))
    (out / "train" / "final.json").write_text('{"test_accuracy": 0.1 "steps"')
    argv = ["run", "--preset", "quick", "--out", str(out), "--no-progress",
            "--experiments", "fixed"]
    assert main(argv) == 0
    assert json.loads((out / "train" / "final.json").read_text())["steps"] == 4
    assert len(_records(out)) == n  # the same weights: every result is reused
    (out / "train" / "final.json").write_text("{")
    (out / "train" / "checkpoint.pt").unlink()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "final.json" in err and "--force" in err and "Traceback" not in err


def test_reprune_drops_the_old_finetune_and_names_differ(run_dir: Path, tmp_path: Path) -> None:
    out = _copy(run_dir, tmp_path)
    o = str(out)
    assert main(["prune", "--out", o, "--strategy", "ratio", "--value", "0.3", "--name", "p",
                 "--no-eval", "--no-progress"]) == 0
    assert main(["finetune", "--out", o, "--name", "p", "--steps", "1", "--no-progress"]) == 0
    assert (out / "pruned" / "p" / "finetune").is_dir()
    assert main(["prune", "--out", o, "--strategy", "ratio", "--value", "0.6", "--name", "p",
                 "--no-eval", "--no-progress"]) == 0
    assert not (out / "pruned" / "p" / "finetune").exists()
    before = set((out / "pruned").iterdir())
    for extra in ([], ["--normalizer", "original"], ["--whole-layer"]):
        assert main(["prune", "--out", o, "--strategy", "ratio", "--value", "0.5",
                     "--no-eval", "--no-progress", *extra]) == 0
    names = {p.name for p in set((out / "pruned").iterdir()) - before}
    assert names == {"cob-l2-ratio-0.5-0.5-kept", "cob-l2-ratio-0.5-0.5-original",
                     "cob-l2-ratio-0.5-whole-kept"}


def test_finetune_never_resumes_another_models_checkpoint(run_dir: Path,
                                                         tmp_path: Path) -> None:
    import copy

    from cobkern.experiments import ExperimentConfig

    cfg = ExperimentConfig.from_dict(
        json.loads((run_dir / "config.json").read_text())["experiment"]).with_overrides(
        {"finetune": {"steps": 1}})
    ctx = Context(run_dir, cfg, progress=False)
    run = tmp_path / "ft"
    a = ctx.prune(("ratio", [0.3, 0.3]))[0]
    ctx.finetune(a, "a", out=run)
    b = ctx.prune(("ratio", [0.6, 0.6]))[0]
    b0 = copy.deepcopy(b)
    ctx.finetune(b, "b", out=run)  # the same folder: must start over from b
    assert count_params(b) == count_params(b0) < count_params(a)
    assert not all(torch.equal(x, y) for x, y in zip(b.state_dict().values(),
                                                     a.state_dict().values(), strict=False)
                   if x.shape == y.shape)
    from cobkern.experiments.identity import state_fingerprint

    assert json.loads((run / "start.json").read_text())["model"] == state_fingerprint(b0)


@pytest.mark.parametrize("argv,message", [
    (["--set", "fractions=0.5"], "fractions"),
    (["--set", 'importances="l2"'], "importances"),
    (["--set", 'calib_samples="abc"'], "calib_samples"),
    (["--set", 'finetune={"stepz": 1}'], "stepz"),
    (["--set", "finetune=3"], "finetune"),
    (["--device", "tpu"], "tpu"),
    (["--set", 'peer_criteria=["l3"]'], "peer_criteria"),
    (["--set", 'thresholds=[["max", "x"]]'], "thresholds"),
    (["--set", 'finetune={"steps": 0}'], "finetune.steps"),
    (["--set", 'finetune={"lr": -1}'], "finetune.lr"),
    (["--set", "normalizer_fractions=[1.5]"], "normalizer_fractions"),
    (["--set", 'lossless_tol="x"'], "lossless_tol"),
    (["--set", "speed_batches=[0]"], "speed_batches"),
    (["--set", "speed_repeats=0"], "speed_repeats"),
    (["--set", 'train={"stepz": 1}'], "stepz"),
])
def test_bad_settings_are_one_line_errors_before_anything_is_written(
        argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "x"
    assert main(["run", "--out", str(out), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert not out.exists()


def test_out_that_is_a_file_is_a_user_error(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "file"
    f.write_text("")
    assert main(["run", "--out", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_prune_rejects_fractional_counts_and_escaping_names(run_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture
                                                            ) -> None:
    out = _copy(run_dir, tmp_path)
    o = str(out)
    assert main(["prune", "--out", o, "--strategy", "count", "--value", "2.7"]) == 2
    assert "whole number" in capsys.readouterr().err
    for name in ("../../escape", "a/b", "..", "x\\y"):
        assert main(["prune", "--out", o, "--strategy", "ratio", "--value", "0.5", "--name",
                     name, "--no-eval"]) == 2
        assert "--name" in capsys.readouterr().err
    assert not (tmp_path / "escape").exists()
    assert main(["prune", "--out", o, "--strategy", "count", "--value", "2", "--no-eval",
                 "--no-progress"]) == 0
    assert (out / "pruned" / "cob-l2-count-2-2-kept").is_dir()


# ---------------------------------------------------------------------------- audit-cli fixes
def test_evaluate_refuses_a_model_with_another_class_count(run_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture
                                                          ) -> None:
    from cobkern.models import save_model, vgg16_tsra

    out = _copy(run_dir, tmp_path)
    n = len(_records(out))
    model = save_model(vgg16_tsra(num_classes=3, width=0.0625), tmp_path / "three.pt")
    assert main(["evaluate", "--out", str(out), "--model", str(model), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == "error: the model has 3 outputs but the test data has 10 classes\n"
    assert len(_records(out)) == n


def test_evaluate_of_a_file_that_is_not_a_model_is_one_line(run_dir: Path,
                                                           capsys: pytest.CaptureFixture
                                                           ) -> None:
    path = run_dir / "config.json"
    assert main(["evaluate", "--out", str(run_dir), "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: cannot read model file: not a cobkern model file (not a " \
                  "torch file)\n"


def test_evaluate_refuses_name_with_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--out", str(tmp_path), "--name", "x", "--model", "m.safetensors"])
    assert e.value.code == 2
    assert "not allowed with argument --name" in capsys.readouterr().err


def test_a_failed_command_leaves_no_settings_behind(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """A command refused for bad input (here a missing data root) must not save its --set
    values in OUT/config.json: a retry without them would fail on them again."""
    missing = str(tmp_path / "missing")
    out = tmp_path / "e5"
    assert main(["train", "--out", str(out), "--set", f"data_root={missing}", "--set",
                 "steps=2", "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()
    assert main(["run", "--out", str(out), "--no-progress", "--set",
                 "train=" + json.dumps({"data_root": missing})]) == 2
    assert not out.exists()
    # an existing config.json is put back as it was
    out.mkdir()
    (out / "config.json").write_text('{"experiment": {"preset": "quick"}}\n')
    assert main(["train", "--out", str(out), "--set", f"data_root={missing}",
                 "--no-progress"]) == 2
    assert (out / "config.json").read_text() == '{"experiment": {"preset": "quick"}}\n'
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_a_failed_calibration_leaves_the_settings_as_they_were(run_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture
                                                               ) -> None:
    out = _copy(run_dir, tmp_path)
    config = (out / "config.json").read_text()
    model = out / "train" / "model.safetensors"
    if not model.is_file():
        model = out / "train" / "model.pt"
    model.write_bytes(model.read_bytes()[:100])  # truncated
    assert main(["calibrate", "--out", str(out), "--samples", "100", "--no-progress"]) == 2
    assert str(model) in capsys.readouterr().err
    assert (out / "config.json").read_text() == config


def test_train_with_another_preset_is_refused_like_run(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    from cobkern.experiments import get_experiment_preset

    out = tmp_path / "q"
    cfg = get_experiment_preset("quick").with_overrides(
        {"train": {"data_root": str(tmp_path / "missing")}})
    Context(out, cfg, device="cpu", progress=False).save_config()
    config = (out / "config.json").read_text()
    assert main(["train", "--preset", "fast", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "made with preset 'quick', not 'fast'" in err
    assert (out / "config.json").read_text() == config
    assert main(["run", "--preset", "fast", "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == err


def test_calibration_says_how_many_images_it_uses(run_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = _copy(run_dir, tmp_path)
    assert main(["calibrate", "--out", str(out), "--samples", "100000", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    n = 10 * N_TRAIN
    assert lines[0] == f"[cobkern] calibrating on {n:,} training images (100,000 requested, " \
                       f"{n:,} available)"
    assert lines[-1].startswith(f"calibrated 15 layers on {n:,} images")


def test_report_with_an_out_that_is_a_file_is_a_user_error(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture
                                                          ) -> None:
    f = tmp_path / "file"
    f.write_text("")
    assert main(["report", "--out", str(f)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_run_and_sweep_take_a_config_file(tmp_path: Path) -> None:
    """Settings from a file (the issue: 'overridable from the command line or a config
    file'); the options on the command line win over it."""
    from cobkern.cli.main import _experiment_config

    f = tmp_path / "settings.json"
    f.write_text(json.dumps({"fractions": [0.0, 0.5], "train": {"steps": 7}, "seed": 3}))
    out = str(tmp_path / "o")
    cfg = _experiment_config(build_parser().parse_args(["run", "--out", out, "--config", str(f)]))
    assert cfg.fractions == [0.0, 0.5] and cfg.train["steps"] == 7 and cfg.seed == 3
    cfg = _experiment_config(build_parser().parse_args(
        ["sweep", "--out", out, "--config", str(f), "--set", "fractions=[0.3]", "--seed", "4"]))
    assert cfg.fractions == [0.3] and cfg.seed == 4 and cfg.train["steps"] == 7
    # an OUT/config.json of the same preset is a config file too; another preset is refused
    g = tmp_path / "config.json"
    g.write_text(json.dumps({"experiment": {**cfg.to_dict(), "fractions": [0.9]}}))
    assert _experiment_config(build_parser().parse_args(
        ["run", "--out", out, "--config", str(g)])).fractions == [0.9]
    g.write_text(json.dumps({"experiment": {"preset": "fast"}}))
    with pytest.raises(ValueError, match="is for preset 'fast'.*pass --preset fast"):
        _experiment_config(build_parser().parse_args(["run", "--out", out, "--config", str(g)]))
    for bad, match in (("[1, 2]", "expected a JSON object"), ("{oops", "cannot read it as JSON")):
        f.write_text(bad)
        with pytest.raises(ValueError, match=match):
            _experiment_config(build_parser().parse_args(["run", "--out", out, "--config",
                                                          str(f)]))
    f.write_text('{"fractoins": [0.5]}')
    with pytest.raises(ValueError, match="fractoins"):
        _experiment_config(build_parser().parse_args(["run", "--out", out, "--config", str(f)]))


# ---------------------------------------------------------------------------- mutation gaps
def test_sweep_records_were_pruned_as_they_say(run_dir: Path) -> None:
    """Each fixed / normaliser record's pruning (what prune() reports it did) matches the
    record's own method, importance, normaliser and target (P, P): the baseline is not
    rotated, the L1 curve uses L1, the "original" points use the original normaliser."""
    checked = 0
    for r in _records(run_dir):
        if r.get("experiment") not in ("fixed", "normalizer"):
            continue
        meta = r["strategy_meta"]
        assert meta["cob"] == (r["method"] == "cob"), r["key"]
        assert (meta["importance"], meta["normalizer"]) == (r["importance"], r["normalizer"])
        assert r["value"] == meta["target"] == [r["target"], r["target"]], r["key"]
        checked += 1
    assert checked == 14


def test_value_v_sets_the_v_subspace(tmp_path: Path) -> None:
    from cobkern.cli.main import _default_name, _value

    def parse(*extra: str):
        return build_parser().parse_args(["prune", "--out", str(tmp_path), *extra])

    args = parse("--strategy", "ratio", "--value", "0.5", "--value-v", "0.3")
    assert _value(args) == [0.5, 0.3]
    assert _default_name(args, "kept") == "cob-l2-ratio-0.5-0.3-kept"
    assert _value(parse("--strategy", "count", "--value", "2", "--value-v", "1")) == [2, 1]
    assert _value(parse("--strategy", "ratio", "--value", "0.5")) == [0.5, 0.5]


def test_finetune_steps_flag_wins_over_the_set_recipe(tmp_path: Path) -> None:
    from cobkern.cli.main import _experiment_config

    out = str(tmp_path / "o")
    cfg = _experiment_config(build_parser().parse_args(
        ["run", "--out", out, "--set", 'finetune={"steps": 5, "batch_size": 40}',
         "--finetune-steps", "3"]))
    assert (cfg.finetune.steps, cfg.finetune.batch_size) == (3, 40)
    cfg = _experiment_config(build_parser().parse_args(
        ["sweep", "--out", out, "--finetune-steps", "3"]))
    assert (cfg.finetune.steps, cfg.finetune.batch_size) == (3, 128)  # quick's batch


def _spy_calibrate(monkeypatch, keyword: str) -> list:
    """Record the ``keyword`` argument of every ``calibrate`` call the pipeline makes (the
    calls themselves go through)."""
    from cobkern.experiments import context as context_module

    seen: list = []
    real = context_module.calibrate

    def spy(*args, **kwargs):
        seen.append(kwargs.get(keyword))
        return real(*args, **kwargs)

    monkeypatch.setattr(context_module, "calibrate", spy)
    return seen


def test_calibrate_channels_last_flag_reaches_calibrate(run_dir: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    """``cobkern calibrate --channels-last`` is kept in the config and calibrates with
    channels-last inputs; the statistics are the same ones (a layout is not part of their
    identity), so the flag does not make existing statistics stale."""
    out = _copy(run_dir, tmp_path)
    before = Context(out, device="cpu", progress=False)
    assert before.config.calib_channels_last is None  # calibrate's automatic layout
    seen = _spy_calibrate(monkeypatch, "channels_last")
    assert main(["calibrate", "--out", str(out), "--samples", "100", "--channels-last",
                 "--no-progress"]) == 0
    assert seen == [True]
    ctx = Context(out, device="cpu", progress=False)
    assert ctx.config.calib_channels_last is True and ctx.calibration_is_current()
    off = Context(out, ctx.config.with_overrides({"calib_channels_last": False}),
                  device="cpu", progress=False)
    assert off.calibration_is_current()
    assert main(["calibrate", "--out", str(out), "--samples", "100", "--no-channels-last",
                 "--no-progress"]) == 0
    assert seen == [True, False]
    assert Context(out, device="cpu", progress=False).config.calib_channels_last is False
    # once set, the choice stays in config.json: 'auto' is the way back to the default
    for word, want in (("on", True), ("off", False), ("auto", None)):
        assert main(["calibrate", "--out", str(out), "--samples", "100", "--channels-last",
                     word, "--no-progress"]) == 0
        assert seen[-1] is want
        assert Context(out, device="cpu", progress=False).config.calib_channels_last is want
    with pytest.raises(SystemExit):
        main(["calibrate", "--out", str(out), "--channels-last", "sometimes"])


def test_evaluate_no_finetuned_needs_a_name(tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """--no-finetuned picks a pruned model's version before fine-tuning; without --name it
    was ignored, and the trained model was evaluated as if the flag meant nothing."""
    assert main(["evaluate", "--out", str(tmp_path / "o"), "--no-finetuned"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --no-finetuned needs --name (it picks a pruned model's version "
                   "before fine-tuning)\n")


def test_calibrate_passes_the_automatic_layout_through(run_dir: Path, tmp_path: Path,
                                                       monkeypatch) -> None:
    """Without the flag, the config's ``None`` reaches ``calibrate`` as it is (its automatic
    choice: NCHW on this CPU) and stays ``null`` in ``config.json``."""
    out = _copy(run_dir, tmp_path)
    seen = _spy_calibrate(monkeypatch, "channels_last")
    assert main(["calibrate", "--out", str(out), "--samples", "100", "--no-progress"]) == 0
    assert seen == [None]
    assert json.loads((out / "config.json").read_text())["experiment"][
        "calib_channels_last"] is None


def test_calibrate_cuda_graphs_flag_reaches_calibrate(run_dir: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    """``cobkern calibrate --cuda-graphs`` is kept in the config and reaches ``calibrate``;
    the default is off, and the flag does not make existing statistics stale (replays run
    the same kernels)."""
    out = _copy(run_dir, tmp_path)
    assert Context(out, device="cpu", progress=False).config.calib_cuda_graphs is False
    seen = _spy_calibrate(monkeypatch, "cuda_graphs")
    assert main(["calibrate", "--out", str(out), "--samples", "100", "--no-progress"]) == 0
    assert main(["calibrate", "--out", str(out), "--samples", "100", "--cuda-graphs",
                 "--no-progress"]) == 0
    assert seen == [False, True]
    ctx = Context(out, device="cpu", progress=False)
    assert ctx.config.calib_cuda_graphs is True and ctx.calibration_is_current()
    off = Context(out, ctx.config.with_overrides({"calib_cuda_graphs": False}),
                  device="cpu", progress=False)
    assert off.calibration_is_current()
    with pytest.raises(ValueError, match="calib_cuda_graphs: expected true or false"):
        ctx.config.with_overrides({"calib_cuda_graphs": "yes"})


@pytest.mark.parametrize("flags,expected", [([], None), (["--channels-last"], True),
                                            (["--no-channels-last"], False)])
def test_channels_last_flags_parse_to_true_false_or_auto(tmp_path: Path, flags: list[str],
                                                         expected: bool | None) -> None:
    args = build_parser().parse_args(["calibrate", "--out", str(tmp_path), *flags])
    assert args.channels_last is expected


def test_set_preset_is_refused_like_a_config_file_of_another_preset(tmp_path: Path) -> None:
    """``--set preset=fast`` on a quick run used to give quick's experiments with fast's
    training (width 1.0, hours on a CPU) and a report that says "fast"."""
    from cobkern.cli.main import _experiment_config

    with pytest.raises(ValueError, match="--set preset=fast conflicts"):
        _experiment_config(build_parser().parse_args(
            ["run", "--out", str(tmp_path / "o"), "--set", "preset=fast"]))
    cfg = _experiment_config(build_parser().parse_args(
        ["run", "--out", str(tmp_path / "o"), "--set", "preset=quick"]))
    assert cfg.preset == "quick"


@pytest.mark.parametrize("text,expected", [("true", True), ("false", False), ("null", None)])
def test_set_calib_channels_last_takes_true_false_and_null(tmp_path: Path, text: str,
                                                          expected: bool | None) -> None:
    """``--set calib_channels_last=null`` puts a config back on the automatic layout."""
    from cobkern.cli.main import _experiment_config

    cfg = _experiment_config(build_parser().parse_args(
        ["run", "--out", str(tmp_path / "o"), "--set", f"calib_channels_last={text}"]))
    assert cfg.calib_channels_last is expected
    with pytest.raises(ValueError, match="calib_channels_last: expected true, false or null"):
        _experiment_config(build_parser().parse_args(
            ["run", "--out", str(tmp_path / "o"), "--set", "calib_channels_last=yes"]))


def test_channels_last_help_says_the_default_is_automatic(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["calibrate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-channels-last" in text
    assert "normally auto: channels-last for a float32 model on CUDA" in text


def test_calibrate_f32_dot_is_recorded_and_decides_whether_statistics_are_current(
        run_dir: Path, tmp_path: Path) -> None:
    """``cobkern calibrate --f32-dot fp64`` keeps the mode in the config and the statistics;
    statistics made with other products are not current for a config asking for these
    (the pipeline then recalibrates), and IEEE statistics — which record nothing, like
    files from before the option — are current for the default."""
    from cobkern.cob import CalibrationStats

    out = _copy(run_dir, tmp_path)
    assert main(["calibrate", "--out", str(out), "--samples", "100", "--f32-dot", "fp64",
                 "--no-progress"]) == 0
    stats = CalibrationStats.load(out / "calibration.pt")
    assert stats.meta["f32_dot"] == "fp64"
    ctx = Context(out, device="cpu", progress=False)
    assert ctx.config.calib_f32_dot == "fp64" and ctx.calibration_is_current()
    ieee = Context(out, ctx.config.with_overrides({"calib_f32_dot": "ieee"}), device="cpu",
                   progress=False)
    assert not ieee.calibration_is_current()
    fp64_id = ctx.calibration_id()
    assert main(["calibrate", "--out", str(out), "--samples", "100", "--f32-dot", "ieee",
                 "--no-progress"]) == 0
    assert CalibrationStats.load(out / "calibration.pt").meta.get("f32_dot") is None
    assert ieee.calibration_is_current()
    # the statistics' identity (what sweep records were made from) names the products too,
    # so results of the fp64 statistics are not taken for results of the IEEE ones
    assert Context(out, device="cpu", progress=False).calibration_id() != fp64_id


def test_augmented_statistics_are_tied_to_the_calibration_batch_size(
        run_dir: Path, tmp_path: Path) -> None:
    """Crops and flips are drawn per (seed, epoch, batch index): with calib_augment another
    calib_batch_size gives other statistics, but they were still taken as current (and as
    the same calibration in the records' identity). Un-augmented, the batch size changes
    nothing and stays out of the identity (earlier statistics stay current)."""
    out = _copy(run_dir, tmp_path)
    assert main(["calibrate", "--out", str(out), "--samples", "100", "--augment",
                 "--no-progress"]) == 0
    ctx = Context(out, device="cpu", progress=False)
    assert ctx.config.calib_augment and ctx.calibration_is_current()
    other = Context(out, ctx.config.with_overrides(
        {"calib_batch_size": ctx.config.calib_batch_size // 2}), device="cpu", progress=False)
    assert not other.calibration_is_current()
    plain_ctx = Context(out, ctx.config.with_overrides({"calib_augment": False}),
                        device="cpu", progress=False)
    assert "batch_size" not in plain_ctx.calibration_settings()


def test_calibration_identity_is_unchanged_for_ieee_and_names_other_products() -> None:
    from cobkern.experiments.identity import calibration_meta_id

    meta = {"model": "abc", "samples": 100, "augment": False, "seed": 0}
    ieee = calibration_meta_id(meta, 100)
    assert calibration_meta_id(dict(meta, f32_dot=None), 100) == ieee  # older files: no key
    assert calibration_meta_id(dict(meta, f32_dot="fp64"), 100) != ieee
    augmented = dict(meta, augment=True)
    assert calibration_meta_id(dict(augmented, batch_size=50), 100) != \
        calibration_meta_id(dict(augmented, batch_size=25), 100)


def _digests(out: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad", ["data_root=/nonexistent/cobkern-data", "num_classes=5"])
def test_train_force_refused_for_bad_settings_keeps_the_trained_model(
        run_dir: Path, tmp_path: Path, bad: str, capsys: pytest.CaptureFixture) -> None:
    """``train --force`` deleted the model, checkpoint, metrics and calibration before the
    trainer checked the new settings: one typo in --set cost the trained model. Now a run
    refused before it starts leaves every file as it was (config.json included)."""
    out = _copy(run_dir, tmp_path)
    before = _digests(out)
    assert main(["train", "--out", str(out), "--force", "--set", bad, "--set", "steps=1",
                 "--no-progress"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert _digests(out) == before
    assert not (out / "train" / ".replaced").exists()


def test_train_relu_settings_reach_config_json(run_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """``train --arch relu --set ...`` in a directory with a config.json trained the control
    with the overrides but kept them out of config.json, so the pipeline then refused the
    model it had just made ("trained with warmup_steps=1, but these settings ask for 0")."""
    out = _copy(run_dir, tmp_path)
    o = str(out)
    before = json.loads((out / "config.json").read_text())["experiment"]
    assert before["train_relu_overrides"]["warmup_steps"] != 2
    assert main(["train", "--out", o, "--arch", "relu", "--force", "--set", "steps=2",
                 "--set", "warmup_steps=2", "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())["experiment"]
    assert saved["train_relu_overrides"]["steps"] == 2
    assert saved["train_relu_overrides"]["warmup_steps"] == 2
    capsys.readouterr()
    # the pipeline accepts the model as trained with the settings it now reads
    assert main(["train", "--out", o, "--arch", "relu", "--no-progress"]) == 0
    assert "already trained" in capsys.readouterr().out


def test_a_re_prune_killed_before_its_prune_json_leaves_no_stale_one(
        run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Re-pruning a name writes the model file, then ``prune.json``: a kill between them
    left the old prune's ``prune.json`` beside the new model."""
    from cobkern.experiments import files

    out = _copy(run_dir, tmp_path)
    o = str(out)
    assert main(["prune", "--out", o, "--strategy", "ratio", "--value", "0.3", "--name", "p",
                 "--no-eval", "--no-progress"]) == 0
    d = out / "pruned" / "p"
    assert (d / "prune.json").is_file()
    real = files.atomic_write_json

    def killed(path, obj, *args, **kwargs):
        if Path(path).name == "prune.json":
            raise KeyboardInterrupt
        return real(path, obj, *args, **kwargs)

    monkeypatch.setattr(files, "atomic_write_json", killed)
    assert main(["prune", "--out", o, "--strategy", "ratio", "--value", "0.6", "--name", "p",
                 "--no-eval", "--no-progress"]) == 130
    assert any(d.glob("model.*"))  # the new model was written ...
    assert not (d / "prune.json").exists()  # ... and nothing describes it as the old one


def test_run_data_root_sets_the_training_data_as_an_absolute_path(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """``cobkern run --data-root PATH`` (what the missing-archive message suggests) sets
    ``train.data_root``, absolute (config.json outlives the working directory), merged
    with a ``--set train=...`` group; the ReLU control shares it."""
    from cobkern.cli.main import _experiment_config, build_parser
    from cobkern.experiments import Context

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["run", "--out", "o", "--data-root", "cifar",
                                      "--set", 'train={"steps": 3}'])
    cfg = _experiment_config(args, preset=args.preset)
    assert cfg.train == {"steps": 3, "data_root": str(tmp_path / "cifar")}
    ctx = Context(tmp_path / "o", cfg, progress=False)
    assert ctx.train_config("relu").data_root == str(tmp_path / "cifar")


def test_prune_into_a_name_taken_by_a_file_is_named(run_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = _copy(run_dir, tmp_path)
    (out / "pruned").mkdir(exist_ok=True)
    (out / "pruned" / "xx").write_text("")
    assert main(["prune", "--out", str(out), "--strategy", "ratio", "--value", "0.3",
                 "--name", "xx", "--no-eval", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "exists and is not a folder" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["train", "--set", "arch=relu"], "'arch' is not a setting here"),
    (["train", "--arch", "relu", "--set", "arch=tsra"], "'arch' is not a setting here"),
    (["prune", "--strategy", "count", "--value", "inf"], "prunes a whole number"),
    (["prune", "--strategy", "count", "--value", "nan"], "prunes a whole number"),
])
def test_more_bad_cli_input_is_refused_before_anything_changes(
        run_dir: Path, tmp_path: Path, argv: list[str], message: str,
        capsys: pytest.CaptureFixture) -> None:
    """``--set arch=relu`` trained a ReLU network into the TSRA model's place (calibrate
    then found no CoB layers); ``--value inf`` for a count gave an OverflowError
    traceback."""
    out = _copy(run_dir, tmp_path)
    before = _digests(out)
    assert main([argv[0], "--out", str(out), *argv[1:], "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert _digests(out) == before


@pytest.mark.parametrize("text", ["[]", "5", "null", '{"experiment": [1]}'])
def test_a_config_json_that_is_not_an_object_is_named(run_dir: Path, tmp_path: Path,
                                                      text: str,
                                                      capsys: pytest.CaptureFixture) -> None:
    """``[]`` ran every command with the preset's defaults (another dataset than the run's),
    ``5`` / ``null`` gave a TypeError traceback."""
    out = _copy(run_dir, tmp_path)
    (out / "config.json").write_text(text)
    assert main(["evaluate", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "must hold a JSON object" in err and "Traceback" not in err


@pytest.mark.parametrize("option", ["--experiments", "--fractions", "--importances"])
@pytest.mark.parametrize("text", ["", ","])
def test_an_empty_list_option_is_refused(option: str, text: str, tmp_path: Path) -> None:
    """An empty list was read as "not given": ``--experiments ,`` ran every experiment."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["sweep", "--out", str(tmp_path), option, text])
    assert e.value.code == 2


def test_default_prune_names_keep_close_values_apart(tmp_path: Path) -> None:
    """``:g`` kept six digits: --value 0.1234561 and 0.1234564 shared a directory, the
    second prune replacing the first."""
    from cobkern.cli.main import _default_name

    def name(*value: str) -> str:
        args = build_parser().parse_args(["prune", "--out", str(tmp_path), "--strategy",
                                          "ratio", "--value", *value])
        return _default_name(args, "kept")

    assert name("0.1234561") != name("0.1234564")
    assert name("0.5") == "cob-l2-ratio-0.5-0.5-kept"  # the names of earlier runs stay


def test_reprune_keeps_the_old_finetune_when_its_evaluation_fails(
        run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A re-prune deleted the old model's fine-tuning before evaluating the new model: a
    failure (or Ctrl-C) there left the old pruned model without its fine-tuning."""
    out = _copy(run_dir, tmp_path)
    o = str(out)
    assert main(["prune", "--out", o, "--strategy", "ratio", "--value", "0.3", "--name", "p",
                 "--no-eval", "--no-progress"]) == 0
    assert main(["finetune", "--out", o, "--name", "p", "--steps", "1", "--no-progress"]) == 0
    before = _digests(out / "pruned" / "p")

    def failing(self, *args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(Context, "evaluate", failing)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        main(["prune", "--out", o, "--strategy", "ratio", "--value", "0.6", "--name", "p",
              "--no-progress"])
    assert _digests(out / "pruned" / "p") == before
