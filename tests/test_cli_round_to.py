"""`cobkern prune --round-to N`: each subspace keeps a multiple of N channels (or all of them).

Through the real CLI on a tiny synthetic ImageFolder and a width-1/16 TSRA VGG trained for a
few steps (as tests/test_cli_pipeline.py, but only `train` and `calibrate`, not the sweeps).
At width 1/16 the widest subspaces have 16 channels, so ``ratio 0.7`` keeps 5 of them
unrounded and 8 with ``--round-to 8``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from imagefolder_tools import write_imagefolder

from cobkern.cli.main import main
from cobkern.experiments.files import read_jsonl

N_TRAIN, N_TEST = 12, 6  # per class
ROUND = 8
PRUNE = ["prune", "--strategy", "ratio", "--value", "0.7", "--no-progress"]
TRAIN = {"width": 0.0625, "steps": 2, "batch_size": 40, "warmup_steps": 1, "train_subset": 0,
         "eval_batch_size": 60, "checkpoint_every": 0, "log_every": 1}


@pytest.fixture(scope="module", autouse=True)
def _reference_ops():
    """Plain-PyTorch ops: under TRITON_INTERPRET=1 (conftest, no GPU) the Triton kernels
    would run in the interpreter, which the kernel tests cover."""
    from cobkern.ops import use_backend

    with use_backend("reference"):
        yield


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """``(out, rounded name, unrounded name)``: trained, calibrated, pruned both ways."""
    tmp = tmp_path_factory.mktemp("round_to")
    write_imagefolder(tmp / "data", N_TRAIN, N_TEST)
    out = tmp / "out"
    o = str(out)
    train = {**TRAIN, "data_source": "imagefolder", "data_root": str(tmp / "data"),
             "cache_dir": str(tmp / "cache")}
    argv = ["train", "--out", o, "--no-progress"]
    for k, v in train.items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    assert main(argv) == 0
    assert main(["calibrate", "--out", o, "--samples", "100", "--no-progress"]) == 0
    before: set[str] = set()
    names = []
    for extra in (["--round-to", str(ROUND)], []):
        assert main([*PRUNE, "--out", o, *extra]) == 0
        now = {p.name for p in (out / "pruned").iterdir()}
        (new,) = now - before  # each prune made exactly one new directory
        names.append(new)
        before = now
    return out, names[0], names[1]


def _subspaces(layer: dict) -> list[tuple[int, int]]:
    """``[(U kept, U size), (V kept, V size)]`` of a prune.json layer."""
    u0, u1 = layer["split_before"], layer["split_after"]
    return [(u1, u0), (layer["channels_after"] - u1, layer["channels_before"] - u0)]


def _info(out: Path, name: str) -> dict:
    return json.loads((out / "pruned" / name / "prune.json").read_text())


def test_every_subspace_is_a_multiple_or_whole(pruned: tuple[Path, str, str]) -> None:
    out, rounded, plain = pruned
    info = _info(out, rounded)
    assert info["layers"]
    rounded_down = 0  # subspaces that kept a multiple of ROUND below their size
    for layer in info["layers"]:
        for kept, size in _subspaces(layer):
            assert kept % ROUND == 0 or kept == size, (layer, kept, size)
            rounded_down += kept % ROUND == 0 and 0 < kept < size
    assert rounded_down > 0  # some subspace really was pruned (not just kept whole)
    # the unrounded prune of the same options keeps a count that is not a multiple
    assert any(kept % ROUND and kept < size
               for layer in _info(out, plain)["layers"] for kept, size in _subspaces(layer))
    # the saved model has the widths prune.json says
    from cobkern.cob.discovery import find_cob_layers
    from cobkern.models import load_model

    (file,) = [p for p in (out / "pruned" / rounded).iterdir() if p.name.startswith("model.")]
    got = {lay.name: (lay.num_channels, lay.split) for lay in find_cob_layers(load_model(file))}
    for layer in info["layers"]:
        assert got[layer["name"]] == (layer["channels_after"], layer["split_after"])
    assert info["total_after"] > _info(out, plain)["total_after"]  # rounding keeps more


def test_round_to_is_recorded_only_when_used(pruned: tuple[Path, str, str]) -> None:
    out, rounded, plain = pruned
    info = _info(out, rounded)
    assert info["round_to"] == ROUND and info["meta"]["round_to"] == ROUND
    assert "round_to" not in _info(out, plain)  # unrounded files stay as they were
    recs = {r["name"]: r for r in read_jsonl(out / "metrics.jsonl")
            if r.get("experiment") == "prune"}
    assert recs[rounded]["round_to"] == ROUND
    assert "round_to" not in recs[plain]


def test_default_names_differ(pruned: tuple[Path, str, str]) -> None:
    _, rounded, plain = pruned
    assert plain == "cob-l2-ratio-0.7-0.7-kept"
    assert rounded == f"cob-l2-ratio-0.7-0.7-r{ROUND}-kept"


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_bad_round_to_is_a_user_error(bad: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "x"
    assert main([*PRUNE, "--out", str(out), "--round-to", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and f"--round-to {bad}" in err
    assert not out.exists()  # refused before anything is read or written


def test_context_refuses_a_strategy_with_another_round_to(
        pruned: tuple[Path, str, str]) -> None:
    from cobkern.experiments import Context
    from cobkern.pruning import make_strategy

    ctx = Context(pruned[0], progress=False)
    with pytest.raises(ValueError, match="round_to"):
        ctx.prune(make_strategy("ratio", (0.5, 0.5), round_to=4), round_to=ROUND)
    # the same round_to on both is fine, and rounds like the CLI
    _, report = ctx.prune(make_strategy("ratio", (0.7, 0.7), round_to=ROUND), round_to=ROUND)
    assert report.total_after == _info(pruned[0], pruned[1])["total_after"]
