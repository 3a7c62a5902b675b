"""Experiment settings, presets and the speed helpers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cobkern.experiments import (
    ExperimentConfig,
    count_flops,
    get_experiment_preset,
    layer_flops,
    measure_speed,
)


@pytest.mark.parametrize("name", ["quick", "fast", "paper"])
def test_presets_round_trip(name: str) -> None:
    cfg = get_experiment_preset(name)
    assert cfg.preset == name
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


def test_overrides_and_validation() -> None:
    cfg = get_experiment_preset("quick").with_overrides({"finetune": {"steps": 7},
                                                         "fractions": [0.0, 0.5]})
    assert cfg.finetune.steps == 7 and cfg.finetune.batch_size == 128
    assert cfg.fractions == [0.0, 0.5]
    for bad in ({"fractions": [1.0]}, {"experiments": ["x"]}, {"importances": ["l3"]},
                {"thresholds": [["top", 1]]}, {"peer_archs": ["vit"]}, {"nonsense": 1}):
        with pytest.raises(ValueError):
            get_experiment_preset("quick").with_overrides(bad)
    with pytest.raises(ValueError, match="unknown preset"):
        get_experiment_preset("huge")


def test_flops_are_counted_from_layer_shapes() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    macs = layer_flops(net)
    assert macs == {"0": 8 * 32 * 32 * 3 * 9, "4": 8 * 16 * 16 * 10}
    assert count_flops(net) == 2 * sum(macs.values())


def test_measure_speed_reports_positive_times() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    s = measure_speed(net, 4, torch.device("cpu"), repeats=3, warmup=1)
    assert s["batch"] == 4 and s["repeats"] == 3
    assert 0 < s["latency_ms_min"] <= s["latency_ms"] <= s["latency_ms_p90"]
    assert s["throughput"] == pytest.approx(4 / (s["latency_ms"] / 1e3))


def test_cudnn_autotune_is_set_for_cuda_only_and_restored(monkeypatch) -> None:
    """Pruned layers have unusual widths, where cuDNN's heuristic choice of algorithm is
    weakest; ``measure_speed`` lets cuDNN time its algorithms on CUDA, and must leave the
    process's setting as it found it (also when the model raises). Setting the flag needs
    no GPU; ``_measure`` is replaced to observe the flag during the measurement."""
    from cobkern.experiments import speed

    seen = []

    def fake(*_args):
        seen.append(torch.backends.cudnn.benchmark)
        if len(seen) == 3:
            raise RuntimeError("model failed")
        return {}

    monkeypatch.setattr(speed, "_measure", fake)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    measure_speed(nn.Identity(), 1, torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is False
    measure_speed(nn.Identity(), 1, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="model failed"):
        measure_speed(nn.Identity(), 1, torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is False
    measure_speed(nn.Identity(), 1, torch.device("cuda"), autotune=False)
    assert seen == [True, False, True, False]


def test_wrong_types_and_values_are_value_errors() -> None:
    quick = get_experiment_preset("quick")
    for bad in ({"fractions": 0.5}, {"importances": "l2"}, {"calib_samples": "abc"},
                {"calib_samples": True}, {"finetune": {"stepz": 1}}, {"finetune": 3},
                {"finetune": {"steps": 0}}, {"finetune": {"lr": 0}},
                {"finetune": {"warmup_steps": -1}}, {"finetune": {"batch_size": 1.5}},
                {"device": "tpu"}, {"device": 3}, {"peer_criteria": ["l3"]},
                {"peer_criteria": "l2"}, {"thresholds": [["max", "x"]]},
                {"thresholds": [["max", -0.1]]}, {"normalizer_fractions": [1.0]},
                {"normalizer_fractions": 0.5}, {"lossless_tol": "x"}, {"lossless_tol": 2.0},
                {"speed_batches": [0]}, {"speed_batches": [1.5]}, {"speed_repeats": 0},
                {"train": 3}, {"train": {"steps": -1}}, {"train_relu_overrides": {"x": 1}},
                {"eval_subset": -1}, {"train_relu": "yes"}, {"calib_f32_dot": "fp32"},
                {"calib_channels_last": 1}):
        with pytest.raises(ValueError):
            quick.with_overrides(bad)
    ok = quick.with_overrides({"peer_criteria": ["l2", "l1-first"], "lossless_tol": 1e-9,
                               "thresholds": [["zscore", -0.5]], "device": "cpu"})
    assert ok.peer_criteria == ["l2", "l1-first"]


@pytest.mark.parametrize("name", ["quick", "fast", "paper"])
def test_calib_channels_last_defaults_to_calibrates_auto(name: str) -> None:
    """``None``: ``calibrate`` picks the layout (channels-last for float32 on CUDA)."""
    assert ExperimentConfig().calib_channels_last is None
    assert get_experiment_preset(name).calib_channels_last is None


@pytest.mark.parametrize("value", [None, True, False])
def test_calib_channels_last_accepts_true_false_and_null(value, tmp_path) -> None:
    """Through overrides, ``from_dict`` and a JSON ``config.json`` (``null`` → ``None``)."""
    import json

    from cobkern.experiments import load_experiment_config

    quick = get_experiment_preset("quick")
    assert quick.with_overrides({"calib_channels_last": value}).calib_channels_last is value
    d = {**quick.to_dict(), "calib_channels_last": value}
    assert ExperimentConfig.from_dict(d).calib_channels_last is value
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"experiment": d}))
    assert f"\"calib_channels_last\": {json.dumps(value)}" in f.read_text()
    assert load_experiment_config(f).calib_channels_last is value


def test_a_config_without_calib_channels_last_gets_auto(tmp_path) -> None:
    import json

    from cobkern.experiments import load_experiment_config

    d = get_experiment_preset("quick").to_dict()
    del d["calib_channels_last"]
    f = tmp_path / "config.json"
    f.write_text(json.dumps(d))
    assert load_experiment_config(f).calib_channels_last is None


@pytest.mark.parametrize("bad", ["yes", "auto", 1, 0, 1.0, [True]])
def test_calib_channels_last_rejects_other_values_by_name(bad) -> None:
    with pytest.raises(ValueError, match=r"calib_channels_last: expected true, false or null"):
        get_experiment_preset("quick").with_overrides({"calib_channels_last": bad})


def test_recipe_description_states_the_warmup_actually_used() -> None:
    r = get_experiment_preset("quick").with_overrides({"finetune": {"steps": 4}}).finetune
    assert r.warmup_steps == 10
    assert "4 linear warm-up steps" in r.describe()


def test_relu_control_shares_the_data_settings_of_the_tsra_model(tmp_path) -> None:
    """The class count is the data's and the test images are the TSRA model's: the ReLU
    control takes them from ``train``, its own schedule from ``train_relu_overrides``."""
    from cobkern.experiments import Context

    cfg = get_experiment_preset("quick").with_overrides({
        "train": {"num_classes": 3, "test_subset": 50, "width": 0.0625, "steps": 7},
        "train_relu_overrides": {"steps": 5}})
    relu = Context(tmp_path / "x", cfg, device="cpu", progress=False).train_config("relu")
    assert (relu.num_classes, relu.test_subset, relu.width, relu.steps) == (3, 50, 0.0625, 5)
    cfg = cfg.with_overrides({"train_relu_overrides": {"num_classes": 4}})
    relu = Context(tmp_path / "x", cfg, device="cpu", progress=False).train_config("relu")
    assert relu.num_classes == 4  # an explicit override still wins


def test_every_fraction_list_and_name_is_validated() -> None:
    """Negative fractions, every fraction list (speed too), the frontier tolerance's open
    interval, the normaliser and the normaliser experiment's importance are all checked."""
    quick = get_experiment_preset("quick")
    for bad in ({"fractions": [-0.1]}, {"peer_fractions": [-0.5]}, {"speed_fractions": [1.0]},
                {"speed_fractions": [-0.2]}, {"frontier_tolerance": 0.0},
                {"frontier_tolerance": 1.0}, {"normalizer": "median"},
                {"normalizer_importance": "l3"}):
        with pytest.raises(ValueError):
            quick.with_overrides(bad)
    ok = quick.with_overrides({"fractions": [0.0, 0.999], "frontier_tolerance": 0.005,
                               "normalizer": "original", "normalizer_importance": "l1"})
    assert ok.fractions == [0.0, 0.999] and ok.normalizer == "original"


