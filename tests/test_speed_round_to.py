"""The speed experiment with ``speed_round_to``: CoB models also timed with widths rounded to
multiples of N, in records and report rows of their own.

The sweep runs on a width-1/16 TSRA VGG (random weights, no training: only the widths and the
record keys matter here) calibrated on random images. At width 1/16 the widest subspaces have
16 channels, so ``P = 0.7`` (per-subspace ratio 0.45) keeps 9 of them unrounded and 12 with
``round_to`` 4. The report tests build ``report.md`` from hand-written records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cobkern.experiments import Context, ExperimentConfig, get_experiment_preset, sweeps
from cobkern.experiments.files import append_jsonl, atomic_write_json
from cobkern.models import save_model, vgg16_tsra
from cobkern.report import build_report

ROUND = 4
P = 0.7
BATCHES = [1, 4]


@pytest.fixture(scope="module", autouse=True)
def _reference_ops():
    """Plain-PyTorch ops: under TRITON_INTERPRET=1 (conftest, no GPU) the Triton kernels
    would run in the interpreter, which the kernel tests cover."""
    from cobkern.ops import use_backend

    with use_backend("reference"):
        yield


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("bad", [[0], [-8], [2.0], [True], ["8"], 8, None, [1, False]])
def test_bad_speed_round_to_names_the_field(bad: object) -> None:
    with pytest.raises(ValueError, match="speed_round_to"):
        get_experiment_preset("quick").with_overrides({"speed_round_to": bad})


def test_speed_round_to_default_presets_and_round_trip() -> None:
    assert ExperimentConfig().speed_round_to == [1]
    assert get_experiment_preset("quick").speed_round_to == [1]  # its CPU run time stays
    for name in ("fast", "paper"):
        cfg = get_experiment_preset(name)
        assert 1 in cfg.speed_round_to and 8 in cfg.speed_round_to, name
        assert ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # a config.json written before the field existed still loads, without rounding
    old = get_experiment_preset("paper").to_dict()
    del old["speed_round_to"]
    assert ExperimentConfig.from_dict(old).speed_round_to == [1]
    ok = get_experiment_preset("quick").with_overrides({"speed_round_to": [1, 8, 16]})
    assert ok.speed_round_to == [1, 8, 16]


# ---------------------------------------------------------------------------- the sweep
class _Bar:
    def __init__(self) -> None:
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n


def _images(n: int, seed: int):
    from cobkern.data import ImageSet

    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (n,), generator=g))


def _context(out: Path, round_to: list[int]) -> Context:
    cfg = get_experiment_preset("quick").with_overrides({
        "calib_samples": 64, "calib_batch_size": 32, "eval_subset": 0, "eval_batch_size": 16,
        "speed_fractions": [P], "speed_round_to": round_to, "speed_batches": BATCHES,
        "speed_repeats": 1, "experiments": ["speed"]})
    return Context(out, cfg, device="cpu", progress=False, data=(_images(64, 0), _images(8, 1)))


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A sweep with ``speed_round_to=[1]`` (today's), then the same directory with
    ``[1, ROUND]``; the widths of every model the second sweep timed."""
    out = tmp_path_factory.mktemp("speed_round_to") / "out"
    torch.manual_seed(0)
    ctx = _context(out, [1])
    save_model(vgg16_tsra(num_classes=10, width=0.0625), ctx.layout.model_file("tsra"))
    ctx.calibrate()
    bar1 = _Bar()
    sweeps.speed(ctx, bar1)
    first = ctx.records()

    timed: list[tuple[int, list[dict]]] = []
    real = sweeps.measure_speed

    def spy(model, batch, device, **kw):
        timed.append((batch, sweeps.layer_widths(model)))
        return real(model, batch, device, **kw)

    ctx2 = _context(out, [1, ROUND])
    bar2 = _Bar()
    mp = pytest.MonkeyPatch()
    mp.setattr(sweeps, "measure_speed", spy)
    try:
        sweeps.speed(ctx2, bar2)
    finally:
        mp.undo()
    dev = f"CPU ({torch.get_num_threads()} threads)"
    return {"ctx": ctx, "ctx2": ctx2, "first": first, "all": ctx2.records(), "bar1": bar1.n,
            "bar2": bar2.n, "timed": timed, "dev": dev,
            "full": sweeps.layer_widths(ctx.model())}


