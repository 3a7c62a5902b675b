"""Per-device TSRA tuning tables (``cobkern.ops.tuning``): file validation, the lookup rule,
the ops launching through a table, and ``bench/gpu_diag.py`` writing tables this reads.

Numerical tolerances are those of ``test_tsra_kernels.py`` (float64 reference at the same
rounded input): a table only changes which tile computes the function.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from reference64 import tsra64_grad

from cobkern.ops import rmsnorm_tsra
from cobkern.ops.tuning import (
    ENV_VAR,
    FORMAT,
    TABLE_DIR,
    launch_tuning,
    load_table,
    table_for_device,
    table_name,
)

ROOT = Path(__file__).resolve().parents[1]


def _entry(**kw) -> dict:
    e = dict(direction="forward", itemsize=4, channels_last=False, C=64, split=32, P=1024,
             tile_elems=1024, elems_per_thread=32, num_warps=1, vec_p=2)
    e.update(kw)
    return e


def _write(tmp_path: Path, entries: list[dict], name: str = "table.json", **top) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"format": FORMAT, "device": "Test GPU", "entries": entries,
                                **top}))
    return path


def test_table_name_matches_torch_device_names():
    assert table_name("NVIDIA H200") == "NVIDIA_H200"
    assert table_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert table_name(" NVIDIA  A100-SXM4-40GB ") == "NVIDIA_A100_SXM4_40GB"


def test_shipped_tables_are_valid_and_named_after_their_device():
    """Every table in the package loads, and its file name is its recorded device's."""
    for path in sorted(TABLE_DIR.glob("*.json")):
        table = load_table(path)
        assert path.stem == table_name(table.device), path
        assert table.entries, f"{path}: an empty table should not be shipped"


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a JSON tuning table"),
    (json.dumps({"format": "other/1", "entries": []}), "expected a tuning table"),
    (json.dumps({"format": FORMAT, "entries": {}}), '"entries" must be a list'),
    (json.dumps({"format": FORMAT, "entries": [3]}), "entry 0: expected an object"),
    (json.dumps({"format": FORMAT, "entries": [{"direction": "forward"}]}),
     "entry 0: missing field(s)"),
    (json.dumps({"format": FORMAT, "entries": [_entry(direction="sideways")]}),
     "entry 0: direction must be one of"),
    (json.dumps({"format": FORMAT, "entries": [_entry(num_warps=3)]}),
     "entry 0: num_warps must be one of"),
    (json.dumps({"format": FORMAT, "entries": [_entry(), _entry(tile_elems=48)]}),
     "entry 1: tile_elems must be a power of two"),
    (json.dumps({"format": FORMAT, "entries": [_entry(vec_p=32)]}),
     "entry 0: vec_p must be 0 or a power of two"),
    (json.dumps({"format": FORMAT, "entries": [_entry(itemsize=8)]}),
     "entry 0: itemsize must be 2 or 4"),
    (json.dumps({"format": FORMAT, "entries": [_entry(C=True)]}), "entry 0: C must be"),
    (json.dumps({"format": FORMAT, "entries": [_entry(split=64)]}),
     "entry 0: split must be in [1, C)"),
    (json.dumps({"format": FORMAT, "entries": [_entry(channels_last="no")]}),
     "entry 0: channels_last must be true or false"),
    (json.dumps({"format": FORMAT, "entries": [_entry(), _entry(num_warps=2)]}),
     "entries 0 and 1 both describe"),
    (json.dumps({"format": FORMAT, "entries": [_entry(rmsnorm="yes")]}),
     "entry 0: rmsnorm must be true, false or absent"),
    (json.dumps({"format": FORMAT, "entries": [_entry(programs_per_sm=4)]}),
     "entry 0: programs_per_sm (the streaming kernel) is a backward option"),
    (json.dumps({"format": FORMAT, "entries": [_entry(direction="backward",
                                                      programs_per_sm=-1)]}),
     "entry 0: programs_per_sm must be an int in [0, 64]"),
    (json.dumps({"format": FORMAT, "entries": [_entry(direction="backward",
                                                      programs_per_sm="4")]}),
     "entry 0: programs_per_sm must be an int in [0, 64]"),
    (json.dumps({"format": FORMAT, "entries": [_entry(rmsnorm=True),
                                               _entry(rmsnorm=True, num_warps=2)]}),
     "entries 0 and 1 both describe"),
    # the streaming backward runs on the split kernels only: a channels-last split that is
    # not a multiple of 16 takes the tile kernel (the entry loaded, its first launch failed)
    (json.dumps({"format": FORMAT, "entries": [_entry(direction="backward", channels_last=True,
                                                      C=40, split=20, programs_per_sm=4)]}),
     "entry 0: programs_per_sm (the streaming kernel) needs the split kernels"),
    (json.dumps({"format": FORMAT, "entries": [_entry(direction="backward", C=20000,
                                                      split=10000, programs_per_sm=4)]}),
     "entry 0: programs_per_sm (the streaming kernel) needs the split kernels"),
])
def test_bad_tables_are_refused_naming_file_and_entry(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        load_table(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_table_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_table(tmp_path / "nope.json")


def test_lookup_matches_geometry_exactly_and_batch_positions_within_a_factor_of_two(tmp_path):
    table = load_table(_write(tmp_path, [
        _entry(C=64, P=1024, num_warps=1, channels_last=True),
        _entry(C=64, P=256, num_warps=2, channels_last=True),
        _entry(C=64, P=1024, num_warps=4, direction="backward", channels_last=True),
        _entry(C=64, P=1024, num_warps=8, itemsize=2, channels_last=True),
        _entry(C=4096, split=2048, P=1024, num_warps=16, channels_last=True),
        _entry(C=8192, split=4096, P=1024, num_warps=16, channels_last=True),
    ]))

    def warps(direction="forward", itemsize=4, cl=True, c=64, split=32, p=1024):
        return table.lookup(direction, itemsize, cl, c, split, p).get("num_warps")

    assert warps() == 1                                 # exact
    assert warps(p=2048) == 1                           # a factor of two: still in
    assert warps(p=600) == 1                            # nearest P (log2 0.77 vs 1.23)
    assert warps(p=400) == 2
    assert warps(p=4096) is None                        # beyond a factor of two
    assert warps(p=100) is None
    assert warps(c=63) is None                          # a pruned width: the heuristic
    assert warps(split=20) is None                      # another split: the heuristic
    assert warps("backward") == 4                       # direction must match
    assert warps(itemsize=2) == 8                       # element size must match
    assert warps(cl=False) is None                      # layout must match
    assert warps(c=4096, split=2048, p=600) == 16       # linear at another batch
    assert warps(c=8192, split=4096) is None            # chunked kernels: never


def test_channel_major_lookup_needs_the_exact_map_size(tmp_path):
    """NCHW: P is one image's H·W whatever the batch, so a neighbouring P is another layer
    shape (and 2, 4, 8 positions compile SMALL_P variants): no factor-of-two matching."""
    table = load_table(_write(tmp_path, [_entry(C=512, split=256, P=16, num_warps=2),
                                         _entry(C=512, split=256, P=4, num_warps=1)]))

    def warps(p):
        return table.lookup("forward", 4, False, 512, 256, p).get("num_warps")

    assert (warps(16), warps(4)) == (2, 1)
    assert warps(8) is None and warps(32) is None and warps(5) is None


def test_lookup_ties_go_to_the_smaller_batch(tmp_path):
    table = load_table(_write(tmp_path, [_entry(P=2048, num_warps=2, channels_last=True),
                                         _entry(P=512, num_warps=1, channels_last=True)]))
    assert table.lookup("forward", 4, True, 64, 32, 1024)["num_warps"] == 1


def test_lookup_prefers_the_launch_s_own_op_and_never_the_other_one(tmp_path):
    """``rmsnorm``: an entry timed on RMSNorm→TSRA serves only its launches, one timed on
    TSRA only TSRA's, one without the field (the tables before the sweep recorded the op)
    either; where both kinds match, the launch's own op wins."""
    table = load_table(_write(tmp_path, [
        _entry(num_warps=1),                                    # either op
        _entry(num_warps=2, rmsnorm=True),
        _entry(direction="backward", num_warps=4, rmsnorm=False),
        _entry(C=128, split=64, P=256, num_warps=8, rmsnorm=True),
    ]))

    def warps(rms, direction="forward", c=64, split=32, p=1024):
        return table.lookup(direction, 4, False, c, split, p, rmsnorm=rms).get("num_warps")

    assert (warps(True), warps(False)) == (2, 1)
    assert (warps(False, "backward"), warps(True, "backward")) == (4, None)
    assert (warps(True, c=128, split=64, p=256), warps(False, c=128, split=64, p=256)) == (
        8, None)
    assert table.lookup("forward", 4, False, 64, 32, 1024)["num_warps"] == 1  # default: TSRA
    cpu = torch.device("cpu")
    path = str(tmp_path / "table.json")
    assert launch_tuning(cpu, "forward", 4, False, 64, 32, 1024, path,
                         rmsnorm=True)["num_warps"] == 2
    assert launch_tuning(cpu, "forward", 4, False, 64, 32, 1024, path)["num_warps"] == 1


def test_environment_selects_or_disables_the_table(tmp_path, monkeypatch):
    path = _write(tmp_path, [_entry(C=64, split=32, P=16, num_warps=2)])
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert table_for_device(cpu) is None                       # no CUDA: no shipped table
    assert launch_tuning(cpu, "forward", 4, False, 64, 32, 16) == {}
    monkeypatch.setenv(ENV_VAR, str(path))
    assert table_for_device(cpu).source == str(path)
    assert launch_tuning(cpu, "forward", 4, False, 64, 32, 16)["num_warps"] == 2
    monkeypatch.setenv(ENV_VAR, "off")
    assert table_for_device(cpu) is None
    assert launch_tuning(cpu, "forward", 4, False, 64, 32, 16) == {}


def test_environment_pointing_at_a_bad_table_fails_loudly(tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    monkeypatch.setenv(ENV_VAR, str(bad))
    with pytest.raises(ValueError, match="expected a tuning table"):
        launch_tuning(torch.device("cpu"), "forward", 4, False, 64, 32, 16)


@pytest.mark.parametrize("stream", [0, 2], ids=["tiles", "streaming"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ops_launch_through_the_table_and_compute_the_same_function(tmp_path, monkeypatch,
                                                                      dtype, stream, device):
    """RMSNorm→TSRA forward and backward through the public op with a table whose entries
    change warps, tile and vector width (and, ``streaming``, put the backward on the
    streaming kernel, 2 programs per multiprocessor): the launch receives the overrides,
    and the result still matches float64."""
    import importlib

    from cobkern.kernels import tsra as k

    ops_tsra = importlib.import_module("cobkern.ops.tsra")  # the module, not the op

    if device.type == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs the Triton interpreter on a CPU")
    shape, split = (2, 48, 5, 6), 20          # NCHW, C=48, P=30 (a 5×6 map, any batch)
    size = torch.tensor([], dtype=dtype).element_size()
    path = _write(tmp_path, [
        _entry(C=48, split=20, P=30, itemsize=size, tile_elems=1024, elems_per_thread=16,
               num_warps=1, vec_p=2),
        _entry(C=48, split=20, P=30, itemsize=size, direction="backward", tile_elems=512,
               elems_per_thread=16, num_warps=2, vec_p=0, programs_per_sm=stream),
    ])
    seen = []
    shipped = k.specialization

    def spy(*args, **tuning):
        assert tuning.get("has_bias") is False  # the plan's own switch, not an override
        seen.append((args[4], {k: v for k, v in tuning.items() if k != "has_bias"}))
        return shipped(*args, **tuning)

    monkeypatch.setattr(k, "specialization", spy)
    monkeypatch.setattr(ops_tsra, "_PLANS", {})  # plans of other tests' runs not reused
    monkeypatch.setenv(ENV_VAR, str(path))
    x = torch.randn(shape).to(device=device, dtype=dtype)
    dy = torch.randn(shape).to(device=device, dtype=dtype)
    xg = x.clone().requires_grad_(True)
    y = rmsnorm_tsra(xg, split)
    (dx,) = torch.autograd.grad(y, xg, dy)
    bwd = dict(tile_elems=512, elems_per_thread=16, num_warps=2, vec_p=0)
    assert seen == [
        ("forward", dict(tile_elems=1024, elems_per_thread=16, num_warps=1, vec_p=2)),
        ("backward", dict(bwd, programs_per_sm=stream) if stream else bwd),
    ]
    y64, dx64 = tsra64_grad(x.cpu(), dy.cpu(), split, 1, norm_size=None, rms_eps=1e-6)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(y.detach().cpu().double(), y64, **tol)
    torch.testing.assert_close(dx.cpu().double(), dx64, **tol)

    seen.clear()
    monkeypatch.setenv(ENV_VAR, "off")
    rmsnorm_tsra(x, split)
    assert seen == [("forward", {})]


# --------------------------------------------------------------- bench/gpu_diag.py writes it
def _diag_rows(times: dict[tuple, float], default: tuple) -> list[dict]:
    rows = []
    for cfg, ms in times.items():
        tile, ept, warps, vec_p = cfg
        rows.append(dict(shape=[64, 32, 32], dtype="bf16", direction="backward", tile=tile,
                         ept=ept, warps=warps, vec_p=vec_p, C=64, split=32, P=1024,
                         channels_last=False, itemsize=2, default=cfg == default, ms=ms))
    return rows


@pytest.fixture
def gpu_diag():
    sys.path.insert(0, str(ROOT))
    try:
        from bench import gpu_diag
        yield gpu_diag
    finally:
        sys.path.remove(str(ROOT))


def test_gpu_diag_table_keeps_only_clear_winners(gpu_diag, tmp_path):
    default = (4096, 16, 8, 0)
    rec = {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "date": "d",
           "tiles": _diag_rows({default: 0.400, (1024, 32, 1, 2): 0.100,
                                (512, 16, 1, 2): 0.150}, default)
                    # another problem where the best candidate is within noise of the default
                    + [dict(r, direction="forward") for r in _diag_rows(
                        {default: 0.100, (1024, 32, 1, 2): 0.099}, default)]
                    + [dict(shape=[64, 32, 32], dtype="bf16", direction="forward",
                            error="compile failed")]}
    table = gpu_diag.write_tuning_table(rec, str(tmp_path / "tsra_tuning.json"))
    assert [(e["direction"], e["num_warps"], e["vec_p"]) for e in table["entries"]] == [
        ("backward", 1, 2)]
    loaded = load_table(tmp_path / "tsra_tuning.json")   # the writer's output is readable
    assert loaded.device == "NVIDIA H200"
    assert loaded.lookup("backward", 2, False, 64, 32, 1024) == dict(
        tile_elems=1024, elems_per_thread=32, num_warps=1, vec_p=2)
    assert loaded.lookup("forward", 2, False, 64, 32, 1024) == {}


def test_every_sweep_candidate_is_a_valid_table_entry(gpu_diag, tmp_path):
    """Whatever candidate wins, its entry passes the table's validation: the warps and
    VEC_P the sweep records are those the launcher resolved."""
    from cobkern.kernels.tsra import specialization

    for direction, cfgs in gpu_diag.CONFIGS.items():
        for cfg in cfgs:
            over = gpu_diag._tuning(cfg)
            _, consts, warps, _ = specialization(64, 1024, 32, False, direction, False, 2,
                                                 **over)
            pps = over.get("programs_per_sm", 0)
            row = dict(tile=cfg[0], ept=cfg[1], warps=warps, vec_p=consts["VEC_P"], C=64,
                       split=32, P=1024, channels_last=False, itemsize=2, direction=direction,
                       default=False, ms=0.1, pps=pps)
            table = gpu_diag.write_tuning_table({"tiles": [row]}, str(tmp_path / "t.json"))
            (entry,) = load_table(tmp_path / "t.json").entries
            # a streaming winner ships as one (and the lookup hands the launcher its grid)
            assert entry.tuning.get("programs_per_sm", 0) == pps, (direction, cfg, table)
    assert any(len(c) == 5 for c in gpu_diag.CONFIGS["backward"]), "no streaming candidate"


def test_gpu_diag_table_from_an_earlier_run(gpu_diag, tmp_path):
    default = (4096, 16, 8, 0)
    src = tmp_path / "gpu_diag.json"
    src.write_text(json.dumps({"device": "NVIDIA H200", "tiles": _diag_rows(
        {default: 0.4, (1024, 32, 1, 2): 0.1}, default)}))
    assert gpu_diag.main(["--table-from", str(src), "--out", str(tmp_path / "o"),
                          "--no-base"]) == 0
    assert len(load_table(tmp_path / "o" / "tsra_tuning.json").entries) == 1
    # by default merged with the device's shipped table: its entries for every other
    # problem stay, and those for this problem (timed again, op-less rows: they serve both
    # ops) are replaced by the one new entry
    shipped = load_table(TABLE_DIR / "NVIDIA_H200.json").entries
    swept = ("backward", 2, False, 64, 32, 1024)
    others = [e for e in shipped
              if (e.direction, e.itemsize, e.channels_last, e.C, e.split, e.P) != swept]
    assert len(others) < len(shipped)  # the shipped table has an entry for the problem
    assert gpu_diag.main(["--table-from", str(src), "--out", str(tmp_path / "o")]) == 0
    merged = load_table(tmp_path / "o" / "tsra_tuning.json").entries
    assert len(merged) == len(others) + 1
    assert merged[0].tuning["num_warps"] == 1 and {e.P for e in merged} == {e.P for e in shipped}
    src.write_text(json.dumps({"device": "x", "tiles": []}))
    with pytest.raises(SystemExit):
        gpu_diag.main(["--table-from", str(src), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("fast_read", [True, False])
def test_env_setting_reads_what_os_environ_holds_now(monkeypatch, fast_read):
    """``env_setting()`` (the per-launch read of ``COBKERN_TSRA_TUNING``) returns what
    ``os.environ.get`` returns — unset, empty, a path, a value set or removed a moment
    ago — through CPython's environ dict and through the public fallback alike."""
    from cobkern.ops import tuning

    if not fast_read:
        monkeypatch.setattr(tuning, "_ENV_DATA", None)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert tuning.env_setting() is None
    for value in ("", "off", "/tmp/tables/H200 ü.json"):
        monkeypatch.setenv(ENV_VAR, value)
        assert tuning.env_setting() == value == os.environ.get(ENV_VAR)
    monkeypatch.delenv(ENV_VAR)
    assert tuning.env_setting() is None


def test_gpu_diag_table_records_the_op_and_keeps_the_base_for_what_it_did_not_time(
        gpu_diag, tmp_path):
    """A sweep of RMSNorm→TSRA at one problem, merged with a base table (the shipped one on
    a GPU): the new entry is marked ``rmsnorm``; the base's op-less entry for that problem
    now serves TSRA only; its entries for other problems stay as they were, and an entry the
    sweep re-timed on its own op goes even though the heuristic won this time."""
    default = (4096, 16, 8, 0)
    rows = [dict(r, rmsnorm=True) for r in _diag_rows(
        {default: 0.400, (1024, 32, 1, 2): 0.100}, default)]
    # a forward problem timed on RMSNorm→TSRA where the heuristic won: no new entry
    rows += [dict(r, direction="forward", rmsnorm=True) for r in _diag_rows(
        {default: 0.100, (1024, 32, 1, 2): 0.120}, default)]
    base = {"format": FORMAT, "device": "NVIDIA H200", "source_file": "shipped.json",
            "entries": [
                _entry(direction="backward", itemsize=2, num_warps=2),      # op-less, timed
                _entry(direction="forward", itemsize=2, num_warps=4, rmsnorm=True),  # re-timed
                _entry(direction="forward", itemsize=2, num_warps=8, rmsnorm=False),  # other op
                _entry(C=128, split=64, P=256, itemsize=2, num_warps=1)]}  # not timed
    table = gpu_diag.write_tuning_table({"device": "NVIDIA H200", "tiles": rows},
                                        str(tmp_path / "t.json"), base=base)
    got = {(e["direction"], e["C"], e.get("rmsnorm")): e["num_warps"] for e in table["entries"]}
    assert got == {("backward", 64, True): 1, ("backward", 64, False): 2,
                   ("forward", 64, False): 8, ("forward", 128, None): 1}
    assert table["merged_from"] == "shipped.json"
    assert set(table) == {"format", "device", "torch", "triton", "date", "source", "min_gain",
                          "entries", "merged_from"}
    loaded = load_table(tmp_path / "t.json")
    assert loaded.lookup("backward", 2, False, 64, 32, 1024, rmsnorm=True)["num_warps"] == 1
    assert loaded.lookup("backward", 2, False, 64, 32, 1024, rmsnorm=False)["num_warps"] == 2
    assert loaded.lookup("forward", 2, False, 64, 32, 1024, rmsnorm=True) == {}
    # both ops timed (or rows without an op, as before): the op-less base entry goes
    both = rows[:2] + [dict(r, rmsnorm=False) for r in rows[:2]]
    table = gpu_diag.write_tuning_table({"tiles": both}, str(tmp_path / "t2.json"),
                                        base=base)
    assert [(e["C"], e["direction"], e.get("rmsnorm")) for e in table["entries"]
            if e["direction"] == "backward"] == [(64, "backward", False),
                                                 (64, "backward", True)]
    legacy = [{k: v for k, v in r.items() if k != "rmsnorm"} for r in rows[:2]]
    table = gpu_diag.write_tuning_table({"tiles": legacy}, str(tmp_path / "t3.json"),
                                        base=base)
    assert [e.get("rmsnorm") for e in table["entries"] if e["direction"] == "backward"
            and e["C"] == 64] == [None]


def test_gpu_diag_tile_sweep_times_the_chosen_ops(gpu_diag, monkeypatch, device):
    """The tile sweep's plumbing on a tiny problem (the interpreter on a CPU): each op of
    ``TILE_OPS`` is launched as itself (RMSNorm→TSRA with ``norm_size = C``) and recorded,
    and the table's entries carry the op."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter on a CPU")
    from cobkern.kernels import tsra as k

    launched = []
    run = k.run

    def spy(p, tensors, *args, **kw):
        launched.append(p.constexprs["RMSNORM"])
        return run(p, tensors, *args, **kw)

    monkeypatch.setattr(k, "run", spy)
    monkeypatch.setattr(gpu_diag, "DEVICE", device.type)
    monkeypatch.setattr(gpu_diag, "BATCH", 2)
    monkeypatch.setattr(gpu_diag, "SHAPES", [(64, 4, 4)])
    monkeypatch.setattr(gpu_diag, "LAYOUTS", ("nchw",))
    monkeypatch.setattr(gpu_diag, "DTYPES", {"fp32": torch.float32})
    monkeypatch.setattr(gpu_diag, "TILE_OPS", ("tsra", "rmsnorm_tsra"))
    monkeypatch.setattr(gpu_diag, "CONFIGS", {"forward": [(4096, 16), (1024, 16, 2)],
                                              "backward": [(4096, 32)]})
    monkeypatch.setattr(gpu_diag, "precompile", lambda run_job, jobs: [run_job(j) for j in jobs])
    monkeypatch.setattr(gpu_diag, "copy_bandwidth", lambda: 1e12)
    monkeypatch.setattr(gpu_diag, "_graph_ms", gpu_diag._wall_ms)
    rec: dict = {}
    gpu_diag.part_tiles(rec)
    assert {r["rmsnorm"] for r in rec["tiles"]} == {True, False}
    assert all("ms" in r for r in rec["tiles"]), [r.get("error") for r in rec["tiles"]]
    assert set(launched) == {True, False}
    for e in gpu_diag.tuning_table(rec, min_gain=-1.0)["entries"]:
        assert e["rmsnorm"] in (True, False)
    assert "rmsnorm_tsra" in gpu_diag._markdown(dict(rec, copy_GBps=1000.0))
