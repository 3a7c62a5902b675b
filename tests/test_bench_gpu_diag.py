"""``bench/gpu_diag.py`` refuses a misspelt part before it runs anything.

``--parts tile`` (for ``tiles``) raised ``KeyError`` inside the per-part ``try``: logged as
that part's error, "part tile done", exit status 0 — a lease spent measuring nothing. Now it
is an ``argparse`` error naming the valid parts, and ``bench/gpu_session.sh`` checks
``GPU_DIAG_PARTS`` the same way (``--check-args``) before its first step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench import gpu_diag  # noqa: E402


@pytest.mark.parametrize("parts, named", [
    ("tile", "['tile']"),
    ("tiles,covarience", "['covarience']"),
    (",", "no part"),
])
def test_unknown_parts_are_usage_errors(parts, named, monkeypatch, tmp_path, capsys):
    """Exit status 2 before anything runs (nothing written), naming the bad value and every
    valid part. On the CPU device (the smoke run's ``GPU_DIAG_DEVICE=cpu``), so that no
    "needs a CUDA device" error comes first on a machine without one."""
    monkeypatch.setattr(gpu_diag, "DEVICE", "cpu")
    with pytest.raises(SystemExit) as e:
        gpu_diag.main(["--out", str(tmp_path / "out"), "--parts", parts])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--parts" in err and named in err, err
    assert all(name in err for name in gpu_diag.PART_NAMES), err
    assert not (tmp_path / "out").exists()


def test_check_args_accepts_known_parts(tmp_path):
    """``--check-args`` (what gpu_session.sh runs first) returns 0 for valid parts without
    needing a GPU or writing anything."""
    assert gpu_diag.main(["--out", str(tmp_path / "out"), "--check-args",
                          "--parts", "tiles, covariance"]) == 0
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_session_stops_on_a_misspelt_gpu_diag_parts(tmp_path):
    """``GPU_DIAG_PARTS=tile`` stops bench/gpu_session.sh before its first step (exit 2),
    with gpu_diag's message in steps.log."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "TMPDIR": str(tmp_path),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "GPU_SESSION_DRY_RUN": "1", "GPU_SESSION_STEPS": "diag", "GPU_DIAG_PARTS": "tile"}
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_session.sh")], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    log = (out / "steps.log").read_text()
    assert "unknown part(s) ['tile']" in log and "tiles" in log, log
    assert "== environment" not in log, log