@pytest.mark.parametrize("installed", [True, False])
def test_layout_model_file_names_what_training_writes(tmp_path, monkeypatch, installed) -> None:
    """With no model yet, ``Layout.model_file`` names the file training would write: a
    ``.safetensors`` path without the package could not be saved to (it was the fallback
    whatever was installed). An existing file of either kind wins."""
    from cobkern.experiments import Layout
    from cobkern.models import io

    monkeypatch.setattr(io, "safetensors_available", lambda: installed)
    layout = Layout(tmp_path)
    want = "model.safetensors" if installed else "model.pt"
    assert layout.model_file("relu") == tmp_path / "train-relu" / want
    (tmp_path / "train").mkdir()
    other = "model.pt" if installed else "model.safetensors"
    (tmp_path / "train" / other).write_bytes(b"")
    assert layout.model_file() == tmp_path / "train" / other


def test_record_keys_tell_close_strategy_values_apart() -> None:
    """Keys wrote values with :g (six digits): 0.1234567 and 0.1234568 had one key, so the
    second value silently reused the first one's record. Values :g writes exactly keep
    their earlier keys (records of earlier runs stay reusable)."""
    from cobkern.experiments.sweeps import json_value

    assert json_value([0.1234567, 0.1234568]) == "0.1234567,0.1234568"
    assert json_value(0.9999995) != json_value(0.9999999)
    assert json_value([0.5, 0.7]) == "0.5,0.7" and json_value(1e-07) == "1e-07"
    assert json_value(3) == "3" and json_value("max") == "max"