def test_unrounded_keys_are_today_s_and_resume(swept: dict) -> None:
    dev = swept["dev"]
    first = swept["first"]
    want = {f"speed|{m}|{p}|b{b}|{dev}" for m, p in (("unpruned", "0"), ("cob", "0.7"))
            for b in BATCHES}
    assert {r["key"] for r in first} == want
    assert not any("round_to" in r for r in first)
    # the second sweep measured only the rounded model: nothing of the first again
    new = swept["all"][len(first):]
    assert swept["all"][:len(first)] == first
    assert {r["key"] for r in new} == {f"speed|cob|0.7|r{ROUND}|b{b}|{dev}" for b in BATCHES}
    assert all(r["round_to"] == ROUND and r["target"] == P and r["method"] == "cob"
               for r in new)
    assert sorted(b for b, _ in swept["timed"]) == BATCHES  # only the rounded model timed


def test_rounded_widths_are_multiples_or_whole(swept: dict) -> None:
    full = {w["name"]: w for w in swept["full"]}
    rounded_down = 0
    for _, widths in swept["timed"]:
        for w in widths:
            f = full[w["name"]]
            for kept, size in ((w["split"], f["split"]),
                               (w["channels"] - w["split"], f["channels"] - f["split"])):
                assert kept % ROUND == 0 or kept == size, (w, f)
                rounded_down += kept % ROUND == 0 and 0 < kept < size
    assert rounded_down > 0  # some subspace was really pruned to a multiple
    # the unrounded model of the same fraction is another model: fewer parameters
    recs = {r["key"]: r for r in swept["all"]}
    dev = swept["dev"]
    r1, r4 = recs[f"speed|cob|0.7|b1|{dev}"], recs[f"speed|cob|0.7|r{ROUND}|b1|{dev}"]
    assert r1["params"] < r4["params"] < recs[f"speed|unpruned|0|b1|{dev}"]["params"]
    m1, _ = swept["ctx"].prune(("param_target", [P, P]), importance="l2", cob=True)
    assert any(w["channels"] % ROUND for w in sweeps.layer_widths(m1))


def test_count_matches_the_records(swept: dict) -> None:
    n_first = len(swept["first"])
    assert sweeps._count(swept["ctx"], "speed") == n_first == swept["bar1"]
    assert sweeps._count(swept["ctx2"], "speed") == len(swept["all"]) == swept["bar2"]
    # a resumed sweep measures nothing and still fills the bar
    bar = _Bar()
    sweeps.speed(swept["ctx2"], bar)
    assert bar.n == sweeps._count(swept["ctx2"], "speed")
    assert len(swept["ctx2"].records()) == len(swept["all"])


# ---------------------------------------------------------------------------- the report
def _speed(key: str, method: str, target: float, params: int, flops: int, batch: int,
           latency: float, round_to: int = 1) -> dict:
    r = {"experiment": "speed", "key": key, "method": method, "target": target,
         "params": params, "flops": flops, "batch": batch, "latency_ms": latency,
         "throughput": batch / latency * 1e3, "device": "CPU"}
    if round_to != 1:
        r["round_to"] = round_to
    return r


