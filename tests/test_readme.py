"""The README's Python examples run as written.

Each fenced ``python`` block of ``README.md`` is executed; the only changes are the ones a
GPU-less test machine needs, each asserted to apply, so an edit of the README that a test
can no longer follow fails here instead of going stale:

* the API example's device line (CUDA when there is one) becomes the suite's device;
* the pipeline example's ``load_cifar10`` returns a small synthetic two-split set (decoding
  the shipped 60,000 JPEGs is the main job's work, not the suite's), and it runs in a
  temporary directory, where it writes ``pruned.pt``, on the reference backend (under
  ``TRITON_INTERPRET=1`` the default would interpret the covariance kernel, ~90 s here;
  the kernels have their own tests).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import cobkern
import cobkern.data
from cobkern.data import ImageSet
from cobkern.models import load_model, vgg16_tsra

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def _block(marker: str) -> str:
    found = [b for b in _python_blocks() if marker in b]
    assert len(found) == 1, f"expected one README python block containing {marker!r}"
    return found[0]


def test_readme_has_the_two_examples() -> None:
    assert len(_python_blocks()) == 2


def test_api_example_runs(device: torch.device) -> None:
    code = _block("cobkern.tsra(")
    line = 'device = "cuda" if torch.cuda.is_available() else "cpu"'
    assert line in code  # as written, it runs on a CPU-only machine too
    ns: dict = {}
    exec(compile(code.replace(line, f'device = "{device.type}"'), "README", "exec"), ns)
    assert ns["x"].device.type == device.type

    x, y, z, y_ref = ns["x"], ns["y"], ns["z"], ns["y_ref"]
    assert x.is_leaf and x.is_contiguous(memory_format=torch.channels_last)
    # the example promises a gradient in x.grad: it must be there, finite and non-zero
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.isfinite(x.grad.float()).all() and x.grad.float().abs().sum() > 0
    assert y.shape == z.shape == x.shape and y.dtype == torch.bfloat16
    # fused (or, on a CPU, the default path) vs the reference: bf16 output, so 2^-7 relative
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2**-7, atol=1e-3)
    assert isinstance(ns["model"], torch.nn.Module)


def _synthetic_cifar(n_train: int = 48, n_test: int = 16) -> tuple[ImageSet, ImageSet]:
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> ImageSet:
        images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
        return ImageSet(images, torch.arange(n, dtype=torch.int64) % 10)

    return make(n_train), make(n_test)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pipeline_example_runs(tmp_path, monkeypatch, capsys) -> None:
    code = _block("prune(model, stats")
    assert "load_cifar10()" in code and 'save_model(model, "pruned.pt")' in code
    monkeypatch.setattr(cobkern.data, "load_cifar10", lambda *a, **k: _synthetic_cifar())
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    with cobkern.use_backend("reference"):
        exec(compile(code, "README", "exec"), ns)

    model, report = ns["model"], ns["report"]
    assert "param" in capsys.readouterr().out.lower()  # report.summary() was printed
    before = sum(p.numel() for p in vgg16_tsra(width=0.25).parameters())
    after = sum(p.numel() for p in model.parameters())
    assert after < before
    # the file alone rebuilds the pruned model: same weights, same function
    rebuilt = load_model(tmp_path / "pruned.pt").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)
    assert report is not None
