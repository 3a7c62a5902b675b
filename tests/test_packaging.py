"""The distributions ship what they must: pyproject's explicit package list matches the
source tree, and a wheel and an sdist built from it hold the right files.

An editable install imports any folder under ``cobkern/`` whether listed or not, so a
forgotten entry only breaks a regular ``pip install .`` — these tests catch it here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _data_packages() -> set[str]:
    """Listed packages that hold data files only (no ``__init__.py``)."""
    return {name for name in _config()["package-data"]
            if not (ROOT / Path(*name.split("."))).joinpath("__init__.py").is_file()}


def test_every_package_is_listed():
    listed = set(_config()["packages"]) - _data_packages()
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "cobkern").rglob("__init__.py")}
    on_disk.add("cobkern.kernels")  # kernels/ is mapped into the package
    assert listed == on_disk, f"missing: {on_disk - listed}, stale: {listed - on_disk}"
    assert _data_packages() <= set(_config()["packages"])  # listed: no setuptools warning


def test_kernels_folder_maps_into_the_package_not_top_level():
    package_dir = _config()["package-dir"]
    assert package_dir["cobkern.kernels"] == "kernels"
    assert "kernels" not in _config()["packages"]  # PyPI's unrelated `kernels` stays free
    assert (ROOT / "kernels" / "__init__.py").is_file()


def test_tuning_tables_ship_as_package_data():
    """The per-GPU TSRA tables (``cobkern.ops.tuning``) are data files, not modules: the
    wheel carries them only through ``package-data``, matched against the folder the
    loader reads (that of the imported package: the source tree, or site-packages)."""
    import fnmatch

    import cobkern.ops
    from cobkern.ops.tuning import TABLE_DIR

    assert TABLE_DIR == Path(cobkern.ops.__file__).parent / "tuning_tables"
    globs = _config()["package-data"]["cobkern.ops.tuning_tables"]
    assert any(fnmatch.fnmatch("NVIDIA_H200.json", g) for g in globs), globs
    # the README beside them is documentation; only tables belong in the wheel
    assert not any(fnmatch.fnmatch("README.md", g) for g in globs), globs


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A wheel and an sdist built from a copy of the tracked source (offline: the
    installed setuptools, no build isolation; the copy keeps build/ out of the tree)."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    for name in ("cobkern", "kernels", "tests", "bench", "docs"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "BENCHMARKS.md",
                 "RESULTS.md"):
        shutil.copy2(ROOT / name, src / name)
    (src / "data").mkdir()
    (src / "data" / "cifar10-jpeg.tar.gz").write_bytes(b"a stand-in for the 19 MB archive")
    out = tmp / "out"
    code = ("import sys; from setuptools import build_meta as b; out = sys.argv[1]; "
            "b.build_wheel(out); b.build_sdist(out)")  # (build_meta rewrites sys.argv)
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # nothing setuptools deprecates or finds missing from the configuration (its
    # SetuptoolsDeprecationWarning / SetuptoolsWarning lines)
    warned = [line for line in (proc.stdout + proc.stderr).splitlines()
              if "Warning" in line and "!!" not in line]
    assert not warned, "\n".join(warned)
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    return wheel, sdist


def test_the_wheel_holds_the_package_and_nothing_else(dists):
    names = zipfile.ZipFile(dists[0]).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"cobkern", "cobkern-0.1.0.dist-info"}, tops  # no top-level kernels/
    for need in ("cobkern/kernels/__init__.py", "cobkern/kernels/tsra.py",
                 "cobkern/kernels/covariance.py", "cobkern/ops/tuning_tables/NVIDIA_H200.json",
                 "cobkern/cli/main.py", "cobkern-0.1.0.dist-info/licenses/LICENSE"):
        assert need in names, need
    assert "cobkern/ops/tuning_tables/README.md" not in names
    meta = zipfile.ZipFile(dists[0]).read("cobkern-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta
    entry = zipfile.ZipFile(dists[0]).read("cobkern-0.1.0.dist-info/entry_points.txt")
    assert b"cobkern = cobkern.cli.main:main" in entry


def test_the_sdist_can_run_its_tests_but_leaves_the_dataset_out(dists):
    """The sdist carried tests/test_*.py without conftest.py and the helper modules they
    import (17 collection errors when run from it); the 19 MB archive stays in git."""
    with tarfile.open(dists[1]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    helpers = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("*.py")}
    assert helpers <= names, sorted(helpers - names)
    for need in ("LICENSE", "README.md", "docs/method.md", "bench/bench_tsra.py",
                 "kernels/tsra.py", "pyproject.toml", "MANIFEST.in"):
        assert need in names, need
    assert not any(n.startswith("data/") for n in names)
