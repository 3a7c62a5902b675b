"""``bench/bench_tsra.py`` runs end to end on small shapes, in both memory layouts.

The script times eager / ``torch.compile`` / cobkern TSRA at VGG-16 shapes on a GPU lease;
here its ``main`` runs on one tiny 4-D shape and one 2-D shape (the module's shape lists
monkeypatched, as ``test_gpu_diag_layout_and_bias_grad_parts_run`` does for
``bench/gpu_diag.py``), batch 2, fp32, ``--layouts nchw,channels_last``, and, to stay quick,
the script's own ``--ops tsra --passes fwd+bwd``: each row compiles its own
``torch.compile`` graphs, about 2.5 s each on a 2-core CPU with a cold inductor cache
(the run takes ~30 s with both passes, ~6 s warm), and fwd+bwd runs both kernels anyway
(``rmsnorm_tsra`` takes the same layout code). Under ``TRITON_INTERPRET=1``
(``conftest.py``) the cobkern column runs the Triton kernels on the CPU tensors, so the
channels-last rows exercise the kernels' channels-last launches, which a spy on the
launcher asserts.

A wrong fused op (NaN, or an error above the dtype's tolerance) gives a row that is marked
``failed`` and never timed, in strict JSON, and exit status 1; the vendor bandwidth behind
"% spec" is looked up by the device's whole name (the H100 variants differ).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import cobkern

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import bench_tsra  # noqa: E402

#: (C, H, W) conv activation and (C,) classifier row, kept tiny for the interpreter
SHAPES = [(8, 4, 4), (16,)]
BATCH = 2


def test_bench_tsra_times_both_layouts(monkeypatch, tmp_path, device):
    """One row per layout for the 4-D shape, one (nchw) for the 2-D shape; the channels-last
    rows are as accurate as the NCHW ones, share their ceiling, and ran the kernels on the
    channels-last tensors in place; the Markdown has a layout column."""
    if device.type == "cpu" and not cobkern.ops.backend.interpreter_enabled():
        pytest.skip("the kernels run on CPU tensors only under TRITON_INTERPRET=1")
    from cobkern.kernels import tsra as k

    monkeypatch.setattr(bench_tsra, "CPU_SHAPES", SHAPES)
    monkeypatch.setattr(bench_tsra, "VGG_SHAPES", SHAPES)
    launches: list[tuple[int, bool, bool]] = []  # (dim, channels-last, every tensor alike)
    original = k.run

    def spy(p, tensors, *args, **kwargs):
        t = tensors[0]
        launches.append((t.dim(), t.dim() == 4 and not t.is_contiguous()
                         and t.is_contiguous(memory_format=torch.channels_last),
                         all(u.stride() == t.stride() for u in tensors)))
        return original(p, tensors, *args, **kwargs)

    monkeypatch.setattr(k, "run", spy)
    assert bench_tsra.main(["--out", str(tmp_path), "--batch", str(BATCH), "--dtypes", "fp32",
                            "--ops", "tsra", "--passes", "fwd+bwd",
                            "--layouts", "nchw,channels_last", "--device", device.type]) == 0

    data = json.loads((tmp_path / "bench_tsra.json").read_text())
    assert data["environment"]["layouts"] == ["nchw", "channels_last"]
    rows = data["results"]
    conv, linear = [BATCH, *SHAPES[0]], [BATCH, *SHAPES[1]]
    assert [(r["shape"], r["mode"], r["layout"]) for r in rows] == [
        (conv, "fwd+bwd", "nchw"), (conv, "fwd+bwd", "channels_last"),
        (linear, "fwd+bwd", "nchw")]  # 2-D rows: no channels-last form, nchw only
    for r in rows:
        assert r["op"] == "tsra" and r["dtype"] == "fp32", r
        assert r["cobkern_ms"] > 0 and r["eager_ms"] > 0 and r["compile_ms"] > 0, r
        # output and input gradient of the fp32 kernels against the eager formula in float64
        # on the same values: rounding (2^-24 ≈ 6e-8 per op) over a handful of ops and the
        # C = 8 channel sums measures ~1e-7; 1e-5 leaves two orders of margin, while a layout
        # mistake (wrong strides, x and dy read in different layouts) is an O(1) error
        assert r["rel_err"] < 1e-5, r
    # both layouts share one ceiling measurement: the layout moves no more bytes
    assert rows[0]["ceiling_ms"] == rows[1]["ceiling_ms"]
    assert rows[0]["bytes"] == rows[1]["bytes"]

    # the kernels ran on the channels-last tensors in place (no contiguous copy first), and on
    # the NCHW ones; x, dy and dx always share one layout
    assert any(dim == 4 and cl for dim, cl, _ in launches), launches
    assert any(dim == 4 and not cl for dim, cl, _ in launches), launches
    assert all(alike for _, _, alike in launches), launches

    lines = (tmp_path / "bench_tsra.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| op |"))
    assert "| shape | layout |" in header
    body = [line for line in lines if line.startswith("| tsra |")]
    assert [line.split(" | ")[3:5] for line in body] == [
        ["2×8×4×4", "nchw"], ["2×8×4×4", "channels_last"], ["2×16", "nchw"]]
    assert all(line.count("|") == header.count("|") for line in body)


def test_bench_tsra_rejects_unknown_layout(capsys):
    """A bad ``--layouts`` value stops argparse before any work, naming the value."""
    with pytest.raises(SystemExit) as e:
        bench_tsra.main(["--out", "unused", "--layouts", "nchw,nhwc2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--layouts" in err and "nhwc2" in err, err


def _strict_json(path) -> dict:
    """``path`` parsed as strict JSON: ``NaN`` / ``Infinity`` are errors, not values."""
    def refuse(constant: str):
        raise ValueError(f"non-strict JSON constant {constant} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("wrong, err", [
    (lambda x, split: x * float("nan"), None),  # NaN everywhere: the error is not finite
    # the right function, 0.1 % too large: rel_err 1e-3 > fp32's tolerance 1e-5
    (lambda x, split: bench_tsra.eager_tsra(x, split) * 1.001, 1e-3),
], ids=["nan", "above-tolerance"])
def test_a_wrong_kernel_is_never_timed(monkeypatch, tmp_path, capsys, wrong, err):
    """A fused op that computes the wrong thing gives a row with ``failed`` (naming op, pass,
    dtype, shape, layout and error) and no timing; the JSON stays strict (``rel_err`` null
    when not finite) and the Markdown row says so."""
    monkeypatch.setattr(cobkern, "tsra", wrong)
    rows = bench_tsra.run([(64, 8, 8)], 2, ["fp32"], torch.device("cpu"), ops=("tsra",),
                          passes=("fwd",), out_dir=str(tmp_path))
    assert len(rows) == 1
    (row,) = _strict_json(tmp_path / "bench_tsra.json")["results"]
    assert "tsra fwd fp32 2×64×8×8 nchw: relative error" in row["failed"], row
    assert not any(k.endswith("_ms") and k != "ceiling_ms" for k in row), row
    assert "pct_of_ceiling" not in row and "speedup_vs_eager" not in row, row
    if err is None:
        assert row["rel_err"] is None and "is not finite" in row["failed"], row
    else:
        assert row["rel_err"] == pytest.approx(err, rel=1e-3), row
        assert "exceeds the tolerance 1.0e-05" in row["failed"], row
    assert "FAILED tsra fwd fp32" in capsys.readouterr().err
    md = (tmp_path / "bench_tsra.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| op |"))
    (body,) = [line for line in md if line.startswith("| tsra |")]
    assert "**failed**" in body and body.count("|") == header.count("|"), body


def test_main_exits_1_when_a_row_failed(monkeypatch, tmp_path, capsys):
    """The script's exit status says a row was not timed for a wrong result."""
    monkeypatch.setattr(bench_tsra, "CPU_SHAPES", [(8, 4, 4)])
    monkeypatch.setattr(cobkern, "tsra", lambda x, split: x * float("nan"))
    assert bench_tsra.main(["--out", str(tmp_path), "--batch", "2", "--dtypes", "fp32",
                            "--ops", "tsra", "--passes", "fwd", "--device", "cpu"]) == 1
    assert "1 row(s) failed the accuracy check" in capsys.readouterr().err


@pytest.mark.parametrize("name, bandwidth", [
    ("NVIDIA H100 80GB HBM3", 3.35e12),  # SXM5
    ("NVIDIA H100 PCIe", 2.0e12),
    ("NVIDIA H100 NVL", 3.9e12),
    ("NVIDIA H200", 4.8e12),
    ("NVIDIA  H200 ", 4.8e12),  # whitespace does not matter
    ("NVIDIA H100", None),  # an unknown variant: no "% spec", never a guess
    ("NVIDIA H200 NVL", None),
    ("NVIDIA A100-SXM4-80GB", None),
    (None, None),
])
def test_spec_bandwidth_tells_the_h100_variants_apart(name, bandwidth):
    """The H100 SXM, PCIe and NVL names all contain "H100": a substring match gave the PCIe
    and NVL cards the SXM's 3.35 TB/s."""
    assert bench_tsra.spec_bandwidth(name) == bandwidth