@pytest.mark.parametrize("seed, words", [(-1, "seed must be >= 0"), (2**63, "seed must be < 2")])
def test_the_experiment_seed_is_bounded_like_the_trainings(seed, words) -> None:
    """A negative or 64-bit-overflowing seed passed the experiment config and failed later
    (the loaders refuse negative seeds; torch's are 64-bit)."""
    with pytest.raises(ValueError, match=words):
        get_experiment_preset("quick").with_overrides({"seed": seed})


def test_the_peers_experiment_without_torch_pruning_is_refused_before_any_work(
        tmp_path, monkeypatch, capsys) -> None:
    """Torch-Pruning is an extra: without it `cobkern run` trained, calibrated and swept,
    then died at the peers with a ModuleNotFoundError traceback. It is now one error line
    naming the install and the way to leave the experiment out, before anything is done."""
    import sys

    from cobkern.cli.main import main
    from cobkern.experiments.sweeps import check_requirements

    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # as if not installed
    with pytest.raises(ValueError, match=r"cobkern\[prune\].*--experiments fixed,speed"):
        check_requirements(["fixed", "peers", "speed"])
    check_requirements(["fixed", "speed"])
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--set", 'train={"steps": 1}']) == 2
    assert "peers experiment needs Torch-Pruning" in capsys.readouterr().err
    assert not (out / "train").exists()


def test_set_merges_a_settings_group_into_the_config_files_and_the_saved_one(tmp_path) -> None:
    """``--set train={"width": ...}`` replaced the whole ``train`` group of the --config file
    (or of OUT/config.json: an existing run was then refused as "trained with batch_size=32,
    but these settings ask for 128"), and ``--set finetune=`` fell back to the preset's
    steps instead of the file's. Groups now merge key by key; other values are replaced."""
    from cobkern.cli.main import _experiment_config, build_parser

    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"train": {"steps": 100, "lr": 0.005}, "finetune": {"steps": 7},
                             "fractions": [0.0, 0.5]}))
    args = build_parser().parse_args([
        "run", "--out", str(tmp_path / "new"), "--config", str(f),
        "--set", 'train={"width": 0.0625}', "--set", 'finetune={"lr": 0.001}',
        "--set", "fractions=[0.0, 0.3]"])
    cfg = _experiment_config(args, preset=args.preset)
    assert cfg.train == {"steps": 100, "lr": 0.005, "width": 0.0625}
    assert (cfg.finetune.steps, cfg.finetune.lr) == (7, 0.001)
    assert cfg.fractions == [0.0, 0.3]
    # on top of a saved OUT/config.json, likewise
    saved = get_experiment_preset("quick").with_overrides({"train": {"batch_size": 32}})
    assert saved.with_overrides({"train": {"width": 0.0625}}).train == {
        **get_experiment_preset("quick").train, "batch_size": 32, "width": 0.0625}


def test_an_unknown_training_setting_lists_the_valid_ones_without_arch() -> None:
    """The list of valid settings named 'arch', which `train` / `train_relu_overrides` then
    refuse ("'arch' is not a setting here")."""
    for key in ("train", "train_relu_overrides"):
        with pytest.raises(ValueError, match=rf"{key}: unknown setting\(s\) \['bogus'\]") as e:
            get_experiment_preset("quick").with_overrides({key: {"bogus": 1}})
        assert "'steps'" in str(e.value) and "'arch'" not in str(e.value)


def test_an_experiment_directory_still_refuses_a_model_trained_on_another_data_root(
        tmp_path) -> None:
    """The trainer now resumes from the same data at another data_root (it checks the
    images by fingerprint); the sweeps' records do not fingerprint the data, so an
    experiment directory keeps refusing a model trained with another data_root."""
    from dataclasses import asdict

    from cobkern.experiments import Context
    from cobkern.experiments.pipeline import check_trained_settings, trained_with

    cfg = get_experiment_preset("quick").with_overrides({"train": {"data_root": "/a"}})
    ctx = Context(tmp_path / "x", cfg, device="cpu", progress=False)
    d = ctx.layout.train_dir("tsra")
    d.mkdir(parents=True)
    saved = asdict(ctx.train_config("tsra"))
    (d / "config.json").write_text(json.dumps({**saved, "device": "cuda"}))
    check_trained_settings(ctx)  # a resume-free field: accepted
    assert trained_with(ctx)
    (d / "config.json").write_text(json.dumps({**saved, "data_root": "/b"}))
    with pytest.raises(ValueError, match="trained with data_root='/b'"):
        check_trained_settings(ctx)
    assert not trained_with(ctx)
