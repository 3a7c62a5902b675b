"""``bench/bench_calibration.py``: the harness runs on a CPU, and its CUDA-graph rows'
plumbing (capture notes, the "× graphed forward" ratio, the Markdown) holds together.

The graph rows themselves only run on a GPU lease; here their pieces run on CPU tensors,
where a CUDA-graph capture cannot succeed — which is exactly the failure path the rows
must report instead of passing an eager time off as a graphed one. The harness runs on
the reference backend: under the suite's ``TRITON_INTERPRET=1`` the kernels would take a
minute here, and their statistics are tested elsewhere.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from cobkern.ops import use_backend

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import bench_calibration as bc  # noqa: E402


def tiny():
    from cobkern.models import vgg16_tsra

    torch.manual_seed(0)
    model = vgg16_tsra(width=0.125).eval()
    return model, bc._loader(8, 4, torch.device("cpu"), torch.float32)


def test_main_runs_on_a_cpu_and_writes_json_and_markdown(tmp_path) -> None:
    with use_backend("reference"):
        r = bc.main(["--out", str(tmp_path), "--images", "8", "--batch", "4",
                     "--repeats", "1"])
    assert r["partial"] is False and r["layers"] == 15
    assert "forward only" in r["results"] and "materialize" in r["results"]
    assert not any("cuda graph" in name for name in r["results"])  # CUDA-only rows
    on_disk = json.loads((tmp_path / "bench_calibration.json").read_text())
    assert on_disk["results"].keys() == r["results"].keys()
    assert "× graphed forward" in (tmp_path / "bench_calibration.md").read_text()


def test_graphed_forward_notes_a_failed_capture() -> None:
    """On a CPU the capture fails: the row must say so (and its time is eager)."""
    model, loader = tiny()
    with use_backend("reference"):
        seconds, _, held, note = bc.run_forward_graphed(model, loader, torch.device("cpu"))
    assert seconds > 0 and held == 0
    assert "graph_capture_failed" in note and note["graph_capture_failed"]


def test_graphed_streaming_returns_stats_and_an_empty_note_when_nothing_failed() -> None:
    """On a CPU ``calibrate`` ignores ``cuda_graphs`` (no capture, no warning)."""
    model, loader = tiny()
    with use_backend("reference"):
        seconds, stats, held, note = bc.run_streaming(model, loader, torch.device("cpu"),
                                                      cuda_graphs=True)
    assert note == {} and len(stats.layers) == 15 and held > 0


def test_graph_rows_divide_by_the_graphed_forward_in_their_layout() -> None:
    results = {
        "forward only": {"seconds": 1.0},
        bc.FWD_CL: {"seconds": 0.8},
        bc.FWD_GRAPH: {"seconds": 0.5},
        bc.FWD_GRAPH + ", channels_last": {"seconds": 0.4},
        bc.GRAPHS: {"seconds": 0.75},
        bc.GRAPHS + ", channels_last": {"seconds": 0.6},
        "streaming": {"seconds": 2.0},
    }
    bc._ratios(results)
    assert results[bc.GRAPHS]["x_forward_graphed"] == pytest.approx(1.5)
    assert results[bc.GRAPHS + ", channels_last"]["x_forward_graphed"] == pytest.approx(1.5)
    assert results[bc.GRAPHS + ", channels_last"]["x_forward"] == pytest.approx(0.75)
    assert results[bc.FWD_GRAPH]["x_forward_graphed"] == 1.0
    assert "x_forward_graphed" not in results["streaming"]


def test_markdown_flags_rows_whose_capture_failed() -> None:
    results = {"forward only": {"seconds": 1.0},
               bc.GRAPHS: {"seconds": 1.2, "graph_capture_failed": "RuntimeError: sync"}}
    bc._ratios(results)
    for v in results.values():
        v.update(images_per_s=1.0, peak_bytes_measured=None, bytes_held=0)
    record = {"device": "cpu", "width": 1, "images": 1, "batch": 1, "dtype": "fp32",
              "layers": 15, "torch": "x", "triton": "y", "date": "d", "results": results,
              "partial": True, "note": ""}
    md = bc._markdown(record)
    assert "**Graph capture failed**" in md and "RuntimeError: sync" in md


def test_materialize_bytes_held_counts_its_grams() -> None:
    """``materialize``'s bytes held are the activations it kept plus the Gram matrices it
    formed, as the streaming rows count their statistics (it counted the activations only)."""
    from cobkern.cob import find_cob_layers

    model, loader = tiny()
    layers = find_cob_layers(model)
    kept: dict[str, list[torch.Tensor]] = {lay.name: [] for lay in layers}  # hooked the same way
    hooks = [lay.activation.register_forward_hook(
        lambda m, i, o, n=lay.name: kept[n].append(o.detach())) for lay in layers]
    try:
        with torch.no_grad():
            for x in loader:
                model(x)
    finally:
        for h in hooks:
            h.remove()
    activations = sum(a.numel() * a.element_size() for v in kept.values() for a in v)
    # each layer's H_Uᵀ H_U and H_Vᵀ H_V in float32: split² + (C − split)² entries
    grams = sum(4 * (lay.split ** 2 + (kept[lay.name][0].shape[1] - lay.split) ** 2)
                for lay in layers)

    _, out, held = bc.run_materialize(model, loader, torch.device("cpu"))
    assert len(out) == len(layers) == 15
    assert all(g.dtype == torch.float32 for pair in out.values() for g in pair)
    assert held == activations + grams > activations