UNROUNDED = [
    _speed("speed|unpruned|0|b1|cpu", "unpruned", 0.0, 1000, 8_000_000, 1, 2.0),
    _speed("speed|unpruned|0|b64|cpu", "unpruned", 0.0, 1000, 8_000_000, 64, 40.0),
    _speed("speed|cob|0.9|b1|cpu", "cob", 0.9, 100, 1_000_000, 1, 1.0),
    _speed("speed|cob|0.9|b64|cpu", "cob", 0.9, 100, 1_000_000, 64, 10.0),
]
ROUNDED = [
    _speed("speed|cob|0.9|r8|b1|cpu", "cob", 0.9, 160, 2_000_000, 1, 0.5, 8),
    _speed("speed|cob|0.9|r8|b64|cpu", "cob", 0.9, 160, 2_000_000, 64, 8.0, 8),
]
#: The speed table of UNROUNDED as the report wrote it before ``round_to`` existed.
TODAY = """\
| model | params | GFLOPs/img | latency ms (batch 1) | images/s (batch 64) | FLOPs × | latency × | throughput × |
|---|---|---|---|---|---|---|---|
| unpruned | 1,000 | 0.0080 | 2.00 | 1600 | 1.00 | 1.00 | 1.00 |
| CoB 90% | 100 | 0.0010 | 1.00 | 6400 | 8.00 | 2.00 | 4.00 |"""  # noqa: E501


def _report(tmp_path: Path, records: list[dict]) -> Path:
    out = tmp_path / "out"
    atomic_write_json(out / "config.json", {"experiment": ExperimentConfig(
        experiments=["speed"]).to_dict()})
    for r in records:
        append_jsonl(out / "metrics.jsonl", r)
    build_report(out)
    return out


def test_report_without_rounded_records_is_unchanged(tmp_path: Path) -> None:
    out = _report(tmp_path, UNROUNDED)
    text = (out / "report.md").read_text()
    assert TODAY in text
    assert "most pruned model (CoB 90%) has 8.00× fewer FLOPs and 4.00× the throughput" in text
    for f in ("report.md", "summary.json", "tables/speed.csv"):
        assert "round_to" not in (out / f).read_text(), f


def test_rounded_models_get_rows_of_their_own(tmp_path: Path) -> None:
    out = _report(tmp_path, UNROUNDED + ROUNDED)
    text = (out / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| CoB 90%")]
    assert rows == ["| CoB 90% | 100 | 0.0010 | 1.00 | 6400 | 8.00 | 2.00 | 4.00 |",
                    "| CoB 90% (round_to 8) | 160 | 0.0020 | 0.50 | 8000 | 4.00 | 4.00 | 5.00 |"]
    assert "| unpruned | 1,000 | 0.0080 | 2.00 | 1600 | 1.00 | 1.00 | 1.00 |" in text
    s = json.loads((out / "summary.json").read_text())
    by = {(r["target"], r.get("round_to", 1)): r for r in s["speed"]}
    assert set(by) == {(0.0, 1), (0.9, 1), (0.9, 8)}
    assert by[(0.9, 1)]["params"] == 100 and "round_to" not in by[(0.9, 1)]
    assert by[(0.9, 8)]["flops_ratio"] == 4.0 and by[(0.9, 8)]["speedup_b1"] == 4.0
    assert by[(0.9, 8)]["speedup_bmax"] == pytest.approx(5.0)  # vs unpruned, not vs CoB 90%
    # the rounded rows come after the unrounded one whatever order they were written in
    out2 = _report(tmp_path / "b", ROUNDED + UNROUNDED)
    assert [r.get("round_to", 1) for r in json.loads(
        (out2 / "summary.json").read_text())["speed"]] == [1, 1, 8]


def test_speed_csv_names_round_to_only_when_a_rounded_model_was_timed(tmp_path: Path) -> None:
    """``tables/speed.csv`` had a fixed column list, so a rounded row could be told from the
    unrounded one of the same target only by its parameter count."""
    import csv

    rows = list(csv.DictReader(
        (_report(tmp_path, UNROUNDED + ROUNDED) / "tables" / "speed.csv").open()))
    assert [(r["method"], r["target"], r["round_to"]) for r in rows] == [
        ("unpruned", "0.0", ""), ("cob", "0.9", "1"), ("cob", "0.9", "8")]
    plain = (_report(tmp_path / "b", UNROUNDED) / "tables" / "speed.csv").read_text()
    assert "round_to" not in plain
