"""Experiment settings, presets and the speed helpers."""

from __future__ import annotations

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
