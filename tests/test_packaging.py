"""The wheel ships every package: pyproject's explicit list matches the source tree.

An editable install imports any folder under ``cobkern/`` whether listed or not, so a
forgotten entry only breaks a regular ``pip install .`` — this test catches it here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_is_listed():
    listed = set(_config()["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "cobkern").rglob("__init__.py")}
    on_disk.add("cobkern.kernels")  # kernels/ is mapped into the package
    assert listed == on_disk, f"missing: {on_disk - listed}, stale: {listed - on_disk}"


def test_kernels_folder_maps_into_the_package_not_top_level():
    package_dir = _config()["package-dir"]
    assert package_dir["cobkern.kernels"] == "kernels"
    assert "kernels" not in _config()["packages"]  # PyPI's unrelated `kernels` stays free
    assert (ROOT / "kernels" / "__init__.py").is_file()


def test_tuning_tables_ship_as_package_data():
    """The per-GPU TSRA tables (``cobkern.ops.tuning``) are data files, not modules: the
    wheel carries them only through ``package-data``, matched against the folder the
    loader reads."""
    import fnmatch

    from cobkern.ops.tuning import TABLE_DIR

    globs = _config()["package-data"]["cobkern.ops"]
    rel = TABLE_DIR.relative_to(ROOT / "cobkern" / "ops").as_posix()
    assert any(fnmatch.fnmatch(f"{rel}/NVIDIA_H200.json", g) for g in globs), globs
    # the README beside them is documentation; only tables belong in the wheel
    assert not any(fnmatch.fnmatch(f"{rel}/README.md", g) for g in globs), globs
